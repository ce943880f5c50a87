"""Decoupled KD (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation"), as in mdistiller:
CE on labels + warm-up * (alpha * TCKD + beta * NCKD). Published CIFAR-100 defaults: alpha 1,
beta 8, T 4, warm-up 20 epochs (DKD weight min(epoch / warmup, 1), epochs counted from 1), CE 1.

With soft labels (MixUp/CutMix) the target class of TCKD/NCKD is each row's largest label weight; the
CE term uses the soft labels. With two selected teachers their logits are averaged.

`standardize` applies logit standardisation (Sun et al., CVPR 2024) to both logits before dkd_loss;
`temperature` is then the base temperature. The authors' CIFAR-100 recipe for DKD multiplies alpha and
beta by 9 as well (their KD weight 9): `--dkd.standardize True --dkd.temperature 2 --dkd.alpha 9
--dkd.beta 72`.
"""

from __future__ import annotations

from torch import Tensor

from ..losses import cross_entropy, dkd_loss, standardize_logits
from .base import Method, StepInputs, teacher_logits, warmup_factor


class DKD(Method):
    name = "dkd"

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        s, t = inp.student.logits, teacher_logits(inp).detach()
        if self.cfg.standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        hard = inp.target if inp.target.ndim == 1 else inp.target.argmax(dim=1)
        return {
            "ce": cross_entropy(inp.student.logits, inp.target, self.label_smoothing),
            "dkd": dkd_loss(s, t, hard, self.cfg.alpha, self.cfg.beta, self.cfg.temperature),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "dkd": warmup_factor(epoch, self.cfg.warmup)}
