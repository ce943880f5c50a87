"""Evaluation metrics: accuracy of a model on a loader, and teacher disagreement."""

from __future__ import annotations

from typing import Callable, Iterable, Literal

import torch
from torch import Tensor, nn

from .freeze import kept_modes


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    forward: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """All logits [N, C] and labels [N] of `model` on `loader` (items (x, y, ...)), in eval mode.
    `forward` overrides how logits are computed from a batch (e.g. a synergy path)."""
    all_logits, all_labels = [], []
    with kept_modes(model):
        model.eval()
        for batch in loader:
            x, y = batch[0].to(device, non_blocking=True), batch[1]
            logits = forward(x) if forward is not None else _logits(model, x)
            all_logits.append(logits.float().cpu())
            all_labels.append(torch.as_tensor(y).cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


@torch.no_grad()
def gather_outputs(
    forward: Callable[[Tensor], dict[str, Tensor]], loader: Iterable, device: torch.device | str = "cpu"
) -> tuple[dict[str, Tensor], Tensor]:
    """Run `forward(x) -> {name: [B, ...] tensor}` over every batch of `loader` (items (x, y, ...)) and return
    each output concatenated over the loader ([N, ...], float32, CPU) and the labels [N]. Several models can
    be rated in one pass (e.g. two teachers' logits for disagreement_rate). The caller sets eval mode."""
    chunks: dict[str, list[Tensor]] = {}
    labels = []
    for batch in loader:
        for name, value in forward(batch[0].to(device, non_blocking=True)).items():
            chunks.setdefault(name, []).append(value.float().cpu())
        labels.append(torch.as_tensor(batch[1]).cpu())
    return {name: torch.cat(values) for name, values in chunks.items()}, torch.cat(labels)


def percent(hits: Tensor) -> float:
    """100 * (true entries) / (entries) of a bool tensor, from integer counts: 55.0, not float32's 55.000001."""
    return 100.0 * int(hits.sum()) / max(hits.numel(), 1)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent. logits [N, C], labels [N] class indices."""
    return percent(logits.argmax(dim=1) == labels)


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 5) -> float:
    """Top-k accuracy in percent: the label is among the k highest logits (k capped at the number of classes).
    logits [N, C], labels [N] class indices."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return percent((top == labels[:, None]).any(dim=1))


@torch.no_grad()
def evaluate_top1_top5(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(top-1, top-5) accuracy (%) of `model` over `loader` in one pass (as evaluate_acc)."""
    logits, labels = predict_logits(model, loader, device)
    return accuracy(logits, labels), topk_accuracy(logits, labels, 5)


@torch.no_grad()
def evaluate_acc(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy (%) of `model` over `loader`. Works with any module returning logits or a
    kd.models.ModelOutput; the model's train/eval mode is restored afterwards."""
    logits, labels = predict_logits(model, loader, device)
    return accuracy(logits, labels)


def disagreement_rate(
    logits_a: Tensor, logits_b: Tensor, targets: Tensor, mode: Literal["pred", "both_wrong"] = "pred"
) -> float:
    """Share (%) of samples where two classifiers disagree.

    mode="pred": argmax predictions differ; mode="both_wrong": both predictions are wrong.
    Shapes: logits [N, C], targets [N]. Pure function.
    """
    pred_a, pred_b = logits_a.argmax(dim=1), logits_b.argmax(dim=1)
    if mode == "pred":
        hit = pred_a != pred_b
    elif mode == "both_wrong":
        hit = (pred_a != targets) & (pred_b != targets)
    else:
        raise ValueError(f"unknown disagreement mode {mode!r} (expected 'pred' or 'both_wrong')")
    return percent(hit)
