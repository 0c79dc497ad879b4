"""ImageNet ResNets (18/34/50/101) as in Goyal et al. (fb.resnet.torch variant).

Stem 7x7/2 conv + BN + ReLU + 3x3/2 max-pool; four stages of residual blocks
(basic for 18/34, bottleneck with the stride on the 3x3 conv for 50/101),
widths 64/128/256/512; projection shortcuts (1x1 conv + BN) where the shape
changes; global average pooling; FC ~ N(0, 0.01^2). He init (fan_out) for
convolutions. ``zero_init_residual=True`` starts gamma = 0 in the last BN of
every residual block (Goyal sec. 3(a)). ResNet-50 with 1000 classes has
25,557,032 parameters (``tests/test_models.py`` asserts it).
"""

from __future__ import annotations

import chainer
import chainer.functions as F

from hpcsgd.models import ops
from hpcsgd.models.blocks import BasicBlock, Bottleneck, ConvBN, Stage, fc_layer

SPECS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(chainer.Chain):
    """ImageNet-style ResNet; ``__call__(x)`` (N, in_channels, H, W) -> logits (N, n_classes)."""

    def __init__(self, depth: int = 50, n_classes: int = 1000, in_channels: int = 3, bn_mode: str = "running",
                 zero_init_residual: bool = False, comm=None, **bn_kw):
        super().__init__()
        if depth not in SPECS:
            raise ValueError(f"ResNet depth must be one of {sorted(SPECS)}, got {depth}")
        block, counts = SPECS[depth]
        kw = dict(bn_mode=bn_mode, comm=comm, **bn_kw)
        self.depth = depth
        with self.init_scope():
            self.stem = ConvBN(in_channels, 64, 7, 2, 3, **kw)
            in_ch = 64
            for i, (n, width) in enumerate(zip(counts, (64, 128, 256, 512))):
                stage = Stage(block, n, in_ch, width, 1 if i == 0 else 2,
                              zero_init_residual=zero_init_residual, **kw)
                setattr(self, f"stage{i + 1}", stage)
                in_ch = width * block.expansion
            self.fc = fc_layer(in_ch, n_classes)

    def forward(self, x):
        h = self.stem(x)
        h = ops.max_pool2d(h, 3, stride=2, pad=1)
        for i in range(1, 5):
            h = getattr(self, f"stage{i}")(h)
        h = F.mean(h, axis=(2, 3))
        return self.fc(h)
