"""Each fused op declared once: one ``torch.library`` schema per op, its fake next to it.

Every op module of :mod:`sam_kernels.ops` that has fused implementations calls :func:`declare`
with the op's schema (``torch.ops.sam_kernels.<name>``), how its Python arguments map onto the
schema's and back, the function that validates a call and picks its implementation (the
backend chooser, :mod:`sam_kernels._backend`: the ``backend`` argument, else
``SAM_KERNELS_BACKEND``, else by device), and a fake for tracing with fake tensors. The eager,
Triton and compiled-extension implementations are registered under the op's name
(:func:`sam_kernels._backend.register`) with one argument list, the same for all three.

The declared op's kernel (``CompositeExplicitAutograd``: every device) validates the call,
picks the implementation and runs it, so ``torch.ops.sam_kernels.perturb_(..., backend="triton")``
is the same call as ``sam_kernels.perturb_(..., backend="triton")``. The ops are not
differentiable (an optimizer step runs under ``no_grad``): their ``Autograd`` key falls through.

Where the Python entry point goes through the dispatcher. Boxing three lists of 161 tensors into
the dispatcher's values and back costs about 57 us per call on this project's CPU machine (a
direct Python call: 0.1 us), several times a whole optimizer step's host budget. So in eager
mode the entry point (:func:`run`) validates, picks and calls the implementation itself, exactly
what the kernel does; while torch.compile traces it calls the declared op instead (one opaque
node per fused op in the graph, shapes from the fake), unless the eager reference was chosen:
that one is plain torch code, traced and fused by the compiler as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sam_kernels import _backend

NAMESPACE = "sam_kernels"
LIB = torch.library.Library(NAMESPACE, "DEF")


@dataclass(frozen=True)
class Declared:
    """One declared op: its chooser name, its overload and its argument mappings."""

    op: str
    overload: Any  # torch._ops.OpOverload
    choose: Callable[..., Callable]  # (backend, *args) -> the implementation, after validation
    to_schema: Callable[..., tuple]  # the implementations' arguments -> the schema's
    from_schema: Callable[..., tuple]  # and back

    @property
    def name(self) -> str:
        return self.overload._schema.name.split("::")[1]


#: chooser name -> declaration
DECLARED: dict[str, Declared] = {}


def _no_output(*args: object, **kwargs: object) -> None:
    return None


def _same(*args: object) -> tuple:
    return args


def declare(
    op: str,
    schema: str,
    choose: Callable[..., Callable],
    *,
    fake: Callable[..., object] | None = None,
    to_schema: Callable[..., tuple] = _same,
    from_schema: Callable[..., tuple] = _same,
) -> Declared:
    """Define ``torch.ops.sam_kernels.<name>`` from ``schema`` (its last argument
    ``str? backend=None``) and register its kernel, its fake and an ``Autograd`` fallthrough.

    ``choose(backend, *args)`` validates the implementations' arguments and returns the
    implementation to run; ``to_schema(*args)`` / ``from_schema(*schema_args)`` convert between
    the implementations' arguments and the schema's (without ``backend``). ``fake`` gets the
    schema's arguments; the default returns nothing (ops that only write their lists).
    """
    name = schema[: schema.index("(")]
    LIB.define(schema)

    n_args = schema[: schema.rindex(")")].count(",")  # the arguments before ``backend``

    def kernel(*schema_args: object, **kwargs: object) -> object:
        # the dispatcher leaves out a trailing argument that holds its default (backend=None)
        rest = schema_args[:n_args]
        backend = schema_args[n_args] if len(schema_args) > n_args else kwargs.get("backend")
        args = from_schema(*rest)
        return choose(backend, *args)(*args)

    LIB.impl(name, kernel, "CompositeExplicitAutograd")
    LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake or _no_output, lib=LIB)
    overload = getattr(getattr(torch.ops, NAMESPACE), name).default
    decl = Declared(op, overload, choose, to_schema, from_schema)
    DECLARED[op] = decl
    return decl


def run(decl: Declared, backend: str | None, *args: object) -> object:
    """The Python entry point's call: validate and pick (``decl.choose``), then run the
    implementation, or, while torch.compile traces and a fused implementation was picked, the
    declared op (see the module docstring)."""
    impl = decl.choose(backend, *args)
    if torch.compiler.is_compiling() and impl is not _backend.eager_impl(decl.op):
        return decl.overload(*decl.to_schema(*args), backend)
    return impl(*args)


# ----------------------------------------------------------------------------- hyper-parameters
def schema_fields(cls: type) -> str:
    """The schema arguments of a hyper-parameter dataclass, in field order: ``float`` and
    ``bool`` fields as themselves; a field that may be a 0-d tensor (``lr``) as two arguments,
    ``Tensor? <name>_tensor, float <name>``."""
    out = []
    for f in dataclasses.fields(cls):
        kind = f.metadata.get("schema", "float")
        if kind == "float|Tensor":
            out += [f"Tensor? {f.name}_tensor", f"float {f.name}"]
        else:
            out.append(f"{kind} {f.name}")
    return ", ".join(out)


def hyper_to_schema(h: object) -> tuple:
    """The schema arguments of the hyper-parameters ``h`` (see :func:`schema_fields`)."""
    out: list[object] = []
    for f in dataclasses.fields(h):  # type: ignore[arg-type]
        v = getattr(h, f.name)
        if f.metadata.get("schema") == "float|Tensor":
            out += [v, 0.0] if isinstance(v, torch.Tensor) else [None, float(v)]
        else:
            out.append(v)
    return tuple(out)


def hyper_from_schema(cls: type, values: tuple) -> tuple[object, int]:
    """``(cls(...), number of schema values read)`` from the front of ``values``."""
    kw: dict[str, object] = {}
    i = 0
    for f in dataclasses.fields(cls):
        if f.metadata.get("schema") == "float|Tensor":
            t, x = values[i], values[i + 1]
            kw[f.name] = t if t is not None else x
            i += 2
        else:
            kw[f.name] = values[i]
            i += 1
    return cls(**kw), i


def float_or_tensor() -> Any:
    """A dataclass field holding a float or a 0-d tensor (two schema arguments)."""
    return dataclasses.field(metadata={"schema": "float|Tensor"})


def typed(kind: str, default: object) -> Any:
    """A dataclass field of schema type ``kind`` (``float``, ``bool``) with a default."""
    return dataclasses.field(default=default, metadata={"schema": kind})
