"""Per-phase timing across ranks, JSON-lines logs, summary.json and the training-curve plot.

Per iteration the loop hands :class:`PhaseMeter` the tracer's seconds per phase
(data_wait, forward, backward, pack, allreduce, unpack, update). Every
``log_interval`` iterations :meth:`PhaseMeter.aggregate` runs ONE ``Allgather``
of a small float64 vector per rank (phase sums, loss sum, images) and returns
the mean and the max over ranks of each phase's seconds per iteration, so
cross-rank aggregation costs one tiny collective per interval, not per step.
"""

from __future__ import annotations

import json
import os
import time
from typing import Iterable

import numpy as np

from hpcsgd.runtime.watchdog import collective

PHASES = ("data_wait", "forward", "backward", "pack", "allreduce", "unpack", "update")
COMM_PHASES = ("pack", "allreduce", "unpack")


class PhaseMeter:
    """Sums phase seconds, loss and images over an interval; aggregates across ranks."""

    def __init__(self, phases: Iterable[str] = PHASES) -> None:
        self.phases = tuple(phases)
        self.totals = {p: 0.0 for p in self.phases}  # whole run, this rank (seconds)
        self.total_iters = 0
        self._reset()

    def _reset(self) -> None:
        self.sums = np.zeros(len(self.phases))
        self.loss_sum = 0.0
        self.images = 0
        self.iters = 0
        self.t_start = time.perf_counter()
        self.excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (evaluation, checkpoint) out of the interval's images/s."""
        self.excluded += seconds

    def add(self, phase_seconds: dict[str, float], loss: float, images: int) -> None:
        for i, p in enumerate(self.phases):
            s = phase_seconds.get(p, 0.0)
            self.sums[i] += s
            self.totals[p] += s
        self.loss_sum += loss
        self.images += images
        self.iters += 1
        self.total_iters += 1

    def aggregate(self, comm) -> dict:
        """Collective: one Allgather; returns the interval's record (same on every rank)."""
        mpi = getattr(comm, "mpi_comm", comm)
        elapsed = time.perf_counter() - self.t_start - self.excluded
        local = np.concatenate([self.sums, [self.loss_sum, self.images, self.iters, elapsed]])
        gathered = np.empty((mpi.Get_size(), local.size))
        with collective("allgather", what="phase timings"):
            mpi.Allgather(local, gathered)
        iters = max(gathered[0, -2], 1.0)
        per_iter = gathered[:, : len(self.phases)] / iters
        n_phase = len(self.phases)
        loss = gathered[:, n_phase].sum() / max(gathered[:, n_phase + 2].sum(), 1.0)
        images = gathered[:, n_phase + 1].sum()
        wall = gathered[:, -1].max()
        record = {
            "iterations": int(gathered[0, -2]),
            "loss": float(loss),
            "images_per_s": float(images / wall) if wall > 0 else 0.0,
            "seconds_per_iter": float(wall / iters),
            "phase_mean_s": {p: float(per_iter[:, i].mean()) for i, p in enumerate(self.phases)},
            "phase_max_s": {p: float(per_iter[:, i].max()) for i, p in enumerate(self.phases)},
        }
        self._reset()
        return record

    def run_means(self) -> dict[str, float]:
        """This rank's mean seconds per iteration of each phase over the whole run."""
        n = max(self.total_iters, 1)
        return {p: self.totals[p] / n for p in self.phases}

    def run_means_across(self, comm) -> dict[str, dict[str, float]]:
        """Collective: whole-run per-phase seconds/iteration, mean and max over ranks."""
        mpi = getattr(comm, "mpi_comm", comm)
        local = np.array([self.run_means()[p] for p in self.phases])
        gathered = np.empty((mpi.Get_size(), local.size))
        with collective("allgather", what="run phase timings"):
            mpi.Allgather(local, gathered)
        return {"mean": {p: float(gathered[:, i].mean()) for i, p in enumerate(self.phases)},
                "max": {p: float(gathered[:, i].max()) for i, p in enumerate(self.phases)}}


class JsonlLog:
    """JSON lines (``DIR/log.rank{R}.jsonl``), flushed per record; a resumed run appends."""

    def __init__(self, path: str, append: bool = False) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._f = open(path, "a" if append else "w", buffering=1)  # noqa: SIM115 - closed in close()

    def write(self, kind: str, **fields) -> None:
        rec = {"kind": kind, "time": time.time(), **fields}
        self._f.write(json.dumps(rec, default=_json_default) + "\n")

    def close(self) -> None:
        self._f.close()


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def versions() -> dict[str, str]:
    import platform

    out = {"python": platform.python_version()}
    for mod in ("hpcsgd", "numpy", "chainer", "mpi4py", "cupy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    try:
        from mpi4py import MPI

        out["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
    except Exception:
        pass
    try:
        from threadpoolctl import threadpool_info

        out["blas"] = "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
                                for i in threadpool_info() if i.get("user_api") == "blas")
    except Exception:
        pass
    return out


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def plot_curves(history: list[dict], path: str, title: str = "") -> str | None:
    """Training loss, validation top-1/top-5 and (if measured) B_noise versus epoch, to a PNG."""
    train = [h for h in history if h.get("kind") == "train"]
    evals = [h for h in history if h.get("kind") == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noise = [h for h in train if h.get("b_noise") is not None or h.get("b_noise_raw") is not None]
    fig, axes = plt.subplots(1, 3 if noise else 2, figsize=(15 if noise else 10, 4))
    ax1, ax2 = axes[:2]
    if noise:
        plot_noise_scale(axes[2], noise)
    if train:
        ax1.plot([h["epoch"] for h in train], [h["loss"] for h in train], label="train loss")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("loss")
        ax1.set_yscale("log")
        ax1.legend()
        ax1b = ax1.twinx()
        ax1b.plot([h["epoch"] for h in train], [h.get("lr", np.nan) for h in train], "C1--", label="lr")
        ax1b.set_ylabel("learning rate")
    if evals:
        ax2.plot([h["epoch"] for h in evals], [100 * h["top1"] for h in evals], "o-", label="top-1")
        ax2.plot([h["epoch"] for h in evals], [100 * h["top5"] for h in evals], "s-", label="top-5")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("validation accuracy (%)")
        ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_noise_scale(ax, records: list[dict]) -> None:
    """B_noise (images) versus epoch: the smoothed estimate and the per-interval raw ones (log scale)."""
    def series(key):
        pts = [(h["epoch"], h[key]) for h in records if h.get(key) is not None and h[key] > 0]
        return [p[0] for p in pts], [p[1] for p in pts]

    ax.plot(*series("b_noise_raw"), ".", color="0.6", label="per interval (raw)")
    ax.plot(*series("b_noise"), "C2-", label="smoothed (EMA)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("gradient noise scale B_noise (images)")
    ax.set_yscale("log")
    ax.legend()
