"""Manifold Bridging Modules: shapes, attention, learnable query, IB formula and noise, the synergy bridge
(ensemble + zero-initialised residual, feature normalisation), config errors."""

from __future__ import annotations

import pytest
import torch

from kd.errors import ConfigError
from kd.mbm import AttnMBM, IBMBM, MBMOutput, MLPMBM, SynergyBridge, build_bridge, ib_kl

T_DIMS = (12, 10)
S_DIM = 16
C = 5
B = 4


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, d, generator=g) for d in T_DIMS]
    return torch.randn(B, S_DIM, generator=g), feats


def _logits(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(B, C, generator=g) for _ in T_DIMS]


@pytest.mark.parametrize(
    "kind,kwargs,h_dim",
    [
        ("attn", {}, S_DIM),
        ("attn", {"out_dim": 8, "n_head": 2, "learnable_query": True}, 8),
        ("mlp", {"hidden": 32}, S_DIM),
        ("ib", {"z_dim": 6}, 6),
        ("ib", {"out_dim": 8, "z_dim": 6}, 6),
        ("ib", {"ib_fusion": "concat"}, S_DIM),
        ("attn", {"feat_norm": "layer"}, S_DIM),
    ],
)
def test_bridge_shapes(kind, kwargs, h_dim):
    torch.manual_seed(0)
    bridge = build_bridge(kind, T_DIMS, S_DIM, C, **kwargs)
    assert isinstance(bridge, SynergyBridge)
    query, feats = _inputs()
    z_syn, out = bridge(query, feats, _logits())
    assert isinstance(out, MBMOutput)
    assert z_syn.shape == (B, C)
    assert out.h.shape == (B, h_dim)
    if kind == "ib":
        assert out.mu.shape == out.logvar.shape == (B, h_dim)
    else:
        assert out.mu is None and out.logvar is None
    has_attn = kind == "attn" or (kind == "ib" and kwargs.get("ib_fusion", "attn") == "attn")
    assert (out.attn is not None) == has_attn


@pytest.mark.parametrize("n_head", [1, 2])
def test_attention_weights_sum_to_one_over_teachers(n_head):
    torch.manual_seed(0)
    mbm = AttnMBM(T_DIMS, S_DIM, out_dim=16, r=4, n_head=n_head, dropout=0.5).train()
    query, feats = _inputs()
    out = mbm(query, feats)
    assert out.attn.shape == (B, n_head, len(T_DIMS))
    assert torch.all(out.attn >= 0)
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(B, n_head))


def test_three_teachers_give_three_tokens():
    mbm = AttnMBM((3, 4, 5), S_DIM, out_dim=8, r=2)
    feats = [torch.randn(B, d) for d in (3, 4, 5)]
    assert mbm(torch.randn(B, S_DIM), feats).attn.shape == (B, 1, 3)


def test_attention_matches_hand_computation():
    """One head: h = W_o (sum_i softmax_i(q.k_i / sqrt(E)) v_i) + b_o."""
    torch.manual_seed(0)
    mbm = AttnMBM(T_DIMS, S_DIM, out_dim=8, r=2).eval()
    query, feats = _inputs()
    q = mbm.q_proj(query)
    ks, vs = zip(*(proj(f).chunk(2, dim=1) for proj, f in zip(mbm.kv_projs, feats)))
    scores = torch.stack([(q * k).sum(1) for k in ks], dim=1) / 4**0.5
    w = scores.softmax(1)
    expected = mbm.out_proj(sum(w[:, i : i + 1] * vs[i] for i in range(2)))
    out = mbm(query, feats)
    torch.testing.assert_close(out.h, expected)
    torch.testing.assert_close(out.attn[:, 0], w)


def test_learnable_query_ignores_the_student_and_student_query_does_not():
    torch.manual_seed(0)
    query, feats = _inputs()
    other = query + 1.0
    learnable = AttnMBM(T_DIMS, S_DIM, out_dim=8, learnable_query=True, r=2).eval()
    torch.testing.assert_close(learnable(query, feats).h, learnable(other, feats).h, rtol=0, atol=0)
    assert learnable(None, feats).h.shape == (B, 8)
    student_q = AttnMBM(T_DIMS, S_DIM, out_dim=8, r=2).eval()
    assert not torch.allclose(student_q(query, feats).h, student_q(other, feats).h)


def test_mlp_ignores_query():
    torch.manual_seed(0)
    mbm = MLPMBM(T_DIMS, out_dim=8, hidden=16).eval()
    query, feats = _inputs()
    torch.testing.assert_close(mbm(query, feats).h, mbm(None, feats).h, rtol=0, atol=0)


def test_ib_kl_matches_hand_computation():
    mu = torch.tensor([[0.5, -1.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, 1.0], [-2.0, 0.5]])
    expected = []
    for m_row, lv_row in zip(mu.tolist(), logvar.tolist()):
        total = 0.0
        for m, lv in zip(m_row, lv_row):
            # KL(N(m, s^2) || N(0, 1)) = 1/2 (s^2 + m^2 - 1 - log s^2)
            total += 0.5 * (torch.tensor(lv).exp().item() + m * m - 1 - lv)
        expected.append(total)
    torch.testing.assert_close(ib_kl(mu, logvar), torch.tensor(expected))
    assert ib_kl(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max() == 0


def test_ib_eval_is_deterministic_and_train_is_stochastic_but_seeded():
    torch.manual_seed(0)
    mbm = IBMBM(T_DIMS, S_DIM, z_dim=6)
    query, feats = _inputs()
    mbm.eval()
    a, b = mbm(query, feats), mbm(query, feats)
    torch.testing.assert_close(a.h, b.h, rtol=0, atol=0)
    torch.testing.assert_close(a.h, a.mu, rtol=0, atol=0)
    mbm.train()
    torch.manual_seed(1)
    n1 = mbm(query, feats).h
    n2 = mbm(query, feats).h
    torch.manual_seed(1)
    n1_again = mbm(query, feats).h
    assert not torch.allclose(n1, n2)
    torch.testing.assert_close(n1, n1_again, rtol=0, atol=0)
    # The noise has the posterior's scale: z - mu = eps * exp(logvar / 2).
    out = mbm(query, feats)
    eps = (out.h - out.mu) / (0.5 * out.logvar).exp()
    assert 0.3 < eps.std().item() < 3.0


def test_ib_logvar_is_clamped():
    torch.manual_seed(0)
    mbm = IBMBM(T_DIMS, S_DIM, z_dim=6, fusion="concat", logvar_clamp=0.1).eval()
    with torch.no_grad():
        mbm.to_stats.weight.mul_(100)
    out = mbm(None, [f * 100 for f in _inputs()[1]])
    assert out.logvar.abs().max().item() <= 0.1 + 1e-6
    assert out.logvar.abs().max().item() == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["attn", "mlp", "ib"])
def test_fresh_bridge_gives_the_teachers_mean_logits(kind):
    torch.manual_seed(0)
    bridge = build_bridge(kind, T_DIMS, S_DIM, C).eval()
    query, feats = _inputs()
    logits = _logits()
    z_syn, _ = bridge(query, feats, logits)
    torch.testing.assert_close(z_syn, (logits[0] + logits[1]) / 2, rtol=0, atol=0)
    torch.nn.init.normal_(bridge.head.net[-1].weight)  # a trained residual moves it
    assert not torch.allclose(bridge(query, feats, logits)[0], z_syn)


def test_ib_out_dim_is_the_fusion_width_and_z_dim_the_latent():
    bridge = build_bridge("ib", T_DIMS, S_DIM, C, out_dim=8, z_dim=6)
    assert bridge.mbm.fuse.out_dim == 8 and bridge.mbm.out_dim == 6
    assert bridge.mbm.to_stats.in_features == 8 and bridge.mbm.to_stats.out_features == 12
    assert bridge.head.net[0].in_features == 6


def test_layer_feat_norm_puts_teachers_on_one_scale():
    torch.manual_seed(0)
    bridge = build_bridge("attn", T_DIMS, S_DIM, C, feat_norm="layer").eval()
    query, feats = _inputs()
    logits = _logits()
    h = bridge(query, feats, logits)[1].h
    h_scaled = bridge(query, [feats[0] * 4, feats[1] * 0.5 + 3], logits)[1].h  # per-sample affine changes vanish
    torch.testing.assert_close(h, h_scaled, rtol=1e-4, atol=1e-4)


def test_build_bridge_defaults_to_student_dim():
    bridge = build_bridge("attn", (2048, 1408), 768, 100)
    assert bridge.mbm.out_dim == 768 and bridge.mbm.width == 192 and bridge.mbm.query_dim == 768
    assert bridge.head.net[-1].out_features == 100


def test_config_errors():
    with pytest.raises(ConfigError, match="mbm query dim 512 != student feature dim 768"):
        build_bridge("attn", (2048, 1408), 768, 100, query_dim=512)
    with pytest.raises(ConfigError, match="n_head 5 must divide"):
        build_bridge("attn", (8, 8), 16, 3, n_head=5)
    with pytest.raises(ConfigError, match="unknown mbm kind"):
        build_bridge("transformer", (8, 8), 16, 3)
    with pytest.raises(ConfigError, match="unknown ib fusion"):
        build_bridge("ib", (8, 8), 16, 3, ib_fusion="sum")
    with pytest.raises(ConfigError, match="z_dim 4 only applies to the ib kind"):
        build_bridge("attn", (8, 8), 16, 3, z_dim=4)
    with pytest.raises(ConfigError, match="out_dim 8 has no effect with ib fusion concat"):
        build_bridge("ib", (8, 8), 16, 3, ib_fusion="concat", out_dim=8)
    with pytest.raises(ConfigError, match="unknown mbm feature norm"):
        build_bridge("attn", (8, 8), 16, 3, feat_norm="batch")
    build_bridge("attn", (8, 8), 16, 3, query_dim=16)  # equal to the student's dim: fine


def test_forward_shape_errors_are_readable():
    bridge = build_bridge("attn", T_DIMS, S_DIM, C)
    query, feats = _inputs()
    logits = _logits()
    with pytest.raises(ValueError, match="expects 2 teacher features, got 1"):
        bridge(query, feats[:1], logits[:1])
    with pytest.raises(ValueError, match=r"teacher 2 feature must be \[B, 10\], got \[4, 11\]"):
        bridge(query, [feats[0], torch.randn(B, 11)], logits)
    with pytest.raises(ValueError, match=r"query must be \[B=4, 16\]"):
        bridge(torch.randn(B, 7), feats, logits)
    with pytest.raises(ValueError, match="2 teacher features but 1 teacher logits"):
        bridge(query, feats, logits[:1])
    with pytest.raises(ValueError, match="expects 2 teacher features"):
        build_bridge("mlp", T_DIMS, S_DIM, C)(None, feats + feats, logits + logits)
