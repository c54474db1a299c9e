"""Packaging glue that pyproject.toml cannot express.

* The top-level folder ``kernels/`` ships as ``prefixrt.kernels``: PyPI already has a package named
  ``kernels`` (Hugging Face's) that transformers probes for, so we must never install a top-level ``kernels``.
* ``csrc/`` (the C++ CPU kernels) ships as ``prefixrt._csrc``: its sources are package data, compiled on first
  use by ``torch.utils.cpp_extension.load`` and cached, so installing needs no compiler and a wheel (a
  non-editable install) still carries them; see ``prefixrt/ops/cpp_build.py``.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["prefixrt", "prefixrt.*"]) + ["prefixrt.kernels", "prefixrt._csrc"]
packages += [f"prefixrt.kernels.{p}" for p in find_packages(where="kernels")]

setup(
    packages=packages,
    package_dir={"prefixrt": "prefixrt", "prefixrt.kernels": "kernels", "prefixrt._csrc": "csrc"},
    package_data={"prefixrt._csrc": ["*.h", "*.cpp", ".clang-format"]},
    include_package_data=True,
)
