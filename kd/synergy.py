"""The synergy-logit loss path of ASMB (docs/asmb.md), one function for both phases.

`synergy_losses` runs the bridge through `torch.func.functional_call` on an explicit parameter
dict, so the caller decides where gradient goes:
- phase A (teacher adaptation): pass the bridge's live parameters (`dict(bridge.named_parameters())`
  plus buffers); the student query and logits are detached here; the teachers' features and logits are
  used as given, so each teacher's trainable part learns through them (a teacher run under no_grad here
  would never adapt).
- phase B (student distillation): parameters, teacher features and teacher logits are detached here, so
  the synergy logits and feature are constants for the student (a student that could move its own target
  would lower the loss by moving the target), and gradient reaches the student through its logits and
  through the caller-owned projections (`feat_pred`, `latent_pred`).
The train/eval mode of the bridge is the caller's (phase B: `bridge.eval()`).

Terms are returned unweighted; their weights live in one place, the methods' `loss_weights()`
(kd.asmb), which the loop applies. The temperature (and hybrid_beta) are tensors, so changing
their values never makes `torch.compile` recompile.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .errors import ConfigError
from .losses import cross_entropy, kd_loss
from .mbm import ensemble_logits, ib_kl

PHASES = ("A", "B")
FEAT_KD_NORMS = ("none", "l2")


def feature_mse(pred: Tensor, target: Tensor, norm: str = "none") -> Tensor:
    """Feature KD: mean squared error over all elements of [B, D]; with norm="l2" both sides are
    L2-normalised per sample first. The target is used as given (detach it yourself)."""
    if pred.shape != target.shape:
        raise ValueError(f"feature KD prediction {list(pred.shape)} does not match target {list(target.shape)}")
    if norm == "l2":
        pred, target = F.normalize(pred, dim=1), F.normalize(target, dim=1)
    return F.mse_loss(pred, target)


def hybrid_kd(
    logits_student: Tensor,
    z_syn: Tensor,
    teacher_logits_mean: Tensor | None,
    temperature: Tensor,
    hybrid_beta: float | Tensor | None,
    detach_synergy: bool = True,
) -> Tensor:
    """(1 - beta) * KD(z_s; z_syn) + beta * KD(z_s; mean(t_1, t_2)); plain KD(z_s; z_syn) when
    beta is None. Both targets are detached (z_syn not when detach_synergy=False). Shapes [B, C]; 0-dim out (see kd_loss)."""
    kd_syn = kd_loss(logits_student, z_syn.detach() if detach_synergy else z_syn, temperature)
    if hybrid_beta is None:
        return kd_syn
    if teacher_logits_mean is None:
        raise ConfigError("hybrid KD (hybrid_beta set) needs the teachers' mean logits")
    kd_teachers = kd_loss(logits_student, teacher_logits_mean.detach(), temperature)
    return (1 - hybrid_beta) * kd_syn + hybrid_beta * kd_teachers


def synergy_losses(
    bridge: nn.Module,
    params: Mapping[str, Tensor],
    query: Tensor | None,
    feats: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    logits_student: Tensor,
    target: Tensor,
    temperature: Tensor,
    *,
    phase: str,
    label_smoothing: float = 0.0,
    hybrid_beta: float | Tensor | None = None,
    feat_pred: Tensor | None = None,
    feat_kd_norm: str = "none",
    latent_pred: Tensor | None = None,
    query_grad: bool = False,
    kd_term: bool = True,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Synergy logits and the unweighted loss terms of one phase. Returns (z_syn [B, C], h [B, D_out], terms).

    params: the bridge's parameters and buffers by name (phase A: live ones; phase B: detached here).
    query: the student's pooled feature [B, D_s] (always detached here). feats: teacher features [B, d_i].
    teacher_logits: the teachers' logits [B, C] each; z_syn = their mean + the bridge's residual.
    logits_student: z_s [B, C]. target: labels [B] or soft/mixed labels [B, C]. temperature: 0-dim tensor T.

    Phase A terms: `synergy_ce` = CE(z_syn, y); `adapt_kd` = T^2 KL(softmax(z_s/T) || softmax(z_syn/T))
    with z_s detached (positive: it pulls the synergy towards the student; a negative sign would be
    unbounded below); `ib_kl` = mean per-sample KL (ib bridges only); `mbm_l2` = sum of squared bridge
    parameters.
    Phase B terms: `kd` = T^2 KL(softmax(z_syn/T) || softmax(z_s/T)) (hybrid with the teachers' mean
    logits when hybrid_beta is set); `feat_kd` = MSE(feat_pred, h) when feat_pred is given (optionally
    L2-normalised); `latent` = MSE(latent_pred, mu) when latent_pred is given (IB-KD).
    All reductions are batch means.
    kd_term (phase B): compute `kd`; off when the caller distils z_syn with another loss.
    query_grad (phase B only, off by default): keep the query attached and the phase-B targets
    (z_syn, h, mu) undetached, so gradient also reaches the student through its query.
    """
    if phase not in PHASES:
        raise ConfigError(f"unknown synergy phase {phase!r}; choose one of {', '.join(PHASES)}")
    if feat_kd_norm not in FEAT_KD_NORMS:
        raise ConfigError(f"unknown feat_kd_norm {feat_kd_norm!r}; choose one of {', '.join(FEAT_KD_NORMS)}")
    keep_query = phase == "B" and query_grad
    if query is not None and not keep_query:
        query = query.detach()
    if phase == "B":
        params = {k: v.detach() for k, v in params.items()}
        feats = [f.detach() for f in feats]
        teacher_logits = [t.detach() for t in teacher_logits]
    z_syn, out = functional_call(bridge, dict(params), (query, list(feats), list(teacher_logits)))

    terms: dict[str, Tensor] = {}
    if phase == "A":
        terms["synergy_ce"] = cross_entropy(z_syn, target, label_smoothing)
        terms["adapt_kd"] = kd_loss(z_syn, logits_student.detach(), temperature)
        if out.mu is not None:
            terms["ib_kl"] = ib_kl(out.mu, out.logvar).mean()
        param_names = {n for n, _ in bridge.named_parameters()}
        terms["mbm_l2"] = sum(v.pow(2).sum() for n, v in params.items() if n in param_names)
    else:
        if kd_term:  # off when the caller distils z_syn with another loss (ASMB's --asmb.loss dkd)
            t_mean = ensemble_logits(teacher_logits) if hybrid_beta is not None else None
            terms["kd"] = hybrid_kd(logits_student, z_syn, t_mean, temperature, hybrid_beta, not keep_query)
        if feat_pred is not None:
            terms["feat_kd"] = feature_mse(feat_pred, out.h if keep_query else out.h.detach(), feat_kd_norm)
        if latent_pred is not None:
            if out.mu is None:
                raise ConfigError("latent KD needs an ib bridge (mbm kind 'ib')")
            terms["latent"] = F.mse_loss(latent_pred, out.mu if keep_query else out.mu.detach())
    return z_syn, out.h, terms


FnT = TypeVar("FnT", bound=Callable)


def compile_synergy(fn: FnT, enabled: bool) -> FnT:
    """torch.compile(fn, fullgraph=True, dynamic=False) when enabled, else fn unchanged.
    Static shapes: keep the batch size fixed (drop_last=True) or each new size compiles once more.
    Pass temperature and hybrid_beta as tensors (Python floats are baked into the graph).
    Random ops (IB noise, dropout) use inductor's RNG when compiled: same distribution, different
    draws than eager (torch._inductor.config.fallback_random=True makes them match)."""
    return torch.compile(fn, fullgraph=True, dynamic=False) if enabled else fn
