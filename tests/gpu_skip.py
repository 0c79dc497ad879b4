"""The one skip rule of the tests that need a real GPU: CuPy must import and find a CUDA device.

Why one place: every real-GPU test file used to repeat the same CuPy import and
``getDeviceCount`` probe, with reasons that did not say what was missing. Here
the probe runs once per process and the skip reason names the missing piece
(CuPy itself, or a CUDA device for it), so a machine without a GPU reports
why each GPU test did not run. Tests that only need stand-in objects
(``tests/test_gpu_logic.py``, ``tests/nccl_standin.py``) do not use it.

Use ``cupy = require_cuda()`` at module level (skips the whole module) or at
the top of a test (skips that test); mark real-GPU modules ``pytest.mark.gpu``
so ``benchmarks/gpu_validate.sh`` runs them.
"""

from __future__ import annotations

import functools

import pytest


@functools.cache
def cuda_missing() -> str | None:
    """Why real-GPU tests cannot run here (CuPy missing, or no CUDA device), or None when they can."""
    try:
        import cupy
    except ImportError as e:
        return f"needs CuPy and a CUDA device: CuPy is not installed ({e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CuPy without a driver/device
        return f"needs a CUDA device: CuPy finds none ({type(e).__name__}: {e})"
    if n == 0:
        return "needs a CUDA device: CuPy finds none"
    return None


def require_cuda():
    """CuPy, once CuPy and a CUDA device are known to be there; else skip the calling module or test."""
    __tracebackhide__ = True  # the skip is reported at the caller's line, not here
    reason = cuda_missing()
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)
    import cupy

    return cupy
