"""create_multi_node_optimizer: ChainerMN semantics, non-finite skip, accumulation, double buffering."""

from pathlib import Path

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

from hpcsgd.errors import GradientOverflowError
from hpcsgd.optim import CorrectedMomentumSGD, create_multi_node_optimizer

ROOT = Path(__file__).resolve().parent.parent


def mpi_cases():
    """(communicator, ranks, env) to launch, one launch each (a launch costs seconds):
    ChainerMN's naive communicator (the baseline) on 2 ranks; hpcsgd's 'flat' on 3 ranks (not a
    power of two) and 'hierarchical' on 4 ranks as 2 virtual nodes x 2, once they exist."""
    cases = [pytest.param("chainermn-naive", 2, None, id="chainermn-naive-n2")]
    if (ROOT / "hpcsgd" / "comm" / "flat.py").exists():
        cases.append(pytest.param("flat", 3, None, id="flat-n3"))
    if (ROOT / "hpcsgd" / "comm" / "hierarchical.py").exists():
        cases.append(pytest.param("hierarchical", 4, {"HPCSGD_RANKS_PER_NODE": "2"},
                                  id="hierarchical-n4-2nodes"))
    return cases


class FakeComm:
    """One rank; records calls; can fail the next mean with an overflow."""

    size, rank = 1, 0

    def __init__(self):
        self.calls = []
        self.fail_next = False

    def bcast_data(self, model):
        self.calls.append("bcast")

    def multi_node_mean_grad(self, model, zero_fill=False):
        self.calls.append("mean")
        if self.fail_next:
            self.fail_next = False
            for p in model.params():
                p.grad[...] = np.inf
            raise GradientOverflowError("float16 overflow", count=3)

    def get_config(self, name=None):
        return {"check_finite": True}[name]


def toy():
    m = chainer.Sequential(L.Linear(3, 2))
    return m


def loss_of(model):
    x = np.ones((2, 3), np.float32)
    return lambda: F.sum(model(x))


def test_setup_broadcasts_and_update_averages_then_updates():
    comm, model = FakeComm(), toy()
    opt = create_multi_node_optimizer(CorrectedMomentumSGD(lr=0.1), comm).setup(model)
    assert comm.calls == ["bcast"]
    opt.lr = 0.05  # forwarded to the wrapped optimizer
    assert opt.actual_optimizer.lr == 0.05
    assert opt.update(loss_of(model))
    assert comm.calls == ["bcast", "mean"] and opt.t == 1


def test_overflow_skips_update_on_every_rank():
    comm, model = FakeComm(), toy()
    opt = create_multi_node_optimizer(CorrectedMomentumSGD(lr=0.1), comm).setup(model)
    before = model[0].W.array.copy()
    comm.fail_next = True
    assert opt.update(loss_of(model)) is False
    assert opt.skipped_steps == 1 and opt.t == 0
    np.testing.assert_array_equal(model[0].W.array, before)
    assert opt.update(loss_of(model)) and np.isfinite(model[0].W.array).all()


def test_lazy_parameters_broadcast_before_first_update():
    comm = FakeComm()
    model = chainer.Sequential(L.Linear(None, 2))
    opt = create_multi_node_optimizer(CorrectedMomentumSGD(lr=0.1), comm).setup(model)
    assert comm.calls == []  # nothing initialized yet
    assert opt.update(loss_of(model)) is False  # broadcast, skip (grads were taken at other weights)
    assert comm.calls == ["bcast"]
    assert opt.update(loss_of(model))


def test_accumulation_applies_every_k_calls():
    comm, model = FakeComm(), toy()
    opt = create_multi_node_optimizer(CorrectedMomentumSGD(lr=0.1), comm, accumulation_steps=3).setup(model)
    done = [opt.update(loss_of(model)) for _ in range(6)]
    assert done == [False, False, True, False, False, True]
    with pytest.raises(ValueError, match="accumulation_steps"):
        create_multi_node_optimizer(CorrectedMomentumSGD(), comm, accumulation_steps=0)


def test_double_buffering_needs_async_communicator():
    with pytest.raises(ValueError, match="multi_node_mean_grad_async"):
        create_multi_node_optimizer(CorrectedMomentumSGD(), FakeComm(), double_buffering=True)


@pytest.mark.mpi
@pytest.mark.parametrize("comm_name,n,env", mpi_cases())
def test_across_ranks_optimizer_and_bn(mpirun, comm_name, n, env):
    """One launch: tests/mpi/check_multi_node_optimizer.py, then tests/mpi/check_bn_sync.py (--bn)."""
    res = mpirun("tests/mpi/check_multi_node_optimizer.py", n, [comm_name, "--bn"], env=env, timeout=150)
    assert res.stdout.count("optimizer ok") == n
    assert res.stdout.count("bn ok") == n
