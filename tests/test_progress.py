"""What a researcher sees and takes away: progress lines, top-5, wandb keys and axes, the safetensors export,
best/epoch; one tiny ASMB run off a terminal checks them end to end."""

from __future__ import annotations

import json
import sys
import types

import pytest
import timm
import torch

import kd_cli.progress
import kd.metrics
import kd_cli.session
import train
from kd_cli.progress import EpochMeter, RunProgress, describe_phase, format_duration
from kd.export import load_safetensors, save_safetensors, timm_state_dict
from kd.metrics import topk_accuracy
from kd.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_epoch_meter_reports_every_n_steps_or_every_interval():
    clock = FakeClock()
    meter = EpochMeter(total=10, every=3, now=clock)
    due = []
    for _ in range(10):
        clock.t += 0.5
        meter.add(64)
        due.append(meter.due())
    assert due == [False, False, True, False, False, True, False, False, True, False]  # never the last step
    assert meter.rate() == pytest.approx(128.0)  # 640 images in 5 s
    assert meter.line("kd 1/5", 2.34567) == "[kd 1/5] step 10/10  loss 2.3457  128 img/s  ETA 0 s"
    timed = EpochMeter(total=100, every=0, interval_s=30.0, now=clock)
    hits = []
    for i in range(1, 100):
        clock.t += 7.0
        timed.add(32)
        if timed.due():
            hits.append(i)
    assert hits[:3] == [5, 10, 15]  # 35 s, 70 s, 105 s: about every 30 s
    assert "ETA" in timed.line("x", 1.0) and timed.postfix(1.0) == {"loss": "1.0000", "img/s": f"{timed.rate():.0f}"}


def test_run_progress_line_and_phase_words():
    clock = FakeClock()
    run = RunProgress(planned_steps=100, num_stages=2, now=clock)
    run.meter(10, step=0)
    clock.t = 60.0
    assert run.where("asmb:A:s1", 3, 4, 25) == "stage 1/2 phase A, epoch 3/4, run 25%, run ETA 3 min"
    assert describe_phase("teacher:resnet20") == "stage 0 teacher resnet20" and describe_phase("kd") == "kd"
    assert (format_duration(45), format_duration(720), format_duration(9000)) == ("45 s", "12 min", "2.5 h")


def test_top5_accuracy():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 0], [0.0, 1, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([4, 0, 6])  # 5th best, worst, worst
    assert topk_accuracy(logits, labels, 5) == pytest.approx(100 / 3)
    assert topk_accuracy(logits, labels, 1) == 0.0
    assert topk_accuracy(logits[:, :3], torch.tensor([2, 0, 1]), 5) == 100.0  # k capped at the classes


def test_safetensors_round_trip_and_timm_load(tmp_path):
    student = create_model("resnet18", 10, small_input=True)
    weights = timm_state_dict(student.state_dict(), student.meta())
    assert all(not k.startswith("backbone.") for k in weights)
    save_safetensors(weights, tmp_path / "w.safetensors", {"arch": "resnet18"})
    loaded = load_safetensors(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in weights.items())
    # a small-input student needs the same stem: kd builds it, the weights are a plain timm state_dict
    same_stem = create_model("resnet18", 10, small_input=True).backbone
    same_stem.load_state_dict(loaded)
    plain = timm.create_model("resnet18", num_classes=10)
    assert plain.conv1.weight.shape != loaded["conv1.weight"].shape  # the 7x7 ImageNet stem differs
    safetensors = pytest.importorskip("safetensors.torch")  # the reference reader, where installed
    assert all(torch.equal(safetensors.load_file(tmp_path / "w.safetensors")[k], v) for k, v in weights.items())


def test_adapter_students_are_not_exported():
    student = create_model("resnet8", 10, adapter_dim=4)
    assert timm_state_dict(student.state_dict(), student.meta()) is None


class FakeWandbRun:
    def __init__(self, **kwargs):
        self.init, self.id, self.name, self.offline, self.summary = kwargs, "fake1", kwargs["name"], True, {}
        self.logged, self.metrics = [], []

    def define_metric(self, name, **kw):
        self.metrics.append((name, kw))

    def log(self, row):
        self.logged.append(row)

    def finish(self):
        pass


def test_epoch_meter_rate_counts_training_until_stop_only():
    clock = FakeClock()
    meter = EpochMeter(total=4, now=clock)
    for _ in range(4):
        clock.t += 1.0
        meter.add(100)
    meter.stop()  # the epoch's training is over
    clock.t += 16.0  # validation, checkpoints: not training
    assert meter.rate() == pytest.approx(100.0)  # 400 images in 4 s, not in 20 s
    assert meter.line("kd 1/1", 1.0).split("  ")[2] == "100 img/s"


def is_rounded(key, value) -> bool:
    """No float32 noise: accuracies with at most 2 decimals, times/throughputs 1, other floats 6 significant digits."""
    if not isinstance(value, float):
        return True
    if "acc" in key:
        return value == round(value, 2)
    if "time" in key or key.endswith("_s"):
        return value == round(value, 1)
    return value == float(f"{value:.6g}")


def test_asmb_run_off_a_terminal(tmp_path, monkeypatch, capsys):
    runs = []
    fake = types.SimpleNamespace(
        init=lambda mode, settings=None, **kw: runs.append(FakeWandbRun(**kw)) or runs[-1], Settings=lambda **kw: None
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(kd_cli.session, "wandb_server_reachable", lambda: True)
    meters, stopped = [], []  # the epoch meter has stopped whenever validation (or a test) runs

    class Recording(kd_cli.progress.RunProgress):
        def meter(self, *args, **kwargs):
            meters.append(super().meter(*args, **kwargs))
            return meters[-1]

    def evaluate(*args, **kwargs):
        stopped.append(bool(meters) and meters[-1].end is not None)
        return real_evaluate(*args, **kwargs)

    real_evaluate = kd.metrics.evaluate_top1_top5
    monkeypatch.setattr(train, "RunProgress", Recording)
    monkeypatch.setattr(train, "evaluate_top1_top5", evaluate)
    code = train.main(
        [
            "--preset",
            "smoke",
            "--method",
            "asmb",
            "--data.synthetic-train-size",
            "300",
            "--data.synthetic-test-size",
            "60",
            "--data.batch-size",
            "32",
            "--teachers.epochs",
            "1",
            "--optim.epochs",
            "4",
            "--run.max-steps-per-epoch",
            "3",
            "--run.log-every",
            "1",
            "--wandb.mode",
            "offline",
            "--run.out-dir",
            str(tmp_path / "runs"),
            "--teachers.cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    # progress: a line per step off a terminal (not the epoch's last), the run-level position on epoch lines
    assert "[asmb:B:s1 1/2] step 1/3  loss " in out and " img/s  ETA " in out
    assert "| stage 2/2 phase B, epoch 2/2, run 100%, run ETA 0 s" in out
    run_dir = next((tmp_path / "runs").iterdir())
    assert run_dir.name.startswith("asmb-resnet8-from-resnet20+wrn_16_2-synthetic-")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    epoch_rows = [r for r in rows if r["phase"].startswith(("asmb:A", "asmb:B", "teacher:"))]
    assert all(r["train/img_per_s"] > 0 and "step" in r for r in epoch_rows)
    assert all(
        0 <= r["val/acc5"] <= 100 and r["val/acc5"] >= r["val/acc"] for r in rows if r["phase"].startswith("asmb:B")
    )
    assert all("val/synergy_acc5" in r for r in rows if r["phase"].startswith("asmb:A"))
    assert summary["img_per_s"] > 0 and summary["best/test_acc5"] >= summary["best/test_acc"]
    # best/epoch counts student (phase B) epochs, as for every method; best/global_epoch is the row's epoch
    best_row = next(r for r in rows if r["phase"].startswith("asmb:B") and r["epoch"] == summary["best/global_epoch"])
    assert round(best_row["val/acc"], 2) == summary["best/val_acc"]  # the summary rounds, the rows do not
    assert stopped and all(stopped)  # img/s counts training time only, never validation's
    assert all(r["train/img_per_s"] == pytest.approx(m.images / (m.end - m.start)) for r, m in zip(epoch_rows, meters))
    assert all(is_rounded(k, v) for k, v in summary.items()), summary  # no float32 noise
    b_epochs = [r["epoch"] for r in rows if r["phase"].startswith("asmb:B")]
    assert summary["best/epoch"] == b_epochs.index(summary["best/global_epoch"]) + 1
    # export: best.safetensors is the selected student, loadable into timm (zoo nets need no stem change)
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    model = timm.create_model("resnet8", num_classes=10)
    model.load_state_dict(load_safetensors(run_dir / "checkpoints" / "best.safetensors"))
    assert torch.equal(model.head.fc.weight, best["model"]["backbone.head.fc.weight"])
    # wandb: the chosen method's config only, epoch/step axes, phase-scoped keys, teacher/<arch> everywhere
    (wb,) = runs
    assert "asmb" in wb.init["config"] and "kd" not in wb.init["config"] and "optim" in wb.init["config"]
    assert ("epoch", {}) in wb.metrics and ("step", {}) in wb.metrics and ("*", {"step_metric": "epoch"}) in wb.metrics
    keys = set().union(*wb.logged)
    assert {
        "asmb_a/train/loss",
        "asmb_b/train/loss",
        "asmb_a/lr",
        "asmb_b/lr",
        "val/acc",
        "val/synergy_acc",
        "teacher/resnet20/train/loss",
        "asmb_stage/teacher/resnet20/acc",
        "epoch",
        "step",
    } <= keys
    assert not {"train/loss", "lr", "teacher0/acc"} & keys  # no chart mixes two phases' losses
    assert all("epoch" in row for row in wb.logged)
    assert wb.summary["best/val_acc"] == summary["best/val_acc"]  # the rounded summary
    assert all(is_rounded(k, v) for row in [wb.summary, *wb.logged] for k, v in row.items())
