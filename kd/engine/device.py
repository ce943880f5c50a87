"""Where and in what precision a model runs: the device, autocast dtype, and a model moved there."""

from __future__ import annotations

import timm
import torch

from ..errors import ConfigError
from .distributed import DIST, say


def resolve_device(name: str) -> torch.device:
    """auto = cuda when available (this process's local GPU under torchrun), else cpu."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--run.device cuda but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", DIST.local_rank) if DIST.enabled else torch.device("cuda")
    return torch.device("cpu")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --run.amp (None = float32); fp16 needs CUDA (its GradScaler), so on CPU it is off."""
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            say("note: --run.amp fp16 needs CUDA; training in float32 on CPU (use bf16 for CPU mixed precision)")
            return None
        return torch.float16
    return None


def prepare_model(model: torch.nn.Module, device: torch.device, *, channels_last: bool = True, compile: bool = False,
                  sync_bn: bool = False, inference: bool = False) -> torch.nn.Module:
    """Move to the device (channels_last on request) and, with `compile`, torch.compile the model in place
    (nn.Module.compile: same module and state_dict keys). `inference` (teachers): eval mode and frozen first, so
    each is compiled on its own for its no-grad forward. `sync_bn` (several processes) converts BatchNorm."""
    if sync_bn and DIST.enabled and not inference:
        model = timm.layers.convert_sync_batchnorm(model)  # timm's: keeps BatchNormAct's activation; same object
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if inference:
        model.eval().requires_grad_(False)
    if compile:
        model.compile()
    return model
