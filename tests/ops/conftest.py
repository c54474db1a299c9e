"""Fixtures of the op tests: ``cpp_kernels`` (the compiled C++ kernels, built once; skips without a compiler) and
``one_thread`` (one intra-op thread), named in a module's ``pytestmark``."""

from support.cpp_cases import cpp_kernels  # noqa: F401  (fixture)
from support.threads import one_thread  # noqa: F401  (fixture)
