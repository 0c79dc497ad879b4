"""Rank side of the cross-rank BN checks: sync BN and the cross-rank BN statistics rules.

Run alone (argv: COMM_NAME) or from check_multi_node_optimizer.py ``--bn``
(one launch for both, as tests/test_multi_node_optimizer.py does: a launch
costs seconds). Every rank builds the same global data (same seed) and takes
its own slice, so each check compares against float64 NumPy on the whole
(concatenated) batch.
"""

import sys

import chainer
import chainer.functions as F
import numpy as np
from _comm_choice import make_comm

from hpcsgd.models import prepare_for_eval
from hpcsgd.models.batchnorm import BatchNorm

comm = R = r = None
C = 3
EPS = 1e-5


class OneBN(chainer.Chain):
    def __init__(self, mode, **kw):
        super().__init__()
        with self.init_scope():
            self.bn = BatchNorm(C, mode=mode, comm=comm, eps=EPS, **kw)

    def forward(self, x):
        return self.bn(x)


def one_bn(mode, **kw):
    chain = OneBN(mode, **kw)
    rng = np.random.RandomState(7)  # identical parameters on every rank
    chain.bn.gamma.array[...] = rng.uniform(0.5, 1.5, C)
    chain.bn.beta.array[...] = rng.randn(C)
    chain.cleargrads()  # Chainer starts gradients as NaN
    return chain


def rank_data(sizes, seed=0, shift_per_rank=0.0):
    """Global batch (float32) and this rank's slice; rank k's images are shifted by k*shift_per_rank."""
    rng = np.random.RandomState(seed)
    parts = [(rng.randn(n, C, 2, 3) * (1 + k) + k * shift_per_rank).astype(np.float32)
             for k, n in enumerate(sizes)]
    return np.concatenate(parts), parts[r]


def ref_bn(x, gamma, beta, w):
    """float64 BN forward and gradients of sum(y * w), by hand."""
    x, gamma, beta, w = (a.astype(np.float64) for a in (x, gamma, beta, w))
    axes = (0, 2, 3)
    mean = x.mean(axes, keepdims=True)
    var = x.var(axes, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + EPS)
    g = gamma.reshape(1, -1, 1, 1)
    y = g * xhat + beta.reshape(1, -1, 1, 1)
    gbeta = w.sum(axes)
    ggamma = (w * xhat).sum(axes)
    mean_w, mean_wx = w.mean(axes, keepdims=True), (w * xhat).mean(axes, keepdims=True)
    gx = g / np.sqrt(var + EPS) * (w - mean_w - xhat * mean_wx)
    return y, gx, ggamma, gbeta, mean.ravel(), var.ravel()


def offsets(sizes):
    return int(sum(sizes[:r])), int(sum(sizes[:r + 1]))


def check_sync(sizes):
    xg, xl = rank_data(sizes, seed=1, shift_per_rank=2.0)
    wg = np.random.RandomState(3).randn(*xg.shape).astype(np.float32)
    a, b = offsets(sizes)
    model = one_bn("sync")
    x = chainer.Variable(xl)
    y = model.bn(x)
    F.sum(y * wg[a:b]).backward()
    bn = model.bn
    y_ref, gx_ref, gg_ref, gb_ref, mean_ref, var_ref = ref_bn(xg, bn.gamma.array, bn.beta.array, wg)
    np.testing.assert_allclose(y.array, y_ref[a:b], rtol=1e-4, atol=1e-4, err_msg=f"sync forward {sizes}")
    np.testing.assert_allclose(x.grad, gx_ref[a:b], rtol=1e-3, atol=1e-4, err_msg=f"sync gx {sizes}")
    # local gamma/beta grads sum (over ranks) to the single-process ones
    gg = comm.allreduce(model.bn.gamma.grad.astype(np.float64))
    gb = comm.allreduce(model.bn.beta.grad.astype(np.float64))
    np.testing.assert_allclose(gg, gg_ref, rtol=1e-3, atol=1e-3, err_msg="sync ggamma")
    np.testing.assert_allclose(gb, gb_ref, rtol=1e-4, atol=1e-3, err_msg="sync gbeta")
    np.testing.assert_allclose(model.bn.last_mean, mean_ref, rtol=1e-5, atol=1e-5, err_msg="sync mean")
    n = xg.size // C
    unbiased = var_ref * n / (n - 1)
    np.testing.assert_allclose(model.bn.avg_var, 0.9 + 0.1 * unbiased, rtol=1e-5, err_msg="sync running var")
    prepare_for_eval(model, comm)  # nothing to do: identical on every rank
    with chainer.using_config("train", False):
        out = model.bn(xg[:2]).array  # same input everywhere -> same output everywhere
    for k, other in enumerate(comm.mpi_comm.allgather(out)):
        assert np.array_equal(other, out), f"sync BN eval output differs on rank {k}"


def check_batch_mode():
    sizes = [4] * R
    xg, xl = rank_data(sizes, seed=2, shift_per_rank=3.0)  # ranks differ in distribution
    n = 4 * 2 * 3
    for combine in ("corrected", "mean"):
        model = one_bn("batch", var_combine=combine)
        model.bn(xl)
        prepare_for_eval(model, comm)
        x64 = xg.astype(np.float64)
        per_rank = x64.reshape(R, 4, C, 2, 3)
        np.testing.assert_allclose(model.bn.avg_mean, x64.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
        if combine == "corrected":
            expect = x64.var((0, 2, 3), ddof=1)  # the unbiased variance of the union
        else:
            expect = per_rank.var(axis=(1, 3, 4), ddof=1).mean(0)  # Akiba / AllreducePersistent
        np.testing.assert_allclose(model.bn.avg_var, expect, rtol=1e-5, err_msg=f"batch mode {combine}")
        if R > 1 and combine == "mean":
            union = x64.var((0, 2, 3), ddof=1)
            assert np.all(model.bn.avg_var < union), "shifted shards: the plain mean underestimates"
    assert n > 1


def check_recompute_and_running():
    K = 3
    rng = np.random.RandomState(5)
    batches = [rng.randn(R, 4, C, 2, 2).astype(np.float32) + k for k in range(K)]
    model = one_bn("recompute")
    report = prepare_for_eval(model, comm, batches=[b[r] for b in batches])
    assert report["recompute_batches"] == K
    allx = np.concatenate([b.reshape(-1, C, 2, 2) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(model.bn.avg_mean, allx.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn.avg_var, allx.var((0, 2, 3), ddof=1), rtol=1e-5)

    model = one_bn("running")
    for b in batches:
        model.bn(b[r])
    mean_r = model.bn.avg_mean.copy()
    prepare_for_eval(model, comm)
    expect = np.mean(comm.mpi_comm.allgather(mean_r), axis=0)
    np.testing.assert_allclose(model.bn.avg_mean, expect, rtol=1e-6, atol=1e-7)


def main(communicator):
    global comm, R, r
    comm, R, r = communicator, communicator.size, communicator.rank
    check_sync([3] * R)
    check_sync([2 + k for k in range(R)])  # unequal per-rank batches are exact too
    check_batch_mode()
    check_recompute_and_running()
    print(f"rank {r}/{R} bn ok")


if __name__ == "__main__":
    main(make_comm(sys.argv[1]))
