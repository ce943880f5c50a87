"""Frozen teachers at inference cost (--teachers.precision, --teachers.compile): kd.teachers.frozen_forward /
FrozenModel, kd.engine.device.resolve_teacher_dtype and frozen_compile, and their use in train.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import train
from kd_cli.config import RESUME_MAY_CHANGE
from kd_cli.config import smoke_preset
from kd.engine.checkpoint import check_resume_config
from kd.engine.device import prepare_model, resolve_teacher_dtype
from kd.errors import CheckpointError, ConfigError
from kd.models import create_model
from kd.teachers import FrozenModel, frozen_forward

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

C = 10
CPU = torch.device("cpu")


def teacher(arch: str = "resnet20", seed: int = 0):
    torch.manual_seed(seed)
    return prepare_model(create_model(arch, C, small_input=True), CPU, inference=True)


def images(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def soft_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Per-sample KL(softmax(p/T) || softmax(q/T))."""
    return (
        F.softmax(p_logits / temperature, 1)
        * (F.log_softmax(p_logits / temperature, 1) - F.log_softmax(q_logits / temperature, 1))
    ).sum(1)


def test_bf16_teacher_outputs_are_close_to_float32_and_come_back_float32():
    model, x = teacher(), images()
    fp32 = frozen_forward([model], x, with_maps=True, dtype=None)[0]
    bf16 = frozen_forward([model], x, with_maps=True, dtype=torch.bfloat16)[0]
    with torch.no_grad():
        reference = model(x, with_maps=True)
    torch.testing.assert_close(fp32.logits, reference.logits)  # dtype None: exactly the float32 forward
    for a, b in [(bf16.logits, fp32.logits), (bf16.feature, fp32.feature), *zip(bf16.maps, fp32.maps)]:
        assert a.dtype == torch.float32
        assert (a - b).abs().max() <= 0.05 * b.abs().max() + 1e-3  # bfloat16 keeps ~3 significant digits
    assert soft_kl(fp32.logits, bf16.logits).max() < 1e-3


def test_teacher_precision_ignores_the_students_autocast():
    model, x = teacher(), images()
    plain = frozen_forward([model], x, dtype=None)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the student's --run.amp bf16
        inside = frozen_forward([model], x, dtype=None)[0]
    torch.testing.assert_close(inside.logits, plain.logits, rtol=0, atol=0)


def test_no_autograd_graph_through_teachers_and_outputs_autograd_may_save():
    model, x = teacher(), images()
    model.requires_grad_(True)  # even a teacher with trainable parameters (ASMB's, in phase B)
    out = frozen_forward([model], x, with_maps=True, dtype=torch.bfloat16)[0]
    for t in (out.feature, out.logits, *out.maps):
        assert t.grad_fn is None and not t.requires_grad and not t.is_inference()
    # a trained head on the teacher's feature (CRD's teacher embedding) saves it for backward
    head = torch.nn.Linear(out.feature.shape[1], 4)
    head(out.feature).sum().backward()
    assert head.weight.grad is not None and all(p.grad is None for p in model.parameters())


def test_frozen_model_wraps_a_trained_model_without_registering_it():
    student, x = teacher("resnet8", seed=3), images()
    wrapped = FrozenModel(student, torch.bfloat16)
    assert not isinstance(wrapped, torch.nn.Module)
    out = wrapped(x)
    assert out.logits.dtype == torch.float32 and out.logits.grad_fn is None
    with torch.no_grad():
        torch.testing.assert_close(out.logits, student(x).logits, atol=0.05, rtol=0.05)


def test_resolve_teacher_dtype():
    cuda = torch.device("cuda")
    assert resolve_teacher_dtype("auto", cuda) == torch.bfloat16
    assert resolve_teacher_dtype("fp32", cuda) is None
    assert resolve_teacher_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_teacher_dtype("fp16", CPU) == torch.float16
    assert resolve_teacher_dtype("auto", CPU) in (None, torch.bfloat16)


def test_train_step_uses_the_teacher_precision():
    """make_runtime resolves --teachers.precision, which every phase's step reads."""
    cfg = train.parse_config(["--preset", "smoke", "--method", "kd", "--teachers.precision", "bf16"])
    assert cfg.teachers.precision == "bf16"
    assert train.make_runtime(cfg, CPU).teacher_dtype == torch.bfloat16


def test_asmb_phase_a_teachers_still_learn_with_bf16_teacher_precision():
    """Phase A: only the frozen student's query runs at teacher precision; the teachers run with gradient."""
    cfg = smoke_preset()
    cfg.method, cfg.teachers.precision = "asmb", "bf16"
    cfg.asmb = dataclasses.replace(cfg.asmb, teacher_freeze="bn_head")
    train.validate(cfg)
    from kd.asmb import build_asmb_modules
    from kd.freeze import apply_freeze

    torch.manual_seed(0)
    student = create_model("resnet8", C, small_input=True)
    teachers = [create_model(a, C, small_input=True) for a in ("resnet20", "wrn_16_2")]
    for t in teachers:
        t.eval().requires_grad_(False)
        apply_freeze(t, "bn_head")
    modules = build_asmb_modules(cfg.asmb, [t.num_features for t in teachers], student, C)
    run = train.build_asmb_run(cfg, train.make_runtime(cfg, CPU), student, teachers, modules, 1, C)
    assert isinstance(run.phase_a.step_module.student, FrozenModel)
    assert run.phase_a.step_module.student.dtype == torch.bfloat16
    run.synergy.train()
    x, y = images(), torch.arange(8) % C
    terms = run.phase_a.step_module(x, y, torch.arange(8), 1, [])
    sum(terms.values()).backward()
    trainable = [p for t in teachers for p in t.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert sum(p.grad.abs().sum().item() for p in trainable) > 0
    assert all(p.grad is None for p in student.parameters())


def test_teachers_compile_is_refused_for_asmb_and_may_change_on_resume():
    with pytest.raises(ConfigError, match="--teachers.compile"):
        train.validate(train.parse_config(["--preset", "smoke", "--method", "asmb", "--teachers.compile", "True"]))
    saved = dataclasses.asdict(
        train.parse_config(["--preset", "smoke", "--method", "kd", "--teachers.precision", "fp32"])
    )
    groups = ("data", "student", "teachers", "optim", "run", "kd")
    same_but_compiled = train.parse_config(
        ["--preset", "smoke", "--method", "kd", "--teachers.precision", "fp32", "--teachers.compile", "True"]
    )
    check_resume_config(dataclasses.asdict(same_but_compiled), saved, groups, RESUME_MAY_CHANGE, "ck")
    other_precision = train.parse_config(["--preset", "smoke", "--method", "kd", "--teachers.precision", "bf16"])
    with pytest.raises(CheckpointError, match="--teachers.precision is bf16 here but fp32"):
        check_resume_config(dataclasses.asdict(other_precision), saved, groups, RESUME_MAY_CHANGE, "ck")


def test_frozen_compile_matches_eager():
    """--teachers.compile: inductor freezing (weights as graph constants, BatchNorm folded) gives the same outputs."""
    eager, x = teacher("resnet8", seed=5), images(4)
    compiled = prepare_model(create_model("resnet8", C, small_input=True), CPU, inference=True, frozen_compile=True)
    compiled.load_state_dict(eager.state_dict())
    a = frozen_forward([eager], x, dtype=None)[0]
    b = frozen_forward([compiled], x, dtype=None)[0]
    torch.testing.assert_close(b.logits, a.logits, atol=1e-3, rtol=1e-3)
