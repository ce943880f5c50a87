"""Manifold Bridging Modules (MBM): fuse the two teachers' pooled features into one synergy feature,
and the synergy bridge that turns it into synergy logits (ASMB, defined in docs/asmb.md).

Every module's forward is a pure function of its inputs and parameters (no stored state), so the same
module works eagerly, under `torch.func.functional_call` and under `torch.compile`. All MBMs take
`(query, feats)` so callers do not need to know the kind: `query` is the student's pooled feature `s`
[B, D_s] (ignored where the kind does not use it) and `feats` the list of teacher features
`[f_1 [B, d_1], f_2 [B, d_2], ...]`.

The synergy logits are the teachers' mean logits plus a residual the synergy head computes from the MBM's
feature; the head's last layer starts at zero, so an untrained bridge is exactly the teachers' ensemble and
phase A can only move it where the loss asks (docs/asmb.md, "Synergy logits").
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from .errors import ConfigError

MBM_KINDS = ("attn", "mlp", "ib")
IB_FUSIONS = ("attn", "concat")
FEAT_NORMS = ("none", "layer")


def normalise_feats(feats: Sequence[Tensor], norm: str) -> list[Tensor]:
    """Per-sample normalisation of each teacher feature before the MBM. none: as given; layer: zero mean and
    unit variance over the feature dim, no affine (F.layer_norm), so teachers whose feature norms differ
    (e.g. 11.6 vs 7.7) enter the keys and values on one scale. [B, d_i] -> [B, d_i] each."""
    if norm == "none":
        return list(feats)
    return [torch.nn.functional.layer_norm(f, f.shape[-1:]) for f in feats]


class MBMOutput(NamedTuple):
    """h: synergy feature [B, out_dim]; attn: attention weights [B, heads, n_teachers] (attn fusion
    only, pre-dropout so they sum to 1); mu, logvar: [B, z_dim] posterior parameters (ib only)."""

    h: Tensor
    attn: Tensor | None = None
    mu: Tensor | None = None
    logvar: Tensor | None = None


def check_teacher_feats(feats: Sequence[Tensor], teacher_dims: Sequence[int]) -> None:
    """Raise ValueError with a readable message if `feats` does not match the expected teacher dims."""
    if len(feats) != len(teacher_dims):
        raise ValueError(f"MBM expects {len(teacher_dims)} teacher features, got {len(feats)}")
    for i, (f, d) in enumerate(zip(feats, teacher_dims)):
        if f.dim() != 2 or f.shape[1] != d:
            raise ValueError(f"teacher {i + 1} feature must be [B, {d}], got {list(f.shape)}")
        if f.shape[0] != feats[0].shape[0]:
            raise ValueError(f"teacher feature batch sizes differ: {[t.shape[0] for t in feats]}")


def _check_query(query: Tensor, query_dim: int, batch: int) -> None:
    if query.dim() != 2 or query.shape[1] != query_dim or query.shape[0] != batch:
        raise ValueError(f"MBM query must be [B={batch}, {query_dim}], got {list(query.shape)}")


class AttnMBM(nn.Module):
    """Lightweight cross-attention from one query token to one token per teacher.

    E = out_dim // r, split into `n_head` heads. Query: `W_q s` [B, E] or a learnable token [E]
    shared by all samples (then the student input is ignored). Each teacher i has its own key and
    value projections d_i -> E, giving n_teachers tokens. Scaled dot-product attention
    (Vaswani et al., 2017), dropout on the attention weights, output projection E -> out_dim.
    Returns h [B, out_dim] and the pre-dropout attention weights [B, heads, n_teachers].
    """

    def __init__(
        self,
        teacher_dims: Sequence[int],
        query_dim: int,
        out_dim: int,
        r: int = 4,
        n_head: int = 1,
        dropout: float = 0.0,
        learnable_query: bool = False,
    ) -> None:
        super().__init__()
        if r < 1 or out_dim // r < 1:
            raise ConfigError(f"mbm width out_dim // r = {out_dim} // {r} must be >= 1")
        width = out_dim // r
        if n_head < 1 or width % n_head != 0:
            raise ConfigError(
                f"mbm n_head {n_head} must divide the attention width {width} (= out_dim {out_dim} // r {r})"
            )
        self.teacher_dims = tuple(int(d) for d in teacher_dims)
        self.query_dim = query_dim
        self.out_dim = out_dim
        self.width = width
        self.n_head = n_head
        self.learnable_query = learnable_query
        if learnable_query:
            self.query_token = nn.Parameter(torch.randn(width) * 0.02)
        else:
            self.q_proj = nn.Linear(query_dim, width)
        # One projection per teacher producing [key | value] in one matmul.
        self.kv_projs = nn.ModuleList(nn.Linear(d, 2 * width) for d in self.teacher_dims)
        self.attn_drop = nn.Dropout(dropout)
        self.out_proj = nn.Linear(width, out_dim)

    def forward(self, query: Tensor, feats: Sequence[Tensor]) -> MBMOutput:
        check_teacher_feats(feats, self.teacher_dims)
        batch = feats[0].shape[0]
        if self.learnable_query:
            q = self.query_token.expand(batch, self.width)
        else:
            _check_query(query, self.query_dim, batch)
            q = self.q_proj(query)
        kv = torch.stack([proj(f) for proj, f in zip(self.kv_projs, feats)], dim=1)  # [B, N, 2E]
        k, v = kv.chunk(2, dim=-1)
        q = rearrange(q, "b (h d) -> b h d", h=self.n_head)
        k = rearrange(k, "b n (h d) -> b h n d", h=self.n_head)
        v = rearrange(v, "b n (h d) -> b h n d", h=self.n_head)
        scores = torch.einsum("bhd,bhnd->bhn", q, k) / math.sqrt(q.shape[-1])  # one query token
        weights = scores.softmax(dim=-1)  # [B, H, N]
        out = torch.einsum("bhn,bhnd->bhd", self.attn_drop(weights), v)
        h = self.out_proj(rearrange(out, "b h d -> b (h d)"))
        return MBMOutput(h=h, attn=weights)


class MLPMBM(nn.Module):
    """Concat [f_1, f_2, ...] -> Linear -> ReLU -> Dropout -> Linear -> ReLU -> Dropout -> Linear(out_dim).
    The query is accepted for a uniform call and ignored."""

    def __init__(self, teacher_dims: Sequence[int], out_dim: int, hidden: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden < 1:
            raise ConfigError(f"mbm hidden size must be >= 1, got {hidden}")
        self.teacher_dims = tuple(int(d) for d in teacher_dims)
        self.out_dim = out_dim
        self.net = nn.Sequential(
            nn.Linear(sum(self.teacher_dims), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, query: Tensor | None, feats: Sequence[Tensor]) -> MBMOutput:
        check_teacher_feats(feats, self.teacher_dims)
        return MBMOutput(h=self.net(torch.cat(list(feats), dim=1)))


def ib_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample (Alemi et al., 2017, "Deep Variational
    Information Bottleneck"): -1/2 * sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j)).
    Shapes: mu, logvar [B, Z] -> [B] (sum over Z, no batch reduction)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)


class IBMBM(nn.Module):
    """Variational information bottleneck bridge (Alemi et al., 2017).

    The fused input (attention over the teachers with output size fused_dim, or the plain concat of the
    teacher features) goes through one linear layer to (mu, logvar) of size z_dim; logvar is
    clamped to [-logvar_clamp, logvar_clamp] so exp() stays finite. Training: z = mu + eps *
    exp(logvar / 2) with eps ~ N(0, I) from torch's global RNG (seeded, no stored state);
    eval: z = mu. Returns h = z [B, z_dim] together with mu and logvar. So in eval (phase B) h equals mu.
    """

    def __init__(
        self,
        teacher_dims: Sequence[int],
        query_dim: int,
        z_dim: int,
        fusion: str = "attn",
        fused_dim: int = 0,
        r: int = 4,
        n_head: int = 1,
        dropout: float = 0.0,
        learnable_query: bool = False,
        logvar_clamp: float = 6.0,
    ) -> None:
        super().__init__()
        if fusion not in IB_FUSIONS:
            raise ConfigError(f"unknown ib fusion {fusion!r}; choose one of {', '.join(IB_FUSIONS)}")
        if logvar_clamp <= 0:
            raise ConfigError(f"ib logvar_clamp must be > 0, got {logvar_clamp}")
        self.teacher_dims = tuple(int(d) for d in teacher_dims)
        self.out_dim = z_dim  # h = z
        self.fusion = fusion
        self.logvar_clamp = float(logvar_clamp)
        if fusion == "attn":
            fused_dim = fused_dim or z_dim
            self.fuse = AttnMBM(
                teacher_dims, query_dim, fused_dim, r=r, n_head=n_head, dropout=dropout, learnable_query=learnable_query
            )
        else:
            fused_dim = sum(self.teacher_dims)
        self.to_stats = nn.Linear(fused_dim, 2 * z_dim)

    def forward(self, query: Tensor | None, feats: Sequence[Tensor]) -> MBMOutput:
        check_teacher_feats(feats, self.teacher_dims)
        attn = None
        if self.fusion == "attn":
            fused, attn, _, _ = self.fuse(query, feats)
        else:
            fused = torch.cat(list(feats), dim=1)
        mu, logvar = self.to_stats(fused).chunk(2, dim=1)
        logvar = logvar.clamp(-self.logvar_clamp, self.logvar_clamp)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return MBMOutput(h=z, attn=attn, mu=mu, logvar=logvar)


class SynergyHead(nn.Module):
    """Synergy residual: Linear(D, D) -> ReLU -> Dropout -> Linear(D, C), [B, D] -> [B, C]. With `zero_init` the
    last layer is zero-initialised, so the residual starts at 0 (the synergy starts at the teachers' ensemble); it
    receives gradient from the first step, the layers before it from the second. Without it (the first
    definition's head, whose output is the whole synergy) every layer keeps PyTorch's default initialisation."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0, zero_init: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(in_dim, num_classes)
        )
        if zero_init:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


def ensemble_logits(teacher_logits: Sequence[Tensor]) -> Tensor:
    """The teachers' mean-logit ensemble: [B, C] each -> [B, C]."""
    return torch.stack(list(teacher_logits)).mean(dim=0)


class SynergyBridge(nn.Module):
    """MBM + synergy head: forward(query, feats, teacher_logits) -> (z_syn [B, C], MBMOutput) with
    z_syn = mean_i(teacher_logits_i) + head(MBM(query, normalise(feats)).h), or with `ensemble_base` False (the
    method's first definition, docs/asmb.md) z_syn = head(MBM(query, normalise(feats)).h) alone."""

    def __init__(
        self, mbm: nn.Module, head: SynergyHead, kind: str, feat_norm: str = "none", ensemble_base: bool = True
    ) -> None:
        super().__init__()
        if feat_norm not in FEAT_NORMS:
            raise ConfigError(f"unknown mbm feature norm {feat_norm!r}; choose one of {', '.join(FEAT_NORMS)}")
        self.mbm = mbm
        self.head = head
        self.kind = kind
        self.feat_norm = feat_norm
        self.ensemble_base = ensemble_base

    def forward(
        self, query: Tensor | None, feats: Sequence[Tensor], teacher_logits: Sequence[Tensor]
    ) -> tuple[Tensor, MBMOutput]:
        if len(teacher_logits) != len(feats):
            raise ValueError(f"synergy bridge: {len(feats)} teacher features but {len(teacher_logits)} teacher logits")
        out = self.mbm(query, normalise_feats(feats, self.feat_norm))
        residual = self.head(out.h)
        return (ensemble_logits(teacher_logits) + residual if self.ensemble_base else residual), out


def build_bridge(
    kind: str,
    teacher_dims: Sequence[int],
    student_dim: int,
    num_classes: int,
    *,
    query_dim: int = 0,
    out_dim: int = 0,
    r: int = 4,
    n_head: int = 1,
    dropout: float = 0.0,
    learnable_query: bool = False,
    hidden: int = 512,
    z_dim: int = 0,
    ib_fusion: str = "attn",
    feat_norm: str = "none",
    ensemble_base: bool = True,
) -> SynergyBridge:
    """Build MBM + head. query_dim and out_dim default (0) to the student's feature dim; z_dim (ib)
    defaults to out_dim. For ib, out_dim is the attention fusion's output size and z_dim the latent size
    (h = z); with concat fusion out_dim has no use, so a non-zero one is a ConfigError, as is z_dim with
    another kind. A non-zero query_dim that differs from student_dim is a ConfigError, since the query is
    always the student's pooled feature."""
    if kind not in MBM_KINDS:
        raise ConfigError(f"unknown mbm kind {kind!r}; choose one of {', '.join(MBM_KINDS)}")
    if len(teacher_dims) < 1 or any(d < 1 for d in teacher_dims):
        raise ConfigError(f"mbm teacher dims must be positive, got {list(teacher_dims)}")
    if query_dim and query_dim != student_dim:
        raise ConfigError(f"mbm query dim {query_dim} != student feature dim {student_dim}")
    for name, value in (("out_dim", out_dim), ("z_dim", z_dim), ("query_dim", query_dim)):
        if value < 0:
            raise ConfigError(f"mbm {name} must be >= 0 (0 = default), got {value}")
    if z_dim and kind != "ib":
        raise ConfigError(f"mbm z_dim {z_dim} only applies to the ib kind, not {kind}")
    if kind == "ib" and ib_fusion == "concat" and out_dim:
        raise ConfigError(f"mbm out_dim {out_dim} has no effect with ib fusion concat (the latent size is z_dim)")
    query_dim = query_dim or student_dim
    fused_dim = out_dim
    out_dim = out_dim or student_dim
    if kind == "attn":
        mbm: nn.Module = AttnMBM(
            teacher_dims, query_dim, out_dim, r=r, n_head=n_head, dropout=dropout, learnable_query=learnable_query
        )
    elif kind == "mlp":
        mbm = MLPMBM(teacher_dims, out_dim, hidden=hidden, dropout=dropout)
    else:
        out_dim = z_dim or out_dim  # h = z
        mbm = IBMBM(
            teacher_dims,
            query_dim,
            out_dim,
            fusion=ib_fusion,
            fused_dim=fused_dim,
            r=r,
            n_head=n_head,
            dropout=dropout,
            learnable_query=learnable_query,
        )
    head = SynergyHead(out_dim, num_classes, dropout=dropout, zero_init=ensemble_base)
    return SynergyBridge(mbm, head, kind, feat_norm=feat_norm, ensemble_base=ensemble_base)
