"""Configuration of every method: one dataclass per method (its `--<method>.*` CLI group), with `check()`
raising ConfigError on values the generic checks (finite, >= 0) do not cover.

This module imports only the standard library and kd.errors (no torch, no timm), so a command-line tool can
build its parser, print --help and reject bad flags in a fraction of a second; the method modules
(kd/methods/, kd/asmb.py) import their config from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError

MIN_TEMPERATURE = 1e-3


class TemperatureChecked:
    """Range check of a method group with a softmax `temperature` field: --<group>.temperature must be > 0 (the
    group is the class name without "Cfg", lower-cased)."""

    def check(self) -> None:
        group = type(self).__name__.removesuffix("Cfg").lower()
        if self.temperature <= 0:
            raise ConfigError(f"--{group}.temperature must be > 0, got {self.temperature}")
        if self.temperature < MIN_TEMPERATURE:  # T^2 scales the KL: below this it vanishes in float32
            raise ConfigError(
                f"--{group}.temperature {self.temperature} is below {MIN_TEMPERATURE}: the T^2 "
                "factor would turn distillation off"
            )


@dataclass
class KDCfg(TemperatureChecked):
    """--method kd: vanilla knowledge distillation."""

    temperature: float = 4.0
    """softmax temperature T of the KD term."""
    ce_weight: float = 0.1
    """weight of the cross-entropy on labels."""
    kd_weight: float = 0.9
    """weight of the T^2-scaled KL to the teacher."""
    standardize: bool = False
    """logit standardisation (Sun et al., CVPR 2024) of student and teacher logits before the KD term."""


@dataclass
class FitNetCfg:
    """--method fitnet: hints on the middle stage through a trained regressor."""

    hint_weight: float = 100.0
    """weight of the hint (MSE) term."""
    ce_weight: float = 1.0
    """weight of the cross-entropy on labels."""


@dataclass
class ATCfg:
    """--method at: attention transfer on every non-stem stage."""

    at_weight: float = 1000.0
    """weight of the attention term (the paper's beta/2)."""
    p: float = 2.0
    """power of the activations in the attention map mean_c |f|^p."""
    ce_weight: float = 1.0
    """weight of the cross-entropy on labels."""

    def check(self) -> None:
        if self.p <= 0:
            raise ConfigError(f"--at.p must be > 0, got {self.p}")


@dataclass
class DKDCfg(TemperatureChecked):
    """--method dkd: decoupled knowledge distillation."""

    alpha: float = 1.0
    """weight of the target-class term TCKD."""
    beta: float = 8.0
    """weight of the non-target-class term NCKD."""
    temperature: float = 4.0
    """softmax temperature T (the base temperature when standardize is on)."""
    warmup: int = 20
    """epochs over which the DKD weight ramps up as min(epoch / warmup, 1) (0 = no warm-up)."""
    ce_weight: float = 1.0
    """weight of the cross-entropy on labels."""
    standardize: bool = False
    """logit standardisation (Sun et al., CVPR 2024) of student and teacher logits before the DKD term (the authors'
    recipe: temperature 2, alpha 9, beta 72)."""


@dataclass
class CRDCfg:
    """--method crd: contrastive representation distillation."""

    crd_weight: float = 0.8
    """weight of the CRD (NCE) term."""
    ce_weight: float = 1.0
    """weight of the cross-entropy on labels."""
    embed_dim: int = 128
    """dimension of the L2-normalised student and teacher embeddings."""
    nce_k: int = 16384
    """negatives per sample, drawn from other classes (capped at what the training set has)."""
    nce_t: float = 0.07
    """temperature of the contrast scores exp(<e_s, e_t> / T)."""
    momentum: float = 0.5
    """momentum of the memory-bank update (share of the old entry kept)."""

    def check(self) -> None:
        if self.embed_dim < 1 or self.nce_k < 1:
            raise ConfigError("--crd.embed-dim and --crd.nce-k must be >= 1")
        if self.nce_t <= 0:
            raise ConfigError(f"--crd.nce-t must be > 0, got {self.nce_t}")
        if not self.momentum < 1:
            raise ConfigError(f"--crd.momentum must be in [0, 1), got {self.momentum}")


@dataclass
class RKDCfg:
    """--method rkd: relational knowledge distillation on pooled features."""

    rkd_weight: float = 1.0
    """weight of the RKD term (distance and angle weights below are inside it)."""
    distance_weight: float = 25.0
    """weight of the distance-wise loss inside the RKD term."""
    angle_weight: float = 50.0
    """weight of the angle-wise loss inside the RKD term."""
    ce_weight: float = 1.0
    """weight of the cross-entropy on labels."""
    squared: bool = False
    """use squared pairwise distances in the distance-wise loss (mdistiller's RKD.PDIST.SQUARED)."""
    eps: float = 1e-12
    """clamp of the squared pairwise distances before the square root (mdistiller's RKD.PDIST.EPSILON)."""


@dataclass
class PKTCfg:
    """--method pkt: probabilistic knowledge transfer on pooled features."""

    pkt_weight: float = 30000.0
    """weight of the PKT term."""
    ce_weight: float = 1.0
    """weight of the cross-entropy on labels."""


@dataclass
class SPCfg:
    """--method sp: similarity-preserving distillation on the last feature map."""

    sp_weight: float = 3000.0
    """weight of the SP term."""
    ce_weight: float = 1.0
    """weight of the cross-entropy on labels."""


@dataclass
class DISTCfg(TemperatureChecked):
    """--method dist: DIST (correlation-based logit distillation)."""

    beta: float = 1.0
    """weight of the inter-class (per-sample) relation loss inside the DIST term."""
    gamma: float = 1.0
    """weight of the intra-class (per-class, over the batch) relation loss inside the DIST term."""
    temperature: float = 4.0
    """softmax temperature T (the term is scaled by T^2)."""
    dist_weight: float = 2.0
    """weight of the DIST term."""
    ce_weight: float = 1.0
    """weight of the cross-entropy on labels."""


@dataclass
class AverCfg(TemperatureChecked):
    """--method aver: mean over teachers of each teacher's KD loss (all --teachers)."""

    temperature: float = 4.0
    """softmax temperature T of each teacher's KD term."""
    ce_weight: float = 1.0
    """weight of the cross-entropy on labels."""
    kd_weight: float = 1.0
    """weight of the teacher-averaged KD term."""


@dataclass
class CAMKDCfg(TemperatureChecked):
    """--method camkd: confidence-aware multi-teacher KD on logits and the last feature map (all --teachers)."""

    temperature: float = 4.0
    """softmax temperature T of the KD terms."""
    ce_weight: float = 1.0
    """weight of the cross-entropy on labels."""
    kd_weight: float = 1.0
    """weight of the confidence-weighted KD term."""
    feature_weight: float = 50.0
    """weight of the confidence-weighted feature (MSE) term."""
    feature_start_epoch: int = 2
    """first epoch (1-based) of the feature term (the authors leave it out in epoch 1)."""


@dataclass
class EBKDCfg(TemperatureChecked):
    """--method ebkd: entropy-weighted multi-teacher KD (all --teachers)."""

    temperature: float = 4.0
    """softmax temperature T of the KD terms (the entropies use temperature 1)."""
    ce_weight: float = 1.0
    """weight of the cross-entropy on labels."""
    kd_weight: float = 1.0
    """weight of the entropy-weighted KD term."""


@dataclass
class AEKDCfg(TemperatureChecked):
    """--method aekd: adaptive ensemble KD (Du et al., NeurIPS 2020): teacher weights from the min-norm point of
    the teachers' KD gradients w.r.t. the student's logits (all --teachers)."""

    temperature: float = 4.0
    """softmax temperature T of the KD terms (and of their gradients)."""
    ce_weight: float = 1.0
    """weight of the cross-entropy on labels."""
    kd_weight: float = 1.0
    """weight of the adaptively weighted KD term."""
    tolerance: float = 0.6
    """upper bound C on each teacher's weight (the paper's tolerance for disagreement; the CA-MKD code's -C 0.6);
    clamped to [1/M, 1] (1/M: equal weights, 1: no bound)."""
    normalize_grads: bool = False
    """solve the min-norm problem for unit-norm gradients, then divide each weight by its gradient's norm and
    renormalise (the CA-MKD code's --svm_norm; off there by default)."""
    per_sample: bool = False
    """one weight vector per sample (the min-norm point of each sample's per-teacher gradients) instead of one per
    batch (the CA-MKD code: the min-norm point of the batch-mean gradients)."""

    def check(self) -> None:
        super().check()
        if not self.tolerance > 0:
            raise ConfigError(f"--aekd.tolerance must be > 0, got {self.tolerance}")


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
    teacher_lr: float = 1e-3
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
    """MBM: attn (attention over the teachers' features; its query is one learned token by default, the student feature with --asmb.learnable-query False), mlp (concat MLP), ib (variational information bottleneck)."""
    mbm_query_dim: int = 0
    """size of the MBM query with --asmb.learnable-query False, where the query is the student feature: 0 = its dim (any other value is an error); unused by the default learned query."""
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
    loss: Literal["kd", "dkd"] = "kd"
    """phase B logit loss towards the synergy (weight --asmb.kd): kd (T^2 KL, the term `kd`) or dkd (decoupled KD, Zhao et al. 2022, the term `dkd`: dkd_alpha TCKD + dkd_beta NCKD at T, times min(student epoch / dkd_warmup, 1))."""
    dkd_alpha: float = 1.0
    """phase B with loss dkd: weight of the target-class term TCKD."""
    dkd_beta: float = 8.0
    """phase B with loss dkd: weight of the non-target-class term NCKD."""
    dkd_warmup: int = 20
    """phase B with loss dkd: the dkd weight ramps as min(student epoch / dkd_warmup, 1) (phase-B epochs, from 1; 0 = none)."""
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
    ensemble_base: bool = True
    """synergy = the teachers' mean logits + the bridge's residual (head zero-initialised); False = the method's first definition: synergy = the head's output alone (default init), with no residual guard."""
    residual_guard: bool = True
    """after each phase A, if the synergy's val accuracy is below the teachers' ensemble, reset the residual to 0 (the synergy falls back to the ensemble) before phase B distils from it; counted as guard/fired (stage row) and asmb/guard_fired (summary). No effect with ensemble_base False."""
    compile_synergy: bool = False
    """torch.compile the synergy loss path (fullgraph, static shapes; worth it on GPU); off = eager."""
    bridge_split: float = 0.0
    """share F of the training split (after the validation hold-out; stratified per class, seeded by --data.split-seed) held out from stage 0: the teachers fit the other 1 - F, phase A (the bridge and the teachers' adaptation) trains on this part only, phase B on all of it; 0 = off (every phase on the whole training split)."""

    def check(self) -> None:
        """Ranges that train.py's generic checks (finite, >= 0) do not cover."""
        rules = [
            (self.num_stages >= 1, f"--asmb.num-stages must be >= 1, got {self.num_stages}"),
            (self.teacher_epochs >= 1, f"--asmb.teacher-epochs must be >= 1, got {self.teacher_epochs}"),
            (self.teacher_lr > 0, f"--asmb.teacher-lr must be > 0, got {self.teacher_lr}"),
            (self.mbm_lr_factor > 0, f"--asmb.mbm-lr-factor must be > 0, got {self.mbm_lr_factor}"),
            (self.hybrid_beta <= 1, f"--asmb.hybrid-beta must be in [0, 1], got {self.hybrid_beta}"),
            (self.bridge_split < 1, f"--asmb.bridge-split must be in [0, 1), got {self.bridge_split}"),
            (
                self.loss == "kd" or self.hybrid_beta == 0,
                "--asmb.hybrid-beta mixes two KD targets; it needs --asmb.loss kd",
            ),
            (self.mbm_dropout < 1, f"--asmb.mbm-dropout must be in [0, 1), got {self.mbm_dropout}"),
            (self.mbm_r >= 1, f"--asmb.mbm-r must be >= 1, got {self.mbm_r}"),
            (self.mbm_n_head >= 1, f"--asmb.mbm-n-head must be >= 1, got {self.mbm_n_head}"),
            (self.mbm_hidden >= 1, f"--asmb.mbm-hidden must be >= 1, got {self.mbm_hidden}"),
            (
                self.tau_start > 0 and self.tau_end > 0,
                f"--asmb.tau-start and --asmb.tau-end must be > 0, got {self.tau_start} and {self.tau_end}",
            ),
            (
                self.teacher_freeze != "adapter" or self.teacher_adapter_dim >= 1,
                "--asmb.teacher-freeze adapter needs --asmb.teacher-adapter-dim >= 1",
            ),
            (
                self.latent_alpha == 0 or self.mbm_kind == "ib",
                f"--asmb.latent-alpha > 0 (IB-KD) needs --asmb.mbm-kind ib, got {self.mbm_kind}",
            ),
            (
                self.synergy_ce > 0 or self.adapt_kd > 0,
                "--asmb.synergy-ce and --asmb.adapt-kd are both 0: phase A would train the teachers and the bridge "
                "on their L2 terms alone",
            ),
            (
                self.z_dim == 0 or self.mbm_kind == "ib",
                f"--asmb.z-dim only applies to --asmb.mbm-kind ib, got {self.mbm_kind}",
            ),
            (
                self.mbm_out_dim == 0 or self.mbm_kind != "ib" or self.ib_fusion == "attn",
                "--asmb.mbm-out-dim has no effect with --asmb.ib-fusion concat (set --asmb.z-dim for the latent size)",
            ),
        ]
        for ok, msg in rules:
            if not ok:
                raise ConfigError(msg)
        feat_kd_map_index(self.feat_kd_key)

    def epochs_per_stage(self, optim_epochs: int) -> tuple[int, int]:
        """(phase A, phase B) epochs of each stage; phase B defaults to --optim.epochs // num_stages."""
        return self.teacher_epochs, self.student_epochs or max(1, optim_epochs // self.num_stages)


# ----------------------------------------------------------------------------------------------- temperature


def feat_kd_map_index(key: str) -> int | None:
    """--asmb.feat-kd-key: "feature" -> None (the pooled feature); "map:<i>" -> i (a feature map index)."""
    if key == "feature":
        return None
    match = re.fullmatch(r"map:(-?\d+)", key)
    if match is None:
        raise ConfigError(f"--asmb.feat-kd-key must be 'feature' or 'map:<index>' (e.g. map:-1), got {key!r}")
    return int(match.group(1))


def flatten_config(config: dict[str, Any], prefix: str = "", dash: bool = False) -> dict[str, Any]:
    """A nested config dict as {"group.field": value}; lists become tuples. `dash`: field names in their CLI
    form (`kd.ce-weight`) instead of the dataclass form (`kd.ce_weight`)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = prefix + (k.replace("_", "-") if dash else k)
        if isinstance(v, dict):
            out.update(flatten_config(v, key + ".", dash))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out
