"""kd.mix (MixUp / CutMix on batches), the distillation CutMix alpha, and soft targets in the losses."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from kd.losses import cross_entropy
from kd.mix import build_mixer

import train

B, C = 8, 10


def constant_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i; labels are distinct, so each mixing weight is readable."""
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 16, 16).contiguous()
    return x, torch.arange(B)


@pytest.mark.parametrize(
    "mixup, cutmix, kind",
    [
        (0.0, 0.0, None),
        (0.2, 0.0, v2.MixUp),
        (0.0, 1.0, v2.CutMix),
        (0.2, 1.0, v2.CutMix),  # CutMix wins
    ],
)
def test_build_mixer_choice_and_priority(mixup, cutmix, kind):
    mixer = build_mixer(C, mixup, cutmix)
    assert mixer is None if kind is None else type(mixer) is kind
    if kind is not None:
        assert mixer.alpha == (cutmix if kind is v2.CutMix else mixup)


def test_mixup_lambda_range_and_label_mixing():
    mixer = build_mixer(C, 0.4, 0.0)
    x, y = constant_batch()
    lams = []
    for seed in range(30):
        torch.manual_seed(seed)
        xm, ym = mixer(x, y)
        assert ym.shape == (B, C) and torch.allclose(ym.sum(1), torch.ones(B))
        lam = ym[0, 0].item()  # weight of the sample's own label
        assert 0.0 <= lam <= 1.0
        assert torch.allclose(ym[1, 0], torch.tensor(1 - lam))  # the partner of sample 1 is sample 0
        # images mix with the same lambda as the labels: x_i * lam + x_{i-1} * (1 - lam)
        expected = lam * torch.arange(B) + (1 - lam) * torch.arange(B).roll(1)
        torch.testing.assert_close(xm[:, 0, 0, 0], expected.float())
        lams.append(lam)
    assert max(lams) - min(lams) > 0.3  # really random


def test_cutmix_label_weight_is_the_pasted_area():
    mixer = build_mixer(C, 0.0, 1.0)
    x, y = constant_batch()
    for seed in range(30):
        torch.manual_seed(seed)
        xm, ym = mixer(x, y)
        assert torch.allclose(ym.sum(1), torch.ones(B))
        lam = ym[1, 1].item()
        assert 0.0 <= lam <= 1.0
        own = (xm[1] == 1).float().mean().item()  # share of sample 1's own pixels
        assert (xm[1] == 0).float().mean().item() == pytest.approx(1 - own)  # the rest comes from sample 0
        assert lam == pytest.approx(own, abs=1e-6)


def test_distillation_phases_use_their_own_cutmix_alpha():
    o = train.OptimCfg(mixup_alpha=0.2, cutmix_alpha=1.0, cutmix_alpha_distill=0.5)
    assert o.mix_alphas(distill=False) == (0.2, 1.0)
    assert o.mix_alphas(distill=True) == (0.2, 0.5)
    o.cutmix_alpha_distill = 0.0
    assert o.mix_alphas(distill=True) == (0.2, 1.0)  # 0 = same as the other phases


def test_cross_entropy_accepts_mixed_soft_targets():
    torch.manual_seed(0)
    logits = torch.randn(B, C)
    _, soft = build_mixer(C, 1.0, 0.0)(torch.randn(B, 3, 4, 4), torch.randint(0, C, (B,)))
    expected = -(soft * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(cross_entropy(logits, soft), expected)
    hard = torch.randint(0, C, (B,))
    torch.testing.assert_close(cross_entropy(logits, F.one_hot(hard, C).float()), cross_entropy(logits, hard))
