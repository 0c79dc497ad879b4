"""Model zoo: parameter counts, Goyal's init and strides, forward/backward shapes, label smoothing.

Forward/backward cases are numerically sound by construction: training-mode BN
over only 2 values per channel (a batch of 2 at 1x1, e.g. ResNet at 16x16 or
32x32 input) normalizes by the spread of two numbers, whose inverse has heavy
tails; over 30+ such layers gradients reach 1e30 and overflow now and then.
Every case therefore feeds each BN layer at least MIN_BN_VALUES values per
channel (checked after the forward pass) and bounds the gradients.
"""

import chainer
import chainer.functions as F
import numpy as np
import pytest

from hpcsgd.errors import ConfigError
from hpcsgd.losses import softmax_cross_entropy
from hpcsgd.models import build_model, count_params
from hpcsgd.models.alexnet import alexnet_feature_size
from hpcsgd.models.batchnorm import BatchNorm

MIN_BN_VALUES = 8  # per channel: 1/std of k normal values has finite moments of order < k - 1
MAX_GRAD = 1e5  # the cases below stay under ~4e3 across init seeds


@pytest.fixture(scope="module")
def resnet50():
    np.random.seed(50)  # module fixtures are built before the per-test seeding
    return build_model("resnet50", 1000, zero_init_residual=True)


def test_resnet50_parameter_count(resnet50):
    assert count_params(resnet50) == 25_557_032


def test_resnet50_goyal_details(resnet50):
    model = resnet50
    first = model.stage2[0]
    assert (first.a.stride, first.b.stride, first.shortcut.stride) == (1, 2, 2)  # stride on the 3x3
    gammas = {name: link.gamma.array for name, link in model.namedlinks() if isinstance(link, BatchNorm)}
    for name, g in gammas.items():
        last_of_block = name.endswith("/c/bn")
        assert np.all(g == (0.0 if last_of_block else 1.0)), name
    assert sum(n.endswith("/c/bn") for n in gammas) == 16
    w = model.stage3[1].b.conv.W.array  # 3x3, 256 out: fan_out = 9 * 256
    assert w.std() == pytest.approx(np.sqrt(2.0 / (9 * 256)), rel=0.03)
    assert model.fc.W.array.std() == pytest.approx(0.01, rel=0.02)
    assert np.all(model.fc.b.array == 0)
    assert np.all(build_model("resnet18", 10).stage1[0].b.bn.gamma.array == 1.0)


def _fwd_bwd(model, x, n_classes, digest):
    y = model(x)
    assert y.shape == (x.shape[0], n_classes)
    counts = {name: link.last_count for name, link in model.namedlinks() if isinstance(link, BatchNorm)}
    assert min(counts.values()) >= MIN_BN_VALUES, min(counts.items(), key=lambda kv: kv[1])
    loss = F.sum(y * np.random.RandomState(0).randn(*y.shape).astype(np.float32))
    model.cleargrads()
    loss.backward()
    digest.add(y.array)
    for name, p in sorted(model.namedparams()):
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert np.isfinite(p.grad).all() and np.abs(p.grad).max() < MAX_GRAD, (name, np.abs(p.grad).max())
        digest.add(p.grad)
    return y


def test_resnet50_forward_backward(resnet50, digest):
    x = np.random.RandomState(1).randn(2, 3, 64, 64).astype(np.float32)  # 2x2 in the last stage
    _fwd_bwd(resnet50, x, 1000, digest)


CASES = [  # ImageNet ResNets divide the input by 32: 64x64 leaves 2x2 x batch 2 = 8 values per BN channel
    ("resnet18", dict(), (2, 3, 64, 64)),
    ("resnet34", dict(), (2, 3, 64, 64)),
    ("resnet101", dict(), (2, 3, 64, 64)),
    ("resnet_small", dict(depth=8, width=8), (4, 1, 28, 28)),
    ("resnet_small", dict(depth=20, width=4), (2, 3, 32, 32)),
    ("alexnet_bn", dict(input_size=67, fc_width=32), (2, 3, 67, 67)),
]


TORCHVISION_COUNTS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet101": 44_549_160}


@pytest.mark.parametrize("name,kw,shape", CASES, ids=[f"{c[0]}-{c[2][2]}" for c in CASES])
def test_forward_backward_shapes(name, kw, shape, digest):
    x = np.random.RandomState(1).randn(*shape).astype(np.float32)
    model = build_model(name, 7, in_channels=shape[1], **kw)
    if name in TORCHVISION_COUNTS:  # the torchvision count of the same architecture (1000 classes)
        fc_in = model.fc.W.shape[1]
        assert count_params(model) - 7 * (fc_in + 1) + 1000 * (fc_in + 1) == TORCHVISION_COUNTS[name]
    _fwd_bwd(model, x, 7, digest)
    with chainer.using_config("train", False):
        y = model(x)
    assert y.shape == (shape[0], 7) and np.isfinite(y.array).all()
    digest.add(y.array)


def test_alexnet_full_size_features():
    assert alexnet_feature_size(224) == 6 and alexnet_feature_size(227) == 6
    model = build_model("alexnet_bn", 1000, fc_width=16)
    assert model.fc6.W.shape == (16, 9216)
    bns = [link for link in model.links() if isinstance(link, BatchNorm)]
    assert len(bns) == 5  # BN after each of the 5 convolutions


def test_bad_model_options():
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("vgg16", 10)
    with pytest.raises(ConfigError, match="6n\\+2"):
        build_model("resnet_small", 10, depth=10)
    with pytest.raises(ConfigError, match="bn_mode"):
        build_model("resnet18", 10, bn_mode="ghost")
    with pytest.raises(ConfigError, match="comm"):
        build_model("resnet18", 10, bn_mode="sync")


def test_label_smoothing_against_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(5, 4)
    t = np.array([0, 3, 1, 1, 2], np.int32)
    eps = 0.1
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    q = np.full((5, 4), eps / 4) + (1 - eps) * np.eye(4)[t]
    expect = -(q * logp).sum(1).mean()
    got = softmax_cross_entropy(logits.astype(np.float32), t, label_smoothing=eps)
    assert float(got.array) == pytest.approx(expect, rel=1e-5)
    plain = softmax_cross_entropy(logits.astype(np.float32), t)
    assert float(plain.array) == pytest.approx(-logp[np.arange(5), t].mean(), rel=1e-5)
    with pytest.raises(ConfigError):
        softmax_cross_entropy(logits, t, label_smoothing=1.0)
