"""The run directory: --run.overwrite empties only a directory kd created as a run directory (its `.kd-run`
marker), never `.`, a parent, the working directory or a foreign folder, and only after every check; a run
holds an exclusive lock on its directory, so a second run on it refuses in one line before writing."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

import train
from kd_cli.rundir import MARKER

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--preset",
    "smoke",
    "--method",
    "ce",
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


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def refused(capsys, *args: str) -> str:
    code = train.main([*TINY, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_overwrite_never_deletes_what_is_not_a_kd_run_directory(capsys, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "runs" / "teacher_cache").mkdir(parents=True)
    (work / "runs" / "teacher_cache" / "t.pt").write_text("a teacher")
    (work / "notes.txt").write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "data.bin").write_text("keep")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for name in (".", "..", "../..", str(tmp_path / "elsewhere"), "a/../..", "teacher_cache"):
        err = refused(capsys, "--run.name", name, "--run.overwrite", "True")
        assert "--run.name" in err or "not a kd run directory" in err, err
    # --run.out-dir may point anywhere, but the directory it names still needs the marker, and the
    # working directory and its parents are never deleted, marker or not
    assert "not a kd run directory" in refused(
        capsys, "--run.out-dir", str(tmp_path), "--run.name", "elsewhere", "--run.overwrite", "True"
    )
    (work / MARKER).write_text("")
    before = snapshot(tmp_path)
    err = refused(capsys, "--run.out-dir", "..", "--run.name", "work", "--run.overwrite", "True")
    assert "working directory" in err
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_run_directory_only_after_every_check(capsys, tmp_path):
    out = ["--run.out-dir", str(tmp_path / "runs"), "--run.name", "r"]
    assert train.main([*TINY, *out]) == 0
    run_dir = tmp_path / "runs" / "r"
    assert (run_dir / MARKER).is_file() and (run_dir / "summary.json").is_file()
    (run_dir / "mine.txt").write_text("x")
    capsys.readouterr()
    before = snapshot(run_dir)
    # a bad teacher checkpoint (checked after the run directory was chosen): the old run stays whole
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    err = refused(
        capsys,
        *out,
        "--run.overwrite",
        "True",
        "--method",
        "kd",
        "--teachers",
        "resnet8",
        "--teachers.checkpoints",
        str(bad),
        "--teachers.cache-dir",
        str(tmp_path / "cache"),
    )
    assert str(bad) in err
    assert snapshot(run_dir) == before
    assert train.main([*TINY, *out, "--run.overwrite", "True"]) == 0
    assert not (run_dir / "mine.txt").exists() and (run_dir / "summary.json").is_file()


def test_a_second_run_on_a_held_directory_refuses_before_writing(capsys, tmp_path):
    out = ["--run.out-dir", str(tmp_path / "runs"), "--run.name", "r"]
    assert train.main([*TINY, *out, "--run.ckpt-every-steps", "1"]) == 0
    run_dir = tmp_path / "runs" / "r"
    capsys.readouterr()
    fd = os.open(run_dir / MARKER, os.O_RDWR)  # another process's run holds the directory (flock is per open file)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot(run_dir)
        for extra in (["--run.resume", "auto"], ["--run.overwrite", "True"], ["--run.resume", str(run_dir)]):
            assert "is in use by another run" in refused(capsys, *out, *extra)
        assert snapshot(run_dir) == before
    finally:
        os.close(fd)
    assert train.main([*TINY, *out, "--run.resume", "auto"]) == 0  # released: it continues
