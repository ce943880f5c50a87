"""CIFAR ResNets: the 3-stage BasicBlock family (He et al., CVPR 2016, sec. 4.2: depth 6n+2) incl. the
x4-wide resnet8x4/resnet32x4 of CRD (Tian et al., ICLR 2020), and the 4-stage Bottleneck ResNet50 with
a 3x3 stride-1 stem (no max-pool), the CIFAR teacher of MobileNetV2 in CRD/DKD.

All convs are bias-free; the projection shortcut (1x1 conv + BN, "option B") is used whenever the
stride or the width changes.
"""

from __future__ import annotations

from torch import nn

from .base import CifarNet, conv_bn_relu


class BasicBlock(nn.Module):
    """3x3 -> 3x3 residual block, ReLU after the sum."""

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn_relu(in_chs, planes, 3, stride)
        self.conv2 = conv_bn_relu(planes, planes, 3, relu=False)
        self.shortcut = _projection(in_chs, planes, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand x4 residual block, ReLU after the sum."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = conv_bn_relu(in_chs, planes, 1)
        self.conv2 = conv_bn_relu(planes, planes, 3, stride)
        self.conv3 = conv_bn_relu(planes, out_chs, 1, relu=False)
        self.shortcut = _projection(in_chs, out_chs, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


def _projection(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    if stride == 1 and in_chs == out_chs:
        return nn.Identity()
    return conv_bn_relu(in_chs, out_chs, 1, stride, relu=False)


class CifarResNet(CifarNet):
    """3x3 conv stem at full resolution, then one stage per width; every stage but the first halves H, W.

    widths: [stem, stage1, stage2, ...]; blocks_per_stage: one entry per stage.
    """

    def __init__(
        self,
        widths: list[int],
        blocks_per_stage: list[int],
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        assert len(widths) == len(blocks_per_stage) + 1
        self.stem = conv_bn_relu(in_chans, widths[0], 3)
        stages, chs, reductions = [], [widths[0]], [1]
        in_chs = widths[0]
        for i, (planes, depth) in enumerate(zip(widths[1:], blocks_per_stage)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(block(in_chs, planes, stride if j == 0 else 1))
                in_chs = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
            chs.append(in_chs)
            reductions.append(reductions[-1] * stride)
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.head_conv = nn.Identity()
        self._init_head(chs, reductions, in_chs, num_classes, drop_rate, global_pool)


def cifar_resnet(depth: int, width_mult: float = 1, **kwargs) -> CifarResNet:
    """resnet{depth} (width_mult=1: 16/16/32/64), resnet{depth}x4 (width_mult=4: 32/64/128/256) or
    resnet{depth}_050 (width_mult=0.5: 8/8/16/32).

    The x4 nets widen the stages 4x but the stem only 2x (32 channels), as in CRD's resnet8x4/resnet32x4.
    The _050 nets (timm's naming for half width) halve stem and stages alike; they are not from a paper:
    resnet8_050 is the benchmark's small student (sweeps/bench_tin20.yaml), far enough below its teachers.
    """
    assert (depth - 2) % 6 == 0, "CIFAR ResNet depth must be 6n+2"
    n = (depth - 2) // 6
    stem = 32 if width_mult > 1 else int(16 * width_mult)
    return CifarResNet([stem] + [int(w * width_mult) for w in (16, 32, 64)], [n] * 3, BasicBlock, **kwargs)


def cifar_resnet50(**kwargs) -> CifarResNet:
    """ResNet50 layout (3, 4, 6, 3 Bottlenecks, 64..512 planes) with a CIFAR 3x3 stride-1 stem."""
    return CifarResNet([64, 64, 128, 256, 512], [3, 4, 6, 3], Bottleneck, **kwargs)
