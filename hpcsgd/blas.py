"""Pick OpenBLAS's core type before numpy loads it, when OpenBLAS misreads the CPU.

numpy's bundled OpenBLAS chooses its kernels at load time from the CPU model.
A CPU newer than the OpenBLAS build (e.g. OpenBLAS 0.3.23 on Emerald Rapids)
is not recognised and gets the generic "Prescott" kernel: about 23 instead of
150 GFLOP/s per core in sgemm, and Chainer training 1.9x slower. Setting
``OPENBLAS_CORETYPE`` before the library loads fixes it, and this module does
that when, and only when:

* the user has not set ``OPENBLAS_CORETYPE`` (a user setting always wins);
* OpenBLAS, loaded in a throw-away subprocess, reports (threadpoolctl's
  ``architecture``) a kernel below the CPU's vector class;
* ``/proc/cpuinfo`` flags show AVX-512 (-> ``SkylakeX``) or AVX2+FMA (-> ``Haswell``).

It also sets ``OPENBLAS_THREAD_TIMEOUT=4`` unless set, so that idle OpenBLAS
threads sleep instead of spinning while numba kernels run between GEMMs.
``HPCSGD_BLAS_SELECT=0`` switches all of this off. Use from Python before anything imports numpy::

    from hpcsgd.blas import select_coretype
    print(select_coretype())          # one log line; sets os.environ when needed

or from a job script (``hpcsgd train`` calls it itself)::

    eval "$(python -m hpcsgd.blas --export)"

This module never imports numpy in the calling process. :func:`decide` holds the
decision logic as a pure function of its inputs (tests inject them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Iterable, Mapping, MutableMapping, Optional

ENV = "OPENBLAS_CORETYPE"
#: Set next to OPENBLAS_CORETYPE by ``--export`` so a later call knows hpcsgd chose it.
MARK_ENV = "HPCSGD_OPENBLAS_CORETYPE_BY"
#: OpenBLAS's idle threads spin 2**28 cycles (~0.1 s) by default before sleeping; they then steal
#: the cores numba's kernels run on between two GEMMs. 2**4 cycles: they sleep at once.
THREAD_TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"
THREAD_TIMEOUT = "4"
#: ``HPCSGD_BLAS_SELECT=0`` switches the selection off.
DISABLE_ENV = "HPCSGD_BLAS_SELECT"

AVX512_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
AVX2_FLAGS = frozenset({"avx2", "fma"})
#: OpenBLAS kernels (lower case) that use AVX-512, and those that use at least AVX2.
AVX512_KERNELS = frozenset({"skylakex", "cooperlake", "sapphirerapids"})
AVX2_KERNELS = AVX512_KERNELS | frozenset({"haswell", "zen", "excavator"})

_PROBE = (
    "import json, numpy, threadpoolctl\n"
    "libs = [i for i in threadpoolctl.threadpool_info() if i.get('internal_api') == 'openblas']\n"
    "print(json.dumps({'architecture': libs[0].get('architecture') if libs else None,\n"
    "                  'version': libs[0].get('version') if libs else None}))\n"
)


def read_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset:
    """The CPU feature flags of the first processor in ``path`` (empty when unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags") and ":" in line:
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_coretype(cpu_flags: Optional[Iterable[str]] = None) -> Optional[str]:
    """OpenBLAS core type of the CPU's vector class: ``SkylakeX`` (AVX-512), ``Haswell`` (AVX2+FMA), or None.

    What benchmarks force when they pin a kernel: a fixed ``SkylakeX`` dies with
    SIGILL on a CPU without AVX-512 (e.g. AMD Zen 3).
    """
    flags = read_cpu_flags() if cpu_flags is None else frozenset(cpu_flags)
    if AVX512_FLAGS <= flags:
        return "SkylakeX"
    if AVX2_FLAGS <= flags:
        return "Haswell"
    return None


def probe_openblas(python: str = sys.executable, environ: Optional[Mapping[str, str]] = None,
                   timeout: float = 60.0) -> dict:
    """``{'architecture': .., 'version': ..}`` of the OpenBLAS numpy loads, probed in a subprocess.

    Values are None when numpy does not use OpenBLAS or the probe fails; the
    caller's process and environment are left untouched.
    """
    env = dict(os.environ if environ is None else environ)
    env.pop(ENV, None)
    try:
        out = subprocess.run([python, "-c", _PROBE], env=env, capture_output=True, text=True,
                             timeout=timeout, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"architecture": None, "version": None}


def _version_tuple(version: Optional[str]) -> tuple:
    parts = []
    for token in (version or "").split(".")[:3]:
        digits = "".join(ch for ch in token if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def decide(architecture: Optional[str], cpu_flags: Iterable[str], user_value: Optional[str] = None,
           version: Optional[str] = None) -> tuple[Optional[str], str]:
    """Return ``(coretype to set or None, one-line reason)``; a pure function of its inputs."""
    if user_value:
        return None, f"hpcsgd.blas: {ENV}={user_value} set by the user; kept"
    if not architecture:
        return None, "hpcsgd.blas: numpy does not use OpenBLAS (or it could not be probed); nothing to select"
    arch = architecture.lower()
    wanted = cpu_coretype(cpu_flags)
    if wanted is None:
        return None, f"hpcsgd.blas: OpenBLAS runs its {architecture} kernel; no AVX2 here; nothing to select"
    good, cls = (AVX512_KERNELS, "AVX-512") if wanted == "SkylakeX" else (AVX2_KERNELS, "AVX2")
    # SkylakeX kernels are in DYNAMIC_ARCH builds from OpenBLAS 0.3.0 on.
    if wanted == "SkylakeX" and version and _version_tuple(version) < (0, 3, 0):
        wanted, good = "Haswell", AVX2_KERNELS
    if arch in good:
        return None, f"hpcsgd.blas: OpenBLAS runs its {architecture} kernel on this {cls} CPU; nothing to do"
    return wanted, (f"hpcsgd.blas: OpenBLAS {version or ''} would run its generic {architecture} kernel "
                    f"on this {cls} CPU; selecting {ENV}={wanted} (set {ENV} yourself to override)")


def select_coretype(environ: Optional[MutableMapping[str, str]] = None, probe=probe_openblas,
                    cpu_flags: Optional[Iterable[str]] = None,
                    numpy_loaded: Optional[bool] = None) -> str:
    """Set ``environ[OPENBLAS_CORETYPE]`` when OpenBLAS would misread the CPU; return one log line.

    ``environ`` defaults to ``os.environ``; ``probe`` and ``cpu_flags`` are
    injectable for tests. Does nothing (and says so) once numpy is imported,
    since OpenBLAS reads the variable only when it loads.
    """
    env = os.environ if environ is None else environ
    if env.get(DISABLE_ENV, "") == "0":
        return f"hpcsgd.blas: {DISABLE_ENV}=0; OpenBLAS core type left alone"
    if numpy_loaded is None:
        numpy_loaded = "numpy" in sys.modules
    if numpy_loaded:
        return f"hpcsgd.blas: numpy is already imported; {ENV} can no longer take effect (call me earlier)"
    env.setdefault(THREAD_TIMEOUT_ENV, THREAD_TIMEOUT)
    user = env.get(ENV)
    if user and env.get(MARK_ENV) == user:
        return f"hpcsgd.blas: {ENV}={user} selected earlier by hpcsgd.blas; kept"
    if user:
        return decide(None, (), user_value=user)[1]
    info = probe(environ=env)
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    coretype, line = decide(info.get("architecture"), flags, version=info.get("version"))
    if coretype:
        env[ENV] = coretype
        env[MARK_ENV] = coretype
    return line


def launcher_rank(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """This process's rank as the MPI launcher exported it (before MPI_Init), or None."""
    env = os.environ if environ is None else environ
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def check(n: int = 2048, repeats: int = 5, seed: int = 0) -> dict:
    """The OpenBLAS kernel this process runs, its sgemm GFLOP/s at ``n``^3, and its float32 error.

    Loads numpy (so the kernel is whatever the environment selected); changes
    nothing. ``rel_error`` is ``max |C32 - C64| / max |C64|`` for ``C = A @ B``
    of uniform [-1, 1) matrices against the same product in float64: a correct
    sgemm stays near ``sqrt(n) * 2**-24`` (about 3e-6 at n = 2048); ``ok`` is
    False above 1e-4, which only a broken kernel reaches.
    """
    import time

    import numpy as np
    import threadpoolctl

    libs = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, (n, n)).astype(np.float32)
    b = rng.uniform(-1, 1, (n, n)).astype(np.float32)
    c = a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    err = float(np.abs(c - ref).max() / np.abs(ref).max())
    return {"library": libs[0].get("internal_api") if libs else None,
            "architecture": libs[0].get("architecture") if libs else None,
            "version": libs[0].get("version") if libs else None,
            "threads": libs[0].get("num_threads") if libs else None,
            "coretype_env": os.environ.get(ENV), "n": n, "sgemm_gflops": 2 * n**3 / best / 1e9,
            "rel_error": err, "ok": err < 1e-4}


def main(argv: Optional[list] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hpcsgd.blas", description=__doc__.splitlines()[0])
    parser.add_argument("--export", action="store_true",
                        help="print 'export OPENBLAS_CORETYPE=..' for a shell to eval (or nothing)")
    parser.add_argument("--check", action="store_true",
                        help="report the kernel numpy's OpenBLAS runs now, its sgemm GFLOP/s and its "
                             "error against float64 (selects nothing; run it with and without "
                             f"{ENV} to compare kernels)")
    parser.add_argument("--n", type=int, default=2048, help="--check: matrix size")
    args = parser.parse_args(argv)
    if args.check:
        r = check(args.n)
        print(f"{r['library']} {r['version']} kernel {r['architecture']} ({ENV}={r['coretype_env']}), "
              f"{r['threads']} thread(s): sgemm {args.n}^3 {r['sgemm_gflops']:.0f} GFLOP/s, "
              f"max relative error vs float64 {r['rel_error']:.1e} ({'ok' if r['ok'] else 'WRONG'})")
        return 0 if r["ok"] else 1
    env = dict(os.environ)
    line = select_coretype(env, numpy_loaded=False)
    print(line, file=sys.stderr)
    if args.export:
        names = (ENV, MARK_ENV, THREAD_TIMEOUT_ENV)
        exports = [f"{k}={env[k]}" for k in names if env.get(k) != os.environ.get(k)]
        if exports:
            print("export " + " ".join(exports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
