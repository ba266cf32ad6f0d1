"""Ahead-of-time compile of every kernel for a real GPU target (no GPU needed).

Used by ``tests/ops/test_triton_compile.py`` in a subprocess with ``TRITON_INTERPRET`` unset: the
interpreter accepts code that the compiler rejects (types, constexpr use, layouts), so every
kernel variant the wrappers launch is compiled here for sm_90 / sm_80 and must give PTX and a
cubin. Runtime argument types come from the parameter names (:data:`ARG_TYPES`); constexpr
parameters are found from the kernel itself.

Run directly: ``python -m sam_kernels.triton._specs [capability ...]`` prints one JSON line per
(kernel variant, target).
"""

from __future__ import annotations

import json
import sys
import time

import triton.language as tl

from sam_kernels.triton import (
    _launch,
    adamw_step,
    aesam_stats,
    dot,
    filter_noise,
    frob_accumulate,
    grad_norm,
    lincomb,
    noise,
    perturb,
    restore,
    sgd_step,
)

F32, BF16, F16 = tl.float32, tl.bfloat16, tl.float16

#: runtime argument types by parameter name (every kernel uses these names)
ARG_TYPES = {
    "table": "*i64",
    "ptrs": "*i64",
    "n": "i32",
    "partial": "*fp64",
    "base": "i32",
    "nparts": "i32",
    "out": "*fp32",
    "out64": "*fp64",
    "stats": "*fp32",
    "ok_ptr": "*fp32",
    "lr_ptr": "*fp32",
    "coef_ptr": "*fp32",
    "scale_ptr": "*fp32",
    "loss_ptr": "*fp32",
    "seed_ptr": "*i64",
    "offset_ptr": "*i64",
    "meta": "*i64",
    "csk": "i32",
    "csi": "i32",
    "scale_stride": "i32",
}
#: every other runtime argument is a float scalar
FLOAT = "fp32"

GEOM = dict(CHUNK=_launch.GPU_CHUNK, BLOCK=_launch.GPU_BLOCK)


def _terms(*dts):
    out = {f"DT_G{j}": F32 for j in range(4)}
    for j, d in enumerate(dts):
        out[f"DT_G{j}"] = d
    return out


def variants():
    """``(label, kernel, constexprs, elementwise)`` for every variant worth compiling."""
    v = []
    for dt in (F32, BF16, F16):
        v.append((f"restore/{dt}", restore._restore_kernel,
                  dict(DT_P=dt, DT_B=dt, ALIGNED=True, **GEOM), True))  # fmt: skip
    v.append(("restore/unaligned", restore._restore_kernel,
              dict(DT_P=F32, DT_B=F32, ALIGNED=False, **GEOM), True))  # fmt: skip
    for dt, has_p in ((F32, False), (F32, True), (BF16, True), (F16, False)):
        v.append((f"sumsq/{dt}/p={has_p}", grad_norm.sumsq_kernel,
                  dict(HAS_P=has_p, DT_G=dt, DT_P=dt, ALIGNED=True, **GEOM), True))  # fmt: skip
    v.append(("norm_final", grad_norm._norm_final_kernel, dict(BLOCK=_launch.REDUCE_BLOCK), False))
    for dt_a, dt_b in ((F32, F32), (BF16, BF16), (F16, F16), (F32, BF16)):
        v.append((f"dot/{dt_a}/{dt_b}", dot._dot_kernel,
                  dict(DT_A=dt_a, DT_B=dt_b, ALIGNED=True, **GEOM), True))  # fmt: skip
    v.append(("dot_final", dot._dot_final_kernel, dict(BLOCK=_launch.REDUCE_BLOCK), False))
    v.append(("aesam_final", aesam_stats._aesam_final_kernel,
              dict(BLOCK=_launch.REDUCE_BLOCK), False))  # fmt: skip
    v.append(("bump_steps", _launch._bump_steps_kernel,
              dict(HAS_OK=True, BLOCK=_launch.REDUCE_BLOCK), False))  # fmt: skip
    for dt, adaptive, save in (
        (F32, False, True), (F32, True, True), (BF16, True, True), (F16, False, True),
        (F32, False, False), (BF16, True, False),
    ):  # fmt: skip
        v.append((f"perturb/{dt}/adaptive={adaptive}/save={save}", perturb._perturb_kernel,
                  dict(ADAPTIVE=adaptive, SAVE=save, DT_P=dt, DT_G=dt, DT_B=dt, ALIGNED=True,
                       **GEOM),
                  True))  # fmt: skip
    for dt, normal, save in ((F32, True, True), (F32, False, False), (BF16, True, False)):
        v.append((f"noise/{dt}/normal={normal}/save={save}", perturb._noise_kernel,
                  dict(NORMAL=normal, SAVE=save, DT_P=dt, DT_B=dt, ALIGNED=True, **GEOM),
                  True))  # fmt: skip
    for dt in (F32, BF16, F16):
        v.append((f"filter_noise_rows/{dt}", filter_noise._row_coef_kernel,
                  dict(DT_P=dt, BLOCK=_launch.GPU_BLOCK), False))  # fmt: skip
        v.append((f"filter_noise/{dt}", filter_noise._filter_noise_kernel,
                  dict(DT_P=dt, DT_B=dt, DT_D=dt, ALIGNED=True, **GEOM), True))  # fmt: skip
    for dt, k in ((F32, 2), (BF16, 3), (F32, 4)):
        v.append((f"lincomb/{dt}/K={k}", lincomb._lincomb_kernel,
                  dict(K=k, DT_O=dt, **_terms(*[dt] * k), ALIGNED=True, **GEOM), True))  # fmt: skip
    for dt, init in ((F32, False), (BF16, False), (F32, True)):
        v.append((f"frob/{dt}/init={init}", frob_accumulate._frob_kernel,
                  dict(INIT=init, DT_C=F32, DT_S=F32, DT_G=dt, ALIGNED=True, **GEOM),
                  True))  # fmt: skip
    sgd_cases = [
        # (dtype, K, coef, momentum, nesterov, wd, backup, ok, lr_ptr, maximize)
        (F32, 1, False, True, False, False, True, True, False, False),
        (F32, 1, False, False, False, True, False, False, False, True),
        (F32, 3, True, True, True, True, True, True, True, False),
        (BF16, 1, False, True, False, True, True, True, False, False),
        (F16, 2, True, True, True, False, True, True, False, False),
    ]
    for dt, k, coef, mom, nest, wd, bk, ok, lrp, mx in sgd_cases:
        r_m = 1 + k if mom else 0
        r_b = (1 + k + (1 if mom else 0)) if bk else 0
        nrow = 1 + k + (1 if mom else 0) + (1 if bk else 0) + (1 if mom else 0)
        v.append((f"sgd/{dt}/K={k}/mom={mom}/nest={nest}/wd={wd}/bk={bk}", sgd_step._sgd_kernel,
                  dict(NROW=nrow, K=k, R_M=r_m, R_B=r_b, HAS_OK=ok, LR_PTR=lrp, HAS_COEF=coef,
                       MAXIMIZE=mx, HAS_WD=wd, HAS_MOM=mom, NESTEROV=nest, DT_P=dt, DT_M=dt,
                       DT_B=dt, **_terms(*[dt] * k), ALIGNED=True, **GEOM), True))  # fmt: skip
    adam_cases = [
        # (dtype, K, coef, amsgrad, backup, ok, lr_ptr, maximize, lerp_small)
        (F32, 1, False, False, True, True, False, False, True),
        (F32, 3, True, True, True, True, True, True, True),
        (BF16, 1, False, False, True, True, False, False, False),
        (F16, 2, True, True, False, False, False, False, True),
    ]
    for dt, k, coef, ams, bk, ok, lrp, mx, small in adam_cases:
        r_m = 1 + k
        r_x = r_m + 2 if ams else 0
        r_b = (r_m + 2 + (1 if ams else 0)) if bk else 0
        nrow = r_m + 2 + (1 if ams else 0) + (1 if bk else 0) + 1
        v.append((f"adamw/{dt}/K={k}/ams={ams}/bk={bk}", adamw_step._adamw_kernel,
                  dict(NROW=nrow, K=k, R_M=r_m, R_X=r_x, R_B=r_b, HAS_OK=ok, LR_PTR=lrp,
                       HAS_COEF=coef, MAXIMIZE=mx, LERP_SMALL=small, AMSGRAD=ams, DT_P=dt,
                       DT_M=dt, DT_V=dt, DT_X=dt, DT_B=dt, **_terms(*[dt] * k), ALIGNED=True,
                       **GEOM), True))  # fmt: skip
    return v


#: kernels launched with options (the noise kernels: no FMA contraction), compiled with them
OPTIONS = {
    perturb._noise_kernel.fn.__name__: noise.LAUNCH_OPTIONS,
    filter_noise._filter_noise_kernel.fn.__name__: noise.LAUNCH_OPTIONS,
}


def signature(kernel, constexprs):
    sig = {}
    for p in kernel.params:
        name = p.name
        if p.is_constexpr:
            if name not in constexprs:
                raise KeyError(f"{kernel.__name__}: no value for constexpr {name}")
            sig[name] = "constexpr"
        else:
            sig[name] = ARG_TYPES.get(name, FLOAT)
    return sig


def compile_one(kernel, constexprs, capability: int):
    """Compile for ``cuda:capability``; returns the compiled kernel's ``asm`` dict."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = signature(kernel, constexprs)
    try:  # Triton >= 3.3: names for keys, "constexpr" entries in the signature
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    except TypeError:  # older layouts: indices for keys, constexprs left out of the signature
        names = [p.name for p in kernel.params]
        src = ASTSource(
            fn=kernel,
            signature={names.index(k): t for k, t in sig.items() if t != "constexpr"},
            constants={names.index(k): c for k, c in constexprs.items()},
        )
    options = {"num_warps": _launch.NUM_WARPS, **OPTIONS.get(kernel.fn.__name__, {})}
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    return compiled.asm


def main(argv):
    """Compile every variant for the first capability, one variant per kernel for the others
    (``--all``: every variant for every capability)."""
    every = "--all" in argv
    caps = [int(a) for a in argv if a != "--all"] or [90]
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        print(json.dumps({"skip": f"this Triton has no ASTSource/GPUTarget API: {exc}"}))
        return
    for ci, cap in enumerate(caps):
        seen = set()
        for label, kernel, constexprs, elementwise in variants():
            if ci > 0 and not every and kernel.fn.__name__ in seen:
                continue
            seen.add(kernel.fn.__name__)
            t0 = time.time()
            rec = {"label": label, "kernel": kernel.fn.__name__, "cap": cap}
            try:
                asm = compile_one(kernel, constexprs, cap)
                ptx = asm.get("ptx", "")
                rec.update(
                    ok=True,
                    ptx=len(ptx),
                    cubin=len(asm.get("cubin", b"")),
                    vector=any("ld.global.v" in line for line in ptx.splitlines()),
                    # fp32 contractions and approximate fp32 math (the noise kernels have none)
                    fma32=ptx.count("fma.rn.f32"),
                    approx32=sum(ptx.count(i) for i in ("div.full.f32", ".approx.")),
                    elementwise=elementwise,
                    aligned=bool(constexprs.get("ALIGNED", False)),
                )
            except Exception as exc:  # reported; the test fails on it
                rec.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
            rec["seconds"] = round(time.time() - t0, 3)
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
