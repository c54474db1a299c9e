"""Engine tests: tiny models run faster on one thread (and do not fight other jobs on a loaded 2-core box)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
