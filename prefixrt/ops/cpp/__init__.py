"""The C++ CPU backend: the kernels in ``csrc/``, compiled on first use.

Importing :mod:`prefixrt.ops.cpp.backend` registers the ``"cpp"`` backend (it needs no compiler to import).
"""
