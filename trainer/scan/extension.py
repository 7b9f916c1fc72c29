"""Building and loading the compiled scan backends.

Two extensions, both from `csrc/`:
- `birdie_scan_cpu`: the C++ CPU backend (a C++ compiler is enough);
- `birdie_scan_cuda`: the CUDA backend (needs nvcc and a CUDA build of torch).

Each is taken from an install-time build (`trainer.scan._scan_cpu` / `_scan_cuda`, built by
`setup.py` when BIRDIE_BUILD_EXT=1) if present, else built just in time with
`torch.utils.cpp_extension.load` into a cache directory that outlives the process:
`$TORCH_EXTENSIONS_DIR` or `~/.cache/birdie/ext/`, one subdirectory per Python, torch and
CUDA version. torch rebuilds when a source or a flag changes and serialises concurrent
builds with a lock file, so test processes share one build.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent / "csrc"

CPU_SOURCES = [CSRC / "scan_cpu.cpp"]
CUDA_SOURCES = [CSRC / "scan_cuda_bindings.cpp", CSRC / "scan_cuda.cu"]
# at::parallel_for is OpenMP in torch's CPU builds and compiles to a serial loop without it;
# the OpenMP runtime itself is the one torch has already loaded.
CPU_CFLAGS = ["-O3", "-fopenmp"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3", "-lineinfo"]

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}
_failures: dict[str, Exception] = {}


def build_root() -> Path:
    """Directory under which the JIT builds live (created on demand)."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "birdie" / "ext"
    cuda = torch.version.cuda or "cpu"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-cu{cuda}"
    return Path(base) / tag.replace("+", "_")


def _jit_build(name: str, sources: list[Path], **flags) -> ModuleType:
    from torch.utils.cpp_extension import load

    directory = build_root() / name
    directory.mkdir(parents=True, exist_ok=True)
    return load(
        name=name,
        sources=[str(s) for s in sources],
        build_directory=str(directory),
        extra_include_paths=[str(CSRC)],
        verbose=os.environ.get("BIRDIE_EXT_VERBOSE") == "1",
        **flags,
    )


def _prebuilt(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def cpu_backend() -> ModuleType | None:
    """The C++ CPU backend, or None (with one warning) when it cannot be built here."""
    with _lock:
        if "cpu" not in _loaded:
            module = _prebuilt("trainer.scan._scan_cpu")
            if module is None:
                try:
                    module = _jit_build(
                        "birdie_scan_cpu", CPU_SOURCES,
                        extra_cflags=CPU_CFLAGS, extra_ldflags=CPU_LDFLAGS,
                    )
                except Exception as exc:  # compiler missing or failing: fall back, loudly once
                    warnings.warn(
                        f"the C++ CPU linear_scan backend could not be built ({exc!r}); "
                        "falling back to the pure-PyTorch reference, which is much slower",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    module = None
            _loaded["cpu"] = module
        return _loaded["cpu"]


def cuda_backend() -> ModuleType:
    """The CUDA backend; builds it on first use. Raises RuntimeError when it cannot be built."""
    with _lock:
        if "cuda" in _loaded:
            return _loaded["cuda"]
        if "cuda" in _failures:  # do not retry a failed 30 s build on every call
            raise RuntimeError(f"the CUDA linear_scan backend is unavailable: {_failures['cuda']}")
        module = _prebuilt("trainer.scan._scan_cuda")
        if module is None:
            from torch.utils.cpp_extension import CUDA_HOME

            try:
                if torch.version.cuda is None:
                    raise RuntimeError(f"this torch ({torch.__version__}) is not a CUDA build")
                if CUDA_HOME is None:
                    raise RuntimeError(
                        "nvcc was not found: install the CUDA toolkit matching torch "
                        f"(CUDA {torch.version.cuda}) and set CUDA_HOME"
                    )
                module = _jit_build(
                    "birdie_scan_cuda", CUDA_SOURCES,
                    extra_cflags=["-O3"], extra_cuda_cflags=CUDA_CFLAGS,
                )
            except Exception as exc:
                _failures["cuda"] = exc
                raise RuntimeError(f"the CUDA linear_scan backend is unavailable: {exc}") from exc
        _loaded["cuda"] = module
        return module
