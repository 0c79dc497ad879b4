"""Rank-side checks of the CommunicatorBase interface (run by tests/test_comm_interface.py).

Usage: check_comm_interface.py NAME [NAME ...]
NAME is 'base' (MpiCommunicatorBase through a minimal subclass defined here), a
registered communicator name, or 'all' (base plus every registered communicator
whose module exists). Every check compares against a NumPy reference computed
independently on each rank from the other ranks' (deterministic) inputs.
"""

from __future__ import annotations

import importlib.util
import sys

import chainer
import chainer.links as L
import numpy as np
from mpi4py import MPI

from hpcsgd.comm import COMMUNICATORS, create_communicator
from hpcsgd.comm.mpi_base import MpiCommunicatorBase
from hpcsgd.errors import ConfigError, ParameterMismatchError
from hpcsgd.runtime import watchdog


class MinimalCommunicator(MpiCommunicatorBase):
    """The smallest concrete communicator: per-parameter mean through ``_multi_node_mean``."""

    def multi_node_mean_grad(self, model, zero_fill=False):
        self.check_params_consistent(model, include_grad=not zero_fill)
        for _, p in sorted(model.namedparams()):
            if p.grad is None and zero_fill and p.array is not None:
                p.grad = p.xp.zeros_like(p.array)
            if p.grad is not None:
                self._multi_node_mean(None, p.grad)


def make(name):
    return MinimalCommunicator() if name == "base" else create_communicator(name)


def data(r, shape, dtype, salt=0):
    """Rank ``r``'s deterministic input (integer-valued, so sums are exact in any order)."""
    rng = np.random.default_rng(1000 * r + salt)
    if np.dtype(dtype) == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    return rng.integers(-8, 9, size=shape).astype(dtype)


def expect_raise(exc, fn, *args, contains=()):
    try:
        fn(*args)
    except exc as e:
        for text in contains:
            assert text in str(e), f"{exc.__name__} message {str(e)!r} lacks {text!r}"
        return e
    raise AssertionError(f"{getattr(fn, '__name__', fn)} did not raise {exc.__name__}")


class Chain(chainer.Chain):
    def __init__(self, sizes, seed):
        super().__init__()
        with self.init_scope():
            for i, (a, b) in enumerate(sizes):
                rng = np.random.default_rng(100 * seed + i)
                setattr(self, f"l{i}", L.Linear(a, b, initialW=rng.standard_normal((b, a)).astype(np.float32),
                                                initial_bias=rng.standard_normal(b).astype(np.float32)))


def check_ranks(comm, world):
    assert comm.rank == world.rank and comm.size == world.size, (comm.rank, comm.size)
    places = world.allgather((comm.inter_rank, comm.intra_rank))
    assert len(set(places)) == world.size, f"duplicate (inter_rank, intra_rank): {places}"
    assert comm.inter_size * comm.intra_size == world.size or not comm.topology.uniform
    assert comm.topology is not None and comm.mpi_comm.Get_size() == world.size
    assert comm.mpi_comm != world, "the communicator must work on a duplicate of mpi_comm"


def check_bcast(comm):
    cases = [((5, 3), np.float32), ((7,), np.float16), ((2, 2, 2), np.int64), ((4,), np.bool_),
             ((), np.float64), ((0, 3), np.float32)]
    for root in {0, comm.size - 1}:
        for k, (shape, dt) in enumerate(cases):
            ref = data(root, shape, dt, salt=k)
            got = comm.bcast(ref if comm.rank == root else None, root=root)
            assert got.dtype == np.dtype(dt) and got.shape == shape, (got.dtype, got.shape)
            assert np.array_equal(got, ref), f"bcast root={root} {dt} {shape}"
    # non-contiguous input at the root
    base = data(0, (6, 4), np.float32)
    got = comm.bcast(base[:, ::2] if comm.rank == 0 else None)
    assert np.array_equal(got, base[:, ::2])
    expect_raise(TypeError, comm.bcast, (base, base) if comm.rank == 0 else None, contains=("tuple",))


def check_gather_family(comm):
    for dt in (np.float32, np.float16, np.int32):
        shape_of = lambda r: (r + 1, 3)  # shapes differ per rank (Gatherv)
        mine = data(comm.rank, shape_of(comm.rank), dt)
        refs = [data(r, shape_of(r), dt) for r in range(comm.size)]
        for root in {0, comm.size - 1}:
            got = comm.gather(mine, root=root)
            if comm.rank == root:
                assert isinstance(got, tuple) and len(got) == comm.size
                for r in range(comm.size):
                    assert got[r].dtype == np.dtype(dt) and np.array_equal(got[r], refs[r]), (dt, r)
            else:
                assert got is None
        got = comm.allgather(mine)
        assert len(got) == comm.size and all(np.array_equal(g, ref) for g, ref in zip(got, refs))
    # scatter: a tuple with differing shapes, and one array split along axis 0
    parts = tuple(data(r, (r + 2,), np.float64, salt=3) for r in range(comm.size))
    got = comm.scatter(parts if comm.rank == 0 else None, root=0)
    assert np.array_equal(got, parts[comm.rank])
    whole = data(7, (comm.size, 2, 3), np.int64)
    got = comm.scatter(whole if comm.rank == comm.size - 1 else "ignored", root=comm.size - 1)
    assert got.shape == (2, 3) and np.array_equal(got, whole[comm.rank])
    # alltoall: xs[i] goes to rank i; shapes depend on (src, dst)
    xs = tuple(np.full((comm.rank + 1, i + 1), 100 * comm.rank + i, dtype=np.float32)
               for i in range(comm.size))
    ys = comm.alltoall(xs)
    assert len(ys) == comm.size
    for src, y in enumerate(ys):
        ref = np.full((src + 1, comm.rank + 1), 100 * src + comm.rank, dtype=np.float32)
        assert y.shape == ref.shape and np.array_equal(y, ref), (src, y)


def check_allreduce(comm, world):
    for dt in (np.int32, np.int64, np.float32, np.float64, np.float16):
        mine = data(comm.rank, (13, 5), dt, salt=11)
        ref = sum(data(r, (13, 5), dt, salt=11).astype(np.float64) for r in range(comm.size))
        got = comm.allreduce(mine)
        assert got.dtype == np.dtype(dt) and got.shape == (13, 5)
        assert np.array_equal(got.astype(np.float64), ref), f"allreduce {dt}: {got} vs {ref}"
        assert np.array_equal(mine, data(comm.rank, (13, 5), dt, salt=11)), "allreduce modified its input"
    # non-integer floats: within rounding of a float64 reference, bitwise equal on every rank
    rng = [np.random.default_rng(r) for r in range(comm.size)]
    vals = [g.standard_normal(1000).astype(np.float32) for g in rng]
    got = comm.allreduce(vals[comm.rank])
    ref = np.sum([v.astype(np.float64) for v in vals], axis=0)
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-5 * comm.size)
    assert len({bytes(b) for b in world.allgather(got.tobytes())}) == 1, "allreduce differs across ranks"
    # _multi_node_mean, in place and out of place; float16 via float32
    for dt, tol in ((np.float32, 1e-6), (np.float64, 1e-12), (np.float16, 1e-3)):
        vals = [np.random.default_rng(50 + r).standard_normal(37).astype(dt) for r in range(comm.size)]
        ref = np.mean([v.astype(np.float64) for v in vals], axis=0)
        buf = vals[comm.rank].copy()
        comm._multi_node_mean(None, buf)
        assert buf.dtype == np.dtype(dt) and np.allclose(buf, ref, rtol=tol, atol=tol), (dt, buf, ref)
        out = np.empty_like(buf)
        comm._multi_node_mean(vals[comm.rank], out)
        assert np.array_equal(out, buf), "_multi_node_mean in place and out of place differ"


def check_p2p(comm):
    if comm.size == 1:
        return
    dest, src = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    single = data(comm.rank, (3, 4), np.float16)
    many = tuple(data(comm.rank, shape, np.int64) for shape in ((2,), (0,), (3, 1)))
    req_order = comm.rank % 2 == 0  # even ranks send first: no deadlock on odd sizes with eager sends
    for step in ((0, 1) if req_order else (1, 0)):
        if step == 0:
            comm.send(single, dest, tag=5)
            comm.send(many, dest, tag=6)
            comm.send_obj({"from": comm.rank, "arr": single}, dest, tag=7)
        else:
            got = comm.recv(src, tag=5)
            assert got.dtype == np.float16 and np.array_equal(got, data(src, (3, 4), np.float16))
            got = comm.recv(src, tag=6)
            assert isinstance(got, tuple) and len(got) == 3
            for g, shape in zip(got, ((2,), (0,), (3, 1))):
                assert np.array_equal(g, data(src, shape, np.int64))
            obj = comm.recv_obj(src, tag=7)
            assert obj["from"] == src and np.array_equal(obj["arr"], data(src, (3, 4), np.float16))


def check_objects(comm):
    big = {"text": "x" * 1000, "arr": np.arange(50), "root": comm.size - 1}
    got = comm.bcast_obj(big if comm.rank == comm.size - 1 else None, max_buf_len=7, root=comm.size - 1)
    assert got["text"] == big["text"] and np.array_equal(got["arr"], big["arr"]), "chunked bcast_obj"
    assert comm.gather_obj(("r", comm.rank), root=0) == ([("r", r) for r in range(comm.size)]
                                                         if comm.rank == 0 else None)
    assert comm.allreduce_obj(comm.rank + 1) == comm.size * (comm.size + 1) // 2
    s = comm.allreduce_obj(np.full(3, comm.rank, dtype=np.int64))
    assert np.array_equal(s, np.full(3, comm.size * (comm.size - 1) // 2))
    assert comm.allgather_obj(comm.rank * 2) == [2 * r for r in range(comm.size)]
    objs = [f"to{r}" for r in range(comm.size)] if comm.rank == 0 else None
    assert comm.scatter_obj(objs) == f"to{comm.rank}"


def check_split(comm, world):
    sub = comm.split(comm.rank % 2, -comm.rank)  # reversed order inside each color
    members = [r for r in range(comm.size) if r % 2 == comm.rank % 2]
    assert type(sub) is type(comm), type(sub)
    assert sub.size == len(members) and sub.rank == sorted(members, reverse=True).index(comm.rank)
    mine, theirs = comm.get_config(), sub.get_config()
    if (sub.inter_size > 1) != (comm.inter_size > 1):  # the wire in effect follows the topology
        mine.pop("allreduce_grad_dtype"), theirs.pop("allreduce_grad_dtype")
    assert theirs == mine, f"split must keep the config: {theirs} != {mine}"
    total = sub.allreduce(np.array([comm.rank], dtype=np.int64))
    assert int(total[0]) == sum(members)
    sub.finalize()
    sub.finalize()  # idempotent
    none = comm.split(MPI.UNDEFINED if comm.rank == 0 else 1, comm.rank)
    assert (none is None) == (comm.rank == 0)
    if none is not None:
        assert none.size == comm.size - 1
        none.finalize()


def check_config(comm):
    cfg = comm.get_config()
    for name in ("batched_copy", "allreduce_grad_dtype", "intra_dtype", "inter_dtype", "bucket_bytes",
                 "check_finite"):
        assert name in cfg, f"config {name} missing: {sorted(cfg)}"
    e = expect_raise(ValueError, comm.set_config, "no_such_option", 1, contains=("no_such_option",))
    assert "bucket_bytes" in str(e) and "batched_copy" in str(e), f"allowed names not listed: {e}"
    expect_raise(ValueError, comm.get_config, "no_such_option", contains=("allowed",))
    expect_raise(ConfigError, comm.set_config, "bucket_bytes", -5, contains=("bucket_bytes",))
    expect_raise(ConfigError, comm.set_config, "inter_dtype", "int8", contains=("inter_dtype",))
    old = comm.get_config("bucket_bytes")
    with comm.config_scope("bucket_bytes", 1 << 16):
        assert comm.get_config("bucket_bytes") == 1 << 16
    assert comm.get_config("bucket_bytes") == old
    comm.set_config("inter_dtype", np.float16)
    assert comm.get_config("inter_dtype") == "float16"
    comm.set_config("inter_dtype", cfg["inter_dtype"])


def check_errors_everywhere(comm, world):
    """Bad input on one rank raises on every rank, and the ranks stay in step."""
    last = comm.size - 1
    expect_raise(ValueError, comm.scatter, (np.zeros(1),) * (comm.size + 1) if comm.rank == 0 else None,
                 contains=("scatter",))
    if comm.size > 1:
        bad = np.zeros(4, np.float64 if comm.rank == last else np.float32)
        expect_raise(ValueError, comm.allreduce, bad, contains=("disagree",))
        expect_raise(TypeError, comm.gather, bad, contains=("dtype",))
        expect_raise(ValueError, comm.allreduce, np.zeros(3 + (comm.rank == last), np.float32))
    expect_raise(TypeError, comm.allreduce, np.zeros(3, np.int8 if comm.rank == last else np.int32),
                 contains=("int8",))
    expect_raise(ValueError, comm.alltoall, [np.zeros(1)] * (comm.size + (comm.rank == last)))
    expect_raise(ValueError, comm.scatter_obj, [1] * (comm.size + 1) if comm.rank == 0 else None)
    assert comm.allreduce_obj(1) == comm.size, "ranks out of step after errors"


def check_models(comm, name):
    size, rank, last = comm.size, comm.rank, comm.size - 1
    sizes = [(4, 3), (3, 2)]
    model = Chain(sizes, seed=rank)
    ref = Chain(sizes, seed=0)  # rank 0's initial weights, rebuilt independently
    comm.bcast_data(model)
    for (n, p), (_, q) in zip(sorted(model.namedparams()), sorted(ref.namedparams())):
        assert np.array_equal(p.array, q.array), f"bcast_data: {n} differs from rank 0's"
    # shape mismatch on one rank: every rank raises, naming the parameter
    if size > 1:
        bad = Chain([(4, 3), (3, 5 if rank == last else 2)], seed=rank)
        e = expect_raise(ParameterMismatchError, comm.bcast_data, bad, contains=("/l1/W",))
        assert f"[{last}]" in str(e), f"mismatch message does not name rank {last}: {e}"
        extra = Chain(sizes + ([(2, 2)] if rank == 0 else []), seed=rank)
        expect_raise(ParameterMismatchError, comm.bcast_data, extra, contains=("/l2/W", "absent"))
    # gradients: the mean against a float64 reference; a grad missing on one rank is named
    for _, p in sorted(model.namedparams()):
        p.grad = None
    model.cleargrads()
    for k, (_, p) in enumerate(sorted(model.namedparams())):
        p.grad = np.random.default_rng(10 * rank + k).standard_normal(p.shape).astype(np.float32)
    if name != "dummy":
        refs = [np.mean([np.random.default_rng(10 * r + k).standard_normal(p.shape) for r in range(size)],
                        axis=0) for k, (_, p) in enumerate(sorted(model.namedparams()))]
        comm.multi_node_mean_grad(model)
        for (n, p), r in zip(sorted(model.namedparams()), refs):
            assert np.allclose(p.grad, r, rtol=1e-3, atol=2e-3), f"{name}: mean grad of {n} wrong"
        grads = np.concatenate([p.grad.ravel() for _, p in sorted(model.namedparams())])
        assert len({bytes(b) for b in comm.allgather_obj(grads.tobytes())}) == 1, "grads differ across ranks"
    if size > 1:
        model.l0.b.grad = None if rank == last else model.l0.b.grad
        expect_raise(ParameterMismatchError, comm.check_params_consistent, model,
                     contains=("/l0/b", "grad None"))
    assert comm.allreduce_obj(1) == size


def run(name, world):
    comm = make(name)
    try:
        check_ranks(comm, world)
        check_bcast(comm)
        check_gather_family(comm)
        check_allreduce(comm, world)
        check_p2p(comm)
        check_objects(comm)
        check_split(comm, world)
        check_config(comm)
        check_errors_everywhere(comm, world)
        check_models(comm, name)
        assert watchdog.current() is None, f"watchdog still marks {watchdog.current()}"
    finally:
        comm.finalize()


def main(argv):
    world = MPI.COMM_WORLD
    names = []
    for a in argv or ["all"]:
        if a == "all":
            names.append("base")
            names += [n for n, reg in COMMUNICATORS.items()
                      if reg.runs_on("cpu") and importlib.util.find_spec(reg.module) is not None]
        else:
            names.append(a)
    for name in names:
        run(name, world)
    print(f"rank {world.rank}: interface checks ok on {','.join(names)}")


if __name__ == "__main__":
    main(sys.argv[1:])
