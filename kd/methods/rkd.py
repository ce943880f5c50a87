"""Relational KD (Park et al., CVPR 2019, "Relational Knowledge Distillation"), as in RepDistiller:
CE on labels + distance-wise and angle-wise smooth-L1 losses on the pooled features' pairwise
relations. Published CIFAR-100 defaults (CRD's tables / RepDistiller): distance 25, angle 50 (inside
the term), term weight 1, CE 1; `squared` / `eps` as in mdistiller's RKD (defaults: plain distances,
eps 1e-12). Computed in float32 under any autocast.

Features: the pooled pre-logit features (`ModelOutput.feature`), RepDistiller's feat[-1]. With two
selected teachers (`--teachers.select both`) the first one is used (relations of one network).
"""

from __future__ import annotations

from torch import Tensor

from ..losses import cross_entropy, rkd_loss
from .base import Method, StepInputs


class RKD(Method):
    name = "rkd"

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        f_s, f_t = inp.student.feature, inp.teachers[0].feature.detach()
        return {
            "ce": cross_entropy(inp.student.logits, inp.target, self.label_smoothing),
            "rkd": rkd_loss(f_s, f_t, self.cfg.distance_weight, self.cfg.angle_weight, self.cfg.squared, self.cfg.eps),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "rkd": self.cfg.rkd_weight}
