"""CIFAR-style ResNets (He et al. 2016, sec. 4.2) for 28x28 and 32x32 inputs.

depth = 6n + 2 (8, 14, 20, 32, ...): a 3x3 conv stem (``width`` channels, no
pooling), three stages of n basic blocks with widths (w, 2w, 4w) and strides
(1, 2, 2), global average pooling, FC ~ N(0, 0.01^2). Shortcuts are
projections (1x1 conv + BN) where the shape changes (option B). 28x28 maps
to 28 -> 14 -> 7, 32x32 to 32 -> 16 -> 8. Same blocks, init and BN modes as
:mod:`hpcsgd.models.resnet`; these are the models the CPU tests, the demo
and the convergence study train.
"""

from __future__ import annotations

import chainer
import chainer.functions as F

from hpcsgd.models.blocks import BasicBlock, ConvBN, Stage, fc_layer


class SmallResNet(chainer.Chain):
    """CIFAR-style ResNet; ``__call__(x)`` (N, in_channels, H, W) -> logits (N, n_classes)."""

    def __init__(self, depth: int = 20, width: int = 16, n_classes: int = 10, in_channels: int = 3,
                 bn_mode: str = "running", zero_init_residual: bool = False, comm=None, **bn_kw):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"resnet_small depth must be 6n+2 >= 8 (8, 14, 20, ...), got {depth}")
        if width < 1:
            raise ValueError(f"resnet_small width must be >= 1, got {width}")
        n = (depth - 2) // 6
        kw = dict(bn_mode=bn_mode, comm=comm, **bn_kw)
        self.depth, self.width = depth, width
        with self.init_scope():
            self.stem = ConvBN(in_channels, width, 3, 1, 1, **kw)
            zi = dict(zero_init_residual=zero_init_residual, **kw)
            self.stage1 = Stage(BasicBlock, n, width, width, 1, **zi)
            self.stage2 = Stage(BasicBlock, n, width, 2 * width, 2, **zi)
            self.stage3 = Stage(BasicBlock, n, 2 * width, 4 * width, 2, **zi)
            self.fc = fc_layer(4 * width, n_classes)
        self.stage1.fork_output = self.stage2.fork_output = True  # each feeds a BasicBlock stage

    def forward(self, x):
        h = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(F.mean(h, axis=(2, 3)))
