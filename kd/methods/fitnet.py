"""FitNet (Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets"), trained in one stage as in
RepDistiller: CE on labels + MSE between a trained regressor of the student's middle-stage map and the
teacher's middle-stage map. Published CIFAR-100 defaults (CRD's tables): hint weight 100, CE 1.

Middle stage: map index len(maps) // 2 of each model's uniform map list (for the CIFAR ResNets'
[stem, stage1, stage2, stage3] that is stage 2, RepDistiller's `hint_layer 2`). With two selected
teachers (`--teachers.select both`) the hint comes from the first one; a hint is one target map, and
averaging maps of different networks has no meaning.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import cross_entropy, hint_loss
from ..models import KDModel
from ..configs import FitNetCfg
from .base import Method, StepInputs, map_shapes


def middle_index(num_maps: int) -> int:
    """Index of the middle stage in a list of `num_maps` maps."""
    return num_maps // 2


def hint_regressor(student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int]) -> nn.Sequential:
    """conv + BN + ReLU mapping a [B, C_s, H_s, W_s] map to [B, C_t, H_t, W_t] (shapes as (C, H, W)).

    The conv is chosen from the two spatial sizes (RepDistiller's ConvReg, generalised):
      equal                              -> 1x1 conv;
      student larger by an integer r     -> 3x3 conv, stride r, padding 1;
      student smaller by an integer r    -> transposed conv, kernel 2r - r%2, stride r, padding r//2
                                            (r = 2: RepDistiller's 4/2/1);
      any other ratio                    -> adaptive average pooling (student larger in both sides) or
                                            bilinear resizing to the teacher's size, then a 1x1 conv.
    The ReLU follows the reference; teacher maps taken after a ReLU (CNN stages) are non-negative too.
    """
    (c_s, h_s, w_s), (c_t, h_t, w_t) = student_shape, teacher_shape
    layers: list[nn.Module]
    if (h_s, w_s) == (h_t, w_t):
        layers = [nn.Conv2d(c_s, c_t, 1)]
    elif h_s % h_t == 0 and w_s % w_t == 0 and h_s // h_t == w_s // w_t:
        layers = [nn.Conv2d(c_s, c_t, 3, stride=h_s // h_t, padding=1)]
    elif h_t % h_s == 0 and w_t % w_s == 0 and h_t // h_s == w_t // w_s:
        r = h_t // h_s
        layers = [nn.ConvTranspose2d(c_s, c_t, 2 * r - r % 2, stride=r, padding=r // 2)]
    elif h_s >= h_t and w_s >= w_t:
        layers = [nn.AdaptiveAvgPool2d((h_t, w_t)), nn.Conv2d(c_s, c_t, 1)]
    else:
        layers = [nn.Upsample(size=(h_t, w_t), mode="bilinear", align_corners=False), nn.Conv2d(c_s, c_t, 1)]
    return nn.Sequential(*layers, nn.BatchNorm2d(c_t), nn.ReLU(inplace=True))


class FitNet(Method):
    name = "fitnet"
    needs_maps = True

    def __init__(self, cfg: FitNetCfg, student: KDModel, teachers: list[KDModel], **kwargs):
        super().__init__(cfg, student, teachers, **kwargs)
        if self.image_size < 1:
            raise ConfigError("fitnet needs the image size to shape its regressor (image_size=...)")
        s_shapes = map_shapes(student, self.image_size)
        t_shapes = map_shapes(teachers[0], self.image_size)
        self.student_index, self.teacher_index = middle_index(len(s_shapes)), middle_index(len(t_shapes))
        self.regressor = hint_regressor(s_shapes[self.student_index], t_shapes[self.teacher_index])

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        f_s = inp.student.maps[self.student_index]
        f_t = inp.teachers[0].maps[self.teacher_index].detach()
        return {
            "ce": cross_entropy(inp.student.logits, inp.target, self.label_smoothing),
            "hint": hint_loss(self.regressor(f_s), f_t),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "hint": self.cfg.hint_weight}
