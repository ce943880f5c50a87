"""kd.engine.optim: SGD whose parameters get their first gradient at different steps."""

from __future__ import annotations

import torch

from kd.engine.optim import build_optimizer
from kd_cli.config import OptimCfg


def test_fused_sgd_steps_a_parameter_whose_first_gradient_comes_late_like_lazy_sgd():
    """A loss term weighted 0 in epoch 1 leaves its parameters without a gradient (CA-MKD's embeddings); fused
    SGD then met some parameters with a momentum buffer and some without and failed. With zero buffers from
    the start the updates equal plain (unfused, lazily buffered) momentum SGD's exactly."""
    torch.manual_seed(0)
    init = [torch.randn(5, 3), torch.randn(4)]
    grads = [[torch.randn(5, 3), None], [torch.randn(5, 3), torch.randn(4)], [torch.randn(5, 3), torch.randn(4)]]
    results = []
    for make in (
        lambda ps: build_optimizer(
            ps, OptimCfg(momentum=0.9, nesterov=True, weight_decay=5e-4), 0.1, torch.device("cpu")
        ),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    ):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = None if g is None else g.clone()
            opt.step()
        results.append([p.detach().clone() for p in params])
    assert build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimCfg(), 0.1, torch.device("cpu")).defaults["fused"]
    for ours, lazy in zip(*results):
        torch.testing.assert_close(ours, lazy, rtol=0, atol=1e-7)
