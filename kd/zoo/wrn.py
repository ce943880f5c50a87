"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis, BMVC 2016) for 32x32 inputs, as used by CRD/DKD.

Pre-activation blocks (BN -> ReLU -> 3x3 conv, twice). depth = 6n + 4, stage widths 16k/32k/64k after
a plain 16-channel 3x3 conv stem; a 1x1 conv shortcut (no BN) wherever the width changes; a final
BN -> ReLU before pooling. Convs are bias-free.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import CifarNet


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride) -> BN-ReLU-[dropout]-conv3x3, plus identity or 1x1-conv shortcut.

    When the width changes, the shortcut is taken from the pre-activated input (as in the WRN paper's
    code), so the block's first BN-ReLU is shared by both branches.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.drop = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.act = nn.ReLU()  # not inplace: the identity shortcut still needs x
        self.shortcut = None if in_chs == out_chs else nn.Conv2d(in_chs, out_chs, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act(self.bn1(x))
        out = self.conv2(self.drop(self.act(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(CifarNet):
    """WRN-depth-widen: stem conv (16) -> 3 stages of n PreActBlocks -> BN-ReLU -> pool -> linear.

    `block_drop_rate` is the dropout between the two convs of each block (0 in CRD/DKD). The classifier keeps
    PyTorch's default weight init with a zero bias, as the reference wrn.py.
    """

    classifier_zero_bias = True

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n+4"
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        stages, reductions = [], [1]
        for i in range(3):
            stride = 1 if i == 0 else 2
            blocks = [
                PreActBlock(
                    widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1, block_drop_rate
                )
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            reductions.append(reductions[-1] * stride)
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True))
        self.head_conv = nn.Identity()
        self._init_head(widths, reductions, widths[-1], num_classes, drop_rate, global_pool)
