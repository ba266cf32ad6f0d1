"""Benchmarks of sam_kernels: fused ops, optimizer steps and training steps (issue 5).

``python -m benchmarks.run`` runs everything on a GPU; ``python -m benchmarks.run --smoke`` runs
tiny sizes on the CPU. See ``benchmarks/README.md``.
"""
