"""AE-KD, adaptive ensemble KD in gradient space (Du, You, Li, Wu, Wang, Qian & Zhang, NeurIPS 2020, "Agree to
Disagree: Adaptive Ensemble Knowledge Distillation in Gradient Space"), as the CA-MKD authors' code runs it
(github.com/Rorozhl/CA-MKD, `--ensemble_method AEKD -C 0.6`). Ensemble KD as multi-objective optimisation: the
student follows the min-norm point of the convex hull of the teachers' KD gradients, taken with respect to the
student's logits (not its parameters), each teacher's weight capped by a tolerance C for disagreement. With
M >= 2 teachers, labels y, temperature T:

  per-teacher KD:   l[m, b] = T^2 * KL(softmax(t_m[b]/T) || softmax(s[b]/T))
  its gradient:     g[m, b] = d l[m, b] / d s[b] = T * (softmax(s[b]/T) - softmax(t_m[b]/T))
  weights:          a = argmin_{sum a = 1, 0 <= a_m <= C} || sum_m a_m v_m ||^2
                    v_m = mean_b g[m, b] (one problem per batch, as the code: its SVM gets the batch-mean
                    gradients; --aekd.per-sample: v_m = g[m, b], one problem per sample)
  kd   = sum_m a_m * mean_b l[m, b]      (per sample: mean_b sum_m a[m, b] * l[m, b])
  loss = ce_weight * CE(s, y) + kd_weight * kd

The weights carry no gradient (the code solves them with numpy). The code solves the problem with a one-class
SVM on the Gram matrix (libsvm, tolerance 1e-6; its dual is exactly this problem with C = 1/(nu M)); here it is
solved exactly (kd.losses.min_norm_simplex_weights). --aekd.normalize-grads is the code's --svm_norm (off by
default there and here). Defaults: the code's (`-r 1 -a 1 -C 0.6`, T 4): CE 1, KD 1, C 0.6, T 4. The weights
come from each process's own batch (as the code's DDP runs). At most 6 teachers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..configs import AEKDCfg
from ..errors import ConfigError
from ..losses import MIN_NORM_MAX_TEACHERS, aekd_weights, cross_entropy, kd_loss_per_sample
from .base import Method, StepInputs


class AEKD(Method):
    name = "aekd"
    multi_teacher = True

    def __init__(self, cfg: AEKDCfg, student, teachers, **kwargs):
        super().__init__(cfg, student, teachers, **kwargs)
        if len(teachers) > MIN_NORM_MAX_TEACHERS:
            raise ConfigError(f"aekd weights at most {MIN_NORM_MAX_TEACHERS} teachers, got {len(teachers)}")

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        s = inp.student.logits
        t_logits = torch.stack([t.logits.detach() for t in inp.teachers])  # [M, B, C]
        rows = torch.stack([kd_loss_per_sample(s, t, self.cfg.temperature) for t in t_logits])  # [M, B]
        weights = aekd_weights(
            s, t_logits, self.cfg.temperature, self.cfg.tolerance, self.cfg.normalize_grads, self.cfg.per_sample
        )  # [M, 1] or [M, B]
        return {
            "ce": cross_entropy(s, inp.target, self.label_smoothing),
            "kd": (weights.to(rows.dtype) * rows).sum(dim=0).mean(),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "kd": self.cfg.kd_weight}
