"""Make BN inference statistics ready before evaluation (all four BN modes).

:func:`prepare_for_eval` is collective over ``comm``: every rank must call it
(with the same model structure). All layers' statistics travel in one packed
float64 buffer per ``comm._multi_node_mean`` call, so the cost is one or two
small allreduces per evaluation whatever the depth. Formulas are in
:mod:`hpcsgd.models.batchnorm`.
"""

from __future__ import annotations

from typing import Iterable

import chainer
import numpy
from chainer import backend

from hpcsgd.errors import ConfigError
from hpcsgd.models.batchnorm import BatchNorm
from hpcsgd.runtime.watchdog import collective


def bn_links(model: chainer.Link) -> list[BatchNorm]:
    """The :class:`BatchNorm` links of ``model``, in a rank-independent (name-sorted) order."""
    return [link for _, link in sorted(model.namedlinks()) if isinstance(link, BatchNorm)]


def _mean_over_ranks(comm, buf):
    """Mean over ranks of ``buf`` (in place); identity without a communicator or with one rank."""
    if comm is None or comm.size == 1:
        return buf
    with collective("bn_stats_mean", nbytes=buf.nbytes):
        comm._multi_node_mean(None, buf)
    return buf


def _unbias(count):
    return count / numpy.maximum(count - 1.0, 1.0)


def _combine_last_batch(bns: list[BatchNorm], comm) -> None:
    """'batch' mode: average the last-minibatch statistics across ranks."""
    if not bns:
        return
    xp = backend.get_array_module(bns[0].last_mean)
    f64 = numpy.float64
    parts = []
    for bn in bns:
        if bn.last_count < 1:
            raise ConfigError(f"BN layer of size {bn.size} has no training minibatch statistics yet: "
                              "run at least one training step before prepare_for_eval (bn_mode='batch')")
        n = float(bn.last_count)
        v = bn.last_var.astype(f64)
        parts += [bn.last_mean.astype(f64), v, v * _unbias(n), xp.asarray([n], dtype=f64)]
    buf = _mean_over_ranks(comm, xp.concatenate(parts))
    size = 1 if comm is None else comm.size
    means, spread_parts, offs = [], [], 0
    for bn in bns:
        c = bn.size
        mean = buf[offs:offs + c]
        var_biased, var_unbiased = buf[offs + c:offs + 2 * c], buf[offs + 2 * c:offs + 3 * c]
        means.append((mean, var_biased, var_unbiased, float(buf[offs + 3 * c])))
        spread_parts.append((bn.last_mean.astype(f64) - mean) ** 2)
        offs += 3 * c + 1
    needs_spread = any(bn.var_combine == "corrected" for bn in bns) and size > 1
    spread = _mean_over_ranks(comm, xp.concatenate(spread_parts)) if needs_spread else None
    offs = 0
    for bn, (mean, var_biased, var_unbiased, n_mean) in zip(bns, means):
        c = bn.size
        if bn.var_combine == "corrected":
            total = n_mean * size
            var = var_biased + (spread[offs:offs + c] if spread is not None else 0.0)
            var = var * _unbias(total)
        else:
            var = var_unbiased
        offs += c
        bn.avg_mean = mean.astype(bn.last_mean.dtype)
        bn.avg_var = var.astype(bn.last_mean.dtype)


def _average_running(bns: list[BatchNorm], comm) -> None:
    """'running' mode: average the per-rank running averages (ChainerMN AllreducePersistent)."""
    if not bns or comm is None or comm.size == 1:
        return
    xp = backend.get_array_module(bns[0].avg_mean)
    buf = xp.concatenate([xp.concatenate([bn.avg_mean, bn.avg_var]).astype(numpy.float64) for bn in bns])
    _mean_over_ranks(comm, buf)
    offs = 0
    for bn in bns:
        c = bn.size
        bn.avg_mean = buf[offs:offs + c].astype(bn.avg_mean.dtype)
        bn.avg_var = buf[offs + c:offs + 2 * c].astype(bn.avg_var.dtype)
        offs += 2 * c


def _recompute(model, bns: list[BatchNorm], comm, batches: Iterable) -> int:
    """'recompute' mode: population statistics over ``batches`` on every rank; returns the batch count."""
    for bn in bns:
        bn.start_recompute()
    n_batches = 0
    try:
        with chainer.using_config("train", True), chainer.no_backprop_mode():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x)
                n_batches += 1
    finally:
        accs = [bn.stop_recompute() for bn in bns]
    if n_batches == 0:
        raise ConfigError("prepare_for_eval: bn_mode='recompute' got no batches on this rank")
    xp = backend.get_array_module(accs[0][0])
    buf = xp.concatenate([xp.concatenate([s1, s2, xp.asarray([cnt], dtype=numpy.float64)])
                          for s1, s2, cnt in accs])
    _mean_over_ranks(comm, buf)  # the 1/size factors cancel in the ratios below
    offs = 0
    size = 1 if comm is None else comm.size
    for bn in bns:
        c = bn.size
        s1, s2, cnt = buf[offs:offs + c], buf[offs + c:offs + 2 * c], float(buf[offs + 2 * c])
        mean = s1 / cnt
        var = xp.maximum(s2 / cnt - mean * mean, 0.0)
        var = var * _unbias(cnt * size)
        bn.avg_mean = mean.astype(bn.avg_mean.dtype)
        bn.avg_var = var.astype(bn.avg_var.dtype)
        offs += 2 * c + 1
    return n_batches


def start_step(model: chainer.Link) -> None:
    """Mark the start of a training step (its micro-batches follow) for 'batch'-mode BN layers.

    Local, no communication. The training loop calls it before the first
    micro-batch of every step, so under gradient accumulation the statistics
    kept for evaluation are those of the whole step (all micro-batches), as
    if every micro-batch were one of the paper's workers.
    """
    for bn in bn_links(model):
        if bn.mode == "batch":
            bn.start_step()


def prepare_for_eval(model: chainer.Link, comm=None, batches: Iterable | None = None) -> dict:
    """Make every BN layer's inference statistics ready, per its mode. Collective over ``comm``.

    Args:
        model: a model built by :func:`hpcsgd.models.build_model` (any chain with BatchNorm links).
        comm: communicator (``_multi_node_mean``); None for a single process.
        batches: iterable of training inputs ``x`` (or ``(x, t)``), K per rank, for 'recompute'.

    Returns:
        ``{mode: number of BN layers prepared}`` (plus ``'recompute_batches'`` when recomputed).
    """
    by_mode: dict[str, list[BatchNorm]] = {}
    for bn in bn_links(model):
        by_mode.setdefault(bn.mode, []).append(bn)
    report = {mode: len(links) for mode, links in by_mode.items()}
    if "recompute" in by_mode:
        if batches is None:
            raise ConfigError("prepare_for_eval: bn_mode='recompute' needs batches (K training batches)")
        report["recompute_batches"] = _recompute(model, by_mode["recompute"], comm, batches)
    _combine_last_batch(by_mode.get("batch", []), comm)
    _average_running(by_mode.get("running", []), comm)
    # 'sync': running averages of global statistics, already identical on every rank.
    return report
