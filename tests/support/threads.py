"""``one_thread``: a fixture that runs a test on one intra-op thread (import it into a test module and name it in
``pytestmark = pytest.mark.usefixtures("one_thread")``)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: under ``pytest -n 2`` two workers with two OpenMP threads each
    oversubscribe two cores, and a descheduled thread stalls its team for a whole time slice (a 10 ms oracle
    call then takes 0.5 s; a training step several times its time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
