"""ShuffleNetV1 (Zhang et al., CVPR 2018; g=3, 240/480/960) and ShuffleNetV2 1.0x (Ma et al., ECCV 2018;
116/232/464, last conv 1024) for 32x32 inputs: the "ShuffleNetV1"/"ShuffleNetV2" students of CRD
(Tian et al., ICLR 2020) and DKD (Zhao et al., CVPR 2022).

CIFAR changes shared by the CRD variants: no stem max-pool and a stride-1 1x1 conv stem to 24 channels
(both V1 and V2; V2 has 1,355,528 parameters at 100 classes), so the three stages run at 16, 8, 4. Two choices of those variants that differ
from the papers are kept because they define the published numbers: V1 has a ReLU after its depthwise
conv, and V2 stacks `repeats` basic units *after* each downsampling unit (4/8/4 units per stage).
Both keep PyTorch's default initialisation (`init_scheme = 'pytorch'`), as the references do.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .base import CifarNet, conv_bn_relu


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, g*c, H, W] -> [B, c*g, H, W]: interleave the channels of the g groups (V1 paper, fig. 1)."""
    return rearrange(x, "b (g c) h w -> b (c g) h w", g=groups)


class ShuffleV1Unit(nn.Module):
    """1x1 group conv -> shuffle -> 3x3 depthwise (stride) -> 1x1 group conv.

    Stride 1: ReLU(x + branch). Stride 2: ReLU(concat(branch, avgpool3x3/2(x))), so the branch only
    produces `out_chs - in_chs` channels. The first unit after the 24-channel stem uses an ungrouped
    first 1x1 conv (too few input channels to group).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        branch_chs = out_chs - in_chs if stride == 2 else out_chs
        mid = branch_chs // 4
        self.first_groups = 1 if in_chs == 24 else groups
        self.reduce = conv_bn_relu(in_chs, mid, 1, groups=self.first_groups)
        self.depthwise = conv_bn_relu(mid, mid, 3, stride, groups=mid)
        self.expand = conv_bn_relu(mid, branch_chs, 1, groups=groups, relu=False)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(self.reduce(x), self.first_groups)
        out = self.expand(self.depthwise(out))
        res = self.shortcut(x)
        return self.act(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class CifarShuffleNetV1(CifarNet):
    """Stem 1x1 conv (24) -> 3 stages of ShuffleV1Units (first one stride 2) -> pool -> linear."""

    init_scheme = "pytorch"

    def __init__(
        self,
        stage_chs: tuple[int, ...] = (240, 480, 960),
        stage_units: tuple[int, ...] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        in_chs = 24
        self.stem = conv_bn_relu(in_chans, in_chs, 1)
        stages = []
        for out_chs, units in zip(stage_chs, stage_units):
            blocks = []
            for j in range(units):
                blocks.append(ShuffleV1Unit(in_chs, out_chs, 2 if j == 0 else 1, groups))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.head_conv = nn.Identity()
        self._init_head([24, *stage_chs], [1, 2, 4, 8], in_chs, num_classes, drop_rate, global_pool)


class ShuffleV2Unit(nn.Module):
    """Basic unit: split channels in half, 1x1 -> 3x3 depthwise -> 1x1 on the second half, concat, shuffle."""

    def __init__(self, chs: int):
        super().__init__()
        half = chs // 2
        self.branch = nn.Sequential(
            conv_bn_relu(half, half, 1),
            conv_bn_relu(half, half, 3, groups=half, relu=False),
            conv_bn_relu(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, transform = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(transform)], 1), 2)


class ShuffleV2DownUnit(nn.Module):
    """Downsampling unit: both branches see all input channels, each halves H, W and gives out_chs/2."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        half = out_chs // 2
        self.left = nn.Sequential(
            conv_bn_relu(in_chs, in_chs, 3, 2, groups=in_chs, relu=False),
            conv_bn_relu(in_chs, half, 1),
        )
        self.right = nn.Sequential(
            conv_bn_relu(in_chs, half, 1),
            conv_bn_relu(half, half, 3, 2, groups=half, relu=False),
            conv_bn_relu(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class CifarShuffleNetV2(CifarNet):
    """Stem 1x1 conv (24) -> 3 stages of [down unit + `repeats` basic units] -> 1x1 conv (head_conv)
    -> pool -> linear."""

    init_scheme = "pytorch"

    def __init__(
        self,
        stage_chs: tuple[int, ...] = (116, 232, 464),
        stage_repeats: tuple[int, ...] = (3, 7, 3),
        last_chs: int = 1024,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        in_chs = 24
        self.stem = conv_bn_relu(in_chans, in_chs, 1)
        stages = []
        for out_chs, repeats in zip(stage_chs, stage_repeats):
            stages.append(
                nn.Sequential(ShuffleV2DownUnit(in_chs, out_chs), *[ShuffleV2Unit(out_chs) for _ in range(repeats)])
            )
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.head_conv = conv_bn_relu(in_chs, last_chs, 1)
        self._init_head([24, *stage_chs], [1, 2, 4, 8], last_chs, num_classes, drop_rate, global_pool)
