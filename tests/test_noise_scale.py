"""The gradient noise scale: estimator on an analytic problem, per-micro-batch norms, EMA of ratios.

Analytic reference: linear regression y = x . w* + eps with x ~ N(0, I_d), eps ~ N(0, s^2),
per-example loss (x . w - y)^2 / 2 at w = w* + delta. The per-example gradient is
g = x (x . delta - eps), so G = E[g] = delta and, by Isserlis' theorem,
E[g g^T] = (|delta|^2 + s^2) I + 2 delta delta^T, hence
|G|^2 = |delta|^2 and tr(Sigma) = d (|delta|^2 + s^2) + |delta|^2.
"""

import contextlib

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

from hpcsgd.runtime.trace import get_tracer
from hpcsgd.train.loop import accumulate_gradients
from hpcsgd.train.noise_scale import DriverLocalNorms, NoiseScale, estimate, ratio, sq_norm

D, S2 = 10, 1.0
DELTA = np.full(D, 0.3)
G2_TRUE = float(DELTA @ DELTA)                       # 0.9
TRACE_TRUE = D * (G2_TRUE + S2) + G2_TRUE            # 19.9, B_noise = 22.1
TOL = 0.05  # relative; standard errors of these seeded estimates: 0.8% (|G|^2), 0.4% (tr)


def linear_gaussian_norms(steps, micro, b, seed=0):
    """Per step: mean over micro-batches of |g_micro|^2, and |mean of the micro-batch gradients|^2."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((steps, micro, b, D))
    eps = rng.standard_normal((steps, micro, b)) * np.sqrt(S2)
    g = x * (x @ DELTA - eps)[..., None]                  # per-example gradients
    g_micro = g.mean(axis=2)                              # (steps, micro, D)
    small = (g_micro ** 2).sum(-1).mean(-1)
    big = (g_micro.mean(axis=1) ** 2).sum(-1)
    return small, big


def within_tolerance(est, small, big, b, big_b):
    g2, tr = est(small.mean(), big.mean(), b, big_b)
    return abs(g2 / G2_TRUE - 1) < TOL and abs(tr / TRACE_TRUE - 1) < TOL


def test_estimator_recovers_the_analytic_trace_and_gradient_norm():
    small, big = linear_gaussian_norms(steps=4000, micro=8, b=8)
    g2, tr = estimate(small.mean(), big.mean(), 8, 64)
    assert g2 == pytest.approx(G2_TRUE, rel=TOL)
    assert tr == pytest.approx(TRACE_TRUE, rel=TOL)
    assert ratio(tr, g2) == pytest.approx(TRACE_TRUE / G2_TRUE, rel=2 * TOL)


@pytest.mark.parametrize("broken", [
    lambda s, g, b, B: (g, (s - g) / (1 / b - 1 / B)),                      # |G_big|^2 taken as |G|^2
    lambda s, g, b, B: estimate(s, g, B / 2, B),                            # wrong B_small
    lambda s, g, b, B: ((B * g - b * s) / (B - b), b * s),                  # tr(Sigma) ~ b |G_small|^2
    lambda s, g, b, B: ((B * s - b * g) / (B - b), (g - s) / (1 / b - 1 / B)),  # sizes swapped
])
def test_the_analytic_check_rejects_broken_formulas(broken):
    """The tolerance above discriminates: common mistakes land outside it on the same data."""
    small, big = linear_gaussian_norms(steps=4000, micro=8, b=8)
    assert within_tolerance(estimate, small, big, 8, 64)
    assert not within_tolerance(broken, small, big, 8, 64)


def test_estimate_rejects_bad_batch_sizes():
    with pytest.raises(ValueError, match="b_small < b_big"):
        estimate(1.0, 1.0, 64, 64)
    assert ratio(5.0, -0.1) is None and ratio(5.0, 0.0) is None


class NoComm:
    def backward_scope(self, last):
        return contextlib.nullcontext()


class Local:
    """A stand-in local-norm source with prescribed values."""

    def __init__(self):
        self.value = None

    def take(self):
        return (self.value, 1) if self.value is not None else (0.0, 0)


class OneRank:
    """mpi_comm stand-in for one rank (Allreduce copies)."""

    def Allreduce(self, a, b):
        b[...] = a

    def Get_size(self):
        return 1


def test_driver_norms_and_hook_on_the_linear_gaussian_model():
    """Through the driver's code path: accumulate_gradients, per-micro-batch differences, pre-update hook."""
    rng = np.random.default_rng(1)
    w_star = rng.standard_normal(D)
    model = L.Linear(D, 1, nobias=True, initialW=(w_star + DELTA)[None, :])
    model.W.array = model.W.array.astype(np.float64)
    opt = chainer.optimizers.SGD(lr=0.0)
    opt.setup(model)
    micro, b, steps = 4, 8, 600
    noise = NoiseScale(b, micro * b, DriverLocalNorms(model), decay=0.99)
    opt.add_hook(noise.big_hook, name="noise_scale", timing="pre")

    def stream():
        while True:
            x = rng.standard_normal((b, D))
            yield x, (x @ w_star + rng.standard_normal(b) * np.sqrt(S2))[:, None]

    def loss_fn(y, t):
        return 0.5 * F.mean_squared_error(y, t)

    it = stream()
    for _ in range(steps):
        accumulate_gradients(model, it, micro, NoComm(), get_tracer(), loss_fn,
                             after_backward=noise.local.after_backward)
        opt.update()
        noise.end_step()
    rec = noise.aggregate(OneRank())  # 600 steps: s.d. 3.3% (|G|^2) and 1.7% (tr), so 4.5 and 6 s.d.
    assert rec["raw_steps"] == steps and rec["b_small"] == b and rec["b_big"] == micro * b
    assert rec["grad_sq_raw"] == pytest.approx(G2_TRUE, rel=0.15)
    assert rec["trace_sigma_raw"] == pytest.approx(TRACE_TRUE, rel=0.1)


def small_net():
    np.random.seed(3)

    class Net(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.l1 = L.Linear(6, 16)
                self.l2 = L.Linear(16, 4)

        def forward(self, x):
            return self.l2(F.relu(self.l1(x)))

    return Net()


@pytest.mark.parametrize("accum, skip_last", [(1, False), (3, False), (3, True)])
def test_per_micro_batch_norms_equal_separate_backward_passes(accum, skip_last):
    """Reference: each micro-batch's gradient from its own backward pass, in float64."""
    model = small_net()
    rng = np.random.default_rng(4)
    batches = [(rng.standard_normal((5, 6)).astype(np.float32), rng.integers(0, 4, 5).astype(np.int32))
               for _ in range(accum)]
    ref = []
    for x, t in batches:
        model.cleargrads()
        F.softmax_cross_entropy(model(x), t).backward()
        ref.append(sum(float(np.sum(p.grad.astype(np.float64) ** 2)) for p in model.params()))
    local = DriverLocalNorms(model, skip_last=skip_last)
    accumulate_gradients(model, iter(batches), accum, NoComm(), get_tracer(),
                         after_backward=local.after_backward)
    total, n = local.take()
    measured = ref[:-1] if skip_last else ref
    assert n == len(measured)
    assert total == pytest.approx(sum(measured), rel=1e-5)
    assert local.take() == (0.0, 0)  # reset for the next step


def test_sq_norm_kernels_agree_with_float64():
    rng = np.random.default_rng(5)
    a = [rng.standard_normal(n).astype(np.float32) for n in (7, 40000, 100)]
    p = [rng.standard_normal(x.size).astype(np.float32) for x in a]
    want = sum(float(np.sum(x.astype(np.float64) ** 2)) for x in a)
    assert sq_norm(a) == pytest.approx(want, rel=1e-12)
    want_d = sum(float(np.sum((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, p))
    assert sq_norm(a, p) == pytest.approx(want_d, rel=1e-12)


def test_smoothed_value_is_the_ratio_of_smoothed_estimates_not_a_smoothed_ratio():
    """Per-step |G|^2 estimates near zero make per-step ratios explode; the EMAs must be taken first."""
    b, big_b, decay = 4, 16, 0.9
    rng = np.random.default_rng(6)
    local = Local()
    noise = NoiseScale(b, big_b, local, decay=decay)
    smalls, bigs = [], []
    for _ in range(50):
        g2, tr = 1.0 + rng.normal(0, 0.8), 30.0 + rng.normal(0, 3.0)  # per-step estimates, some g2 ~ 0
        small, big = g2 + tr / b, g2 + tr / big_b                      # the norms that produce them
        local.value = small
        noise._big = big  # what the optimizer hook would have stored
        noise.end_step()
        smalls.append(small)
        bigs.append(big)
    rec = noise.aggregate(OneRank())
    w = np.array([(1 - decay) * decay ** k for k in range(49, -1, -1)])  # float64 reference EMA weights
    es, eb = w @ smalls / w.sum(), w @ bigs / w.sum()
    g2_ref = (big_b * eb - b * es) / (big_b - b)
    tr_ref = (es - eb) / (1 / b - 1 / big_b)
    assert rec["b_noise"] == pytest.approx(tr_ref / g2_ref, rel=1e-9)
    per_step = [estimate(s, g, b, big_b) for s, g in zip(smalls, bigs)]
    ema_of_ratios = w @ np.array([t / g for g, t in per_step]) / w.sum()
    assert abs(ema_of_ratios / rec["b_noise"] - 1) > 0.2, "the data must expose the pitfall"


def test_rank_mean_of_local_emas_equals_the_ema_of_rank_means():
    """Why no per-step collective is needed: the EMA and the estimators are linear."""
    b, big_b = 4, 16
    locals_ = [Local(), Local()]
    ranks = [NoiseScale(b, big_b, loc, decay=0.95) for loc in locals_]
    pooled_local = Local()
    pooled = NoiseScale(b, big_b, pooled_local, decay=0.95)
    rng = np.random.default_rng(7)
    for _ in range(30):
        s = rng.uniform(5, 10, size=2)
        big = rng.uniform(1, 3)
        for r, loc, v in zip(ranks, locals_, s):
            loc.value, r._big = v, big
            r.end_step()
        pooled_local.value, pooled._big = s.mean(), big
        pooled.end_step()

    class TwoRanks:
        def __init__(self, other):
            self.other = other

        def Allreduce(self, a, out):
            out[...] = a + self.other

        def Get_size(self):
            return 2

    other = np.array([ranks[1].ema_small.get(), ranks[1].int_small, float(ranks[1].int_n)])
    got = ranks[0].aggregate(TwoRanks(other))
    want = pooled.aggregate(OneRank())
    for key in ("b_noise", "grad_sq", "trace_sigma", "b_noise_raw"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key


def test_double_buffering_pairs_the_applied_gradient_with_its_own_step():
    local = Local()
    noise = NoiseScale(4, 16, local, decay=0.5, lag=1)
    local.value = 10.0
    noise.end_step()          # step 0: no update applied yet
    assert noise.steps == 0
    local.value, noise._big = 20.0, 3.0
    noise.end_step()          # step 1 applies step 0's averaged gradient: paired with 10.0
    assert noise.steps == 1 and noise.int_small == 10.0 and noise.int_big == 3.0


def test_in_place_accumulation_is_refused_and_untouched_gradients_add_zero():
    model = small_net()
    x, t = np.ones((2, 6), np.float32), np.zeros(2, np.int32)
    model.cleargrads()  # Chainer fills a new link's gradients with NaN
    F.softmax_cross_entropy(model(x), t).backward()
    local = DriverLocalNorms(model)
    local.after_backward(0, 2)
    with pytest.raises(RuntimeError, match="accumulated in place"):
        local.after_backward(1, 2)  # no backward in between: every gradient is the same array
    local = DriverLocalNorms(model)
    local.after_backward(0, 3)
    first = local._sum
    model.l1.W.grad = model.l1.W.grad * 3.0  # only l1.W gets a new contribution (2x its old value)
    local.after_backward(1, 3)
    want = float(np.sum((2.0 * model.l1.W.grad.astype(np.float64) / 3.0) ** 2)) * 9
    assert local._sum - first == pytest.approx(want, rel=1e-5)


def test_curves_plot_b_noise_smoothed_and_raw_skipping_unresolved_records():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpcsgd.train.metrics import plot_noise_scale

    recs = [{"epoch": 0.5, "b_noise": 100.0, "b_noise_raw": 90.0},
            {"epoch": 1.0, "b_noise": None, "b_noise_raw": -5.0},
            {"epoch": 1.5, "b_noise": 200.0, "b_noise_raw": 250.0}]
    fig, ax = plt.subplots()
    plot_noise_scale(ax, recs)
    raw, smooth = ax.get_lines()
    assert list(raw.get_xdata()) == [0.5, 1.5] and list(raw.get_ydata()) == [90.0, 250.0]
    assert list(smooth.get_xdata()) == [0.5, 1.5] and list(smooth.get_ydata()) == [100.0, 200.0]
    assert ax.get_yscale() == "log"
    plt.close(fig)
