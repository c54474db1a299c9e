"""Compile and load the C++ CPU kernels (``csrc/``) on first use, cached per machine.

The sources are found in the installed package ``prefixrt._csrc`` (a wheel ships them as package data; an
editable install maps it to the repository's ``csrc/``) or, failing that, next to the ``prefixrt`` folder
of a checkout. ``torch.utils.cpp_extension.load`` (pybind11 + ninja) compiles them into
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) under a name that carries the SIMD target
and a hash of the sources, flags, torch and Python versions: a cache shared between machines or checkouts
never loads a build made for another one, and a later process imports the cached ``.so`` directly.

SIMD target: ``-mavx2 -mfma`` with at::vec's AVX2 path when ``torch.backends.cpu.get_cpu_capability()``
reports AVX2 or AVX512 on x86-64 (AVX512 machines run the AVX2 build), else the portable at::vec fallback.
``PREFIXRT_CPP_ISA=default`` forces the portable build; ``PREFIXRT_NO_CPP=1`` disables the kernels.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["CppBuildError", "load_kernels", "kernels_or_reason", "source_dir", "simd_target"]

_SOURCES = ("bindings.cpp", "prefix_attention_fwd.cpp", "prefix_attention_bwd.cpp", "elementwise_dropout.cpp")
_EXPECTED_BUILD_S = 30  # an idle 2-core machine, gcc 12: about 15 s of CPU per translation unit


class CppBuildError(RuntimeError):
    """The C++ kernels could not be built or loaded on this machine (the message says why)."""


def source_dir() -> Path | None:
    """The folder holding the C++ sources, or None when this install has none."""
    candidates = []
    try:
        spec = importlib.util.find_spec("prefixrt._csrc")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parents[2] / "csrc")  # a checkout without an install
    for folder in candidates:
        if all((folder / name).is_file() for name in _SOURCES):
            return folder
    return None


def simd_target() -> str:
    """``"avx2"`` or ``"default"``: the at::vec path the kernels are compiled for on this machine."""
    forced = os.environ.get("PREFIXRT_CPP_ISA", "").lower()
    if forced in ("avx2", "default"):
        return forced
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "avx2" if x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "default"


def _flags(target: str) -> tuple[list[str], list[str]]:
    cflags = ["-O3", "-fno-math-errno", "-Wno-unknown-pragmas"]
    ldflags = []
    if sys.platform != "darwin":  # Apple clang has no -fopenmp: at::parallel_for then runs serially
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    if target == "avx2":
        cflags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    else:
        cflags += ["-DCPU_CAPABILITY=DEFAULT"]
    return cflags, ldflags


def _build_name(folder: Path, target: str, cflags: list[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.h")) + [folder / name for name in _SOURCES]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(cflags).encode())
    digest.update(f"{torch.__version__} {sys.version_info[:2]} {platform.machine()}".encode())
    return f"prefixrt_cpp_{target}_{digest.hexdigest()[:12]}"


def _build_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _import_built(name: str, so_path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(so_path))
    spec = importlib.util.spec_from_file_location(name, so_path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _compile(folder: Path) -> ModuleType:
    target = simd_target()
    cflags, ldflags = _flags(target)
    name = _build_name(folder, target, cflags)
    build_dir = _build_root() / name
    so_path = build_dir / f"{name}.so"
    if so_path.is_file() and not (build_dir / "lock").exists():
        return _import_built(name, so_path)

    from torch.utils.cpp_extension import load, verify_ninja_availability

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise CppBuildError(f"no C++ compiler: {compiler!r} not found (install g++, or set CXX)")
    try:
        verify_ninja_availability()
    except RuntimeError as err:
        raise CppBuildError("ninja is not installed (pip install ninja)") from err
    print(
        f"prefixrt: compiling C++ kernels (first use, ~{_EXPECTED_BUILD_S} s; {target}) into {build_dir} ...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    build_dir.mkdir(parents=True, exist_ok=True)
    module = load(
        name=name,
        sources=[str(folder / s) for s in _SOURCES],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(folder)],
        build_directory=str(build_dir),
        verbose=False,
    )
    print(f"prefixrt: C++ kernels built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module


_lock = threading.Lock()
_state: dict[str, object] = {}


def load_kernels() -> ModuleType:
    """The compiled kernel module (built on first call, then cached); raises :class:`CppBuildError`."""
    module, reason = kernels_or_reason()
    if module is None:
        raise CppBuildError(reason)
    return module


def kernels_or_reason() -> tuple[ModuleType | None, str | None]:
    """``(module, None)`` once built, else ``(None, why)``. Tries once per process."""
    with _lock:
        if "done" not in _state:
            _state["module"], _state["reason"] = _try_build()
            _state["done"] = True
        return _state["module"], _state["reason"]


def _try_build() -> tuple[ModuleType | None, str | None]:
    if os.environ.get("PREFIXRT_NO_CPP", "") not in ("", "0"):
        return None, "disabled by PREFIXRT_NO_CPP"
    folder = source_dir()
    if folder is None:
        return None, "the C++ sources (csrc/ or the prefixrt._csrc package) are not part of this install"
    try:
        return _compile(folder), None
    except CppBuildError as err:
        return None, str(err)
    except Exception as err:  # no compiler, a compile error, an ABI mismatch: report, never crash
        return None, f"building the C++ kernels failed ({type(err).__name__}): {_summary(err)}"


def _summary(err: Exception, keep: int = 4, width: int = 300) -> str:
    """The compiler's error lines (or the last lines) of a failed build, short enough for a warning."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    errors = [line for line in lines if ": error" in line or ": fatal error" in line]
    chosen = (errors or lines)[:keep] if errors else lines[-keep:]
    return " | ".join(line if len(line) <= width else line[:width] + "..." for line in chosen)
