"""``create_multi_node_evaluator``: an Evaluator whose result is the mean over all ranks.

Each rank evaluates its own share of the validation data (``scatter_dataset``);
the patched ``evaluate()`` returns, for every reported key, the unweighted mean
of the ranks' results, ``sum_r value_r / size``, as ChainerMN does. With
``force_equal_length=True`` shares every rank has the same number of batches,
so this is the mean over all batches.

Differences from ChainerMN (which calls ``allreduce_obj`` once per key):

* one ``allgather_obj`` of the whole result dict; the sum runs in float64 in rank
  order, so every rank gets bitwise the same value (``numpy.float64``, or a
  float64 array for array-valued results);
* if the ranks report different keys (e.g. one rank had no validation batch),
  every rank raises ``ValueError`` naming the ranks and keys, instead of
  hanging or mixing up keys;
* CuPy and ChainerX values are moved to the host first.
"""

from __future__ import annotations

import types

import numpy


def _to_host_float64(value):
    import chainer

    host = chainer.backend.CpuDevice().send(value)
    return numpy.asarray(host, dtype=numpy.float64)


def mean_over_ranks(result: dict, comm) -> dict:
    """Per-key mean of every rank's ``result`` (float64, identical on every rank). Collective."""
    local = {k: _to_host_float64(v) for k, v in sorted(result.items())}
    everyone = comm.allgather_obj(local)
    keys = [sorted(d) for d in everyone]
    if any(k != keys[0] for k in keys):
        per_rank = {r: k for r, k in enumerate(keys)}
        raise ValueError(f"multi-node evaluator: ranks report different keys {per_rank} "
                         "(does every rank have validation data? use scatter_dataset)")
    out = {}
    for k in keys[0]:
        total = everyone[0][k].copy()
        for d in everyone[1:]:
            total = total + d[k]
        mean = total / comm.size
        out[k] = mean[()] if mean.ndim == 0 else mean
    return out


def create_multi_node_evaluator(actual_evaluator, communicator):
    """Patch ``actual_evaluator`` (e.g. ``chainer.training.extensions.Evaluator``) so that
    ``evaluate()`` returns the mean over the ranks of ``communicator``; returns it.

    Every rank must run the evaluator at the same iterations (the same trigger).
    The original method stays available as ``_mn_original_evaluate``.
    """
    if not callable(getattr(actual_evaluator, "evaluate", None)):
        raise TypeError(f"create_multi_node_evaluator: {type(actual_evaluator).__name__} "
                        "has no evaluate() method")
    actual_evaluator._mn_original_evaluate = actual_evaluator.evaluate
    actual_evaluator._mn_communicator = communicator

    def evaluate(self):
        return mean_over_ranks(self._mn_original_evaluate(), self._mn_communicator)

    actual_evaluator.evaluate = types.MethodType(evaluate, actual_evaluator)
    return actual_evaluator
