"""Building blocks shared by the ResNets and AlexNet-BN: conv + BN (+ ReLU), residual blocks.

Parameters and initialization come from Chainer links (``Convolution2D`` for
W, :class:`BatchNorm` for gamma/beta); the arithmetic goes through
:mod:`hpcsgd.models.ops` (so ``hpcsgd.kernels.enable()`` applies).
Convolutions feeding a BN have no bias. Initialization follows Goyal et al.
/ fb.resnet.torch: He normal with fan_out = k*k*out_channels (Caffe2's
MSRAFill), std = sqrt(2 / fan_out).
"""

from __future__ import annotations

import chainer
import chainer.links as L

from hpcsgd.models import ops
from hpcsgd.models.batchnorm import BatchNorm


def he_normal():
    """He initialization with fan_out (fb.resnet.torch / Caffe2 MSRAFill)."""
    return chainer.initializers.HeNormal(fan_option="fan_out")


class ConvBN(chainer.Chain):
    """``bn(conv(x))`` with optional fused ReLU; conv has no bias."""

    def __init__(self, in_ch: int, out_ch: int, ksize: int, stride: int = 1, pad: int = 0,
                 bn_mode: str = "running", comm=None, initial_gamma: float = 1.0, **bn_kw):
        super().__init__()
        self.stride = stride
        self.pad = pad
        with self.init_scope():
            self.conv = L.Convolution2D(in_ch, out_ch, ksize, stride, pad, nobias=True, initialW=he_normal())
            self.bn = BatchNorm(out_ch, mode=bn_mode, comm=comm, initial_gamma=initial_gamma, **bn_kw)

    def forward(self, x, relu: bool = True):
        h = ops.conv2d(x, self.conv.W, None, self.stride, self.pad)
        return self.bn(h, relu=relu)


class BasicBlock(chainer.Chain):
    """Two 3x3 ConvBN; projection shortcut (1x1 ConvBN) when the shape changes."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, zero_init_residual: bool = False,
                 bn_mode: str = "running", comm=None, **bn_kw):
        super().__init__()
        out_ch = width * self.expansion
        kw = dict(bn_mode=bn_mode, comm=comm, **bn_kw)
        with self.init_scope():
            self.a = ConvBN(in_ch, width, 3, stride, 1, **kw)
            self.b = ConvBN(width, out_ch, 3, 1, 1, initial_gamma=0.0 if zero_init_residual else 1.0, **kw)
            if stride != 1 or in_ch != out_ch:
                self.shortcut = ConvBN(in_ch, out_ch, 1, stride, 0, **kw)
            else:
                self.shortcut = None

    #: Return the output twice (``ops.add_relu(fork=True)``) for a next BasicBlock, which then
    #: feeds one to each branch: the two branches' gradients are summed inside the join's
    #: backward instead of in a separate Chainer ``Add`` (set by :class:`Stage`).
    fork_output = False

    def forward(self, x):
        x, xs = x if isinstance(x, tuple) else (x, x)  # (main branch, shortcut) from a forking block
        h = self.b(self.a(x), relu=False)
        s = xs if self.shortcut is None else self.shortcut(xs, relu=False)
        return ops.add_relu(h, s, fork=self.fork_output)


class Bottleneck(chainer.Chain):
    """1x1 -> 3x3 (stride here, Goyal/fb.resnet.torch "ResNet v1.5") -> 1x1 (x4 width)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, zero_init_residual: bool = False,
                 bn_mode: str = "running", comm=None, **bn_kw):
        super().__init__()
        out_ch = width * self.expansion
        kw = dict(bn_mode=bn_mode, comm=comm, **bn_kw)
        with self.init_scope():
            self.a = ConvBN(in_ch, width, 1, 1, 0, **kw)
            self.b = ConvBN(width, width, 3, stride, 1, **kw)
            self.c = ConvBN(width, out_ch, 1, 1, 0, initial_gamma=0.0 if zero_init_residual else 1.0, **kw)
            if stride != 1 or in_ch != out_ch:
                self.shortcut = ConvBN(in_ch, out_ch, 1, stride, 0, **kw)
            else:
                self.shortcut = None

    def forward(self, x):
        h = self.c(self.b(self.a(x)), relu=False)
        s = x if self.shortcut is None else self.shortcut(x, relu=False)
        return ops.add_relu(h, s)


class Stage(chainer.ChainList):
    """``n`` residual blocks; the first one carries the stride and the channel change."""

    def __init__(self, block, n: int, in_ch: int, width: int, stride: int, **kw):
        super().__init__()
        for i in range(n):
            self.add_link(block(in_ch if i == 0 else width * block.expansion, width,
                                stride if i == 0 else 1, **kw))
        if block is BasicBlock:
            for b in list(self)[:-1]:
                b.fork_output = True

    @property
    def fork_output(self) -> bool:
        """Whether the last block forks its output (True only when a BasicBlock Stage follows)."""
        return self[-1].fork_output

    @fork_output.setter
    def fork_output(self, value: bool) -> None:
        if not isinstance(self[-1], BasicBlock):
            raise ValueError("only a BasicBlock stage can fork its output")
        self[-1].fork_output = bool(value)

    def forward(self, x):
        for block in self:
            x = block(x)
        return x


def fc_layer(in_size: int, n_classes: int):
    """The classifier: W ~ N(0, 0.01^2), b = 0 (Goyal et al.)."""
    return L.Linear(in_size, n_classes, initialW=chainer.initializers.Normal(0.01),
                    initial_bias=chainer.initializers.Zero())
