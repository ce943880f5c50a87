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
Both phases take their synergy terms, unweighted, from `kd.synergy.synergy_losses` (optionally torch.compiled)
with the temperature as a tensor; the only place the loss weights live is each phase's `loss_weights()`
(read from AsmbCfg), which the loop applies.
The multi-stage loop (stage 0 teachers, persistent optimisers, epochs, checkpoints) is train.py's run_asmb.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .freeze import set_train
from .losses import cross_entropy
from .mbm import MBMOutput, SynergyBridge, build_bridge, ensemble_logits
from .methods.base import Method, StepInputs
from .metrics import accuracy, disagreement_rate, gather_outputs
from .models import KDModel, ModelOutput
from .synergy import compile_synergy, synergy_losses


@dataclass
class AsmbCfg:
    """--method asmb (docs/asmb.md): stage 0 (both teachers fine-tuned, cached), then num_stages x (phase A: the
    teachers' trainable part + MBM + head learn the synergy = the teachers' mean logits + a residual that starts
    at 0; phase B: the student distils from it). Phase B's optimiser, learning
    rate, schedule, label smoothing, MixUp/CutMix and gradient clipping are the --optim.* ones (its schedule spans
    all phase-B epochs, num_stages x student_epochs); phase A uses Adam with the teacher_* options below."""

    num_stages: int = 2
    """number of (phase A, phase B) stages after stage 0."""
    teacher_epochs: int = 2
    """phase A (teacher adaptation) epochs per stage."""
    student_epochs: int = 0
    """phase B (student distillation) epochs per stage; 0 = --optim.epochs // num_stages (at least 1)."""
    teacher_lr: float = 1e-4
    """phase A Adam learning rate of the teachers' trainable parameters."""
    teacher_weight_decay: float = 0.0
    """phase A Adam weight decay of the teachers' trainable parameters (--optim.weight-decay is phase B's)."""
    mbm_lr_factor: float = 10.0
    """the MBM and synergy head learn at teacher_lr * mbm_lr_factor (no weight decay; see mbm_reg_lambda)."""
    teacher_schedule: Literal["cosine", "constant"] = "cosine"
    """phase A learning-rate schedule over all phase-A steps of the run (built once, persists across stages)."""
    teacher_freeze: Literal["none", "head", "bn_head", "adapter", "last_block"] = "bn_head"
    """what phase A trains in each teacher (its logits enter the synergy, so all of it gets the task gradient): none (everything), head (classifier), bn_head (norm affines + classifier), adapter (a new residual adapter + classifier), last_block (last stage + classifier)."""
    teacher_adapter_dim: int = 64
    """hidden width of the residual adapter put on each teacher's pooled feature under teacher_freeze adapter."""
    mbm_kind: Literal["attn", "mlp", "ib"] = "attn"
    """MBM: attn (student-query attention over the teachers), mlp (concat MLP), ib (variational information bottleneck)."""
    mbm_query_dim: int = 0
    """size of the MBM query; 0 = the student's feature dim (the query is the student feature, so any other value is an error)."""
    mbm_out_dim: int = 0
    """size D_out of the synergy feature h (ib: of the attention fusion's output; h = z has z_dim); 0 = the student's feature dim."""
    mbm_r: int = 4
    """attention width E = mbm_out_dim // mbm_r (attn, and ib with attn fusion)."""
    mbm_n_head: int = 1
    """attention heads; must divide E."""
    mbm_dropout: float = 0.0
    """dropout in the MBM (attention weights / MLP) and the synergy head."""
    learnable_query: bool = True
    """attn (and ib with attn fusion): one learned query token shared by all samples instead of the projected student feature (False = the student queries; the residual then sees phase B's moving student features it was not trained on)."""
    mbm_feat_norm: Literal["none", "layer"] = "none"
    """per-sample normalisation of each teacher feature before the MBM: none, or layer (zero mean, unit variance, no affine)."""
    mbm_hidden: int = 512
    """mlp: hidden width."""
    z_dim: int = 0
    """ib: latent size of z = h (0 = mbm_out_dim, else the student's feature dim); an error with another mbm_kind."""
    ib_fusion: Literal["attn", "concat"] = "attn"
    """ib: what gives mu and logvar: the attention fusion or the plain concat of the teacher features."""
    ib_beta: float = 1e-3
    """ib: weight of the mean KL of the bottleneck in phase A."""
    synergy_ce: float = 1.0
    """phase A: weight of CE(z_syn, y) (synergy_ce and adapt_kd cannot both be 0: phase A would have no task signal)."""
    adapt_kd: float = 0.0
    """phase A: weight of T^2 KL(softmax(z_s/T) || softmax(z_syn/T)) (pulls the synergy towards the student; at 1 the stage-1 pull towards an untrained student put the synergy below the ensemble)."""
    reg_lambda: float = 1e-5
    """phase A: weight of the sum of squared trainable teacher parameters."""
    mbm_reg_lambda: float = 1e-5
    """phase A: weight of the sum of squared MBM and head parameters."""
    ce: float = 1.0
    """phase B: weight of CE(z_s, y) (label smoothing and MixUp/CutMix from --optim)."""
    kd: float = 1.0
    """phase B: weight of T^2 KL(softmax(target/T) || softmax(z_s/T)), target = z_syn (or the hybrid below)."""
    hybrid_beta: float = 0.0
    """phase B hybrid guidance: KD term = (1 - beta) KD(z_syn) + beta KD(mean of the teachers' logits); 0 = synergy only."""
    feat_kd_alpha: float = 1.0
    """phase B: weight of MSE(P(student feature), h) with a trainable projection P (0 = off, no projection). With mbm_kind ib, h = mu in phase B, the same target as latent_alpha's (through another projection)."""
    feat_kd_key: str = "feature"
    """student feature fed to P: feature (pooled, pre-logit) or map:<i> (its i-th feature map, average-pooled; map:-1 = last)."""
    feat_kd_norm: Literal["none", "l2"] = "none"
    """feature KD: l2 = L2-normalise both sides per sample before the MSE."""
    latent_alpha: float = 0.0
    """IB-KD (mbm_kind ib): weight of MSE(P_z(student feature), mu) with a trainable projection P_z (0 = off)."""
    latent_l2_input: bool = False
    """IB-KD: L2-normalise the student feature before P_z."""
    latent_bn: bool = False
    """IB-KD: BatchNorm1d on the output of P_z."""
    tau_schedule: Literal["fixed", "linear", "cosine"] = "fixed"
    """temperature T over the global epoch (phase A and B epochs counted alike): fixed = tau_start."""
    tau_start: float = 4.0
    """T at the first epoch."""
    tau_end: float = 1.0
    """T at the end of the decay (linear, cosine)."""
    tau_decay_epochs: int = 0
    """global epochs over which T goes from tau_start to tau_end; 0 = the whole run (tau_end at its last epoch)."""
    synergy_grad_to_student: bool = False
    """phase B: let the gradient of the KD and feature-KD terms reach the student through the synergy query too
    (the target then moves with the student); off = the synergy target is a constant."""
    residual_guard: bool = True
    """after each phase A, if the synergy's val accuracy is below the teachers' ensemble, reset the residual to 0 (the synergy falls back to the ensemble) before phase B distils from it."""
    compile_synergy: bool = False
    """torch.compile the synergy loss path (fullgraph, static shapes; worth it on GPU); off = eager."""

    def check(self) -> None:
        """Ranges that train.py's generic checks (finite, >= 0) do not cover."""
        rules = [
            (self.num_stages >= 1, f"--asmb.num-stages must be >= 1, got {self.num_stages}"),
            (self.teacher_epochs >= 1, f"--asmb.teacher-epochs must be >= 1, got {self.teacher_epochs}"),
            (self.teacher_lr > 0, f"--asmb.teacher-lr must be > 0, got {self.teacher_lr}"),
            (self.mbm_lr_factor > 0, f"--asmb.mbm-lr-factor must be > 0, got {self.mbm_lr_factor}"),
            (self.hybrid_beta <= 1, f"--asmb.hybrid-beta must be in [0, 1], got {self.hybrid_beta}"),
            (self.mbm_dropout < 1, f"--asmb.mbm-dropout must be in [0, 1), got {self.mbm_dropout}"),
            (self.mbm_r >= 1, f"--asmb.mbm-r must be >= 1, got {self.mbm_r}"),
            (self.mbm_n_head >= 1, f"--asmb.mbm-n-head must be >= 1, got {self.mbm_n_head}"),
            (self.mbm_hidden >= 1, f"--asmb.mbm-hidden must be >= 1, got {self.mbm_hidden}"),
            (self.tau_start > 0 and self.tau_end > 0,
             f"--asmb.tau-start and --asmb.tau-end must be > 0, got {self.tau_start} and {self.tau_end}"),
            (self.teacher_freeze != "adapter" or self.teacher_adapter_dim >= 1,
             "--asmb.teacher-freeze adapter needs --asmb.teacher-adapter-dim >= 1"),
            (self.latent_alpha == 0 or self.mbm_kind == "ib",
             f"--asmb.latent-alpha > 0 (IB-KD) needs --asmb.mbm-kind ib, got {self.mbm_kind}"),
            (self.synergy_ce > 0 or self.adapt_kd > 0,
             "--asmb.synergy-ce and --asmb.adapt-kd are both 0: phase A would train the teachers and the bridge "
             "on their L2 terms alone"),
            (self.z_dim == 0 or self.mbm_kind == "ib", f"--asmb.z-dim only applies to --asmb.mbm-kind ib, got {self.mbm_kind}"),
            (self.mbm_out_dim == 0 or self.mbm_kind != "ib" or self.ib_fusion == "attn",
             "--asmb.mbm-out-dim has no effect with --asmb.ib-fusion concat (set --asmb.z-dim for the latent size)"),
        ]
        for ok, msg in rules:
            if not ok:
                raise ConfigError(msg)
        feat_kd_map_index(self.feat_kd_key)

    def epochs_per_stage(self, optim_epochs: int) -> tuple[int, int]:
        """(phase A, phase B) epochs of each stage; phase B defaults to --optim.epochs // num_stages."""
        return self.teacher_epochs, self.student_epochs or max(1, optim_epochs // self.num_stages)


# ----------------------------------------------------------------------------------------------- temperature


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


def feat_kd_map_index(key: str) -> int | None:
    """--asmb.feat-kd-key: "feature" -> None (the pooled feature); "map:<i>" -> i (a feature map index)."""
    if key == "feature":
        return None
    match = re.fullmatch(r"map:(-?\d+)", key)
    if match is None:
        raise ConfigError(f"--asmb.feat-kd-key must be 'feature' or 'map:<index>' (e.g. map:-1), got {key!r}")
    return int(match.group(1))


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
    bridge = build_bridge(cfg.mbm_kind, teacher_dims, student.num_features, num_classes, query_dim=cfg.mbm_query_dim,
                          out_dim=cfg.mbm_out_dim, r=cfg.mbm_r, n_head=cfg.mbm_n_head, dropout=cfg.mbm_dropout,
                          learnable_query=cfg.learnable_query, hidden=cfg.mbm_hidden, z_dim=cfg.z_dim,
                          ib_fusion=cfg.ib_fusion, feat_norm=cfg.mbm_feat_norm)
    h_dim = bridge.mbm.out_dim  # the synergy feature (z for ib)
    feat_proj = latent_proj = None
    if cfg.feat_kd_alpha > 0:
        index = feat_kd_map_index(cfg.feat_kd_key)
        in_dim = student.num_features
        if index is not None:
            channels = student.feature_channels()
            if not -len(channels) <= index < len(channels):
                raise ConfigError(f"--asmb.feat-kd-key {cfg.feat_kd_key}: {student.arch} has {len(channels)} feature maps")
            in_dim = channels[index]
        feat_proj = FeatureProjection(in_dim, h_dim)
    if cfg.latent_alpha > 0:
        latent_proj = FeatureProjection(student.num_features, h_dim, l2_input=cfg.latent_l2_input, batchnorm=cfg.latent_bn)
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
        return {"arch": f"asmb-{self.bridge.kind}", "num_classes": self.student.num_classes,
                "student": self.student.arch, "teachers": [t.arch for t in self.teachers]}


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

    def __init__(self, cfg: AsmbCfg, bridge: SynergyBridge, teachers: Sequence[KDModel], temperatures: Tensor, *,
                 num_classes: int, label_smoothing: float = 0.0):
        super().__init__(cfg, None, list(teachers), num_classes=num_classes, num_train=0, label_smoothing=label_smoothing)
        _keep_unregistered(self, "bridge", bridge)
        _keep_unregistered(self, "teacher_models", list(teachers))
        for teacher in teachers:
            if not any(p.requires_grad for p in teacher.parameters()):
                raise ConfigError(f"--asmb.teacher-freeze {cfg.teacher_freeze} leaves nothing of teacher {teacher.arch} "
                                  "to train in phase A")
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
        return {"synergy_ce": c.synergy_ce, "adapt_kd": c.adapt_kd, "ib_kl": c.ib_beta, "mbm_l2": c.mbm_reg_lambda,
                "teacher_l2": c.reg_lambda}


# ----------------------------------------------------------------------------------------------- phase B


class AsmbDistill(Method):
    """Phase B loss terms (docs/asmb.md, "Phase B"), unweighted; weights in loss_weights(): ce = CE(z_s, y) (soft
    labels under MixUp/CutMix); kd = T^2 KL(softmax(z_syn/T) || softmax(z_s/T)), or with hybrid_beta > 0
    (1 - beta) KD(z_syn) + beta KD(mean teacher logits); feat_kd = MSE(P(student feature), h) (feat_kd_alpha > 0);
    latent = MSE(P_z(s), mu) (IB-KD). The synergy is computed with the student's current feature as query and
    is a constant target (unless synergy_grad_to_student). The projections are this method's (trained with the
    student); teachers and bridge are not registered and train() keeps them in eval."""

    name = "asmb:B"

    def __init__(self, cfg: AsmbCfg, student: KDModel, teachers: Sequence[KDModel], modules: AsmbModules,
                 temperatures: Tensor, *, num_classes: int, label_smoothing: float = 0.0):
        super().__init__(cfg, student, list(teachers), num_classes=num_classes, num_train=0,
                         label_smoothing=label_smoothing)
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
        _, _, terms = self.synergy(
            self.bridge, bridge_state(self.bridge), s.feature, [t.feature for t in inp.teachers],
            [t.logits for t in inp.teachers], s.logits, inp.target, self.temperatures[inp.epoch - 1], phase="B",
            hybrid_beta=self.hybrid_beta, feat_pred=feat_pred, feat_kd_norm=self.cfg.feat_kd_norm,
            latent_pred=latent_pred, query_grad=self.cfg.synergy_grad_to_student)  # fmt: skip
        return {"ce": cross_entropy(s.logits, inp.target, self.label_smoothing), **terms}

    def loss_weights(self, epoch: int) -> dict[str, float]:
        c = self.cfg
        return {"ce": c.ce, "kd": c.kd, "feat_kd": c.feat_kd_alpha, "latent": c.latent_alpha}


# ----------------------------------------------------------------------------------------------- reporting, state


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


def guard_residual(synergy: SynergyModel, loader: Iterable, stage: int, device: torch.device | str = "cpu") -> str | None:
    """--asmb.residual-guard, after phase A of `stage`: when the synergy is less accurate than the teachers'
    ensemble on `loader` (the validation split), reset the residual to 0 and return the line saying so."""
    metrics = stage_metrics(synergy, loader, device)
    if metrics["synergy/acc"] >= metrics["ensemble/acc"]:
        return None
    zero_residual(synergy.bridge)
    return (f"stage {stage}: synergy val acc {metrics['synergy/acc']:.2f} < ensemble {metrics['ensemble/acc']:.2f} "
            "after phase A: residual reset to 0 (synergy = ensemble)")


def synergy_warning(stage: int, metrics: dict[str, float]) -> str | None:
    """One warning line when stage `stage`'s synergy is less accurate than the teachers' ensemble (a student
    distilled from it learns from something worse than averaging the teachers), else None."""
    if metrics["synergy/acc"] >= metrics["ensemble/acc"]:
        return None
    return (f"warning: stage {stage}: synergy val acc {metrics['synergy/acc']:.2f} is below the teachers' ensemble "
            f"{metrics['ensemble/acc']:.2f}")


def adapted_keys(model: nn.Module, policy: str) -> set[str]:
    """The state_dict keys phase A can change in a teacher under `policy` (call after apply_freeze): its
    trainable parameters and the buffers (BatchNorm statistics) of the modules set_train leaves in training
    mode. The cached teacher (+ adapter) plus these entries, loaded with strict=False, is the adapted teacher."""
    modes = {m: m.training for m in model.modules()}
    try:
        set_train(model, policy)
        keys = {name for name, p in model.named_parameters() if p.requires_grad}
        for prefix, module in model.named_modules():
            if module.training:
                keys |= {f"{prefix}.{name}" if prefix else name for name, _ in module.named_buffers(recurse=False)}
    finally:
        for m, training in modes.items():
            m.training = training
    return keys & set(model.state_dict())
