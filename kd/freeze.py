"""Partial freezing of a KDModel (teacher adaptation in ASMB phase A, docs/asmb.md; student freezing).

Policies (what stays trainable; everything else gets requires_grad=False):
- `none`: everything.
- `head`: the classifier.
- `bn_head`: the affine parameters of every normalisation layer (BatchNorm*, timm's
  BatchNormAct2d, LayerNorm, LayerNorm2d, GroupNorm, RMSNorm and timm's RmsNorm) plus the classifier.
- `adapter`: the adapter plus the classifier (the model must have an adapter).
- `last_block`: the backbone's last feature stage (the last entry of timm's `feature_info`) and
  every parameter after it in forward order (final conv/norm/head), found generically: the
  parameters registered from the last stage's first parameter onwards, minus anything inside an
  earlier stage. No per-architecture patterns.
When the model has an adapter, it is trainable under every policy: it only exists to be trained,
and a frozen randomly initialised adapter would perturb the features for nothing.

Every policy keeps the classifier trainable: in ASMB phase A the teachers' logits are part of the synergy,
so the classifier always has a task gradient (docs/asmb.md, "Freeze policies").

Norm layers are detected by class (torch's `_NormBase`, `LayerNorm`, `GroupNorm`, `RMSNorm`, of
which most timm norm layers are subclasses, plus timm's RMS norms), never by parameter name, since
name patterns silently miss layers named otherwise.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping

import timm.layers
from torch import nn

from .errors import ConfigError

FREEZE_POLICIES = ("none", "head", "bn_head", "adapter", "last_block")

# torch's base classes cover timm's BatchNormAct2d, LayerNorm(2d), LayerNormAct and GroupNorm1;
# timm's RMS / "simple" norms subclass nn.Module directly, so they are listed by name.
_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    *(getattr(nn, "RMSNorm", None),),
    *(getattr(timm.layers, n, None) for n in ("RmsNorm", "RmsNorm2d", "SimpleNorm", "SimpleNorm2d")),
)
_NORM_TYPES = tuple(t for t in _NORM_TYPES if t is not None)
# Policies under which norm layers are trained as a whole (running statistics included).
_NORM_TRAINED_POLICIES = ("none", "bn_head")


def is_norm_layer(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES)


def _check_policy(policy: str) -> None:
    if policy not in FREEZE_POLICIES:
        raise ConfigError(f"unknown freeze policy {policy!r}; choose one of {', '.join(FREEZE_POLICIES)}")


def _params(module: nn.Module | None, recurse: bool = True) -> list[nn.Parameter]:
    return [] if module is None else list(module.parameters(recurse=recurse))


def last_stage_name(backbone: nn.Module) -> str:
    """Module name of the backbone's last feature stage, from timm's `feature_info`."""
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise ConfigError(
            f"freeze policy last_block needs a timm backbone with feature_info ({type(backbone).__name__} has none)"
        )
    dicts = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    if not dicts:
        raise ConfigError(f"{type(backbone).__name__}.feature_info is empty; cannot find its last block")
    return dicts[-1]["module"]


def stage_names(backbone: nn.Module) -> list[str]:
    info = backbone.feature_info
    return [d["module"] for d in (info.get_dicts() if hasattr(info, "get_dicts") else info)]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def last_block_params(backbone: nn.Module) -> list[nn.Parameter]:
    """Parameters of the last feature stage and of everything registered after it (final norm,
    conv_head, classifier), excluding parameters that belong to an earlier stage. timm registers
    modules in forward order, which the tests verify on resnet, efficientnet, convnext and swin."""
    last = last_stage_name(backbone)
    earlier = [s for s in stage_names(backbone)[:-1] if s != last]
    named = list(backbone.named_parameters())
    start = next((i for i, (n, _) in enumerate(named) if _under(n, last)), None)
    if start is None:
        raise ConfigError(f"last stage {last!r} of {type(backbone).__name__} has no parameters")
    return [p for n, p in named[start:] if not any(_under(n, s) for s in earlier)]


def policy_params(model: nn.Module, policy: str) -> list[nn.Parameter]:
    """The parameters `policy` leaves trainable in a KDModel (`.backbone`, `.classifier`, `.adapter`)."""
    _check_policy(policy)
    adapter = getattr(model, "adapter", None)
    if policy == "none":
        return list(model.parameters())
    if policy == "adapter" and adapter is None:
        raise ConfigError("freeze policy 'adapter' needs a model with an adapter (set adapter_dim > 0)")
    chosen = _params(model.classifier) + _params(adapter)
    if policy == "bn_head":
        chosen += [p for m in model.modules() if is_norm_layer(m) for p in m.parameters(recurse=False)]
    elif policy == "last_block":
        chosen += last_block_params(model.backbone)
    return chosen


def apply_freeze(model: nn.Module, policy: str) -> None:
    """Set requires_grad so that exactly `policy_params(model, policy)` are trainable."""
    keep = {id(p) for p in policy_params(model, policy)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def set_train(model: nn.Module, policy: str, mode: bool = True) -> nn.Module:
    """model.train(mode), but under `head`, `adapter` and `last_block` every normalisation layer
    whose parameters are all frozen (or that has none) stays in eval mode, so BatchNorm running
    statistics outside the trainable part do not drift away from the frozen weights around them.
    Under `none` and `bn_head` norm layers train fully (statistics included), because their affine
    parameters are being trained. Call after `apply_freeze`. Returns the model."""
    _check_policy(policy)
    model.train(mode)
    if mode and policy not in _NORM_TRAINED_POLICIES:
        for m in model.modules():
            if is_norm_layer(m) and not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()
    return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) number of scalar parameters."""
    params: Iterable[nn.Parameter] = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def freeze_report(named_models: Mapping[str, nn.Module]) -> str:
    """A small text table: name | trainable | total | percent trainable."""
    rows = [("model", "trainable", "total", "%")]
    for name, model in named_models.items():
        trainable, total = count_params(model)
        rows.append((name, f"{trainable:,}", f"{total:,}", f"{100.0 * trainable / max(total, 1):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's train/eval mode on exit: a partly frozen model's modes differ per module, so
    model.train(was_training) would not put it back."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training
