"""Config schema: merge order, --set parsing, validation messages that name the key."""

import pytest

from hpcsgd.errors import ConfigError
from hpcsgd.train import config as C


def resolve(world=2, file_cfg=None, overrides=(), **kw):
    return C.resolve(C.merge(file_cfg or {}, list(overrides)), world, **kw)


def test_defaults_resolve_and_derive_batch():
    cfg = resolve(world=4, file_cfg={"batch_per_rank": 16}, check_paths=False)
    assert cfg["global_batch"] == 64 and cfg["grad_accumulation"] == 1 and cfg["world_size"] == 4
    assert cfg["kernels"] is True  # on by default on CPU
    assert resolve(file_cfg={"gpu": True}, check_paths=False)["kernels"] is False


def test_merge_order_and_set_parsing():
    cfg = C.merge({"epochs": 3, "model_options": {"depth": 8}},
                  ["epochs=2.5", "model_options.width=16", "wire_dtype=float16", "data_path=null"])
    assert cfg["epochs"] == 2.5
    assert cfg["model_options"] == {"depth": 8, "width": 16}
    assert cfg["wire_dtype"] == "float16" and cfg["data_path"] is None
    cfg = C.merge({}, ["recipe_options={lr: 0.2, momentum: 0.9}"])
    assert cfg["recipe_options"] == {"lr": 0.2, "momentum": 0.9}


def test_global_batch_derives_accumulation():
    cfg = resolve(world=4, file_cfg={"batch_per_rank": 8, "global_batch": 96}, check_paths=False)
    assert cfg["grad_accumulation"] == 3
    # Akiba: 1024 ranks x 32 = 32768
    cfg = resolve(world=1024, file_cfg={"batch_per_rank": 32, "global_batch": 32768}, check_paths=False)
    assert cfg["grad_accumulation"] == 1


@pytest.mark.parametrize("file_cfg, overrides, key", [
    ({"batch_size": 3}, (), "'batch_size'"),                                 # unknown key in file
    ({}, ("epoch=3",), "'epoch'"),                                           # unknown key in --set
    ({"batch_per_rank": 8, "global_batch": 100}, (), "'global_batch'"),     # not divisible
    ({"batch_per_rank": 8, "global_batch": 64, "grad_accumulation": 3}, (), "'global_batch'"),
    ({"batch_per_rank": 0}, (), "'batch_per_rank'"),
    ({"batch_per_rank": "8"}, (), "'batch_per_rank'"),                      # wrong type
    ({"epochs": True}, (), "'epochs'"),                                      # bool is not a number
    ({"recipe": "adam"}, (), "'recipe'"),
    ({"communicator": "nccl"}, (), "'communicator'"),                       # needs gpu
    ({"data_path": "/nonexistent/fmnist"}, (), "'data_path'"),              # missing path
    ({"dataset": "imagenet_folder"}, (), "'data_path'"),                    # required path
    ({}, ("model_options.depth",), "key=value"),
])
def test_bad_configs_name_the_key(file_cfg, overrides, key):
    with pytest.raises(ConfigError) as ei:
        resolve(world=2, file_cfg=file_cfg, overrides=overrides)
    assert key in str(ei.value), str(ei.value)


def test_unknown_key_suggests_the_near_one():
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        C.merge({"epoch": 1})


def test_global_batch_message_shows_the_arithmetic():
    with pytest.raises(ConfigError) as ei:
        resolve(world=3, file_cfg={"batch_per_rank": 32, "global_batch": 1000}, check_paths=False)
    assert "3 x 32 = 96" in str(ei.value)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        C.load_yaml(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        C.load_yaml(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("epochs: 2\nmodel_options: {depth: 8}\n")
    assert C.load_yaml(str(good)) == {"epochs": 2, "model_options": {"depth": 8}}


def test_describe_lists_every_key():
    text = C.describe()
    for key in C.SCHEMA:
        assert key in text


def test_overlap_and_double_buffering_are_exclusive():
    assert resolve(file_cfg={"overlap": True}, check_paths=False)["overlap"] is True
    with pytest.raises(ConfigError, match="'overlap' and 'double_buffering'"):
        resolve(file_cfg={"overlap": True, "double_buffering": True}, check_paths=False)


@pytest.mark.parametrize("file_cfg, both", [
    ({"dataset": "imagenet_list", "data_path": "x", "dataset_options": {"on_bad": "skip"}},
     ("'dataset_options.on_bad'", "on_bad: skip")),
    ({"kernels": True, "gpu": True}, ("'kernels'", "'gpu'")),
    ({"communicator": "dummy"}, ("'communicator'='dummy'", "world size 2")),
    ({"dataset": "synthetic", "data_path": "/data"}, ("'data_path'", "'dataset'")),
    ({"dataset": "synthetic", "val_path": "/data"}, ("'val_path'", "'dataset'")),
    ({"schedule": {"type": "cosine"}}, ("'schedule'", "recipe: custom")),
    ({"recipe": "custom", "recipe_options": {"lr": 1}}, ("'recipe_options'", "recipe: custom")),
    ({"label_smoothing": 1.0}, ("'label_smoothing'", "[0, 1)")),
    ({"on_bad": "ignore"}, ("'on_bad'", "'skip'")),
    ({"loss": "mse"}, ("'loss'", "softmax_cross_entropy")),
])
def test_combinations_are_rejected_naming_both_keys(file_cfg, both):
    with pytest.raises(ConfigError) as ei:
        resolve(world=2, file_cfg=file_cfg, check_paths=False)
    for part in both:
        assert part in str(ei.value), str(ei.value)


def test_new_keys_default_and_resolve():
    cfg = resolve(file_cfg={"on_bad": "skip", "label_smoothing": 0.1}, check_paths=False)
    assert cfg["on_bad"] == "skip" and cfg["label_smoothing"] == 0.1
    assert cfg["loss"] == "softmax_cross_entropy"
    assert resolve(check_paths=False)["on_bad"] == "error"  # a bad file stops the job unless asked
    assert resolve(world=1, file_cfg={"communicator": "dummy"}, check_paths=False)  # one rank: no average


def _checked(**file_cfg):
    from hpcsgd.train.checks import check_components

    check_components(resolve(world=2, file_cfg=file_cfg, check_paths=False))


@pytest.mark.parametrize("file_cfg, names", [
    # the case: imagenet_list has no on_bad; it was accepted and silently ignored
    ({"dataset": "imagenet_list", "data_path": "x", "dataset_options": {"root": "/r", "shuffle": True}},
     ("'dataset_options'", "'shuffle'", "imagenet_list")),
    ({"dataset": "fashion_mnist", "dataset_options": {"n": 10}}, ("'dataset_options'", "'n'", "none")),
    ({"dataset": "synthetic", "dataset_options": {"shape": [1, 8, 8], "size": 9}}, ("'size'", "pool")),
    ({"model_options": {"depht": 8}}, ("'model_options'", "'depht'", "depth")),
    ({"model": "resnet50", "model_options": {"depth": 18}}, ("'model_options'", "'depth'")),
    ({"model_options": {"n_classes": 5}}, ("'model_options.n_classes'", "set by the trainer")),
    ({"model": "alexnet_bn", "zero_init_residual": True}, ("'zero_init_residual'", "alexnet_bn")),
    ({"model": "vgg16"}, ("'model'", "vgg16")),
    ({"communicator": "naive", "communicator_options": {"bucket_size": 1 << 20}},
     ("'communicator_options'", "'naive'", "'bucket_size'", "bucket_bytes")),
    ({"recipe_options": {"warmpu_epochs": 3}}, ("'recipe_options'", "warmpu_epochs")),
    ({"recipe": "custom", "optimizer": {"name": "adagrad"}}, ("'optimizer.name'", "adagrad")),
])
def test_component_options_are_checked_against_the_component(file_cfg, names):
    with pytest.raises(ConfigError) as ei:
        _checked(**file_cfg)
    for part in names:
        assert part in str(ei.value), str(ei.value)


def test_component_options_that_are_used_pass():
    _checked(dataset="synthetic", dataset_options={"shape": [1, 8, 8], "n": 64, "n_classes": 3, "pool": 8})
    _checked(model="resnet_small", model_options={"depth": 8, "width": 4, "decay": 0.95})
    _checked(dataset="imagenet_folder", data_path="x", on_bad="skip", communicator="hierarchical",
             communicator_options={"bucket_bytes": 1 << 20})
