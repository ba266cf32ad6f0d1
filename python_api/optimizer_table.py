"""The one table of the optimizer set, in the spirit of torch's ``OptimizerInfo``.

Every place that lists the algorithms reads this table: the generic tests
(``tests/optim/test_optim_common.py`` and the AMP, compile, DDP, clipping and integrity tests
built on it), the demo's ``--optimizers`` registry, the benchmarks' step and training sections,
and the README's algorithm table (checked against it by ``tests/integration/test_docs.py``). A
new algorithm is one file in ``python_api`` and one row here.

Classes are named by module and attribute and imported only when a row is used, so that reading
the table never imports every algorithm.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

#: closure contracts: "optional" (gradients already present are g0: davda54/sam's loop works),
#: "required" (the step runs every evaluation itself), "forward-only" (the closure returns
#: per-example losses and the optimizer runs the backward passes: ESAM)
CLOSURES = ("optional", "required", "forward-only")


@dataclass(frozen=True)
class OptimizerInfo:
    """One row: an algorithm (a class, with the constructor arguments that make it that algorithm).

    Attributes:
        id: the identifier of generic tests and of ``SPECS`` (``"CRSAM"``, ``"CRSAM-log"``).
        label: the name in tables and plots (``"CR-SAM"``).
        key: the demo's command-line name (``sam-demo --optimizers crsam``).
        module, cls: where the class lives (``python_api.crsam``, ``CRSAM``).
        paper: authors, venue and year.
        reference: the reference code the class follows (``None``: the paper's equations only).
        defaults: the README's defaults cell (the constructor's own defaults, as text).
        kwargs: arguments that make this row's algorithm from the class (ASAM:
            ``adaptive=True``); included in every ``*_kwargs`` below.
        test_kwargs: hyper-parameters for the small models of the generic tests.
        demo_kwargs: the demo's hyper-parameters (rho first).
        bench_kwargs: the benchmarks' hyper-parameters; ``None``: not in the step and training
            sections (they time a representative subset).
        closure: the closure contract, one of :data:`CLOSURES`.
        switching: decides per step between a SAM step and a one-pass step (one host read).
        host_reads: host reads (device synchronisations) per step over fused SGD/AdamW.
        passes: forward+backward passes of one SAM step (the README's text in ``passes_text``).
        seeded: the constructor takes ``seed`` (the class's own counter-based stream).
        global_noise: draws noise from the global generator on the eager backend (the reference
            code's stream), so seeding torch before a step replays it.
        total_steps: the constructor takes ``total_steps`` (AE-SAM's schedules).
        state_bytes: bytes per fp32 parameter of the class's own state kept between steps.
        step_peak_bytes: the most the class holds inside a step, bytes per parameter (what
            ``tests/optim/test_state_memory.py`` measures; ``None``: not measured there).
        floor_sam: elements read + written per parameter element by a SAM step over SGD
            (gradients, weights, momentum, backups): the byte floor of the benchmarks.
        floor_cheap: the same for the one-pass step of a switching class.
        nominal_fraction: SAM steps among all steps when it is not measured.
        n_samples: noise samples per step in the benchmarks (the universal class).
        listed: a row of the README, demo and benchmarks; ``False`` for test-only variants.
        standalone: ``None`` for a class that wraps a base optimizer; else the base optimizer
            the class replaces (``"sgd"``, ``"adamw"``): built without ``base_optimizer``, from
            that base's ``lr``/``momentum``/``weight_decay``, and tested in its own file (the
            generic tests wrap bases).
    """

    id: str
    label: str
    key: str
    module: str
    cls: str
    paper: str
    reference: str | None
    defaults: str
    passes: float
    passes_text: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    test_kwargs: dict[str, Any] = field(default_factory=dict)
    demo_kwargs: dict[str, Any] = field(default_factory=dict)
    bench_kwargs: dict[str, Any] | None = None
    closure: str = "optional"
    switching: bool = False
    host_reads: int = 0
    seeded: bool = False
    global_noise: bool = False
    total_steps: bool = False
    state_bytes: int = 4
    step_peak_bytes: int | None = None
    floor_sam: float = 0.0
    floor_cheap: float | None = None
    nominal_fraction: float = 1.0
    n_samples: int | None = None
    listed: bool = True
    standalone: str | None = None

    def __post_init__(self) -> None:
        if self.closure not in CLOSURES:
            raise ValueError(f"{self.id}: closure must be one of {CLOSURES}, got {self.closure!r}")
        if self.switching != (self.floor_cheap is not None) and self.bench_kwargs is not None:
            raise ValueError(f"{self.id}: a benchmarked switching class needs floor_cheap")

    def load(self) -> type:
        """The optimizer class (imported on first use)."""
        return getattr(importlib.import_module(self.module), self.cls)

    @property
    def readme_name(self) -> str:
        """How the README's first column names the row (``SAM(adaptive=True)`` for ASAM)."""
        if not self.kwargs:
            return self.cls
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.cls}({args})"

    def make(self, params: Any, base_optimizer: Any = None, **kwargs: Any) -> Any:
        """An instance with this row's defining arguments (``kwargs`` are passed on)."""
        if self.standalone is not None:
            return self.load()(params, **{**self.kwargs, **kwargs})
        return self.load()(params, base_optimizer, **{**self.kwargs, **kwargs})


def _row(**kw: Any) -> OptimizerInfo:
    fixed = kw.get("kwargs", {})
    for name in ("test_kwargs", "demo_kwargs"):
        kw[name] = {**kw.get(name, {}), **fixed}
    if kw.get("bench_kwargs") is not None:
        kw["bench_kwargs"] = {**kw["bench_kwargs"], **fixed}
    return OptimizerInfo(**kw)


OPTIMIZERS: tuple[OptimizerInfo, ...] = (
    _row(
        id="SAM", label="SAM", key="sam", module="python_api.sam", cls="SAM",
        paper="Foret et al., ICLR 2021", reference="davda54/sam", defaults="rho=0.05",
        passes=2, passes_text="2",
        test_kwargs={"rho": 0.05}, demo_kwargs={"rho": 0.1}, bench_kwargs={"rho": 0.05},
        step_peak_bytes=4, floor_sam=11,
    ),
    _row(
        id="ASAM", label="ASAM", key="asam", module="python_api.sam", cls="SAM",
        paper="Kwon et al., ICML 2021", reference="davda54/sam",
        defaults="rho=0.05 (authors use 2.0), eta=0", passes=2, passes_text="2",
        kwargs={"adaptive": True},
        test_kwargs={"rho": 0.5}, demo_kwargs={"rho": 1.0}, bench_kwargs={"rho": 0.5},
        floor_sam=12,
    ),
    _row(
        id="CRSAM", label="CR-SAM", key="crsam", module="python_api.crsam", cls="CRSAM",
        paper="Wu, Luo, Wunsch, AAAI 2024", reference="TrustAIoT/CR-SAM",
        defaults="rho=0.1, alpha=0.1, beta=0.01, log_form=False", passes=3, passes_text="3",
        demo_kwargs={"rho": 0.1, "alpha": 0.1, "beta": 0.01}, bench_kwargs={"rho": 0.05},
        step_peak_bytes=8, floor_sam=17,
    ),
    _row(
        id="CRSAM-log", label="CR-SAM (log form)", key="crsamlog", module="python_api.crsam",
        cls="CRSAM", paper="Wu, Luo, Wunsch, AAAI 2024", reference="TrustAIoT/CR-SAM",
        defaults="log_form=True", passes=3, passes_text="3", kwargs={"log_form": True},
        step_peak_bytes=8, listed=False,
    ),
    _row(
        id="AESAM", label="AE-SAM", key="aesam", module="python_api.aesam", cls="AESAM",
        paper="Jiang, Yang, Zhang, Kwok, ICLR 2023", reference=None,
        defaults="rho=0.05, delta=0.9, lambda1=-1, lambda2=1, total_steps=None (None: constant "
        "c = 0; give it for the paper's schedule)",
        passes=2, passes_text="1 or 2 (~50% SAM)",
        demo_kwargs={"rho": 0.1, "delta": 0.9, "lambda1": -1.0, "lambda2": 1.0},
        bench_kwargs={"rho": 0.05}, switching=True, host_reads=1, total_steps=True,
        floor_sam=11, floor_cheap=6, nominal_fraction=0.5,
    ),
    _row(
        id="AELookSAM", label="AE-LookSAM", key="aelooksam", module="python_api.aesam",
        cls="AELookSAM", paper="Jiang et al., ICLR 2023", reference=None,
        defaults="rho=0.1, alpha=0.7, delta=0.9", passes=2, passes_text="1 or 2",
        demo_kwargs={"rho": 0.1, "alpha": 0.7, "delta": 0.9, "lambda1": -1.0, "lambda2": 1.0},
        switching=True, host_reads=1, total_steps=True,
    ),
    _row(
        id="LookSAM", label="LookSAM", key="looksam", module="python_api.looksam",
        cls="LookSAM", paper="Liu et al., CVPR 2022", reference=None,
        defaults="rho=0.1, k=5, alpha=0.7", passes=2, passes_text="2 every k-th step, else 1",
        test_kwargs={"k": 2}, demo_kwargs={"rho": 0.1, "k": 5, "alpha": 0.7},
        bench_kwargs={"rho": 0.05, "k": 5}, switching=True, host_reads=1,
        floor_sam=14, floor_cheap=7, nominal_fraction=0.2,
    ),
    _row(
        id="SSSAM", label="SS-SAM", key="sssam", module="python_api.sssam", cls="SSSAM",
        paper="Zhao et al., 2022", reference=None, defaults="rho=0.05, p=0.5",
        passes=2, passes_text="1 or 2",
        test_kwargs={"seed": 0}, demo_kwargs={"rho": 0.1, "p": 0.5},
        switching=True, host_reads=1, seeded=True,
    ),
    _row(
        id="ESAM", label="ESAM", key="esam", module="python_api.esam", cls="ESAM",
        paper="Du et al., ICLR 2022", reference=None,
        defaults="rho=0.05, beta=0.6, gamma=0.5, seed=None", passes=2,
        passes_text="2 forwards; the second backward over a gamma-subset of the examples",
        test_kwargs={"seed": 0}, demo_kwargs={"rho": 0.1, "beta": 0.6, "gamma": 0.5},
        closure="forward-only", seeded=True,
    ),
    _row(
        id="FrobSAM", label="Frob-SAM", key="frobsam", module="python_api.universal",
        cls="FrobSAM", paper="Tahmasebi et al., 2024", reference="dbahri/universal_sam",
        defaults="rho=0.005, n_samples=2, lam=0.005", passes=3, passes_text="1 + n",
        test_kwargs={"rho": 0.05, "lam": 0.01},
        demo_kwargs={"rho": 0.005, "n_samples": 2, "lam": 0.005},
        bench_kwargs={"rho": 0.05}, n_samples=2, global_noise=True,
        step_peak_bytes=12, floor_sam=23,
    ),
    _row(
        id="TraceSAM", label="Trace-SAM", key="tracesam", module="python_api.universal",
        cls="TraceSAM", paper="Tahmasebi et al., 2024", reference="dbahri/universal_sam",
        defaults="rho=0.01, n_samples=1, lam=1", passes=2, passes_text="1 + n",
        test_kwargs={"rho": 0.05, "lam": 0.1},
        demo_kwargs={"rho": 0.01, "n_samples": 1, "lam": 1.0}, global_noise=True,
        step_peak_bytes=8,
    ),
    _row(
        id="DetSAM", label="Det-SAM", key="detsam", module="python_api.universal", cls="DetSAM",
        paper="Tahmasebi et al., 2024", reference="dbahri/universal_sam",
        defaults="rho=1, n_samples=1, lam=1, half_cube_len=0.01", passes=2, passes_text="1 + n",
        test_kwargs={"half_cube_len": 1e-3},
        demo_kwargs={"rho": 1.0, "n_samples": 1, "lam": 1.0, "half_cube_len": 0.01},
        global_noise=True, step_peak_bytes=8,
    ),
    _row(
        id="GSAM", label="GSAM", key="gsam", module="python_api.gsam", cls="GSAM",
        paper="Zhuang et al., ICLR 2022", reference="juntang-zhuang/GSAM",
        defaults="rho=0.05, alpha=0.4, rho_min=None (rho proportional to the LR when set)",
        passes=2, passes_text="2",
        test_kwargs={"rho_min": 0.01, "lr_max": 0.1}, demo_kwargs={"rho": 0.1, "alpha": 0.4},
        # SAM's 11 + the inner product <g0, g1> (2 reads) + g0 as a second base-step term
        bench_kwargs={"rho": 0.05, "alpha": 0.4}, floor_sam=14,
    ),
    _row(
        id="RSAM", label="R-SAM", key="rsam", module="python_api.rsam", cls="RSAM",
        paper="Liu et al., NeurIPS 2022", reference="RSAM-Optimizer/R-SAM",
        defaults="rho=0.05, sigma=5e-4 (filter-wise noise scale)", passes=2,
        passes_text="2 (w + delta, w + e; none at w)",
        test_kwargs={"sigma": 0.01, "seed": 0}, demo_kwargs={"rho": 0.1, "sigma": 5e-4},
        bench_kwargs={"rho": 0.05, "sigma": 5e-4}, closure="required", seeded=True,
        global_noise=True,
        # the backup kept between steps; delta (step-local) until the ascent. Noise: zero the
        # backups (1), draw (2), save w (2), scale (2), w + delta (3); u = 2 g + delta (3),
        # ||u|| (1), e from the backup (3), ||g1|| (1), SGD step from the backup (5)
        state_bytes=4, step_peak_bytes=8, floor_sam=23,
    ),
    _row(
        id="FriendlySAM", label="FriendlySAM", key="friendlysam", module="python_api.friendly_sam",
        cls="FriendlySAM", paper="Li et al., CVPR 2024", reference="nblt/F-SAM",
        defaults="rho=0.05, sigma=1.0, lmbda=0.9", passes=2, passes_text="2",
        test_kwargs={"rho": 0.05}, demo_kwargs={"rho": 0.1, "sigma": 1.0, "lmbda": 0.9},
        # d = g0 - sigma m (3), its norm (1), the ascent (4), ||g1|| (1), base step with
        # restore (5), g0 zeroed bit for bit on a skip (2), the EMA m = lmbda m + (1-lmbda) g0 (3)
        bench_kwargs={"rho": 0.05}, state_bytes=8, step_peak_bytes=12, floor_sam=19,
    ),
    _row(
        id="MSAM", label="MSAM", key="msam", module="python_api.msam", cls="MSAM",
        paper="Becker, Altrock, Ferrari, 2024", reference="MarlonBecker/MSAM",
        defaults="lr=0.1, momentum=0.9, weight_decay=1e-2, rho=0.3 (replaces SGD)",
        passes=1, passes_text="1", demo_kwargs={"rho": 0.3}, standalone="sgd", state_bytes=0,
    ),
    _row(
        id="AdamWMSAM", label="AdamW-MSAM", key="adamwmsam", module="python_api.msam",
        cls="AdamWMSAM", paper="Becker, Altrock, Ferrari, 2024", reference="MarlonBecker/MSAM",
        defaults="lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, rho=1.0 "
        "(replaces AdamW)",
        passes=1, passes_text="1", demo_kwargs={"rho": 1.0}, standalone="adamw", state_bytes=0,
    ),
)  # fmt: skip

#: rows by id
BY_ID: dict[str, OptimizerInfo] = {o.id: o for o in OPTIMIZERS}


def listed() -> list[OptimizerInfo]:
    """The rows of the README, the demo and the benchmarks (test-only variants left out)."""
    return [o for o in OPTIMIZERS if o.listed]


def classes(ids: list[str] | None = None) -> list[type]:
    """The distinct classes of the table (of ``ids`` when given), in table order."""
    out: list[type] = []
    for o in OPTIMIZERS:
        if ids is not None and o.id not in ids:
            continue
        c = o.load()
        if c not in out:
            out.append(c)
    return out


__all__ = ["CLOSURES", "OPTIMIZERS", "BY_ID", "OptimizerInfo", "classes", "listed"]
