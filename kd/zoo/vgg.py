"""VGG with BatchNorm for 32x32 inputs (Simonyan & Zisserman, ICLR 2015), the CRD/DKD variants.

Five conv blocks of widths 64/128/256/512/512; 2x2 max-pools after blocks 1-3 only (so the last two
blocks run at 4x4), global average pool, one linear layer. Convs keep their bias (torchvision's
VGG-BN layout), which is why vgg8 has 3.965M rather than 3.964M parameters. vgg8 (CRD's "vgg8") has one
conv per block.
"""

from __future__ import annotations

from torch import nn

from .base import CifarNet

VGG_BLOCK_DEPTHS = {
    8: (1, 1, 1, 1, 1),
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
VGG_WIDTHS = (64, 128, 256, 512, 512)


def _conv_block(in_chs: int, out_chs: int, depth: int, pool: bool) -> nn.Sequential:
    """[2x2 max-pool] -> depth x (conv3x3 with bias -> BN -> ReLU)."""
    layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if pool else []
    for _ in range(depth):
        layers += [nn.Conv2d(in_chs, out_chs, 3, 1, 1), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]
        in_chs = out_chs
    return nn.Sequential(*layers)


class CifarVGG(CifarNet):
    """Block 1 is the stem (feature 0, full resolution); blocks 2-5 are stages 1-4, each opening with
    the max-pool that precedes it (none before block 5)."""

    classifier_std = 0.01  # the references: linear layer ~ normal(0, 0.01), zero bias

    def __init__(
        self,
        depth: int,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        block_depths = VGG_BLOCK_DEPTHS[depth]
        self.stem = _conv_block(in_chans, VGG_WIDTHS[0], block_depths[0], pool=False)
        pools = (True, True, True, False)
        self.stages = nn.Sequential(
            *[_conv_block(VGG_WIDTHS[i], VGG_WIDTHS[i + 1], block_depths[i + 1], pool) for i, pool in enumerate(pools)]
        )
        reductions = [1, 2, 4, 8, 8]
        self.norm = nn.Identity()
        self.head_conv = nn.Identity()
        self._init_head(list(VGG_WIDTHS), reductions, VGG_WIDTHS[-1], num_classes, drop_rate, global_pool)
