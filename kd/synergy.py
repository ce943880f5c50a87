"""The synergy-logit loss path of ASMB (/work/shared/ASMB.md), one function for both phases.

`synergy_losses` runs the bridge through `torch.func.functional_call` on an explicit parameter
dict, so the caller decides where gradient goes:
- phase A (teacher adaptation): pass the bridge's live parameters (`dict(bridge.named_parameters())`
  plus buffers); the student query and logits are detached here; teacher features are used as
  given, so the trainable part of each teacher learns through them (bug 2 of the old code).
- phase B (student distillation): parameters and teacher features are detached here, the synergy
  logits and feature are constants (bug 4), and gradient reaches the student through its logits
  and through the caller-owned projections (`feat_pred`, `latent_pred`).
The train/eval mode of the bridge is the caller's (phase B: `bridge.eval()`).

Loss weights and the temperature are tensors, so changing their values never makes
`torch.compile` recompile. Terms are returned unweighted, plus the weighted `total`.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .errors import ConfigError
from .losses import cross_entropy, kd_loss
from .mbm import ib_kl

PHASES = ("A", "B")
# Order of the entries of a 1-D `weights` tensor, per phase.
PHASE_A_TERMS = ("synergy_ce", "adapt_kd", "ib_kl", "mbm_l2")
PHASE_B_TERMS = ("kd", "feat_kd", "latent")
FEAT_KD_NORMS = ("none", "l2")


def weight_vector(weights: Mapping[str, float], phase: str, device: torch.device | str = "cpu") -> Tensor:
    """Pack named weights into the 1-D tensor `synergy_losses` expects (missing names weigh 0)."""
    if phase not in PHASES:
        raise ConfigError(f"unknown synergy phase {phase!r}; choose one of {', '.join(PHASES)}")
    names = PHASE_A_TERMS if phase == "A" else PHASE_B_TERMS
    unknown = set(weights) - set(names)
    if unknown:
        raise ConfigError(f"unknown phase {phase} loss weight(s) {sorted(unknown)}; known: {', '.join(names)}")
    return torch.tensor([float(weights.get(n, 0.0)) for n in names], device=device)


def _weighted_sum(terms: Mapping[str, Tensor], weights: Tensor | Mapping[str, Tensor], names: tuple[str, ...]) -> Tensor:
    """sum_n w_n * term_n; a 1-D `weights` is indexed by position in `names`, a dict by name
    (a name missing from the dict weighs 0)."""
    if isinstance(weights, Tensor):
        if weights.shape != (len(names),):
            raise ValueError(f"weights must be a 1-D tensor of {len(names)} ({', '.join(names)}), got {list(weights.shape)}")
        parts = [weights[names.index(n)] * v for n, v in terms.items()]
    else:
        parts = [weights[n] * v for n, v in terms.items() if n in weights]
    return sum(parts[1:], parts[0]) if parts else torch.zeros_like(next(iter(terms.values())))


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
    logits_student: Tensor,
    target: Tensor,
    teacher_logits_mean: Tensor | None,
    weights: Tensor | Mapping[str, Tensor],
    temperature: Tensor,
    *,
    phase: str,
    label_smoothing: float = 0.0,
    hybrid_beta: float | Tensor | None = None,
    feat_pred: Tensor | None = None,
    feat_kd_norm: str = "none",
    latent_pred: Tensor | None = None,
    query_grad: bool = False,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Synergy logits and the loss terms of one phase. Returns (z_syn [B, C], h [B, D_out], terms).

    params: the bridge's parameters and buffers by name (phase A: live ones; phase B: detached here).
    query: the student's pooled feature [B, D_s] (always detached here). feats: teacher features.
    logits_student: z_s [B, C]. target: labels [B] or soft/mixed labels [B, C].
    weights: 1-D tensor ordered as PHASE_A_TERMS / PHASE_B_TERMS (see `weight_vector`), or a dict
    of 0-dim tensors by term name (missing names weigh 0).
    temperature: 0-dim tensor T.

    Phase A terms: `synergy_ce` = CE(z_syn, y); `adapt_kd` = T^2 KL(softmax(z_s/T) || softmax(z_syn/T))
    with z_s detached (positive sign, bug 1); `ib_kl` = mean per-sample KL (ib bridges only);
    `mbm_l2` = sum of squared bridge parameters (the mbm_reg_lambda term).
    Phase B terms: `kd` = T^2 KL(softmax(z_syn/T) || softmax(z_s/T)) (hybrid with the teachers' mean
    when hybrid_beta is set); `feat_kd` = MSE(feat_pred, h) when feat_pred is given (optionally
    L2-normalised); `latent` = MSE(latent_pred, mu) when latent_pred is given (IB-KD).
    `total` = sum of weight * term over the terms present. All reductions are batch means.
    query_grad (phase B only; ASMB.md's off-by-default option): keep the query attached and the phase-B
    targets (z_syn, h, mu) undetached, so gradient also reaches the student through its query.
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
    z_syn, out = functional_call(bridge, dict(params), (query, list(feats)))

    terms: dict[str, Tensor] = {}
    if phase == "A":
        names = PHASE_A_TERMS
        terms["synergy_ce"] = cross_entropy(z_syn, target, label_smoothing)
        terms["adapt_kd"] = kd_loss(z_syn, logits_student.detach(), temperature)
        if out.mu is not None:
            terms["ib_kl"] = ib_kl(out.mu, out.logvar).mean()
        param_names = {n for n, _ in bridge.named_parameters()}
        terms["mbm_l2"] = sum(v.pow(2).sum() for n, v in params.items() if n in param_names)
    else:
        names = PHASE_B_TERMS
        terms["kd"] = hybrid_kd(logits_student, z_syn, teacher_logits_mean, temperature, hybrid_beta, not keep_query)
        if feat_pred is not None:
            terms["feat_kd"] = feature_mse(feat_pred, out.h if keep_query else out.h.detach(), feat_kd_norm)
        if latent_pred is not None:
            if out.mu is None:
                raise ConfigError("latent KD needs an ib bridge (mbm kind 'ib')")
            terms["latent"] = F.mse_loss(latent_pred, out.mu if keep_query else out.mu.detach())
    terms["total"] = _weighted_sum(terms, weights, names)
    return z_syn, out.h, terms


FnT = TypeVar("FnT", bound=Callable)


def compile_synergy(fn: FnT, enabled: bool) -> FnT:
    """torch.compile(fn, fullgraph=True, dynamic=False) when enabled, else fn unchanged.
    Static shapes: keep the batch size fixed (drop_last=True) or each new size compiles once more.
    Pass weights, temperature and hybrid_beta as tensors (Python floats are baked into the graph).
    Random ops (IB noise, dropout) use inductor's RNG when compiled: same distribution, different
    draws than eager (torch._inductor.config.fallback_random=True makes them match)."""
    return torch.compile(fn, fullgraph=True, dynamic=False) if enabled else fn
