"""Bad input stops before any work: one line on stderr, exit code 2, nothing created or overwritten.
(tests/test_train.py covers an unknown method or model, val fraction 1.5, a negative lr, a NaN temperature,
a missing tiny-imagenet root and an existing run directory through the CLI; these run train.main in-process.)"""

from __future__ import annotations

from pathlib import Path

import pytest

import train

TINY = ["--preset", "smoke", "--data.synthetic-train-size", "200", "--data.synthetic-test-size", "50",
        "--data.batch-size", "16", "--optim.epochs", "1", "--run.max-steps-per-epoch", "2", "--wandb.mode", "disabled"]


def refused(capsys, tmp_path: Path, *args: str) -> str:
    code = train.main([*TINY, "--run.out-dir", str(tmp_path / "runs"), "--teachers.cache-dir",
                       str(tmp_path / "cache"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("args, message", [
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
    (["--run.resume", "auto"], "--run.resume auto needs --run.name"),
    (["--run.resume", "auto", "--run.name", "r", "--run.overwrite", "True"], "exclude each other"),
    (["--run.resume", "/nonexistent/run"], "no such checkpoint file or run directory"),
])
def test_bad_input_one_line_exit_2_nothing_created(capsys, tmp_path, args, message):
    assert message in refused(capsys, tmp_path, *args)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_existing_run_directory_refused_before_data_or_models(capsys, tmp_path, monkeypatch):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "notes.txt").write_text("mine")
    monkeypatch.setattr(train, "build_data", lambda *a, **k: pytest.fail("data built before the refusal"))
    err = refused(capsys, tmp_path, "--run.name", "taken")
    assert "exists" in err and "--run.resume auto" in err and "--run.overwrite True" in err
    assert [p.name for p in (tmp_path / "runs" / "taken").iterdir()] == ["notes.txt"]


def test_resume_into_another_existing_run_directory_is_refused(capsys, tmp_path):
    assert train.main([*TINY, "--method", "ce", "--run.out-dir", str(tmp_path / "runs"), "--run.name", "a"]) == 0
    (tmp_path / "runs" / "b").mkdir()
    (tmp_path / "runs" / "b" / "notes.txt").write_text("mine")
    capsys.readouterr()
    err = refused(capsys, tmp_path, "--method", "ce", "--run.name", "b", "--run.resume",
                  str(tmp_path / "runs" / "a" / "checkpoints" / "last.pt"))
    assert "runs/b exists and is not the run of" in err
    assert [p.name for p in (tmp_path / "runs" / "b").iterdir()] == ["notes.txt"]
