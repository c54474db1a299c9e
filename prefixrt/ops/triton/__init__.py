"""The Triton backend: launchers (input checks, allocation, grids) for the kernels in :mod:`prefixrt.kernels`.

Importing :mod:`prefixrt.ops.triton.backend` imports ``triton`` and registers the ``"triton"`` backend.
"""
