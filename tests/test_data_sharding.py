"""Sample order: one shared permutation per epoch, equal slices, eval shards, exact resume."""

import time

import numpy as np
import pytest
from data_fixtures import index_images

from hpcsgd.data import Loader, build_dataset, epoch_plan, eval_shard, iterations_per_epoch
from hpcsgd.errors import ConfigError


def index_dataset(n):
    return build_dataset("arrays", images=index_images(n), labels=np.arange(n), n_classes=n)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("n,b", [(10, 1), (103, 5), (64, 8), (9, 4)])
def test_slices_disjoint_equal_and_remainder(n, b, size):
    plans = [epoch_plan(n, b, r, size, seed=3, epoch=2) for r in range(size)]
    assert len({len(p) for p in plans}) == 1
    assert len(plans[0]) == n // (b * size)
    seen = np.concatenate([np.concatenate(p) for p in plans if p] or [np.zeros(0, int)])
    assert len(seen) == len(np.unique(seen)) == (n // (b * size)) * b * size
    padded = [epoch_plan(n, b, r, size, seed=3, epoch=2, drop_remainder=False) for r in range(size)]
    allp = np.concatenate([np.concatenate(p) for p in padded])
    assert set(allp.tolist()) == set(range(n))
    assert len(allp) == -(-n // (b * size)) * b * size


def test_global_batch_independent_of_split():
    """Global batch k holds the same samples whether 1 rank takes 8 or 4 ranks take 2 each."""
    one = epoch_plan(50, 8, 0, 1, seed=1, epoch=0)
    four = [epoch_plan(50, 2, r, 4, seed=1, epoch=0) for r in range(4)]
    for k in range(len(one)):
        assert np.array_equal(one[k], np.concatenate([four[r][k] for r in range(4)]))


@pytest.mark.parametrize("n", [0, 1, 7, 100, 101])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_eval_shard_counts_every_sample_once(n, size):
    shards = [eval_shard(n, r, size) for r in range(size)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_bad_config():
    with pytest.raises(ConfigError):
        eval_shard(10, 3, 3)
    with pytest.raises(ConfigError):
        iterations_per_epoch(10, 0, 1)


def test_resume_sees_exactly_the_remaining_batches():
    ds = index_dataset(60)
    kw = dict(batch_size=4, rank=1, size=2, seed=9, transform="train")
    with Loader(ds, workers=2, **kw) as ref:
        epoch0 = [(x.copy(), t.copy()) for x, t in ref]
        epoch1 = [(x.copy(), t.copy()) for x, t in ref]
    assert ref.epoch == 2 and len(epoch0) == len(epoch1) == 7
    assert not np.array_equal(np.concatenate([t for _, t in epoch0]), np.concatenate([t for _, t in epoch1]))
    first = Loader(ds, workers=0, **kw)
    list(first)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    it.close()
    assert state["epoch"] == 1 and state["position"] == 3
    resumed = Loader(ds, workers=0, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a training loop's set_epoch of the same epoch keeps the position
    rest = list(resumed)
    assert len(rest) == 4
    for (xa, ta), (xb, tb) in zip(rest, epoch1[3:]):
        assert np.array_equal(ta, tb) and np.array_equal(xa, xb)
    assert resumed.epoch == 2 and resumed.position == 0
    bigger = Loader(ds, workers=0, batch_size=8, rank=0, size=2, seed=9)
    with pytest.raises(ConfigError, match="global batch"):
        bigger.load_state_dict(state)


def test_abandoned_iteration_then_new_epoch_with_workers():
    ds = index_dataset(40)
    with Loader(ds, 4, workers=2, prefetch=3, seed=2) as loader:
        it = iter(loader)
        next(it)
        it.close()  # leaves batches in flight
        assert loader.position == 1
        loader.set_epoch(5)
        got = np.concatenate([t for _, t in loader])
        want = np.concatenate(epoch_plan(40, 4, 0, 1, seed=2, epoch=5))
        assert np.array_equal(got, want)


@pytest.mark.mpi
@pytest.mark.parametrize("n,env", [(1, None), (2, None), (3, None), (4, {"HPCSGD_RANKS_PER_NODE": "2"})])
def test_sharding_across_ranks(mpirun, n, env):
    res = mpirun("tests/mpi/check_data_sharding.py", n, env=env, timeout=90)
    assert res.stdout.count("data sharding ok") == n


def test_next_epoch_is_prefetched_across_the_boundary():
    ds = index_dataset(24)
    with Loader(ds, 4, workers=1, prefetch=3, seed=6) as loader:
        first = [t.copy() for _, t in loader]
        time.sleep(0.5)  # the worker prepares epoch 1's first batches meanwhile
        assert [(e, k) for e, k, _ in loader._pending] == [(1, 0), (1, 1), (1, 2)]
        second = [t.copy() for _, t in loader]
    for epoch, got in enumerate([first, second]):
        want = np.concatenate(epoch_plan(24, 4, 0, 1, seed=6, epoch=epoch))
        assert np.array_equal(np.concatenate(got), want)


def test_pipeline_order_survives_random_abandon_and_jumps():
    """Abandon iterations at random points and jump epochs: every batch is still the planned one."""
    ds = index_dataset(30)
    rng = np.random.default_rng(0)
    with Loader(ds, 3, workers=2, prefetch=2, seed=8) as loader:
        for _ in range(12):
            if rng.random() < 0.3:
                loader.set_epoch(int(rng.integers(0, 4)))
            epoch, start = loader.epoch, loader.position
            plan = epoch_plan(30, 3, 0, 1, seed=8, epoch=epoch)
            stop = int(rng.integers(start, len(plan) + 1))
            it = iter(loader)
            for k in range(start, stop):
                _, t = next(it)
                assert np.array_equal(t, plan[k]), (epoch, k)
            it.close()
