"""The Run's device handling and loss, proven with stand-ins (no GPU, no MPI needed).

* every loader of a GPU run, the ``bn_mode: recompute`` one included, is built for the run's device;
* the GPU's RNG is reseeded before every step from (seed, rank, iteration) only, so a resumed run
  draws what the uninterrupted run drew;
* ``label_smoothing`` from the config reaches the training loss.
"""

import contextlib

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

from hpcsgd.losses import softmax_cross_entropy
from hpcsgd.runtime.trace import get_tracer
from hpcsgd.train import build, loop
from hpcsgd.train import config as C
from hpcsgd.train.metrics import JsonlLog


class Comm:
    rank, size, intra_rank = 1, 2, 1


class RecordingLoader:
    made: list = []

    def __init__(self, dataset, batch_size, **kw):
        self.kw = kw
        self.skipped_files = {}
        RecordingLoader.made.append(self)

    def close(self):
        self.closed = True


def cfg(**kw):
    return C.resolve(C.merge({"bn_mode": "recompute", "on_bad": "skip", **kw}), 2, check_paths=False)


@pytest.mark.parametrize("role", ["train", "eval", "recompute"])
def test_every_loader_is_built_for_the_device(monkeypatch, role):
    monkeypatch.setattr(build, "Loader", RecordingLoader)
    ld = build.make_loader(cfg(), object(), Comm(), 3, role)
    assert ld.kw["device"] == 3 and ld.kw["on_bad"] == "skip" and ld.kw["rank"] == 1 and ld.kw["size"] == 2


class Random:
    """Stands in for cupy.random: records the seeds it is given."""

    def __init__(self):
        self.seeds = []

    def seed(self, s):
        self.seeds.append(s)


class Batches:
    def __init__(self):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(4, 5)).astype(np.float32)
        self.t = rng.integers(0, 3, 4).astype(np.int32)
        self.skipped_files = {}

    def set_epoch(self, e):
        pass

    def __iter__(self):
        while True:
            yield self.x, self.t


class Optimizer:
    def backward_scope(self, last):
        return contextlib.nullcontext()

    def update(self):
        pass


class Recipe:
    def on_iteration(self, epoch):
        pass


def stand_in_run(tmp_path, iteration=0, **over):
    parts = dict(cfg=cfg(seed=7, grad_accumulation=1), out=str(tmp_path), comm=Comm(), topology={},
                 tracer=get_tracer(), device=0, log=JsonlLog(str(tmp_path / "log.jsonl")),
                 train_set=object(), val_set=[0] * 6, loader=Batches(), val_loader=Batches(),
                 model=L.Linear(5, 3), loss_fn=F.softmax_cross_entropy, recipe=Recipe(),
                 optimizer=Optimizer(), iters_per_epoch=100, total_iters=100, iteration=iteration,
                 device_random=Random())
    parts.update(over)
    return loop.Run(**parts)


def test_gpu_rng_is_reseeded_from_seed_rank_and_iteration_only(tmp_path):
    whole = stand_in_run(tmp_path)
    for _ in range(5):
        whole.step()
    first = stand_in_run(tmp_path)
    for _ in range(2):
        first.step()
    resumed = stand_in_run(tmp_path, iteration=2)  # what Run.resume leaves after a checkpoint at 2
    for _ in range(3):
        resumed.step()
    assert whole.device_random.seeds == first.device_random.seeds + resumed.device_random.seeds
    assert whole.device_random.seeds == [loop.device_seed(7, 1, i) for i in range(5)]
    assert len(set(whole.device_random.seeds)) == 5 and loop.device_seed(7, 0, 0) != loop.device_seed(7, 1, 0)
    assert stand_in_run(tmp_path, device=None, device_random=None).device_random is None  # CPU: no reseed


def test_recompute_evaluation_gets_the_device(tmp_path, monkeypatch):
    made, seen = [], {}

    def make_loader(cfg_, dataset, comm, device, role):
        made.append((role, device))
        return RecordingLoader(dataset, 1)

    monkeypatch.setattr(loop, "make_loader", make_loader)
    monkeypatch.setattr(loop, "prepare_for_eval", lambda model, comm, batches: seen.update(batches=batches))
    result = {"top1": 0.5, "top5": 1.0, "loss": 1.0, "samples": 6}
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: result)
    run = stand_in_run(tmp_path, device=2)
    run.progress = type("P", (), {"write": staticmethod(lambda text: None)})()
    run.evaluate()
    assert made == [("recompute", 2)]
    assert seen["batches"] is RecordingLoader.made[-1] and RecordingLoader.made[-1].closed


def test_label_smoothing_from_the_config_is_the_training_loss():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 4))
    t = rng.integers(0, 4, 6).astype(np.int32)
    loss = build.loss_from_config(cfg(label_smoothing=0.2))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))  # float64 reference
    q = np.full((6, 4), 0.2 / 4)
    q[np.arange(6), t] += 0.8
    want = -(q * logp).sum(axis=1).mean()
    assert float(loss(chainer.Variable(logits), t).array) == pytest.approx(want, rel=1e-12)
    plain = build.loss_from_config(cfg())
    assert float(plain(logits, t).array) == float(softmax_cross_entropy(logits, t).array)
    assert float(plain(logits, t).array) == float(F.softmax_cross_entropy(logits, t).array)  # bit-exact
