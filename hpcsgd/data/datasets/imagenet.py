"""ImageNet-style file datasets: the class-folder layout and Chainer's list-file form.

Folder layout: ``ROOT/train/<class>/*.JPEG`` and ``ROOT/val/<class>/*.JPEG``;
classes are the sorted folder names of ``ROOT/train`` (so ``val`` gets the same
label numbers even if it lacks a class), else of the split's own folder.

List form (Chainer's ImageNet example, ``LabeledImageDataset``): a text file of
``relative/path.JPEG label`` lines, paths relative to ``root`` (default: the list
file's folder). Blank lines and ``#`` comments are skipped.

Files are not opened here: a missing or corrupt file is reported when it is
loaded (the loader's ``on_bad`` decides). Unreadable folders are reported here.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from hpcsgd.data.datasets.base import Dataset
from hpcsgd.errors import DataError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
log = logging.getLogger("hpcsgd.data")


class FileListDataset(Dataset):
    """Image files with labels (both ImageNet forms build one of these)."""

    def __init__(self, paths: list[str], labels, n_classes: int | None = None, classes=None):
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.classes = list(classes) if classes is not None else None
        self.n_classes = int(n_classes if n_classes is not None else (self.labels.max(initial=-1) + 1))
        self.bad_entries = 0

    def source(self, i: int) -> str:
        return self.paths[i]


def _scan(path: str, on_bad: str, what: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except FileNotFoundError as e:
        raise DataError(f"{path}: {what} not found") from e
    except (PermissionError, NotADirectoryError, OSError) as e:
        msg = f"{path}: unreadable {what} ({type(e).__name__}: {e.strerror or e})"
        if on_bad == "skip":
            log.warning("skipping %s", msg)
            return []
        raise DataError(msg) from e


def image_folder(root: str, split: str = "train", on_bad: str = "error") -> FileListDataset:
    """``root/split/<class>/<image>`` (or ``root/<class>/<image>`` when ``split`` is None)."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: ImageNet folder not found (expected {root}/{split or ''}/<class>/*.JPEG)")
    split_dir = os.path.join(root, split) if split else root
    train_dir = os.path.join(root, "train")
    class_src = train_dir if split and os.path.isdir(train_dir) else split_dir
    classes = [e.name for e in _scan(class_src, "error", "class folder") if e.is_dir()]
    if not classes:
        raise DataError(f"{class_src}: no class folders (expected <class>/*.JPEG)")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, skipped = [], [], 0
    for entry in _scan(split_dir, "error", "split folder"):
        if not entry.is_dir():
            continue
        if entry.name not in index:
            raise DataError(f"{entry.path}: class {entry.name!r} is not among the {len(classes)} "
                            f"classes of {class_src}")
        files = _scan(entry.path, on_bad, "class folder")
        if not files and not os.access(entry.path, os.R_OK):
            skipped += 1
        for f in files:
            if f.name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(f.path)
                labels.append(index[entry.name])
    if not paths:
        raise DataError(f"{split_dir}: no image files found")
    ds = FileListDataset(paths, labels, n_classes=len(classes), classes=classes)
    ds.bad_entries = skipped
    return ds


def image_list(list_file: str, root: str | None = None, split: str = "train") -> FileListDataset:
    """Chainer-style list of ``path label`` lines (``list_file`` may be a folder holding ``split.txt``)."""
    if os.path.isdir(list_file):
        list_file = os.path.join(list_file, f"{split}.txt")
    root = os.path.dirname(os.path.abspath(list_file)) if root is None else root
    try:
        with open(list_file) as f:
            lines = f.readlines()
    except FileNotFoundError as e:
        raise DataError(f"{list_file}: list file not found") from e
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as e:
        raise DataError(f"{list_file}: unreadable list file ({type(e).__name__}: {e})") from e
    paths, labels = [], []
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(None, 1)
        try:
            if len(parts) != 2:
                raise ValueError
            label = int(parts[1])
            if label < 0:
                raise ValueError
        except ValueError:
            raise DataError(f"{list_file}:{lineno}: expected 'path label' with a non-negative integer "
                            f"label, got {text!r}") from None
        paths.append(os.path.join(root, parts[0]))
        labels.append(label)
    if not paths:
        raise DataError(f"{list_file}: no entries")
    return FileListDataset(paths, labels)
