"""Partial freezing: each policy trains exactly its parameter set on four timm families, verified
against expected sets written out here independently, and one SGD step leaves frozen weights
(and frozen BatchNorm statistics) bit-identical while every trainable tensor moves."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from torch import nn

from kd.errors import ConfigError
from kd.freeze import FREEZE_POLICIES, apply_freeze, count_params, freeze_report, set_train
from kd.models import KDModel, create_model

# patch 2 on 32 px: 16x16 tokens, so the last stage is 2x2 (a 1x1 stage attends to one token and its
# relative position bias would get no gradient).
SWIN_SMALL = dict(img_size=32, patch_size=2, window_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
# family -> (timm name, extra kwargs, classifier prefix, last-block prefixes written out by hand)
FAMILIES = {
    "resnet": ("resnet10t", {}, "fc", ("layer4", "fc")),
    "efficientnet": ("efficientnet_b0", {}, "classifier", ("blocks.6", "conv_head", "bn2", "classifier")),
    "convnext": ("convnext_atto", {}, "head.fc", ("stages.3", "head.norm", "head.fc")),
    "swin": ("swin_tiny_patch4_window7_224", SWIN_SMALL, "head.fc", ("layers.3", "norm", "head.fc")),
}
NORM_CLASS_NAMES = {"BatchNorm1d", "BatchNorm2d", "BatchNormAct2d", "LayerNorm", "LayerNorm2d", "GroupNorm"}
NUM_CLASSES = 5


def make_model(family: str, adapter_dim: int = 0) -> KDModel:
    """The model in its initial state. Built once per session (2-core CI) and reset on each call."""
    model, state = _build_model(family, adapter_dim)
    model.load_state_dict(state)
    for p in model.parameters():
        p.grad = None
    return model


@functools.lru_cache(maxsize=None)
def _build_model(family: str, adapter_dim: int) -> tuple[KDModel, dict]:
    torch.manual_seed(0)
    name, kwargs, _, _ = FAMILIES[family]
    if family == "swin":
        # create_model's swin_tiny is 27M parameters; the same KDModel around a tiny timm Swin
        # keeps this test fast. drop_path_rate=0: a dropped residual branch would get zero grad.
        backbone = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, drop_path_rate=0.0, **kwargs)
        model = KDModel(backbone, arch=name, num_classes=NUM_CLASSES, small_input=True, adapter_dim=adapter_dim)
    else:
        model = create_model(name, NUM_CLASSES, adapter_dim=adapter_dim)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def expected_names(model: nn.Module, family: str, policy: str) -> set[str]:
    """Expected trainable names (backbone-relative, adapter params as 'adapter.*'), computed from the
    hand-written prefixes and class names above, not from kd.freeze."""
    _, _, classifier, last_block = FAMILIES[family]
    backbone_names = [n for n, _ in model.backbone.named_parameters()]
    adapter = {f"adapter.{n}" for n, _ in model.adapter.named_parameters()} if model.adapter is not None else set()
    if policy == "none":
        return set(backbone_names) | adapter
    head = {n for n in backbone_names if _under(n, classifier)}
    if policy == "head":
        return head | adapter
    if policy == "adapter":
        return head | adapter
    if policy == "bn_head":
        norms = {
            f"{m_name}.{p_name}"
            for m_name, m in model.backbone.named_modules()
            if type(m).__name__ in NORM_CLASS_NAMES
            for p_name, _ in m.named_parameters(recurse=False)
        }
        return norms | head | adapter
    assert policy == "last_block"
    return {n for n in backbone_names if any(_under(n, p) for p in last_block)} | adapter


def trainable_names(model: nn.Module) -> set[str]:
    names = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    if model.adapter is not None:
        names |= {f"adapter.{n}" for n, p in model.adapter.named_parameters() if p.requires_grad}
    return names


def _sgd_step_and_check(model: nn.Module, policy: str) -> None:
    torch.manual_seed(0)
    with torch.no_grad():  # break zero-initialised layers (timm's zero_init_last) that would block gradient
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    set_train(model, policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # all params: frozen ones must get no grad
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3])
    nn.functional.cross_entropy(logits_of(model, x), y).backward()
    opt.step()
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert not torch.equal(before[name], p.detach()), (
                f"{policy}: trainable {name} did not change (grad {p.grad})"
            )
        else:
            assert p.grad is None, f"{policy}: frozen {name} got a gradient"
            assert torch.equal(before[name], p.detach()), f"{policy}: frozen {name} changed"
    if policy in ("head", "adapter"):
        # Every norm layer is frozen, so its running statistics stay put as well.
        for name, buf in model.named_buffers():
            assert torch.equal(before[name], buf), f"{policy}: buffer {name} drifted"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_policy_trains_exactly_its_parameters(family):
    model = make_model(family)
    for policy in ("none", "head", "bn_head", "last_block"):
        apply_freeze(model, policy)
        expected = expected_names(model, family, policy)
        got = trainable_names(model)
        assert got == expected, (
            f"{family}/{policy}: extra {sorted(got - expected)[:5]} missing {sorted(expected - got)[:5]}"
        )
        assert len(got) > 0
    with pytest.raises(ConfigError, match="needs a model with an adapter"):
        apply_freeze(model, "adapter")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("policy", ["bn_head", "last_block"])
def test_sgd_step_moves_only_trainable_parameters(family, policy):
    model = make_model(family)
    apply_freeze(model, policy)
    _sgd_step_and_check(model, policy)


@pytest.mark.parametrize("policy", ["adapter", "last_block", "head"])
def test_adapter_is_trained_whenever_present(policy):
    model = make_model("resnet", adapter_dim=8)
    apply_freeze(model, policy)
    assert trainable_names(model) == expected_names(model, "resnet", policy)
    assert any(n.startswith("adapter.") for n in trainable_names(model))
    _sgd_step_and_check(model, policy)


def test_set_train_keeps_frozen_norm_layers_in_eval():
    model = make_model("efficientnet")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    apply_freeze(model, "head")
    set_train(model, "head")
    assert model.training and model.backbone.training
    assert all(not m.training for m in norms)
    assert model.classifier.training
    apply_freeze(model, "bn_head")
    set_train(model, "bn_head")
    assert all(m.training for m in norms)
    apply_freeze(model, "last_block")
    set_train(model, "last_block")
    in_last = {id(m) for m in model.backbone.blocks[6].modules()} | {id(model.backbone.bn2)}
    assert all(m.training == (id(m) in in_last) for m in norms)
    set_train(model, "last_block", mode=False)
    assert not any(m.training for m in model.modules())


def test_counts_report_and_errors():
    model = make_model("resnet")
    apply_freeze(model, "head")
    trainable, total = count_params(model)
    fc = model.backbone.fc
    assert trainable == fc.weight.numel() + fc.bias.numel()
    assert total == sum(p.numel() for p in model.parameters())
    report = freeze_report({"teacher1": model})
    assert "teacher1" in report and f"{trainable:,}" in report and f"{total:,}" in report
    assert len(report.splitlines()) == 2
    with pytest.raises(ConfigError, match="unknown freeze policy 'all'"):
        apply_freeze(model, "all")
    assert set(FREEZE_POLICIES) == {"none", "head", "bn_head", "adapter", "last_block"}
