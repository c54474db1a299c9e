"""Shared test setup: Triton runs in its CPU interpreter when there is no GPU; real data lives in ../shared/data."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: kernels then run on CPU tensors in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from support.paths import SHARED_DATA  # noqa: E402  (after TRITON_INTERPRET is set)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets and tokenizers (E2E, DART, GPT-2/BART tokenizers); never committed to the repo."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set PREFIXRT_SHARED_DATA")
    return SHARED_DATA
