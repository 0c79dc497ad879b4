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


def build_dataset(kind: str, path: str | None = None, split: str = "train", **kw) -> Dataset:
    """Build a dataset by name.

    kinds:
        'fashion_mnist': IDX files under ``path`` (default /usr/share/datasets/fashion-mnist);
            split 'train' or 'test'/'val'.
        'imagenet_folder': ``path/split/<class>/*.JPEG``; kw ``on_bad`` ('error' | 'skip') for
            unreadable class folders.
        'imagenet_list': ``path`` is a list file of ``relpath label`` lines (or a folder holding
            ``split.txt``); kw ``root`` (default: the list file's folder).
        'synthetic': no I/O; kw ``shape`` (C, H, W), ``n_classes``, ``n``, ``seed``.
        'arrays': in-memory; kw ``images`` uint8 (N, H, W[, C]), ``labels``.
    """
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
    if kind == "arrays":
        return ArrayDataset(kw.pop("images"), kw.pop("labels"), **kw)
    raise ConfigError(f"unknown dataset kind {kind!r}; choose from {', '.join(KINDS)}")


__all__ = ["ArrayDataset", "ConfigError", "DataWorkerError", "Dataset", "FashionMNIST", "FileListDataset",
           "Identity", "KINDS", "Loader", "Normalize", "PadRandomCrop", "RandomResizedCrop",
           "ResizeCenterCrop", "SyntheticDataset", "build_dataset", "epoch_permutation", "epoch_plan",
           "eval_shard", "image_folder", "image_list", "iterations_per_epoch"]
