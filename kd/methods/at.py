"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention"):
CE on labels + the squared distance between normalised spatial attention maps of matching stages.
Published CIFAR-100 defaults (CRD's tables / RepDistiller): AT weight 1000 (beta/2), p = 2, CE 1.

Stages: the last three maps of each model's uniform map list (the three residual stages of the CIFAR
ResNets/WRNs), or the last min(len) when a model has fewer; paired from the end. Maps of different
sizes are pooled to the smaller one inside at_loss. With two selected teachers
(`--teachers.select both`) the first one is used: attention maps of two networks are not averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..errors import ConfigError
from ..losses import at_loss, cross_entropy
from .base import Method, StepInputs

NUM_STAGES = 3


@dataclass
class ATCfg:
    """--method at: attention transfer on the last three stages."""

    at_weight: float = 1000.0
    """weight of the attention term (the paper's beta/2)."""
    p: float = 2.0
    """power of the activations in the attention map mean_c |f|^p."""
    ce_weight: float = 1.0
    """weight of the cross-entropy on labels."""

    def check(self) -> None:
        if self.p <= 0:
            raise ConfigError(f"--at.p must be > 0, got {self.p}")


class AT(Method):
    name = "at"
    needs_maps = True

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        s_maps, t_maps = inp.student.maps, inp.teachers[0].maps
        n = min(NUM_STAGES, len(s_maps), len(t_maps))
        return {
            "ce": cross_entropy(inp.student.logits, inp.target, self.label_smoothing),
            "at": at_loss(s_maps[-n:], [m.detach() for m in t_maps[-n:]], self.cfg.p),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "at": self.cfg.at_weight}
