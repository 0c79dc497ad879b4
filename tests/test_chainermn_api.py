"""ChainerMN's training-script API through ``import hpcsgd as chainermn`` (hpcsgd.chainermn_api)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import hpcsgd as chainermn
from hpcsgd.chainermn_api.datasets import _index_range
from hpcsgd.data.datasets.fashion_mnist import DEFAULT_PATH

ROOT = Path(__file__).resolve().parent.parent
HAVE_FMNIST = os.path.exists(os.path.join(DEFAULT_PATH, "train-images-idx3-ubyte.gz"))


@pytest.mark.parametrize("n,size", [(0, 3), (5, 4), (10, 4), (64, 4), (7, 1), (3, 8)])
def test_index_range_matches_chainermn_doc(n, size):
    ranges = [_index_range(n, size, i, True) for i in range(size)]
    length = -(-n // size)
    assert ranges == [(n * i // size, n * i // size + length) for i in range(size)]
    assert all(e <= n for _, e in ranges)
    disjoint = [_index_range(n, size, i, False) for i in range(size)]
    assert [e - b for b, e in disjoint] == [n // size + (i < n % size) for i in range(size)]
    assert disjoint[0][0] == 0 and disjoint[-1][1] == n
    assert all(disjoint[i][1] == disjoint[i + 1][0] for i in range(size - 1))


def test_public_names_and_bad_input():
    for name in ("scatter_dataset", "create_empty_dataset", "create_multi_node_evaluator",
                 "create_multi_node_checkpointer", "MultiNodeBatchNormalization",
                 "create_multi_node_iterator", "global_except_hook"):
        assert getattr(chainermn, name) is not None
    assert callable(chainermn.global_except_hook.add_hook)

    class OneRank:
        size, rank = 1, 0

    with pytest.raises(ValueError, match="without '.'"):
        chainermn.create_multi_node_checkpointer("a.b", OneRank())
    with pytest.raises(ValueError, match="cp_interval"):
        chainermn.create_multi_node_checkpointer("a", OneRank(), cp_interval=0)
    with pytest.raises(ValueError, match="communication_backend"):
        chainermn.MultiNodeBatchNormalization(3, OneRank(), communication_backend="gloo")
    with pytest.raises(ValueError, match="channel count"):
        chainermn.MultiNodeBatchNormalization((3, 4), OneRank())
    with pytest.raises(TypeError, match="evaluate"):
        chainermn.create_multi_node_evaluator(object(), OneRank())


@pytest.mark.parametrize("n", [1, 2, 4])
def test_api_semantics_at_n_ranks(mpirun, tmp_path, n):
    res = mpirun("tests/mpi/check_chainermn_api.py", n, [str(tmp_path)], timeout=120)
    assert "OK" in res.stdout, res.stdout + res.stderr


def test_api_semantics_two_virtual_nodes(mpirun, tmp_path):
    res = mpirun("tests/mpi/check_chainermn_api.py", 4, [str(tmp_path)], timeout=120,
                 env={"HPCSGD_RANKS_PER_NODE": "2"})
    assert "OK" in res.stdout


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")
def test_chainermn_style_example_two_ranks(mpirun, tmp_path):
    """The example reaches the accuracy of a correct run; broken averaging or scatter fails it.

    Seeded run: 3 epochs of 3000 examples per rank; seeds 0, 1, 2 reach validation accuracy
    0.832, 0.834, 0.844 (loss 0.458, 0.475, 0.436) on 2000 test images. Without gradient
    averaging ('dummy' communicator) the replicas differ (replicas_equal, predictions_equal)
    and accuracy drops to 0.78 (loss 0.59); a wrong scatter changes the shard size or leaves
    examples out (shards_cover_train).
    """
    out = tmp_path / "result.json"
    mpirun("examples/train_mnist_chainermn_style.py", 2,
           ["--out", str(tmp_path / "out"), "--json", str(out)], timeout=150)
    result = json.loads(out.read_text())
    assert result["ranks"] == 2 and result["train_shard"] == 3000 and result["iteration"] == 180
    assert result["shards_cover_train"]
    assert result["replicas_equal"] and result["predictions_equal"]
    assert result["validation_accuracy"] >= 0.80, result
    assert np.isfinite(result["validation_loss"]) and result["validation_loss"] < 0.55, result
    assert result["checkpoints"] == []  # finalize() removed them after the successful run
