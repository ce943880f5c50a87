"""EBKD, entropy-based multi-teacher KD (Kwon, Na, Kim & Yoon, ICASSP 2020, "Adaptive Knowledge
Distillation Based on Entropy"), in the multi-teacher form of the CA-MKD authors' code
(github.com/Rorozhl/CA-MKD, `--ensemble_method EBKD`): each teacher's per-sample KD loss is weighted by
how certain that teacher is on the sample,

    H[m, b] = entropy(softmax(t_m[b]))                       (temperature 1)
    w[m, b] = 1 - H[m, b] / sum_m' H[m', b]                  (columns sum to M - 1)
    kd      = sum_{m, b} w[m, b] * T^2 * KL(softmax(t_m[b]/T) || softmax(s[b]/T)) / (B * M)
    loss    = ce_weight * CE(s, y) + kd_weight * kd

Defaults: the authors' script (`-r 1 -a 1`, T 4): CE 1, KD 1, T 4. Weights come from the frozen
teachers only (no gradient). Uses every --teachers model (M >= 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..losses import cross_entropy, entropy_weights, kd_loss_per_sample, weighted_teacher_mean
from .base import Method, StepInputs


class EBKD(Method):
    name = "ebkd"
    multi_teacher = True

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        s = inp.student.logits
        t_logits = torch.stack([t.logits.detach() for t in inp.teachers])  # [M, B, C]
        per_sample = torch.stack([kd_loss_per_sample(s, t, self.cfg.temperature) for t in t_logits])
        weights = entropy_weights(t_logits)
        return {
            "ce": cross_entropy(s, inp.target, self.label_smoothing),
            "kd": weighted_teacher_mean(weights, per_sample),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "kd": self.cfg.kd_weight}
