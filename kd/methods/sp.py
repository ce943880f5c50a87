"""Similarity-preserving KD (Tung & Mori, ICCV 2019, "Similarity-Preserving Knowledge Distillation"),
as in RepDistiller: CE on labels + the squared distance between the row-normalised batch Gram
matrices of the last feature map. Published CIFAR-100 defaults: SP weight 3000 (gamma), CE 1.

Map: the last map of each model's uniform map list (the last residual stage, RepDistiller's
feat[-2]). With two selected teachers (`--teachers.select both`) the first one is used.
"""

from __future__ import annotations

from torch import Tensor

from ..losses import cross_entropy, sp_loss
from .base import Method, StepInputs


class SP(Method):
    name = "sp"
    needs_maps = True

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        return {
            "ce": cross_entropy(inp.student.logits, inp.target, self.label_smoothing),
            "sp": sp_loss([inp.student.maps[-1]], [inp.teachers[0].maps[-1].detach()]),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "sp": self.cfg.sp_weight}
