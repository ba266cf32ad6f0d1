"""Triton backend: multi-tensor fused kernels for every op of :mod:`sam_kernels.ops`.

Importing this package registers a ``"triton"`` implementation of each op under the same
signature as its eager reference (``sam_kernels._backend.register``). It runs on CUDA tensors,
and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, the test-suite).

Design (details in :mod:`sam_kernels.triton._launch`):

- One launch per op per (device, dtype) group, whatever the number of tensors: a cached int64
  chunk table on the device holds every tensor's data pointers, sizes and a program -> tensor
  map; each program works on one ``CHUNK`` (GPU: 4096 elements in 1024-element blocks, 4 warps;
  interpreter: one block sized to the largest tensor). Full blocks are unmasked and, when every
  pointer is 16-byte aligned, vectorised; the tail block is masked. No autotuning (the table
  layout depends on the chunk, and a fixed shape keeps the norm's summation order fixed).
- Tables are rebuilt only when a pointer or size changes, from the host in one pinned,
  non-blocking copy. No op reads a device value on the host (no ``.item()``, ``bool()``,
  ``nonzero``): scales, coefficients, losses, learning rates given as tensors, the finite flag
  ``ok``, step counters and the noise ``(seed, offset)`` are all loaded inside the kernels.
- fp32, bf16 and fp16: loaded and converted to fp32 at once, math in fp32 (the norms square
  and sum in fp64: finite and accurate for every finite input), stored in each
  tensor's dtype (round to nearest even; the interpreter, which truncates bf16 stores, rounds
  explicitly). Backups are copied in the parameters' dtype, bit for bit. Other dtypes (fp64)
  run on the eager reference.
- Tensors dense in memory with the same strides at a given index (contiguous, channels-last)
  are used in place; any other layout runs on contiguous copies copied back afterwards.
- Launches: ``restore``, ``perturb``, ``noise_perturb``, ``lincomb``, ``frob_accumulate``: one.
  ``filter_noise_perturb`` (R-SAM's filter-wise noise): a row-norm launch (one program per
  output unit), then the elementwise one.
  ``grad_norm``, ``dot`` and ``aesam_stats``: per-program fp64 partial sums, then one program
  that sums them in a fixed order (deterministic, no atomics). ``looksam_project`` /
  ``looksam_reuse_coefs``: per-chunk fp64 partials, one program per tensor that sums its
  chunks' partials in order into its coefficient, then (projection) the elementwise pass gated
  by ``ok``. ``sgd_step`` / ``adamw_step``: the fused step, then a one-program launch that
  adds ``ok`` to the step counters (every program of a tensor reads its counter, so the step
  kernel cannot write it without a race).

Bytes moved per parameter element, fp32 (4 B per element read or written; bf16/fp16 halve
every term, except the fp64 temporaries of dot's eager reference: 60 B there; step counters,
flags and tables are O(tensors), not counted). "Eager" is this package's ``torch._foreach_*``
reference (:mod:`sam_kernels.ops`) as written:

=========================================================  ========  ======
op (configuration)                                          eager     Triton
=========================================================  ========  ======
grad_norm (SAM)                                             4         4
grad_norm (ASAM, weights ``|p| + eta``; eta = 0 / != 0)     24 / 32   8
perturb (SAM)                                               36        16
perturb (ASAM; eta = 0 / != 0)                              56 / 64   16
noise_perturb, Gaussian (save backup / from backup)         40 / 32   12 / 8
noise_perturb, uniform (save backup / from backup)          56 / 48   12 / 8
restore                                                     8         8
lincomb (K = 2 / K = 3 terms)                               36 / 56   12 / 16
frob_accumulate (``cross += L g; gsum += g``)               32        20
aesam_stats                                                 4         4
dot (``<a, b>``, fp64 products)                             64        8
looksam_project (ok given / none)                           80 / 60   20
looksam_reuse_coefs                                         8         8
sgd_step (momentum, from backup, ok flag)                   88        20
sgd_step (+ weight decay; + nesterov: each)                 +12       +0
sgd_step with a K = 3 LinComb gradient                      144       28
adamw_step (from backup, ok flag)                           164       28
adamw_step (+ amsgrad)                                      188       36
adamw_step with a K = 3 LinComb gradient                    220       36
=========================================================  ========  ======

Per SAM step (fp32; norm of g0, perturb, finite check of g1, fused restore + step):
SAM over SGD-momentum: eager 4 + 36 + 4 + 88 = 132 B/param, Triton 4 + 16 + 4 + 20 = 44 B/param
(the 40 B floor plus 4 B for the finite check of g1). SAM over AdamW: eager 208, Triton 52.
"""

from sam_kernels.triton import (  # noqa: F401  (importing registers the ops)
    adamw_step,
    aesam_stats,
    dot,
    filter_noise,
    frob_accumulate,
    grad_norm,
    lincomb,
    looksam,
    perturb,
    restore,
    sgd_step,
)
