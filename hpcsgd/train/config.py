"""Training configuration: schema, defaults, YAML + ``--set`` overrides, validation.

A config is a flat mapping of the keys in :data:`SCHEMA` (nested dicts only
for the ``*_options`` keys, which are passed through to the component that
owns them). Sources, later wins:

1. the defaults below;
2. the YAML file (``hpcsgd train CONFIG.yaml``);
3. ``--set key=value`` overrides (value parsed as YAML: ``--set epochs=2.5``,
   ``--set model_options={depth: 8}``, ``--set model_options.width=16``).

:func:`resolve` then checks every key and derives the batch arithmetic. It
needs only the world size (``MPI.COMM_WORLD.Get_size()``, a local call), so
every rank validates the same file identically *before* any collective and a
bad config exits non-zero on all ranks with a message naming the key.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from hpcsgd.errors import ConfigError


@dataclass(frozen=True)
class Key:
    default: Any
    help: str
    types: tuple = ()  # accepted Python types; () = anything
    choices: tuple = ()


_NUM = (int, float)
DATASETS = ("fashion_mnist", "imagenet_folder", "imagenet_list", "synthetic")
RECIPES = ("goyal", "akiba", "lars", "sgd", "custom")
COMMUNICATORS = ("hierarchical", "flat", "naive", "nccl", "dummy")
WIRE_DTYPES = (None, "float16", "bfloat16", "float32")
BN_MODES = ("batch", "recompute", "running", "sync")
ON_BAD = ("error", "skip")
LOSSES = ("softmax_cross_entropy",)

#: Number of training/validation samples per dataset kind, used by ``--dry-run`` when
#: the data are not on this machine (ImageNet-1k: 1,281,167 train / 50,000 val).
KNOWN_SIZES = {
    "imagenet_folder": (1281167, 50000, 1000),
    "imagenet_list": (1281167, 50000, 1000),
    "fashion_mnist": (60000, 10000, 10),
}

FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"

SCHEMA: dict[str, Key] = {
    # model
    "model": Key("resnet_small", "model name for hpcsgd.models.build_model", (str,)),
    "model_options": Key({}, "extra keyword arguments of build_model (e.g. depth, width)", (dict,)),
    "bn_mode": Key("running", "BatchNorm statistics: batch|recompute|running|sync", (str,), BN_MODES),
    "zero_init_residual": Key(False, "gamma=0 for the last BN of each residual block (Goyal)", (bool,)),
    # data
    "dataset": Key("fashion_mnist", "dataset kind for hpcsgd.data.build_dataset", (str,), DATASETS),
    "data_path": Key(None, "training data path (None: the dataset's default)", (str, type(None))),
    "val_path": Key(None, "validation data path (None: same as data_path)", (str, type(None))),
    "dataset_options": Key({}, "extra keyword arguments of build_dataset (e.g. synthetic shape, n)",
                           (dict,)),
    "train_size": Key(None, "training samples, only to plan a --dry-run without the data", (int, type(None))),
    "loader_workers": Key(2, "loader worker threads/processes per rank", (int,)),
    "prefetch": Key(2, "batches prefetched per rank", (int,)),
    "augment": Key(True, "random training transform ('train'); False: the 'eval' transform", (bool,)),
    "on_bad": Key("error", "an unreadable image or class folder: error (stop, naming it) | skip (replace "
                           "it, count and name it in the log and summary.json)", (str,), ON_BAD),
    # batch arithmetic
    "batch_per_rank": Key(32, "images per rank per micro-batch", (int,)),
    "global_batch": Key(None, "images per optimizer step over all ranks (None: ranks x batch x accum)",
                        (int, type(None))),
    "grad_accumulation": Key(None, "micro-batches per step (None: derived from global_batch, else 1)",
                             (int, type(None))),
    # optimisation
    "recipe": Key("sgd", "learning-rate/optimizer recipe: goyal|akiba|lars|sgd, or custom (optimizer + "
                         "schedule keys)", (str,), RECIPES),
    "recipe_options": Key({}, "overrides of the named recipe's settings (lr, momentum, weight_decay, "
                              "warmup_epochs, milestones, decay, ...)", (dict,)),
    "optimizer": Key({}, "recipe custom: {name: momentum_sgd|sgd|rmsprop|adam|lars, weight_decay, ...}",
                     (dict,)),
    "schedule": Key({}, "recipe custom: {type: constant|step|cosine|poly, lr, warmup_epochs, ...}", (dict,)),
    "loss": Key("softmax_cross_entropy", "training loss (hpcsgd.losses)", (str,), LOSSES),
    "label_smoothing": Key(0.0, "smoothed targets (1 - eps) onehot + eps / classes; 0: plain "
                                "cross-entropy (validation loss is always plain)", _NUM),
    "epochs": Key(1.0, "training epochs (fractional allowed)", _NUM),
    "stop_iteration": Key(None, "stop (and checkpoint) after this iteration; the schedule still "
                                "spans all epochs", (int, type(None))),
    "seed": Key(0, "seed for parameters, shuffling and augmentation", (int,)),
    # communication
    "communicator": Key("hierarchical", "hpcsgd.create_communicator name", (str,), COMMUNICATORS),
    "wire_dtype": Key(None, "allreduce wire format (None: the communicator's default)",
                      (str, type(None)), WIRE_DTYPES),
    "communicator_options": Key({}, "extra communicator config (bucket_bytes, intra_dtype, ...)", (dict,)),
    "double_buffering": Key(False, "ChainerMN-style double buffering (one step stale)", (bool,)),
    "overlap": Key(False, "start each gradient bucket's allreduce during backward (hpcsgd.comm.overlap); "
                          "off by default: on one shared-memory node it measured no gain", (bool,)),
    # compute
    "gpu": Key(False, "run on CuPy, one GPU per rank (intra_rank)", (bool,)),
    "threads": Key(1, "BLAS/compute threads per rank", (int,)),
    "kernels": Key(None, "hpcsgd.kernels fast CPU kernels (None: on for CPU)", (bool, type(None))),
    # evaluation, logging, checkpoints
    "eval_interval": Key(1.0, "evaluate every this many epochs (0: only at the end)", _NUM),
    "eval_batch": Key(250, "validation images per rank per batch", (int,)),
    "log_interval": Key(20, "iterations between logged/aggregated records", (int,)),
    "checkpoint_interval": Key(0, "iterations between checkpoints (0: only at the end)", (int,)),
    "keep_checkpoints": Key(3, "number of most recent checkpoints kept", (int,)),
    "progress": Key(True, "tqdm progress bar on rank 0", (bool,)),
    "noise_scale": Key(True, "log the gradient noise scale B_noise (runs with > 1 rank or micro-batch; "
                             "docs/noise_scale.md)", (bool,)),
    "noise_scale_ema": Key(0.99, "EMA decay per step of the noise-scale norms (time constant "
                                 "1/(1-decay) steps)", _NUM),
}


def defaults() -> dict:
    return {k: copy.deepcopy(v.default) for k, v in SCHEMA.items()}


def load_yaml(path: str) -> dict:
    """Read a config file; the error names the file."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must be a mapping of key: value, got {type(data).__name__}")
    return data


def _check_key(key: str) -> None:
    if key not in SCHEMA:
        import difflib

        near = difflib.get_close_matches(key, SCHEMA, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"unknown config key {key!r}{hint}; known keys: {', '.join(sorted(SCHEMA))}")


def apply_override(cfg: dict, item: str) -> None:
    """Apply one ``key=value`` (value parsed as YAML); ``a.b=v`` sets a field of an ``*_options`` dict."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from e
    top, _, sub = key.partition(".")
    _check_key(top)
    if sub:
        if not isinstance(cfg.get(top), dict):
            raise ConfigError(f"--set {key}: {top!r} is not a mapping")
        cfg[top] = dict(cfg[top], **{sub: value})
    else:
        cfg[top] = value


def merge(file_cfg: dict, overrides: list[str] = ()) -> dict:
    """Defaults <- file <- overrides, with unknown keys rejected by name."""
    cfg = defaults()
    for key, value in file_cfg.items():
        _check_key(key)
        cfg[key] = value
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def _check_types(cfg: dict) -> None:
    for key, spec in SCHEMA.items():
        value = cfg[key]
        if spec.types:
            ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
            if not ok:
                names = "|".join("null" if t is type(None) else t.__name__ for t in spec.types)
                raise ConfigError(f"config key {key!r} must be {names}, got {value!r}")
        if spec.choices and value not in spec.choices:
            raise ConfigError(f"config key {key!r} must be one of {list(spec.choices)}, got {value!r}")


def _positive(cfg: dict, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        v = cfg[key]
        if v is None:
            continue
        if v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"config key {key!r} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")


def resolve(cfg: dict, world_size: int, check_paths: bool = True,
            path_exists: Callable[[str], bool] = os.path.exists) -> dict:
    """Validate ``cfg`` for ``world_size`` ranks and fill the derived keys.

    Adds ``world_size``, ``grad_accumulation`` and ``global_batch`` (images per
    optimizer step). Raises :class:`ConfigError` naming the key. Purely local:
    no MPI call.
    """
    cfg = dict(cfg)
    _check_types(cfg)
    _positive(cfg, "batch_per_rank", "global_batch", "grad_accumulation", "epochs", "threads",
              "eval_batch", "log_interval", "keep_checkpoints")
    _positive(cfg, "loader_workers", "prefetch", "eval_interval", "checkpoint_interval", "stop_iteration",
              allow_zero=True)
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if cfg["overlap"] and cfg["double_buffering"]:
        raise ConfigError("config keys 'overlap' and 'double_buffering' are alternatives; set one of them")
    per_step = world_size * cfg["batch_per_rank"]
    accum, glob = cfg["grad_accumulation"], cfg["global_batch"]
    if glob is None:
        accum = accum or 1
        glob = per_step * accum
    elif accum is None:
        if glob % per_step:
            raise ConfigError(
                f"config key 'global_batch'={glob} is not divisible by ranks x batch_per_rank = "
                f"{world_size} x {cfg['batch_per_rank']} = {per_step}")
        accum = glob // per_step
    elif glob != per_step * accum:
        raise ConfigError(
            f"config key 'global_batch'={glob} must equal ranks x batch_per_rank x grad_accumulation = "
            f"{world_size} x {cfg['batch_per_rank']} x {accum} = {per_step * accum}")
    cfg["global_batch"], cfg["grad_accumulation"], cfg["world_size"] = glob, accum, world_size
    check_combinations(cfg)
    if cfg["kernels"] is None:
        cfg["kernels"] = not cfg["gpu"]
    if check_paths:
        if cfg["dataset"] == "fashion_mnist" and cfg["data_path"] is None \
                and not path_exists(FASHION_MNIST_DEFAULT):
            raise ConfigError(
                f"config key 'data_path' is unset and the default Fashion-MNIST directory "
                f"{FASHION_MNIST_DEFAULT} does not exist: apt-get install dataset-fashion-mnist, or set "
                f"data_path, or run on synthetic data with --set dataset=synthetic")
        for key in ("data_path", "val_path"):
            p = cfg[key]
            if p is not None and not path_exists(p):
                raise ConfigError(f"config key {key!r}: dataset path {p!r} does not exist")
    return cfg


def check_combinations(cfg: dict) -> None:
    """Keys that are valid alone but not together: ConfigError naming both (or the unused one).

    Every rejected pair would otherwise fail late (after the communicator exists)
    or, worse, be silently ignored.
    """
    for key in ("optimizer", "schedule"):
        if cfg[key] and cfg["recipe"] != "custom":
            raise ConfigError(f"config key {key!r} is only used with recipe: custom (recipe is "
                              f"{cfg['recipe']!r}; its settings go in recipe_options)")
    if cfg["recipe"] == "custom" and cfg["recipe_options"]:
        raise ConfigError("config key 'recipe_options' does not apply to recipe: custom "
                          "(use the optimizer and schedule keys)")
    if cfg["communicator"] == "nccl" and not cfg["gpu"]:
        raise ConfigError(f"config key 'communicator'={cfg['communicator']!r} needs gpu: true")
    from hpcsgd.comm import check_combination  # the communicators' declared capabilities

    check_combination(cfg["communicator"], overlap=cfg["overlap"], double_buffering=cfg["double_buffering"],
                      gpu=cfg["gpu"])
    if cfg["communicator"] == "dummy" and cfg["world_size"] > 1:
        raise ConfigError("config key 'communicator'='dummy' does not average gradients (it measures "
                          f"packing only): with world size {cfg['world_size']} the replicas would diverge")
    if cfg["kernels"] and cfg["gpu"]:
        raise ConfigError("config keys 'kernels' and 'gpu': hpcsgd.kernels are CPU kernels; "
                          "set kernels: false (or leave it unset) with gpu: true")
    if not 0.0 < cfg["noise_scale_ema"] < 1.0:
        raise ConfigError(f"config key 'noise_scale_ema' must be in (0, 1), got {cfg['noise_scale_ema']!r}")
    if not 0.0 <= cfg["label_smoothing"] < 1.0:
        raise ConfigError(f"config key 'label_smoothing' must be in [0, 1), got {cfg['label_smoothing']!r}")
    if cfg["dataset"] in ("imagenet_folder", "imagenet_list") and cfg["data_path"] is None:
        raise ConfigError(f"config key 'data_path' is required for dataset {cfg['dataset']!r}")
    if cfg["dataset"] == "synthetic":
        for key in ("data_path", "val_path"):
            if cfg[key] is not None:
                raise ConfigError(f"config keys {key!r} and 'dataset': synthetic data reads no files; "
                                  f"remove {key}")
    if "on_bad" in cfg["dataset_options"]:
        raise ConfigError("config key 'dataset_options.on_bad': on_bad is a top-level key (it governs the "
                          "loader as well as the folder scan); set on_bad: skip instead")


def describe() -> str:
    """One line per key: name, default, help (for ``hpcsgd train --help-config``)."""
    width = max(map(len, SCHEMA))
    return "\n".join(f"  {k:<{width}}  {v.default!r:<14} {v.help}" for k, v in SCHEMA.items())


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
