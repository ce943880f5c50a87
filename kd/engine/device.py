"""Where and in what precision a model runs: the device, autocast dtype, and a model moved there."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

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


def resolve_teacher_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of frozen forwards (--teachers.precision; None = float32): auto = bfloat16 on CUDA and
    on CPUs with bfloat16 instructions (AMX / AVX-512-BF16), float32 elsewhere. Inference needs no GradScaler,
    so fp16 is allowed on a CPU too (slow without AVX-512-FP16 / AMX-FP16)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Native bfloat16 matrix instructions on this CPU (Linux /proc/cpuinfo flags amx_bf16 or avx512_bf16), and
    oneDNN able to use them; without them bfloat16 is emulated and slower than float32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"}) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def frozen_compile_options(device: torch.device) -> dict[str, bool]:
    """torch.compile options for a module whose weights never change again: inductor `freezing` (weights become
    graph constants, BatchNorm folded into the convolutions) and, on CUDA, CUDA graphs (the output buffers are
    reused by the next call: callers copy the outputs, as kd.teachers.frozen_forward does)."""
    return {"freezing": True, **({"triton.cudagraphs": True} if device.type == "cuda" else {})}


def prepare_model(
    model: torch.nn.Module,
    device: torch.device,
    *,
    channels_last: bool = True,
    compile: bool = False,
    sync_bn: bool = False,
    inference: bool = False,
    frozen_compile: bool = False,
) -> torch.nn.Module:
    """Move to the device (channels_last on request) and, with `compile`, torch.compile the model in place
    (nn.Module.compile: same module and state_dict keys). `inference` (teachers): eval mode and frozen first, so
    each is compiled on its own for its no-grad forward. `frozen_compile` (with `inference`; only for a model
    whose weights never change again, e.g. not ASMB's teachers, which train in phase A): compile with
    frozen_compile_options instead. `sync_bn` (several processes) converts BatchNorm."""
    if sync_bn and DIST.enabled and not inference:
        model = timm.layers.convert_sync_batchnorm(model)  # timm's: keeps BatchNormAct's activation; same object
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if inference:
        model.eval().requires_grad_(False)
    if inference and frozen_compile:
        model.compile(options=frozen_compile_options(device), dynamic=False)
    elif compile:
        model.compile()
    return model
