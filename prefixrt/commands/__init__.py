"""Sub-commands of the ``prefixrt`` command line (see :mod:`prefixrt.cli`)."""
