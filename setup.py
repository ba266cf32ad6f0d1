"""Build script: the Python packages, plus the optional compiled extension (csrc/).

The extension is optional: when no compiler or CUDA toolchain is usable, the install still
succeeds and the package runs on its Triton / eager backends.
"""

from setuptools import setup

setup()
