"""The "cpp" backend in the registry: what "auto" picks, what it refuses and why, the fallback when the
kernels cannot be built (one warning; ``backend="cpp"`` raises and says why), and packaging that ships the sources."""

import fnmatch
import importlib.util
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from prefixrt import ops
from prefixrt.ops import AttentionCall, explain_backends, select_backend
from prefixrt.ops.cpp import backend as cpp_backend
from prefixrt.ops.cpp import build as cpp_build
from prefixrt.ops.cpp.build import simd_target, source_dir

REPO = Path(__file__).resolve().parents[2]


def call(device="cpu", dtype=torch.float32, dropout_p=0.0, requires_grad=False):
    return AttentionCall(device, dtype, 64, 1, 65, True, dropout_p, requires_grad)


@pytest.mark.usefixtures("cpp_kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_auto_picks_cpp_for_cpu_tensors(dtype, requires_grad, monkeypatch):
    monkeypatch.delenv("PREFIXRT_BACKEND", raising=False)
    assert select_backend("auto", call(dtype=dtype, requires_grad=requires_grad)).name == "cpp"
    assert explain_backends(call(dtype=dtype))["cpp"] == "ok"


@pytest.mark.usefixtures("cpp_kernels")
def test_refusals_say_why(monkeypatch):
    monkeypatch.delenv("PREFIXRT_BACKEND", raising=False)
    assert select_backend("auto", call(dtype=torch.float64)).name == "reference"
    assert "float64" in explain_backends(call(dtype=torch.float64))["cpp"]
    assert "CPU" in explain_backends(call(device="cuda"))["cpp"]


@pytest.mark.usefixtures("cpp_kernels")
@pytest.mark.parametrize("requires_grad", [False, True])
def test_auto_picks_cpp_for_dropout_too(requires_grad, monkeypatch):
    """Training (HF passes attn_pdrop) runs in the kernels, not in the reference."""
    monkeypatch.delenv("PREFIXRT_BACKEND", raising=False)
    assert select_backend("auto", call(dropout_p=0.1, requires_grad=requires_grad)).name == "cpp"
    assert explain_backends(call(dropout_p=0.1))["cpp"] == "ok"


def test_sources_found_and_simd_target():
    assert source_dir() is not None and (source_dir() / "prefix_attention_fwd.cpp").is_file()
    assert simd_target() in ("avx2", "default")


@pytest.mark.parametrize("how", ["disabled", "no-compiler"])
def test_fallback_without_kernels(how, tmp_path, monkeypatch):
    """A machine that cannot build: "auto" runs the reference after one warning; "cpp" raises with the reason.

    Simulated in this process on a fresh build state (restored afterwards): ``PREFIXRT_NO_CPP=1``, or ``CXX``
    naming no compiler with an empty extensions cache.
    """
    monkeypatch.setattr(cpp_build, "_state", {})
    monkeypatch.setattr(cpp_backend, "_warned", False)
    monkeypatch.delenv("PREFIXRT_BACKEND", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    if how == "disabled":
        monkeypatch.setenv("PREFIXRT_NO_CPP", "1")
        expected = "PREFIXRT_NO_CPP"
    else:
        monkeypatch.delenv("PREFIXRT_NO_CPP", raising=False)
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        expected = "no C++ compiler"
    q = k = v = torch.randn(2, 1, 3, 8)
    bank = torch.randn(1, 4, 8)
    args = (
        q,
        k,
        v,
        ops.BankLayer(bank, bank, torch.tensor([0, 4])),
        ops.StepPlan.build(torch.tensor([0, -1]), [4]),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [ops.prefix_attention(*args, causal=True)[0] for _ in range(3)]
    ours = [str(w.message) for w in caught if "C++" in str(w.message)]
    assert len(ours) == 1, ours
    assert expected in ours[0] and "falls back to the reference" in ours[0]
    ref = ops.prefix_attention(*args, causal=True, backend="reference")[0]
    assert all(torch.equal(out, ref) for out in outs)
    with pytest.raises(ops.BackendUnavailable, match=re.escape(expected)):
        ops.prefix_attention(*args, causal=True, backend="cpp")
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").iterdir())


def test_packaging_ships_the_sources(tmp_path, monkeypatch):
    """A non-editable install carries csrc/ as the package prefixrt._csrc: setup.py declares it with every
    source as package data, and a wheel built from the checkout holds them."""
    setuptools = pytest.importorskip("setuptools")
    from distutils.core import run_setup  # setuptools' copy of distutils (imported above)

    sources = sorted(p.name for p in (REPO / "csrc").iterdir() if p.suffix in (".h", ".cpp"))
    monkeypatch.chdir(REPO)
    dist = run_setup("setup.py", stop_after="init")
    assert "prefixrt._csrc" in dist.packages and dist.package_dir["prefixrt._csrc"] == "csrc"
    patterns = dist.package_data["prefixrt._csrc"]
    assert all(any(fnmatch.fnmatch(name, pattern) for pattern in patterns) for name in sources)

    has_bdist_wheel = importlib.util.find_spec("wheel") or int(setuptools.__version__.split(".")[0]) >= 71
    if not has_bdist_wheel:
        pytest.skip("no 'wheel' package to build a wheel without network access")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("prefixrt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in sources:
        assert f"prefixrt/_csrc/{source}" in names, source
