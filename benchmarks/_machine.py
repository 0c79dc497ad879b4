"""The machine a benchmark ran on, for the top level of its JSON: ``"machine": machine()``.

Why: the CPU changes between sessions (Intel Xeon and AMD Zen 5 with AVX-512,
AMD Zen 3 with AVX2 only), and the same code runs at very different speeds on
them (OpenBLAS's kernel, the direct convolution's register tiles), so a number
without its CPU cannot be compared with another. Hence the rule "record the CPU
with every benchmark". The load average and ``OPENBLAS_CORETYPE`` come along
because they move the numbers too.

Imports neither numpy nor hpcsgd: a driver may call it before it chooses the
BLAS kernel of its workers. ``cpuinfo`` (a path) lets tests feed a text of their own.
"""

from __future__ import annotations

import os
import platform
from typing import Optional

CPUINFO = "/proc/cpuinfo"


def _first_processor(cpuinfo: str) -> dict:
    """``key: value`` lines of the first processor block of ``cpuinfo`` ({} when unreadable)."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _int(value: Optional[str]) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _model_name(fields: dict) -> str:
    return fields.get("model name") or platform.processor() or platform.machine()


def cpu_model(cpuinfo: str = CPUINFO) -> str:
    """The CPU's "model name" (e.g. "AMD EPYC 7B13"); where cpuinfo lacks it, what ``platform`` says."""
    return _model_name(_first_processor(cpuinfo))


def vector_class(flags) -> str:
    """``"avx512"`` (AVX-512F), ``"avx2"`` (AVX2 and FMA) or ``"other"``, from the cpuinfo flags."""
    flags = set(flags)
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "other"


def machine(cpuinfo: str = CPUINFO) -> dict:
    """CPU (model, family, model number, vector class), CPUs, load average, OpenBLAS setting, host."""
    fields = _first_processor(cpuinfo)
    return {
        "cpu_model": _model_name(fields),
        "cpu_family": _int(fields.get("cpu family")),
        "cpu_model_number": _int(fields.get("model")),
        "vector_class": vector_class(fields.get("flags", "").split()),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "openblas_coretype_env": os.environ.get("OPENBLAS_CORETYPE"),
        "hostname": platform.node(),
        "python": platform.python_version(),
    }
