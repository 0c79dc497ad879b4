"""Rank side of tests/test_chainermn_api.py: ChainerMN's training-script API on hpcsgd.

argv: WORKDIR (a folder shared by the ranks, for the checkpointer). Each check
compares with an independent reference: the hand-computed split of ChainerMN's
documentation, a float64 NumPy mean, the files each rank wrote. Prints "OK" on
rank 0 at the end.
"""

import os
import sys

import chainer
import numpy as np

import hpcsgd as chainermn

comm = chainermn.create_communicator("naive")
R, r = comm.size, comm.rank


def hand_split(n, size, equal):
    """ChainerMN's documented split, written out differently from the implementation."""
    if equal:
        length = -(-n // size)  # ceil
        return [(n * i // size, n * i // size + length) for i in range(size)]
    sizes = [n // size + (1 if i < n % size else 0) for i in range(size)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    return [(int(s), int(s) + k) for s, k in zip(starts, sizes)]


def check_scatter():
    for n in (0, 1, 7, 10, 64):
        data = np.arange(100, 100 + n) if r == 0 else None  # only root's dataset counts
        for equal in (True, False):
            for shuffle, seed in ((False, None), (True, 3)):
                sub = chainermn.scatter_dataset(data, comm, shuffle=shuffle, seed=seed,
                                                force_equal_length=equal)
                mine = [int(sub[i]) for i in range(len(sub))]
                order = np.random.RandomState(seed).permutation(n) if shuffle else np.arange(n)
                b, e = hand_split(n, R, equal)[r]
                assert mine == [100 + int(order[i]) for i in range(b, e)], (n, equal, shuffle, mine)
                everyone = comm.allgather_obj(mine)
                flat = sorted(v for part in everyone for v in part)
                if equal:
                    assert len({len(p) for p in everyone}) == 1
                    assert set(flat) == set(range(100, 100 + n))
                else:
                    assert flat == list(range(100, 100 + n))  # disjoint and complete
    # root other than 0, and bad input raising on every rank
    root = R - 1
    sub = chainermn.scatter_dataset(list(range(5)) if r == root else None, comm, root=root)
    assert [sub[i] for i in range(len(sub))] == list(range(*hand_split(5, R, True)[r]))
    try:
        chainermn.scatter_dataset(None, comm)
    except ValueError as e:
        assert "None" in str(e)
    else:
        raise AssertionError("scatter_dataset(None) on root did not raise")
    assert chainermn.create_empty_dataset(list(range(4))) == [(), (), (), ()]


class FakeEvaluator:
    def __init__(self, values):
        self.values = values

    def evaluate(self):
        return dict(self.values)


def check_evaluator():
    rng = np.random.RandomState(11)
    table = rng.randn(R, 3)  # rank i reports row i
    vec = rng.randn(R, 4).astype(np.float32)
    ev = chainermn.create_multi_node_evaluator(
        FakeEvaluator({"a": np.float32(table[r, 0]), "b": float(table[r, 1]),
                       "c": np.float64(table[r, 2]), "v": vec[r]}), comm)
    got = ev.evaluate()
    ref = table.astype(np.float64)
    ref[:, 0] = table[:, 0].astype(np.float32)  # rank values as reported
    for j, k in enumerate("abc"):
        assert abs(got[k] - ref[:, j].mean()) < 1e-12, (k, got[k], ref[:, j].mean())
    np.testing.assert_allclose(got["v"], vec.astype(np.float64).mean(axis=0), rtol=0, atol=1e-12)
    assert comm.allgather_obj(got["a"]) == [got["a"]] * R  # bitwise equal everywhere
    # ranks reporting different keys: a clear error on every rank, no hang
    bad = chainermn.create_multi_node_evaluator(FakeEvaluator({} if r == R - 1 else {"a": 1.0}), comm)
    if R > 1:
        try:
            bad.evaluate()
        except ValueError as e:
            assert "different keys" in str(e)
        else:
            raise AssertionError("key mismatch not detected")


class Box(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.w = chainer.Parameter(np.zeros(3, np.float32))


class FakeTrainer:
    """What the checkpointer touches: ``out``, ``updater.iteration`` and serialization."""

    def __init__(self, out):
        self.out = out
        self.box = Box()
        self.updater = type("U", (), {"iteration": 0})()

    def serialize(self, serializer):
        self.box.serialize(serializer["box"])
        self.updater.iteration = serializer("iteration", self.updater.iteration)


def check_checkpointer(workdir):
    path = os.path.join(workdir, "cp")
    t = FakeTrainer(path)
    cp = chainermn.create_multi_node_checkpointer("run", comm, cp_interval=2, gc_interval=2)
    for it in (10, 20, 30, 40, 50):
        t.updater.iteration = it
        t.box.w.array[...] = it * 1000 + r  # rank-specific state
        cp(t)
    comm.mpi_comm.Barrier()
    mine = sorted(f for f in os.listdir(path) if f.startswith(f"run.{r}."))
    # gc ran after the 2nd and 4th save, keeping the newest 2 common iterations; 50 is new since
    assert mine == [f"run.{r}.30", f"run.{r}.40", f"run.{r}.50"], mine
    assert not [f for f in os.listdir(path) if f.startswith("tmp-")]
    comm.mpi_comm.Barrier()
    if r == R - 1:  # the last rank lost its newest file: resume where all ranks agree
        os.remove(os.path.join(path, f"run.{r}.50"))
    comm.mpi_comm.Barrier()
    t2 = FakeTrainer(path)
    cp2 = chainermn.create_multi_node_checkpointer("run", comm, cp_interval=2, gc_interval=2)
    loaded = cp2.maybe_load(t2)
    want = 40  # the newest iteration every rank still has
    assert loaded == want and t2.updater.iteration == want, (loaded, t2.updater.iteration)
    np.testing.assert_array_equal(t2.box.w.array, np.full(3, want * 1000 + r, np.float32))
    comm.mpi_comm.Barrier()
    cp2.finalize()
    comm.mpi_comm.Barrier()
    assert not [f for f in os.listdir(path) if f.startswith(f"run.{r}.") and f != f"run.{r}.50"]
    # nothing to resume from: iteration stays 0
    t3 = FakeTrainer(os.path.join(workdir, "empty"))
    assert chainermn.create_multi_node_checkpointer("none", comm).maybe_load(t3) is None
    assert t3.updater.iteration == 0


def check_iterator():
    n = 11
    x = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    y = np.arange(n, dtype=np.int32)
    data = chainer.datasets.TupleDataset(x, y) if r == 0 else None
    base = chainer.iterators.SerialIterator(data, 4, repeat=False, shuffle=False) if r == 0 else None
    it = chainermn.create_multi_node_iterator(base, comm)
    batches = list(it)
    assert [len(b) for b in batches] == [4, 4, 3]
    for i, (xi, yi) in enumerate(e for b in batches for e in b):
        assert xi.dtype == np.float64 and type(yi) in (np.int32, int) and int(yi) == i
        np.testing.assert_array_equal(xi, x[i])
    assert it.epoch == 1 and it.is_new_epoch


def check_mnbn():
    """MultiNodeBatchNormalization == chainer's BN on the concatenated batch (float64 reference)."""
    C, per = 3, 4
    rng = np.random.RandomState(5)
    xg = rng.randn(R * per, C).astype(np.float64)
    gyg = rng.randn(R * per, C).astype(np.float64)
    bn = chainermn.MultiNodeBatchNormalization(C, comm, dtype=np.float64)
    assert bn.eps == 2e-5 and sorted(bn._persistent) == ["N", "avg_mean", "avg_var"]
    x = chainer.Variable(xg[r * per:(r + 1) * per])
    y = bn(x)
    y.grad = gyg[r * per:(r + 1) * per]
    y.backward()
    mean, var = xg.mean(0), xg.var(0)
    xhat = (xg - mean) / np.sqrt(var + 2e-5)
    np.testing.assert_allclose(y.array, xhat[r * per:(r + 1) * per], atol=1e-10)
    gbeta_local = gyg[r * per:(r + 1) * per].sum(0)
    np.testing.assert_allclose(bn.beta.grad, gbeta_local, atol=1e-10)
    gx = (gyg - gyg.mean(0) - xhat * (gyg * xhat).mean(0)) / np.sqrt(var + 2e-5)
    np.testing.assert_allclose(x.grad, gx[r * per:(r + 1) * per], atol=1e-10)
    np.testing.assert_allclose(bn.avg_mean, 0.1 * mean, atol=1e-12)
    no_gamma = chainermn.MultiNodeBatchNormalization(C, comm, use_gamma=False, use_beta=False)
    assert not hasattr(no_gamma, "gamma") and not list(no_gamma.params())


def check_debug_mean():
    """ChainerMN's debug mode: a non-finite _multi_node_mean raises ValueError on every rank."""
    x = np.array([1.0, np.nan if r == 0 else 2.0], np.float32)
    comm._multi_node_mean(None, x.copy())  # not in debug mode: no check
    chainer.set_debug(True)
    try:
        comm._multi_node_mean(None, x.copy())
    except ValueError as e:
        assert "diverged" in str(e)
    else:
        raise AssertionError("non-finite mean not reported in debug mode")
    finally:
        chainer.set_debug(False)


check_debug_mean()
check_scatter()
check_evaluator()
check_checkpointer(sys.argv[1])
check_iterator()
check_mnbn()
comm.mpi_comm.Barrier()
if r == 0:
    print("OK")
