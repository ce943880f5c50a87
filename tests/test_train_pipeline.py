"""train.py's data path and precision/layout options: loader choice, RandAugment, AMP bf16 on CPU,
--run.compile, and the teachers' input adapter (KDModel.set_input_transform, --teachers.image-size)."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from kd.data import IMAGENET_MEAN, IMAGENET_STD, SyntheticSpec, build_data
from kd.errors import ConfigError
from kd.fastloader import DeviceLoader
from kd.models import KDModel, create_model

import train
from kd.teachers import teacher_cache_path, teacher_identities, teacher_input_spec, teacher_small_input

TINY = [
    "--preset",
    "smoke",
    "--data.synthetic-train-size",
    "200",
    "--data.synthetic-test-size",
    "40",
    "--data.synthetic-image-size",
    "16",
    "--data.batch-size",
    "16",
    "--optim.epochs",
    "1",
    "--teachers.epochs",
    "1",
    "--run.max-steps-per-epoch",
    "2",
    "--student.model",
    "resnet8",
    "--teachers.models",
    "resnet8",
    "--wandb.mode",
    "disabled",
]
SMALL = SyntheticSpec(num_classes=4, train_size=64, test_size=16, image_size=16)


def tiny_cfg(tmp_path: Path, *extra: str) -> train.Config:
    return train.parse_config(
        [*TINY, "--run.out-dir", str(tmp_path / "runs"), "--teachers.cache-dir", str(tmp_path / "cache"), *extra]
    )


# ----------------------------------------------------------------------------------------------- loaders


@pytest.mark.parametrize(
    "loader, randaugment, fast",
    [
        ("auto", (0, 0), True),
        ("fast", (0, 0), True),
        ("torch", (0, 0), False),
        ("auto", (2, 9), False),
    ],
)
def test_loader_choice(loader, randaugment, fast):
    cfg = train.parse_config(
        [
            "--preset",
            "smoke",
            "--data.loader",
            loader,
            "--data.batch-size",
            "8",
            "--data.randaugment",
            *map(str, randaugment),
        ]
    )
    data = build_data("synthetic", "", synthetic=SMALL, randaugment=randaugment)
    loaders = train.build_loaders(cfg, data, torch.device("cpu"))
    assert {type(v) for v in loaders.values()} == {DeviceLoader if fast else DataLoader}
    x, y, index = next(iter(loaders["val"]))
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16) and y.dtype == torch.int64


def test_randaugment_is_in_the_training_transform_only():
    data = build_data("synthetic", "", synthetic=SMALL, randaugment=(2, 9))
    assert any(
        isinstance(t, v2.RandAugment) and t.num_ops == 2 and t.magnitude == 9 for t in data.train.transform.transforms
    )
    assert not any(isinstance(t, v2.RandAugment) for t in data.val.transform.transforms)
    with pytest.raises(ConfigError, match="randaugment"):
        build_data("synthetic", "", synthetic=SMALL, randaugment=(2, 31))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.loader", "fast", "--data.randaugment", "2", "9"], "does not do RandAugment"),
        (["--data.loader", "fast", "--data.dataset", "imagefolder", "--data.root", "."], "not imagefolder"),
        (["--data.randaugment", "2", "31"], "--data.randaugment"),
    ],
)
def test_bad_data_flags(args, message):
    with pytest.raises(ConfigError, match=message):
        train.validate(train.parse_config(["--preset", "smoke", *args]))


# ----------------------------------------------------------------------------------------------- precision, compile


def test_amp_bf16_on_cpu_runs_a_training_step(tmp_path):
    summary = train.run(tiny_cfg(tmp_path, "--method", "ce", "--run.amp", "bf16", "--run.name", "bf16"))
    assert 0.0 <= summary["best/test_acc"] <= 100.0
    rows = (tmp_path / "runs" / "bf16" / "metrics.jsonl").read_text()
    assert '"train/loss": NaN' not in rows


def test_fp16_on_cpu_falls_back_to_float32_with_a_note(capsys):
    assert train.resolve_amp("fp16", torch.device("cpu")) is None
    assert "fp16 needs CUDA" in capsys.readouterr().out
    assert train.resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16


def test_compile_compiles_student_and_frozen_teachers_in_place():
    cfg = train.parse_config(["--preset", "smoke", "--run.compile", "True"])
    with mock.patch.object(KDModel, "compile", autospec=True) as compile_:
        student = train.prepare(create_model("resnet8", 4, small_input=True), cfg, torch.device("cpu"))
        teacher = train.prepare(create_model("resnet8", 4, small_input=True), cfg, torch.device("cpu"), inference=True)
    assert [c.args[0] for c in compile_.call_args_list] == [student, teacher]
    assert isinstance(student, KDModel) and student.training  # same module: state_dict keys unchanged
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


# ----------------------------------------------------------------------------------------------- teacher inputs


def test_input_transform_is_identity_when_stats_match():
    torch.manual_seed(0)
    model = create_model("resnet8", 4, small_input=True).eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(x).logits
    model.set_input_transform(IMAGENET_MEAN, IMAGENET_STD, IMAGENET_MEAN, IMAGENET_STD)
    assert model.input_transform is None and model.input_scale is None and model.input_size is None
    assert torch.equal(model(x).logits, before)
    assert "input_scale" not in model.state_dict()


def test_input_transform_renormalises_and_resizes():
    torch.manual_seed(0)
    model = create_model("resnet8", 4, small_input=True).eval()
    data_mean, data_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    raw = torch.rand(2, 3, 16, 16)
    as_data = (raw - torch.tensor(data_mean).view(1, 3, 1, 1)) / torch.tensor(data_std).view(1, 3, 1, 1)
    as_model = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = model(as_model).logits
    model.set_input_transform(data_mean, data_std, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(model(as_data).logits, expected, atol=1e-5, rtol=1e-5)
    model.set_input_transform(data_mean, data_std, IMAGENET_MEAN, IMAGENET_STD, size=24)
    resized = F.interpolate(as_model, size=(24, 24), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(model.adapt_input(as_data), resized, atol=1e-5, rtol=1e-5)
    assert model.input_transform["size"] == 24
    assert set(model.state_dict()) == set(create_model("resnet8", 4, small_input=True).state_dict())


def test_teacher_input_spec_rules():
    data = build_data("synthetic", "", synthetic=SMALL)  # mean 0.5, std 0.25
    assert teacher_input_spec("resnet18", False, 0, data.mean, data.std) is None  # not pretrained
    # timm's resnet18 was trained with the ImageNet stats
    spec = teacher_input_spec("resnet18", True, 0, data.mean, data.std)
    assert spec["model_mean"] == list(IMAGENET_MEAN) and spec["data_std"] == [0.25] * 3 and spec["size"] == 0
    assert teacher_input_spec("resnet18", True, 0, IMAGENET_MEAN, IMAGENET_STD) is None  # same stats: no adapter
    assert teacher_input_spec("resnet18", True, 32, IMAGENET_MEAN, IMAGENET_STD)["size"] == 32
    assert teacher_small_input(False, 32) is True  # their own size decides their stem: 32 px -> small
    assert teacher_small_input(True, 224) is False
    assert teacher_small_input(True, 0) is True  # no size of their own: like the student
    cfg = train.parse_config(["--preset", "smoke", "--teachers.models", "resnet18"])
    (ident,) = teacher_identities(cfg.teachers, cfg.optim, cfg.data, cfg.run, data, False)
    assert teacher_cache_path("c", ident) != teacher_cache_path("c", {**ident, "input": {"size": 224}})


def test_teachers_image_size_end_to_end(tmp_path):
    summary = train.run(tiny_cfg(tmp_path, "--method", "kd", "--teachers.image-size", "24", "--run.name", "ts"))
    assert 0.0 <= summary["best/test_acc"] <= 100.0
    (cached,) = (tmp_path / "cache").glob("*.pt")
    assert torch.load(cached, weights_only=True)["input_transform"]["size"] == 24
