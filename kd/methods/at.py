"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention"):
CE on labels + the squared distance between normalised spatial attention maps of matching stages.
Published CIFAR-100 defaults (CRD's tables / RepDistiller): AT weight 1000 (beta/2), p = 2, CE 1.

Stages: every non-stem map of each model's uniform map list (maps[1:]: RepDistiller's feat[1:-1],
mdistiller's feats[1:]), i.e. 3 on the CIFAR ResNets/WRNs/ShuffleNets and 4 on VGG, MobileNetV2 and
ResNet50. When the two lists differ in length the last min(len) of each are paired (from the end, the
deepest stages; the references zip from the start, which only differs for such mixed pairs, none of
which is in the published tables). Maps of different sizes are pooled to the smaller one inside
at_loss. Computed in float32 under any autocast. With two selected teachers
(`--teachers.select both`) the first one is used: attention maps of two networks are not averaged.
"""

from __future__ import annotations

from torch import Tensor

from ..losses import at_loss, cross_entropy
from .base import Method, StepInputs


class AT(Method):
    name = "at"
    needs_maps = True

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        s_maps, t_maps = inp.student.maps[1:], inp.teachers[0].maps[1:]
        n = min(len(s_maps), len(t_maps))
        return {
            "ce": cross_entropy(inp.student.logits, inp.target, self.label_smoothing),
            "at": at_loss(s_maps[-n:], [m.detach() for m in t_maps[-n:]], self.cfg.p),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "at": self.cfg.at_weight}
