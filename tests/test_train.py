"""train.py end to end on tiny synthetic data: every method, run directory contents, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--preset",
    "smoke",
    "--data.synthetic-train-size",
    "400",
    "--data.synthetic-test-size",
    "100",
    "--data.batch-size",
    "32",
    "--optim.epochs",
    "2",
    "--teachers.epochs",
    "1",
    "--run.max-steps-per-epoch",
    "3",
]


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        *TINY,
        "--run.out-dir",
        str(tmp_path / "runs"),
        "--teachers.cache-dir",
        str(tmp_path / "cache"),
        "--wandb.mode",
        "disabled",
        *extra,
    ]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=300,
    )


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["ce", "kd"])
def test_method_runs_and_writes_run_dir(tmp_path, method):
    summary = train.run(train.parse_config(tiny_args(tmp_path, "--method", method, "--run.name", method)))
    run_dir = tmp_path / "runs" / method
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.jsonl", "summary.json", "checkpoints"}
    # a checkpoint per epoch end named by the run-wide step (kd: after 2 x 3 teacher fine-tuning steps), the
    # newest 2 kept (--run.keep-last), last.pt = the newest, best.pt = the selected model (+ its timm weights)
    ends = (3, 6) if method == "ce" else (9, 12)
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {
        "last.pt",
        "best.pt",
        "best.safetensors",
        *(f"step-{n:09d}.pt" for n in ends),
    }
    rows = [r for r in read_rows(run_dir) if r["phase"] == method]
    assert [r["epoch"] for r in rows] == [1, 2]
    expected_terms = {"ce"} if method == "ce" else {"ce", "kd"}
    assert {k[len("train/") :] for k in rows[0] if k.startswith("train/")} == expected_terms | {"loss", "img_per_s"}
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["method"] == method and saved == json.loads(json.dumps(summary))
    for key in ("best/test_acc", "last/test_acc", "best/val_acc"):
        assert 0.0 <= saved[key] <= 100.0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == method and config["data"]["dataset"] == "synthetic"
    if method == "kd":  # stage 0 ran first and cached both teachers
        assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
        assert any(r["phase"].startswith("teacher:") for r in read_rows(run_dir))


def test_kd_loss_is_weighted_sum_of_terms(tmp_path):
    train.run(
        train.parse_config(
            tiny_args(tmp_path, "--method", "kd", "--run.name", "w", "--kd.ce-weight", "0.3", "--kd.kd-weight", "2.0")
        )
    )
    row = [r for r in read_rows(tmp_path / "runs" / "w") if r["phase"] == "kd"][0]
    assert row["train/loss"] == pytest.approx(0.3 * row["train/ce"] + 2.0 * row["train/kd"], rel=1e-5)


def test_teacher_method_fills_cache_and_is_reused(tmp_path):
    train.run(train.parse_config(tiny_args(tmp_path, "--method", "teacher", "--run.name", "t")))
    cached = sorted((tmp_path / "cache").glob("*.pt"))
    assert len(cached) == 2 and all("synthetic-" in p.name and "-small-10c-s0-" in p.name for p in cached)
    mtimes = [p.stat().st_mtime_ns for p in cached]
    train.run(train.parse_config(tiny_args(tmp_path, "--method", "kd", "--run.name", "k")))
    assert [p.stat().st_mtime_ns for p in cached] == mtimes  # reused, not re-trained
    assert not any(r["phase"].startswith("teacher:") for r in read_rows(tmp_path / "runs" / "k"))


def test_best_checkpoint_is_a_copy_not_the_live_weights(tmp_path):
    import torch

    train.run(train.parse_config(tiny_args(tmp_path, "--method", "ce", "--run.name", "c", "--optim.epochs", "3")))
    ck = tmp_path / "runs" / "c" / "checkpoints"
    best = torch.load(ck / "best.pt", weights_only=True)
    last = torch.load(ck / "last.pt", weights_only=True)
    rows = read_rows(tmp_path / "runs" / "c")
    best_epoch = max(range(len(rows)), key=lambda i: (rows[i]["val/acc"], -i)) + 1
    assert best["val_acc"] == rows[best_epoch - 1]["val/acc"]
    if best_epoch != 3:
        assert any(
            not torch.equal(best["model"][k], last["model"][k])
            for k in best["model"]
            if best["model"][k].is_floating_point()
        )


def test_wandb_style_bool_and_comma_teachers_parse():
    cfg = train.parse_config(["--preset", "smoke", "--data.aug=False", "--teachers", "resnet20,resnet8"])
    assert cfg.data.aug is False and cfg.teachers.models == ("resnet20", "resnet8")
    assert cfg.data.dataset == "synthetic"  # preset applied, flags on top


def test_help_documents_every_group():
    out = run_cli("--help")
    assert out.returncode == 0
    for flag in (
        "--method",
        "--preset",
        "--data.dataset",
        "--data.val-fraction",
        "--student.model",
        "--teachers.models",
        "--optim.lr",
        "--optim.schedule",
        "--run.seed",
        "--run.amp",
        "--wandb.mode",
        "--kd.temperature",
    ):
        assert flag in out.stdout, flag


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nope"], "--method"),
        (["--data.val-fraction", "1.5"], "--data.val-fraction must be in (0, 1)"),
        (["--optim.lr", "-1"], "--optim.lr must be >= 0"),
        (["--kd.temperature", "nan"], "--kd.temperature must be finite"),
        (["--student.model", "no_such_net"], "unknown model 'no_such_net'"),
        (["--data.dataset", "tiny-imagenet", "--data.root", "/nonexistent/tiny"], "/nonexistent/tiny"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, args, message):
    out = run_cli(*tiny_args(tmp_path, *args), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_existing_run_dir_is_refused_and_untouched(tmp_path):
    run_dir = tmp_path / "runs" / "taken"
    run_dir.mkdir(parents=True)
    (run_dir / "keep.txt").write_text("precious")
    out = run_cli(*tiny_args(tmp_path, "--method", "ce", "--run.name", "taken"), cwd=tmp_path)
    assert out.returncode == 2 and "exists" in out.stderr and "Traceback" not in out.stderr
    assert (run_dir / "keep.txt").read_text() == "precious"
    assert [p.name for p in run_dir.iterdir()] == ["keep.txt"]


def test_student_numbers_do_not_depend_on_whether_stage0_ran_in_the_same_process(tmp_path):
    """A reported number must repeat: the kd student trained right after fine-tuning its teachers equals the
    one trained later from the cached teachers."""
    import torch

    train.run(train.parse_config(tiny_args(tmp_path, "--method", "kd", "--run.name", "first")))
    train.run(train.parse_config(tiny_args(tmp_path, "--method", "kd", "--run.name", "second")))
    rows = [[r for r in read_rows(tmp_path / "runs" / n) if r["phase"] == "kd"] for n in ("first", "second")]
    assert [r["train/loss"] for r in rows[0]] == [r["train/loss"] for r in rows[1]]
    a, b = (
        torch.load(tmp_path / "runs" / n / "checkpoints" / "last.pt", weights_only=True)["model"]
        for n in ("first", "second")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_console_is_kept_in_train_log_and_the_run_ends_with_a_summary_in_words(tmp_path, capsys):
    args = [
        "--preset",
        "smoke",
        "--method",
        "kd",
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
        "--run.out-dir",
        str(tmp_path / "runs"),
        "--run.name",
        "r",
        "--teachers.cache-dir",
        str(tmp_path / "cache"),
    ]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    log = (tmp_path / "runs" / "r" / "train.log").read_text()
    assert "[kd] epoch 1/1" in log and "results" in log and log.strip() in out.replace("\r", "")
    words = out[out.index("summary\n") : out.index("results")]
    assert "teachers (test): resnet8 " in words and "student (test): " in words and "selected on validation" in words
    assert f"files: {tmp_path / 'runs' / 'r'}/" in words
