"""AVER (the averaged-loss multi-teacher baseline, e.g. "AVER" / "AVER-MKD" in You et al., KDD 2017
and the tables of Zhang, Chen & Wang, ICASSP 2022): CE on labels + the MEAN over teachers of each
teacher's vanilla KD loss,

    loss = ce_weight * CE(s, y) + kd_weight * (1/M) * sum_m T^2 * KL(softmax(t_m/T) || softmax(s/T))

(KL summed over classes, mean over the batch, as kd_loss). This is NOT KD from the mean of the teachers'
logits (`--method kd --teachers.select both`): the mean of KL losses pulls the student towards every
teacher's distribution, the KL to the mean logits towards one fused distribution.

Defaults: the CA-MKD authors' AVER setting (their `--ensemble_method AVERAGE_LOSS -r 1 -a 1`, T 4):
CE 1, KD 1, T 4. Uses every --teachers model (M >= 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..losses import cross_entropy, kd_loss
from .base import Method, StepInputs


class Aver(Method):
    name = "aver"
    multi_teacher = True

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        s = inp.student.logits
        per_teacher = [kd_loss(s, t.logits.detach(), self.cfg.temperature) for t in inp.teachers]
        return {
            "ce": cross_entropy(s, inp.target, self.label_smoothing),
            "kd": torch.stack(per_teacher).mean(),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "kd": self.cfg.kd_weight}
