"""Rank side of tests/test_cluster.py: topology, gradient mean and training on emulated hosts.

Usage: check_cluster.py MODE [ARGS]
  topology NODES PER_NODE      -- hpcsgd.runtime.topology sees NODES x PER_NODE, hostnames agree within a
                                  node and differ across nodes, a shared-memory window works in the node
  allreduce NAME[:WIRE] ...    -- create_communicator(NAME) gradient mean == float64 reference, for
                                  each NAME (WIRE: allreduce_grad_dtype)
  train NAME OUT.npz ITERS     -- ITERS steps of a small MLP with create_multi_node_optimizer; rank 0
                                  saves the parameters to OUT.npz
Communicators that are not installed are skipped ("SKIP <reason>" on rank 0).
"""

import socket
import sys

import numpy as np
from mpi4py import MPI

world = MPI.COMM_WORLD
mode = sys.argv[1]


def missing(name: str) -> bool:
    from hpcsgd.comm import communicator_class

    try:
        communicator_class(name)
    except ValueError as e:
        if "not installed" in str(e):
            if world.rank == 0:
                print(f"SKIP communicator {name!r} not landed yet: {e}", flush=True)
            return True
        raise
    return False


def check_topology(nodes: int, per_node: int) -> None:
    from hpcsgd.runtime.topology import create_topology

    t = create_topology()
    assert (t.inter_size, t.intra_size) == (nodes, per_node), (
        f"rank {t.rank}: topology {t.inter_size} nodes x {t.intra_size}, expected {nodes} x {per_node}")
    assert t.inter_rank == t.rank // per_node and t.intra_rank == t.rank % per_node, (
        f"rank {t.rank}: node {t.inter_rank} local {t.intra_rank}: block placement expected")
    host = socket.gethostname()
    in_node = t.intra_comm.allgather(host)
    assert len(set(in_node)) == 1, f"hostnames differ inside node {t.inter_rank}: {in_node}"
    leaders = world.allgather(host if t.intra_rank == 0 else None)
    assert len({h for h in leaders if h}) == nodes, f"nodes share a hostname: {leaders}"
    # MPI-3 shared memory inside the node: each rank writes its slot, everyone reads all.
    win = MPI.Win.Allocate_shared(8 if t.intra_rank == 0 else 0, 8, comm=t.intra_comm)
    buf, _ = win.Shared_query(0)
    shared = np.ndarray((1,), dtype=np.int64, buffer=buf)
    win.Fence()
    if t.intra_rank == 0:
        shared[0] = 0
    win.Fence()
    win.Lock_all()
    for r in range(t.intra_size):
        if r == t.intra_rank:
            shared[0] += t.rank + 1
        win.Sync()
        t.intra_comm.Barrier()
    win.Unlock_all()
    expected = sum(r + 1 for r in range(t.inter_rank * per_node, (t.inter_rank + 1) * per_node))
    assert shared[0] == expected, (shared[0], expected)
    win.Free()
    print(f"rank {t.rank} host {host} node {t.inter_rank} local {t.intra_rank} ok", flush=True)


def _grads(rank: int, shapes: dict) -> dict:
    rng = np.random.default_rng(1000 + rank)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def check_allreduce(name: str, wire: str | None) -> None:
    import chainer
    import chainer.links as L

    import hpcsgd

    if missing(name):
        return
    kw = {} if wire is None else {"allreduce_grad_dtype": wire}
    comm = hpcsgd.create_communicator(name, **kw)

    class Net(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.a = L.Linear(37, 129)
                self.b = L.Convolution2D(3, 8, 3)
                self.c = L.Linear(129, 5)

    model = Net()
    shapes = {n: p.shape for n, p in model.namedparams()}
    mine = _grads(world.rank, shapes)
    for n, p in model.namedparams():
        p.grad = mine[n].copy()
    comm.multi_node_mean_grad(model)
    everyone = [_grads(r, shapes) for r in range(world.size)]
    rtol, atol = (2e-3, 2e-3) if (wire or "").endswith("16") or name == "hierarchical" else (1e-6, 1e-6)
    for n, p in model.namedparams():
        ref = np.mean([g[n].astype(np.float64) for g in everyone], axis=0)
        err = np.max(np.abs(p.grad.astype(np.float64) - ref))
        assert np.allclose(p.grad, ref, rtol=rtol, atol=atol), f"{name}: {n} max error {err:.3g}"
    # SUM allreduce of an array and bcast_data, the other collectives a trainer uses
    x = np.arange(10, dtype=np.float64) * (world.rank + 1)
    total = comm.allreduce(x)
    assert np.allclose(total, np.arange(10) * sum(range(1, world.size + 1))), total
    for p in model.params():
        p.array[...] = world.rank
    comm.bcast_data(model)
    assert all(np.all(p.array == 0) for p in model.params()), "bcast_data did not copy rank 0"
    print(f"rank {world.rank} {name}:{wire or ''} allreduce ok", flush=True)


def check_train(name: str, out: str, iters: int) -> None:
    import chainer
    import chainer.functions as F
    import chainer.links as L

    import hpcsgd

    if missing(name):
        return
    comm = hpcsgd.create_communicator(name)

    class MLP(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.l1 = L.Linear(64, 96)
                self.l2 = L.Linear(96, 10)

        def __call__(self, x):
            return self.l2(F.relu(self.l1(x)))

    np.random.seed(world.rank)  # replicas start different: bcast_data must make them equal
    model = MLP()
    opt = hpcsgd.create_multi_node_optimizer(chainer.optimizers.MomentumSGD(lr=0.05), comm)
    opt.setup(model)
    rng = np.random.default_rng(7)
    data = rng.standard_normal((iters * world.size * 8, 64)).astype(np.float32)
    labels = (np.abs(data[:, :10]).argmax(axis=1)).astype(np.int32)
    for it in range(iters):
        lo = (it * world.size + world.rank) * 8
        x, t = data[lo:lo + 8], labels[lo:lo + 8]
        opt.update(lambda x, t: F.softmax_cross_entropy(model(x), t), x, t)
    params = {n: p.array for n, p in model.namedparams()}
    gathered = world.gather(params, root=0)
    if world.rank == 0:
        for r, other in enumerate(gathered):
            for n in params:
                assert np.array_equal(other[n], params[n]), f"replica {r} differs in {n}"
        np.savez(out, **{n.replace("/", "."): a for n, a in params.items()})
        print(f"train {name} {iters} iterations ok; skipped {getattr(opt, 'skipped_steps', 0)}", flush=True)


if mode == "topology":
    check_topology(int(sys.argv[2]), int(sys.argv[3]))
elif mode == "allreduce":
    for spec in sys.argv[2:]:
        name, _, wire = spec.partition(":")
        check_allreduce(name, wire or None)
elif mode == "train":
    check_train(sys.argv[2], sys.argv[3], int(sys.argv[4]))
else:
    raise SystemExit(f"unknown mode {mode!r}")
