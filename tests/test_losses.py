"""Numerical tests for kd.losses: hand-worked cases, independent naive-loop references,
invariants, the DKD <-> KD identity and float64 gradchecks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from kd import losses as L
from kd.losses import (
    at_loss,
    confidence_weights,
    dist_loss,
    entropy_weights,
    kd_loss,
    kd_loss_per_sample,
    pkt_loss,
    rkd_loss,
    sp_loss,
    weighted_teacher_mean,
)

DTYPES = [torch.float32, torch.float64]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float64, seed=0, scale=1.0):
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64).mul(scale).to(dtype)


def close(actual: torch.Tensor, expected: float | torch.Tensor, dtype=torch.float64) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype])


# ----------------------------------------------------------------- naive references (python floats)


def softmax_list(z: list[float], t: float = 1.0) -> list[float]:
    m = max(v / t for v in z)
    e = [math.exp(v / t - m) for v in z]
    return [v / sum(e) for v in e]


def kl_list(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def naive_kd(s: list[list[float]], t: list[list[float]], temp: float) -> float:
    return temp**2 * sum(kl_list(softmax_list(tb, temp), softmax_list(sb, temp)) for sb, tb in zip(s, t)) / len(s)


def naive_dkd_parts(sb: list[float], tb: list[float], y: int, temp: float) -> tuple[float, float]:
    """(TCKD, NCKD) of one sample, without the T^2 factor."""
    ps, pt = softmax_list(sb, temp), softmax_list(tb, temp)
    bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
    others = [c for c in range(len(sb)) if c != y]
    hs = softmax_list([sb[c] for c in others], temp)
    ht = softmax_list([tb[c] for c in others], temp)
    return kl_list(bt, bs), kl_list(ht, hs)


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def pearson_list(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [v - ma for v in a], [v - mb for v in b]
    num = sum(x * y for x, y in zip(da, db))
    return num / (math.sqrt(sum(x * x for x in da)) * math.sqrt(sum(y * y for y in db)) + eps)


# ----------------------------------------------------------------- logits: KD


def test_kd_hand_case():
    # p_t = softmax([0, ln 3]) = [1/4, 3/4], p_s = [1/2, 1/2]
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, math.log(3)]], dtype=torch.float64)
    close(L.kd_loss(s, t, 1.0), 0.25 * math.log(0.5) + 0.75 * math.log(1.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kd_matches_naive(dtype):
    s = [[1.0, -0.5, 2.0], [0.3, 0.1, -1.2]]
    t = [[2.0, 0.5, -1.0], [-0.7, 1.4, 0.2]]
    for temp in (1.0, 4.0):
        got = L.kd_loss(torch.tensor(s, dtype=dtype), torch.tensor(t, dtype=dtype), temp)
        assert got.dtype == dtype and got.dim() == 0
        close(got, naive_kd(s, t, temp), dtype)


def test_kd_temperature_squared_scaling():
    s, t = randn(4, 5, seed=1), randn(4, 5, seed=2)
    for temp in (2.0, 4.0):
        # logits scaled by T give the same distributions, so only the T^2 factor remains
        close(L.kd_loss(s * temp, t * temp, temp), temp**2 * L.kd_loss(s, t, 1.0))
    close(L.kd_loss(s, t, torch.tensor(4.0, dtype=torch.float64)), L.kd_loss(s, t, 4.0))


# ----------------------------------------------------------------- logits: DKD


def test_dkd_hand_case():
    # p_t = [1/2, 1/8, 3/8] (target 0), student uniform over 3 classes.
    s = torch.zeros(1, 3, dtype=torch.float64)
    t = torch.tensor([[math.log(4), 0.0, math.log(3)]], dtype=torch.float64)
    y = torch.tensor([0])
    tckd = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    nckd = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    close(L.dkd_loss(s, t, y, 1.0, 0.0, 1.0), tckd)
    close(L.dkd_loss(s, t, y, 0.0, 1.0, 1.0), nckd)
    close(L.dkd_loss(s, t, y, 2.0, 3.0, 1.0), 2 * tckd + 3 * nckd)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dkd_matches_naive(dtype):
    s = [[1.0, -0.5, 2.0, 0.1], [0.3, 0.1, -1.2, 0.8], [2.5, -1.0, 0.0, 0.4]]
    t = [[2.0, 0.5, -1.0, 0.3], [-0.7, 1.4, 0.2, 0.0], [0.1, 0.2, 3.0, -2.0]]
    y = [2, 0, 3]
    alpha, beta, temp = 1.5, 8.0, 4.0
    expected = 0.0
    for sb, tb, yb in zip(s, t, y):
        tckd, nckd = naive_dkd_parts(sb, tb, yb, temp)
        expected += temp**2 * (alpha * tckd + beta * nckd) / len(s)
    got = L.dkd_loss(torch.tensor(s, dtype=dtype), torch.tensor(t, dtype=dtype), torch.tensor(y), alpha, beta, temp)
    assert got.dtype == dtype and got.dim() == 0
    close(got, expected, dtype)


def mask_form_dkd(s, t, y, alpha, beta, temp):
    """DKD in the reference's form: summed softmax probabilities, log, and the -1000 target mask."""
    gt = F.one_hot(y, s.shape[1]).to(s.dtype)
    ps, pt = F.softmax(s / temp, dim=1), F.softmax(t / temp, dim=1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], dim=1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * temp**2 / s.shape[0]
    ls2 = F.log_softmax(s / temp - 1000.0 * gt, dim=1)
    pt2 = F.softmax(t / temp - 1000.0 * gt, dim=1)
    nckd = F.kl_div(ls2, pt2, reduction="sum") * temp**2 / s.shape[0]
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dkd_equals_mask_form_in_float64_with_gradients(temp):
    s = randn(6, 10, seed=3, scale=3.0).requires_grad_()
    t = randn(6, 10, seed=4, scale=3.0).requires_grad_()
    y = torch.tensor([0, 3, 9, 3, 5, 1])
    ours = L.dkd_loss(s, t, y, 1.0, 8.0, temp)
    ref = mask_form_dkd(s, t, y, 1.0, 8.0, temp)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-13)
    g_ours = torch.autograd.grad(ours, (s, t))
    g_ref = torch.autograd.grad(ref, (s, t))
    torch.testing.assert_close(g_ours[0], g_ref[0], rtol=1e-10, atol=1e-13)
    # Teacher gradient: the mask form's softmax has exact zeros whose kl_div target-gradient is
    # log(0) = -inf, so it is NaN there (the reference runs the teacher under no_grad). Ours is
    # finite; gradcheck below confirms it is correct.
    assert torch.isfinite(g_ours[1]).all()


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dkd_reproduces_kd_with_beta_one_minus_teacher_target_prob(temp):
    # Per sample: KL(p_t||p_s) = KL(b_t||b_s) + (1 - p_t[y]) KL(p^_t||p^_s), because for c != y
    # p_c = (1 - p_y) p^_c, so the non-target part of the KL splits into the binary term plus the
    # (1 - p_t[y])-weighted KL of the renormalised non-target distributions.
    s, t = randn(5, 7, seed=5, scale=2.0), randn(5, 7, seed=6, scale=2.0)
    y = torch.tensor([0, 6, 2, 2, 4])
    beta = 1 - F.softmax(t / temp, dim=1).gather(1, y[:, None]).squeeze(1)
    for b in range(5):  # one sample at a time, scalar beta
        close(
            L.dkd_loss(s[b : b + 1], t[b : b + 1], y[b : b + 1], 1.0, float(beta[b]), temp),
            L.kd_loss(s[b : b + 1], t[b : b + 1], temp),
        )
    close(L.dkd_loss(s, t, y, 1.0, beta, temp), L.kd_loss(s, t, temp))  # [B] per-sample beta


def test_dkd_is_finite_for_extreme_teacher():
    s = randn(2, 5, seed=7)
    t = torch.tensor([[200.0, 0, 0, 0, 0], [0, 0, 0, 0, 300.0]], dtype=torch.float64)
    y = torch.tensor([0, 4])
    s.requires_grad_()
    loss = L.dkd_loss(s, t, y, 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ----------------------------------------------------------------- logits: DIST, standardisation


@pytest.mark.parametrize("dtype", DTYPES)
def test_dist_matches_naive(dtype):
    s = [[1.0, -0.5, 2.0, 0.1], [0.3, 0.1, -1.2, 0.8], [2.5, -1.0, 0.0, 0.4]]
    t = [[2.0, 0.5, -1.0, 0.3], [-0.7, 1.4, 0.2, 0.0], [0.1, 0.2, 3.0, -2.0]]
    beta, gamma, temp = 2.0, 0.5, 4.0
    ys = [softmax_list(r, temp) for r in s]
    yt = [softmax_list(r, temp) for r in t]
    inter = 1 - sum(pearson_list(a, b) for a, b in zip(ys, yt)) / 3
    cols = lambda m: [[row[c] for row in m] for c in range(4)]  # noqa: E731
    intra = 1 - sum(pearson_list(a, b) for a, b in zip(cols(ys), cols(yt))) / 4
    expected = temp**2 * (beta * inter + gamma * intra)
    got = L.dist_loss(torch.tensor(s, dtype=dtype), torch.tensor(t, dtype=dtype), beta, gamma, temp)
    assert got.dtype == dtype and got.dim() == 0
    close(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_standardize_logits_matches_naive_unbiased_std(dtype):
    z = [[1.0, 2.0, 4.0], [-3.0, 0.0, 0.5]]
    got = L.standardize_logits(torch.tensor(z, dtype=dtype))
    expected = []
    for row in z:
        mean = sum(row) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / 2)  # unbiased: divisor C-1
        expected.append([(v - mean) / (std + 1e-7) for v in row])
    close(got, torch.tensor(expected, dtype=torch.float64), dtype)
    # row 0 by hand: mean 7/3, unbiased var = (16/9 + 1/9 + 25/9) / 2 = 7/3
    close(got[0, 0], (1 - 7 / 3) / (math.sqrt(7 / 3) + 1e-7), dtype)


def test_standardized_kd_is_invariant_to_logit_shift_and_scale():
    s, t = randn(3, 6, seed=8), randn(3, 6, seed=9)
    base = L.kd_loss(L.standardize_logits(s), L.standardize_logits(t), 2.0)
    moved = L.kd_loss(L.standardize_logits(5 * s + 3), L.standardize_logits(0.5 * t - 1), 2.0)
    torch.testing.assert_close(base, moved, rtol=1e-6, atol=1e-9)  # eps breaks exactness slightly


# ----------------------------------------------------------------- cross-entropy


def test_soft_target_cross_entropy_equals_index_for_one_hot():
    logits = randn(4, 5, seed=10)
    y = torch.tensor([1, 0, 4, 4])
    close(L.cross_entropy(logits, F.one_hot(y, 5).double()), L.cross_entropy(logits, y))
    naive = -sum(math.log(softmax_list(logits[b].tolist())[int(y[b])]) for b in range(4)) / 4
    close(L.cross_entropy(logits, y), naive)


# ----------------------------------------------------------------- features: hint, AT, SP


@pytest.mark.parametrize("dtype", DTYPES)
def test_hint_hand_case(dtype):
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype)
    b = torch.tensor([[0.0, 2.0], [5.0, 4.5]], dtype=dtype)
    close(L.hint_loss(a, b), (1 + 0 + 4 + 0.25) / 4, dtype)
    with pytest.raises(ValueError):
        L.hint_loss(a, b[:1])


def test_at_hand_case():
    # B=1, C=1: attention = f^2 flattened, L2-normalised.
    fs = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    ft = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    a_s = [v / math.sqrt(1 + 16 + 81 + 256) for v in (1, 4, 9, 16)]
    expected = sum((v - 0.5) ** 2 for v in a_s) / 4
    close(L.at_loss([fs], [ft]), expected)
    close(L.at_loss([fs, fs], [ft, ft]), 2 * expected)  # stages are summed


def naive_at_stage(fs: torch.Tensor, ft: torch.Tensor, p: float = 2) -> float:
    def amap(f):
        b, c, h, w = f.shape
        rows = []
        for i in range(b):
            vals = [sum(float(f[i, k, y, x]) ** p for k in range(c)) / c for y in range(h) for x in range(w)]
            n = math.sqrt(sum(v * v for v in vals))
            rows.append([v / n for v in vals])
        return rows

    a_s, a_t = amap(fs), amap(ft)
    diffs = [(u - v) ** 2 for rs, rt in zip(a_s, a_t) for u, v in zip(rs, rt)]
    return sum(diffs) / len(diffs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_at_matches_naive_with_pooling(dtype):
    fs1, ft1 = randn(2, 3, 4, 4, seed=11, dtype=dtype), randn(2, 5, 2, 2, seed=12, dtype=dtype)  # student pooled
    fs2, ft2 = randn(2, 2, 2, 2, seed=13, dtype=dtype), randn(2, 4, 4, 4, seed=14, dtype=dtype)  # teacher pooled
    pool = lambda f: f.reshape(*f.shape[:2], 2, 2, 2, 2).mean(dim=(3, 5))  # 4x4 -> 2x2 block means  # noqa: E731
    expected = naive_at_stage(pool(fs1), ft1) + naive_at_stage(fs2, pool(ft2))
    got = L.at_loss([fs1, fs2], [ft1, ft2])
    assert got.dtype == dtype and got.dim() == 0
    close(got, expected, dtype)


def test_at_and_sp_reject_length_mismatch():
    f = randn(2, 3, 4, 4)
    with pytest.raises(ValueError):
        L.at_loss([f, f], [f])
    with pytest.raises(ValueError):
        L.sp_loss([f], [f, f])
    with pytest.raises(ValueError):
        L.at_loss([], [])


def naive_sp_pair(fs: torch.Tensor, ft: torch.Tensor) -> float:
    b = fs.shape[0]

    def gram(f):
        f = f.reshape(b, -1).tolist()
        g = [[sum(x * y for x, y in zip(f[i], f[j])) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = gram(fs), gram(ft)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sp_matches_naive(dtype):
    fs = [randn(3, 2, 2, 2, seed=15, dtype=dtype), randn(3, 6, seed=16, dtype=dtype)]
    ft = [randn(3, 4, 2, 2, seed=17, dtype=dtype), randn(3, 5, seed=18, dtype=dtype)]
    expected = sum(naive_sp_pair(a, b) for a, b in zip(fs, ft))
    got = L.sp_loss(fs, ft)
    assert got.dtype == dtype and got.dim() == 0
    close(got, expected, dtype)


# ----------------------------------------------------------------- features: RKD, PKT


def naive_rkd(s: torch.Tensor, t: torch.Tensor, wd: float, wa: float) -> float:
    b = s.shape[0]
    xs, xt = s.reshape(b, -1).tolist(), t.reshape(b, -1).tolist()

    def dist(x):
        d = [[math.dist(x[i], x[j]) if i != j else 0.0 for j in range(b)] for i in range(b)]
        pos = [v for row in d for v in row if v > 0]
        m = sum(pos) / len(pos)
        return [[v / m for v in row] for row in d]

    def cos(x, a, i, k):
        if i == a or k == a:
            return 0.0
        u = [p - q for p, q in zip(x[i], x[a])]
        v = [p - q for p, q in zip(x[k], x[a])]
        return sum(p * q for p, q in zip(u, v)) / (math.hypot(*u) * math.hypot(*v))

    ds, dt = dist(xs), dist(xt)
    loss_d = sum(smooth_l1(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b**2
    loss_a = (
        sum(smooth_l1(cos(xs, a, i, k) - cos(xt, a, i, k)) for a in range(b) for i in range(b) for k in range(b)) / b**3
    )
    return wd * loss_d + wa * loss_a


@pytest.mark.parametrize("dtype", DTYPES)
def test_rkd_matches_naive(dtype):
    s, t = randn(4, 3, seed=19, dtype=dtype), randn(4, 2, 2, seed=20, dtype=dtype, scale=3.0)
    got = L.rkd_loss(s, t, 25.0, 50.0)
    assert got.dtype == dtype and got.dim() == 0
    close(got, naive_rkd(s, t, 25.0, 50.0), dtype)
    close(L.rkd_loss(s, t, 1.0, 0.0), naive_rkd(s, t, 1.0, 0.0), dtype)


def test_rkd_teacher_gets_no_gradient_and_batch_of_one_is_rejected():
    s, t = randn(4, 3, seed=21).requires_grad_(), randn(4, 3, seed=22).requires_grad_()
    L.rkd_loss(s, t).backward()
    assert t.grad is None and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError):
        L.rkd_loss(s[:1], t[:1])


def naive_pkt(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> float:
    b = s.shape[0]

    def probs(x):
        x = x.reshape(b, -1).tolist()
        x = [[v / (math.sqrt(sum(w * w for w in row)) + eps) for v in row] for row in x]
        sim = [[(sum(p * q for p, q in zip(x[i], x[j])) + 1) / 2 for j in range(b)] for i in range(b)]
        return [[v / sum(row) for v in row] for row in sim]

    ps, pt = probs(s), probs(t)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)) / b**2


@pytest.mark.parametrize("dtype", DTYPES)
def test_pkt_matches_naive(dtype):
    s, t = randn(5, 4, seed=23, dtype=dtype), randn(5, 2, 3, seed=24, dtype=dtype)
    got = L.pkt_loss(s, t)
    assert got.dtype == dtype and got.dim() == 0
    close(got, naive_pkt(s, t), dtype)


# ----------------------------------------------------------------- CRD


def naive_crd_nce(scores: list[list[float]], n_data: int) -> float:
    eps, k = 1e-7, len(scores[0]) - 1
    pn = 1.0 / n_data
    total = 0.0
    for row in scores:
        total += math.log(row[0] / (row[0] + k * pn + eps))
        for v in row[1:]:
            total += math.log((k * pn) / (v + k * pn + eps))
    return -total / len(scores)


@pytest.mark.parametrize("dtype", DTYPES)
def test_crd_nce_matches_naive(dtype):
    scores = [[0.9, 0.01, 0.2, 0.05], [0.3, 0.7, 0.001, 0.02]]
    got = L.crd_nce_loss(torch.tensor(scores, dtype=dtype), n_data=10)
    assert got.dtype == dtype and got.dim() == 0
    close(got, naive_crd_nce(scores, 10), dtype)
    close(
        L.crd_loss(torch.tensor(scores, dtype=dtype), torch.tensor(scores[::-1], dtype=dtype), 10),
        2 * naive_crd_nce(scores, 10),
        dtype,
    )


def test_crd_contrast_pairs_student_with_teacher_memory_and_estimates_z():
    n, d, b, k, temp = 12, 4, 3, 5, 0.07
    mem_s, mem_t = L.crd_init_memory(n, d, generator=gen(1)), L.crd_init_memory(n, d, generator=gen(2))
    assert mem_s.abs().max() <= 1 / math.sqrt(d / 3)
    e_s = F.normalize(torch.randn(b, d, generator=gen(3)), dim=1)
    e_t = F.normalize(torch.randn(b, d, generator=gen(4)), dim=1)
    idx = torch.randint(0, n, (b, k + 1), generator=gen(5))
    sc_s, sc_t, z_s, z_t = L.crd_contrast(e_s, e_t, mem_s, mem_t, idx, temp)
    raw_s = [[math.exp(float(mem_t[idx[i, j]] @ e_s[i]) / temp) for j in range(k + 1)] for i in range(b)]
    raw_t = [[math.exp(float(mem_s[idx[i, j]] @ e_t[i]) / temp) for j in range(k + 1)] for i in range(b)]
    zs_ref = sum(map(sum, raw_s)) / (b * (k + 1)) * n
    zt_ref = sum(map(sum, raw_t)) / (b * (k + 1)) * n
    torch.testing.assert_close(z_s.double(), torch.tensor(zs_ref, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(z_t.double(), torch.tensor(zt_ref, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(sc_s, torch.tensor(raw_s) / zs_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(sc_t, torch.tensor(raw_t) / zt_ref, rtol=1e-5, atol=0)
    # a given z is kept, not re-estimated
    sc_s2, _, z_s2, _ = L.crd_contrast(e_s, e_t, mem_s, mem_t, idx, temp, z_s=2.5, z_t=z_t)
    assert float(z_s2) == 2.5
    torch.testing.assert_close(sc_s2, torch.tensor(raw_s) / 2.5, rtol=1e-5, atol=0)


def test_crd_update_memory_momentum_and_unit_norm():
    n, d = 10, 6
    mem = L.crd_init_memory(n, d, generator=gen(6), dtype=torch.float64)
    embed = F.normalize(randn(3, d, seed=7), dim=1)
    idx = torch.tensor([7, 2, 4])
    new = L.crd_update_memory(mem, embed, idx, 0.5)
    torch.testing.assert_close(new[idx].norm(dim=1), torch.ones(3, dtype=torch.float64))
    expected = F.normalize(0.5 * mem[idx] + 0.5 * embed, dim=1)
    torch.testing.assert_close(new[idx], expected)
    untouched = torch.tensor([i for i in range(n) if i not in (7, 2, 4)])
    assert torch.equal(new[untouched], mem[untouched])
    assert not torch.equal(mem[idx], new[idx])  # input left unchanged (out of place)
    again = L.crd_update_memory(new, embed, idx, 0.9)
    torch.testing.assert_close(again[idx].norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_crd_negatives_are_from_other_classes():
    labels = torch.arange(200) % 10
    sample_idx = torch.tensor([0, 13, 57, 199, 100])
    out = L.crd_sample_negatives(labels, sample_idx, 50, gen(8))
    assert out.shape == (5, 51) and out.dtype == torch.int64
    assert torch.equal(out[:, 0], sample_idx)
    assert (labels[out[:, 1:]] != labels[sample_idx][:, None]).all()
    assert all(len(set(row.tolist())) == 50 for row in out[:, 1:])  # without replacement when possible
    torch.testing.assert_close(L.crd_sample_negatives(labels, sample_idx, 50, gen(8)), out)  # deterministic
    # k above the number of negatives (180): falls back to drawing with replacement
    many = L.crd_sample_negatives(labels, sample_idx, 300, gen(9))
    assert many.shape == (5, 301) and (labels[many[:, 1:]] != labels[sample_idx][:, None]).all()


# ----------------------------------------------------------------- invariants


def feature_pair(seed: int):
    return randn(4, 3, 4, 4, seed=seed), randn(4, 3, 4, 4, seed=seed + 1)


def test_zero_when_student_equals_teacher():
    z = randn(4, 6, seed=30, scale=3.0)
    y = torch.tensor([0, 5, 2, 2])
    f, _ = feature_pair(31)
    v = randn(4, 8, seed=33)
    zero = torch.zeros((), dtype=torch.float64)
    for value in (
        L.kd_loss(z, z, 4.0),
        L.dkd_loss(z, z, y, 1.0, 8.0, 4.0),
        L.at_loss([f], [f]),
        L.hint_loss(f, f),
        L.rkd_loss(v, v),
        L.pkt_loss(v, v),
        L.sp_loss([f], [f]),
    ):
        torch.testing.assert_close(value, zero, rtol=0, atol=1e-12)
    # DIST: pearson(a, a) = |a~|^2 / (|a~|^2 + eps) with a~ centred, so the loss is the mean of
    # eps / (|a~|^2 + eps) over rows plus over columns: tiny, not exactly 0.
    y_soft = F.softmax(z, dim=1)
    residual = lambda m: (1e-8 / ((m - m.mean(1, keepdim=True)).pow(2).sum(1) + 1e-8)).mean()  # noqa: E731
    close(L.dist_loss(z, z, 1.0, 1.0, 1.0), residual(y_soft) + residual(y_soft.t()))
    assert float(L.dist_loss(z, z, 1.0, 1.0, 1.0)) < 1e-2


def test_batch_mean_losses_are_batch_size_invariant():
    s, t = randn(3, 5, seed=40, scale=2.0), randn(3, 5, seed=41, scale=2.0)
    y = torch.tensor([4, 0, 2])
    fs, ft = feature_pair(42)
    dup = lambda x: torch.cat([x, x])  # noqa: E731
    pairs = [
        (L.kd_loss(s, t, 4.0), L.kd_loss(dup(s), dup(t), 4.0)),
        (L.dkd_loss(s, t, y, 1.0, 8.0, 4.0), L.dkd_loss(dup(s), dup(t), dup(y), 1.0, 8.0, 4.0)),
        (L.cross_entropy(s, y), L.cross_entropy(dup(s), dup(y))),
        (L.hint_loss(fs, ft), L.hint_loss(dup(fs), dup(ft))),
        (L.at_loss([fs], [ft]), L.at_loss([dup(fs)], [dup(ft)])),
        (L.crd_nce_loss(F.softmax(s, 1), 100), L.crd_nce_loss(dup(F.softmax(s, 1)), 100)),
    ]
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # DIST's intra term sees the duplicated columns; only its eps breaks exact invariance
    torch.testing.assert_close(
        L.dist_loss(s, t, 1.0, 1.0, 2.0), L.dist_loss(dup(s), dup(t), 1.0, 1.0, 2.0), rtol=1e-6, atol=1e-9
    )


# ----------------------------------------------------------------- gradients


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().requires_grad_()


def test_gradcheck_all_losses_float64():
    s, t = leaf(randn(3, 5, seed=50, scale=2.0)), leaf(randn(3, 5, seed=51, scale=2.0))
    y = torch.tensor([1, 4, 0])
    y_soft = F.softmax(randn(3, 5, seed=52), dim=1)
    f1s, f1t = leaf(randn(2, 3, 4, 4, seed=53)), leaf(randn(2, 2, 2, 2, seed=54))
    vs, vt = leaf(randn(4, 3, seed=55)), leaf(randn(4, 5, seed=56))
    checks = {
        "ce": (lambda a: L.cross_entropy(a, y, label_smoothing=0.1), (s,)),
        "ce_soft": (lambda a: L.cross_entropy(a, y_soft), (s,)),
        "kd": (lambda a, b: L.kd_loss(a, b, 3.0), (s, t)),
        "dkd": (lambda a, b: L.dkd_loss(a, b, y, 1.0, 8.0, 4.0), (s, t)),
        "dist": (lambda a, b: L.dist_loss(a, b, 1.0, 2.0, 4.0), (s, t)),
        "standardize": (lambda a: L.standardize_logits(a), (s,)),
        "hint": (L.hint_loss, (f1s, leaf(randn(2, 3, 4, 4, seed=57)))),
        "at": (lambda a, b: L.at_loss([a], [b]), (f1s, f1t)),
        "sp": (lambda a, b: L.sp_loss([a], [b]), (f1s, f1t)),
        "rkd": (lambda a: L.rkd_loss(a, vt), (vs,)),  # teacher side is no_grad by design
        "pkt": (L.pkt_loss, (vs, vt)),
        "crd_nce": (lambda a: L.crd_nce_loss(a, 50), (leaf(torch.rand(3, 6, generator=gen(58)) + 0.1),)),
    }
    for name, (fn, inputs) in checks.items():
        out = fn(*inputs)
        assert torch.isfinite(out).all(), name
        assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5), name

    n, d = 8, 4
    mem_s = L.crd_init_memory(n, d, generator=gen(59), dtype=torch.float64)
    mem_t = L.crd_init_memory(n, d, generator=gen(60), dtype=torch.float64)
    idx = torch.randint(0, n, (2, 4), generator=gen(61))
    e_s, e_t = leaf(randn(2, d, seed=62)), leaf(randn(2, d, seed=63))

    def crd(a, b):
        sc_s, sc_t, _, _ = L.crd_contrast(a, b, mem_s, mem_t, idx, 0.5, z_s=3.0, z_t=4.0)
        return L.crd_loss(sc_s, sc_t, n)

    assert gradcheck(crd, (e_s, e_t), eps=1e-6, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- precision and RKD options
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_relation_losses_compute_in_float32_under_autocast(dtype):
    """SP's Gram diagonal (~1.4e5 here) overflows float16 (NaN without the float32 guard); under any
    autocast, and for half-precision inputs, the relation losses equal their float32 values."""
    torch.manual_seed(0)
    fs, ft = torch.rand(8, 64, 4, 4) * 20, torch.rand(8, 64, 4, 4) * 20
    a, b = torch.randn(16, 32) * 3, torch.randn(16, 32) * 3
    cases = {
        "sp": (sp_loss, ([fs], [ft])),
        "at": (at_loss, ([fs], [ft])),
        "rkd": (rkd_loss, (a, b)),
        "pkt": (pkt_loss, (a, b)),
        "dist": (dist_loss, (a, b)),
    }
    if dtype == torch.float16:
        with torch.autocast("cpu", dtype=dtype):
            assert torch.isnan(sp_loss.__wrapped__([fs], [ft]))  # what the guard prevents
    for name, (fn, args) in cases.items():
        want = fn(*args)
        with torch.autocast("cpu", dtype=dtype):
            got = fn(*args)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    half = sp_loss([fs.to(dtype)], [ft.to(dtype)])
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_rkd_squared_and_eps_match_naive_float64():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, generator=g, dtype=torch.float64)

    def dist(x, squared, eps):
        d = torch.stack([torch.stack([((x[i] - x[j]) ** 2).sum() for j in range(len(x))]) for i in range(len(x))])
        d = d.clamp(min=eps)
        d = d if squared else d.sqrt()
        d = d * (1 - torch.eye(len(x), dtype=x.dtype))
        return d / d[d > 0].mean()

    def angles(x):
        e = x.unsqueeze(0) - x.unsqueeze(1)
        e = e / e.norm(dim=2, keepdim=True).clamp(min=1e-12)
        return torch.einsum("jid,jkd->jik", e, e).flatten()

    for squared, eps in ((True, 1e-12), (False, 1e-12), (False, 0.5)):
        got = rkd_loss(s, t, 25.0, 50.0, squared=squared, eps=eps)
        want = 25.0 * F.smooth_l1_loss(dist(s, squared, eps), dist(t, squared, eps)) + 50.0 * F.smooth_l1_loss(
            angles(s), angles(t)
        )
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], rtol=1e-9, atol=1e-12
        )
    assert rkd_loss(s, t, squared=True).item() != pytest.approx(rkd_loss(s, t).item(), rel=1e-3)


def test_multi_teacher_weights_and_per_sample_kd_float64():
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(2))
    rows = kd_loss_per_sample(s, t, 3.0)
    assert rows.shape == (5,)
    torch.testing.assert_close(rows.mean(), kd_loss(s, t, 3.0), rtol=1e-13, atol=0)
    ce = torch.rand(3, 5, generator=g, dtype=torch.float64) * 4
    w = confidence_weights(ce)
    for m in range(3):
        for b in range(5):
            want = (1 - math.exp(ce[m, b]) / sum(math.exp(ce[k, b]) for k in range(3))) / 2
            assert w[m, b].item() == pytest.approx(want, rel=1e-12)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    p = logits.softmax(2)
    h = -(p * p.log()).sum(2)
    torch.testing.assert_close(entropy_weights(logits), 1 - h / h.sum(0), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(entropy_weights(torch.tensor([[[0.0, 1e4]], [[1.0, 2.0]]], dtype=torch.float64))).all()
    torch.testing.assert_close(weighted_teacher_mean(w, ce), (w * ce).sum() / 15)
    with pytest.raises(ValueError, match="2 teachers"):
        confidence_weights(ce[:1])
