"""One model factory over timm: any timm architecture as a student or teacher, with the
pooled pre-logit feature, logits and (on request) per-stage feature maps from one forward.

Everything goes through timm's uniform model API (`forward_features`, `forward_intermediates`,
`forward_head(pre_logits=True)`, `get_classifier`, `feature_info`, `pretrained_cfg`), so a new
family needs no code here unless its stem must change for small (32/64 px) inputs.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import zoo as _zoo  # noqa: F401  (registers the CIFAR KD zoo with timm)
from .errors import CheckpointError, ConfigError, first_line
from .io import safe_torch_load
from .weights import load_backbone_weights, read_weights

# what model_checkpoint records and loading checks, in the order check_meta reports
META_KEYS = ("arch", "num_classes", "num_features", "small_input", "adapter_dim")

# Patch-embedding models get these at creation when small_input=True: 32 px -> 8x8 ViT tokens,
# and a Swin pyramid of 16/8/4/2 (the final 2x2 map keeps spatial structure for feature KD).
SMALL_VIT_PATCH = 4
SMALL_SWIN_PATCH = 2
SMALL_SWIN_WINDOW = 4
SMALL_DEFAULT_IMG_SIZE = 32


class ModelOutput(NamedTuple):
    feature: Tensor  # [B, D] pooled pre-logit feature (after the adapter when there is one)
    logits: Tensor  # [B, C]
    maps: list[Tensor] | None  # one NCHW map per feature_info stage, when with_maps=True


class ResidualAdapter(nn.Module):
    """Residual bottleneck MLP on a pooled feature: `x + up(gelu(down(x)))`, [B, D] -> [B, D].

    `up` is zero-initialised, so at init the adapter is the identity and a pretrained model's
    outputs are unchanged (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019).
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.down = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden_dim, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.act(self.down(x)))


class KDModel(nn.Module):
    """A timm model plus an optional adapter between its pooled feature and its classifier."""

    def __init__(self, backbone: nn.Module, *, arch: str, num_classes: int, small_input: bool, adapter_dim: int):
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.num_classes = num_classes
        # head_hidden_size is the width forward_head(pre_logits=True) returns; it differs from
        # num_features (the last map's channels) in models with a pre-logits MLP (e.g. MobileNetV3)
        self.num_features = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        self.small_input = small_input
        self.adapter_dim = adapter_dim
        self.adapter = ResidualAdapter(self.num_features, adapter_dim) if adapter_dim > 0 else None
        self._maps_kwargs = _intermediates_kwargs(backbone)  # None: the model cannot return maps
        # optional input adapter (set_input_transform); non-persistent: never in checkpoints
        self.register_buffer("input_scale", None, persistent=False)
        self.register_buffer("input_shift", None, persistent=False)
        self.input_size: int | None = None
        self.input_transform: dict[str, Any] | None = None  # the arguments, for records; None = identity
        self.weights_notes: list[str] = []  # how create_model(weights=...) adapted a weight file (for the log)

    @property
    def classifier(self) -> nn.Module:
        """The timm classifier (a property, so its weights live once in the state dict, under backbone.)."""
        return self.backbone.get_classifier()

    def set_input_transform(
        self,
        data_mean: tuple[float, ...],
        data_std: tuple[float, ...],
        model_mean: tuple[float, ...],
        model_std: tuple[float, ...],
        size: int = 0,
    ) -> None:
        """Let this model take batches normalised with the data's stats while it expects its own
        (e.g. a pretrained teacher's pretrained_cfg mean/std) and/or another resolution, so one batch
        feeds student and teachers: x -> (x * data_std + data_mean - model_mean) / model_std, per channel,
        folded into one multiply-add; then a bilinear (antialiased) resize to `size` px when size > 0 and
        the input differs. Matching stats and size 0 remove the adapter (identity, no cost)."""
        d_mean, d_std, m_mean, m_std = (
            torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (data_mean, data_std, model_mean, model_std)
        )
        scale, shift = d_std / m_std, (d_mean - m_mean) / m_std
        device = next(self.parameters()).device
        same_stats = torch.allclose(scale, torch.ones_like(scale)) and torch.allclose(shift, torch.zeros_like(shift))
        self.input_scale = None if same_stats else scale.to(device)
        self.input_shift = None if same_stats else shift.to(device)
        self.input_size = size if size > 0 else None
        identity = same_stats and self.input_size is None
        self.input_transform = (
            None
            if identity
            else {
                "data_mean": list(data_mean),
                "data_std": list(data_std),
                "model_mean": list(model_mean),
                "model_std": list(model_std),
                "size": size,
            }
        )

    def adapt_input(self, x: Tensor) -> Tensor:
        """The input adapter of set_input_transform (identity when none is set). x [B,3,H,W]."""
        if self.input_scale is not None:
            x = torch.addcmul(self.input_shift, x, self.input_scale)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        return x

    def forward(self, x: Tensor, with_maps: bool = False) -> ModelOutput:
        x = self.adapt_input(x)
        maps = None
        if with_maps:
            if self._maps_kwargs is None:
                raise ConfigError(f"model {self.arch} cannot return feature maps (no timm forward_intermediates)")
            final, maps = self.backbone.forward_intermediates(x, **self._maps_kwargs)
        else:
            final = self.backbone.forward_features(x)
        feature = self.backbone.forward_head(final, pre_logits=True)
        if self.adapter is not None:
            feature = self.adapter(feature)
        return ModelOutput(feature, self.classifier(feature), maps)

    def meta(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be loaded into this model."""
        return {key: getattr(self, key) for key in META_KEYS}

    def feature_channels(self) -> list[int]:
        """Channels of each map returned by forward(with_maps=True)."""
        return [int(info["num_chs"]) for info in self.backbone.feature_info]

    def feature_reductions(self) -> list[int]:
        """Input-to-map stride of each map returned by forward(with_maps=True)."""
        return [int(info["reduction"]) for info in self.backbone.feature_info]


def _intermediates_kwargs(backbone: nn.Module) -> dict[str, Any] | None:
    method = getattr(backbone, "forward_intermediates", None)
    if method is None:
        return None
    # ViT/Swin-like models emit tokens or NHWC unless asked for NCHW
    return {"output_fmt": "NCHW"} if "output_fmt" in inspect.signature(method).parameters else {}


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    small_input: bool = False,
    img_size: int | None = None,
    checkpoint: str | None = None,
    adapter_dim: int = 0,
    drop_rate: float = 0.0,
    weights: str | None = None,
) -> KDModel:
    """Build timm model `name` with a `num_classes` head, adapted for 32/64 px inputs when
    `small_input`, with an optional residual adapter, then load `checkpoint` if given.

    `img_size` matters only for patch-embedding models (ViT, Swin, ...), whose token grid is
    fixed at creation; CNNs accept any size. `pretrained` downloads (or reads cached) timm weights.
    `weights`: a local file of pretrained weights of the timm model (kd.weights.read_weights), loaded as timm
    loads pretrained weights (classifier re-initialised when the class count differs) before the small-input
    stem is made; what was re-initialised is listed in the model's `weights_notes`.
    """
    check_model_name(name)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if adapter_dim < 0:
        raise ConfigError(f"adapter_dim must be >= 0, got {adapter_dim}")
    if weights is not None and (pretrained or checkpoint is not None):
        raise ConfigError(f"{name}: a weights file excludes pretrained hub weights and a checkpoint (one start)")
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if drop_rate > 0:
        kwargs["drop_rate"] = drop_rate
    uses_patch_embed = _first_conv(name).startswith("patch_embed")
    if uses_patch_embed:
        kwargs.update(_patch_embed_kwargs(name, small_input, img_size))
    backbone = _create_backbone(name, pretrained, kwargs)
    notes = (
        []
        if weights is None
        else load_backbone_weights(backbone, name, read_weights(weights), f"weights file {weights}")
    )
    if small_input and not uses_patch_embed:
        stem_note = _adapt_stem_for_small_input(backbone, name)
        if weights is not None and stem_note:
            notes.insert(0, stem_note)
    model = KDModel(backbone, arch=name, num_classes=num_classes, small_input=small_input, adapter_dim=adapter_dim)
    model.weights_notes = notes
    if checkpoint is not None:
        load_model_weights(model, checkpoint)
    return model


def check_model_name(name: str) -> None:
    """Raise ConfigError (with close names) unless `name` is a timm or zoo model: cheap, before any work."""
    if timm.is_model(name):
        return
    # names containing the query, those starting with it and shortest first; else near spellings
    contains = sorted(timm.list_models(f"*{name}*"), key=lambda n: (not n.startswith(name), len(n), n))
    close = contains[:5] or difflib.get_close_matches(name, timm.list_models(), n=5)
    hint = f"; close names: {', '.join(close)}" if close else "; see timm.list_models()"
    raise ConfigError(f"unknown model '{name}'{hint}")


def _first_conv(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    first = getattr(cfg, "first_conv", None) if cfg is not None else None
    return first if isinstance(first, str) else ""


def _default_input_size(name: str) -> int:
    cfg = timm.models.get_pretrained_cfg(name)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else 224


def _patch_embed_kwargs(name: str, small_input: bool, img_size: int | None) -> dict[str, Any]:
    """Creation-time size arguments for patch-embedding models (their token grid is fixed then)."""
    kwargs: dict[str, Any] = {}
    if img_size is None and small_input:
        img_size = SMALL_DEFAULT_IMG_SIZE
    if img_size is not None:
        kwargs["img_size"] = img_size
    if small_input:
        if "swin" in timm.models.model_entrypoint(name).__module__:
            kwargs.update(patch_size=SMALL_SWIN_PATCH, window_size=SMALL_SWIN_WINDOW)
        else:
            kwargs["patch_size"] = SMALL_VIT_PATCH
    return kwargs


def _create_backbone(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # a size/drop argument this architecture does not take
        raise ConfigError(f"model {name} does not accept {sorted(kwargs)}: {first_line(e)}") from None
    except (OSError, RuntimeError, ValueError) as e:  # hub offline / missing file / bad download
        if not pretrained:
            raise
        raise ConfigError(
            f"could not load pretrained weights for {name}: {first_line(e)}; "
            "run online once to cache them, or pass a local checkpoint"
        ) from None


def _adapt_stem_for_small_input(backbone: nn.Module, name: str) -> str | None:
    """Make a CNN stem keep full resolution for 32/64 px inputs (the usual CIFAR adaptation).

    The stem conv (`pretrained_cfg['first_conv']`) becomes stride 1: a 3x3 conv keeps its
    (pretrained) weights, a larger one (ResNet 7x7/2, ConvNeXt 4x4/4 patchify) is replaced
    by a new 3x3/1 conv. Max-pools before the first stride-4 stage (ResNet's `maxpool`) are
    removed. feature_info reductions are divided by the strides removed before each stage.
    Models whose default input is already <= 64 px (the CIFAR zoo) are left as they are.
    Returns a note naming the stem conv when it was replaced (its weights re-initialised), else None.
    """
    if _default_input_size(name) <= 64:  # already built for small inputs (e.g. the CIFAR zoo)
        return None
    first_conv = _first_conv(name)
    try:
        conv = backbone.get_submodule(first_conv) if first_conv else None
    except AttributeError:
        conv = None
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(f"small_input is not supported for {name}: no stem conv found (first_conv={first_conv!r})")
    removed = [(first_conv, _stride(conv.stride))]
    note = None
    if conv.kernel_size == (3, 3):
        conv.stride = (1, 1)
    else:
        new = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
        backbone.set_submodule(first_conv, new)
        kernel = "x".join(map(str, conv.kernel_size))
        note = f"stem {first_conv} re-initialised for small (32/64 px) inputs ({kernel}/{removed[0][1]} -> 3x3/1)"
    for pool_name in _stem_pools(backbone):
        removed.append((pool_name, _stride(backbone.get_submodule(pool_name).stride)))
        backbone.set_submodule(pool_name, nn.Identity())
    _divide_reductions(backbone, removed)
    return note


def _stride(stride: int | tuple[int, ...]) -> int:
    return int(stride if isinstance(stride, int) else stride[0])


def _module_order(backbone: nn.Module) -> dict[str, int]:
    # registration order matches execution order for timm stems and stages
    return {name: i for i, (name, _) in enumerate(backbone.named_modules())}


def _stem_pools(backbone: nn.Module) -> list[str]:
    """Names of max-pools registered before the first feature_info stage with reduction >= 4."""
    stages = [info["module"] for info in backbone.feature_info if info["reduction"] >= 4]
    if not stages:
        return []
    order = _module_order(backbone)
    first_stage = order.get(stages[0], -1)
    return [n for n, m in backbone.named_modules() if isinstance(m, nn.MaxPool2d) and order[n] < first_stage]


def _divide_reductions(backbone: nn.Module, removed: list[tuple[str, int]]) -> None:
    order = _module_order(backbone)
    for info in backbone.feature_info:
        at = order.get(info["module"], len(order))
        factor = 1
        for name, stride in removed:
            # the stage runs after the removed module, or contains it (a `stem` stage owns `stem.conv`)
            if order[name] <= at or name.startswith(info["module"] + "."):
                factor *= stride
        info["reduction"] = max(1, info["reduction"] // factor)


def model_checkpoint(model: KDModel) -> dict[str, Any]:
    """The portable checkpoint of one model: `{"meta": model.meta(), "model": state_dict}`."""
    return {"meta": model.meta(), "model": model.state_dict()}


def check_meta(expected: dict[str, Any], found: dict[str, Any], what: str) -> None:
    """Raise CheckpointError naming the first key of `expected` whose value `found` disagrees with."""
    arch = expected.get("arch", "model")
    for key, want in expected.items():
        have = found.get(key, "<missing>")
        if have == want:
            continue
        if key == "arch":
            raise CheckpointError(f"{what}: model is {want}, checkpoint is for {have}")
        if key == "num_classes":
            raise CheckpointError(f"{what}: {arch} expects {want} classes, checkpoint has {have}")
        raise CheckpointError(f"{what}: {arch} expects {key}={want}, checkpoint has {key}={have}")


def load_model_weights(model: KDModel, path: str) -> dict[str, Any]:
    """Load a local checkpoint into `model` (strict: same keys and shapes); return its meta ({} if none).

    Accepted layouts:
      1. `{"meta": meta, "model": state_dict, ...}` (model_checkpoint; extra keys are ignored);
      2. a training checkpoint `{"student": <layout 1 or a state dict>, ...}` (the student is loaded);
      3. a bare state dict: of a KDModel (`backbone.*` keys) or of the timm model alone.
    Meta (layouts 1-2) must match model.meta() on every key, checked before any weight is copied.
    """
    what = f"checkpoint {path}"
    meta, state = _unpack_checkpoint(safe_torch_load(path), what)
    if meta:
        check_meta(model.meta(), meta, what)
    if state and not any(k.startswith("backbone.") for k in state):
        state = {f"backbone.{k}": v for k, v in state.items()}  # a plain timm state dict
    _check_state(model, state, what)
    model.load_state_dict(state)
    return meta


def check_shapes(model: nn.Module, state: Any, what: str, *, same_keys: bool = False) -> None:
    """Raise CheckpointError naming the first tensor of `state` whose shape differs from `model`'s entry of
    the same name, and with `same_keys` a key only one side has (torch.compile's prefix is ignored)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: expected a state dict, found {type(state).__name__}")
    own = {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}
    if same_keys:
        theirs = {str(k).replace("_orig_mod.", "") for k in state}
        missing, unexpected = sorted(set(own) - theirs), sorted(theirs - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"{what}: state dict does not match {getattr(model, 'arch', 'the model')} "
                f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
                f"e.g. {unexpected[:3]})"
            )
    for key, value in state.items():
        mine = own.get(str(key).replace("_orig_mod.", ""))
        if mine is not None and (not isinstance(value, Tensor) or value.shape != mine.shape):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(
                f"{what}: {key} has shape {shape}, {getattr(model, 'arch', 'the model')} expects {tuple(mine.shape)}"
            )


def _unpack_checkpoint(ckpt: Any, what: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{what}: expected a dict, found {type(ckpt).__name__}")
    if "student" in ckpt and "model" not in ckpt:
        return _unpack_checkpoint(ckpt["student"], what)
    if "model" in ckpt:
        meta, state = ckpt.get("meta") or {}, ckpt["model"]
    else:
        meta, state = {}, ckpt
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{what}: 'meta' and 'model' must be dicts")
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{what}: not a state dict (keys: {', '.join(map(str, list(state)[:5]))})")
    return meta, state


def _check_state(model: KDModel, state: dict[str, Tensor], what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: state dict does not match {model.arch} "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(
                f"{what}: {k} has shape {tuple(v.shape)} in checkpoint, {model.arch} expects {tuple(own[k].shape)}"
            )
