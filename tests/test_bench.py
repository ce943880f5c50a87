"""The benchmark protocol (sweeps/bench_tin20.yaml): the spec names every method and parses, and a 2-class,
2-epoch version of it runs end to end (every arm, one seed, two trials at a time) into the comparison report, on
the 10-class archive tiny-imagenet-mini.tar.gz in $KD_DATA_DIR or, without it, on a generated archive of the
same layout."""

from __future__ import annotations

import csv
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

import sweep
from test_sweep import ROOT, run_py, stand_in_data_root

SPEC = ROOT / "sweeps" / "bench_tin20.yaml"
METHODS = {"ce", "kd", "dkd", "dist", "fitnet", "at", "crd", "rkd", "pkt", "sp", "aver", "camkd", "ebkd", "asmb"}


def arm_name(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else value


def test_the_benchmark_spec_runs_every_method_on_three_seeds(tmp_path, monkeypatch):
    spec = sweep.load_spec(SPEC)
    stand_in_data_root(spec, tmp_path, monkeypatch)
    arms = spec.parameters["method"]["values"]
    assert {a if isinstance(a, str) else a[0] for a in arms} == METHODS
    assert "kd --kd.standardize True --kd.temperature 2 --kd.kd-weight 9" in map(arm_name, arms)
    assert "asmb --asmb.ensemble-base False" in map(arm_name, arms)  # the first definition beside the default
    assert spec.parameters["run.seed"]["values"] == [0, 1, 2]
    assert spec.parameters["data.classes"]["value"] == "20" and len(sweep.grid_points(spec)) == 3 * len(arms)
    sweep.check_names(spec, SPEC)
    for index in range(len(arms)):  # train.py parses and validates every arm's flags
        sweep.check_first_trial(spec, sweep.trial_params(spec, 3 * index, 0))


def tiny_archive(tmp_path: Path) -> Path:
    """The 10-class archive when KD_DATA_DIR has it, else a generated tiny-imagenet-200-style .tar.gz."""
    real = Path(os.environ.get("KD_DATA_DIR", "/nonexistent")) / "tiny-imagenet-mini.tar.gz"
    if real.is_file():
        return real
    d, rng = tmp_path / "made" / "tiny-made", np.random.default_rng(0)
    wnids = [f"n0{i}" for i in range(3)]
    lines = []
    for c, w in enumerate(wnids):
        for i in range(30):
            path = d / "train" / w / "images" / f"{w}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            base = np.full((16, 16, 3), 60 * c + 40, np.uint8)  # learnable: the class sets the brightness
            Image.fromarray(base + rng.integers(0, 30, (16, 16, 3), dtype=np.uint8)).save(path)
        for i in range(5):
            path = d / "val" / "images" / f"val_{c}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((16, 16, 3), 60 * c + 50, np.uint8)).save(path)
            lines.append(f"val_{c}_{i}.JPEG\t{w}\t0\t0\t15\t15")
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    archive = tmp_path / "made" / "tiny-made.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(d, arcname=d.name)
    return archive


def test_a_two_class_two_epoch_benchmark_runs_end_to_end_and_reports(tmp_path):
    raw = yaml.safe_load(SPEC.read_text())
    params = raw["parameters"]
    params.update(
        {
            "data.root": {"value": str(tiny_archive(tmp_path))},
            "data.classes": {"value": "2"},
            "teachers.epochs": {"value": 1},
            "optim.epochs": {"value": 2},
            "run.seed": {"values": [0]},
            "data.batch-size": {"value": 16},
            "run.max-steps-per-epoch": {"value": 2},
            "teachers.cache-dir": {"value": str(tmp_path / "teachers")},
        }
    )
    small = tmp_path / "bench_small.yaml"
    small.write_text(yaml.safe_dump(raw, sort_keys=False))
    res = run_py(
        "sweep.py",
        str(small),
        "--mode",
        "local",
        "--jobs",
        "2",
        "--out-dir",
        str(tmp_path / "sweeps"),
        "--trial-wandb",
        "disabled",
        tmp_path=tmp_path,
    )
    arms = len(params["method"]["values"])
    finished = [ln for ln in res.stdout.splitlines() if ln.startswith("trial-") and " finished " in ln]
    assert res.returncode == 0 and len(finished) == arms, res.stdout + res.stderr
    assert len(list((tmp_path / "teachers").glob("*.pt"))) == 2  # each teacher fine-tuned once, in one trial
    out = tmp_path / "report"
    res = run_py("sweep.py", "report", str(tmp_path / "sweeps" / "bench_tin20"), "--out", str(out), tmp_path=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    with open(out / "comparison.csv", newline="") as f:
        rows = {r["setting"]: r for r in csv.DictReader(f)}
    assert len(rows) == arms and {r["method"] for r in rows.values()} == METHODS
    asmb = rows["asmb (asmb.ensemble-base=True)"]  # the default beside the first definition
    for key in (
        "teacher/resnet20/test_acc mean",
        "teacher/wrn_16_1/test_acc mean",
        "ensemble/test_acc mean",
        "synergy/test_acc mean",
        "adapted_ensemble/test_acc mean",
    ):
        assert 0 <= float(asmb[key]) <= 100, key


def test_the_gate_reads_ce_and_kd_runs_and_says_whether_the_checks_pass(tmp_path):
    def run(folder: str, method: str, seed: int, test: float, epochs: int = 40, **kd):
        d = tmp_path / folder / f"{method}-s{seed}"
        d.mkdir(parents=True)
        config = {
            "method": method,
            "run": {"seed": seed},
            "optim": {"epochs": epochs},
            "kd": {"temperature": 4.0, "kd_weight": 0.9, "standardize": False, **kd},
        }
        (d / "config.json").write_text(json.dumps(config))
        summary = {"best/test_acc": test, **({"teacher/r20/test_acc": 70.0} if method != "ce" else {})}
        (d / "summary.json").write_text(json.dumps(summary))

    for seed, (c, k) in enumerate([(60.0, 63.0), (61.0, 64.0), (59.0, 62.0)]):
        run("main", "ce", seed, c)
        run("main", "kd", seed, k)
        run("longer", "ce", seed, c + 0.5, epochs=80)
    run("main", "kd", 9, 99.0, standardize=True)  # another kd setting: not vanilla KD
    res = run_py("bench/gate.py", str(tmp_path / "main"), "--plateau", str(tmp_path / "longer"), tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "kd  (n=3, seeds [0, 1, 2]): 63.00 ± 1.00" in res.stdout
    assert "kd - ce: +3.00 ± 0.82 (standard error) = 3.67 SE: the check (> 2 SE) passes" in res.stdout
    assert "teacher r20: 70.00 on test, +10.00 over ce: the check (>= 8) passes" in res.stdout
    assert "ce at 80 epochs minus ce at 40, seed by seed [0, 1, 2]: +0.50, +0.50, +0.50" in res.stdout
