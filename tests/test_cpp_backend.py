"""The "cpp" backend in the registry: what "auto" picks, what it refuses and why, the fallback when the
kernels cannot be built (one warning; ``backend="cpp"`` raises and says why), and a wheel that ships the sources."""

import fnmatch
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from test_cpp_cases import cpp_kernels  # noqa: F401  (fixture)

from prefixrt.ops import AttentionCall, explain_backends, select_backend
from prefixrt.ops.cpp_build import simd_target, source_dir

REPO = Path(__file__).resolve().parent.parent


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
    assert select_backend("auto", call(dropout_p=0.1)).name == "reference"
    assert "float64" in explain_backends(call(dtype=torch.float64))["cpp"]
    assert "dropout" in explain_backends(call(dropout_p=0.1))["cpp"]
    assert "CPU" in explain_backends(call(device="cuda"))["cpp"]


def test_sources_found_and_simd_target():
    assert source_dir() is not None and (source_dir() / "prefix_attention_fwd.cpp").is_file()
    assert simd_target() in ("avx2", "default")


FALLBACK_SCRIPT = """
import warnings, torch
from prefixrt.ops import BackendUnavailable, prefix_attention
q = k = v = torch.randn(2, 1, 3, 8)
bank = torch.randn(1, 4, 8)
args = (q, k, v, bank, bank, torch.tensor([0, -1]), torch.tensor([0, 4]))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out1, _ = prefix_attention(*args, causal=True)
    out2, _ = prefix_attention(*args, causal=True)
ours = [w for w in caught if "C++" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
print("WARNING:", ours[0].message)
ref, _ = prefix_attention(*args, causal=True, backend="reference")
assert torch.equal(out1, ref) and torch.equal(out2, ref)
try:
    prefix_attention(*args, causal=True, backend="cpp")
except BackendUnavailable as err:
    print("ERROR:", err)
else:
    raise SystemExit("backend='cpp' did not raise")
"""


@pytest.mark.parametrize("how", ["disabled", "no-compiler"])
def test_fallback_without_kernels(how, tmp_path):
    """A machine that cannot build: "auto" runs the reference after one warning; "cpp" raises with the reason."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), PYTHONPATH=str(REPO))
    env.pop("PREFIXRT_BACKEND", None)
    if how == "disabled":
        env["PREFIXRT_NO_CPP"] = "1"
        expected = "PREFIXRT_NO_CPP"
    else:
        env.pop("PREFIXRT_NO_CPP", None)
        env["CXX"] = str(tmp_path / "no-such-compiler")
        expected = "no C++ compiler"
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    warning = next(line for line in result.stdout.splitlines() if line.startswith("WARNING:"))
    error = next(line for line in result.stdout.splitlines() if line.startswith("ERROR:"))
    assert expected in warning and "reference" in warning
    assert expected in error and "cpp" in error


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
