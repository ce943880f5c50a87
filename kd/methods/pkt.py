"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, "Learning Deep Representations with
Probabilistic Knowledge Transfer"), as in RepDistiller: CE on labels + the KL between the cosine-
affinity distributions of the pooled features. CIFAR-100 default: PKT weight 30000 (RepDistiller's
`--distill pkt -b 30000`, the setting of CRD's tables; pkt_loss averages over all B*B entries, hence
the large weight), CE 1.

Features: the pooled pre-logit features (`ModelOutput.feature`), RepDistiller's feat[-1]. With two
selected teachers (`--teachers.select both`) the first one is used.
"""

from __future__ import annotations

from torch import Tensor

from ..losses import cross_entropy, pkt_loss
from .base import Method, StepInputs


class PKT(Method):
    name = "pkt"

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        return {
            "ce": cross_entropy(inp.student.logits, inp.target, self.label_smoothing),
            "pkt": pkt_loss(inp.student.feature, inp.teachers[0].feature.detach()),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "pkt": self.cfg.pkt_weight}
