"""Data input for hpcsgd: datasets, transforms, sharding and the pipelined loader.

    from hpcsgd.data import build_dataset, Loader, eval_shard
    ds = build_dataset("imagenet_folder", "/data/imagenet", split="train")
    loader = Loader(ds, 32, rank=comm.rank, size=comm.size, seed=0, workers=2, transform="train")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, t in loader: ...

See docs/data.md for formats, the worker start method and the remainder policy.
"""

from __future__ import annotations

from hpcsgd.data.datasets import (
    ArrayDataset,
    Dataset,
    FashionMNIST,
    FileListDataset,
    SyntheticDataset,
    image_folder,
    image_list,
)
from hpcsgd.data.loader import Loader
from hpcsgd.data.pipeline import DataWorkerError
from hpcsgd.data.sharding import epoch_permutation, epoch_plan, eval_shard, iterations_per_epoch
from hpcsgd.data.transforms import Identity, Normalize, PadRandomCrop, RandomResizedCrop, ResizeCenterCrop
from hpcsgd.errors import ConfigError

KINDS = ("fashion_mnist", "imagenet_folder", "imagenet_list", "synthetic", "arrays")

#: The keyword options each dataset kind uses; any other raises ConfigError naming it
#: (a misspelt or misplaced option must not be silently ignored).
OPTIONS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": (),
    "imagenet_folder": ("on_bad",),
    "imagenet_list": ("root",),
    "synthetic": ("shape", "n_classes", "n", "seed", "pool"),
    "arrays": ("images", "labels", "n_classes", "layout", "mean", "std"),
}


def check_options(kind: str, options, where: str = "dataset options") -> None:
    """ConfigError naming every option in ``options`` that dataset ``kind`` does not use."""
    if kind not in OPTIONS:
        raise ConfigError(f"unknown dataset kind {kind!r}; choose from {', '.join(KINDS)}")
    unknown = sorted(set(options) - set(OPTIONS[kind]))
    if unknown:
        allowed = ", ".join(OPTIONS[kind]) or "none"
        raise ConfigError(f"{where}: dataset {kind!r} does not use {', '.join(map(repr, unknown))} "
                          f"(its options: {allowed})")


def build_dataset(kind: str, path: str | None = None, split: str = "train", **kw) -> Dataset:
    """Build a dataset by name; an option the kind does not use raises ConfigError naming it.

    kinds:
        'fashion_mnist': IDX files under ``path`` (default /usr/share/datasets/fashion-mnist);
            split 'train' or 'test'/'val'.
        'imagenet_folder': ``path/split/<class>/*.JPEG``; kw ``on_bad`` ('error' | 'skip') for
            unreadable class folders.
        'imagenet_list': ``path`` is a list file of ``relpath label`` lines (or a folder holding
            ``split.txt``); kw ``root`` (default: the list file's folder).
        'synthetic': no I/O; kw ``shape`` (C, H, W), ``n_classes``, ``n``, ``seed``, ``pool``.
        'arrays': in-memory; kw ``images`` uint8 (N, H, W[, C]), ``labels``, ``n_classes``,
            ``layout``, ``mean``, ``std``.

    Bad files inside a dataset (corrupt, missing) are the loader's ``on_bad`` to handle.
    """
    check_options(kind, kw)
    if kind == "fashion_mnist":
        return FashionMNIST(path, split)
    if kind == "imagenet_folder":
        if path is None:
            raise ConfigError("imagenet_folder needs path= (the folder holding train/ and val/)")
        return image_folder(path, split, on_bad=kw.pop("on_bad", "error"))
    if kind == "imagenet_list":
        if path is None:
            raise ConfigError("imagenet_list needs path= (a 'path label' list file)")
        return image_list(path, root=kw.pop("root", None), split=split)
    if kind == "synthetic":
        return SyntheticDataset(**kw)
    return ArrayDataset(kw.pop("images"), kw.pop("labels"), **kw)


__all__ = ["ArrayDataset", "ConfigError", "DataWorkerError", "Dataset", "FashionMNIST", "FileListDataset",
           "Identity", "KINDS", "Loader", "OPTIONS", "Normalize", "PadRandomCrop", "RandomResizedCrop",
           "ResizeCenterCrop", "SyntheticDataset", "build_dataset", "check_options", "epoch_permutation",
           "epoch_plan", "eval_shard", "image_folder", "image_list", "iterations_per_epoch"]
