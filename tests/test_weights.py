"""Pretrained weights from local files (--teachers.weights, --student.weights; kd/weights.py) and timm's hub weights
offline: a timm resnet18 saved with its ImageNet stem and 1000 classes starts a 32 px teacher (stem and classifier
re-initialised, said in one line); every bad input is one line, exit 2, before any run directory exists."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import train
from kd_cli import session
from kd.errors import CheckpointError
from kd.models import create_model
from kd.teachers import teacher_cache_path, teacher_identities
from kd import weights as kd_weights

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--method",
    "kd",
    "--data.dataset",
    "synthetic",
    "--data.synthetic-classes",
    "20",
    "--data.synthetic-train-size",
    "120",
    "--data.synthetic-test-size",
    "20",
    "--data.synthetic-image-size",
    "32",
    "--data.batch-size",
    "16",
    "--data.workers",
    "0",
    "--optim.epochs",
    "1",
    "--teachers.epochs",
    "1",
    "--run.max-steps-per-epoch",
    "1",
    "--student.model",
    "resnet8",
    "--wandb.mode",
    "disabled",
]


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    """timm's resnet18 as ImageNet weights come: 7x7/2 stem, max-pool, 1000 classes (random init is enough)."""
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=1000)


@pytest.fixture
def r18_file(tmp_path, resnet18) -> Path:
    path = tmp_path / "resnet18_in1k.pt"
    torch.save(resnet18.state_dict(), path)
    return path


def args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        *TINY,
        "--run.out-dir",
        str(tmp_path / "runs"),
        "--teachers.cache-dir",
        str(tmp_path / "cache"),
        "--run.name",
        "w",
        *extra,
    ]


def test_a_timm_resnet18_file_starts_a_32px_teacher_end_to_end(tmp_path, r18_file, capsys):
    code = train.main(
        args(
            tmp_path,
            "--teachers.models",
            "resnet18",
            "--teachers.weights",
            str(r18_file),
            "--teachers.pretrained",
            "False",
        )
    )
    out = capsys.readouterr().out
    assert code == 0
    (line,) = [x for x in out.splitlines() if x.startswith("teacher resnet18: weights")]
    assert line == (
        f"teacher resnet18: weights {r18_file}; stem conv1 re-initialised for small (32/64 px) inputs "
        "(7x7/2 -> 3x3/1); classifier re-initialised (1000 -> 20 classes)"
    )
    assert (tmp_path / "runs" / "w" / "summary.json").is_file()
    (cached,) = (tmp_path / "cache").glob("*.pt")
    identity = torch.load(cached, weights_only=True)["identity"]
    assert identity["weights"] == {"sha256": hashlib.sha256(r18_file.read_bytes()).hexdigest()}
    assert identity["input"]["model_mean"] == list(timm.models.get_pretrained_cfg("resnet18").mean)


@pytest.mark.parametrize("layout", ["state_dict.pt", "safetensors", "ckpt_state_dict", "ckpt_model", "ddp"])
def test_every_file_layout_loads_the_same_weights(tmp_path, resnet18, layout):
    state = resnet18.state_dict()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "safetensors":
        safetensors.torch.save_file(state, path)
    else:
        obj = (
            {"state_dict": state, "epoch": 3}
            if layout == "ckpt_state_dict"
            else {"model": state, "optimizer": {}}
            if layout == "ckpt_model"
            else {f"module.{k}": v for k, v in state.items()}
            if layout == "ddp"
            else state
        )
        torch.save(obj, path)
    small = create_model("resnet18", 20, small_input=True, weights=str(path))
    assert small.weights_notes == [
        "stem conv1 re-initialised for small (32/64 px) inputs (7x7/2 -> 3x3/1)",
        "classifier re-initialised (1000 -> 20 classes)",
    ]
    assert torch.equal(small.backbone.layer3[1].conv2.weight, resnet18.layer3[1].conv2.weight)
    assert small.backbone.conv1.kernel_size == (3, 3) and small.backbone.fc.weight.shape == (20, 512)
    same = create_model("resnet18", 1000, weights=str(path))  # ImageNet-shaped: everything loads, nothing said
    assert same.weights_notes == [] and torch.equal(same.backbone.fc.weight, resnet18.fc.weight)
    assert torch.equal(same.backbone.conv1.weight, resnet18.conv1.weight)


def test_a_teacher_from_a_file_is_identified_by_its_content(tmp_path, r18_file):
    def key(*extra: str) -> Path:
        cfg = train.parse_config([*TINY, "--teachers.models", "resnet18", *extra])
        (identity,) = teacher_identities(cfg.teachers, cfg.optim, cfg.data, cfg.run, train.load_data(cfg), True)
        return teacher_cache_path("cache", identity)

    moved = tmp_path / "elsewhere" / "copy.pt"
    moved.parent.mkdir()
    shutil.copy(r18_file, moved)
    other = tmp_path / "other.pt"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in torch.load(r18_file).items()}, other)
    scratch = key("--teachers.pretrained", "False")
    from_file = key("--teachers.pretrained", "False", "--teachers.weights", str(r18_file))
    assert from_file != scratch != key("--teachers.pretrained", "True")
    assert key("--teachers.pretrained", "False", "--teachers.weights", str(moved)) == from_file  # not the path
    assert key("--teachers.pretrained", "False", "--teachers.weights", str(other)) not in (from_file, scratch)
    cfg = train.parse_config([*TINY, "--teachers.models", "resnet18", "--teachers.pretrained", "False"])
    (identity,) = teacher_identities(cfg.teachers, cfg.optim, cfg.data, cfg.run, train.load_data(cfg), True)
    assert "weights" not in identity  # identities without a file are what they were (cached teachers stay valid)


def bad_files(tmp_path: Path, r18_file: Path) -> dict[str, Path]:
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    not_state = tmp_path / "opt.pt"
    torch.save({"epoch": 1, "optimizer": {"lr": 0.1}}, not_state)
    wrong_shape = tmp_path / "wrong_shape.pt"
    state = torch.load(r18_file)
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save(state, wrong_shape)
    return {"junk": junk, "not_state": not_state, "wrong_shape": wrong_shape, "r18": r18_file}


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ["--teachers.weights", "{tmp}/missing.pt", "--teachers.pretrained", "False"],
            "--teachers.weights: file {tmp}/missing.pt not found",
        ),
        (
            [
                "--teachers.models",
                "resnet18",
                "resnet8",
                "--teachers.weights",
                "{r18}",
                "--teachers.pretrained",
                "False",
            ],
            "--teachers.weights has 1 files for 2 teachers (resnet18, resnet8)",
        ),
        (["--teachers.weights", "{r18}"], "pass --teachers.pretrained False with --teachers.weights"),
        (["--teachers.weights", "{junk}", "--teachers.pretrained", "False"], "is not a readable torch.save file"),
        (
            ["--teachers.weights", "{not_state}", "--teachers.pretrained", "False"],
            "holds no state dict (found a dict with keys epoch, optimizer",
        ),
        (
            ["--teachers.weights", "{wrong_shape}", "--teachers.pretrained", "False"],
            "layer2.0.conv1.weight has shape (128, 64, 5, 5), resnet18 expects (128, 64, 3, 3)",
        ),
        (
            ["--teachers.models", "resnet34", "--teachers.weights", "{r18}", "--teachers.pretrained", "False"],
            "does not fit resnet34: 80 missing keys",
        ),
        (
            [
                "--teachers.pretrained",
                "False",
                "--student.model",
                "resnet18",
                "--student.weights",
                "{r18}",
                "--student.checkpoint",
                "{r18}",
            ],
            "--student.weights and --student.checkpoint",
        ),
        (
            ["--teachers.pretrained", "False", "--student.model", "resnet18", "--student.weights", "{tmp}"],
            "--student.weights: {tmp} is not a readable file",
        ),
        (["--teachers.pretrained", "True"], "--teachers.pretrained True needs timm's pretrained weights of resnet18"),
        (
            ["--teachers.pretrained", "False", "--student.model", "resnet18", "--student.pretrained", "True"],
            "--student.pretrained True needs timm's pretrained weights of resnet18",
        ),
        (
            ["--teachers.models", "resnet8", "--teachers.pretrained", "True"],
            "timm has no pretrained weights for resnet8: pass --teachers.pretrained False",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run_directory(tmp_path, r18_file, capsys, extra, expected):
    names = {"tmp": tmp_path, **bad_files(tmp_path, r18_file)}
    code = train.main(args(tmp_path, "--teachers.models", "resnet18", *(a.format(**names) for a in extra)))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected.format(**names) in err, err
    if "pretrained True needs" in expected:  # offline (tests set HF_HUB_OFFLINE): the flag that works instead
        assert "weights FILE" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "runs").exists()


def test_offline_without_hf_hub_offline_fails_at_once_when_the_hub_does_not_answer(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    probed = []
    monkeypatch.setattr(kd_weights, "host_reachable", lambda host: probed.append(host) or False)
    assert kd_weights.hub_weights_status("resnet18") == ("offline", "huggingface.co cannot be reached")
    assert probed == ["huggingface.co"]  # one probe, no download attempt (no retries)
    with pytest.raises(train.ConfigError, match="--teachers.weights FILE"):
        session.check_hub_weights("resnet18", "--teachers")


def test_hub_weights_in_the_local_cache_work_offline(tmp_path, resnet18, monkeypatch):
    """Weights timm downloaded earlier (the Hugging Face cache) are used without the network: with HF_HUB_OFFLINE,
    and without it when the hub does not answer (huggingface_hub is then switched to its cache: no retries)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    safetensors.torch.save_file(resnet18.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(kd_weights, "host_reachable", lambda host: False)
    status, path = kd_weights.hub_weights_status("resnet18")
    assert status == "cached" and path.endswith("model.safetensors") and constants.HF_HUB_OFFLINE
    session.check_hub_weights("resnet18", "--teachers")  # no error
    model = create_model("resnet18", 10, pretrained=True, small_input=True)
    assert torch.equal(model.backbone.layer4[0].conv1.weight, resnet18.layer4[0].conv1.weight)


def test_a_headless_file_and_other_architectures(tmp_path, resnet18):
    headless = tmp_path / "headless.pt"
    torch.save({k: v for k, v in resnet18.state_dict().items() if not k.startswith("fc.")}, headless)
    assert create_model("resnet18", 5, weights=str(headless)).weights_notes == [
        "classifier initialised (none in the file; 5 classes)"
    ]
    # a patch-embedding model at 32 px: timm's own checkpoint filter resamples the patch and position embeddings
    vit = tmp_path / "vit.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), vit)
    notes = create_model("vit_tiny_patch16_224", 10, small_input=True, weights=str(vit)).weights_notes
    assert notes == [
        "patch_embed.proj.weight, pos_embed resampled by timm to the model's patch/grid size",
        "classifier re-initialised (1000 -> 10 classes)",
    ]
    with pytest.raises(CheckpointError, match="does not fit resnet18: .* missing keys .* unexpected keys"):
        create_model("resnet18", 10, weights=str(vit))
