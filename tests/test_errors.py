"""Bad input stops before any work: one line on stderr, exit code 2, nothing created or overwritten.
(tests/test_train.py covers an unknown method or model, val fraction 1.5, a negative lr, a NaN temperature,
a missing tiny-imagenet root and an existing run directory through the CLI; these run train.main in-process.)"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import kd_cli.session
import train
from kd.models import create_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--preset",
    "smoke",
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
    "--wandb.mode",
    "disabled",
]


def refused(capsys, tmp_path: Path, *args: str) -> str:
    code = train.main(
        [*TINY, "--run.out-dir", str(tmp_path / "runs"), "--teachers.cache-dir", str(tmp_path / "cache"), *args]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.val-fraction", "0"], "--data.val-fraction must be in (0, 1), got 0.0"),
        (["--data.val-fraction", "nan"], "--data.val-fraction must be finite"),
        (["--optim.momentum", "nan"], "--optim.momentum must be finite, got nan"),
        (["--optim.weight-decay", "-1e-4"], "--optim.weight-decay must be >= 0"),
        (["--student.drop-rate", "-0.1"], "--student.drop-rate must be >= 0"),
        (["--student.drop-rate", "1.0"], "--student.drop-rate must be < 1"),
        (["--teachers.lr", "inf"], "--teachers.lr must be finite"),
        (["--data.batch-size", "0"], "--data.batch-size must be > 0"),
        (["--data.batch-size", "5000"], "--data.batch-size 5000 is larger than the training split"),
        (["--optim.warmup-epochs", "3"], "--optim.warmup-epochs must be < --optim.epochs"),
        (["--method", "kd", "--teachers", "no_such_teacher"], "unknown model 'no_such_teacher'"),
        (["--method", "kd", "--teachers.select", "1", "--teachers", "resnet8"], "--teachers.select 1 but only 1"),
        (["--method", "asmb", "--asmb.mbm-query-dim", "7"], "mbm query dim 7"),
        (["--data.dataset", "imagefolder", "--data.root", "/nonexistent/imagenet100"], "/nonexistent/imagenet100"),
        (["--run.keep-last", "0"], "--run.keep-last must be >= 1"),
        (["--run.dist-timeout-min", "0"], "--run.dist-timeout-min must be > 0, got 0.0"),
        (["--data.max-extract-files", "0"], "--data.max-extract-gb must be > 0 and --data.max-extract-files >= 1"),
        (["--run.resume", "auto"], "--run.resume auto needs --run.name"),
        (["--run.resume", "auto", "--run.name", "r", "--run.overwrite", "True"], "exclude each other"),
        (["--run.resume", "/nonexistent/run"], "no such checkpoint file or run directory"),
        (["--run.seed", "-1"], "--run.seed must be >= 0, got -1"),
        (["--run.seed", "4294967296"], "--run.seed must be in [0, 2**32), got 4294967296"),
        (["--optim.momentum", "5"], "--optim.momentum must be in [0, 1), got 5.0"),
        (["--optim.gamma", "0"], "--optim.gamma must be > 0"),
        (["--data.image-size", "100000"], "must be <= 1024"),
        (["--run.name", ".."], "--run.name '..' must be a relative name"),
        (
            ["--method", "kd", "--teachers", "resnet8", "--teachers.checkpoints", "/nonexistent/t.pt"],
            "checkpoint not found: /nonexistent/t.pt",
        ),
    ],
)
def test_bad_input_one_line_exit_2_nothing_created(capsys, tmp_path, args, message):
    assert message in refused(capsys, tmp_path, *args)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_existing_run_directory_refused_before_data_or_models(capsys, tmp_path, monkeypatch):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "notes.txt").write_text("mine")
    monkeypatch.setattr(train, "load_dataset", lambda *a, **k: pytest.fail("data built before the refusal"))
    err = refused(capsys, tmp_path, "--run.name", "taken")
    assert "exists" in err and "--run.resume auto" in err and "--run.overwrite True" in err
    assert [p.name for p in (tmp_path / "runs" / "taken").iterdir()] == ["notes.txt"]


def test_resume_into_another_existing_run_directory_is_refused(capsys, tmp_path):
    assert train.main([*TINY, "--method", "ce", "--run.out-dir", str(tmp_path / "runs"), "--run.name", "a"]) == 0
    (tmp_path / "runs" / "b").mkdir()
    (tmp_path / "runs" / "b" / "notes.txt").write_text("mine")
    capsys.readouterr()
    err = refused(
        capsys,
        tmp_path,
        "--method",
        "ce",
        "--run.name",
        "b",
        "--run.resume",
        str(tmp_path / "runs" / "a" / "checkpoints" / "last.pt"),
    )
    assert "runs/b exists and is not the run of" in err
    assert [p.name for p in (tmp_path / "runs" / "b").iterdir()] == ["notes.txt"]


def test_unknown_model_is_reported_before_an_archive_is_extracted(capsys, tmp_path):
    archive = tmp_path / "tiny-imagenet-200.tar.gz"
    payload = tmp_path / "wnids.txt"
    payload.write_text("n01\n")
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(payload, arcname="tiny-imagenet-200/wnids.txt")
    err = refused(
        capsys,
        tmp_path,
        "--data.dataset",
        "tiny-imagenet",
        "--data.root",
        str(archive),
        "--data.cache-dir",
        str(tmp_path / "cache"),
        "--student.model",
        "no_such_student",
    )
    assert "unknown model 'no_such_student'" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_teacher_checkpoint_with_right_metadata_but_wrong_shapes_is_one_line_before_any_write(capsys, tmp_path):
    teacher = create_model("resnet8", 10, small_input=True)
    state = teacher.state_dict()
    state["backbone.head.fc.weight"] = torch.zeros(10, 7)
    path = tmp_path / "teacher.pt"
    torch.save({"meta": teacher.meta(), "model": state}, path)
    err = refused(capsys, tmp_path, "--method", "kd", "--teachers", "resnet8", "--teachers.checkpoints", str(path))
    assert f"teacher checkpoint {path}: backbone.head.fc.weight has shape (10, 7)" in err
    del state["backbone.head.fc.weight"]
    torch.save({"meta": teacher.meta(), "model": state}, path)
    err = refused(capsys, tmp_path, "--method", "kd", "--teachers", "resnet8", "--teachers.checkpoints", str(path))
    assert "does not fit resnet8" in err and "backbone.head.fc.weight" in err
    assert not (tmp_path / "runs").exists()


def test_an_undecodable_image_is_named_before_the_run_directory(capsys, tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / "images" / split / cls
            folder.mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")
    broken = tmp_path / "images" / "train" / "b" / "3.png"
    broken.write_bytes(b"this is not a png")
    err = refused(
        capsys,
        tmp_path,
        "--data.dataset",
        "imagefolder",
        "--data.root",
        str(tmp_path / "images"),
        "--data.batch-size",
        "4",
        "--data.image-size",
        "8",
        "--data.workers",
        "0",
    )
    assert f"cannot read image {broken}" in err
    assert not (tmp_path / "runs").exists()


def test_files_honour_the_umask_and_stale_temp_files_are_removed(tmp_path):
    mask = os.umask(0o022)
    try:
        args = [*TINY, "--method", "ce", "--run.out-dir", str(tmp_path / "runs"), "--run.name", "r"]
        assert train.main(args) == 0
        run_dir = tmp_path / "runs" / "r"
        for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
            assert (run_dir / name).stat().st_mode & 0o777 == 0o644, name  # mkstemp alone gives 0600
        stale = [
            run_dir / ".metrics.jsonl.abc123.tmp",
            run_dir / ".config.json.def456.tmp",
            run_dir / "checkpoints" / ".step-000000009.pt.gh78.tmp",
        ]
        for path in stale:
            path.write_text("partial")
        assert train.main([*args, "--run.resume", "auto"]) == 0
        assert not any(path.exists() for path in stale)
    finally:
        os.umask(mask)


def test_sweep_usage_errors_are_one_line_exit_2(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "sweep.py"), "spec.yaml", "--nope", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    assert "--nope" in out.stderr and list(tmp_path.iterdir()) == []


def test_a_full_disk_during_a_write_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """torch.save reports a failed write as a 45-line RuntimeError from its C++ writer; kd says what failed."""
    from kd import io as kd_io
    from kd.errors import WriteError

    def full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(kd_io.torch, "save", full)
    with pytest.raises(WriteError, match=r"cannot write .*last.pt: the write failed; is the disk full\?"):
        kd_io.atomic_torch_save({"x": 1}, tmp_path / "ck" / "last.pt")
    assert list((tmp_path / "ck").iterdir()) == []  # no temp file, no half-written checkpoint
    monkeypatch.undo()
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if os.access(readonly, os.W_OK):  # root ignores permissions: nothing to check here
            return
        with pytest.raises(WriteError, match="cannot write .*: Permission denied"):
            kd_io.atomic_write_json({"a": 1}, readonly / "x.json")
    finally:
        readonly.chmod(0o700)


def test_an_unwritable_out_dir_exits_1_in_one_line(capsys, tmp_path, monkeypatch):
    from kd.errors import WriteError

    def refuse(obj, path):
        raise WriteError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(kd_cli.session, "atomic_write_json", refuse)
    args = [
        "--preset",
        "smoke",
        "--method",
        "ce",
        "--run.out-dir",
        str(tmp_path / "runs"),
        "--run.name",
        "x",
        "--optim.epochs",
        "1",
        "--run.max-steps-per-epoch",
        "1",
        "--wandb.mode",
        "disabled",
    ]
    assert train.main(args) == 1  # the environment, not the input: exit 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot write {tmp_path / 'runs' / 'x' / 'config.json'}: No space left on device"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run.sync-bn", "True"], "--run.sync-bn True synchronises BatchNorm across torchrun processes"),
        (["--kd.temperature", "1e-30"], "the T^2 factor would turn distillation off"),
        (["--data.image-size", "1"], "--data.image-size 1 is too small"),
    ],
)
def test_degenerate_settings_are_refused_up_front(capsys, tmp_path, args, message):
    base = ["--preset", "smoke", "--method", "kd", "--run.out-dir", str(tmp_path / "runs"), "--wandb.mode", "disabled"]
    assert train.main([*base, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_an_empty_validation_split_and_nan_in_a_summary(tmp_path):
    import json
    import math

    from kd.data import validation_split
    from kd.errors import DataError
    from kd.io import atomic_write_json

    with pytest.raises(DataError, match="the validation split is empty: each of the 3 classes has a single"):
        validation_split(torch.tensor([0, 1, 2]), 0.1, 0)
    atomic_write_json({"best/val_acc": math.nan, "rows": [math.inf, 1.5]}, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == {"best/val_acc": None, "rows": [None, 1.5]}  # strict JSON


def _zip_declaring(path: Path, members: int, declared: int) -> Path:
    """A few-hundred-byte zip (torch's checkpoint container) whose directory says each of `members` members
    holds `declared` bytes once inflated: a 'zip bomb' checkpoint, never to be loaded."""
    import struct
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(members):
            zf.writestr(f"archive/data/{i}", b"\0" * 1000)
    raw = bytearray(path.read_bytes())
    at = raw.find(b"PK\x01\x02")  # the central directory's file headers: uncompressed size at offset 24
    while at != -1:
        struct.pack_into("<I", raw, at + 24, declared)
        at = raw.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(raw))
    return path


def test_a_checkpoint_whose_zip_directory_declares_gigabytes_is_refused_without_loading(capsys, tmp_path, monkeypatch):
    import re

    from kd.errors import CheckpointError
    from kd.io import safe_torch_load
    from kd.weights import read_weights

    bomb = _zip_declaring(tmp_path / "bomb.pt", members=3, declared=0xF0000000)  # 3 x 3.75 GiB declared
    assert bomb.stat().st_size < 2000
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    expected = "would expand to 11.2 GiB in memory, above the load cap of 8 GiB ($KD_MAX_LOAD_GB"
    with pytest.raises(CheckpointError, match="^" + re.escape(f"checkpoint {bomb} {expected}")):
        safe_torch_load(bomb)
    with pytest.raises(CheckpointError, match="^" + re.escape(f"weights file {bomb} {expected}")):
        read_weights(bomb)
    err = refused(capsys, tmp_path, "--student.checkpoint", str(bomb))
    assert expected in err and not (tmp_path / "runs").exists()
    err = refused(capsys, tmp_path, "--method", "kd", "--teachers", "resnet8", "--teachers.checkpoints", str(bomb))
    assert expected in err
    monkeypatch.setenv("KD_MAX_LOAD_GB", "0.000001")  # ~1 kB: an ordinary small checkpoint is over it
    torch.save({"w": torch.zeros(1000)}, tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match=r"above the load cap of 9.99e-07 GiB"):
        safe_torch_load(tmp_path / "small.pt")
    monkeypatch.setenv("KD_MAX_LOAD_GB", "lots")
    with pytest.raises(CheckpointError, match=r"KD_MAX_LOAD_GB must be a positive number of GiB, got 'lots'"):
        safe_torch_load(tmp_path / "small.pt")
