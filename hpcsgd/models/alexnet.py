"""AlexNet-BN as in the LARS papers (You et al.; B. Ginsburg's refined AlexNet-BN).

Single-tower AlexNet with LRN replaced by BN after *every* convolution
(papers.md sec. 4(b)): conv1 96x11x11/4 -> BN -> ReLU -> maxpool 3/2;
conv2 256x5x5 pad 2 -> BN -> ReLU -> maxpool 3/2; conv3 384x3x3,
conv4 384x3x3, conv5 256x3x3 (pad 1, each -> BN -> ReLU); maxpool 3/2;
fc6 4096 -> ReLU -> dropout 0.5; fc7 4096 -> ReLU -> dropout 0.5; fc8.
Pooling rounds up (Caffe; ``F.max_pooling_2d`` with ``cover_all=True``, not
the floor-mode ``ops.max_pool2d``), so 224 and 227 inputs both give
6x6x256 = 9216 features. Convs (no bias: BN follows) use He init (fan_out); fc6/fc7
~ N(0, 0.005^2) and fc8 ~ N(0, 0.01^2), biases 0 (the Caffe AlexNet stds;
UNCONFIRMED for the LARS runs). ``input_size`` sets the fc6 input size
for other resolutions (>= 63 px); ``fc_width`` shrinks fc6/fc7 for tests.
"""

from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L

from hpcsgd.models import ops
from hpcsgd.models.blocks import ConvBN, fc_layer


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _pool_out(size: int, k: int = 3, s: int = 2) -> int:
    return -(-(size - k) // s) + 1  # ceil mode (cover_all=True)


def alexnet_feature_size(input_size: int) -> int:
    """Spatial size after pool5 for a square ``input_size`` input."""
    s = _pool_out(_conv_out(input_size, 11, 4, 0))
    s = _pool_out(_conv_out(s, 5, 1, 2))
    return _pool_out(s)


class AlexNetBN(chainer.Chain):
    """AlexNet with BN after each conv; ``__call__(x)`` (N, C, H, W) -> logits (N, n_classes)."""

    def __init__(self, n_classes: int = 1000, in_channels: int = 3, bn_mode: str = "running",
                 input_size: int = 224, fc_width: int = 4096, dropout: float = 0.5, comm=None,
                 zero_init_residual: bool = False, **bn_kw):
        super().__init__()
        if input_size < 63:
            raise ValueError(f"alexnet_bn needs input_size >= 63, got {input_size}")
        kw = dict(bn_mode=bn_mode, comm=comm, **bn_kw)
        feat = alexnet_feature_size(input_size)
        self.dropout = dropout
        with self.init_scope():
            self.conv1 = ConvBN(in_channels, 96, 11, 4, 0, **kw)
            self.conv2 = ConvBN(96, 256, 5, 1, 2, **kw)
            self.conv3 = ConvBN(256, 384, 3, 1, 1, **kw)
            self.conv4 = ConvBN(384, 384, 3, 1, 1, **kw)
            self.conv5 = ConvBN(384, 256, 3, 1, 1, **kw)
            self.fc6 = L.Linear(256 * feat * feat, fc_width, initialW=chainer.initializers.Normal(0.005))
            self.fc7 = L.Linear(fc_width, fc_width, initialW=chainer.initializers.Normal(0.005))
            self.fc8 = fc_layer(fc_width, n_classes)

    def forward(self, x):
        h = F.max_pooling_2d(self.conv1(x), 3, stride=2)
        h = F.max_pooling_2d(self.conv2(h), 3, stride=2)
        h = self.conv5(self.conv4(self.conv3(h)))
        h = F.max_pooling_2d(h, 3, stride=2)
        h = F.dropout(ops.relu(self.fc6(h)), self.dropout)
        h = F.dropout(ops.relu(self.fc7(h)), self.dropout)
        return self.fc8(h)
