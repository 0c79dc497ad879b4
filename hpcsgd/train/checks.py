"""The ``*_options`` keys and the recipe, checked against the component that will use them.

:func:`hpcsgd.train.config.resolve` checks the schema and the keys against
each other; the options passed through to a component (dataset, model,
communicator, recipe) are checked here against that component, so a misspelt
or misplaced option is a :class:`ConfigError` naming it before any collective
(instead of a late error on some ranks, or an option silently ignored). Local
only: nothing here touches MPI beyond importing a communicator class.
"""

from __future__ import annotations

import inspect

from hpcsgd.errors import ConfigError

#: build_model arguments the trainer sets itself (from other config keys).
_MODEL_ARGS_SET_BY_TRAINER = ("n_classes", "in_channels", "bn_mode", "zero_init_residual", "comm")


def check_components(cfg: dict) -> None:
    """ConfigError naming the first option no component uses (see the module docstring)."""
    check_dataset_options(cfg)
    check_model_options(cfg)
    check_communicator_options(cfg)
    check_recipe(cfg)


def check_dataset_options(cfg: dict) -> None:
    from hpcsgd.data import check_options

    check_options(cfg["dataset"], cfg["dataset_options"], where="config key 'dataset_options'")


def _model_class(name: str):
    from hpcsgd.models import AlexNetBN, ResNet, SmallResNet

    if name.startswith("resnet") and name[6:].isdigit():
        return ResNet
    return {"resnet_small": SmallResNet, "alexnet_bn": AlexNetBN}.get(name)


def _named_params(fn, skip=()) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in skip}


def check_model_options(cfg: dict) -> None:
    """``model_options`` must be arguments of the model (or of its BatchNorm layers)."""
    from hpcsgd.models import MODEL_NAMES, BatchNorm

    cls = _model_class(cfg["model"])
    if cls is None:
        raise ConfigError(f"config key 'model'={cfg['model']!r}: unknown model; choose one of {MODEL_NAMES}")
    allowed = _named_params(cls.__init__, ("self", *_MODEL_ARGS_SET_BY_TRAINER))
    allowed |= _named_params(BatchNorm.__init__, ("self", "size", "mode", "comm"))
    if cls.__name__ == "ResNet":
        allowed.discard("depth")  # spelt in the name: resnet50
    for key in cfg["model_options"]:
        if key in _MODEL_ARGS_SET_BY_TRAINER:
            raise ConfigError(f"config key 'model_options.{key}' is set by the trainer (from the dataset or "
                              f"the top-level key of that name); remove it")
        if key not in allowed:
            raise ConfigError(f"config key 'model_options': model {cfg['model']!r} does not use {key!r} "
                              f"(its options: {', '.join(sorted(allowed))})")
    if cfg["zero_init_residual"] and cls.__name__ == "AlexNetBN":
        raise ConfigError("config keys 'zero_init_residual' and 'model': alexnet_bn has no residual blocks")


def check_communicator_options(cfg: dict) -> None:
    """``communicator_options`` must be config options of the chosen communicator class."""
    from hpcsgd.comm import communicator_class

    try:
        cls = communicator_class(cfg["communicator"])
    except ValueError as e:
        raise ConfigError(f"config key 'communicator': {e}") from e
    allowed = getattr(cls, "CONFIG_DEFAULTS", None)
    if allowed is None:
        return
    for key in cfg["communicator_options"]:
        if key not in allowed:
            raise ConfigError(f"config key 'communicator_options': communicator {cfg['communicator']!r} does "
                              f"not use {key!r} (its options: {', '.join(sorted(allowed))})")


def check_recipe(cfg: dict) -> None:
    """Build the recipe without a model: a bad ``recipe_options``/``optimizer``/``schedule`` fails here."""
    from hpcsgd.schedules import make_recipe

    try:
        make_recipe(cfg, None, 1)
    except ConfigError as e:
        if cfg["recipe"] == "custom":
            raise
        raise ConfigError(f"config key 'recipe_options': {e}") from e
