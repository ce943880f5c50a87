"""MixUp / CutMix on training batches, with torchvision.transforms.v2's implementations
(Zhang et al., ICLR 2018; Yun et al., ICCV 2019: box side sqrt(1 - lambda)).
The mixed targets are [B, C] probabilities, which every cross-entropy in kd accepts."""

from __future__ import annotations

from typing import Callable

from torch import Tensor
from torchvision.transforms import v2


def build_mixer(
    num_classes: int, mixup_alpha: float, cutmix_alpha: float
) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """A batch transform (images [B,3,H,W], labels [B]) -> (mixed images, soft labels [B,C]), or None
    when both alphas are 0. CutMix wins when both are > 0. Randomness comes from torch's global RNG,
    so a seeded run is reproducible."""
    if cutmix_alpha > 0:
        return v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)
    if mixup_alpha > 0:
        return v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)
    return None
