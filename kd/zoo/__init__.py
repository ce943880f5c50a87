"""CIFAR-100 knowledge-distillation model zoo, registered with timm on `import kd` (or `import kd.zoo`).

The teacher/student architectures of the CIFAR-100 tables of CRD (Tian et al., "Contrastive
Representation Distillation", ICLR 2020) and DKD (Zhao et al., "Decoupled Knowledge Distillation",
CVPR 2022), written from the papers: CIFAR ResNets (resnet8..resnet110, resnet8x4, resnet32x4), the CIFAR
ResNet50, Wide ResNets (wrn_16_1 .. wrn_40_2), VGG-BN (vgg8..vgg19), MobileNetV2 (width 0.5),
ShuffleNetV1 and ShuffleNetV2; plus resnet8_050 (resnet8 at half width, not from a paper: the
benchmark's small student). All take 32x32 inputs and default to 100 classes:

    import timm, kd.zoo
    model = timm.create_model('resnet8x4')                  # 100 classes
    model = timm.create_model('cifar_vgg13', num_classes=10)

Naming rule: every model is registered as `cifar_<name>` (e.g. `cifar_resnet8x4`, `cifar_vgg13`,
`cifar_mobilenetv2`, `cifar_resnet50`); the bare `<name>` is registered as an alias too, unless timm
already has a model of that name, which is never overridden. With timm 1.0.31 that leaves `vgg11`,
`vgg13`, `vgg16`, `vgg19` and `resnet50` meaning timm's ImageNet models: use their `cifar_` names.
`mobilenetv2` / `cifar_mobilenetv2` is the width-0.5 CIFAR variant (timm's own are `mobilenetv2_050`...).

Feature API (see `base.CifarNet`): `feature_info` lists the stem output, then one map per stage;
`forward_intermediates` follows timm's contract (indices, norm, stop_early, intermediates_only). Maps
are taken after each stage's final activation, as timm does and as RepDistiller / mdistiller feed
FitNet, AT and the other feature losses (their pre-activation `preact` maps are only used by ABound,
which kd does not implement). WRN is pre-activation, so its maps are raw residual sums and `norm=True`
applies the final BN-ReLU to the last one. No pretrained weights exist: `pretrained=True` raises
`ConfigError`; load a checkpoint instead.

`PUBLISHED_PARAMS` gives the parameter counts (millions, 100 classes) published for these models;
the implementations match them within 1% or within the published rounding (resnet8: 0.0839M vs "0.08M").
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import timm
from timm.models import build_model_with_cfg, register_model
from torch import nn

from ..errors import ConfigError
from .base import CIFAR100_MEAN, CIFAR100_STD, CifarNet
from .mobilenetv2 import CifarMobileNetV2
from .resnet import cifar_resnet, cifar_resnet50
from .shufflenet import CifarShuffleNetV1, CifarShuffleNetV2
from .vgg import CifarVGG
from .wrn import WideResNet

__all__ = ["ALIASES", "CifarNet", "PUBLISHED_PARAMS", "ZOO_MODELS"]  # register_model appends the model names
_TIMM_MODULE = "zoo"  # timm.list_models(module='zoo') lists every name registered here

# base name -> (constructor, number of feature maps incl. stem, name of the first conv)
_ARCHS: dict[str, tuple[Callable[..., CifarNet], int, str]] = {
    **{f"resnet{d}": (partial(cifar_resnet, d), 4, "stem.0") for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8_050": (partial(cifar_resnet, 8, 0.5), 4, "stem.0"),
    "resnet8x4": (partial(cifar_resnet, 8, 4), 4, "stem.0"),
    "resnet32x4": (partial(cifar_resnet, 32, 4), 4, "stem.0"),
    "resnet50": (cifar_resnet50, 5, "stem.0"),
    **{f"wrn_{d}_{k}": (partial(WideResNet, d, k), 4, "stem") for d in (16, 40) for k in (1, 2)},
    **{f"vgg{d}": (partial(CifarVGG, d), 5, "stem.0") for d in (8, 11, 13, 16, 19)},
    "mobilenetv2": (CifarMobileNetV2, 5, "stem.0"),
    "shufflenetv1": (CifarShuffleNetV1, 4, "stem.0"),
    "shufflenetv2": (CifarShuffleNetV2, 4, "stem.0"),
}

# Published parameter counts in millions (100 classes): CRD/DKD tables and the papers the models come
# from, to their published precision (resnet8: 0.0839M is printed "0.08M"). vgg11/16/19 have no published
# CIFAR-100 count and are pinned by exact counts in the tests. resnet14: the 0.17M sometimes quoted is
# inconsistent with its family, which grows by exactly 97,216 params per block triple (0.084, 0.181,
# 0.278M for n = 1, 2, 3), so the figure here is 0.18M.
PUBLISHED_PARAMS: dict[str, float] = {
    "cifar_resnet8": 0.08,
    "cifar_resnet14": 0.18,
    "cifar_resnet20": 0.28,
    "cifar_resnet32": 0.47,
    "cifar_resnet44": 0.67,
    "cifar_resnet56": 0.86,
    "cifar_resnet110": 1.73,
    "cifar_resnet8x4": 1.23,
    "cifar_resnet32x4": 7.43,
    "cifar_resnet50": 23.71,
    "cifar_wrn_16_1": 0.18,
    "cifar_wrn_16_2": 0.70,
    "cifar_wrn_40_1": 0.57,
    "cifar_wrn_40_2": 2.26,
    "cifar_vgg8": 3.96,
    "cifar_vgg13": 9.46,
    "cifar_mobilenetv2": 0.81,
    "cifar_shufflenetv1": 0.95,
    "cifar_shufflenetv2": 1.36,
}

default_cfgs: dict[str, dict[str, Any]] = {}  # read by timm's register_model for the pretrained_cfg
ZOO_MODELS: list[str] = []  # canonical `cifar_` names
ALIASES: dict[str, str] = {}  # bare name -> canonical name


def _cfg(first_conv: str) -> dict[str, Any]:
    return dict(
        num_classes=100,
        input_size=(3, 32, 32),
        pool_size=None,
        crop_pct=1.0,
        interpolation="bilinear",
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        first_conv=first_conv,
        classifier="head.fc",
        paper_ids=("arXiv:1910.10699", "arXiv:2203.08679"),
    )


def _make_entrypoint(name: str, build: Callable[..., CifarNet], num_feature_maps: int) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ConfigError(f"no pretrained weights exist for {name}; train it or load a checkpoint")
        return build_model_with_cfg(
            build,
            name,
            pretrained=False,
            feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(num_feature_maps))),
            **kwargs,
        )

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__  # timm files the model under this module's default_cfgs
    entrypoint.__doc__ = f"CIFAR {name} (kd.zoo); kwargs go to the model constructor."
    return entrypoint


def _register(name: str, build: Callable[..., CifarNet], num_feature_maps: int, first_conv: str) -> None:
    default_cfgs[name] = _cfg(first_conv)
    fn = _make_entrypoint(name, build, num_feature_maps)
    globals()[name] = fn  # keeps `from kd.zoo import *` (register_model extends __all__) valid
    register_model(fn)


_ours = set(timm.list_models(module=_TIMM_MODULE))  # non-empty only if this module is re-imported
for _base_name, (_build, _n_maps, _first_conv) in _ARCHS.items():
    _canonical = f"cifar_{_base_name}"
    ZOO_MODELS.append(_canonical)
    _register(_canonical, _build, _n_maps, _first_conv)
    if not timm.is_model(_base_name) or _base_name in _ours:
        ALIASES[_base_name] = _canonical
        _register(_base_name, _build, _n_maps, _first_conv)
