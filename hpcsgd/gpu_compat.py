"""Chainer 7.8.1 on CuPy 13 / CUDA 12: load the pip-installed CUDA libraries, check the pair.

Why this exists (findings with sources in docs/gpu.md): Chainer 7.8.1 was built
for CuPy 7, and today's GPUs (compute capability 9.0) need CUDA >= 11.8, so
CuPy >= 12. The supported pair is **CuPy 13 (``cupy-cuda12x``) + CUDA 12**:

* Chainer's version check never fires: it lists ``cupy-cuda120``... but not
  ``cupy-cuda12x``, so a CuPy 13 wheel is simply not looked at;
* every CuPy name Chainer's CUDA backend and functions use still exists in CuPy 13
  (``cupy.cudnn`` only warns that it is deprecated);
* CuPy 14 removed ``cupy.cudnn`` and ``cupy.cuda.cudnn`` (Chainer then silently runs
  without cuDNN) and needs NumPy >= 2, which Chainer 7.8.1 does not support;
* CuPy 13 loads NCCL from the ``nvidia-nccl-cu12`` wheel by itself, but cuDNN 8
  (``libcudnn.so.8``) only from its own cache folder or the system search path:
  the ``nvidia-cudnn-cu12`` wheel's copy is invisible to it, and Chainer then
  runs without cuDNN, warning only once in ``check_cuda_available``.

:func:`apply` fixes the last point: before CuPy is imported it loads (``RTLD_GLOBAL``)
the shared libraries of the installed ``nvidia-*-cu12`` wheels, so the CuPy
extension modules find them by name. It does nothing when CuPy is not installed
or already imported, and never raises. :func:`problems` lists what is wrong with
the installed pair, in words.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

#: the CuPy versions hpcsgd supports with Chainer 7.8.1
CUPY_SUPPORTED = (13, 14)  # major versions: >= 13, < 14
#: pip packages whose libraries :func:`apply` preloads, in a workable order (dependencies first)
WHEELS = ("nvidia-cuda-runtime-cu12", "nvidia-nvjitlink-cu12", "nvidia-cublas-cu12", "nvidia-cuda-nvrtc-cu12",
          "nvidia-curand-cu12", "nvidia-cufft-cu12", "nvidia-cusparse-cu12", "nvidia-cusolver-cu12",
          "nvidia-nccl-cu12", "nvidia-cudnn-cu12")
DISABLE_ENV = "HPCSGD_NO_CUDA_PRELOAD"

_applied: list[str] | None = None


def wheel_libraries(wheels=WHEELS, files: Callable[[str], list[Path]] | None = None) -> list[Path]:
    """Shared libraries (``nvidia/<lib>/lib/*.so*``) of the installed wheels among ``wheels``, in order."""
    files = files or _wheel_lib_files
    return [p for name in wheels for p in sorted(files(name))]


def _wheel_lib_files(name: str) -> list[Path]:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return []
    return [Path(dist.locate_file(f)) for f in (dist.files or [])
            if ".so" in f.name and f.parent.name == "lib"]


def preload(libs: list[Path], load: Callable[[str], object] | None = None) -> tuple[list[str], list[str]]:
    """Load ``libs`` globally; a library whose dependencies are not loaded yet is retried after the others.

    Returns ``(loaded, failed)`` file names.
    """
    load = load or (lambda p: ctypes.CDLL(p, mode=ctypes.RTLD_GLOBAL))
    pending, loaded = [str(p) for p in libs], []
    while pending:
        failed = []
        for p in pending:
            try:
                load(p)
                loaded.append(os.path.basename(p))
            except OSError:
                failed.append(p)
        if len(failed) == len(pending):
            return loaded, [os.path.basename(p) for p in failed]
        pending = failed
    return loaded, []


def apply() -> list[str]:
    """Prepare CuPy 13 for Chainer 7.8.1 (idempotent, never raises); returns the preloaded library names."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = []
    warnings.filterwarnings("ignore", message="cupy.cudnn is deprecated", category=DeprecationWarning)
    if os.environ.get(DISABLE_ENV) == "1" or "cupy" in sys.modules:
        return _applied
    try:
        if importlib.util.find_spec("cupy") is None:
            return _applied
        _applied, _ = preload(wheel_libraries())
    except Exception as e:  # a broken install must not stop a CPU run
        warnings.warn(f"hpcsgd: could not preload the CUDA wheels' libraries: {e}", RuntimeWarning,
                      stacklevel=2)
    return _applied


def problems(cupy_version: str, cuda_runtime: int, compute_capability: str | None,
             cudnn_enabled: bool, nccl_available: bool) -> list[str]:
    """What is wrong with this CuPy/CUDA/GPU for hpcsgd, in words ([] when nothing).

    Args:
        cupy_version: ``cupy.__version__``.
        cuda_runtime: ``cupy.cuda.runtime.runtimeGetVersion()`` (e.g. 12040 for 12.4).
        compute_capability: ``cupy.cuda.Device().compute_capability`` (e.g. ``'90'``), None without a GPU.
        cudnn_enabled: ``chainer.backends.cuda.cudnn_enabled``.
        nccl_available: ``cupy.cuda.nccl.available``.
    """
    out = []
    major = int(cupy_version.split(".")[0])
    if major >= CUPY_SUPPORTED[1]:
        out.append(f"CuPy {cupy_version}: CuPy 14 removed cupy.cudnn (Chainer 7.8.1 then runs without cuDNN) "
                   "and needs NumPy >= 2 (Chainer 7.8.1 needs < 2); install 'cupy-cuda12x>=13,<14'")
    elif major < CUPY_SUPPORTED[0]:
        out.append(f"CuPy {cupy_version} is older than the supported 13.x; install 'cupy-cuda12x>=13,<14'")
    cc = int(compute_capability) if compute_capability else 0
    if cc >= 90 and cuda_runtime < 11080:
        out.append(f"compute capability {cc / 10:.1f} needs CUDA >= 11.8, this CuPy uses CUDA "
                   f"{cuda_runtime // 1000}.{cuda_runtime % 1000 // 10}")
    if not cudnn_enabled:
        out.append("cuDNN is not enabled in Chainer: pip install 'nvidia-cudnn-cu12>=8.9,<9' (cuDNN 8; "
                   "hpcsgd.gpu_compat.apply() loads it) or set CHAINER_CUDNN=0 to run without it")
    if not nccl_available:
        out.append("CuPy cannot load NCCL: pip install 'nvidia-nccl-cu12>=2.16.5'")
    return out


def report() -> dict:
    """Versions and :func:`problems` of this process (imports CuPy and Chainer; for the validation script)."""
    apply()
    import chainer
    import cupy
    from cupy.cuda import nccl

    dev = cupy.cuda.Device()
    cudnn = chainer.backends.cuda.cudnn_enabled
    info = {
        "chainer": chainer.__version__, "cupy": cupy.__version__,
        "cuda_runtime": int(cupy.cuda.runtime.runtimeGetVersion()),
        "driver": int(cupy.cuda.runtime.driverGetVersion()),
        "gpu": cupy.cuda.runtime.getDeviceProperties(dev.id)["name"].decode(),
        "compute_capability": dev.compute_capability,
        "cudnn": int(chainer.backends.cuda._cudnn_version) if cudnn else None,
        "nccl": int(nccl.get_version()) if getattr(nccl, "available", False) else None,
        "preloaded": list(_applied or []),
    }
    info["problems"] = problems(cupy.__version__, info["cuda_runtime"], dev.compute_capability, cudnn,
                                info["nccl"] is not None)
    return info
