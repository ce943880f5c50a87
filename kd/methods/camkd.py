"""CA-MKD, confidence-aware multi-teacher KD (Zhang, Chen & Wang, ICASSP 2022, "Confidence-Aware
Multi-Teacher Knowledge Distillation"), as in the authors' code (github.com/Rorozhl/CA-MKD,
`--distill inter --ensemble_method CAMKD`). With M >= 2 teachers, labels y, temperature T:

  logit term: L[m, b] = CE(t_m[b], y[b]);  w = (1 - softmax_m(L)) / (M - 1)     ([M, B], eq. 2)
              kd = sum_{m,b} w[m, b] * T^2 * KL(softmax(t_m[b]/T) || softmax(s[b]/T)) / (B * M)
  feature term: f_s = the student's last stage map, resized to teacher m's last map size (adaptive
              average pooling when larger, bilinear when smaller), h_m = ReLU(BN(conv1x1_m(f_s)))
              (a trained 1x1 conv with bias to teacher m's channels); teacher m's own (frozen) head
              turns h_m into logits z_m; L'[m, b] = CE(z_m[b], y[b]);  w' = (1 - softmax_m(L')) / (M - 1)
              feat = sum_{m,b} w'[m, b] * mean_{chw}((h_m[b] - f_t,m[b])^2) / (B * M)
  loss = ce_weight * CE(s, y) + kd_weight * kd + feature_weight * feat   (feat from epoch 2 on)

w' is NOT detached (the authors' code lets the gradient reach h_m through the teacher head's CE);
w comes from the frozen teachers (no gradient). The feature term is left out in epoch 1, as in the
authors' loop. Defaults: the authors' script (`-r 1 -a 1 -b 50`, T 4): CE 1, KD 1, feature 50, T 4.
Maps (the authors' feat[-2]): the last entry of each model's uniform map list, after the final BN-ReLU on
pre-activation zoo nets (WRN); on ShuffleNetV2 after its final conv1x1 -> BN -> ReLU (the head conv,
1024 x 4 x 4 on CIFAR: the authors' ShuffleNetv2 returns that as f3, not the 464-channel stage output);
on MobileNetV2 before its head conv (the authors' f4). The teacher head is everything after that map
(zoo: the head conv of MobileNetV2, pooling, classifier); a teacher whose map does not feed its head
directly is refused. The norm / head conv re-applied to the student's map never updates BatchNorm
running statistics (the model's own forward already did, once per step). The reference resizes the student map in place
inside its teacher loop (a later teacher sees the map resized for an earlier one); here each teacher
gets the student map resized from the original (the same whenever the teachers' maps share a size).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..freeze import kept_modes
from ..losses import confidence_weights, cross_entropy, kd_loss_per_sample, weighted_teacher_mean
from ..models import KDModel
from ..zoo.base import CifarNet
from ..zoo.shufflenet import CifarShuffleNetV2
from ..configs import CAMKDCfg
from .base import Method, StepInputs


def taps_after_head_conv(backbone) -> bool:
    """True where the authors' feat[-2] is taken after the head conv (ShuffleNetV2: conv2 -> bn2 -> ReLU)."""
    return isinstance(backbone, CifarShuffleNetV2)


@contextmanager
def bn_stats_frozen(module: nn.Module):
    """Apply `module` without touching BatchNorm running statistics: train-mode BatchNorm still normalises
    with the batch statistics (the same output and gradient as in the model's forward), eval-mode with the
    running ones, but neither the running mean/var nor num_batches_tracked change."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def distill_map(model: KDModel, maps: list[Tensor]) -> Tensor:
    """The map CA-MKD distils (the authors' feat[-2]): the last stage map, after the final norm of
    pre-activation zoo nets (WRN: BN-ReLU) and after the head conv of ShuffleNetV2 (conv-BN-ReLU to 1024
    channels); the last map itself elsewhere. The re-applied norm / head conv leaves BatchNorm running
    statistics alone (the model's forward updated them already)."""
    backbone = model.backbone
    if not isinstance(backbone, CifarNet):
        return maps[-1]
    with bn_stats_frozen(backbone.norm), bn_stats_frozen(backbone.head_conv):
        f = backbone.norm(maps[-1])
        return backbone.head_conv(f) if taps_after_head_conv(backbone) else f


def logits_from_map(model: KDModel, h: Tensor) -> Tensor:
    """The model's head applied to a tensor shaped like its distill_map: zoo nets run their head conv
    (MobileNetV2) first unless the map is taken after it (ShuffleNetV2); other timm models are assumed to
    feed that map to forward_head directly (checked once by `check_head_from_map`)."""
    backbone = model.backbone
    head_conv = isinstance(backbone, CifarNet) and not taps_after_head_conv(backbone)
    final = backbone.head_conv(h) if head_conv else h
    feature = backbone.forward_head(final, pre_logits=True)
    if model.adapter is not None:
        feature = model.adapter(feature)
    return model.classifier(feature)


@torch.no_grad()
def distill_map_shape(model: KDModel, image_size: int) -> tuple[int, int, int]:
    """(C, H, W) of the model's distill_map for `image_size` px inputs (one eval-mode forward of zeros)."""
    param = next(model.parameters())
    with kept_modes(model):
        model.eval()
        x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
        return tuple(distill_map(model, model(x, with_maps=True).maps).shape[1:])


@torch.no_grad()
def check_head_from_map(model: KDModel, image_size: int) -> tuple[int, int, int]:
    """(C, H, W) of the model's distill_map; ConfigError unless logits_from_map(distill_map) reproduces
    the model's logits."""
    param = next(model.parameters())
    with kept_modes(model):
        model.eval()
        x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(param)
        out = model(x, with_maps=True)
        h = distill_map(model, out.maps)
        same = torch.allclose(logits_from_map(model, h), out.logits, rtol=1e-4, atol=1e-4)
    if not same:
        raise ConfigError(
            f"camkd: teacher {model.arch}'s last feature map does not feed its classifier head "
            "directly; use a kd zoo or timm ResNet-style teacher"
        )
    return tuple(h.shape[1:])


def resize_to(f: Tensor, size: tuple[int, int]) -> Tensor:
    """Student map to the teacher's spatial size: adaptive average pooling when at least as large,
    bilinear interpolation (align_corners False) when smaller (the authors' CalWeight)."""
    if tuple(f.shape[2:]) == size:
        return f
    if f.shape[2] >= size[0]:
        return F.adaptive_avg_pool2d(f, size)
    return F.interpolate(f, size=size, mode="bilinear", align_corners=False)


class CAMKD(Method):
    name = "camkd"
    multi_teacher = True
    needs_maps = True

    def __init__(self, cfg: CAMKDCfg, student: KDModel, teachers: list[KDModel], **kwargs):
        super().__init__(cfg, student, teachers, **kwargs)
        if self.image_size < 1:
            raise ConfigError("camkd needs the image size to shape its feature embeddings (image_size=...)")
        c_s = distill_map_shape(student, self.image_size)[0]
        embeds = []
        for teacher in teachers:
            c_t = check_head_from_map(teacher, self.image_size)[0]
            embeds.append(nn.Sequential(nn.Conv2d(c_s, c_t, 1), nn.BatchNorm2d(c_t), nn.ReLU(inplace=True)))
        self.embeds = nn.ModuleList(embeds)
        # plain containers (not submodules): the models' final norm / heads are used, never trained or saved here
        self.teachers = list(teachers)
        self.student_model = (student,)

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        s, hard = inp.student.logits, inp.target
        t_logits = [t.logits.detach() for t in inp.teachers]
        kd_weights = confidence_weights(torch.stack([F.cross_entropy(t, hard, reduction="none") for t in t_logits]))
        kd_rows = torch.stack([kd_loss_per_sample(s, t, self.cfg.temperature) for t in t_logits])

        f_s = distill_map(self.student_model[0], inp.student.maps)
        feat_ce, feat_rows = [], []
        for embed, teacher, t_out in zip(self.embeds, self.teachers, inp.teachers):
            f_t = distill_map(teacher, t_out.maps).detach()
            h = embed(resize_to(f_s, tuple(f_t.shape[2:])))
            feat_ce.append(F.cross_entropy(logits_from_map(teacher, h), hard, reduction="none"))
            feat_rows.append((h - f_t).pow(2).flatten(1).mean(dim=1))
        feat_weights = confidence_weights(torch.stack(feat_ce))
        return {
            "ce": cross_entropy(s, inp.target, self.label_smoothing),
            "kd": weighted_teacher_mean(kd_weights, kd_rows),
            "feat": weighted_teacher_mean(feat_weights, torch.stack(feat_rows)),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        feature = self.cfg.feature_weight if epoch >= self.cfg.feature_start_epoch else 0.0
        return {"ce": self.cfg.ce_weight, "kd": self.cfg.kd_weight, "feat": feature}
