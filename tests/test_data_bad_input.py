"""Messy files: odd modes decode to RGB; corrupt/missing files and dead workers fail fast and clearly."""

import logging
import os
import signal
import time

import numpy as np
import pytest
from data_fixtures import (
    ExitingTransform,
    index_images,
    make_folder,
    make_special_files,
    scramble,
    truncate,
    write_list,
)

from hpcsgd.data import DataWorkerError, FileListDataset, Loader, ResizeCenterCrop, build_dataset
from hpcsgd.errors import DataError


def test_special_modes_decode_to_rgb_in_workers(tmp_path):
    root = tmp_path / "imnet"
    expected = make_special_files(str(root / "train" / "odd"))
    ds = build_dataset("imagenet_folder", str(root))
    crop = ResizeCenterCrop(32, 32)
    with Loader(ds, len(ds), workers=1, shuffle=False, dtype="uint8", transform=crop) as ld:
        x, _ = next(iter(ld))
    for i, path in enumerate(ds.paths):
        want = np.array(expected[os.path.basename(path)])
        got = x[i].reshape(3, -1).mean(axis=1)
        assert np.abs(got - want).max() <= 2.0, (path, got, want)


@pytest.fixture
def broken_tree(tmp_path):
    root = str(tmp_path / "imnet")
    make_folder(root, per_class=3, splits=("train",))
    ds = build_dataset("imagenet_folder", root)
    truncate(ds.paths[1])
    scramble(ds.paths[5])
    return ds


def test_corrupt_file_raises_dataerror_naming_it(broken_tree):
    ds = broken_tree
    t0 = time.monotonic()
    with Loader(ds, 3, workers=2, shuffle=False, transform="train") as loader:
        with pytest.raises(DataError, match=r"cat/img1.JPEG: corrupt or truncated"):
            list(loader)
        loader.set_epoch(1)  # the pool survives an error: same error again, no hang
        with pytest.raises(DataError, match=r"cat/img1.JPEG: corrupt or truncated"):
            list(loader)
    rest = FileListDataset(ds.paths[3:], ds.labels[3:])
    with pytest.raises(DataError, match=r"dog/img2.JPEG: not a readable image"):
        list(Loader(rest, 3, workers=0, shuffle=False, transform="train"))
    assert time.monotonic() - t0 < 120  # not waiting out the 300 s worker timeout (load-proof bound)


def test_skip_counts_bad_files_and_keeps_batches_full(broken_tree, caplog):
    ds = broken_tree
    bad = {ds.paths[1], ds.paths[5]}
    with caplog.at_level(logging.WARNING, logger="hpcsgd.data"):
        with Loader(ds, 3, workers=2, seed=4, on_bad="skip", transform="train") as loader:
            batches = [t.copy() for _, t in loader]
            first = loader.last_epoch_bad_files
    messages = [r.getMessage() for r in caplog.records]
    again = [t.copy() for _, t in Loader(ds, 3, workers=0, seed=4, on_bad="skip", transform="train")]
    assert len(batches) == 3 and all(len(t) == 3 for t in batches)
    assert first >= 2 and loader.bad_files_total == first
    skipped = [m for m in messages if "skipped bad sample" in m]
    assert len(skipped) == first and {p for p in bad if any(p in m for m in skipped)} == bad
    assert any(f"epoch 0: skipped {first} bad files" in m for m in messages)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # replacements are reproducible


def test_missing_file_in_list(tmp_path):
    root = str(tmp_path / "imnet")
    make_folder(root, per_class=1, splits=("train",))
    ds = build_dataset("imagenet_folder", root)
    list_file = os.path.join(root, "train.txt")
    entries = list(zip(ds.paths, ds.labels)) + [(root + "/gone.JPEG", 0)]
    write_list(list_file, entries, root)
    listed = build_dataset("imagenet_list", list_file)
    with Loader(listed, 4, workers=1, shuffle=False, transform="eval") as loader:
        with pytest.raises(DataError, match=r"gone.JPEG: file not found"):
            list(loader)


def test_unreadable_class_directory(tmp_path, monkeypatch, caplog):
    root = str(tmp_path / "imnet")
    make_folder(root, per_class=1, splits=("train",))
    locked = os.path.join(root, "train", "dog")
    if os.geteuid() == 0:  # root reads anything: make the directory unreadable the way the OS would say
        real = os.scandir

        def scandir(path="."):
            if os.path.abspath(path) == locked:
                raise PermissionError(13, "Permission denied", path)
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
        monkeypatch.setattr(os, "access", lambda p, mode: os.path.abspath(p) != locked)
    else:
        os.chmod(locked, 0)
    try:
        with pytest.raises(DataError, match=r"train/dog: unreadable class folder"):
            build_dataset("imagenet_folder", root)
        with caplog.at_level(logging.WARNING, logger="hpcsgd.data"):
            ds = build_dataset("imagenet_folder", root, on_bad="skip")
        assert len(ds) == 2 and ds.bad_entries == 1
        assert any("train/dog" in r.getMessage() for r in caplog.records)
    finally:
        os.chmod(locked, 0o755)


def test_sigkilled_worker_is_reported_within_seconds():
    ds = build_dataset("arrays", images=index_images(64), labels=np.zeros(64))
    with Loader(ds, 4, workers=2, prefetch=2) as loader:
        it = iter(loader)
        next(it)
        victim = loader.worker_pids[1]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        want = rf"data worker 1 \(pid {victim}\) died: killed by signal SIGKILL"
        with pytest.raises(DataWorkerError, match=want):
            for _ in it:
                pass
        assert time.monotonic() - t0 < 60  # not waiting out the 300 s worker timeout (load-proof bound)


def test_worker_exit_code_and_hang_are_reported():
    ds = build_dataset("arrays", images=index_images(16), labels=np.zeros(16))
    with Loader(ds, 4, workers=1, shuffle=False, transform=ExitingTransform(6, code=3)) as loader:
        with pytest.raises(DataWorkerError, match=r"data worker 0 \(pid \d+\) died: exited with code 3"):
            list(loader)
    t0 = time.monotonic()
    hang = ExitingTransform(6, hang=True)
    with Loader(ds, 4, workers=1, shuffle=False, timeout=2, transform=hang) as loader:
        with pytest.raises(DataWorkerError, match="no answer from data workers"):
            list(loader)
    assert time.monotonic() - t0 < 60  # the 2 s timeout fired, not the hang (load-proof bound)


def test_every_planted_defect_is_named_and_odd_files_are_decoded(tmp_path):
    """Zero-byte, truncated, random bytes, listed-but-missing: skipped and named. Grayscale, CMYK and
    PNG named .JPEG: decodable, so converted to RGB and never skipped."""
    root = tmp_path / "imnet"
    make_folder(str(root), per_class=2, splits=("train",))
    good = build_dataset("imagenet_folder", str(root))
    odd = make_special_files(str(root / "odd"))
    bad = {k: str(root / f"{k}.JPEG") for k in ("zero", "noise", "gone")}
    open(bad["zero"], "wb").close()
    scramble(bad["noise"])
    truncate(good.paths[0])
    bad["truncated"] = good.paths[0]
    entries = list(zip(good.paths, good.labels)) + [(str(root / "odd" / n), 0) for n in odd]
    entries += [(bad["zero"], 1), (bad["noise"], 1), (bad["gone"], 2)]
    write_list(str(root / "train.txt"), entries, str(root))
    ds = build_dataset("imagenet_list", str(root / "train.txt"))
    crop = ResizeCenterCrop(16, 16)
    with Loader(ds, len(ds), workers=1, shuffle=False, on_bad="skip", transform=crop) as ld:
        list(ld)
        named = ld.skipped_files
        state = ld.state_dict()
    assert set(named) == set(bad.values()), named  # exactly the bad ones, each by its path
    assert state["skipped_files"] == named  # a checkpoint keeps them
    for name, cause in [("zero", "not a readable image"), ("noise", "not a readable image"),
                        ("gone", "file not found"), ("truncated", "corrupt or truncated")]:
        one = FileListDataset([bad[name], good.paths[1]], [0, 0])
        with pytest.raises(DataError, match=f"{bad[name]}: {cause}"):
            list(Loader(one, 2, workers=0, shuffle=False, transform=ResizeCenterCrop(16, 16)))


def test_dataset_options_a_kind_does_not_use_are_errors(tmp_path):
    from hpcsgd.errors import ConfigError

    with pytest.raises(ConfigError, match="dataset 'imagenet_list' does not use 'on_bad'"):
        build_dataset("imagenet_list", str(tmp_path), on_bad="skip")
    with pytest.raises(ConfigError, match="dataset 'fashion_mnist' does not use 'shape'"):
        build_dataset("fashion_mnist", None, shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="does not use 'size'.*options: shape, n_classes, n, seed, pool"):
        build_dataset("synthetic", size=3)
