"""hpcsgd.kernels.enable()/threads: the switch, its idempotence, a small network end to end."""

from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L
import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info

import hpcsgd.kernels as kernels
from hpcsgd.errors import ConfigError
from hpcsgd.kernels.threads import default_threads, set_threads
from hpcsgd.models import ops


@pytest.fixture
def restore_ops():
    saved = dict(ops.CPU_IMPL)
    yield
    ops.CPU_IMPL.clear()
    ops.CPU_IMPL.update(saved)


def test_enable_swaps_and_is_idempotent(restore_ops):
    kernels.enable(False)
    assert not kernels.enabled() and ops.CPU_IMPL == ops.CHAINER_IMPL
    assert kernels.enable() is True
    first = dict(ops.CPU_IMPL)
    assert kernels.enable() is True and ops.CPU_IMPL == first
    assert all(ops.CPU_IMPL[k] is not ops.CHAINER_IMPL[k] for k in ops.CHAINER_IMPL)
    assert kernels.enable(False) is False and ops.CPU_IMPL == ops.CHAINER_IMPL


class _TinyResNet(chainer.Chain):
    """Stem 7x7/2 + BN-ReLU, a bottleneck (1x1, 3x3/2, 1x1) with a 1x1/2 projection, add-ReLU, FC."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            init = chainer.initializers.HeNormal()
            self.stem = L.Convolution2D(3, 4, 7, initialW=init, nobias=True)
            self.a = L.Convolution2D(4, 3, 1, initialW=init, nobias=True)
            self.b = L.Convolution2D(3, 3, 3, initialW=init, nobias=True)
            self.c = L.Convolution2D(3, 8, 1, initialW=init, nobias=True)
            self.s = L.Convolution2D(4, 8, 1, initialW=init, nobias=True)
            self.bns = chainer.ChainList(*[L.BatchNormalization(c) for c in (4, 3, 3, 8, 8)])
            self.fc = L.Linear(8, 5)

    def forward(self, x):
        def cbr(conv, bn, h, stride, pad, relu=True):
            h = ops.conv2d(h, conv.W, None, stride, pad)
            return ops.batch_norm(h, bn.gamma, bn.beta, 1e-5, relu)[0]

        h = cbr(self.stem, self.bns[0], x, 2, 3)
        r = cbr(self.a, self.bns[1], h, 1, 0)
        r = cbr(self.b, self.bns[2], r, 2, 1)
        r = cbr(self.c, self.bns[3], r, 1, 0, relu=False)
        s = cbr(self.s, self.bns[4], h, 2, 0, relu=False)
        h = ops.add_relu(r, s)
        return self.fc(F.mean(h, axis=(2, 3)))


def _loss_and_grads(model, x, t):
    model.cleargrads()
    loss = F.softmax_cross_entropy(model(x), t)
    loss.backward()
    return float(loss.array), {name: p.grad.copy() for name, p in model.namedparams()}


def test_network_same_loss_and_grads_with_and_without_kernels(restore_ops):
    rng = np.random.default_rng(0)
    model = _TinyResNet()
    x = rng.standard_normal((3, 3, 17, 15)).astype(np.float32)
    t = rng.integers(0, 5, 3).astype(np.int32)
    kernels.enable(False)
    ref_loss, ref = _loss_and_grads(model, x, t)
    kernels.enable(True)
    loss, got = _loss_and_grads(model, x, t)
    assert abs(loss - ref_loss) < 1e-5
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-3, atol=1e-4, err_msg=name)


def test_set_threads_applies_to_blas_and_numba(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # set_threads would set it; keep the env as found
    before_numba = numba.get_num_threads()
    before_blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    try:
        assert set_threads(1) == 1
        assert numba.get_num_threads() == 1
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
        cap = numba.config.NUMBA_NUM_THREADS
        assert set_threads(cap + 3) == cap  # numba's pool is capped; BLAS takes the request
        assert kernels.current_threads()["requested"] == cap + 3
    finally:
        numba.set_num_threads(before_numba)
        if before_blas:
            set_threads(before_blas[0])
        numba.set_num_threads(before_numba)
    with pytest.raises(ValueError):
        set_threads(0)


def test_default_threads_from_environment():
    assert default_threads({"HPCSGD_THREADS": "3", "OMP_NUM_THREADS": "5"}) == 3
    assert default_threads({"OMP_NUM_THREADS": "5"}) == 5
    cores = default_threads({})
    assert cores >= 1
    assert default_threads({"MPI_LOCALNRANKS": str(cores * 2)}) == 1
    with pytest.raises(ConfigError, match="HPCSGD_THREADS"):
        default_threads({"HPCSGD_THREADS": "two"})
    with pytest.raises(ConfigError, match=">= 1"):
        default_threads({"OMP_NUM_THREADS": "0"})


def test_keep_freed_memory_opt_out_and_effect():
    import subprocess
    import sys

    from hpcsgd.kernels.memory import keep_freed_memory

    assert keep_freed_memory({"HPCSGD_KEEP_FREED_MEMORY": "0"}) is False
    # In a fresh process: after the call, re-allocating a freed 64 MiB block costs no page faults.
    code = (
        "import resource, sys, numpy as np\n"
        "from hpcsgd.kernels.memory import keep_freed_memory\n"
        "def faults():\n"
        "    a = np.ones(16 * 2**20, np.float32); del a\n"
        "    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    a = np.ones(16 * 2**20, np.float32); del a\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0\n"
        "before = faults()\n"
        "if not keep_freed_memory(): sys.exit(0)\n"
        "faults()\n"
        "after = faults()\n"
        "assert after < before / 10, (before, after)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_small_resnet_forked_joins_bitwise_unchanged(restore_ops):
    """ResNet-8's forking joins (the next block's branches' gradients summed in the join's backward)
    give bitwise the loss and gradients of the same model with every join unforked."""
    from hpcsgd.models import build_model

    kernels.enable(True)
    rng = np.random.default_rng(5)
    np.random.seed(0)
    model = build_model("resnet_small", 10, in_channels=1, depth=14, width=4)
    x = rng.standard_normal((6, 1, 12, 12)).astype(np.float32)
    t = rng.integers(0, 10, 6).astype(np.int32)
    forks = [b for stage in (model.stage1, model.stage2, model.stage3) for b in stage if b.fork_output]
    assert len(forks) == 5  # 2 blocks per stage: within each stage, and stage1 -> 2 -> 3
    loss, got = _loss_and_grads(model, x, t)
    for b in forks:
        b.fork_output = False
    ref_loss, ref = _loss_and_grads(model, x, t)
    assert loss == ref_loss
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
