"""ASMB (docs/asmb.md) in train.py: what each phase trains (bit-identical elsewhere), that every loss term
carries gradient where it should and every trainable teacher tensor gets a task gradient under each freeze
policy, the temperature schedule, the end-to-end run (per-stage rows, summary, checkpoints), early config
errors, one check per --asmb.* option that it has its effect, and (with KD_DATA_DIR) that on real data the
synergy is at least as accurate as the teachers' ensemble at every stage with the default flags.

Unit-level checks build an AsmbRun on tiny randomly initialised zoo models (no fine-tuning); the end-to-end
runs share one teacher cache (stage 0 runs once per module)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import train
from kd_cli.config import smoke_preset
from kd.engine.checkpoint import Checkpointer
from kd.engine.trainer import FitState
from kd.teachers import teacher_identities
from kd.asmb import (
    AsmbAdapt,
    AsmbCfg,
    FeatureProjection,
    SynergyModel,
    adapted_keys,
    build_asmb_modules,
    guard_residual,
    stage_metrics,
    synergy_warning,
    tau_at,
)
from kd.errors import ConfigError
from kd.freeze import apply_freeze, count_params, policy_params, set_train
from kd.losses import dkd_loss, kd_loss
from kd.mbm import IBMBM, MLPMBM, AttnMBM, build_bridge
from kd.methods.base import StepInputs
from kd.models import ModelOutput, create_model
from kd.asmb import synergy_losses

ROOT = Path(__file__).resolve().parents[1]

C = 10
B = 8
TEACHERS = ("resnet20", "wrn_16_2")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --------------------------------------------------------------------------- helpers


def asmb_cfg(*flags: str) -> train.Config:
    return train.parse_config(["--preset", "smoke", "--method", "asmb", *flags])


def make_run(seed: int = 0, **asmb) -> train.AsmbRun:
    """An AsmbRun with the smoke preset and `asmb` overrides of --asmb.* (field names), on random-weight teachers
    (resnet20, wrn_16_2) and a resnet8 student, CPU, 2 steps per epoch."""
    cfg = smoke_preset()
    cfg.method = "asmb"
    cfg.asmb = dataclasses.replace(cfg.asmb, **asmb)
    train.validate(cfg)
    torch.manual_seed(seed)
    a = cfg.asmb
    adapter = a.teacher_adapter_dim if a.teacher_freeze == "adapter" else 0
    student = create_model("resnet8", C, small_input=True)
    teachers = [create_model(name, C, small_input=True, adapter_dim=adapter) for name in TEACHERS]
    for t in teachers:
        t.eval().requires_grad_(False)
        apply_freeze(t, a.teacher_freeze)
    modules = build_asmb_modules(a, [t.num_features for t in teachers], student, C)
    return train.build_asmb_run(
        cfg, train.make_runtime(cfg, torch.device("cpu")), student, teachers, modules, steps=2, classes=C
    )


def train_epoch(tr, batches, epoch: int, desc: str) -> dict[str, float]:
    """train.py's epoch loop over `batches`, without checkpoints."""
    return train.train_epoch(FitState(tr, desc, batches), epoch, desc, Checkpointer.disabled())


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, C, (B,), generator=g), torch.arange(B)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def param_names(module: nn.Module, only_trainable: bool = False) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad or not only_trainable}


def phase_a_terms(run: train.AsmbRun, epoch: int = 1) -> dict[str, torch.Tensor]:
    """Phase A"s loss terms (with graph) for one batch, in the phase"s training modes."""
    set_train(run.phase_a.model, run.phase_a.freeze_policy)
    run.phase_a.method.train()
    x, y, index = batch()
    return run.phase_a.step_module(x, y, index, epoch, [])


def phase_b_terms(run: train.AsmbRun, epoch: int) -> dict[str, torch.Tensor]:
    set_train(run.phase_b.model, run.phase_b.freeze_policy)
    run.phase_b.method.train()
    x, y, index = batch()
    maps = run.distill.needs_maps
    with torch.no_grad():
        t_outs = [t(x, with_maps=maps) for t in run.teachers]
    return run.phase_b.step_module(x, y, index, epoch, t_outs)


def grad_norm(term: torch.Tensor, params: list[nn.Parameter]) -> float:
    """Total |gradient| of `term` w.r.t. those of `params` that require grad (0 when it does not reach them)."""
    params = [p for p in params if p.requires_grad]
    if not params or not term.requires_grad:
        return 0.0
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return sum(0.0 if g is None else g.abs().sum().item() for g in grads)


# --------------------------------------------------------------------------- what each phase trains


@pytest.mark.parametrize("policy", ["bn_head", "adapter", "last_block"])
def test_phase_a_updates_exactly_the_freeze_set_and_bridge(policy):
    run = make_run(teacher_freeze=policy)
    before = {
        "student": snapshot(run.student),
        "bridge": snapshot(run.bridge),
        **{f"t{i}": snapshot(t) for i, t in enumerate(run.teachers)},
    }
    train_epoch(run.phase_a, [batch()], 1, "A")
    assert changed(before["student"], run.student) == set()  # bit-identical: eval, no grad, not in the optimiser
    assert changed(before["bridge"], run.bridge) == param_names(run.bridge)
    for i, teacher in enumerate(run.teachers):
        moved = changed(before[f"t{i}"], teacher)
        trainable = {n for n, p in teacher.named_parameters() if any(p is q for q in policy_params(teacher, policy))}
        assert moved & param_names(teacher) == trainable, policy
        assert moved <= adapted_keys(teacher, policy)  # only the entries a checkpoint stores as "adapted"
        if policy != "bn_head":  # frozen norm layers stay in eval: their statistics do not move either
            assert not any(k.endswith("running_mean") and k not in adapted_keys(teacher, policy) for k in moved)


def test_phase_b_updates_only_student_and_projection():
    run = make_run(feat_kd_alpha=1.0)
    teachers = [snapshot(t) for t in run.teachers]
    bridge, student, proj = snapshot(run.bridge), snapshot(run.student), snapshot(run.distill)
    train_epoch(run.phase_b, [batch()], run.teacher_epochs + 1, "B")
    assert all(changed(s, t) == set() for s, t in zip(teachers, run.teachers))
    assert changed(bridge, run.bridge) == set()
    assert changed(student, run.student) >= param_names(run.student)
    assert changed(proj, run.distill) == {"feat_proj.linear.weight", "feat_proj.linear.bias"}


# --------------------------------------------------------------------------- gradient of every term


def test_every_phase_a_term_has_gradient_incl_teachers():
    run = make_run(mbm_kind="ib", teacher_freeze="bn_head")
    terms = phase_a_terms(run)
    assert set(terms) == {"synergy_ce", "adapt_kd", "ib_kl", "mbm_l2", "teacher_l2"}
    bridge = list(run.bridge.parameters())
    # teacher parameters under the features (norm affines), i.e. not the classifier the features skip
    features = [
        p
        for t in run.teachers
        for n, p in t.named_parameters()
        if p.requires_grad and not any(p is q for q in t.classifier.parameters())
    ]
    trainable = [p for t in run.teachers for p in t.parameters() if p.requires_grad]
    student = list(run.student.parameters())
    for name in ("synergy_ce", "adapt_kd", "ib_kl"):
        assert grad_norm(terms[name], bridge) > 0, name
        assert grad_norm(terms[name], features) > 0, f"{name}: the teachers must learn in phase A"
    assert grad_norm(terms["mbm_l2"], bridge) > 0
    assert grad_norm(terms["teacher_l2"], trainable) > 0
    assert all(grad_norm(v, student) == 0 for v in terms.values())  # the student is frozen in phase A


@pytest.mark.parametrize("policy", ["none", "head", "bn_head", "adapter", "last_block"])
def test_every_trainable_teacher_tensor_gets_a_task_gradient(policy):
    """No teacher parameter trains on its L2 term alone: with both L2 weights 0, after two phase-A steps (zero-
    initialised layers, the adapter's up-projection and the synergy residual's last layer, pass gradient on
    from the second), synergy_ce reaches every trainable teacher tensor."""
    run = make_run(teacher_freeze=policy, teacher_adapter_dim=8, reg_lambda=0.0, mbm_reg_lambda=0.0)
    train_epoch(run.phase_a, [batch(1), batch(2)], 1, "A")
    terms = phase_a_terms(run)
    for teacher in run.teachers:
        trainable = [(n, p) for n, p in teacher.named_parameters() if p.requires_grad]
        assert trainable, policy
        grads = torch.autograd.grad(
            terms["synergy_ce"], [p for _, p in trainable], retain_graph=True, allow_unused=True
        )
        dead = [n for (n, _), g in zip(trainable, grads) if g is None or g.abs().sum() == 0]
        assert not dead, f"{policy}: {teacher.arch} tensors without task gradient: {dead[:5]}"


def test_a_policy_with_nothing_to_train_is_an_error():
    run = make_run(teacher_freeze="head")
    for p in run.teachers[1].parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="leaves nothing of teacher wrn_16_2 to train"):
        AsmbAdapt(run_cfg(run), run.bridge, run.teachers, run.distill.temperatures, num_classes=C)


def test_every_phase_b_term_has_gradient_to_student_only():
    run = make_run(mbm_kind="ib", latent_alpha=1.0, feat_kd_alpha=1.0)
    terms = phase_b_terms(run, epoch=run.teacher_epochs + 1)
    assert set(terms) == {"ce", "kd", "feat_kd", "latent"}
    student = list(run.student.parameters())
    frozen = list(run.bridge.parameters()) + [p for t in run.teachers for p in t.parameters()]
    for name, value in terms.items():
        assert grad_norm(value, student) > 0, name
        assert grad_norm(value, frozen) == 0, f"{name}: teachers and bridge are frozen in phase B"
    assert grad_norm(terms["feat_kd"], list(run.distill.feat_proj.parameters())) > 0
    assert grad_norm(terms["latent"], list(run.distill.latent_proj.parameters())) > 0


# --------------------------------------------------------------------------- loss wiring


def test_phase_a_loss_is_the_weighted_sum_of_its_terms():
    run = make_run(mbm_kind="ib", synergy_ce=0.5, adapt_kd=2.0, ib_beta=0.3, mbm_reg_lambda=0.01, reg_lambda=0.02)
    out = train_epoch(run.phase_a, [batch()], 1, "A")
    expected = (
        0.5 * out["synergy_ce"]
        + 2.0 * out["adapt_kd"]
        + 0.3 * out["ib_kl"]
        + 0.01 * out["mbm_l2"]
        + 0.02 * out["teacher_l2"]
    )
    assert out["loss"] == pytest.approx(expected, rel=1e-5)


def test_phase_b_loss_is_the_weighted_sum_and_feat_kd_alpha_zero_drops_the_term():
    run = make_run(mbm_kind="ib", ce=0.3, kd=2.0, feat_kd_alpha=0.7, latent_alpha=5.0)
    out = train_epoch(run.phase_b, [batch()], 2, "B")
    expected = 0.3 * out["ce"] + 2.0 * out["kd"] + 0.7 * out["feat_kd"] + 5.0 * out["latent"]
    assert out["loss"] == pytest.approx(expected, rel=1e-5)
    off = make_run(feat_kd_alpha=0)
    assert off.distill.feat_proj is None and not list(off.distill.parameters())
    out = train_epoch(off.phase_b, [batch()], 2, "B")
    assert set(out) == {"loss", "ce", "kd"} and out["loss"] == pytest.approx(out["ce"] + out["kd"], rel=1e-5)


def _eval_outputs(run: train.AsmbRun, epoch: int):
    """Phase B"s method on one batch with every model in eval (deterministic), plus the pieces to check it."""
    run.distill.train()  # teachers and bridge to eval
    run.student.eval()
    x, y, index = batch()
    with torch.no_grad():
        s = run.student(x)
        t_outs = [t(x) for t in run.teachers]
        terms = run.distill(StepInputs(x=x, target=y, index=index, epoch=epoch, student=s, teachers=t_outs))
        z_syn, _ = run.bridge(s.feature, [t.feature for t in t_outs], [t.logits for t in t_outs])
    return terms, s, t_outs, z_syn, run.distill.temperatures[epoch - 1]


def test_hybrid_beta_zero_and_one_are_the_pure_targets():
    terms, s, t_outs, z_syn, T = _eval_outputs(make_run(hybrid_beta=0), epoch=2)
    torch.testing.assert_close(terms["kd"], kd_loss(s.logits, z_syn, T))
    terms, s, t_outs, z_syn, T = _eval_outputs(make_run(hybrid_beta=1), epoch=2)
    mean = torch.stack([t.logits for t in t_outs]).mean(0)
    torch.testing.assert_close(terms["kd"], kd_loss(s.logits, mean, T))
    terms, s, t_outs, z_syn, T = _eval_outputs(make_run(hybrid_beta=0.25), epoch=2)
    torch.testing.assert_close(terms["kd"], 0.75 * kd_loss(s.logits, z_syn, T) + 0.25 * kd_loss(s.logits, mean, T))


def test_feat_kd_norm_and_key():
    terms, s, _, _, _ = _eval_outputs(make_run(feat_kd_norm="l2"), epoch=2)
    l2 = terms["feat_kd"].item()
    assert 0 < l2 <= 4.0 / 64 + 1e-6  # both sides unit vectors of dim 64: MSE <= |a - b|^2 / D <= 4 / D
    run = make_run(feat_kd_key="map:-2")
    assert run.distill.needs_maps and run.distill.feat_proj.linear.in_features == run.student.feature_channels()[-2]
    terms = phase_b_terms(run, epoch=2)
    assert grad_norm(terms["feat_kd"], list(run.distill.feat_proj.parameters())) > 0
    assert make_run().distill.feat_proj.linear.in_features == run.student.num_features  # "feature" = pooled


def test_temperature_follows_the_global_epoch_in_both_phases():
    run = make_run(tau_schedule="linear", tau_start=4, tau_end=1)
    # smoke: 2 stages x (1 phase-A + 2 phase-B epochs) = 6 global epochs, T from 4 down to 1 at epoch 6
    torch.testing.assert_close(run.distill.temperatures, torch.tensor([4.0, 3.4, 2.8, 2.2, 1.6, 1.0]))
    assert torch.equal(run.phase_a.method.temperatures, run.distill.temperatures)
    for epoch in (2, 6):
        terms, s, _, z_syn, _ = _eval_outputs(run, epoch)
        torch.testing.assert_close(terms["kd"], kd_loss(s.logits, z_syn, tau_at(epoch, run_cfg(run), 6)))


def run_cfg(run: train.AsmbRun) -> AsmbCfg:
    return run.distill.cfg


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("fixed", {1: 4.0, 5: 4.0, 11: 4.0}),
        ("linear", {1: 4.0, 3: 3.4, 6: 2.5, 11: 1.0, 20: 1.0}),
        ("cosine", {1: 4.0, 6: 2.5, 11: 1.0, 30: 1.0}),
    ],
)
def test_tau_schedule_values(schedule, expected):
    cfg = AsmbCfg(tau_schedule=schedule, tau_start=4.0, tau_end=1.0)
    for epoch, tau in expected.items():
        assert tau_at(epoch, cfg, total_epochs=11) == pytest.approx(tau)
    decay = AsmbCfg(tau_schedule="cosine", tau_start=4.0, tau_end=1.0, tau_decay_epochs=4)
    assert tau_at(3, decay, 100) == pytest.approx(2.5) and tau_at(5, decay, 100) == pytest.approx(1.0)
    assert tau_at(2, decay, 100) == pytest.approx(1.0 + 3.0 * (0.5 + 0.5 * 2**-0.5))


def test_synergy_grad_to_student_lets_the_query_carry_gradient():
    def feature_grad(flag: bool) -> float:
        run = make_run(feat_kd_alpha=0.0, synergy_grad_to_student=flag, learnable_query=False)
        nn.init.normal_(run.bridge.head.net[-1].weight)  # a trained residual (a fresh one is 0: no path to the query)
        run.distill.train()
        x, y, index = batch()
        with torch.no_grad():
            t_outs = [t(x) for t in run.teachers]
        feature = torch.randn(B, run.student.num_features, requires_grad=True)  # the student"s pooled feature
        logits = torch.randn(B, C, requires_grad=True)
        student = ModelOutput(feature, logits, None)
        terms = run.distill(StepInputs(x=x, target=y, index=index, epoch=2, student=student, teachers=t_outs))
        return grad_norm(terms["kd"], [feature])

    assert feature_grad(False) == 0  # the synergy target is a constant: the student cannot move its own target
    assert feature_grad(True) > 0


# --------------------------------------------------------------------------- options that shape the modules


def test_bridge_options_shape_the_bridge():
    attn = make_run(mbm_out_dim=32, mbm_r=2, mbm_n_head=4, mbm_dropout=0.2).bridge
    assert isinstance(attn.mbm, AttnMBM) and attn.mbm.out_dim == 32 and attn.mbm.width == 16 and attn.mbm.n_head == 4
    assert {m.p for m in attn.modules() if isinstance(m, nn.Dropout)} == {0.2}
    learned = make_run(learnable_query=True).bridge
    names = param_names(learned)
    assert "mbm.query_token" in names and not any(n.startswith("mbm.q_proj") for n in names)
    assert any(n.startswith("mbm.q_proj") for n in param_names(make_run(learnable_query=False).bridge))
    mlp = make_run(mbm_kind="mlp", mbm_hidden=24).bridge
    assert isinstance(mlp.mbm, MLPMBM) and mlp.mbm.net[0].out_features == 24
    ib = make_run(mbm_kind="ib", z_dim=12, ib_fusion="concat").bridge
    assert isinstance(ib.mbm, IBMBM) and ib.mbm.out_dim == 12 and ib.mbm.fusion == "concat"
    assert make_run(mbm_kind="ib").bridge.mbm.fusion == "attn"
    ib = make_run(mbm_kind="ib", mbm_out_dim=32, z_dim=12).bridge  # out_dim: the fusion, z_dim: the latent
    assert ib.mbm.fuse.out_dim == 32 and ib.mbm.out_dim == 12
    assert make_run(mbm_feat_norm="layer").bridge.feat_norm == "layer" and make_run().bridge.feat_norm == "none"


def test_mbm_kind_ib_adds_ib_kl_and_latent_terms():
    assert "ib_kl" not in phase_a_terms(make_run())
    run = make_run(mbm_kind="ib", latent_alpha=1.0, latent_l2_input=True, latent_bn=True)
    assert "ib_kl" in phase_a_terms(run) and "latent" in phase_b_terms(run, epoch=2)
    proj = run.distill.latent_proj
    assert proj.l2_input and isinstance(proj.norm, nn.BatchNorm1d)
    proj.eval()
    x = torch.randn(4, run.student.num_features)
    torch.testing.assert_close(proj(3 * x), proj(x))  # the input is L2-normalised first
    plain = FeatureProjection(8, 4)
    assert isinstance(plain.norm, nn.Identity) and not torch.allclose(
        plain(2 * torch.ones(1, 8)), plain(torch.ones(1, 8))
    )


def test_teacher_freeze_policy_sets_trainable_counts_and_adapter_dim():
    counts = {}
    for policy in ("none", "head", "bn_head", "adapter", "last_block"):
        run = make_run(teacher_freeze=policy, teacher_adapter_dim=8)
        counts[policy] = [count_params(t)[0] for t in run.teachers]
        group = run.phase_a.optimizer.param_groups[0]["params"]
        assert sum(p.numel() for p in group) == sum(counts[policy])  # phase A optimises exactly those
        if policy == "adapter":
            assert all(t.adapter is not None and t.adapter.down.out_features == 8 for t in run.teachers)
    for i in range(2):
        assert counts["head"][i] < counts["bn_head"][i] < counts["last_block"][i] < counts["none"][i]
        assert counts["head"][i] < counts["adapter"][i]


def test_phase_a_optimiser_groups_and_schedule():
    run = make_run(teacher_lr=0.002, mbm_lr_factor=5, teacher_weight_decay=0.01, teacher_schedule="constant")
    teacher_group, bridge_group = run.phase_a.optimizer.param_groups
    assert isinstance(run.phase_a.optimizer, torch.optim.Adam)
    assert teacher_group["lr"] == pytest.approx(0.002) and teacher_group["weight_decay"] == 0.01
    assert bridge_group["lr"] == pytest.approx(0.01) and bridge_group["weight_decay"] == 0.0
    assert {id(p) for p in bridge_group["params"]} == {id(p) for p in run.bridge.parameters()}
    train_epoch(run.phase_a, [batch()], 1, "A")
    assert teacher_group["lr"] == pytest.approx(0.002)  # constant
    cosine = make_run(teacher_lr=0.002)
    train_epoch(cosine.phase_a, [batch()], 1, "A")
    # cosine over all phase-A steps of the run (2 stages x 1 epoch x 2 steps): after 1 of 4 steps
    assert cosine.phase_a.optimizer.param_groups[0]["lr"] == pytest.approx(0.002 * 0.5 * (1 + 2**-0.5))
    # phase B: --optim"s optimiser over student + projections, its schedule over all phase-B epochs
    assert isinstance(run.phase_b.optimizer, torch.optim.SGD)
    assert {id(p) for g in run.phase_b.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in [*run.student.parameters(), *run.distill.parameters()]
    }


def test_compile_synergy_flag_wires_the_compiled_path():
    assert make_run().distill.synergy is synergy_losses
    compiled = make_run(compile_synergy=True)
    assert compiled.distill.synergy is not synergy_losses and compiled.phase_a.method.synergy is not synergy_losses


def test_student_epochs_default_splits_optim_epochs():
    assert AsmbCfg(num_stages=2).epochs_per_stage(240) == (2, 120)
    assert AsmbCfg(num_stages=3, teacher_epochs=4, student_epochs=5).epochs_per_stage(240) == (4, 5)
    assert AsmbCfg(num_stages=4).epochs_per_stage(3) == (2, 1)


def test_stage_metrics_keys_and_attention():
    run = make_run()
    x, y, _ = batch()
    metrics = stage_metrics(run.synergy, [(x, y)], "cpu")
    assert list(metrics) == [
        "teacher0/acc",
        "teacher1/acc",
        "ensemble/acc",
        "synergy/acc",
        "disagreement/pred",
        "disagreement/both_wrong",
        "student/acc",
        "attn/teacher0",
        "attn/teacher1",
    ]
    # a fresh bridge's residual is 0: the synergy is exactly the teachers' mean-logit ensemble
    assert metrics["synergy/acc"] == metrics["ensemble/acc"]
    with torch.no_grad():
        mean = torch.stack([t(x).logits for t in run.teachers]).mean(0)
    assert metrics["ensemble/acc"] == pytest.approx(100.0 * (mean.argmax(1) == y).float().mean().item())
    assert metrics["attn/teacher0"] + metrics["attn/teacher1"] == pytest.approx(1.0)
    with torch.no_grad():
        preds = [t(x).logits.argmax(1) for t in run.teachers]
    assert metrics["disagreement/pred"] == pytest.approx(100.0 * (preds[0] != preds[1]).float().mean().item())
    assert "attn/teacher0" not in stage_metrics(make_run(mbm_kind="mlp").synergy, [(x, y)], "cpu")


def test_residual_guard_falls_back_to_the_ensemble_only_when_the_synergy_is_worse():
    run = make_run()
    x, y, _ = batch()
    with torch.no_grad():
        ensemble = torch.stack([t(x).logits for t in run.teachers]).mean(0)
        run.bridge.head.net[-1].bias.copy_(100.0 * torch.nn.functional.one_hot(torch.tensor(0), C))  # always class 0
        worse = (ensemble.argmax(1) == y).sum() > (y == 0).sum()
    assert worse  # the batch is chosen so that "always class 0" loses to the ensemble
    line = guard_residual(run.synergy, [(x, y)], stage=1)
    assert line.startswith("stage 1: synergy val acc") and line.endswith("residual reset to 0 (synergy = ensemble)")
    metrics = stage_metrics(run.synergy, [(x, y)], "cpu")
    assert metrics["synergy/acc"] == metrics["ensemble/acc"]
    assert run.bridge.head.net[-1].weight.abs().sum() == 0 and run.bridge.head.net[-1].bias.abs().sum() == 0
    with torch.no_grad():
        run.bridge.head.net[-1].bias.copy_(100.0 * torch.nn.functional.one_hot(y[0], C))
    kept = snapshot(run.bridge)
    assert guard_residual(run.synergy, [(x[:1], y[:1])], stage=2) is None  # not worse: the residual is kept
    assert changed(kept, run.bridge) == set()


def test_synergy_warning_only_below_the_ensemble():
    assert synergy_warning(1, {"synergy/acc": 50.0, "ensemble/acc": 50.0}) is None
    assert (
        synergy_warning(2, {"synergy/acc": 48.5, "ensemble/acc": 50.0})
        == "warning: stage 2: synergy val acc 48.50 is below the teachers' ensemble 50.00"
    )


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--asmb.hybrid-beta", "1.5"], "--asmb.hybrid-beta must be in [0, 1]"),
        (["--asmb.latent-alpha", "1"], "needs --asmb.mbm-kind ib"),
        (["--asmb.feat-kd-key", "layer3"], "--asmb.feat-kd-key must be"),
        (["--asmb.num-stages", "0"], "--asmb.num-stages must be >= 1"),
        (["--teachers", "resnet20,wrn_16_2,resnet8"], "two teachers"),
        (["--asmb.mbm-n-head", "3"], "must divide the attention width"),
        (["--asmb.feat-kd-key", "map:7"], "feature maps"),
        (["--asmb.synergy-ce", "0", "--asmb.adapt-kd", "0"], "phase A would train the teachers and the bridge"),
        (["--asmb.z-dim", "8"], "--asmb.z-dim only applies to --asmb.mbm-kind ib"),
        (["--asmb.mbm-kind", "ib", "--asmb.ib-fusion", "concat", "--asmb.mbm-out-dim", "8"], "has no effect"),
    ],
)
def test_bad_asmb_options_stop_before_any_work(tmp_path, flags, message):
    args = ["--run.out-dir", str(tmp_path / "runs"), "--teachers.cache-dir", str(tmp_path / "cache"), *flags]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        train.run(asmb_cfg(*args))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_query_dim_mismatch_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *TINY,
            "--asmb.mbm-query-dim",
            "7",
            "--run.out-dir",
            str(tmp_path / "runs"),
            "--teachers.cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "error: mbm query dim 7 != student feature dim 64"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- end to end


TINY = [
    "--preset",
    "smoke",
    "--method",
    "asmb",
    "--data.synthetic-train-size",
    "400",
    "--data.synthetic-test-size",
    "100",
    "--data.batch-size",
    "32",
    "--teachers.epochs",
    "1",
    "--run.max-steps-per-epoch",
    "2",
    "--asmb.num-stages",
    "2",
    "--asmb.teacher-epochs",
    "1",
    "--asmb.student-epochs",
    "2",
    "--wandb.mode",
    "disabled",
]


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teacher_cache")


def tiny_asmb(tmp_path: Path, cache: Path, name: str, *extra: str) -> tuple[dict, Path]:
    summary = train.run(
        train.parse_config(
            [
                *TINY,
                "--run.out-dir",
                str(tmp_path / "runs"),
                "--teachers.cache-dir",
                str(cache),
                "--run.name",
                name,
                *extra,
            ]
        )
    )
    return summary, tmp_path / "runs" / name


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_two_stages(tmp_path, teacher_cache):
    summary, run_dir = tiny_asmb(tmp_path, teacher_cache, "e2e")
    rows = [r for r in read_rows(run_dir) if not r["phase"].startswith("teacher:")]
    assert [(r["phase"], r["epoch"]) for r in rows] == [
        ("asmb:A:s1", 1),
        ("asmb:B:s1", 2),
        ("asmb:B:s1", 3),
        ("asmb:stage", 3),
        ("asmb:A:s2", 4),
        ("asmb:B:s2", 5),
        ("asmb:B:s2", 6),
        ("asmb:stage", 6),
    ]
    a_row, b_row = rows[0], rows[1]
    assert (
        set(a_row)
        >= {
            "train/loss",
            "train/synergy_ce",
            "train/adapt_kd",
            "train/mbm_l2",
            "train/teacher_l2",
            "val/synergy_acc",
            "val/best_synergy_acc",
        }
        and "val/acc" not in a_row
    )
    assert set(b_row) >= {"train/loss", "train/ce", "train/kd", "train/feat_kd", "val/acc", "val/best_acc"}
    stages = [r for r in rows if r["phase"] == "asmb:stage"]
    assert [r["stage"] for r in stages] == [1, 2]
    for r in stages:
        assert set(r) == {
            "phase",
            "stage",
            "epoch",
            "teacher0/acc",
            "teacher1/acc",
            "ensemble/acc",
            "synergy/acc",
            "disagreement/pred",
            "disagreement/both_wrong",
            "student/acc",
            "attn/teacher0",
            "attn/teacher1",
            "guard/fired",
        }
    assert summary["asmb/guard_fired"] == sum(r["guard/fired"] for r in stages)  # each firing, counted
    b_rows = [r for r in rows if r["phase"].startswith("asmb:B")]
    best = max(r["val/acc"] for r in b_rows)
    assert b_rows[-1]["val/best_acc"] == best  # selection spans the stages
    # the summary's accuracies are rounded to 2 decimals (no float32 noise); the rows keep what was measured
    assert summary["best/val_acc"] == round(best, 2) and summary["last/val_acc"] == round(b_rows[-1]["val/acc"], 2)
    best_row = next(i for i, r in enumerate(b_rows) if r["val/acc"] == best)
    assert summary["best/global_epoch"] == b_rows[best_row]["epoch"]  # the row's (global) epoch
    assert summary["best/epoch"] == best_row + 1  # student (phase-B) epochs, as for every method
    assert stages[-1]["student/acc"] == pytest.approx(b_rows[-1]["val/acc"])
    for key in (
        "synergy/test_acc",
        "ensemble/test_acc",
        "adapted_ensemble/test_acc",
        "best/test_acc",
        "last/test_acc",
        "teacher/resnet20/val_acc",
        "teacher/wrn_16_2/val_acc",
    ):
        assert 0 <= summary[key] <= 100, key
    assert json.loads((run_dir / "summary.json").read_text())["synergy/test_acc"] == summary["synergy/test_acc"]
    # the teachers' columns are the teachers as given (what the synergy has to beat), not the adapted ones
    pairs = [TINY[i : i + 2] for i in range(0, len(TINY), 2)]  # TINY is flag-value pairs
    argv = [w for f, v in pairs if not f.startswith("--asmb.") for w in (f, "teacher" if v == "asmb" else v)]
    given = train.run(
        train.parse_config(
            [
                *argv,
                "--run.out-dir",
                str(tmp_path / "runs"),
                "--teachers.cache-dir",
                str(teacher_cache),
                "--run.name",
                "given",
            ]
        )
    )
    for key in ("ensemble/test_acc", "teacher/resnet20/test_acc", "teacher/wrn_16_2/test_acc"):
        assert summary[key] == given[key], key
    ck = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ck["phase"] == "asmb:B:s2" and ck["epoch"] == 6
    extra = ck["extra"]
    assert set(extra) >= {"stage", "student", "teachers", "bridge", "projections", "phase_a", "phase_b", "best_student"}
    assert extra["stage"] == 2 and len(extra["teachers"]) == 2
    assert all(set(p) == {"optimizer", "scheduler", "scaler"} for p in (extra["phase_a"], extra["phase_b"]))
    assert "mbm.query_token" in extra["bridge"] and "head.net.0.weight" in extra["bridge"]
    best_ck = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best_ck["val_acc"] == best and best_ck["epoch"] == summary["best/global_epoch"]


def test_checkpoint_rebuilds_the_synergy(tmp_path, teacher_cache):
    """From last.pt alone (plus the cached teachers), the synergy accuracy of the finished run is reproduced."""
    summary, run_dir = tiny_asmb(
        tmp_path,
        teacher_cache,
        "ck",
        "--asmb.num-stages",
        "1",
        "--asmb.teacher-freeze",
        "adapter",
        "--asmb.teacher-adapter-dim",
        "4",
    )
    extra = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["extra"]
    cfg = train.parse_config(
        [
            *TINY,
            "--teachers.cache-dir",
            str(teacher_cache),
            "--asmb.num-stages",
            "1",
            "--asmb.teacher-freeze",
            "adapter",
            "--asmb.teacher-adapter-dim",
            "4",
        ]
    )
    data = train.load_data(cfg)
    loaders = train.build_loaders(cfg, data, torch.device("cpu"))
    identities = teacher_identities(cfg.teachers, cfg.optim, cfg.data, cfg.run, data, True)
    ctx = train.RunContext(
        cfg, data, loaders, train.make_runtime(cfg, torch.device("cpu")), None, Checkpointer.disabled()
    )
    teachers = [t for t, _ in train.stage0_teachers(ctx, data, loaders, True, identities, adapter_dim=4)[0]]
    assert all(t.adapter is not None and t.adapter.down.out_features == 4 for t in teachers)
    for t, saved in zip(teachers, extra["teachers"]):
        assert any(k.startswith("adapter.") for k in saved["adapted"])
        t.load_state_dict(saved["adapted"], strict=False)
    student = create_model("resnet8", C, small_input=True)
    student.load_state_dict(extra["student"])
    modules = build_asmb_modules(cfg.asmb, [t.num_features for t in teachers], student, C)
    modules.bridge.load_state_dict(extra["bridge"])
    synergy = SynergyModel(modules.bridge, student, teachers, "adapter")
    assert stage_metrics(synergy, loaders["test"])["synergy/acc"] == pytest.approx(
        summary["synergy/test_acc"], abs=0.005
    )


# --------------------------------------------------------------------------- real data (KD_DATA_DIR)


def real_data_archive(tmp_path: Path) -> Path:
    """A copy of KD_DATA_DIR/tiny-imagenet-mini.tar.gz in tmp_path (the loader extracts next to the archive, so
    the shared folder is never written); skips when KD_DATA_DIR is unset or lacks the archive."""
    folder = os.environ.get("KD_DATA_DIR")
    if not folder:
        pytest.skip("KD_DATA_DIR is unset (a folder holding tiny-imagenet-mini.tar.gz)")
    archive = Path(folder) / "tiny-imagenet-mini.tar.gz"
    if not archive.is_file():
        pytest.skip(f"KD_DATA_DIR has no tiny-imagenet-mini.tar.gz ({folder})")
    copy = tmp_path / archive.name
    copy.write_bytes(archive.read_bytes())
    return copy


def test_real_data_synergy_is_at_least_the_ensemble_at_every_stage(tmp_path):
    """Tiny-ImageNet 10-class subset at 32 px, resnet20 + wrn_16_2 -> resnet8, seed 0, every --asmb.* flag at its
    default: at each stage row the synergy's val accuracy is >= the mean-logit ensemble of the adapted teachers
    (the synergy starts at that ensemble; phase A may only improve on it). A few CPU minutes."""
    archive = real_data_archive(tmp_path)
    args = [
        "--method",
        "asmb",
        "--teachers",
        "resnet20,wrn_16_2",
        "--teachers.pretrained",
        "False",
        "--teachers.epochs",
        "10",
        "--teachers.lr",
        "0.05",
        "--student.model",
        "resnet8",
        "--data.dataset",
        "tiny-imagenet",
        "--data.root",
        str(archive),
        "--data.image-size",
        "32",
        "--data.batch-size",
        "64",
        "--data.workers",
        "0",
        "--optim.epochs",
        "10",
        "--optim.schedule",
        "cosine",
        "--asmb.student-epochs",
        "5",
        "--run.amp",
        "bf16",
        "--run.seed",
        "0",
        "--wandb.mode",
        "disabled",
        "--run.out-dir",
        str(tmp_path / "runs"),
        "--run.name",
        "real",
        "--teachers.cache-dir",
        str(tmp_path / "cache"),
    ]
    train.run(train.parse_config(args))
    stages = [r for r in read_rows(tmp_path / "runs" / "real") if r["phase"] == "asmb:stage"]
    assert [r["stage"] for r in stages] == [1, 2]
    for r in stages:
        assert r["synergy/acc"] >= r["ensemble/acc"], r
        assert r["ensemble/acc"] > 30  # the teachers learned something (10 classes: chance is 10 %)


def test_guard_firings_are_counted_in_the_stage_rows_and_the_summary(tmp_path, teacher_cache, monkeypatch):
    fired_at = {1}  # the guard fires after phase A of stage 1 only
    real_guard = train.guard_residual

    def guard(synergy, loader, stage, device):
        real_guard(synergy, loader, stage, device)
        return f"stage {stage}: forced" if stage in fired_at else None

    monkeypatch.setattr(train, "guard_residual", guard)
    summary, run_dir = tiny_asmb(tmp_path, teacher_cache, "guard")
    stages = [r for r in read_rows(run_dir) if r["phase"] == "asmb:stage"]
    assert [r["guard/fired"] for r in stages] == [1, 0] and summary["asmb/guard_fired"] == 1
    assert json.loads((run_dir / "summary.json").read_text())["asmb/guard_fired"] == 1


def test_first_definition_synergy_is_the_bridge_alone(tmp_path, teacher_cache):
    """--asmb.ensemble-base False: z_syn = head(MBM(...)) with no ensemble term (the method as first defined);
    the head starts from PyTorch's default init, and there is no residual to guard."""
    bridge = build_bridge("attn", (8, 6), 4, C, ensemble_base=False)
    assert bridge.head.net[-1].weight.abs().sum() > 0
    feats, logits = [torch.randn(3, 8), torch.randn(3, 6)], [torch.randn(3, C), torch.randn(3, C)]
    z_syn, out = bridge(torch.randn(3, 4), feats, logits)
    assert torch.allclose(z_syn, bridge.head(out.h))
    summary, run_dir = tiny_asmb(tmp_path, teacher_cache, "first", "--asmb.ensemble-base", "False")
    stages = [r for r in read_rows(run_dir) if r["phase"] == "asmb:stage"]
    assert len(stages) == 2 and all("guard/fired" not in r for r in stages) and "asmb/guard_fired" not in summary
    assert 0 <= summary["synergy/test_acc"] <= 100


def test_phase_b_with_dkd_distils_the_synergy_through_decoupled_kd(tmp_path, teacher_cache):
    """--asmb.loss dkd: the term `dkd` = dkd_loss(z_s, z_syn, y, alpha, beta, T) replaces `kd`, weighted by
    --asmb.kd x min(student epoch / dkd_warmup, 1), phase-B epochs counted from 1 in every stage."""
    run = make_run(loss="dkd", dkd_alpha=2.0, dkd_beta=3.0, dkd_warmup=4)
    x, y, _ = batch()
    s, t_outs = run.student(x), [t(x) for t in run.teachers]
    terms = run.distill.loss_terms(StepInputs(x, y, torch.arange(len(y)), 1, s, t_outs))
    assert "kd" not in terms and set(terms) >= {"ce", "dkd"}
    with torch.no_grad():
        z_syn = run.synergy(x)
    assert terms["dkd"].item() == pytest.approx(dkd_loss(s.logits, z_syn, y, 2.0, 3.0, 4.0).item(), rel=1e-5)
    a, b = run.teacher_epochs, run.student_epochs
    assert [run.distill.student_epoch(e) for e in range(a + 1, 2 * (a + b) + 1) if (e - 1) % (a + b) >= a] == [
        *range(1, b + 1),
        *range(b + 1, 2 * b + 1),
    ]
    assert run.distill.loss_weights(a + 1)["dkd"] == pytest.approx(0.25)  # student epoch 1 of warm-up 4
    with pytest.raises(ConfigError, match="needs --asmb.loss kd"):
        AsmbCfg(loss="dkd", hybrid_beta=0.5).check()
    _, run_dir = tiny_asmb(tmp_path, teacher_cache, "dkd", "--asmb.loss", "dkd")
    b_rows = [r for r in read_rows(run_dir) if r["phase"].startswith("asmb:B")]
    assert b_rows and all("train/dkd" in r and "train/kd" not in r for r in b_rows)
