"""Shared machinery: timing, environment record, budgets and the crash-tolerant item runner.

Every section (ops, optim, train) is a list of :class:`Item`. A section runs in a child process
that appends one JSON line per event (``plan``, ``start``, ``done``, ``error``, ``skipped``) to a
file; if the child dies (a kernel fault poisons the CUDA context, a hang hits the timeout) the
parent records the item in flight as failed and starts a new child that skips every item already
finished. So one failure costs one item, never the run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# ----------------------------------------------------------------------------- items


@dataclass
class Item:
    """One unit of work of a section: ``fn()`` returns a JSON-able dict."""

    key: str
    kind: str  # the results list it belongs to: "ops", "copy", "optimizer_step", ...
    fn: Callable[[], dict]
    meta: dict = field(default_factory=dict)  # recorded with the result, also when it fails


class Skip(Exception):
    """Raised by an item that cannot run here (recorded as skipped with the message)."""


# ----------------------------------------------------------------------------- timing

_FLUSH: dict[str, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer larger than any L2 (256 MB), zeroed before each timed call (as do_bench does)."""
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device=device)
    return _FLUSH[key]


def time_call(
    call: Callable[[int], Any],
    device: torch.device,
    *,
    n_inputs: int = 1,
    warmup_ms: float = 10.0,
    rep_ms: float = 50.0,
    min_reps: int = 8,
    max_reps: int = 200,
    flush: bool = True,
) -> dict:
    """Median time of ``call(i)`` (``i`` rotates over ``n_inputs`` input sets), warm-up excluded.

    CUDA: one pair of CUDA events around each call, the L2 flushed before each call (its time
    is outside the events). CPU: ``time.perf_counter`` around each call. The first call (Triton
    compilation, allocator growth) and at least ``warmup_ms`` of calls are not timed.
    Returns ``median_ms``, ``p20_ms``, ``p80_ms``, ``min_ms``, ``reps``.
    """
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    counter = [0]

    def nxt() -> None:
        call(counter[0] % n_inputs)
        counter[0] += 1

    nxt()  # compilation, first allocations
    sync()
    t0 = time.perf_counter()
    nxt()
    sync()
    est = max(time.perf_counter() - t0, 1e-6) * 1e3
    for _ in range(max(1, int(warmup_ms / est))):
        nxt()
    sync()
    reps = int(min(max_reps, max(min_reps, math.ceil(rep_ms / est))))
    times: list[float] = []
    if cuda:
        buf = _flush_buffer(device) if flush else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if buf is not None:
                buf.zero_()
            starts[i].record()
            nxt()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            t = time.perf_counter()
            nxt()
            times.append((time.perf_counter() - t) * 1e3)
    return summarize(times)


def summarize(times_ms: Sequence[float]) -> dict:
    """Median, 20th/80th percentiles and minimum of a list of times (ms)."""
    ts = sorted(times_ms)
    n = len(ts)

    def q(f: float) -> float:
        return ts[min(n - 1, max(0, round(f * (n - 1))))]

    return {
        "median_ms": statistics.median(ts),
        "p20_ms": q(0.2),
        "p80_ms": q(0.8),
        "min_ms": ts[0],
        "reps": n,
    }


def copy_bandwidth(device: torch.device, nbytes: int) -> dict:
    """Device-to-device copy bandwidth: ``dst.copy_(src)`` counting bytes read plus written."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda i: dst.copy_(src), device, rep_ms=100.0, min_reps=10)
    moved = 2 * n * 4
    return {
        "bytes_moved": moved,
        "tensor_bytes": n * 4,
        **t,
        "gbps": moved / (t["median_ms"] * 1e-3) / 1e9,
    }


# ----------------------------------------------------------------------------- environment


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (platform.processor() or platform.machine() or "cpu") + " (CPU)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "device"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def _git_dirty() -> int | None:
    """How many tracked files differ from the commit (the tree measured is then not it)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        return len([ln for ln in out.stdout.splitlines() if ln.strip()])
    except Exception:
        return None


def env_info(device: torch.device) -> dict:
    """Device, versions and date: the header of every results file."""
    info: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "git_modified_files": _git_dirty(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"not importable ({type(exc).__name__})"
    try:
        import sam_kernels

        info["sam_kernels"] = sam_kernels.__version__
    except Exception as exc:
        info["sam_kernels"] = f"import failed: {exc}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["sm_count"] = p.multi_processor_count
        info["memory_gib"] = round(p.total_memory / 2**30, 1)
        info["l2_bytes"] = int(getattr(p, "L2_cache_size", 0))
        info["capability"] = f"{p.major}.{p.minor}"
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["driver"] = out.stdout.strip() or None
        except Exception:
            info["driver"] = None
    else:
        info["cpu_threads"] = torch.get_num_threads()
    # the host / cpu sections run on the CPU whatever the device
    info["cpu_model"] = cpu_model()
    info["cpu_count"] = os.cpu_count()
    return info


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 32 * 2**20
    p = torch.cuda.get_device_properties(device)
    return int(getattr(p, "L2_cache_size", 0)) or 50 * 2**20


def backend_status(device: torch.device) -> dict:
    """Which sam_kernels backends can run on ``device``, and why not."""
    import sam_kernels as sk

    out = {}
    for name in sk.BACKENDS:
        try:
            ok = sk.available(name, device)
            out[name] = {"available": ok}
            if not ok:
                out[name]["why"] = sk.why_unavailable(name, device)
        except Exception as exc:
            out[name] = {"available": False, "why": f"{type(exc).__name__}: {exc}"}
    return out


def implemented(op: str, backend: str) -> bool:
    """Whether ``backend`` has its own implementation of ``op`` (not the eager fallback)."""
    import sam_kernels as sk

    return sk.has_implementation(op, backend)


# ----------------------------------------------------------------------------- child side


def _write(fh, rec: dict) -> None:
    fh.write(json.dumps(rec, default=_json_default) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    return repr(o)


def read_records(path: str) -> list[dict]:
    recs = []
    if not os.path.exists(path):
        return recs
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a crash
    return recs


TERMINAL = ("done", "error", "skipped")


def cuda_poisoned() -> bool:
    """True if the CUDA context no longer works (a sticky error after a kernel fault)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    try:
        torch.cuda.synchronize()
        x = torch.ones(4, device="cuda")
        return float(x.sum().item()) != 4.0
    except Exception:
        return True


def run_items(section: str, items: list[Item], jsonl: str, deadline: float) -> int:
    """Child side: run the items not yet finished in ``jsonl``; returns the exit code.

    Exit code 3: the CUDA context broke after an item failed (the parent starts a new child).
    """
    recs = read_records(jsonl)
    finished = {r["key"] for r in recs if r.get("event") in TERMINAL}
    with open(jsonl, "a") as fh:
        if not any(r.get("event") == "plan" for r in recs):
            _write(fh, {"event": "plan", "section": section, "keys": [it.key for it in items]})
        for it in items:
            if it.key in finished:
                continue
            base = {"key": it.key, "kind": it.kind, "section": section, "meta": it.meta}
            if time.time() > deadline:
                _write(fh, {**base, "event": "skipped", "reason": "time budget used up"})
                continue
            _write(fh, {**base, "event": "start", "t": time.time()})
            t0 = time.perf_counter()
            try:
                res = it.fn()
            except Skip as exc:
                _write(fh, {**base, "event": "skipped", "reason": str(exc)})
                print(f"[{section}] {it.key}: skipped ({exc})", flush=True)
                continue
            except Exception as exc:  # recorded; the run goes on
                msg = f"{type(exc).__name__}: {exc}"
                _write(
                    fh,
                    {**base, "event": "error", "error": msg[:2000], "traceback": _tb_tail()},
                )
                print(f"[{section}] {it.key}: ERROR {msg[:300]}", flush=True)
                if cuda_poisoned():
                    print(f"[{section}] CUDA context broken: restarting the section", flush=True)
                    return 3
                continue
            wall = time.perf_counter() - t0
            _write(fh, {**base, "event": "done", "result": res, "wall_s": round(wall, 3)})
            print(f"[{section}] {it.key}: {short(res)} ({wall:.1f}s)", flush=True)
    return 0


def _tb_tail(n: int = 3000) -> str:
    return traceback.format_exc()[-n:]


def short(res: dict) -> str:
    """A one-line summary of an item's result for the progress log."""
    parts = []
    for k in ("median_ms", "gbps", "step_ms", "img_per_s", "captured", "count", "kernels"):
        if k in res and res[k] is not None:
            v = res[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts) or "ok"


# ----------------------------------------------------------------------------- parent side


def run_section_process(
    section: str,
    config_path: str,
    jsonl: str,
    deadline: float,
    *,
    max_restarts: int = 4,
    grace_s: float = 30.0,
    item_timeout_s: float = 90.0,
    stderr_path: str | None = None,
) -> dict:
    """Parent side: run a section's child until every item is finished or given up.

    The child is replaced when it dies, and killed when it writes nothing for
    ``item_timeout_s`` (a hung kernel) or runs ``grace_s`` past the deadline. The item in flight
    gets an ``error`` record (why, and the tail of the child's stderr) in ``jsonl``.
    Returns ``{"status", "restarts", "crashes": [...]}``.
    """
    crashes = []
    restarts = 0
    stderr_path = stderr_path or jsonl + ".stderr"
    status = "ok"
    while True:
        cmd = [sys.executable, "-m", "benchmarks.run", "--child", section]
        cmd += ["--config", config_path, "--jsonl", jsonl, "--deadline", repr(deadline)]
        started = time.time()
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(cmd, stderr=err, start_new_session=True)
            rc: int | str | None = None
            while rc is None:
                try:
                    rc = proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    now = time.time()
                    try:
                        written = os.path.getmtime(jsonl)
                    except OSError:
                        written = 0.0
                    # before its first record the child is importing and planning: more time
                    if written < started:
                        last, limit = started, max(item_timeout_s, 120.0)
                    else:
                        last, limit = written, item_timeout_s
                    if now > deadline + grace_s:
                        _kill_group(proc)
                        rc = "timeout"
                    elif now - last > limit:
                        _kill_group(proc)
                        rc = f"no progress for {limit:.0f} s"
        if rc == 0:
            break
        tail = _tail(stderr_path)
        recs = read_records(jsonl)
        finished = {r["key"] for r in recs if r.get("event") in TERMINAL}
        in_flight = [r for r in recs if r.get("event") == "start" and r["key"] not in finished]
        why = rc if isinstance(rc, str) else f"exit code {rc}"
        with open(jsonl, "a") as fh:
            for r in in_flight[-1:]:
                _write(
                    fh,
                    {
                        "key": r["key"],
                        "kind": r.get("kind"),
                        "section": section,
                        "meta": r.get("meta", {}),
                        "event": "error",
                        "error": f"child process: {why} during this item",
                        "traceback": tail,
                    },
                )
        crashes.append({"why": why, "item": in_flight[-1]["key"] if in_flight else None})
        print(f"[{section}] child process: {why}; stderr tail:\n{tail[-1500:]}", flush=True)
        restarts += 1
        if not in_flight or time.time() > deadline or restarts > max_restarts:
            # no item to blame (the child broke before or between items) or no time left
            status = "aborted: " + why
            break
        status = "ok after restarts"
    return {"status": status, "restarts": restarts, "crashes": crashes}


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except Exception:
        proc.kill()
    proc.wait()


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()[-n:]
    except OSError:
        return ""
