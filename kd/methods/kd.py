"""Vanilla KD (Hinton et al., 2015): CE on labels + T^2-scaled KL to the teacher's softened logits.
Published CIFAR-100 defaults (CRD/DKD tables): T = 4, CE 0.1, KD 0.9.

`standardize` applies logit standardisation (Sun et al., CVPR 2024, "Logit Standardization in
Knowledge Distillation") to both logits before kd_loss; `temperature` is then the base temperature
(T^2 uses it too). The authors' CIFAR-100 recipe: `--kd.standardize True --kd.temperature 2
--kd.kd-weight 9` (CE 0.1). With two selected teachers their logits are averaged."""

from __future__ import annotations

from torch import Tensor

from ..losses import cross_entropy, kd_loss, standardize_logits
from .base import Method, StepInputs, teacher_logits


class KD(Method):
    name = "kd"

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        s, t = inp.student.logits, teacher_logits(inp).detach()
        if self.cfg.standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        return {
            "ce": cross_entropy(inp.student.logits, inp.target, self.label_smoothing),
            "kd": kd_loss(s, t, self.cfg.temperature),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "kd": self.cfg.kd_weight}
