import sys

from prefixrt.cli import main

sys.exit(main())
