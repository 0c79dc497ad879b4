"""Ranks for tests/test_allreduce.py: every communicator x wire format against float64 NumPy.

One launch runs all checks (a launch costs 1-2 s). Each check raises
AssertionError naming the communicator, wire format and what differed.

Unused parameters: ``zero_fill`` (missing = zeros, every param gets the mean), a
parameter without a gradient on every rank (skipped, stays None), one missing on
some ranks only (zeros there, a warning, the mean everywhere), lazily initialised
parameters that never ran. Non-finite values: a bare communicator averages them
(ChainerMN) and reports ``nonfinite_count``; ``check_finite`` raises on every rank.

Tolerance (per element, ``n`` ranks, ``m = mean_i |g_i|``, ``u`` = unit roundoff
of the 16-bit format: 2^-11 float16, 2^-8 bfloat16):

* float32 wire: ``|got - ref| <= 4 (n + 2) 2^-24 m + 1e-30``: n-1 float32 additions
  and one scaling, each off by at most half an ulp of a partial sum <= n m;
* 16-bit wire: ``|got - ref| <= 2 u m + 2 u |ref| + (n + 2) 2^-25 + float32 terms``:
  each rank's ``g_i / n`` is rounded once to 16 bits (<= u |g_i| / n, or half the
  smallest float16 subnormal, 2^-25, in the subnormal range), the sum is
  accumulated in float32 and rounded once more (<= u |ref|). The hierarchical
  algorithm rounds node partial sums instead of single gradients, which the same
  bound covers since sum |partial| <= n m.
"""

from __future__ import annotations

import hashlib
import sys
import warnings

import chainer
import numpy as np
from mpi4py import MPI

import hpcsgd
from hpcsgd.errors import GradientOverflowError, NonFiniteGradientError, ParameterMismatchError

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
SHAPES = {"a/W": (33, 5), "a/b": (7,), "b/W": (17, 3, 3, 3), "c/b": (3,), "d/W": (1000,), "e/W": (64, 9)}
UNIT = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def make_model(shapes=SHAPES, skip_grad=()):
    link = chainer.Link()
    with link.init_scope():
        for name, shape in shapes.items():
            setattr(link, name.replace("/", "_"), chainer.Parameter(np.zeros(shape, np.float32)))
    return link


def fill(model, seed, scale=1.0, skip=()):
    """Random grads spanning 6 decades (incl. float16 subnormals); returns float64 copies by name."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in sorted(model.namedparams()):
        if name in skip:
            p.grad = None
            continue
        g = rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-4, 2, p.shape) * scale
        p.grad = g.astype(np.float32)
        out[name] = p.grad.astype(np.float64)
    return out


def reference(local: dict, zero_fill: bool, model=None):
    """float64 mean over ranks, and mean |g| (the tolerance scale).

    ``zero_fill``: every parameter of ``model`` takes part, missing grads count as zeros.
    """
    everyone = world.allgather(local)
    names = sorted(set().union(*everyone))
    shapes = {n: p.shape for n, p in model.namedparams()} if model is not None else {}
    if zero_fill:
        names = sorted(shapes)
    ref, mabs = {}, {}
    for n in names:
        shape = shapes.get(n) or next(d[n].shape for d in everyone if n in d)
        arrs = [d.get(n, np.zeros(shape)) for d in everyone]
        ref[n] = np.mean(arrs, axis=0)
        mabs[n] = np.mean(np.abs(arrs), axis=0)
    return ref, mabs


def tolerance(wire: str, ref, mabs):
    f32 = 4 * (size + 2) * UNIT["float32"] * mabs + 1e-30
    if wire == "float32":
        return f32
    u = UNIT[wire]
    sub = (size + 2) * 2.0 ** -25 if wire == "float16" else 1e-37
    return 2 * u * mabs + 2 * u * np.abs(ref) + sub + 2 * f32


def digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.namedparams()):
        h.update(name.encode())
        if p.grad is not None:
            h.update(np.ascontiguousarray(p.grad).tobytes())
    return h.hexdigest()


def check_mean(comm, label, wire, zero_fill=False, skip=(), seed=0, async_=False, warn=()):
    model = make_model()
    local = fill(model, seed=1000 * seed + rank, skip=skip)
    ref, mabs = reference(local, zero_fill, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if async_:
            comm.multi_node_mean_grad_async(model, zero_fill=zero_fill).wait()
        else:
            comm.multi_node_mean_grad(model, zero_fill=zero_fill)
    texts = [str(w.message) for w in caught if "without a gradient" in str(w.message)]
    if warn:  # on every rank: every rank sees the disagreement
        assert any(n in t for t in texts for n in warn), f"{label}: no warning naming {warn}: {texts}"
    else:
        assert not texts, f"{label}: unexpected warnings {texts}"
    assert comm.nonfinite_count == 0, f"{label}: nonfinite_count {comm.nonfinite_count} for finite grads"
    for name, p in sorted(model.namedparams()):
        if name not in ref:
            assert p.grad is None, f"{label}: {name} had no grad anywhere but got one"
            continue
        got = p.grad.astype(np.float64)
        err = np.abs(got - ref[name])
        tol = tolerance(wire, ref[name], mabs[name])
        worst = int(np.argmax(err - tol))
        assert (err <= tol).all(), (
            f"{label}: {name} off by {err.flat[worst]:.3g} > tol {tol.flat[worst]:.3g} "
            f"(got {got.flat[worst]!r}, ref {ref[name].flat[worst]!r})")
    digests = world.allgather(digest(model))
    assert len(set(digests)) == 1, f"{label}: results differ across ranks (not bitwise identical)"


def expect_error(comm, label, exc, words, make):
    model, zero_fill = make()
    try:
        with comm.config_scope("check_finite", True):
            comm.multi_node_mean_grad(model, zero_fill=zero_fill)
    except exc as e:
        msg = str(e)
        for w in words:
            assert w in msg, f"{label}: error message {msg!r} lacks {w!r}"
        return model
    except Exception as e:  # noqa: BLE001 - report what came instead
        raise AssertionError(f"{label}: expected {exc.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"{label}: expected {exc.__name__}, nothing raised")


def check_errors(comm, label, wire):
    low = wire != "float32"
    last = size - 1

    def mismatch_shape():
        shapes = dict(SHAPES)
        if rank == last:
            shapes["c/b"] = (4,)
        m = make_model(shapes)
        fill(m, rank)
        return m, False

    if size > 1:
        expect_error(comm, f"{label} shape", ParameterMismatchError, ["/c_b", "(4,)"], mismatch_shape)

    def nonfinite():
        m = make_model()
        fill(m, rank)
        if rank == 0:
            m.b_W.grad[1, 2, 0, 0] = np.inf if size == 1 else np.nan
        return m, False

    exc = GradientOverflowError if low else NonFiniteGradientError
    m = expect_error(comm, f"{label} nonfinite", exc, ["diverged"], nonfinite)
    assert not np.isfinite(m.b_W.grad[1, 2, 0, 0]), f"{label}: non-finite grads were not written back"
    assert np.isfinite(m.a_W.grad).all(), f"{label}: finite grads were not written back"
    # a bare communicator (check_finite off, ChainerMN) averages them and counts them
    m, _ = nonfinite()
    finite = {n: p.grad.astype(np.float64) for n, p in m.namedparams()}
    ref, mabs = reference(finite, False)
    comm.multi_node_mean_grad(m)
    assert comm.nonfinite_count == 1, f"{label}: nonfinite_count {comm.nonfinite_count}, expected 1"
    got = m.b_W.grad.astype(np.float64)
    bad = ~np.isfinite(ref["/b_W"])
    assert (~np.isfinite(got) == bad).all(), f"{label}: the non-finite value did not stay in its place"
    tol = tolerance(wire, ref["/b_W"][~bad], mabs["/b_W"][~bad])
    assert (np.abs(got[~bad] - ref["/b_W"][~bad]) <= tol).all(), f"{label}: finite values next to a nan"

    if wire == "float16":
        def overflow():  # 1e6 does not fit float16 even after dividing by the world size
            m = make_model()
            fill(m, rank)
            m.d_W.grad[:] = 1e6 * size
            return m, False

        with comm.config_scope("half_scaling", "predivide"):
            expect_error(comm, f"{label} overflow", GradientOverflowError, ["overflow"], overflow)
        # the default per-message scale carries it (not hierarchical's float16 *inside* nodes,
        # which still pre-divides)
        in_node_f16 = (type(comm).__name__ == "HierarchicalCommunicator" and comm.topology.uniform
                       and comm.intra_size > 1)  # the same on every rank
        if not in_node_f16:
            m, _ = overflow()
            comm.multi_node_mean_grad(m)
            assert np.allclose(m.d_W.grad, 1e6 * size, rtol=2 ** -10), f"{label}: scaled wire lost 1e6 * size"
        # 60000 per rank: the mean fits, and dividing *before* the cast keeps the sum finite
        m = make_model()
        fill(m, rank)
        m.d_W.grad[:] = 60000.0
        with comm.config_scope("check_finite", True):
            comm.multi_node_mean_grad(m)
        assert np.allclose(m.d_W.grad, 60000.0, rtol=2 ** -10), f"{label}: 60000 mean came back wrong"


def check_bucket_api(comm, label):
    """The engine driven by hand: buckets launched one by one on its worker thread."""
    model = make_model()
    local = fill(model, rank + 77)
    ref, _ = reference(local, False)
    reducer = comm.grad_reducer(model, zero_fill=False, threaded=True)
    assert reducer.n_buckets >= 2, f"{label}: expected several buckets, got {reducer.n_buckets}"
    names = set()
    for i in range(reducer.n_buckets):
        names.update(reducer.bucket_params(i))
        reducer.launch(i)
    assert names == set(ref), f"{label}: buckets cover {sorted(names)}"
    assert reducer.wait() == 0
    for name, p in sorted(model.namedparams()):
        assert np.allclose(p.grad, ref[name], rtol=1e-5, atol=1e-6), f"{label}: bucket API result for {name}"


def check_mixed_dtypes(comm, label):
    """float16 and float64 parameters travel through the float32 wire and come back in their dtype."""
    link = chainer.Link()
    with link.init_scope():
        link.h = chainer.Parameter(np.zeros((50,), np.float16))
        link.d = chainer.Parameter(np.zeros((3, 7), np.float64))
    rng = np.random.default_rng(rank + 5)
    link.h.grad = rng.standard_normal(50).astype(np.float16)
    link.d.grad = rng.standard_normal((3, 7))
    ref = {n: np.mean(g, 0) for n, g in zip(("h", "d"), zip(*world.allgather(
        (link.h.grad.astype(np.float64), link.d.grad.copy()))))}
    comm.multi_node_mean_grad(link)
    assert link.h.grad.dtype == np.float16 and link.d.grad.dtype == np.float64, f"{label}: dtypes changed"
    assert np.allclose(link.h.grad, ref["h"], rtol=2 ** -10, atol=2 ** -14), f"{label}: float16 param mean"
    assert np.allclose(link.d.grad, ref["d"], rtol=2 ** -21, atol=1e-7), f"{label}: float64 param mean"


def check_effective_config(comm, label):
    """get_config reports the wire dtypes in effect (ChainerMN returns numpy dtypes)."""
    inter_wire = np.float16 if comm.inter_size > 1 else np.float32
    assert comm.get_config("allreduce_grad_dtype") == inter_wire, f"{label}: allreduce_grad_dtype"
    assert comm.get_config("intra_dtype") == np.float32, label
    assert comm.get_config("inter_dtype") == np.float16, label
    assert comm.get_config()["allreduce_grad_dtype"] == inter_wire, label
    flat = hpcsgd.create_communicator("flat")
    assert flat.get_config("allreduce_grad_dtype") == np.float32, "flat's default wire is float32"
    flat.allreduce_grad_dtype = "float16"  # ChainerMN's attribute form
    assert flat.get_config("allreduce_grad_dtype") == np.float16, "attribute form"
    assert flat.get_config("intra_dtype") == np.float16, "attribute form"
    flat.finalize()
    assert comm.batched_copy is True, f"{label}: batched_copy attribute"
    sub = comm.split(0, comm.rank)  # the clone keeps the settings, not the effective values
    assert sub.get_config("intra_dtype") == np.float32, f"{label}: split made effective values settings"
    sub.finalize()


class _Lazy(chainer.Chain):
    """A used Linear and an auxiliary head: lazily initialised (never run), or run on some ranks."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.body = chainer.links.Linear(4, 3, initialW=np.full((3, 4), 0.5, np.float32))
            self.aux = chainer.links.Linear(None, 2)   # lazily initialised
            self.head = chainer.links.Linear(3, 2, initialW=np.full((2, 3), 0.25, np.float32))


def check_lazy_and_unused(comm, label, wire):
    tol = 2e-3 if wire == "float16" else 1e-6
    x = np.random.default_rng(rank).standard_normal((2, 4)).astype(np.float32)
    for cleared, zero_fill in [(c, z) for c in (False, True) for z in (False, True)]:
        model = _Lazy()  # without cleargrads Chainer raises on .grad of the uninitialised aux.W,
        if cleared:      # and every other grad is NaN (Chainer's fresh-parameter fill)
            model.cleargrads()
        h = model.body(x)
        chainer.functions.sum(model.head(h)).backward()
        mine = {n: p.grad.astype(np.float64) for n, p in model.namedparams()
                if p.array is not None and p.grad is not None}
        every = world.allgather(mine)
        comm.multi_node_mean_grad(model, zero_fill=zero_fill)
        what = f"{label} cleared={cleared} zero_fill={zero_fill}"
        # not cleared: every grad started as NaN and backward added to it: all NaN, averaged as such
        expect = 0 if cleared else sum(p.size for p in model.params() if p.array is not None)
        assert comm.nonfinite_count == expect, f"{what}: nonfinite_count {comm.nonfinite_count} != {expect}"
        for n, p in model.namedparams():
            if p.array is None:
                continue  # aux/W: uninitialised everywhere, takes no part
            if n == "/aux/b" and cleared and not zero_fill:
                assert p.grad is None, f"{what}: /aux/b unused everywhere must stay None"
                continue
            ref = np.mean([e.get(n, np.zeros(p.shape)) for e in every], axis=0)
            assert np.allclose(p.grad, ref, rtol=tol, atol=tol, equal_nan=True), f"{what}: {n}"
    # the auxiliary head runs on rank 0 only: NaN-initialised grads never leak, ranks agree
    model = _Lazy()
    model.aux(x)  # initialise everywhere (its grad becomes NaN, as Chainer does)
    model.cleargrads()
    loss = chainer.functions.sum(model.head(model.body(x)))
    if rank == 0:
        loss = loss + chainer.functions.sum(model.aux(x))
    loss.backward()
    mine = {n: p.grad.astype(np.float64) for n, p in model.namedparams() if p.grad is not None}
    every = world.allgather(mine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        comm.multi_node_mean_grad(model)
    for n, p in model.namedparams():
        ref = np.mean([e.get(n, np.zeros(p.shape)) for e in every], axis=0)
        assert np.allclose(p.grad, ref, rtol=tol, atol=tol), f"{label} aux on rank 0 only: {n}"
    assert comm.nonfinite_count == 0
    digests = world.allgather(digest(model))
    assert len(set(digests)) == 1, f"{label}: aux on rank 0 only: results differ across ranks"


def main():
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["naive", "flat", "hierarchical"]
    for name in names:
        for wire in ("float32", "float16", "bfloat16"):
            # hierarchical's allreduce_grad_dtype sets the wire between nodes only: name both
            # levels so its node stage is checked in every wire format too
            levels = {"intra_dtype": wire, "inter_dtype": wire} if name == "hierarchical" else {}
            comm = hpcsgd.create_communicator(name, allreduce_grad_dtype=wire, bucket_bytes=1536, **levels)
            label = f"{name}/{wire} n={size} nodes={comm.inter_size}x{comm.intra_size}"
            check_mean(comm, label, wire, seed=1)
            check_mean(comm, label + " zero_fill", wire, zero_fill=True, skip=("/a_b",) if rank == 0 else (),
                       seed=2)
            if wire == "bfloat16":  # same code paths as float16 from here on
                comm.finalize()
                continue
            check_mean(comm, label + " no grads anywhere", wire, zero_fill=False, skip=("/e_W",), seed=3)
            if size > 1:  # unused on the last rank only: zeros there, the mean everywhere, a warning
                check_mean(comm, label + " grad on some ranks only", wire, zero_fill=False,
                           skip=("/d_W",) if rank == size - 1 else (), seed=8, warn=("/d_W",))
            check_errors(comm, label, wire)
            if name != "naive" and wire == "float32":
                check_mixed_dtypes(comm, label + " mixed dtypes")
                check_mean(comm, label + " async", wire, seed=4, async_=True)
                check_bucket_api(comm, label)
            comm.finalize()
    # the default: hierarchical, float32 inside nodes, float16 between them
    comm = hpcsgd.create_communicator()
    label = f"default n={size} nodes={comm.inter_size}x{comm.intra_size}"
    wire = "float16" if comm.inter_size > 1 else "float32"
    check_mean(comm, label, wire, seed=5)
    check_mean(comm, label + " repeat (cached buffers)", wire, seed=6)
    comm.set_config("bucket_bytes", 4096)
    check_mean(comm, label + " after set_config", wire, seed=7)
    check_errors(comm, label, "float16" if comm.inter_size > 1 else "float32")
    check_effective_config(comm, label)
    check_lazy_and_unused(comm, label, wire)
    comm.finalize()
    print(f"rank {rank}: allreduce checks passed")


main()
