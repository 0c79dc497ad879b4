"""Rank side of tests/test_multi_node_optimizer.py (argv: COMM_NAME [--bn]).

``--bn`` also runs the cross-rank BN checks of check_bn_sync.py in the same launch.

BN-free MLP, rank-dependent initial weights (so the broadcast from rank 0
matters). Every rank also runs the single-process reference on the
concatenated global batch (same data everywhere by seed) and compares.
"""

import sys

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from _comm_choice import make_comm

from hpcsgd.errors import NonFiniteGradientError
from hpcsgd.optim import (
    LARS,
    CorrectedMomentumSGD,
    RMSpropWarmup,
    apply_weight_decay,
    create_multi_node_optimizer,
)
from hpcsgd.runtime.trace import get_tracer

comm = make_comm(sys.argv[1])
R, r = comm.size, comm.rank
B_LOCAL, STEPS = 4, 4


class MLP(chainer.Chain):
    def __init__(self, seed):
        super().__init__()
        init = np.random.RandomState(seed)
        with self.init_scope():
            self.l1 = L.Linear(6, 8, initialW=init.randn(8, 6).astype(np.float32) * 0.5)
            self.l2 = L.Linear(8, 3, initialW=init.randn(3, 8).astype(np.float32) * 0.5,
                               initial_bias=init.randn(3).astype(np.float32))

    def forward(self, x):
        return self.l2(F.relu(self.l1(x)))


def data(step):
    rng = np.random.RandomState(1000 + step)
    x = rng.randn(B_LOCAL * R, 6).astype(np.float32)
    t = rng.randint(0, 3, B_LOCAL * R).astype(np.int32)
    return x, t


def local(arr):
    return arr[r * B_LOCAL:(r + 1) * B_LOCAL]


def make_opt(kind):
    if kind == "momentum":
        return CorrectedMomentumSGD(lr=0.1, momentum=0.9, nesterov=True)
    if kind == "lars":
        return LARS(lr=2.0, momentum=0.9, weight_decay=1e-3)
    return RMSpropWarmup(lr=0.5, alpha_sgd=0.3)


LRS = [0.1, 0.1, 0.01, 0.01]


def setup(opt, model, kind):
    opt.setup(model)
    if kind == "momentum":
        apply_weight_decay(opt, 1e-3)
    return opt


def reference(kind, stale=False):
    model = MLP(seed=0)
    opt = setup(make_opt(kind), model, kind)
    pending = None
    for step in range(STEPS):
        x, t = data(step)
        model.cleargrads()
        F.softmax_cross_entropy(model(x), t).backward()
        if kind == "momentum":
            opt.lr = LRS[step]
        if stale:
            grads = {n: p.grad.copy() for n, p in model.namedparams()}
            if pending is not None:
                for n, p in model.namedparams():
                    p.grad = pending[n]
                opt.update()
            pending = grads
        else:
            opt.update()
    return {n: p.array.copy() for n, p in model.namedparams()}


def assert_same_everywhere(model, what):
    mine = {n: p.array for n, p in model.namedparams()}
    for k, other in enumerate(comm.mpi_comm.allgather(mine)):
        for n in mine:
            assert np.array_equal(other[n], mine[n]), f"{what}: {n} differs between rank {r} and rank {k}"


def assert_close(model, ref, what):
    for n, p in model.namedparams():
        np.testing.assert_allclose(p.array, ref[n], rtol=2e-5, atol=2e-6, err_msg=f"{what}: {n}")


def run(kind, mode="plain"):
    model = MLP(seed=r)  # different on every rank until the broadcast
    opt = create_multi_node_optimizer(make_opt(kind), comm)
    setup(opt, model, kind)
    for step in range(STEPS):
        x, t = data(step)
        xl, tl = local(x), local(t)
        if kind == "momentum":
            opt.lr = LRS[step]
        if mode == "plain":
            applied = opt.update(F.softmax_cross_entropy, model(xl), tl)
            assert applied
        elif mode == "accumulate_manual":  # the training loop's form: k backward passes, one update
            model.cleargrads()
            for half in (slice(0, 2), slice(2, 4)):
                (F.softmax_cross_entropy(model(xl[half]), tl[half]) / 2).backward()
            assert opt.update()
    assert_same_everywhere(model, f"{kind}/{mode}")
    assert_close(model, reference(kind), f"{kind}/{mode} vs single process")


def run_accumulate_lossfun():
    model = MLP(seed=r)
    opt = create_multi_node_optimizer(make_opt("momentum"), comm, accumulation_steps=2)
    setup(opt, model, "momentum")
    for step in range(STEPS):
        x, t = data(step)
        xl, tl = local(x), local(t)
        opt.lr = LRS[step]
        assert opt.update(F.softmax_cross_entropy, model(xl[:2]), tl[:2]) is False
        assert opt.update(F.softmax_cross_entropy, model(xl[2:]), tl[2:])
    assert_close(model, reference("momentum"), "accumulation_steps=2")


def run_chainermn_optimizer_over_hpcsgd():
    """ChainerMN's own multi-node optimizer around a bare hpcsgd communicator (check_finite off):
    the same parameters as hpcsgd's optimizer; a NaN gradient is averaged, counted, never raised."""
    import chainermn

    fresh = make_comm(sys.argv[1])
    assert fresh.get_config("check_finite") is False, "a bare communicator must not raise on NaN"
    models = []
    for make in (chainermn.create_multi_node_optimizer, create_multi_node_optimizer):
        model = MLP(seed=r)
        opt = make(chainer.optimizers.SGD(lr=0.1), fresh if make is chainermn.create_multi_node_optimizer
                   else comm)
        opt.setup(model)
        # ChainerMN's first update only broadcasts the weights (its parameter set "changed")
        for step in range(0 if make is chainermn.create_multi_node_optimizer else 1, 3):
            x, t = data(step)
            opt.update(F.softmax_cross_entropy, model(local(x)), local(t))
        models.append(model)
    for (n, p), (_, q) in zip(sorted(models[0].namedparams()), sorted(models[1].namedparams())):
        np.testing.assert_allclose(p.array, q.array, rtol=1e-5, atol=1e-6, err_msg=f"chainermn opt: {n}")
    assert_same_everywhere(models[0], "chainermn optimizer over hpcsgd")
    model = models[0]
    model.cleargrads()
    x, t = data(3)
    F.softmax_cross_entropy(model(local(x)), local(t)).backward()
    if r == R - 1:
        model.l1.W.grad[0, 0] = np.nan
    fresh.multi_node_mean_grad(model)  # what ChainerMN's optimizer calls: no exception
    assert fresh.nonfinite_count == 1 and np.isnan(model.l1.W.grad[0, 0]), fresh.nonfinite_count
    fresh.finalize()


def run_nonfinite_skip():
    model = MLP(seed=r)
    opt = create_multi_node_optimizer(make_opt("momentum"), comm)
    setup(opt, model, "momentum")
    before = {n: p.array.copy() for n, p in model.namedparams()}
    x, t = data(0)
    model.cleargrads()
    F.softmax_cross_entropy(model(local(x)), local(t)).backward()
    if r == R - 1:
        model.l1.W.grad[0, 0] = np.nan
    try:
        applied = opt.update()
    except NonFiniteGradientError as e:  # must never escape the optimizer
        raise AssertionError(f"NonFiniteGradientError escaped: {e}") from e
    assert not applied and opt.skipped_steps == 1, (applied, opt.skipped_steps)
    for n, p in model.namedparams():
        assert np.array_equal(p.array, before[n]), f"{n} changed by a skipped step"
    assert opt.t == 0
    x, t = data(1)
    assert opt.update(lambda: F.softmax_cross_entropy(model(local(x)), local(t)))
    assert all(np.isfinite(p.array).all() for p in model.params())


class AsyncAdapter:
    """Gives a communicator without multi_node_mean_grad_async one (reduces at wait())."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def multi_node_mean_grad_async(self, model, zero_fill=False):
        inner = self._inner

        class Handle:
            def wait(self):
                inner.multi_node_mean_grad(model, zero_fill)

        return Handle()


def run_double_buffering():
    c = comm if hasattr(comm, "multi_node_mean_grad_async") else AsyncAdapter(comm)
    model = MLP(seed=r)
    opt = create_multi_node_optimizer(make_opt("lars"), c, double_buffering=True)
    setup(opt, model, "lars")
    applied = []
    for step in range(STEPS):
        x, t = data(step)
        applied.append(opt.update(F.softmax_cross_entropy, model(local(x)), local(t)))
    opt.finalize()
    assert applied == [False] + [True] * (STEPS - 1), applied
    assert_same_everywhere(model, "double buffering")
    assert_close(model, reference("lars", stale=True), "double buffering vs stale single process")


def run_overlap():
    """overlap=True: buckets reduced during backward (the training loop's manual form with
    gradient accumulation); same result as the single-process reference, identical on all ranks."""
    model = MLP(seed=r)
    opt = create_multi_node_optimizer(make_opt("momentum"), comm, overlap=True, bucket_bytes=64)
    setup(opt, model, "momentum")
    for step in range(STEPS):
        x, t = data(step)
        xl, tl = local(x), local(t)
        opt.lr = LRS[step]
        model.cleargrads()
        for i, half in enumerate((slice(0, 2), slice(2, 4))):
            with opt.backward_scope(last=i == 1):
                (F.softmax_cross_entropy(model(xl[half]), tl[half]) / 2).backward()
        assert opt.update()
    opt.finalize()
    assert_same_everywhere(model, "overlap")
    tol = dict(rtol=2e-3, atol=2e-4) if comm.get_config("inter_dtype") in ("float16", "bfloat16") \
        and comm.inter_size > 1 else dict(rtol=2e-5, atol=2e-6)
    ref = reference("momentum")
    for n, p in model.namedparams():
        np.testing.assert_allclose(p.array, ref[n], err_msg=f"overlap: {n}", **tol)


tracer = get_tracer()
tracer.start_iteration(0)
for kind in ("momentum", "lars", "rmsprop"):
    run(kind)
assert tracer.phase_seconds.get("update", 0.0) > 0.0, "update phase not traced"
run("momentum", "accumulate_manual")
run_accumulate_lossfun()
run_nonfinite_skip()
run_double_buffering()
if not sys.argv[1].startswith("chainermn"):
    run_overlap()
    run_chainermn_optimizer_over_hpcsgd()
print(f"rank {r}/{R} optimizer ok")
if "--bn" in sys.argv[2:]:
    import check_bn_sync

    check_bn_sync.main(comm)
