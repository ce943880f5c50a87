"""Runs that survive: a deterministic CPU run killed with SIGKILL at a chosen step and resumed with
--run.resume ends bit-identical to the uninterrupted run; checkpoints are atomic and pruned; corrupt,
foreign or mismatched checkpoints are refused with one line; a diverged run stops naming step and term.

Every training run is a subprocess (SIGKILL needs one; one thread each so runs compare bit for bit);
refusals, which stop before any work, run in-process through train.main."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kd_cli.session
import train
from kd_cli.config import RESUME_MAY_CHANGE
from kd.engine.checkpoint import _float_tensors, check_resume_config, find_resume
from kd.io import atomic_torch_save

ROOT = Path(__file__).resolve().parents[1]

# Tiny, deterministic: 16 px synthetic images, batch 16, 3 steps per epoch, a checkpoint every 2 steps.
BASE = [
    "--preset",
    "smoke",
    "--data.synthetic-train-size",
    "240",
    "--data.synthetic-test-size",
    "60",
    "--data.synthetic-image-size",
    "16",
    "--data.batch-size",
    "16",
    "--optim.epochs",
    "2",
    "--run.max-steps-per-epoch",
    "3",
    "--run.ckpt-every-steps",
    "2",
    "--run.deterministic",
    "True",
    "--student.model",
    "resnet8",
    "--wandb.mode",
    "disabled",
]
# kd: stage 0 fine-tunes two teachers (steps 1-3, 4-6), then the student trains (steps 7-9, 10-12).
KD = ["--method", "kd", "--teachers", "resnet8,resnet14", "--teachers.epochs", "1"]
# ce on the DataLoader path: augmentation, MixUp and dropout all draw from the global torch RNG.
CE_TORCH = [
    "--method",
    "ce",
    "--data.loader",
    "torch",
    "--data.workers",
    "0",
    "--optim.mixup-alpha",
    "0.4",
    "--student.drop-rate",
    "0.3",
]


def args_for(tmp: Path, name: str, *args: str) -> list[str]:
    return [
        *BASE,
        "--run.out-dir",
        str(tmp / "runs"),
        "--run.name",
        name,
        "--teachers.cache-dir",
        str(tmp / f"cache-{name}"),
        *args,
    ]


# train.py with a pre-emption: SIGKILL right after the checkpointer's call at run-wide step N (and the checkpoint
# it made there), patched in from outside so the production path carries no test hook.
KILL_AT_STEP = """
import os, signal, sys
from kd.engine.checkpoint import Checkpointer
save = Checkpointer.save
def save_then_kill(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
Checkpointer.save = save_then_kill
import train
sys.exit(train.main(sys.argv[1:]))
"""


def train_cli(tmp: Path, name: str, *args: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    program = [str(ROOT / "train.py")] if kill_at is None else ["-c", KILL_AT_STEP.format(step=kill_at)]
    return subprocess.run(
        [sys.executable, *program, *args_for(tmp, name, *args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )


def refused(capsys, tmp: Path, name: str, *args: str) -> str:
    """Run train.main in-process for an input it must refuse before any work; the one stderr line."""
    assert train.main(args_for(tmp, name, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def final_state(tmp: Path, name: str) -> tuple[dict, dict, list]:
    run_dir = tmp / "runs" / name
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    drop = ("run_dir", "wall_time_s", "teacher_time_s", "time_s", "img_per_s", "train/img_per_s")  # timings differ
    last = {k: v for k, v in last.items() if k not in ("rows", "config", "wandb_id")}  # rows: below, sans times
    return (
        last,
        {k: v for k, v in summary.items() if k not in drop},
        [{k: v for k, v in r.items() if k not in drop} for r in rows],
    )


def assert_equal_tree(a, b, where: str = "checkpoint") -> None:
    """Bit-identical nested checkpoint content: tensors with torch.equal, everything else with ==."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(tmp: Path, a: str, b: str) -> None:
    """Same final checkpoint (weights, every auxiliary module, optimiser/schedule/scaler, loader and RNG
    states, best model), same summary and same metrics rows, up to wall times and names."""
    (ck_a, summary_a, rows_a), (ck_b, summary_b, rows_b) = final_state(tmp, a), final_state(tmp, b)
    assert_equal_tree(ck_a, ck_b)
    assert summary_a == summary_b
    assert rows_a == rows_b  # every epoch row, stage 0 included: the resumed run redid exactly the lost steps


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def kd_reference(tmp) -> str:
    out = train_cli(tmp, "kd-ref", *KD)
    assert out.returncode == 0, out.stderr
    return "kd-ref"


@pytest.fixture(scope="module")
def ce_reference(tmp) -> str:
    out = train_cli(tmp, "ce-ref", *CE_TORCH)
    assert out.returncode == 0, out.stderr
    return "ce-ref"


def test_kd_killed_twice_and_resumed_equals_uninterrupted(tmp, kd_reference):
    """Killed inside the second teacher's fine-tuning (step 5, checkpoint at 4), resumed and killed again
    mid-epoch in the student's second epoch (step 11, checkpoint at 10), resumed to the end."""
    name = "kd-killed"
    for kill_at, phase, extra in ((5, "teacher:resnet14", ()), (11, "kd", ("--run.resume", "auto"))):
        killed = train_cli(tmp, name, *KD, *extra, kill_at=kill_at)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not (tmp / "runs" / name / "summary.json").exists()
        last = torch.load(tmp / "runs" / name / "checkpoints" / "last.pt", weights_only=True)
        assert last["phase"] == phase and last["progress"]["step"] == kill_at - 1
    resumed = train_cli(tmp, name, *KD, "--run.resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed kd at step 10 (epoch 1 done, 1 steps into the next)" in resumed.stdout
    assert_same_run(tmp, kd_reference, name)


def test_asmb_killed_in_phase_a_and_in_phase_b_and_resumed_equals_uninterrupted(tmp):
    """ASMB (smoke: 2 stages x (phase A 1 epoch, phase B 2 epochs)) after stage 0 (steps 1-6): stage 1 A is
    steps 7-9, B 10-15; stage 2 A 16-18, B 19-24. Killed inside stage 2's phase A (step 17, checkpoint at
    16), resumed and killed inside its phase B mid-epoch (step 23, checkpoint at 22), resumed to the end:
    the student, both teachers' adapted parts, MBM + head, projections, both optimisers and schedules, the
    best student and every row equal the uninterrupted run's."""
    args = ["--method", "asmb", "--teachers", "resnet8,resnet14", "--teachers.epochs", "1"]
    assert train_cli(tmp, "asmb-ref", *args).returncode == 0
    name = "asmb-killed"
    for kill_at, phase, extra in ((17, "asmb:A:s2", ()), (23, "asmb:B:s2", ("--run.resume", "auto"))):
        killed = train_cli(tmp, name, *args, *extra, kill_at=kill_at)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        last = torch.load(tmp / "runs" / name / "checkpoints" / "last.pt", weights_only=True)
        assert last["phase"] == phase and last["progress"]["step"] == kill_at - 1
    resumed = train_cli(tmp, name, *args, "--run.resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed asmb:B:s2 at step 22 (epoch 1 done, 1 steps into the next)" in resumed.stdout
    assert_same_run(tmp, "asmb-ref", name)


# train.py receiving SIGTERM (a scheduler's stop) during run-wide step N, delivered from inside the step so the
# test never depends on timing: the handler only flags it; the checkpointer's call after the step acts on it.
SIGTERM_AT_STEP = """
import os, signal, sys
from kd.engine.checkpoint import Checkpointer
save = Checkpointer.save
def signal_then_save(self, step, *args, **kwargs):
    if step == {step}:
        os.kill(os.getpid(), signal.SIGTERM)
    save(self, step, *args, **kwargs)
Checkpointer.save = signal_then_save
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigterm_checkpoints_at_the_next_step_and_resume_equals_uninterrupted(tmp, kd_reference):
    """Step 11 is mid-epoch and off the every-2-steps schedule: the stop writes a checkpoint there anyway."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT_STEP.format(step=11), *args_for(tmp, "kd-term", *KD)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    run_dir = tmp / "runs" / "kd-term"
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"stopped by SIGTERM at step 11 (kd): checkpoint {run_dir / 'checkpoints' / 'last.pt'} written; continue "
        f"with the same command and --run.resume {run_dir}"
    )
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["phase"] == "kd" and last["progress"]["step"] == 11
    resumed = train_cli(tmp, "kd-term", *KD, "--run.resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp, kd_reference, "kd-term")


def test_dataloader_path_resume_at_an_epoch_boundary(tmp, ce_reference):
    """Killed right after the epoch-1 checkpoint (step 3). The mid-epoch case of this path is covered by
    the corrupt-last test below, which resumes from the step-4 checkpoint."""
    assert train_cli(tmp, "ce-kill3", *CE_TORCH, kill_at=3).returncode == -signal.SIGKILL
    out = train_cli(tmp, "ce-kill3", *CE_TORCH, "--run.resume", str(tmp / "runs" / "ce-kill3"))  # a run directory
    assert out.returncode == 0, out.stderr
    assert_same_run(tmp, ce_reference, "ce-kill3")


def test_auto_resume_skips_a_corrupt_last_checkpoint(tmp, ce_reference):
    ref = tmp / "runs" / ce_reference / "checkpoints"
    # last.pt broken (a new file, not edited in place: it is a hard link), an older mid-epoch step file intact
    run_dir = tmp / "runs" / "ce-broken"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000000004.pt").write_bytes((ref / "step-000000004.pt").read_bytes())
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"garbage")
    out = train_cli(tmp, "ce-broken", *CE_TORCH, "--run.resume", "auto")
    assert out.returncode == 0, out.stderr
    assert "skipped 1 unreadable checkpoint" in out.stdout and "corrupt" in out.stdout
    assert "resumed ce at step 4 (epoch 1 done, 1 steps into the next)" in out.stdout
    assert_same_run(tmp, ce_reference, "ce-broken")


def test_checkpoint_files_keep_last_and_last_pt_is_the_newest(tmp, kd_reference):
    ck_dir = tmp / "runs" / kd_reference / "checkpoints"
    steps = sorted(p.name for p in ck_dir.glob("step-*.pt"))
    assert steps == ["step-000000010.pt", "step-000000012.pt"]  # --run.keep-last 2
    assert os.path.samefile(ck_dir / "last.pt", ck_dir / steps[-1])
    last = torch.load(ck_dir / "last.pt", weights_only=True)
    assert last["phase"] == "kd" and last["progress"]["step"] == 12 and last["progress"]["epoch"] == 2
    assert {"model", "method", "optimizer", "scheduler", "scaler", "loader", "rng", "rows", "config", "best"} <= set(
        last
    )
    mid = torch.load(ck_dir / "step-000000010.pt", weights_only=True)  # 1 step into epoch 2
    assert mid["progress"]["epoch"] == 1 and mid["progress"]["position"] == 1
    assert mid["progress"]["tracker"]["n"] == 1 and mid["loader"]["position"] == 1
    best = torch.load(ck_dir / "best.pt", weights_only=True)
    assert set(best) >= {"meta", "model", "val_acc"}


def test_resume_refuses_a_changed_config_with_one_line(capsys, tmp, kd_reference):
    run_dir = tmp / "runs" / kd_reference
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    for flag, value, shown in [
        ("--optim.lr", "0.1", "--optim.lr is 0.1 here but 0.05"),
        ("--student.model", "resnet14", "--student.model is resnet14 here but resnet8"),
        ("--data.batch-size", "8", "--data.batch-size is 8 here but 16"),
        ("--method", "dkd", "--method is dkd here but kd"),
    ]:
        assert shown in refused(capsys, tmp, kd_reference, *KD, flag, value, "--run.resume", "auto")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # untouched
    # what may change: checkpoint cadence, workers, devices (and paths, wandb)
    cfg = train.parse_config(
        args_for(tmp, kd_reference, *KD, "--run.resume", "auto", "--run.ckpt-every-steps", "5", "--data.workers", "3")
    )
    ck = find_resume(cfg.run.resume, Path(cfg.run.out_dir) / cfg.run.name)[1]
    check_resume_config(
        dataclasses.asdict(cfg),
        ck["config"],
        ("data", "student", "teachers", "optim", "run", "kd"),
        RESUME_MAY_CHANGE,
        "ck",
    )
    assert ck["phase"] == "kd"


def test_resume_reports_corrupt_foreign_and_missing_files(capsys, tmp, kd_reference):
    ck_dir = tmp / "runs" / kd_reference / "checkpoints"
    corrupt = tmp / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    assert "is corrupt or not a kd checkpoint" in refused(capsys, tmp, "x", *KD, "--run.resume", str(corrupt))
    truncated = tmp / "runs" / "cut" / "checkpoints" / "last.pt"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes((ck_dir / "last.pt").read_bytes()[:5000])
    assert "corrupt" in refused(capsys, tmp, "x", *KD, "--run.resume", str(truncated))
    assert "not a resumable kd checkpoint" in refused(capsys, tmp, "x", *KD, "--run.resume", str(ck_dir / "best.pt"))
    assert "no such checkpoint" in refused(capsys, tmp, "x", *KD, "--run.resume", str(tmp / "nowhere.pt"))
    assert "no checkpoint in" in refused(capsys, tmp, "x", *KD, "--run.resume", str(tmp))
    assert not (tmp / "runs" / "x").exists()


def test_divergence_stops_with_step_and_term_and_keeps_the_last_good_checkpoint(tmp):
    out = train_cli(tmp, "nan", "--method", "ce", "--optim.lr", "1e30", "--run.ckpt-every-steps", "1")
    assert out.returncode == 3, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert "training diverged at step" in line and "loss term 'ce'" in line and "Traceback" not in out.stderr
    step = int(line.split("at step ")[1].split(",")[0])
    ck_dir = tmp / "runs" / "nan" / "checkpoints"
    saved = sorted(int(p.stem.split("-")[1]) for p in ck_dir.glob("step-*.pt"))
    assert saved and max(saved) < step  # nothing saved at or after the bad step
    for path in ck_dir.glob("*.pt"):  # every tensor: weights, buffers, optimiser state, best model
        assert all(torch.isfinite(t).all() for _, t in _float_tensors(torch.load(path, weights_only=True), ""))


# One process imports train once, then forks writers (before any multithreaded torch op) and kills each
# with SIGKILL after a delay while it writes 24 MB checkpoints in a loop; after each kill it loads last.pt.
KILLER = """
import json, os, signal, sys, time, torch
from pathlib import Path
from kd.engine.checkpoint import Checkpointer
from kd.io import safe_torch_load
run_dir = Path({run_dir!r})
saves = run_dir / "saves"  # the child's count of finished saves: kills are placed by it, never by a delay
for kill in range(5):
    saves.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:
        ck = Checkpointer(run_dir, {{}}, keep_last=2)
        for step in range(1, 10_000):
            ck.save(step, "fake", lambda: {{"progress": {{}}, "blob": torch.full((6_000_000,), float(step))}},
                    epoch_end=True)
            saves.write_text(str(step))
        os._exit(0)
    # kill k after k finished saves, while a temp file is being written when one is seen (the moment that
    # matters), else right after the next save finishes
    while True:
        done = int(saves.read_text() or 0) if saves.exists() else 0
        writing = any((run_dir / "checkpoints").glob(".*.tmp")) if (run_dir / "checkpoints").is_dir() else False
        if (done >= kill and writing) or done >= kill + 1:
            break
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        print(json.dumps(None), flush=True)
        continue
    ck = safe_torch_load(last)
    intact = ck["phase"] == "fake" and bool((ck["blob"] == ck["progress"]["step"]).all())
    print(json.dumps({{"intact": intact, "steps": len(list(last.parent.glob("step-*.pt")))}}), flush=True)
Checkpointer(run_dir, {{}})  # a restart clears the temp files the kills left
print(json.dumps({{"temp_left": len(list(last.parent.glob(".*.tmp")))}}), flush=True)
"""


def test_a_kill_during_checkpoint_writes_never_leaves_an_unreadable_last(tmp):
    out = subprocess.run(
        [sys.executable, "-c", KILLER.format(run_dir=str(tmp / "atomic"))],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    *kills, end = [json.loads(line) for line in out.stdout.splitlines()]
    checked = [k for k in kills if k is not None]
    assert len(checked) >= 4  # every kill but the first lands after a finished checkpoint
    assert all(k["intact"] and k["steps"] <= 3 for k in checked)  # keep-last 2 (+1 between save and prune)
    assert end == {"temp_left": 0}


def test_wandb_run_id_is_checkpointed_and_reused_on_resume(tmp, monkeypatch):
    calls = []

    class FakeRun:
        id, offline, summary = "run-abc123", True, {}

        def log(self, row):
            pass

        def finish(self):
            pass

    def fake_init(cfg, run_dir, mode, run_id=None):
        calls.append(run_id)
        return FakeRun()

    monkeypatch.setattr(kd_cli.session, "init_wandb", fake_init)
    args = args_for(
        tmp, "wb", "--method", "ce", "--optim.epochs", "1", "--run.deterministic", "False", "--wandb.mode", "offline"
    )
    assert train.main(args) == 0
    last = torch.load(tmp / "runs" / "wb" / "checkpoints" / "last.pt", weights_only=True)
    assert last["wandb_id"] == "run-abc123"
    assert train.main([*args, "--run.resume", "auto"]) == 0  # wandb.init(id=..., resume="allow") continues it
    assert calls == [None, "run-abc123"]


def test_resume_refuses_a_checkpoint_for_another_model_shape(capsys, tmp, ce_reference):
    """Same config, but the checkpoint's model metadata says 7 classes (another dataset's checkpoint
    copied in, or a file from an older version): refused naming the mismatch, before anything is written."""
    ck = torch.load(tmp / "runs" / ce_reference / "checkpoints" / "last.pt", weights_only=True)
    ck["meta"] = {**ck["meta"], "num_classes": 7}
    path = tmp / "runs" / "other-shape" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    atomic_torch_save(ck, path)
    err = refused(capsys, tmp, "other-shape", *CE_TORCH, "--run.resume", "auto", "--run.deterministic", "False")
    assert "resume checkpoint auto: resnet8 expects 10 classes, checkpoint has 7" in err
    assert [p.name for p in (tmp / "runs" / "other-shape").rglob("*")] == ["checkpoints", "last.pt"]
    # right metadata, wrong tensor shapes (a checkpoint edited or written by other code): one line, too
    ck["meta"]["num_classes"] = 10
    ck["model"]["backbone.head.fc.weight"] = torch.zeros(10, 3)
    atomic_torch_save(ck, path)
    err = refused(capsys, tmp, "other-shape", *CE_TORCH, "--run.resume", "auto", "--run.deterministic", "False")
    assert "backbone.head.fc.weight has shape (10, 3)" in err
    del ck["model"]["backbone.head.fc.weight"]
    atomic_torch_save(ck, path)
    err = refused(capsys, tmp, "other-shape", *CE_TORCH, "--run.resume", "auto", "--run.deterministic", "False")
    assert "state dict does not match resnet8 (1 missing, e.g. ['backbone.head.fc.weight']" in err


def test_a_bit_flipped_checkpoint_is_detected_and_auto_resume_falls_back(capsys, tmp, ce_reference):
    """64 flipped bytes inside the tensor data of the newest step file (last.pt is the same file): the
    checksum catches it; auto falls back to the older step file and ends equal to the uninterrupted run;
    the file given explicitly is refused with one line."""
    ref = tmp / "runs" / ce_reference / "checkpoints"
    ck_dir = tmp / "runs" / "ce-flipped" / "checkpoints"
    ck_dir.mkdir(parents=True)
    for name in ("step-000000004.pt", "step-000000006.pt"):
        (ck_dir / name).write_bytes((ref / name).read_bytes())
    newest = bytearray((ck_dir / "step-000000006.pt").read_bytes())
    start = len(newest) // 2
    newest[start : start + 64] = bytes(b ^ 0xFF for b in newest[start : start + 64])
    (ck_dir / "step-000000006.pt").write_bytes(bytes(newest))
    os.link(ck_dir / "step-000000006.pt", ck_dir / "last.pt")
    err = refused(capsys, tmp, "ce-flipped", *CE_TORCH, "--run.resume", str(ck_dir / "step-000000006.pt"))
    assert "does not match its sha256 checksum" in err
    out = train_cli(tmp, "ce-flipped", *CE_TORCH, "--run.resume", "auto")
    assert out.returncode == 0, out.stderr
    assert "skipped 2 unreadable checkpoint(s)" in out.stdout and "sha256" in out.stdout
    assert "resumed ce at step 4" in out.stdout
    assert_same_run(tmp, ce_reference, "ce-flipped")


def test_a_state_turned_non_finite_stops_as_diverged_and_is_never_checkpointed(tmp):
    """--optim.lr 1000: the loss stays finite, but BatchNorm running statistics overflow to inf. The run
    stops with exit 3 naming the tensor (it used to finish with exit 0) and no checkpoint file holds a
    non-finite tensor (last.pt used to hold 5)."""
    out = train_cli(tmp, "inf-state", "--method", "ce", "--optim.lr", "1000", "--run.ckpt-every-steps", "1")
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert "training diverged at step" in line and "running_var is not finite" in line, line
    files = list((tmp / "runs" / "inf-state" / "checkpoints").glob("*.pt"))
    assert files
    for path in files:
        ck = torch.load(path, weights_only=True)
        for name, t in _float_tensors(ck, ""):
            assert torch.isfinite(t).all(), f"{path.name}: {name}"


def test_resuming_from_an_older_step_file_deletes_the_newer_ones_and_points_last_at_it(tmp_path):
    """README: a resume from step-N.pt abandons what came after it: newer step files are deleted at start-up
    and last.pt names step-N.pt until the resumed run writes its next checkpoint."""
    from kd.engine.checkpoint import Checkpointer

    ck_dir = tmp_path / "run" / "checkpoints"
    ck_dir.mkdir(parents=True)
    for step in (2, 4, 6):
        atomic_torch_save({"progress": {"step": step}}, ck_dir / f"step-{step:09d}.pt")
    os.link(ck_dir / "step-000000006.pt", ck_dir / "last.pt")
    older = ck_dir / "step-000000004.pt"
    Checkpointer(tmp_path / "run", {}, resume={"progress": {"step": 4}, "path": str(older)})
    assert sorted(p.name for p in ck_dir.iterdir()) == ["last.pt", "step-000000002.pt", "step-000000004.pt"]
    assert os.path.samefile(ck_dir / "last.pt", older)
