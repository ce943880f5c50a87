"""MobileNetV2 (Sandler et al., CVPR 2018) at width 0.5 for 32x32 inputs: the "MobileNetV2" student of
CRD (Tian et al., ICLR 2020) and DKD (Zhao et al., CVPR 2022).

Differences from ImageNet MobileNetV2 that the CRD variant has (and that fix its 0.81M parameters):
- every inverted residual has the 1x1 expansion conv, also where the expansion ratio is 1;
- ReLU instead of ReLU6;
- the last 1x1 conv keeps 1280 channels (not scaled by the 0.5 width);
- the 16-channel 3x3 stem has stride 2, and the stride-2 rows of the table are unchanged, so a 32x32
  input ends at 2x2.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import CifarNet, conv_bn_relu

# (expansion t, channels c, repeats n, first stride s): table 2 of the paper.
INVERTED_RESIDUAL_TABLE = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# Table rows grouped into feature stages by resolution, as CRD taps them: rows 0-1, 2, 3-4, 5-6.
STAGE_ROWS = ((0, 1), (2,), (3, 4), (5, 6))


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection; identity add when shapes match."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expansion: int):
        super().__init__()
        mid = in_chs * expansion
        self.conv = nn.Sequential(
            conv_bn_relu(in_chs, mid, 1),
            conv_bn_relu(mid, mid, 3, stride, groups=mid),
            conv_bn_relu(mid, out_chs, 1, relu=False),
        )
        self.use_residual = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(CifarNet):
    """Stem -> 4 stages (STAGE_ROWS) -> 1x1 conv to `last_chs` (head_conv) -> pool -> linear.

    Stage maps are the outputs of linear bottlenecks (MobileNetV2 has no activation there).
    """

    classifier_std = 0.01  # the references: linear layer ~ normal(0, 0.01), zero bias

    def __init__(
        self,
        width_mult: float = 0.5,
        last_chs: int = 1280,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        in_chs = int(32 * width_mult)
        self.stem = conv_bn_relu(in_chans, in_chs, 3, stride=2)
        stages, chs, reductions = [], [in_chs], [2]
        for rows in STAGE_ROWS:
            blocks, reduction = [], reductions[-1]
            for t, c, n, s in (INVERTED_RESIDUAL_TABLE[r] for r in rows):
                out_chs = int(c * width_mult)
                for j in range(n):
                    blocks.append(InvertedResidual(in_chs, out_chs, s if j == 0 else 1, t))
                    in_chs = out_chs
                reduction *= s
            stages.append(nn.Sequential(*blocks))
            chs.append(in_chs)
            reductions.append(reduction)
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        # ImageNet MobileNetV2 scales this only for width > 1; CRD keeps 1280 at width 0.5.
        last_chs = int(last_chs * width_mult) if width_mult > 1.0 else last_chs
        self.head_conv = conv_bn_relu(in_chs, last_chs, 1)
        self._init_head(chs, reductions, last_chs, num_classes, drop_rate, global_pool)
