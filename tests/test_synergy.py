"""The synergy loss path: term values, where gradient flows in each phase, hybrid KD, and that
torch.compile (fullgraph, static shapes) agrees with eager and never recompiles when the
temperature or hybrid_beta change. Compile tests are slow on CPU: KD_SKIP_COMPILE=1 skips them."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import ConfigError
from kd.losses import cross_entropy, kd_loss
from kd.mbm import build_bridge, ib_kl
from kd.asmb import compile_synergy, synergy_losses

T_DIMS = (6, 5)
S_DIM = 8
C = 3
B = 4
skip_compile = pytest.mark.skipif(os.environ.get("KD_SKIP_COMPILE") == "1", reason="KD_SKIP_COMPILE=1")


def bridge_params(bridge: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(bridge.named_parameters()), **dict(bridge.named_buffers())}


def make_case(kind: str = "attn", seed: int = 0):
    """A bridge whose residual is no longer zero (as after some training: a fresh one has a zero last layer,
    so nothing but that layer would get gradient), teacher features and logits with gradient, a student."""
    torch.manual_seed(seed)
    bridge = build_bridge(kind, T_DIMS, S_DIM, C)
    nn.init.normal_(bridge.head.net[-1].weight, std=0.5)
    feats = [torch.randn(B, d, requires_grad=True) for d in T_DIMS]  # trainable-teacher features
    t_logits = [torch.randn(B, C, requires_grad=True) for _ in T_DIMS]  # trainable-teacher logits
    query = torch.randn(B, S_DIM, requires_grad=True)
    logits_s = torch.randn(B, C, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1])
    return bridge, feats, t_logits, query, logits_s, y


def grad_or_zero(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t) if t.grad is None else t.grad


def weighted(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """What the loop does with loss_weights(): sum of weight * term (a missing weight counts 0 here)."""
    return sum(weights.get(name, 0.0) * term for name, term in terms.items())


# --------------------------------------------------------------------------- values


def test_phase_a_terms():
    bridge, feats, t_logits, query, logits_s, y = make_case()
    T = torch.tensor(3.0)
    z_syn, h, terms = synergy_losses(
        bridge, bridge_params(bridge), query, feats, t_logits, logits_s, y, T, phase="A", label_smoothing=0.1
    )
    z_ref, out = bridge(query, feats, t_logits)
    torch.testing.assert_close(z_syn, z_ref)
    torch.testing.assert_close(z_ref, (t_logits[0] + t_logits[1]) / 2 + bridge.head(out.h))  # ensemble + residual
    torch.testing.assert_close(h, out.h)
    assert set(terms) == {"synergy_ce", "adapt_kd", "mbm_l2"}  # unweighted; the weights are loss_weights()'
    torch.testing.assert_close(terms["synergy_ce"], F.cross_entropy(z_ref, y, label_smoothing=0.1))
    # positive-sign KL(p_s || p_syn) * T^2, written out
    p_s = F.softmax(logits_s / 3, 1)
    kl = (p_s * (p_s.log() - F.log_softmax(z_ref / 3, 1))).sum(1).mean() * 9
    torch.testing.assert_close(terms["adapt_kd"], kl)
    assert terms["adapt_kd"] > 0
    l2 = sum(p.pow(2).sum() for p in bridge.parameters())
    torch.testing.assert_close(terms["mbm_l2"], l2)


def test_fresh_bridge_is_exactly_the_ensemble():
    torch.manual_seed(0)
    bridge = build_bridge("attn", T_DIMS, S_DIM, C)
    _, feats, t_logits, query, logits_s, y = make_case()
    z_syn, _, _ = synergy_losses(
        bridge, bridge_params(bridge), query, feats, t_logits, logits_s, y, torch.tensor(1.0), phase="A"
    )
    torch.testing.assert_close(z_syn, torch.stack(t_logits).mean(0), rtol=0, atol=0)


def test_phase_a_soft_targets():
    bridge, feats, t_logits, query, logits_s, _ = make_case()
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.2, 0.2, 0.6]])
    z_syn, _, terms = synergy_losses(
        bridge, bridge_params(bridge), query, feats, t_logits, logits_s, soft, torch.tensor(1.0), phase="A"
    )
    torch.testing.assert_close(terms["synergy_ce"], cross_entropy(z_syn, soft))


def test_ib_kl_term():
    bridge, feats, t_logits, query, logits_s, y = make_case("ib")
    bridge.eval()
    _, _, terms = synergy_losses(
        bridge, bridge_params(bridge), query, feats, t_logits, logits_s, y, torch.tensor(2.0), phase="A"
    )
    out = bridge.mbm(query, feats)
    torch.testing.assert_close(terms["ib_kl"], ib_kl(out.mu, out.logvar).mean())


@pytest.mark.parametrize("norm", ["none", "l2"])
def test_phase_b_terms(norm):
    bridge, feats, t_logits, query, logits_s, y = make_case("ib")
    bridge.eval()
    feat_pred = torch.randn(B, S_DIM)
    latent_pred = torch.randn(B, S_DIM)
    T = torch.tensor(4.0)
    z_syn, h, terms = synergy_losses(
        bridge, bridge_params(bridge), query, feats, t_logits, logits_s, y, T,
        phase="B", feat_pred=feat_pred, feat_kd_norm=norm, latent_pred=latent_pred,
    )  # fmt: skip
    out = bridge.mbm(query, feats)
    assert set(terms) == {"kd", "feat_kd", "latent"}
    torch.testing.assert_close(terms["kd"], kd_loss(logits_s, z_syn, T))
    if norm == "l2":
        expected_feat = (
            (feat_pred / feat_pred.norm(dim=1, keepdim=True) - h / h.norm(dim=1, keepdim=True)) ** 2
        ).mean()
    else:
        expected_feat = ((feat_pred - h) ** 2).mean()
    torch.testing.assert_close(terms["feat_kd"], expected_feat)
    torch.testing.assert_close(terms["latent"], ((latent_pred - out.mu) ** 2).mean())


def test_hybrid_beta_reduces_to_the_pure_cases():
    bridge, feats, t_logits, query, logits_s, y = make_case()
    T = torch.tensor(2.0)
    t_mean = torch.stack(t_logits).mean(0)

    def kd_term(beta):
        z_syn, _, terms = synergy_losses(
            bridge, bridge_params(bridge), query, feats, t_logits, logits_s, y, T, phase="B", hybrid_beta=beta
        )
        return z_syn, terms["kd"]

    z_syn, pure_syn = kd_term(None)
    torch.testing.assert_close(kd_term(0.0)[1], pure_syn)
    torch.testing.assert_close(kd_term(torch.tensor(0.0))[1], pure_syn)
    torch.testing.assert_close(kd_term(1.0)[1], kd_loss(logits_s, t_mean, T))
    mixed = 0.25 * kd_loss(logits_s, z_syn, T) + 0.75 * kd_loss(logits_s, t_mean, T)
    torch.testing.assert_close(kd_term(torch.tensor(0.75))[1], mixed)


# --------------------------------------------------------------------------- gradient flow


@pytest.mark.parametrize("term", ["synergy_ce", "adapt_kd", "ib_kl", "mbm_l2"])
def test_phase_a_gradient_reaches_bridge_and_teachers_only(term):
    bridge, feats, t_logits, query, logits_s, y = make_case("ib")
    _, _, terms = synergy_losses(
        bridge, bridge_params(bridge), query, feats, t_logits, logits_s, y, torch.tensor(2.0), phase="A"
    )
    terms[term].backward()
    assert sum(grad_or_zero(p).abs().sum() for p in bridge.parameters()) > 0
    if term != "mbm_l2":  # the L2 penalty does not depend on the teachers
        assert all(grad_or_zero(f).abs().sum() > 0 for f in feats), "teacher features must carry gradient in phase A"
    if term in ("synergy_ce", "adapt_kd"):  # the ensemble part: the teachers' heads learn from the task
        assert all(grad_or_zero(t).abs().sum() > 0 for t in t_logits), "teacher logits must carry gradient in phase A"
    assert query.grad is None and logits_s.grad is None  # the student is frozen in phase A


def test_phase_b_gradient_reaches_student_and_projections_only():
    bridge, feats, t_logits, query, logits_s, y = make_case("ib")
    bridge.eval()
    proj = nn.Linear(S_DIM, S_DIM)  # caller-owned feature-KD projection
    latent_proj = nn.Linear(S_DIM, S_DIM)
    student_feat = torch.randn(B, S_DIM)
    _, _, terms = synergy_losses(
        bridge, bridge_params(bridge), query, feats, t_logits, logits_s, y, torch.tensor(2.0),
        phase="B", hybrid_beta=0.5, feat_pred=proj(student_feat), latent_pred=latent_proj(student_feat),
    )  # fmt: skip
    weighted(terms, {"kd": 1.0, "feat_kd": 1.0, "latent": 1.0}).backward()
    assert logits_s.grad.abs().sum() > 0
    assert proj.weight.grad.abs().sum() > 0 and latent_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bridge.parameters()), "bridge is frozen in phase B"
    assert query.grad is None and all(f.grad is None for f in feats) and all(t.grad is None for t in t_logits)


@pytest.mark.parametrize("term", ["kd", "feat_kd"])
def test_each_phase_b_term_has_gradient(term):
    bridge, feats, t_logits, query, logits_s, y = make_case()
    proj = nn.Linear(S_DIM, S_DIM)
    _, _, terms = synergy_losses(
        bridge,
        bridge_params(bridge),
        query,
        feats,
        t_logits,
        logits_s,
        y,
        torch.tensor(2.0),
        phase="B",
        feat_pred=proj(query),
    )
    terms[term].backward()
    moved = logits_s if term == "kd" else proj.weight
    assert moved.grad is not None and moved.grad.abs().sum() > 0


def test_config_errors():
    bridge, feats, t_logits, query, logits_s, y = make_case()
    args = (bridge, bridge_params(bridge), query, feats, t_logits, logits_s, y, torch.tensor(1.0))
    with pytest.raises(ConfigError, match="unknown synergy phase"):
        synergy_losses(*args, phase="C")
    with pytest.raises(ConfigError, match="needs an ib bridge"):
        synergy_losses(*args, phase="B", latent_pred=torch.randn(B, S_DIM))
    with pytest.raises(ConfigError, match="unknown feat_kd_norm"):
        synergy_losses(*args, phase="B", feat_kd_norm="cos")
    with pytest.raises(ValueError, match="2 teacher features but 1 teacher logits"):
        synergy_losses(
            bridge, bridge_params(bridge), query, feats, t_logits[:1], logits_s, y, torch.tensor(1.0), phase="A"
        )


# --------------------------------------------------------------------------- torch.compile


def _run_steps(fn, phase: str, steps: int = 3):
    """Run `steps` optimisation-free steps with changing weights and temperature; return the
    values and gradients of each step (fresh leaves per step so both runs see identical inputs)."""
    results = []
    for step in range(steps):
        bridge, feats, t_logits, query, logits_s, y = make_case(seed=0)
        T = torch.tensor(1.0 + step)
        if phase == "A":
            params = bridge_params(bridge)
            w = {"synergy_ce": 1.0, "adapt_kd": 0.5 * step, "mbm_l2": 1e-3 * (step + 1)}
            z_syn, h, terms = fn(bridge, params, query, feats, t_logits, logits_s, y, T, phase="A")
            leaves = [*bridge.parameters(), *feats, *t_logits]
        else:
            proj = nn.Linear(S_DIM, S_DIM)
            w = {"kd": 1.0 + step, "feat_kd": 0.1 * step}
            z_syn, h, terms = fn(
                bridge, bridge_params(bridge), query, feats, t_logits, logits_s, y, T,
                phase="B", hybrid_beta=torch.tensor(0.2 * step), feat_pred=proj(query.detach()),
            )  # fmt: skip
            leaves = [logits_s, proj.weight, proj.bias]
        grads = torch.autograd.grad(weighted(terms, w), leaves)
        results.append(([z_syn.detach(), h.detach(), *(v.detach() for v in terms.values())], grads))
    return results


@skip_compile
@pytest.mark.parametrize("phase", ["A", "B"])
def test_compiled_matches_eager_and_compiles_once(phase):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _run_steps(synergy_losses, phase)
    compiled_fn = compile_synergy(synergy_losses, enabled=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = _run_steps(compiled_fn, phase)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for (ev, eg), (cv, cg) in zip(eager, compiled):
        for e, c in zip(ev, cv):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
        for e, c in zip(eg, cg):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    assert compile_synergy(synergy_losses, enabled=False) is synergy_losses


@skip_compile
def test_functional_call_grad_vmap_trace_as_one_graph():
    """An ensemble of bridges: vmap(grad(phase-A total w.r.t. params)) over stacked parameters,
    traced by dynamo as one graph (fullgraph=True; aot_eager backend to keep CPU time low)."""
    torch._dynamo.reset()
    bridges = [make_case(seed=s)[0].eval() for s in (0, 1)]
    _, feats, t_logits, query, logits_s, y = make_case()
    feats = [f.detach() for f in feats]
    t_logits = [t.detach() for t in t_logits]
    stacked, _ = torch.func.stack_module_state(bridges)
    w = {"synergy_ce": 1.0, "adapt_kd": 1.0, "mbm_l2": 1e-2}
    base = bridges[0]

    def total(params, T):
        return weighted(synergy_losses(base, params, query, feats, t_logits, logits_s, y, T, phase="A")[2], w)

    ensemble_grads = torch.func.vmap(torch.func.grad(total), in_dims=(0, None))
    compiled = torch.compile(ensemble_grads, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled(stacked, torch.tensor(2.0))
        compiled(stacked, torch.tensor(3.0))  # new temperature: no recompile
    for i, bridge in enumerate(bridges):
        params = dict(bridge.named_parameters())
        expected = torch.autograd.grad(total(params, torch.tensor(2.0)), list(params.values()))
        for name, e in zip(params, expected):
            torch.testing.assert_close(got[name][i], e, rtol=1e-5, atol=1e-6)
