"""kd.zoo: CIFAR KD architectures registered with timm, their parameter counts and the timm feature API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
from torch import nn

import kd.zoo as zoo
from kd.errors import ConfigError

# Exact counts at 100 classes: pins each architecture (any layer change shows up here).
EXACT_PARAMS = {
    "cifar_resnet8": 83_892,
    "cifar_resnet14": 181_108,
    "cifar_resnet20": 278_324,
    "cifar_resnet32": 472_756,
    "cifar_resnet44": 667_188,
    "cifar_resnet56": 861_620,
    "cifar_resnet110": 1_736_564,
    "cifar_resnet8_050": 22_924,
    "cifar_resnet8x4": 1_233_540,
    "cifar_resnet32x4": 7_433_860,
    "cifar_resnet50": 23_705_252,
    "cifar_wrn_16_1": 180_916,
    "cifar_wrn_16_2": 703_284,
    "cifar_wrn_40_1": 569_780,
    "cifar_wrn_40_2": 2_255_156,
    "cifar_vgg8": 3_965_028,
    "cifar_vgg11": 9_277_284,
    "cifar_vgg13": 9_462_180,
    "cifar_vgg16": 14_774_436,
    "cifar_vgg19": 20_086_692,
    "cifar_mobilenetv2": 812_836,
    "cifar_shufflenetv1": 949_258,
    "cifar_shufflenetv2": 1_355_528,  # 1x1 stem, as RepDistiller / mdistiller
}
# Pooled feature width D per model.
NUM_FEATURES = {
    **{f"cifar_resnet{d}": 64 for d in (8, 14, 20, 32, 44, 56, 110)},
    "cifar_resnet8_050": 32,
    "cifar_resnet8x4": 256,
    "cifar_resnet32x4": 256,
    "cifar_resnet50": 2048,
    "cifar_wrn_16_1": 64,
    "cifar_wrn_40_1": 64,
    "cifar_wrn_16_2": 128,
    "cifar_wrn_40_2": 128,
    **{f"cifar_vgg{d}": 512 for d in (8, 11, 13, 16, 19)},
    "cifar_mobilenetv2": 1280,
    "cifar_shufflenetv1": 960,
    "cifar_shufflenetv2": 1024,
}
TIMM_OWNED = {"vgg11": "vgg", "vgg13": "vgg", "vgg16": "vgg", "vgg19": "vgg", "resnet50": "resnet"}

_cache: dict[str, nn.Module] = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def built(name: str) -> nn.Module:
    """One eval-mode, seeded 100-class instance per model, shared by the tests of this file."""
    if name not in _cache:
        torch.manual_seed(0)
        _cache[name] = timm.create_model(name, num_classes=100).eval()
    return _cache[name]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_model_is_listed():
    assert sorted(zoo.ZOO_MODELS) == sorted(EXACT_PARAMS)
    assert set(timm.list_models(module="zoo")) == set(zoo.ZOO_MODELS) | set(zoo.ALIASES)


def test_naming_rule_never_overrides_timm():
    ours = set(timm.list_models(module="zoo"))
    for name, timm_module in TIMM_OWNED.items():
        assert name not in zoo.ALIASES and name not in ours
        assert name in timm.list_models(module=timm_module)
    expected_aliases = {n.removeprefix("cifar_") for n in zoo.ZOO_MODELS} - set(TIMM_OWNED)
    assert set(zoo.ALIASES) == expected_aliases
    assert all(zoo.ALIASES[a] == f"cifar_{a}" for a in zoo.ALIASES)


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_parameter_count(name):
    count = n_params(built(name))
    assert count == EXACT_PARAMS[name]
    if name in zoo.PUBLISHED_PARAMS:
        published = zoo.PUBLISHED_PARAMS[name]
        # within 1%, or within the rounding of a figure published to 2 decimals (resnet8: 0.0839 -> "0.08")
        assert abs(count / 1e6 - published) <= max(0.01 * published, 0.005), (count, published)


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_forward_and_feature_api(name):
    model = built(name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
        final, maps = model.forward_intermediates(x)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert logits.shape == (2, 100) and torch.isfinite(logits).all()
    assert model.num_classes == 100 and model.num_features == NUM_FEATURES[name]
    assert pooled.shape == (2, model.num_features)
    assert final.shape[1] == model.num_features
    torch.testing.assert_close(model.forward_head(final), logits)
    assert len(maps) == len(model.feature_info)
    for fmap, info in zip(maps, model.feature_info):
        assert fmap.shape == (2, info["num_chs"], 32 // info["reduction"], 32 // info["reduction"])
        assert isinstance(model.get_submodule(info["module"]), nn.Module)
    assert model.get_classifier() is model.get_submodule(model.pretrained_cfg["classifier"])
    first_conv = model.get_submodule(model.pretrained_cfg["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_maps_are_stage_outputs_not_modified_later(name):
    """Each returned map equals stem/stage i applied to the previous one: no later in-place op changed it."""
    model = built(name)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        expected = [model.stem(x)]
        for stage in model.stages:
            expected.append(stage(expected[-1]))
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_create_with_10_classes(name):
    model = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert model.get_classifier().out_features == 10


# One small member per family: in-place ops must not break autograd, and every parameter gets a gradient.
@pytest.mark.parametrize(
    "name", ["resnet8", "resnet8x4", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2"]
)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train()
    final, maps = model.forward_intermediates(torch.randn(2, 3, 32, 32))
    loss = model.forward_head(final).square().mean() + sum(m.mean() for m in maps)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("alias", ["resnet8x4", "wrn_16_2", "mobilenetv2", "shufflenetv2"])
def test_alias_builds_the_same_model(alias):
    model = timm.create_model(alias, num_classes=100)
    assert n_params(model) == EXACT_PARAMS[f"cifar_{alias}"]
    assert model.pretrained_cfg["architecture"] == alias


def test_default_cfg_is_cifar():
    model = timm.create_model("resnet8")  # no num_classes: the cfg default is 100
    cfg = model.pretrained_cfg
    assert model.num_classes == 100 and model.default_cfg is cfg
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["mean"] == zoo.base.CIFAR100_MEAN and cfg["std"] == zoo.base.CIFAR100_STD
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 32, 32)


def test_pretrained_is_refused():
    with pytest.raises(ConfigError, match="no pretrained weights"):
        timm.create_model("resnet8", pretrained=True)


def test_reset_classifier():
    model = timm.create_model("resnet8")
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.get_classifier().out_features == 7
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 64)  # pooled features


def test_forward_intermediates_indices_and_stop_early():
    model = built("cifar_resnet50")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        all_maps = model.forward_intermediates(x, intermediates_only=True)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[0, -2], intermediates_only=True)
        early_final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert len(all_maps) == 5
    for got, want in zip(last2 + picked + early, all_maps[3:] + [all_maps[0], all_maps[3]] + [all_maps[1]]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(early_final, all_maps[1])  # stopped after stage 1: no head applied


def test_wrn_norm_applies_final_bn_relu_to_last_map():
    model = built("cifar_wrn_16_1")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        final, raw = model.forward_intermediates(x)
        _, normed = model.forward_intermediates(x, norm=True)
    torch.testing.assert_close(normed[-1], final)  # final map = BN-ReLU(last stage)
    assert (raw[-1] < 0).any() and (normed[-1] >= 0).all()  # raw residual sum vs post-activation
    for a, b in zip(raw[:-1], normed[:-1]):
        torch.testing.assert_close(a, b)


def test_features_only_uses_forward_intermediates():
    model = timm.create_model("cifar_shufflenetv2", features_only=True, out_indices=(1, 3)).eval()
    maps = model(torch.randn(1, 3, 32, 32))
    assert [m.shape[1] for m in maps] == [116, 464] == model.feature_info.channels()
    assert not hasattr(model.model, "head") or model.model.num_classes == 0


def test_grad_checkpointing_same_output():
    model = built("cifar_resnet8")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    reference = model(x)
    model.set_grad_checkpointing(True)
    try:
        torch.testing.assert_close(model(x), reference)
        torch.testing.assert_close(model.forward_intermediates(x)[0], model.forward_features(x))
    finally:
        model.set_grad_checkpointing(False)


def test_drop_rate_reaches_the_head():
    model = timm.create_model("resnet8", drop_rate=0.3)
    assert model.head.drop.p == 0.3


def test_import_kd_registers_the_zoo():
    """A fresh interpreter: `import kd` alone makes the zoo names known to timm."""
    code = "import timm, kd; assert 'cifar_resnet8x4' in timm.list_models(); print('ok')"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_shufflenetv2_stem_is_a_1x1_conv():
    model = timm.create_model("cifar_shufflenetv2")
    assert model.stem[0].kernel_size == (1, 1)
    assert sum(p.numel() for p in model.parameters()) == 1_355_528


def test_initialisation_follows_the_references():
    """VGG / MobileNetV2: classifier ~ normal(0, 0.01), zero bias; ShuffleNets: PyTorch defaults (no He init);
    ResNets: He fan_out convs, classifier at PyTorch's default."""
    torch.manual_seed(0)
    for name in ("cifar_vgg13", "cifar_mobilenetv2"):
        fc = timm.create_model(name).head.fc
        assert abs(fc.weight.std().item() - 0.01) < 0.001 and torch.count_nonzero(fc.bias) == 0, name
    for name in ("cifar_shufflenetv1", "cifar_shufflenetv2"):
        model = timm.create_model(name)
        conv = model.stem[0]  # default kaiming_uniform(a=sqrt(5)): std = 1/sqrt(3 * fan_in)
        want = 1 / (3 * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]) ** 0.5
        assert abs(conv.weight.std().item() - want) < 0.15 * want, name
        assert abs(model.head.fc.weight.std().item() - 0.01) > 0.003, name
    resnet = timm.create_model("cifar_resnet8")
    conv = resnet.stem[0]  # He fan_out: std = sqrt(2 / (out * k * k))
    want = (2 / (conv.out_channels * 9)) ** 0.5
    assert abs(conv.weight.std().item() - want) < 0.15 * want


def test_wrn_classifier_bias_is_zero_at_init_and_nothing_else_changes(monkeypatch):
    """RepDistiller's wrn.py zeroes the Linear bias (weight at PyTorch's default); same parameter count, and every
    other tensor (and the RNG stream) as without the zeroing."""
    from kd.zoo.wrn import WideResNet

    for name in ("cifar_wrn_16_2", "cifar_wrn_40_1"):
        torch.manual_seed(0)
        model = timm.create_model(name)
        after = torch.rand(3)
        fc = model.head.fc
        assert torch.count_nonzero(fc.bias) == 0, name
        bound = 1 / fc.in_features**0.5  # PyTorch default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), ...)
        assert fc.weight.abs().max().item() <= bound and fc.weight.abs().max().item() > 0.9 * bound, name
        monkeypatch.setattr(WideResNet, "classifier_zero_bias", False)
        torch.manual_seed(0)
        plain = timm.create_model(name)
        assert torch.equal(torch.rand(3), after)
        monkeypatch.undo()
        assert torch.count_nonzero(plain.head.fc.bias) > 0
        state, ref = model.state_dict(), plain.state_dict()
        assert state.keys() == ref.keys()
        assert all(torch.equal(state[k], ref[k]) for k in state if k != "head.fc.bias"), name
    assert sum(p.numel() for p in timm.create_model("cifar_wrn_40_2").parameters()) == 2_255_156


def test_cifar100_normalisation_is_repdistillers():
    """RepDistiller / CRD / CA-MKD normalise CIFAR-100 with these exact values; the zoo's pretrained_cfg agrees with
    kd.data's, so a zoo teacher from a weight file gets no input adapter on CIFAR-100; other datasets keep theirs."""
    from kd import data as kd_data
    from kd.teachers import teacher_input_spec

    ref_mean, ref_std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    assert kd_data.CIFAR100_MEAN == zoo.base.CIFAR100_MEAN == ref_mean
    assert kd_data.CIFAR100_STD == zoo.base.CIFAR100_STD == ref_std
    assert timm.models.get_pretrained_cfg("cifar_resnet20").mean == ref_mean
    assert teacher_input_spec("cifar_resnet20", True, 0, kd_data.CIFAR100_MEAN, kd_data.CIFAR100_STD) is None
    assert (kd_data.IMAGENET_MEAN, kd_data.IMAGENET_STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
