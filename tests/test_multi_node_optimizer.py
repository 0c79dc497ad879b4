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
    with pytest.raises(ValueError, match="double_buffering: true is not supported by communicator: FakeComm"):
        create_multi_node_optimizer(CorrectedMomentumSGD(), FakeComm(), double_buffering=True)


class ConfigurableComm(FakeComm):
    """Has hpcsgd's check_finite option (off, as on a bare communicator)."""

    def __init__(self):
        super().__init__()
        self.configs = {"check_finite": False}

    def set_config(self, name, value=True):
        self.configs[name] = value

    def get_config(self, name=None):
        return self.configs[name]


def test_optimizer_turns_on_check_finite():
    comm = ConfigurableComm()
    opt = create_multi_node_optimizer(CorrectedMomentumSGD(lr=0.1), comm)
    assert comm.configs["check_finite"] is True and opt._check_self is False
    opt = create_multi_node_optimizer(CorrectedMomentumSGD(lr=0.1), FakeComm())  # no such option
    assert opt._check_self is True


def _registered_as(module, cls):
    """A FakeComm whose class the registry takes for ``module.cls`` (no MPI, no CUDA needed)."""
    return type(cls, (ConfigurableComm,), {"__module__": module})()


def test_unsupported_combinations_raise_the_config_check_error():
    from hpcsgd.errors import ConfigError

    nccl = _registered_as("hpcsgd.comm.nccl", "NcclCommunicator")
    with pytest.raises(ConfigError, match="overlap: true is not supported by communicator: nccl"):
        create_multi_node_optimizer(CorrectedMomentumSGD(), nccl, overlap=True)
    with pytest.raises(ConfigError, match="communicator: nccl does not run with gpu: false"):
        create_multi_node_optimizer(CorrectedMomentumSGD(), nccl).setup(toy())  # NumPy model
    flat = _registered_as("hpcsgd.comm.flat", "FlatCommunicator")
    with pytest.raises(ConfigError, match="alternatives"):
        create_multi_node_optimizer(CorrectedMomentumSGD(), flat, overlap=True, double_buffering=True)
    create_multi_node_optimizer(CorrectedMomentumSGD(), flat, double_buffering=True).setup(toy())  # CPU: fine
    with pytest.raises(ConfigError, match="overlap: true is not supported by communicator: FakeComm"):
        create_multi_node_optimizer(CorrectedMomentumSGD(), FakeComm(), overlap=True)


@pytest.mark.mpi
@pytest.mark.parametrize("comm_name,n,env", mpi_cases())
def test_across_ranks_optimizer_and_bn(mpirun, comm_name, n, env):
    """One launch: tests/mpi/check_multi_node_optimizer.py, then tests/mpi/check_bn_sync.py (--bn)."""
    res = mpirun("tests/mpi/check_multi_node_optimizer.py", n, [comm_name, "--bn"], env=env, timeout=150)
    assert res.stdout.count("optimizer ok") == n
    assert res.stdout.count("bn ok") == n
