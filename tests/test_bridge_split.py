"""--asmb.bridge-split F (docs/asmb.md, "Stage order"): the training split divided per class, seeded by
--data.split-seed only, into a teacher-fit part (stage 0) and a bridge part (phase A); phase B trains on all of
it. Off (0) every identity and loader is what it was. Tiny runs on the synthetic data of the smoke preset."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from kd.data import bridge_split
from kd.errors import ConfigError
from kd.teachers import teacher_cache_path, teacher_identities, teacher_key, whole_split_identity
from test_resume import assert_same_run, train_cli

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# 400 synthetic images, 10 classes: 360 train (36 a class) after the validation split; F 0.2 -> 7 a class bridge
TINY = [
    "--preset",
    "smoke",
    "--method",
    "asmb",
    "--data.synthetic-train-size",
    "400",
    "--data.synthetic-test-size",
    "100",
    "--data.batch-size",
    "32",
    "--teachers.epochs",
    "1",
    "--run.max-steps-per-epoch",
    "2",
    "--asmb.num-stages",
    "2",
    "--asmb.teacher-epochs",
    "1",
    "--asmb.student-epochs",
    "1",
    "--wandb.mode",
    "disabled",
]


def cfg_data(*flags: str):
    cfg = train.parse_config([*TINY, *flags])
    train.validate(cfg)
    return cfg, train.load_data(cfg)


def test_parts_are_disjoint_stratified_cover_the_training_split_and_follow_the_split_seed_only():
    cfg, data = cfg_data("--asmb.bridge-split", "0.2")
    labels = data.train_labels
    fit_idx, bridge_idx = bridge_split(labels, 0.2, cfg.data.split_seed)
    assert not set(fit_idx.tolist()) & set(bridge_idx.tolist())
    assert torch.equal(torch.cat([fit_idx, bridge_idx]).sort().values, torch.arange(len(labels)))
    per_class, bridge_per_class = torch.bincount(labels), torch.bincount(labels[bridge_idx], minlength=10)
    assert torch.equal(bridge_per_class, (per_class * 0.2).round().long())  # stratified: round(n_c F) each
    fit, bridge = train.bridge_parts(cfg, data)
    assert torch.equal(fit.train_images, data.train_images[fit_idx])
    assert torch.equal(bridge.train_labels, labels[bridge_idx]) and len(bridge.train) == len(bridge_idx) == 70
    assert fit.val is data.val and bridge.test is data.test  # validation and test unchanged
    # --run.seed changes nothing; another --data.split-seed gives another split of the same labels
    cfg5, data5 = cfg_data("--asmb.bridge-split", "0.2", "--run.seed", "5")
    assert torch.equal(train.bridge_parts(cfg5, data5)[1].train_images, bridge.train_images)
    assert not torch.equal(bridge_split(labels, 0.2, 1)[1], bridge_idx)
    assert torch.equal(bridge_split(labels, 0.2, cfg.data.split_seed)[1], bridge_idx)  # deterministic
    assert train.bridge_parts(cfg_data()[0], data) is None  # off by default
    cfg_kd, _ = cfg_data("--asmb.bridge-split", "0.2", "--method", "kd", "--teachers", "resnet20")
    assert train.bridge_parts(cfg_kd, data) is None  # an asmb option


def test_the_teacher_identity_records_the_split_and_is_unchanged_without_it():
    cfg, data = cfg_data()
    args = (cfg.teachers, cfg.optim, cfg.data, cfg.run, data, True)
    before = teacher_identities(*args)
    assert teacher_identities(*args, bridge_split=0.0) == before  # the same dicts, so the same cache keys
    assert all("bridge_split" not in i["data"] for i in before)
    split = teacher_identities(*args, bridge_split=0.2)
    for whole, part in zip(before, split):
        assert part["data"]["bridge_split"] == 0.2 and whole_split_identity(part) == whole
        assert teacher_key(part) != teacher_key(whole)
        assert teacher_cache_path("c", part) != teacher_cache_path("c", whole)


def test_stage_0_fits_the_teacher_part_phase_a_the_bridge_part_phase_b_all(tmp_path, monkeypatch, capsys):
    """The images each phase's training loader holds, recorded at fit(); and the run's summary and first lines."""
    seen, real_fit = {}, train.fit

    def fit(ctx, tr, loaders, epochs, tag, *args):
        seen[tag] = loaders["train"].images
        return real_fit(ctx, tr, loaders, epochs, tag, *args)

    monkeypatch.setattr(train, "fit", fit)
    flags = [
        "--asmb.bridge-split",
        "0.2",
        "--run.out-dir",
        str(tmp_path / "runs"),
        "--run.name",
        "bridge",
        "--teachers.cache-dir",
        str(tmp_path / "cache"),
    ]
    summary = train.run(train.parse_config([*TINY, *flags]))
    cfg, data = cfg_data(*flags)
    fit_part, bridge_part = train.bridge_parts(cfg, data)
    assert sorted(seen) == ["asmb:A:s1", "asmb:A:s2", "asmb:B:s1", "asmb:B:s2", "teacher:resnet20", "teacher:wrn_16_2"]
    for tag, images in seen.items():
        want = {"teacher": fit_part, "asmb:A": bridge_part}.get(tag.rsplit(":", 1)[0], data).train_images
        assert torch.equal(images, want), tag
    assert summary["data/teacher_fit_images"] == 290 and summary["data/bridge_images"] == 70
    assert (
        "bridge split 0.2: the teachers fit 290 training images, phase A trains on the other 70 (the bridge "
        "part), phase B on all 360" in capsys.readouterr().out
    )
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*.pt"))
    ids = teacher_identities(cfg.teachers, cfg.optim, cfg.data, cfg.run, data, True, bridge_split=0.2)
    assert cached == sorted(teacher_cache_path(tmp_path / "cache", i).name for i in ids)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--asmb.bridge-split", "1"], "--asmb.bridge-split must be in [0, 1), got 1.0"),
        (["--asmb.bridge-split", "-0.1"], "--asmb.bridge-split must be >= 0, got -0.1"),
        (
            ["--asmb.bridge-split", "0.05"],
            "--asmb.bridge-split 0.05: the bridge part has 20 images, fewer than --data.batch-size 32",
        ),
        (
            ["--asmb.bridge-split", "0.5", "--data.synthetic-train-size", "20", "--data.batch-size", "4"],
            "--asmb.bridge-split 0.5: class class_0 has 1 training image(s), none left for the bridge part",
        ),
    ],
)
def test_bad_values_stop_before_anything_is_written(tmp_path, flags, message):
    args = [*TINY, "--run.out-dir", str(tmp_path / "runs"), "--teachers.cache-dir", str(tmp_path / "cache"), *flags]
    with pytest.raises(ConfigError) as e:
        train.run(train.parse_config(args))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_a_bad_value_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *TINY,
            "--asmb.bridge-split",
            "0.05",
            "--run.out-dir",
            str(tmp_path / "runs"),
            "--teachers.cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        "error: --asmb.bridge-split 0.05: the bridge part has 20 images, fewer than --data.batch-size 32"
    )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_killed_in_phase_a_and_resumed_equals_uninterrupted(tmp_path):
    """tests/test_resume.py's tiny deterministic asmb run with a bridge split (220 train images, 40 in the bridge
    part: 2 phase-A steps an epoch): killed in stage 2's phase A, resumed, it ends as the uninterrupted run."""
    args = [
        "--method",
        "asmb",
        "--teachers",
        "resnet8,resnet14",
        "--teachers.epochs",
        "1",
        "--asmb.bridge-split",
        "0.2",
    ]
    ref = train_cli(tmp_path, "ref", *args)
    assert ref.returncode == 0, ref.stderr
    assert "phase A trains on the other 40 (the bridge part)" in ref.stdout
    killed = train_cli(tmp_path, "killed", *args, kill_at=16)  # stage 0: 1-6, s1: A 7-8, B 9-14; s2: A 15-16
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last = torch.load(tmp_path / "runs" / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert last["phase"] == "asmb:A:s2"
    resumed = train_cli(tmp_path, "killed", *args, "--run.resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path, "ref", "killed")


def test_a_given_whole_split_teacher_is_used_as_given_with_a_note(tmp_path, capsys):
    """--teachers.checkpoints with a bridge split: a file of the same teacher fit on the whole training split is
    accepted (one note: the bridge part is not held out from it); a file of another teacher is still refused."""
    from kd.errors import CheckpointError
    from kd.models import create_model
    from kd.teachers import load_teacher, save_teacher

    cfg, data = cfg_data("--teachers", "resnet8,resnet14")
    args = (cfg.teachers, cfg.optim, cfg.data, cfg.run, data, True)
    (whole, _), (split, _) = teacher_identities(*args), teacher_identities(*args, bridge_split=0.2)
    model = create_model("resnet8", 10, small_input=True)
    save_teacher(tmp_path / "whole.pt", model, model.state_dict(), 50.0, whole)
    load_teacher(tmp_path / "whole.pt", "resnet8", 10, True, identity=split)
    assert "was fit on the whole training split: used as given" in capsys.readouterr().out
    load_teacher(tmp_path / "whole.pt", "resnet8", 10, True, identity=whole)
    assert "used as given" not in capsys.readouterr().out
    save_teacher(tmp_path / "split.pt", model, model.state_dict(), 50.0, split)
    with pytest.raises(CheckpointError, match="data.bridge_split is None here but 0.2 there"):
        load_teacher(tmp_path / "split.pt", "resnet8", 10, True, identity=whole)
