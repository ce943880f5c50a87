"""Optimisers and learning-rate schedules of the training recipes.

Not timm's factories: `timm.optim.create_optimizer_v2("sgd")` is Nesterov SGD and drops weight decay on
biases and norms by default, and timm's schedulers count warm-up and decay differently (cosine from step 0
unless `warmup_prefix`, multistep in epochs); the CRD/DKD recipes we reproduce use plain momentum SGD with
decay on every parameter and a per-iteration schedule, which the LambdaLR below is (its state is one
integer, so checkpoints stay small and stable)."""

from __future__ import annotations

import math
from typing import Any, Iterable, Protocol, Sequence

import torch
from torch import nn


def fused_kwargs(device: torch.device) -> dict[str, Any]:
    """fused=True (one kernel over all parameters) where torch has it: on CPU 2-3x faster than the default
    per-parameter loop, which foreach is slower than (bench/step.py's optimiser rows, BENCHMARKS.md)."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


class OptimizerSettings(Protocol):
    """The optimiser's settings (train.py: --optim.*)."""

    name: str  # sgd or adamw
    momentum: float
    nesterov: bool
    weight_decay: float


class ScheduleSettings(Protocol):
    """A learning-rate schedule's settings (train.py: --optim.*)."""

    schedule: str  # cosine, multistep or constant
    warmup_epochs: float
    milestones: Sequence[int]  # multistep: the epochs at which the rate is multiplied by gamma
    gamma: float


def build_optimizer(params: Iterable[nn.Parameter], o: OptimizerSettings, lr: float, device: torch.device):
    """SGD (momentum, decay on every parameter) or AdamW."""
    if o.name == "sgd":
        sgd = torch.optim.SGD(
            params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay, **fused_kwargs(device)
        )
        return with_zero_momentum(sgd) if o.momentum else sgd
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay, **fused_kwargs(device))
    raise ValueError(f"unknown optimiser {o.name!r}")


def with_zero_momentum(sgd: torch.optim.SGD) -> torch.optim.SGD:
    """Every parameter starts with a zero momentum buffer. Fused SGD needs all or none of a step's parameters to
    have one, and a parameter can get its first gradient after the others: a loss term weighted 0 in an epoch
    is left out of the graph (CA-MKD's embeddings in epoch 1). The update is the same as SGD's lazily created
    buffer (dampening 0: momentum * 0 + grad = grad)."""
    for group in sgd.param_groups:
        for p in group["params"]:
            sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return sgd


def build_scheduler(optimizer, s: ScheduleSettings, epochs: int, steps_per_epoch: int):
    """Per-iteration LambdaLR: linear warm-up, then cosine / multistep / constant over `epochs`."""
    schedule, milestones, gamma = s.schedule, s.milestones, s.gamma
    warmup = s.warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        if schedule == "multistep":
            return gamma ** sum(step // steps_per_epoch >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
