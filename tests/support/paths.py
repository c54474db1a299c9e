"""Where the repository and the shared real data are (``PREFIXRT_SHARED_DATA`` overrides the data folder)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("PREFIXRT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
