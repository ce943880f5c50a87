"""Large pretrained students (issue: student partial freeze + residual adapter): each policy trains
exactly its parameters through train.py's own step, frozen weights stay bit-identical, and the
zero-initialised adapter leaves the model's function unchanged before the first step."""

from __future__ import annotations

import pytest
import torch

import train
from kd.engine.optim import build_scheduler
from kd.freeze import apply_freeze, policy_params
from kd.methods import method_class
from kd.models import create_model

FAMILIES = ["resnet18", "convnext_atto", "swin_tiny_patch4_window7_224"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def one_step(model, policy: str) -> None:
    """One SGD step of CE through train.Trainer, as train.py runs it."""
    cfg = train.Config()
    cfg.optim = train.OptimCfg(lr=0.5, weight_decay=0.0, epochs=1, schedule="constant")
    method = method_class("ce")(None, model, [], num_classes=5, num_train=4)
    optimizer = train.optimizer_for([model, method], cfg.optim, 0.5, torch.device("cpu"))
    runtime = train.make_runtime(cfg, torch.device("cpu"))
    tr = train.Trainer(
        model, method, [], optimizer, build_scheduler(optimizer, cfg.optim, 1, 1), runtime, 1, freeze_policy=policy
    )
    train.set_train(model, policy)
    g = torch.Generator().manual_seed(0)
    train.train_step(tr, torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3]), torch.arange(4), epoch=1)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("policy", ["head", "bn_head", "adapter", "last_block"])
def test_policy_trains_exactly_its_parameters(arch, policy):
    torch.manual_seed(0)
    model = create_model(arch, 5, small_input=True, adapter_dim=8)
    apply_freeze(model, policy)
    expected = {id(p) for p in policy_params(model, policy)} | {id(p) for p in model.adapter.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == expected
    assert {id(p) for p in model.classifier.parameters()} <= trainable  # the head always trains
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    one_step(model, policy)
    params = dict(model.named_parameters())
    for name, value in model.state_dict().items():
        p = params.get(name)
        if p is not None and p.requires_grad:
            continue
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if p is None else None
        if owner is not None and any(q.requires_grad for q in owner.parameters(recurse=False)):
            continue  # a norm layer that trains updates its running statistics too
        assert torch.equal(value, before[name]), f"{arch}/{policy}: frozen {name} changed"
    changed = [n for n, p in params.items() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("adapter.") for n in changed), "the adapter did not train"
    assert any(n in changed for n in (f"backbone.{k}" for k, _ in model.classifier.named_parameters(prefix=""))) or any(
        "head" in n or "fc" in n for n in changed
    )


@pytest.mark.parametrize("arch", FAMILIES)
def test_zero_initialised_adapter_keeps_the_function(arch):
    torch.manual_seed(0)
    plain = create_model(arch, 5, small_input=True).eval()
    with_adapter = create_model(arch, 5, small_input=True, adapter_dim=16).eval()
    missing = with_adapter.load_state_dict(plain.state_dict(), strict=False)
    assert all(k.startswith("adapter.") for k in missing.missing_keys) and not missing.unexpected_keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(with_adapter(x).logits, plain(x).logits, atol=1e-6)


def test_cli_flags_reach_the_student(tmp_path):
    args = [
        "--preset",
        "smoke",
        "--method",
        "ce",
        "--student.freeze",
        "head",
        "--student.adapter-dim",
        "8",
        "--data.synthetic-train-size",
        "200",
        "--data.synthetic-test-size",
        "50",
        "--data.batch-size",
        "16",
        "--optim.epochs",
        "1",
        "--run.max-steps-per-epoch",
        "2",
        "--run.out-dir",
        str(tmp_path),
        "--run.name",
        "r",
        "--wandb.mode",
        "disabled",
    ]
    train.run(train.parse_config(args))
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert state["meta"]["adapter_dim"] == 8
    assert any(k.startswith("adapter.") for k in state["model"])
