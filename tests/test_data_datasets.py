"""Dataset readers: Fashion-MNIST IDX (gz and raw), ImageNet folder and list forms, synthetic."""

import gzip
import os
import shutil
import struct

import numpy as np
import pytest
from data_fixtures import make_folder, write_list

from hpcsgd.data import Loader, build_dataset
from hpcsgd.data.datasets.fashion_mnist import DEFAULT_PATH
from hpcsgd.errors import ConfigError, DataError

HAVE_FMNIST = os.path.exists(os.path.join(DEFAULT_PATH, "t10k-images-idx3-ubyte.gz"))


def write_idx(path, arr, gz):
    head = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_raw_and_gzip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
    ds = build_dataset("fashion_mnist", str(tmp_path), split="test")
    assert len(ds) == 7 and ds.channels == 1 and ds.image_hw == (28, 28)
    assert np.array_equal(ds.images[:, :, :, 0], images) and np.array_equal(ds.labels, labels)
    x, t = next(iter(Loader(ds, 7, workers=0, shuffle=False, dtype="uint8")))
    assert np.array_equal(x[:, 0], images) and np.array_equal(t, labels)


def test_idx_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion_mnist", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion_mnist", str(tmp_path))  # folder exists, files don't
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28)), False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((3, 28)), False)  # wrong rank
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: not an IDX uint8 file with 1"):
        build_dataset("fashion_mnist", str(tmp_path))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3), False)
    data = open(tmp_path / "train-images-idx3-ubyte", "rb").read()
    open(tmp_path / "train-images-idx3-ubyte", "wb").write(data[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: truncated IDX"):
        build_dataset("fashion_mnist", str(tmp_path))
    with pytest.raises(ConfigError):
        build_dataset("fashion_mnist", str(tmp_path), split="nope")


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist():
    ds = build_dataset("fashion_mnist", split="test")
    assert len(ds) == 10000 and ds.n_classes == 10
    assert np.bincount(ds.labels) .tolist() == [1000] * 10
    assert abs(ds.images.mean() - 73.1) < 1.0  # test-set pixel mean, in 0..255 units


def test_folder_and_list_forms_agree(tmp_path):
    root = str(tmp_path / "imnet")
    truth = make_folder(root, per_class=2)
    train = build_dataset("imagenet_folder", root, split="train")
    val = build_dataset("imagenet_folder", root, split="val")
    assert train.classes == ["cat", "dog", "eel"] and len(train) == len(val) == 6
    for ds in (train, val):
        for i in range(len(ds)):
            assert truth[ds.paths[i]] == ds.labels[i]
    list_file = str(tmp_path / "train.txt")
    write_list(list_file, zip(train.paths, train.labels), root)
    listed = build_dataset("imagenet_list", list_file, root=root)
    assert listed.paths == train.paths and np.array_equal(listed.labels, train.labels)
    shutil.move(list_file, os.path.join(root, "train.txt"))  # root is the list's folder by default
    assert build_dataset("imagenet_list", root, split="train").paths == train.paths


def test_val_uses_train_class_numbering(tmp_path):
    root = str(tmp_path / "imnet")
    make_folder(root, classes=("a", "b", "c"), per_class=1)
    shutil.rmtree(os.path.join(root, "val", "a"))
    val = build_dataset("imagenet_folder", root, split="val")
    assert sorted(set(val.labels.tolist())) == [1, 2]
    os.makedirs(os.path.join(root, "val", "zzz"))
    with pytest.raises(DataError, match="class 'zzz' is not among"):
        build_dataset("imagenet_folder", root, split="val")


def test_list_file_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a.JPEG 1\nb.JPEG cat\n")
    with pytest.raises(DataError, match=r"bad.txt:2: expected 'path label'"):
        build_dataset("imagenet_list", str(bad))
    with pytest.raises(DataError, match="list file not found"):
        build_dataset("imagenet_list", str(tmp_path / "none.txt"))
    with pytest.raises(DataError, match="ImageNet folder not found"):
        build_dataset("imagenet_folder", str(tmp_path / "none"))


def test_synthetic_any_shape_no_io():
    ds = build_dataset("synthetic", shape=(2, 5, 7), n_classes=3, n=1000, seed=1)
    assert len(ds) == 1000 and set(np.unique(ds.labels)) == {0, 1, 2}
    x, t = next(iter(Loader(ds, 10, workers=0)))
    assert x.shape == (10, 2, 5, 7) and x.dtype == np.float32 and t.dtype == np.int32
    assert abs(float(x.mean())) < 0.2 and abs(float(x.std()) - 1.0) < 0.2
    assert build_dataset("synthetic", shape=(9, 9), n=3).channels == 1
    with pytest.raises(ConfigError):
        build_dataset("synthetic", shape=(1, 2, 3, 4))
    with pytest.raises(ConfigError, match="unknown dataset kind"):
        build_dataset("cifar")
