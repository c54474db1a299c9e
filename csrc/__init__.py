"""C++ sources of prefixrt's CPU kernels, shipped as package data of ``prefixrt._csrc``.

Nothing here runs: ``prefixrt.ops.cpp.build`` compiles these files with ``torch.utils.cpp_extension.load``
on first use. The folder is a package only so that a non-editable install carries the sources.
"""
