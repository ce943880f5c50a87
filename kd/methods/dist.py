"""DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"): CE on labels +
inter-class and intra-class Pearson-correlation losses between the softened logits.

CIFAR-100 defaults from the authors' recipe (DIST_KD, configs/strategies/distill/dist_cifar.yaml:
`kd: dist_t4`, i.e. beta 1, gamma 1, T 4, with kd_loss_weight 2 and ori_loss_weight 1): beta 1,
gamma 1, T 4, DIST weight 2, CE 1 (equivalently beta = gamma = 2 at weight 1). beta = gamma = T = 1
at weight 1 is their ImageNet setting. With two selected teachers their logits are averaged.
"""

from __future__ import annotations

from torch import Tensor

from ..losses import cross_entropy, dist_loss
from .base import Method, StepInputs, teacher_logits


class DIST(Method):
    name = "dist"

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        return {
            "ce": cross_entropy(inp.student.logits, inp.target, self.label_smoothing),
            "dist": dist_loss(
                inp.student.logits, teacher_logits(inp).detach(), self.cfg.beta, self.cfg.gamma, self.cfg.temperature
            ),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "dist": self.cfg.dist_weight}
