"""ASMB (Adaptive Synergy Manifold Bridging, defined in docs/asmb.md): everything of the method except the loop.

- `AsmbCfg`: the `--asmb.*` CLI group, with its range checks.
- `tau_at`: the temperature schedule on one global epoch counter (phases A and B alike).
- `build_asmb_modules`: the bridge (MBM + synergy head, kd.mbm) and the student's projections; every
  impossible dimension is a ConfigError there, before any training.
- `SynergyModel`: the synergy classifier (student query -> bridge over the teachers' features) as one model.
- Phase A (teacher adaptation): `TeacherAdaptStep` runs the frozen student and the partly trainable
  teachers, `AsmbAdapt` turns their outputs into the loss terms.
- Phase B (student distillation): `AsmbDistill`, a Method of the ordinary student loop (teachers frozen).
- `stage_metrics`: the per-stage report (teachers, their ensemble, synergy, disagreement, student, attention);
  `synergy_warning`: the line to print when a stage's synergy is below the ensemble.
- `synergy_losses`: the synergy logits and both phases' unweighted terms through `torch.func.functional_call`
  (optionally torch.compiled, `compile_synergy`), with the temperature as a tensor; the only place the loss
  weights live is each phase's `loss_weights()` (read from AsmbCfg), which the loop applies.
`AsmbRun`: the run's models and progress as one state_dict. The multi-stage loop (stage 0 teachers, the phase
trainers, epochs, checkpoints) is train.py's train_asmb / build_asmb_run.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .engine.distributed import rank0_values
from .configs import AsmbCfg, feat_kd_map_index  # noqa: F401  (the --asmb.* group lives with the light configs)
from .errors import ConfigError
from .freeze import kept_modes, set_train
from .losses import cross_entropy, dkd_loss, kd_loss
from .mbm import MBMOutput, SynergyBridge, build_bridge, ensemble_logits, ib_kl
from .methods.base import Method, StepInputs, warmup_factor
from .metrics import accuracy, disagreement_rate, gather_outputs
from .models import KDModel, ModelOutput


# ---- The synergy-logit loss path, one function for both phases -----------------------------------------
# `synergy_losses` runs the bridge through `torch.func.functional_call` on an explicit parameter
# dict, so the caller decides where gradient goes:
# - phase A (teacher adaptation): pass the bridge's live parameters (`dict(bridge.named_parameters())`
#   plus buffers); the student query and logits are detached here; the teachers' features and logits are
#   used as given, so each teacher's trainable part learns through them (a teacher run under no_grad here
#   would never adapt).
# - phase B (student distillation): parameters, teacher features and teacher logits are detached here, so
#   the synergy logits and feature are constants for the student (a student that could move its own target
#   would lower the loss by moving the target), and gradient reaches the student through its logits and
#   through the caller-owned projections (`feat_pred`, `latent_pred`).
# The train/eval mode of the bridge is the caller's (phase B: `bridge.eval()`).
#
# Terms are returned unweighted; their weights live in one place, the methods' `loss_weights()`
# (kd.asmb), which the loop applies. The temperature (and hybrid_beta) are tensors, so changing
# their values never makes `torch.compile` recompile.
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


def tau_at(epoch: int, cfg: AsmbCfg, total_epochs: int) -> float:
    """Temperature T at global epoch `epoch` (1-based, phase A and B epochs of every stage counted alike).

    fixed: tau_start. linear / cosine: tau_start at epoch 1, tau_end at epoch 1 + D and after, with
    D = tau_decay_epochs, or total_epochs - 1 when it is 0 (tau_end at the run's last epoch). Pure function."""
    if cfg.tau_schedule == "fixed":
        return cfg.tau_start
    span = cfg.tau_decay_epochs or max(total_epochs - 1, 1)
    progress = min(1.0, max(0, epoch - 1) / span)
    if cfg.tau_schedule == "linear":
        return cfg.tau_start + (cfg.tau_end - cfg.tau_start) * progress
    return cfg.tau_end + (cfg.tau_start - cfg.tau_end) * 0.5 * (1 + math.cos(math.pi * progress))


def temperature_table(cfg: AsmbCfg, total_epochs: int, device: torch.device | str = "cpu") -> Tensor:
    """[total_epochs] T per global epoch (index epoch - 1): indexing it gives a 0-dim tensor, no recompiles."""
    return torch.tensor([tau_at(e, cfg, total_epochs) for e in range(1, total_epochs + 1)], device=device)


# ----------------------------------------------------------------------------------------------- modules


def student_kd_feature(out: ModelOutput, map_index: int | None) -> Tensor:
    """The student feature feature KD projects: the pooled feature [B, D], or map `map_index` average-pooled [B, C_i]."""
    return out.feature if map_index is None else out.maps[map_index].mean(dim=(2, 3))


class FeatureProjection(nn.Module):
    """Trainable student-side projection [B, in_dim] -> [B, out_dim]: optional per-sample L2 normalisation of
    the input, a Linear layer, optional BatchNorm1d on the output (feature KD and IB-KD's latent MSE)."""

    def __init__(self, in_dim: int, out_dim: int, l2_input: bool = False, batchnorm: bool = False):
        super().__init__()
        self.l2_input = l2_input
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm = nn.BatchNorm1d(out_dim) if batchnorm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.linear(F.normalize(x, dim=1) if self.l2_input else x))


class AsmbModules(NamedTuple):
    bridge: SynergyBridge  # MBM + synergy head
    feat_proj: FeatureProjection | None  # student feature -> h (feat_kd_alpha > 0)
    latent_proj: FeatureProjection | None  # student feature -> mu (IB-KD, latent_alpha > 0)


def build_asmb_modules(cfg: AsmbCfg, teacher_dims: Sequence[int], student: KDModel, num_classes: int) -> AsmbModules:
    """The bridge over teachers of feature dims `teacher_dims` queried by `student`, and the student's
    projections. Raises ConfigError for impossible dimensions (query dim != student dim, heads that do not
    divide the attention width, a feature map the student does not have)."""
    bridge = build_bridge(
        cfg.mbm_kind,
        teacher_dims,
        student.num_features,
        num_classes,
        query_dim=cfg.mbm_query_dim,
        out_dim=cfg.mbm_out_dim,
        r=cfg.mbm_r,
        n_head=cfg.mbm_n_head,
        dropout=cfg.mbm_dropout,
        learnable_query=cfg.learnable_query,
        hidden=cfg.mbm_hidden,
        z_dim=cfg.z_dim,
        ib_fusion=cfg.ib_fusion,
        feat_norm=cfg.mbm_feat_norm,
        ensemble_base=cfg.ensemble_base,
    )
    h_dim = bridge.mbm.out_dim  # the synergy feature (z for ib)
    feat_proj = latent_proj = None
    if cfg.feat_kd_alpha > 0:
        index = feat_kd_map_index(cfg.feat_kd_key)
        in_dim = student.num_features
        if index is not None:
            channels = student.feature_channels()
            if not -len(channels) <= index < len(channels):
                raise ConfigError(
                    f"--asmb.feat-kd-key {cfg.feat_kd_key}: {student.arch} has {len(channels)} feature maps"
                )
            in_dim = channels[index]
        feat_proj = FeatureProjection(in_dim, h_dim)
    if cfg.latent_alpha > 0:
        latent_proj = FeatureProjection(
            student.num_features, h_dim, l2_input=cfg.latent_l2_input, batchnorm=cfg.latent_bn
        )
    return AsmbModules(bridge, feat_proj, latent_proj)


def bridge_state(bridge: nn.Module) -> dict[str, Tensor]:
    """The bridge's parameters and buffers by name: what synergy_losses calls it with (live tensors)."""
    return {**dict(bridge.named_parameters()), **dict(bridge.named_buffers())}


def _keep_unregistered(module: nn.Module, name: str, value: Any) -> None:
    """Set an attribute without registering it as a submodule: the loop owns (moves, saves) that model."""
    object.__setattr__(module, name, value)


class SynergyModel(nn.Module):
    """The synergy classifier as one model: the teachers' mean logits plus the bridge's residual, the bridge
    queried by the student's pooled feature over the teachers' pooled features; forward(x) -> z_syn [B, C]. Phase A's trainer trains it: train() puts each teacher in the
    training mode of its freeze policy (frozen norm layers stay in eval) and keeps the student in eval (it only
    supplies the query). Only the bridge is a registered submodule; teachers and student belong to the loop."""

    def __init__(self, bridge: SynergyBridge, student: KDModel, teachers: Sequence[KDModel], teacher_policy: str):
        super().__init__()
        self.bridge = bridge
        self.teacher_policy = teacher_policy
        _keep_unregistered(self, "student", student)
        _keep_unregistered(self, "teachers", list(teachers))

    def train(self, mode: bool = True) -> "SynergyModel":
        super().train(mode)
        for teacher in self.teachers:
            set_train(teacher, self.teacher_policy, mode)
        self.student.eval()
        return self

    def outputs(self, x: Tensor) -> tuple[ModelOutput, list[ModelOutput], Tensor, MBMOutput]:
        """(student output, teacher outputs, z_syn [B, C], the MBM's output) for images x [B, 3, H, W]."""
        s = self.student(x)
        t_outs = [t(x) for t in self.teachers]
        z_syn, out = self.bridge(s.feature, [t.feature for t in t_outs], [t.logits for t in t_outs])
        return s, t_outs, z_syn, out

    def forward(self, x: Tensor) -> Tensor:
        return self.outputs(x)[2]

    def meta(self) -> dict[str, Any]:
        return {
            "arch": f"asmb-{self.bridge.kind}",
            "num_classes": self.student.num_classes,
            "student": self.student.arch,
            "teachers": [t.arch for t in self.teachers],
        }


# ----------------------------------------------------------------------------------------------- phase A


class TeacherAdaptStep(nn.Module):
    """Phase A's forward (what the loop's Trainer.step calls; DDP-wrapped with several processes): the frozen
    student (eval, no grad) gives the query and the logits the synergy is pulled towards; the teachers run WITH
    gradient so their trainable part learns (a teacher run under no_grad here would never adapt).
    Registered: the teachers and the bridge (phase A's trained parameters); the student is not."""

    def __init__(self, student: KDModel, teachers: Sequence[KDModel], bridge: SynergyBridge, method: "AsmbAdapt"):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.bridge = bridge
        self.method = method
        _keep_unregistered(self, "student", student)

    def forward(self, x: Tensor, y: Tensor, index: Tensor, epoch: int, _frozen_teacher_outs: list) -> dict[str, Tensor]:
        with torch.no_grad():
            s_out = self.student(x)
        t_outs = [t(x) for t in self.teachers]
        return self.method(StepInputs(x=x, target=y, index=index, epoch=epoch, student=s_out, teachers=t_outs))


class AsmbAdapt(Method):
    """Phase A loss terms (docs/asmb.md, "Phase A"), unweighted; weights in loss_weights():
    synergy_ce = CE(z_syn, y); adapt_kd = T^2 KL(softmax(z_s/T) || softmax(z_syn/T)) with the student detached
    (positive sign: a negative KL would be unbounded below); ib_kl = mean KL of the bottleneck (ib only);
    mbm_l2 = sum of squared MBM + head parameters; teacher_l2 = sum of squared trainable teacher parameters.
    `inp.student` is the frozen student's output, `inp.teachers` the teachers' outputs WITH gradient
    (TeacherAdaptStep): their logits make the synergy's ensemble part, so every trainable teacher tensor lies
    on the path of synergy_ce (a teacher with nothing trainable is a ConfigError here, before phase A)."""

    name = "asmb:A"

    def __init__(
        self,
        cfg: AsmbCfg,
        bridge: SynergyBridge,
        teachers: Sequence[KDModel],
        temperatures: Tensor,
        *,
        num_classes: int,
        label_smoothing: float = 0.0,
    ):
        super().__init__(
            cfg, None, list(teachers), num_classes=num_classes, num_train=0, label_smoothing=label_smoothing
        )
        _keep_unregistered(self, "bridge", bridge)
        _keep_unregistered(self, "teacher_models", list(teachers))
        for teacher in teachers:
            if not any(p.requires_grad for p in teacher.parameters()):
                raise ConfigError(
                    f"--asmb.teacher-freeze {cfg.teacher_freeze} leaves nothing of teacher {teacher.arch} "
                    "to train in phase A"
                )
        self.register_buffer("temperatures", temperatures, persistent=False)
        self.synergy = compile_synergy(synergy_losses, cfg.compile_synergy)

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        _, _, terms = self.synergy(
            self.bridge, bridge_state(self.bridge), inp.student.feature, [t.feature for t in inp.teachers],
            [t.logits for t in inp.teachers], inp.student.logits, inp.target, self.temperatures[inp.epoch - 1],
            phase="A", label_smoothing=self.label_smoothing)  # fmt: skip
        params = [p for t in self.teacher_models for p in t.parameters() if p.requires_grad]
        terms["teacher_l2"] = torch.stack([p.pow(2).sum() for p in params]).sum()
        return terms

    def loss_weights(self, epoch: int) -> dict[str, float]:
        c = self.cfg
        return {
            "synergy_ce": c.synergy_ce,
            "adapt_kd": c.adapt_kd,
            "ib_kl": c.ib_beta,
            "mbm_l2": c.mbm_reg_lambda,
            "teacher_l2": c.reg_lambda,
        }


# ----------------------------------------------------------------------------------------------- phase B


class AsmbDistill(Method):
    """Phase B loss terms (docs/asmb.md, "Phase B"), unweighted; weights in loss_weights(): ce = CE(z_s, y) (soft
    labels under MixUp/CutMix); kd = T^2 KL(softmax(z_syn/T) || softmax(z_s/T)), or with hybrid_beta > 0
    (1 - beta) KD(z_syn) + beta KD(mean teacher logits); feat_kd = MSE(P(student feature), h) (feat_kd_alpha > 0);
    latent = MSE(P_z(s), mu) (IB-KD). The synergy is computed with the student's current feature as query and
    is a constant target (unless synergy_grad_to_student). The projections are this method's (trained with the
    student); teachers and bridge are not registered and train() keeps them in eval."""

    name = "asmb:B"

    def __init__(
        self,
        cfg: AsmbCfg,
        student: KDModel,
        teachers: Sequence[KDModel],
        modules: AsmbModules,
        temperatures: Tensor,
        *,
        num_classes: int,
        label_smoothing: float = 0.0,
        phase_epochs: tuple[int, int] = (0, 1),
    ):
        super().__init__(
            cfg, student, list(teachers), num_classes=num_classes, num_train=0, label_smoothing=label_smoothing
        )
        self.phase_epochs = phase_epochs  # (phase A, phase B) epochs per stage: the student epoch of a global one
        _keep_unregistered(self, "bridge", modules.bridge)
        _keep_unregistered(self, "teacher_models", list(teachers))
        self.feat_proj = modules.feat_proj
        self.latent_proj = modules.latent_proj
        self.map_index = feat_kd_map_index(cfg.feat_kd_key) if modules.feat_proj is not None else None
        self.needs_maps = self.map_index is not None  # the loop then asks the student for its feature maps
        device = temperatures.device
        self.register_buffer("temperatures", temperatures, persistent=False)
        hybrid = torch.tensor(cfg.hybrid_beta, device=device) if cfg.hybrid_beta > 0 else None
        self.register_buffer("hybrid_beta", hybrid, persistent=False)
        self.synergy = compile_synergy(synergy_losses, cfg.compile_synergy)

    def train(self, mode: bool = True) -> "AsmbDistill":
        super().train(mode)
        self.bridge.eval()  # frozen in phase B: no dropout, IB gives z = mu
        for teacher in self.teacher_models:
            teacher.eval()
        return self

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        s = inp.student
        feat_pred = self.feat_proj(student_kd_feature(s, self.map_index)) if self.feat_proj is not None else None
        latent_pred = self.latent_proj(s.feature) if self.latent_proj is not None else None
        temperature = self.temperatures[inp.epoch - 1]
        z_syn, _, terms = self.synergy(
            self.bridge, bridge_state(self.bridge), s.feature, [t.feature for t in inp.teachers],
            [t.logits for t in inp.teachers], s.logits, inp.target, temperature, phase="B",
            hybrid_beta=self.hybrid_beta, feat_pred=feat_pred, feat_kd_norm=self.cfg.feat_kd_norm,
            latent_pred=latent_pred, query_grad=self.cfg.synergy_grad_to_student,
            kd_term=self.cfg.loss == "kd")  # fmt: skip
        if self.cfg.loss == "dkd":  # the synergy as DKD's teacher instead of KD's
            hard = inp.target if inp.target.ndim == 1 else inp.target.argmax(dim=1)
            target = z_syn if self.cfg.synergy_grad_to_student else z_syn.detach()
            terms["dkd"] = dkd_loss(s.logits, target, hard, self.cfg.dkd_alpha, self.cfg.dkd_beta, temperature)
        return {"ce": cross_entropy(s.logits, inp.target, self.label_smoothing), **terms}

    def student_epoch(self, epoch: int) -> int:
        """The phase-B (student) epoch, from 1, of global epoch `epoch` (phase A and B epochs counted alike)."""
        a, b = self.phase_epochs
        return epoch - a * -(-epoch // (a + b))

    def loss_weights(self, epoch: int) -> dict[str, float]:
        c = self.cfg
        return {
            "ce": c.ce,
            "kd": c.kd,
            "dkd": c.kd * warmup_factor(self.student_epoch(epoch), c.dkd_warmup),
            "feat_kd": c.feat_kd_alpha,
            "latent": c.latent_alpha,
        }


# ----------------------------------------------------------------------------------------------- reporting, state


class AsmbRun:
    """An ASMB run's models and progress: the synergy model, both phases' methods, the stage, the best student,
    and (set by the training script) the two phase trainers `phase_a` / `phase_b`, whose optimiser states its
    state_dict() includes. state_dict() holds the whole run: student, each teacher's adapted entries (the cached
    teacher plus these rebuild it), bridge, projections, both optimisers/schedules/scalers, the stage and the
    best student so far; everything loads with torch.load(weights_only=True)."""

    def __init__(
        self,
        cfg: AsmbCfg,
        student: KDModel,
        teachers: Sequence[KDModel],
        modules: AsmbModules,
        device: torch.device | str,
        num_classes: int,
        optim_epochs: int,
        label_smoothing: float = 0.0,
    ):
        self.cfg, self.num_stages = cfg, cfg.num_stages
        self.teacher_epochs, self.student_epochs = cfg.epochs_per_stage(optim_epochs)
        temperatures = temperature_table(cfg, cfg.num_stages * (self.teacher_epochs + self.student_epochs), device)
        self.student, self.teachers, self.bridge = student, list(teachers), modules.bridge.to(device)
        self.teacher_keys = [adapted_keys(t, cfg.teacher_freeze) for t in teachers]
        self.synergy = SynergyModel(self.bridge, student, teachers, cfg.teacher_freeze)
        self.adapt = AsmbAdapt(
            cfg, self.bridge, teachers, temperatures, num_classes=num_classes, label_smoothing=label_smoothing
        )
        self.distill = AsmbDistill(
            cfg,
            student,
            teachers,
            modules,
            temperatures,
            num_classes=num_classes,
            label_smoothing=label_smoothing,
            phase_epochs=(self.teacher_epochs, self.student_epochs),
        ).to(device)
        self.phase_a = self.phase_b = None  # the phases' trainers (optimizer, scheduler, scaler; optim_state())
        self.stage = 0
        self.best: dict[str, Any] = {"acc": -1.0, "epoch": 0, "state": None}  # best student (global epoch)

    def phases(self) -> list[tuple[int, str, int]]:
        """The stage order, as (stage, phase tag, global epoch before it): per stage, phase A
        (`asmb:A:s<stage>`, teacher_epochs) then phase B (`asmb:B:s<stage>`, student_epochs). One global epoch
        counter runs through both phases: the temperature schedule and the rows use it."""
        order, epoch = [], 0
        for stage in range(1, self.num_stages + 1):
            order.append((stage, f"asmb:A:s{stage}", epoch))
            order.append((stage, f"asmb:B:s{stage}", epoch + self.teacher_epochs))
            epoch += self.teacher_epochs + self.student_epochs
        return order

    def adapt_param_groups(self) -> list[dict[str, Any]]:
        """Phase A's optimiser groups: each teacher's trainable part at teacher_lr (teacher_weight_decay); the MBM
        + head faster (teacher_lr * mbm_lr_factor) and without decay (mbm_reg_lambda regularises them)."""
        c = self.cfg
        return [
            {
                "params": [p for t in self.teachers for p in t.parameters() if p.requires_grad],
                "lr": c.teacher_lr,
                "weight_decay": c.teacher_weight_decay,
            },
            {"params": list(self.bridge.parameters()), "lr": c.teacher_lr * c.mbm_lr_factor, "weight_decay": 0.0},
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "student_meta": self.student.meta(),
            "student": self.student.state_dict(),
            "teachers": [
                {"meta": t.meta(), "adapted": {k: v for k, v in t.state_dict().items() if k in keys}}
                for t, keys in zip(self.teachers, self.teacher_keys)
            ],
            "bridge": self.bridge.state_dict(),
            "projections": self.distill.state_dict(),
            "phase_a": self.phase_a.optim_state(),
            "phase_b": self.phase_b.optim_state(),
            # the best student before the running phase B (during one, the trainer's own "best"/"progress" lead)
            "best": {"acc": self.best["acc"], "epoch": self.best["epoch"]},
            "best_student": self.best["state"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state["stage"])
        self.student.load_state_dict(state["student"])
        for teacher, saved in zip(self.teachers, state["teachers"]):
            teacher.load_state_dict(saved["adapted"], strict=False)
        self.bridge.load_state_dict(state["bridge"])
        self.distill.load_state_dict(state["projections"])
        self.phase_a.load_optim_state(state["phase_a"])
        self.phase_b.load_optim_state(state["phase_b"])
        self.best = {**state["best"], "state": state["best_student"]}


@torch.no_grad()
def stage_metrics(synergy: SynergyModel, loader: Iterable, device: torch.device | str = "cpu") -> dict[str, float]:
    """The per-stage report on `loader`, every model in eval: teacher<i>/acc, ensemble/acc (the teachers'
    mean logits), synergy/acc (ensemble + the bridge's residual, queried by the student), disagreement/pred and disagreement/both_wrong of the first two teachers, student/acc (all %),
    and, when the bridge attends (attn, ib with attn fusion), attn/teacher<i>: the mean attention weight on
    teacher i (over samples and heads; they sum to 1)."""
    synergy.eval()

    def forward(x: Tensor) -> dict[str, Tensor]:
        s, t_outs, z_syn, out = synergy.outputs(x)
        named = {**{f"teacher{i}": t.logits for i, t in enumerate(t_outs)}, "synergy": z_syn, "student": s.logits}
        if out.attn is not None:
            named["attn"] = out.attn.mean(dim=1)  # [B, H, N] -> [B, N]
        return named

    outs, labels = gather_outputs(forward, loader, device)
    n_teachers = len(synergy.teachers)
    metrics = {f"teacher{i}/acc": accuracy(outs[f"teacher{i}"], labels) for i in range(n_teachers)}
    metrics["ensemble/acc"] = accuracy(ensemble_logits([outs[f"teacher{i}"] for i in range(n_teachers)]), labels)
    metrics["synergy/acc"] = accuracy(outs["synergy"], labels)
    for mode in ("pred", "both_wrong"):
        metrics[f"disagreement/{mode}"] = disagreement_rate(outs["teacher0"], outs["teacher1"], labels, mode)
    metrics["student/acc"] = accuracy(outs["student"], labels)
    if "attn" in outs:
        metrics.update({f"attn/teacher{i}": w for i, w in enumerate(outs["attn"].mean(dim=0).tolist())})
    return metrics


def zero_residual(bridge: SynergyBridge) -> None:
    """Reset the synergy residual to 0 (its last layer, as at init): the synergy is the teachers' ensemble again."""
    last = bridge.head.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


def guard_residual(
    synergy: SynergyModel, loader: Iterable, stage: int, device: torch.device | str = "cpu"
) -> str | None:
    """--asmb.residual-guard, after phase A of `stage`: when the synergy is less accurate than the teachers'
    ensemble on `loader` (the validation split), reset the residual to 0 and return the line saying so. Under
    DDP every process evaluates the whole split and all take rank 0's decision (their BatchNorm statistics may
    differ in the last bits)."""
    metrics = stage_metrics(synergy, loader, device)
    synergy_acc, ensemble_acc = rank0_values(metrics["synergy/acc"], metrics["ensemble/acc"])  # ranks agree
    if synergy_acc >= ensemble_acc:
        return None
    zero_residual(synergy.bridge)
    return (
        f"stage {stage}: synergy val acc {synergy_acc:.2f} < ensemble {ensemble_acc:.2f} "
        "after phase A: residual reset to 0 (synergy = ensemble)"
    )


def synergy_warning(stage: int, metrics: dict[str, float]) -> str | None:
    """One warning line when stage `stage`'s synergy is less accurate than the teachers' ensemble (a student
    distilled from it learns from something worse than averaging the teachers), else None."""
    if metrics["synergy/acc"] >= metrics["ensemble/acc"]:
        return None
    return (
        f"warning: stage {stage}: synergy val acc {metrics['synergy/acc']:.2f} is below the teachers' ensemble "
        f"{metrics['ensemble/acc']:.2f}"
    )


def adapted_keys(model: nn.Module, policy: str) -> set[str]:
    """The state_dict keys phase A can change in a teacher under `policy` (call after apply_freeze): its
    trainable parameters and the buffers (BatchNorm statistics) of the modules set_train leaves in training
    mode. The cached teacher (+ adapter) plus these entries, loaded with strict=False, is the adapted teacher."""
    with kept_modes(model):
        set_train(model, policy)
        keys = {name for name, p in model.named_parameters() if p.requires_grad}
        for prefix, module in model.named_modules():
            if module.training:
                keys |= {f"{prefix}.{name}" if prefix else name for name, _ in module.named_buffers(recurse=False)}
    return keys & set(model.state_dict())
