"""Vanilla KD (Hinton et al., 2015): CE on labels + T^2-scaled KL to the teacher's softened logits.
Published CIFAR-100 defaults (CRD/DKD tables): T = 4, CE 0.1, KD 0.9."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..losses import cross_entropy, kd_loss
from .base import Method, StepInputs, teacher_logits


@dataclass
class KDCfg:
    """--method kd: vanilla knowledge distillation."""

    temperature: float = 4.0
    """softmax temperature T of the KD term."""
    ce_weight: float = 0.1
    """weight of the cross-entropy on labels."""
    kd_weight: float = 0.9
    """weight of the T^2-scaled KL to the teacher."""


class KD(Method):
    name = "kd"

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        return {
            "ce": cross_entropy(inp.student.logits, inp.target, self.label_smoothing),
            "kd": kd_loss(inp.student.logits, teacher_logits(inp).detach(), self.cfg.temperature),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "kd": self.cfg.kd_weight}
