"""pytest-benchmark suite: ``python -m pytest benchmarks --benchmark-only`` (add ``--benchmark-json=...`` to save).

Every benchmark records the device it ran on; baselines run in the same session as the path they compare to.
"""

import platform

import pytest
import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in open("/proc/cpuinfo", encoding="utf-8") if platform.system() == "Linux" else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return platform.processor() or "cpu"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def record_device(benchmark, device):
    benchmark.extra_info["device"] = device_name(device)
    benchmark.extra_info["torch"] = torch.__version__
    return benchmark
