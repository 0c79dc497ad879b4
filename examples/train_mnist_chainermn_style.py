#!/usr/bin/env python
"""Fashion-MNIST MLP in the style of ChainerMN's own ``train_mnist.py``, on hpcsgd.

A ChainerMN training script runs unchanged with one import switched::

    import hpcsgd as chainermn

It uses every piece of ChainerMN's training-script API: ``create_communicator``,
``create_multi_node_optimizer``, ``scatter_dataset``, ``create_multi_node_evaluator``,
``create_multi_node_checkpointer`` (resume with ``maybe_load``),
``MultiNodeBatchNormalization``, ``create_multi_node_iterator`` with
``create_empty_dataset`` (a replica check: every rank classifies rank 0's test
batches and the predictions must agree) and ``global_except_hook``.

Run::

    mpiexec -n 2 python -m mpi4py examples/train_mnist_chainermn_style.py --out result

With ``--json PATH`` rank 0 writes the final validation accuracy and the
checks to PATH (the tests read it). Data: Fashion-MNIST IDX files
(``--data``, default: Debian's dataset-fashion-mnist folder).
"""

from __future__ import annotations

import argparse
import json
import random
import zlib

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from chainer import training
from chainer.training import extensions

import hpcsgd as chainermn


class MLP(chainer.Chain):
    """784 -> n_units (synchronized BN, ReLU) -> n_units (ReLU) -> 10."""

    def __init__(self, comm, n_units: int, n_out: int = 10):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(None, n_units)
            self.bn1 = chainermn.MultiNodeBatchNormalization(n_units, comm)
            self.l2 = L.Linear(None, n_units)
            self.l3 = L.Linear(None, n_out)

    def forward(self, x):
        h = F.relu(self.bn1(self.l1(x)))
        h = F.relu(self.l2(h))
        return self.l3(h)


def load_fashion_mnist(path, n_train: int, n_test: int):
    """(train, test) TupleDatasets of float32 images in [0, 1] (784 values) and int32 labels."""
    from hpcsgd.data.datasets.fashion_mnist import FashionMNIST

    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        ds = FashionMNIST(path, split=split)
        x = ds.images[:n].reshape(min(n, len(ds.images)), -1).astype(np.float32) / 255.0
        out.append(chainer.datasets.TupleDataset(x, ds.labels[:n].astype(np.int32)))
    return out


def parameter_digest(model) -> int:
    """CRC32 of all parameters in name order (equal on every rank iff the replicas agree)."""
    crc = 0
    for _, p in sorted(model.namedparams()):
        crc = zlib.crc32(np.ascontiguousarray(p.array).tobytes(), crc)
    return crc


def example_digests(dataset) -> set[int]:
    """CRC32 of every example's image bytes (to check that the shards cover the dataset)."""
    return {zlib.crc32(np.ascontiguousarray(dataset[i][0]).tobytes()) for i in range(len(dataset))}


def replica_check(comm, model, test, batch_size: int) -> bool:
    """Every rank classifies rank 0's test batches; True when all ranks predict the same."""
    # Rank 0 draws the batches; the others iterate an empty dataset of the same length.
    local = test if comm.rank == 0 else chainermn.create_empty_dataset(test)
    it = chainermn.create_multi_node_iterator(
        chainer.iterators.SerialIterator(local, batch_size, repeat=False, shuffle=False), comm)
    preds = []
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        for batch in it:
            x, _ = chainer.dataset.concat_examples(batch)
            preds.append(model.predictor(x).array.argmax(axis=1))
    mine = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    return all(np.array_equal(mine, other) for other in comm.allgather_obj(mine))


def main(argv=None):
    parser = argparse.ArgumentParser(description="ChainerMN-style Fashion-MNIST on hpcsgd")
    parser.add_argument("--communicator", default="naive")
    parser.add_argument("--batchsize", "-b", type=int, default=50, help="per-rank minibatch")
    parser.add_argument("--epoch", "-e", type=int, default=3)
    parser.add_argument("--unit", "-u", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=6000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--out", "-o", default="result")
    parser.add_argument("--run-id", default="fmnist", help="checkpoint name (no '.')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="rank 0 writes the final results here")
    args = parser.parse_args(argv)

    chainermn.global_except_hook.add_hook()
    comm = chainermn.create_communicator(args.communicator)
    random.seed(args.seed)
    np.random.seed(args.seed)  # same initial weights everywhere (rank 0's are broadcast anyway)

    model = L.Classifier(MLP(comm, args.unit))
    model(np.zeros((2, 784), np.float32), np.zeros(2, np.int32))  # create the lazy weights
    model.cleargrads()
    optimizer = chainermn.create_multi_node_optimizer(chainer.optimizers.Adam(), comm)
    optimizer.setup(model)

    if comm.rank == 0:
        train, test = load_fashion_mnist(args.data, args.n_train, args.n_test)
    else:
        train, test = None, None
    full_digests = example_digests(train) if comm.rank == 0 else None
    train = chainermn.scatter_dataset(train, comm, shuffle=True, seed=args.seed)
    shard_union = set().union(*comm.allgather_obj(example_digests(train)))
    test_full = comm.bcast_obj(test)  # for the replica check
    test = chainermn.scatter_dataset(test, comm)

    np.random.seed(args.seed + comm.rank)  # each rank shuffles its own shard differently
    train_iter = chainer.iterators.SerialIterator(train, args.batchsize)
    test_iter = chainer.iterators.SerialIterator(test, args.batchsize, repeat=False, shuffle=False)

    updater = training.StandardUpdater(train_iter, optimizer)
    trainer = training.Trainer(updater, (args.epoch, "epoch"), out=args.out)

    evaluator = extensions.Evaluator(test_iter, model)
    evaluator = chainermn.create_multi_node_evaluator(evaluator, comm)
    trainer.extend(evaluator)

    checkpointer = chainermn.create_multi_node_checkpointer(name=args.run_id, comm=comm)
    trainer.extend(checkpointer, trigger=(1, "epoch"))

    if comm.rank == 0:
        trainer.extend(extensions.LogReport())
        trainer.extend(extensions.PrintReport(
            ["epoch", "main/loss", "validation/main/loss", "main/accuracy",
             "validation/main/accuracy", "elapsed_time"]))

    resumed = checkpointer.maybe_load(trainer, optimizer)
    if comm.rank == 0 and resumed is not None:
        print(f"resumed from iteration {resumed}", flush=True)
    trainer.run()

    final = evaluator()  # the Evaluator extension called without a trainer: its result dict
    result = {
        "ranks": comm.size,
        "resumed_from": resumed,
        "iteration": updater.iteration,
        "validation_accuracy": float(final["validation/main/accuracy"]),
        "validation_loss": float(final["validation/main/loss"]),
        "train_shard": len(train),
        "shards_cover_train": comm.bcast_obj(full_digests) == shard_union,
        "replicas_equal": len(set(comm.allgather_obj(parameter_digest(model)))) == 1,
        "predictions_equal": replica_check(comm, model, test_full, args.batchsize),
        "checkpoints": sorted(checkpointer.files),
    }
    if comm.rank == 0:
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
