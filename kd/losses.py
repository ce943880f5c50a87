"""Distillation losses as pure functions: tensors in, a 0-dim tensor out.

Shape conventions: logits are [B, C]; `target` is either class indices [B] (int64) or a
probability matrix [B, C] (soft / mixed labels). Every reduction is stated in the docstring.
Each loss reproduces, in float64 and including gradients, the reference implementation named in
its docstring (same reductions, eps placement and normalisations). Loss weights from the papers
(e.g. the 1000 of AT, 3000 of SP) are applied by the method, not here. Nothing here detaches the
teacher unless stated (only RKD does, as its reference does): detach teacher tensors yourself.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

Scalar = float | Tensor


def _in_float32(loss_fn):
    """Run a relation / similarity loss in at least float32 whatever autocast is active: Gram matrices,
    pairwise distances and normalisations overflow or lose ~10 % in float16 / bfloat16 (SP's Gram
    diagonal reaches ~7e4 on resnet32x4 at init, above float16's 65504). float16 / bfloat16 tensor
    arguments (also inside lists) are upcast to float32; float32 and float64 ones are used as given."""

    def upcast(v):
        if isinstance(v, Tensor) and v.dtype in (torch.float16, torch.bfloat16):
            return v.float()
        if isinstance(v, (list, tuple)):
            return type(v)(upcast(x) for x in v)
        return v

    def first_tensor(v):
        if isinstance(v, Tensor):
            return v
        if isinstance(v, (list, tuple)):
            return next((t for t in map(first_tensor, v) if t is not None), None)
        return None

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        ref = first_tensor(args)
        device_type = ref.device.type if ref is not None else "cpu"
        with torch.autocast(device_type, enabled=False):
            return loss_fn(*upcast(args), **{k: upcast(v) for k, v in kwargs.items()})

    return wrapper


# --------------------------------------------------------------------------- logits


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy, mean over the batch. `target` is [B] class indices or [B, C] probabilities
    (MixUp/CutMix soft labels); label smoothing follows torch.nn.functional.cross_entropy."""
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def _kl_rows(log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
    """Per-row KL(p_t || p_s) from log-probabilities: [B, K] each -> [B] (sum over K)."""
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def kd_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: Scalar) -> Tensor:
    """Vanilla KD (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network").

    T^2 * (1/B) * sum_{b,c} p_t * (log p_t - log softmax(s/T)),  p_t = softmax(t/T).
    Shapes: [B, C] each. Reduction: sum over classes, mean over the batch (RepDistiller's
    DistillKL: kl_div(sum) * T^2 / B). The teacher side is used as given: detach it yourself if
    it must not receive gradient.
    `temperature` may be a Python float or a 0-dim tensor (tensor keeps torch.compile from recompiling).
    """
    log_p_s = F.log_softmax(logits_student / temperature, dim=1)
    log_p_t = F.log_softmax(logits_teacher / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * temperature**2


def kd_loss_per_sample(logits_student: Tensor, logits_teacher: Tensor, temperature: Scalar) -> Tensor:
    """Per-sample vanilla KD: T^2 * KL(softmax(t/T) || softmax(s/T)) for each row, [B, C] each -> [B]
    (sum over classes, no batch reduction; kd_loss is its mean). The per-teacher term of the
    multi-teacher methods (CA-MKD's DistillKL with is_ca=True)."""
    log_p_s = F.log_softmax(logits_student / temperature, dim=1)
    log_p_t = F.log_softmax(logits_teacher / temperature, dim=1)
    return _kl_rows(log_p_t, log_p_s) * temperature**2


def confidence_weights(teacher_ce: Tensor) -> Tensor:
    """CA-MKD teacher weights (Zhang, Chen & Wang, ICASSP 2022, "Confidence-Aware Multi-Teacher
    Knowledge Distillation", eq. 2): w[m, b] = (1 - softmax_m(L[:, b])[m]) / (M - 1), where L[m, b] is
    teacher m's cross-entropy on sample b's label. Shape [M, B] -> [M, B] (M >= 2); each column sums to
    1, the more confident (lower-CE) teacher gets the larger weight. Not detached: gradient flows into
    L when it depends on trainable tensors (CA-MKD's feature term, as in the authors' code)."""
    num_teachers = teacher_ce.shape[0]
    if num_teachers < 2:
        raise ValueError("confidence_weights needs at least 2 teachers")
    return (1.0 - F.softmax(teacher_ce, dim=0)) / (num_teachers - 1)


def entropy_weights(logits_teachers: Tensor) -> Tensor:
    """EBKD teacher weights (Kwon et al., ICASSP 2020, "Adaptive Knowledge Distillation Based on
    Entropy"; multi-teacher form of the CA-MKD authors' code): with H[m, b] the entropy of
    softmax(logits_teachers[m, b]) (temperature 1, natural log),
        w[m, b] = 1 - H[m, b] / sum_m' H[m', b].
    Shape [M, B, C] -> [M, B]; each column sums to M - 1. Entropy from log_softmax: equal to the
    reference's -p*log(p) where that is finite, and finite where p underflows to 0 (reference: NaN)."""
    log_p = F.log_softmax(logits_teachers, dim=2)
    ent = -(log_p.exp() * log_p).sum(dim=2)
    return 1.0 - ent / ent.sum(dim=0, keepdim=True)


MIN_NORM_MAX_TEACHERS = 6  # min_norm_simplex_weights enumerates up to 3^M faces


def min_norm_simplex_weights(gram: Tensor, upper: float = 1.0) -> Tensor:
    """The min-norm point of the convex hull of M vectors with Gram matrix G, with a cap on each weight:

        a* = argmin_a  a^T G a   s.t.  sum_m a_m = 1,  0 <= a_m <= upper        (MGDA; AE-KD with upper = C)

    batched over leading dims: [..., M, M] -> [..., M]. `upper` is clamped to [1/M, 1] (1/M: the only feasible
    point is the uniform one; 1: no cap). Exact (no iterations): every face of the feasible polytope (each weight
    at 0, free, or at the cap) is tried; on a face the KKT system G_FF a_F - lambda 1 = -upper * G_FU 1,
    sum a_F = 1 - upper |U| is solved (least squares, so a singular G, e.g. two equal teachers, is fine), and
    the feasible candidate of least a^T G a is kept (faces with more free weights first: ties keep the
    minimum-norm, e.g. uniform, solution). Solved on the CPU in float64 (one host sync); returned on G's device
    and dtype, without gradient. M <= 6 (3^M faces)."""
    m = gram.shape[-1]
    if m > MIN_NORM_MAX_TEACHERS:
        raise ValueError(f"min_norm_simplex_weights solves up to {MIN_NORM_MAX_TEACHERS} vectors, got {m}")
    upper = min(max(float(upper), 1.0 / m), 1.0)
    g = gram.detach().to("cpu", torch.float64).reshape(-1, m, m)
    n, tol = g.shape[0], 1e-9
    states = (1, 0, 2) if upper < 1.0 else (1, 0)  # 1 free, 0 at zero, 2 at the cap
    patterns = sorted(itertools.product(states, repeat=m), key=lambda pat: -pat.count(1))
    best = torch.full((n, m), 1.0 / m, dtype=torch.float64)
    best_obj = torch.full((n,), math.inf, dtype=torch.float64)
    scale = g.diagonal(dim1=1, dim2=2).abs().amax(dim=1).clamp_min(1e-300)
    for pat in patterns:
        free = [i for i, st in enumerate(pat) if st == 1]
        capped = [i for i, st in enumerate(pat) if st == 2]
        rest = 1.0 - upper * len(capped)
        if rest < -tol or rest > upper * len(free) + tol or (not free and abs(rest) > tol):
            continue
        alpha = torch.tensor([upper if st == 2 else 0.0 for st in pat], dtype=torch.float64).repeat(n, 1)
        if free:
            k = len(free)
            a = torch.zeros(n, k + 1, k + 1, dtype=torch.float64)
            a[:, :k, :k] = g[:, free][:, :, free]
            a[:, :k, k] = -1.0
            a[:, k, :k] = 1.0
            b = torch.zeros(n, k + 1, 1, dtype=torch.float64)
            if capped:
                b[:, :k, 0] = -upper * g[:, free][:, :, capped].sum(dim=2)
            b[:, k, 0] = rest
            alpha[:, free] = torch.linalg.lstsq(a, b, driver="gelsd").solution[:, :k, 0]
        ok = ((alpha >= -tol) & (alpha <= upper + tol)).all(dim=1)
        obj = torch.einsum("nm,nmk,nk->n", alpha, g, alpha)
        better = ok & (obj < best_obj - 1e-13 * scale)
        best_obj = torch.where(better, obj, best_obj)
        best = torch.where(better[:, None], alpha, best)
    best = best.clamp(0.0, upper)
    best = best / best.sum(dim=1, keepdim=True)
    return best.reshape(gram.shape[:-1]).to(gram.device, gram.dtype)


def kd_logit_gradients(logits_student: Tensor, logits_teachers: Tensor, temperature: Scalar) -> Tensor:
    """d/ds_b of T^2 * KL(softmax(t_b/T) || softmax(s_b/T)) = T * (softmax(s_b/T) - softmax(t_b/T)) for each
    teacher and row: student [B, C], teachers [M, B, C] -> [M, B, C] (the per-sample KD term's gradient with
    respect to the student's logits; kd_loss's is this / B)."""
    p_s = F.softmax(logits_student / temperature, dim=-1)
    p_t = F.softmax(logits_teachers / temperature, dim=-1)
    return temperature * (p_s.unsqueeze(0) - p_t)


def aekd_weights(
    logits_student: Tensor,
    logits_teachers: Tensor,
    temperature: Scalar,
    tolerance: float = 0.6,
    normalize: bool = False,
    per_sample: bool = False,
) -> Tensor:
    """AE-KD teacher weights (Du et al., NeurIPS 2020, "Agree to Disagree: Adaptive Ensemble Knowledge
    Distillation in Gradient Space"): the min-norm point, with each weight capped at the tolerance C, of the
    teachers' KD-loss gradients with respect to the student's logits (kd_logit_gradients g[m, b]):

        per batch (the CA-MKD code): v_m = mean_b g[m, b];  a = min_norm_simplex_weights(V V^T, C)     -> [M, 1]
        per sample:                  v_m = g[m, b] for each b, one min-norm problem per sample          -> [M, B]
        normalize: v_m / ||v_m|| in the problem, then a_m / ||v_m|| renormalised to sum 1 (the code's svm_norm).

    Positive rescaling of all gradients (the code's 1/B factors) leaves the weights unchanged. Student [B, C],
    teachers [M, B, C]; no gradient flows through the weights."""
    with torch.no_grad():
        g = kd_logit_gradients(logits_student.detach(), logits_teachers.detach(), temperature)
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        v = g if per_sample else g.mean(dim=1, keepdim=True)  # [M, N, C]
        v = v.transpose(0, 1)  # [N, M, C]
        norms = v.norm(dim=2).clamp_min(torch.finfo(v.dtype).tiny)  # [N, M]
        if normalize:
            v = v / norms.unsqueeze(2)
        a = min_norm_simplex_weights(v @ v.transpose(1, 2), tolerance)  # [N, M]
        if normalize:
            a = a / norms
            a = a / a.sum(dim=1, keepdim=True)
    return a.transpose(0, 1).to(logits_student.dtype)


def weighted_teacher_mean(weights: Tensor, per_sample_losses: Tensor) -> Tensor:
    """sum_{m, b} w[m, b] * l[m, b] / (B * M): [M, B] each -> 0-dim. The reduction of CA-MKD's and
    EBKD's weighted terms in the authors' code (note the extra 1/M although CA-MKD's weights already
    sum to 1 over teachers)."""
    num_teachers, batch = per_sample_losses.shape
    return (weights * per_sample_losses).sum() / (batch * num_teachers)


def _non_target_index(target: Tensor, num_classes: int) -> Tensor:
    """Column indices of the C-1 non-target classes per row, in class order: [B] -> [B, C-1].

    Row b is 0..C-2 shifted by one from the target on, i.e. the target column is skipped. Fixed
    shape (no boolean indexing), so it stays torch.compile friendly.
    """
    j = torch.arange(num_classes - 1, device=target.device)
    return j.unsqueeze(0) + (j.unsqueeze(0) >= target.unsqueeze(1)).long()


def _binary_log_probs(log_p: Tensor, target: Tensor, other_idx: Tensor) -> Tensor:
    """log [p_target, p_non_target] from full log-probabilities: [B, C] -> [B, 2].

    p_non_target = sum of the non-target probabilities (as DKD's reference sums them, not 1 - p_t),
    taken in log space with logsumexp so it never underflows to log(0)."""
    log_gt = log_p.gather(1, target.unsqueeze(1))
    log_rest = torch.logsumexp(log_p.gather(1, other_idx), dim=1, keepdim=True)
    return torch.cat([log_gt, log_rest], dim=1)


def dkd_loss(
    logits_student: Tensor,
    logits_teacher: Tensor,
    target: Tensor,
    alpha: Scalar,
    beta: Scalar,
    temperature: Scalar,
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation"); mdistiller's `dkd_loss`.

    With p = softmax(z/T), b = [p_target, sum_{c != target} p_c] and p_hat = softmax over the
    non-target logits z_{c != target}/T only:
        TCKD_b = T^2 * KL(b_t || b_s),   NCKD_b = T^2 * KL(p_hat_t || p_hat_s)
        loss   = (1/B) * sum_b (alpha * TCKD_b + beta * NCKD_b)
    Shapes: logits [B, C] (C >= 2), target [B] int64 class indices. Reduction: sum over the
    (binary / C-1) classes, mean over the batch. `alpha`, `beta` are floats, 0-dim tensors or [B]
    per-sample weights. The warm-up factor min(epoch / warmup, 1) is NOT applied here.

    Identity (per sample, same T): KL(p_t || p_s) = TCKD + (1 - p_t[target]) * NCKD, so alpha = 1,
    beta = 1 - p_t[target] gives back kd_loss.

    NCKD excludes the target column exactly (gathers the C-1 other logits). The reference instead
    subtracts 1000 from z_target/T before the softmax; the masked probability is then
    exp(-1000 + ...) which is exactly 0 in float32 and float64 unless z_target/T exceeds the other
    logits/T by more than ~250, so both forms agree to float64 rounding, gradients included.
    TCKD is computed in log space (logsumexp of the non-target log-probabilities) where the
    reference takes log of summed softmax probabilities: equal up to rounding, but finite where the
    reference's log underflows to -inf. The gradient w.r.t. the teacher logits is finite here,
    whereas the mask form's is NaN (kl_div's target gradient at the exact zeros is log 0); the
    reference never needs it (teacher under no_grad).
    """
    other_idx = _non_target_index(target, logits_student.shape[1])
    zs, zt = logits_student / temperature, logits_teacher / temperature
    log_p_s, log_p_t = F.log_softmax(zs, dim=1), F.log_softmax(zt, dim=1)
    tckd = _kl_rows(_binary_log_probs(log_p_t, target, other_idx), _binary_log_probs(log_p_s, target, other_idx))
    nckd = _kl_rows(F.log_softmax(zt.gather(1, other_idx), dim=1), F.log_softmax(zs.gather(1, other_idx), dim=1))
    return (alpha * tckd + beta * nckd).mean() * temperature**2


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of matching rows: [N, K] each -> [N].
    <a - mean a, b - mean b> / (|a - mean a| * |b - mean b| + eps), eps as in the DIST code."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@_in_float32
def dist_loss(
    logits_student: Tensor,
    logits_teacher: Tensor,
    beta: Scalar = 1.0,
    gamma: Scalar = 1.0,
    temperature: Scalar = 1.0,
) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"); authors' DIST.

    y = softmax(z/T) per row, d(u, v) = 1 - pearson(u, v) (eps 1e-8 on the norm product):
        inter = 1 - mean_b pearson(y_s[b, :], y_t[b, :])     (B rows, over classes)
        intra = 1 - mean_c pearson(y_s[:, c], y_t[:, c])     (C columns, over the batch)
        loss  = T^2 * (beta * inter + gamma * intra)
    Shapes: [B, C] each (B >= 2 for the intra term). Reduction: mean over rows / columns.
    Because of eps the loss for student == teacher is eps/(|centered y|^2 + eps), ~0, not exactly 0.
    """
    y_s = F.softmax(logits_student / temperature, dim=1)
    y_t = F.softmax(logits_teacher / temperature, dim=1)
    inter = 1 - _pearson_rows(y_s, y_t).mean()
    intra = 1 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardisation (Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation").

    z' = (z - mean(z)) / (std(z) + eps), over the class dimension (last), per sample. std is the
    UNBIASED one (torch.std default, divisor C-1), eps is added to std, as in the authors' code.
    Shape: [..., C] -> same shape (C >= 2).

    Use with kd_loss / dkd_loss: standardise BOTH student and teacher logits, then call the loss
    with the paper's base temperature T (e.g. kd_loss(standardize_logits(s), standardize_logits(t), T));
    the T^2 factor uses that base T, so each sample's effective temperature is T * std(z). The
    authors raise the KD weight with it (their CIFAR-100 recipes: base T 2 or 3, KD weight 9).
    """
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


# --------------------------------------------------------------------------- features


def hint_loss(student_hint: Tensor, teacher_feature: Tensor) -> Tensor:
    """FitNet hint loss (Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets").

    mean((r(f_s) - f_t)^2) over ALL elements (nn.MSELoss, as in RepDistiller's HintLoss).
    `student_hint` is the regressor output r(f_s); same shape as `teacher_feature`, any rank.
    """
    if student_hint.shape != teacher_feature.shape:
        raise ValueError(f"hint_loss: shapes differ, {tuple(student_hint.shape)} vs {tuple(teacher_feature.shape)}")
    return F.mse_loss(student_hint, teacher_feature)


def _check_pairs(name: str, a: list[Tensor], b: list[Tensor]) -> None:
    if not a:
        raise ValueError(f"{name}: no feature maps given")
    if len(a) != len(b):
        raise ValueError(f"{name}: {len(a)} student feature maps vs {len(b)} teacher feature maps")


def _attention_map(f: Tensor, p: float) -> Tensor:
    """Spatial attention map: [B, C, H, W] -> [B, H*W], mean_c f^p then L2-normalised over H*W
    (F.normalize, eps 1e-12)."""
    return F.normalize(f.pow(p).mean(dim=1).flatten(1), dim=1)


@_in_float32
def at_loss(feats_student: list[Tensor], feats_teacher: list[Tensor], p: float = 2) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention");
    RepDistiller's Attention, per-stage losses summed.

    Per pair (f_s [B, C_s, H_s, W_s], f_t [B, C_t, H_t, W_t]): a map larger than the other is
    adaptive-average-pooled to the smaller spatial size (min H, min W); with
    a = normalize(mean_c f^p) over H*W, stage loss = mean((a_s - a_t)^2) over B*H*W.
    Total = sum over stages. Channel counts may differ. The paper's weight (beta/2 = 1000 in
    RepDistiller) is applied by the method.
    """
    _check_pairs("at_loss", feats_student, feats_teacher)
    total = feats_student[0].new_zeros(())
    for f_s, f_t in zip(feats_student, feats_teacher):
        size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
        if f_s.shape[2:] != size:
            f_s = F.adaptive_avg_pool2d(f_s, size)
        if f_t.shape[2:] != size:
            f_t = F.adaptive_avg_pool2d(f_t, size)
        total = total + (_attention_map(f_s, p) - _attention_map(f_t, p)).pow(2).mean()
    return total


@_in_float32
def sp_loss(feats_student: list[Tensor], feats_teacher: list[Tensor]) -> Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019); RepDistiller's Similarity, per-pair summed.

    Per pair: f -> [B, N] (flatten), G = f f^T [B, B], rows L2-normalised (F.normalize, eps 1e-12),
    pair loss = sum((G_t - G_s)^2) / B^2. Total = sum over pairs. The paper's weight (gamma = 3000)
    is applied by the method.
    """
    _check_pairs("sp_loss", feats_student, feats_teacher)
    total = feats_student[0].new_zeros(())
    for f_s, f_t in zip(feats_student, feats_teacher):
        bsz = f_s.shape[0]
        f_s, f_t = f_s.reshape(bsz, -1), f_t.reshape(bsz, -1)
        g_s = F.normalize(f_s @ f_s.t(), dim=1)
        g_t = F.normalize(f_t @ f_t.t(), dim=1)
        total = total + (g_t - g_s).pow(2).sum() / (bsz * bsz)
    return total


def _pairwise_distances(x: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """Euclidean distance matrix as RKD's reference computes it: [B, D] -> [B, B].
    clamp(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, min=eps), square-rooted unless `squared`, diagonal set to 0
    (so identical off-diagonal rows get sqrt(eps) = 1e-6, not 0)."""
    sq = x.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (x @ x.t())).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return d.masked_fill(eye, 0.0)


def _normalized_distances(x: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """Distances divided by their mean over the non-zero entries: [B, D] -> [B, B]."""
    d = _pairwise_distances(x, squared, eps)
    positive = d > 0
    mean_positive = (d * positive).sum() / positive.sum()
    return d / mean_positive


def _angles(x: Tensor) -> Tensor:
    """cos of the angle at j between i and k: <e_ij, e_kj> with e_ij = normalize(x_i - x_j)
    ([B, D] -> [B^3], flattened [j, i, k]; zero where i == j or k == j)."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
    return torch.bmm(e, e.transpose(1, 2)).flatten()


@_in_float32
def rkd_loss(
    f_s: Tensor,
    f_t: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    squared: bool = False,
    eps: float = 1e-12,
) -> Tensor:
    """Relational KD (Park et al., CVPR 2019, "Relational Knowledge Distillation"); RepDistiller's RKDLoss.

    distance = smooth_l1(psi_D(s), psi_D(t)), psi_D = pairwise distances / their mean over the
    non-zero pairs, mean over the B*B entries (diagonal included);
    angle = smooth_l1(psi_A(s), psi_A(t)), psi_A = cosines of normalised differences, mean over B^3.
    loss = distance_weight * distance + angle_weight * angle (smooth_l1 with beta 1).
    `squared` uses squared distances and `eps` is the clamp of the squared distances before the root
    (mdistiller's RKD `squared` / `eps`, defaults False / 1e-12 = RepDistiller's fixed behaviour).
    Shapes: [B, ...] each, flattened to [B, D]; B >= 2. The teacher side is computed under
    no_grad (as in the reference): no gradient reaches f_t. Computed in float32 (or float64) under
    any autocast.
    """
    if f_s.shape[0] < 2:
        raise ValueError("rkd_loss needs a batch of at least 2 samples")
    s, t = f_s.flatten(1), f_t.flatten(1)
    with torch.no_grad():
        t_dist, t_angle = _normalized_distances(t, squared, eps), _angles(t)
    loss_d = F.smooth_l1_loss(_normalized_distances(s, squared, eps), t_dist)
    loss_a = F.smooth_l1_loss(_angles(s), t_angle)
    return distance_weight * loss_d + angle_weight * loss_a


def _pkt_affinity(x: Tensor, eps: float) -> Tensor:
    """PKT's conditional probabilities: [B, D] -> [B, B] rows summing to 1.
    x / (|x| + eps), cosine matrix, mapped to [0, 1] by (cos + 1) / 2, then row-normalised."""
    x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    sim = (x @ x.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


@_in_float32
def pkt_loss(f_s: Tensor, f_t: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018); RepDistiller's PKT (authors' code).

    With P_s, P_t the row-normalised (cos + 1) / 2 affinity matrices [B, B]:
    loss = mean over ALL B*B entries of P_t * log((P_t + eps) / (P_s + eps))
    (the reference takes torch.mean, i.e. (1/B) times the per-row KL averaged over rows).
    Shapes: [B, ...] each, flattened to [B, D]. The reference's zeroing of NaNs after the
    normalisation is omitted: with eps it only triggers for NaN inputs, which should surface.
    """
    p_s = _pkt_affinity(f_s.flatten(1), eps)
    p_t = _pkt_affinity(f_t.flatten(1), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


# --------------------------------------------------------------------------- CRD
# Contrastive Representation Distillation (Tian et al., ICLR 2020), as in RepDistiller's
# CRDLoss / ContrastMemory / ContrastLoss, with the state made explicit. One training step:
#   contrast_idx = crd_sample_negatives(train_labels, sample_idx, k, generator)      # [B, K+1]
#   scores_s, scores_t, z_s, z_t = crd_contrast(e_s, e_t, memory_s, memory_t, contrast_idx, T, z_s, z_t)
#   loss = crd_loss(scores_s, scores_t, n_data)
#   memory_s = crd_update_memory(memory_s, e_s, sample_idx, momentum)   # after the scores, as CRD does
#   memory_t = crd_update_memory(memory_t, e_t, sample_idx, momentum)
# e_s, e_t are the L2-normalised embeddings (linear head + normalise, owned by the method);
# memory_s holds student embeddings, memory_t teacher embeddings; z_s, z_t start as None and are
# kept fixed once returned.


def crd_init_memory(
    n_data: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """CRD memory bank init: [n_data, dim] uniform in [-s, s], s = 1 / sqrt(dim / 3) (as in CRD)."""
    stdv = 1.0 / math.sqrt(dim / 3)
    u = torch.rand(n_data, dim, generator=generator, dtype=dtype, device=device)
    return u * (2 * stdv) - stdv


def crd_sample_negatives(
    labels_of_train_set: Tensor, sample_idx: Tensor, k: int, generator: torch.Generator | None = None
) -> Tensor:
    """CRD 'exact' mode indices: [B] -> [B, k+1], column 0 = sample_idx (the positive), columns 1..k
    = k training-set indices drawn uniformly from the samples whose label differs from the anchor's.

    Like CRD's dataset, draws without replacement unless some anchor's class has fewer than k
    negatives, in which case the whole batch is drawn with replacement. `labels_of_train_set` is [N]
    int64 on the device of the result; uses O(B * N) memory (one weight per training sample).
    """
    anchor_labels = labels_of_train_set[sample_idx]
    is_negative = labels_of_train_set.unsqueeze(0) != anchor_labels.unsqueeze(1)  # [B, N]
    replacement = bool((is_negative.sum(dim=1) < k).any())
    neg = torch.multinomial(is_negative.float(), k, replacement=replacement, generator=generator)
    return torch.cat([sample_idx.unsqueeze(1), neg], dim=1)


def _contrast_scores(memory: Tensor, contrast_idx: Tensor, embed: Tensor, temperature: float) -> Tensor:
    """exp(<memory[contrast_idx[b, k]], embed[b]> / T): memory [N, D], idx [B, K+1], embed [B, D]
    -> [B, K+1]. The memory is detached (CRD never backpropagates into it)."""
    weights = memory.detach()[contrast_idx]  # [B, K+1, D]
    return torch.exp(torch.bmm(weights, embed.unsqueeze(2)).squeeze(2) / temperature)


def crd_contrast(
    embed_s: Tensor,
    embed_t: Tensor,
    memory_s: Tensor,
    memory_t: Tensor,
    contrast_idx: Tensor,
    temperature: float,
    z_s: Scalar | None = None,
    z_t: Scalar | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CRD's ContrastMemory scores, state explicit.

    Pairing (as in CRD): the STUDENT embedding is scored against the TEACHER memory bank and vice
    versa:
        scores_s = exp(memory_t[contrast_idx] . embed_s / T) / z_s
        scores_t = exp(memory_s[contrast_idx] . embed_t / T) / z_t
    z (the NCE normalising constant) given as None is estimated from this batch as
    mean(unnormalised scores) * n_data (n_data = memory rows) and returned detached; the caller
    keeps it fixed for the rest of training (CRD sets it once, on the first step).
    Shapes: embed_* [B, D] (L2-normalised), memory_* [N, D], contrast_idx [B, K+1] int64 with the
    positive in column 0. Returns (scores_s [B, K+1], scores_t [B, K+1], z_s, z_t) (z 0-dim).
    """
    n_data = memory_s.shape[0]
    exp_s = _contrast_scores(memory_t, contrast_idx, embed_s, temperature)
    exp_t = _contrast_scores(memory_s, contrast_idx, embed_t, temperature)
    if z_s is None:
        z_s = exp_s.detach().mean() * n_data
    if z_t is None:
        z_t = exp_t.detach().mean() * n_data
    z_s = torch.as_tensor(z_s, dtype=exp_s.dtype, device=exp_s.device)
    z_t = torch.as_tensor(z_t, dtype=exp_t.dtype, device=exp_t.device)
    return exp_s / z_s, exp_t / z_t, z_s, z_t


@torch.no_grad()
def crd_update_memory(memory: Tensor, embed: Tensor, sample_idx: Tensor, momentum: float) -> Tensor:
    """CRD memory-bank update, out of place: [N, D] -> new [N, D].

    rows sample_idx <- normalize(memory[sample_idx] * m + embed * (1 - m)) (plain L2 norm, no eps);
    other rows unchanged. Update memory_s with the student embedding and memory_t with the teacher's.
    """
    pos = memory[sample_idx] * momentum + embed.detach() * (1 - momentum)
    pos = pos / pos.pow(2).sum(dim=1, keepdim=True).sqrt()
    return memory.index_copy(0, sample_idx, pos)


def crd_nce_loss(scores: Tensor, n_data: int) -> Tensor:
    """CRD's NCE loss (ContrastLoss) for one score matrix.

    scores [B, K+1] = exp(./T)/Z, column 0 the positive, columns 1..K the negatives;
    Pn = 1/n_data, eps = 1e-7:
        loss = -( sum_b log(P_pos / (P_pos + K*Pn + eps))
                  + sum_{b,k} log(K*Pn / (P_neg + K*Pn + eps)) ) / B
    Reduction: sums over positives and negatives, divided by B. Returns a 0-dim tensor.
    """
    eps = 1e-7
    k = scores.shape[1] - 1
    noise = k / n_data
    p_pos, p_neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(p_pos / (p_pos + noise + eps))
    log_d0 = torch.log(noise / (p_neg + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def crd_loss(scores_s: Tensor, scores_t: Tensor, n_data: int) -> Tensor:
    """CRD objective: crd_nce_loss(scores_s) + crd_nce_loss(scores_t) (scores from crd_contrast)."""
    return crd_nce_loss(scores_s, n_data) + crd_nce_loss(scores_t, n_data)
