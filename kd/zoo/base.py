"""`CifarNet`: the timm-style feature/classifier API shared by every zoo architecture.

A subclass builds only its layers:
    stem       -> feature 0 (full or half resolution map)
    stages     -> nn.Sequential, one module per feature 1..N
    norm       -> final BN+ReLU of pre-activation nets (WRN), Identity elsewhere
    head_conv  -> 1x1 conv lifting to `num_features` (MobileNetV2, ShuffleNetV2), Identity elsewhere
and then calls `self._init_head(...)`, which adds the pooled linear classifier and the metadata.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from timm.layers import ClassifierHead
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices  # not re-exported by timm.models

# RepDistiller's CIFAR-100 normalisation (dataset/cifar100.py), the same as kd.data's
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def conv_bn_relu(
    in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> optional ReLU: the layer every zoo net repeats."""
    layers = [
        nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_chs),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class CifarNet(nn.Module):
    """Base class: forward_features / forward_head / forward_intermediates as timm defines them.

    Feature maps (`feature_info`, `forward_intermediates`): index 0 is the stem output, index i the
    output of stage i. Stage outputs of post-activation nets (ResNet, VGG, ShuffleNets) are taken after
    the final ReLU, as timm does; MobileNetV2 stages end in a linear bottleneck (no activation to take
    them after). Pre-activation nets (WRN)
    have no activation at a stage end: their maps are the raw residual sums, and `norm=True` applies the
    final BN+ReLU to the last map (timm ResNetV2 semantics).
    """

    stem: nn.Module
    stages: nn.Sequential
    norm: nn.Module
    head_conv: nn.Module
    # Initialisation of the reference (RepDistiller / mdistiller) models: 'kaiming' = He fan_out convs and
    # identity BatchNorm; 'pytorch' = PyTorch's module defaults (ShuffleNets). classifier_std: the linear
    # classifier's weight ~ normal(0, std) with zero bias (VGG, MobileNetV2: 0.01); None = PyTorch default.
    init_scheme: ClassVar[str] = "kaiming"
    classifier_std: ClassVar[float | None] = None
    # True: PyTorch's default classifier weight but a zero bias (RepDistiller's wrn.py)
    classifier_zero_bias: ClassVar[bool] = False

    def _init_head(
        self,
        stage_chs: list[int],
        stage_reductions: list[int],
        num_features: int,
        num_classes: int,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        """Add classifier + metadata. `stage_chs`/`stage_reductions` list the stem first, then each stage."""
        assert len(stage_chs) == len(stage_reductions) == len(self.stages) + 1
        names = ["stem"] + [f"stages.{i}" for i in range(len(self.stages))]
        self.feature_info = [
            dict(num_chs=c, reduction=r, module=m) for c, r, m in zip(stage_chs, stage_reductions, names)
        ]
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.head = ClassifierHead(num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference models' init (see `init_scheme`, `classifier_std`): He (fan_out) convs with zero
        bias and BN at identity for 'kaiming'; nothing for 'pytorch'; then the classifier."""
        if self.classifier_std is not None:
            nn.init.normal_(self.head.fc.weight, 0.0, self.classifier_std)
            nn.init.zeros_(self.head.fc.bias)
        elif self.classifier_zero_bias:
            nn.init.zeros_(self.head.fc.bias)
        if self.init_scheme == "pytorch":
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- timm model API -------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)  # per block: stages are nn.Sequential
        return stage(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> final unpooled map [B,num_features,h,w]."""
        x = self.stem(x)
        for stage in self.stages:
            x = self._run_stage(stage, x)
        return self.head_conv(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Final map -> pooled feature [B,num_features] (pre_logits) or logits [B,num_classes]."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward that also returns the stem/stage maps picked by `indices` (timm semantics).

        indices: None = all, int n = last n, list = those (negative from the end).
        Returns (forward_features(x), maps) or just maps when `intermediates_only`.
        """
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last_idx = len(self.stages)
        intermediates = []

        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages[:max_index] if stop_early and not torch.jit.is_scripting() else self.stages
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            x = self._run_stage(stage, x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)

        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.head_conv(self.norm(x))
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and head) not needed to produce the maps at `indices`."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if max_index < len(self.stages):
            self.stages = self.stages[:max_index]
            prune_norm = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.head_conv = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices
