"""sweep.py: spec checks, seeded sampling, hyperband, local sweeps end to end (and resumed), the report,
the online path with wandb mocked, and train.py's wandb offline files. Never touches the network."""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import sweep
from kd_cli.records import rounded_numbers

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "preset": {"value": "smoke"},
    "data.synthetic-train-size": {"value": 400},
    "data.synthetic-test-size": {"value": 100},
    "data.batch-size": {"value": 32},
    "optim.epochs": {"value": 2},
    "teachers.epochs": {"value": 1},
    "run.max-steps-per-epoch": {"value": 3},
}
METRIC = {"name": "val/best_acc", "goal": "maximize"}


def write_spec(tmp_path: Path, parameters: dict, name: str = "t", **top) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": name, "method": "grid", "metric": METRIC, **top, "parameters": parameters}, sort_keys=False
        )
    )
    return path


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No credentials, wandb files and settings inside tmp_path, and a dead local URL so that any
    accidental server call fails on this machine instead of reaching the internet."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        WANDB_BASE_URL="http://127.0.0.1:9",
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
        NETRC=str(tmp_path / "no-netrc"),
    )
    return env


def run_py(script: str, *args: str, tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env or offline_env(tmp_path),
        timeout=600,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# Spec checks (no training)
# ----------------------------------------------------------------------------------------------
def test_typo_in_parameter_name_fails_at_once_with_valid_names(tmp_path, capsys):
    spec = write_spec(tmp_path, {**TINY, "kd.temprature": {"values": [2, 4]}})
    assert sweep.main([str(spec), "--mode", "local", "--out-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown parameter 'kd.temprature'" in err and "did you mean kd.temperature" in err
    assert len(err) < 300 and "optim.lr" not in err  # the closest names, not all of them
    assert not (tmp_path / "s").exists()


def test_an_unknown_top_level_key_is_refused_with_a_suggestion(tmp_path, capsys):
    spec = write_spec(
        tmp_path, {**TINY, "kd.temperature": {"values": [2, 4]}}, early_terminat={"type": "hyperband", "min_iter": 1}
    )
    assert sweep.main([str(spec), "--mode", "local", "--out-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("unknown key 'early_terminat'; did you mean early_terminate?") and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "params, message",
    [
        ({"run.name": {"value": "x"}}, "set by sweep.py"),
        ({"kd.temperature": {"value": "hot"}}, "kd.temperature"),  # train.py's own parser rejects the value
        ({"optim.lr": {"min": 0.1, "max": 0.01}}, "min must be < max"),
        ({"optim.lr": {"distribution": "uniform", "min": 0.01, "max": 0.1}}, "grid search needs discrete"),
    ],
)
def test_bad_specs_exit_2_before_any_trial(tmp_path, capsys, params, message):
    spec = write_spec(tmp_path, {**TINY, **params})
    assert sweep.main([str(spec), "--mode", "local", "--out-dir", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s" / "t").exists()


def test_bayes_locally_and_online_without_credentials_are_clear_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    spec = write_spec(tmp_path, {**TINY, "optim.lr": {"min": 0.01, "max": 0.1}}, method="bayes")
    assert sweep.main([str(spec), "--mode", "local", "--out-dir", str(tmp_path / "s")]) == 2
    assert "bayes needs the wandb server: run with --mode online" in capsys.readouterr().err
    assert sweep.main([str(spec), "--mode", "online", "--out-dir", str(tmp_path / "s")]) == 2
    assert "--mode online needs wandb credentials: set WANDB_API_KEY" in capsys.readouterr().err
    assert sweep.main([str(spec), "--mode", "local", "--sweep-id", "abc", "--out-dir", str(tmp_path / "s")]) == 2


def test_nested_parameters_and_command_args_become_flags(tmp_path):
    path = write_spec(
        tmp_path,
        {
            "kd": {"parameters": {"temperature": {"values": [2, 4]}}},
            "optim.milestones": {"value": [5, 8]},
            "data.aug": {"value": False},
        },
        command=["${env}", "${interpreter}", "${program}", "--preset", "smoke", "${args}"],
    )
    spec = sweep.load_spec(path)
    assert list(spec.parameters) == ["kd.temperature", "optim.milestones", "data.aug"]
    assert spec.swept() == ["kd.temperature"]
    assert sweep.trial_args(spec, sweep.trial_params(spec, 1, 0)) == [
        "--preset",
        "smoke",
        "--kd.temperature=4",
        "--optim.milestones",
        "5",
        "8",
        "--data.aug=False",
    ]
    sweep.check_names(spec, path)  # every name is a train.py flag


@pytest.mark.parametrize(
    "name",
    [
        "smoke",
        "baselines",
        "asmb_ablation",
        "compare_cifar",
        "bench_tin200",
        "bench_tin20_asmb",
        "bench_tin20_plateau",
        "bench_tin20_long",
        "bench_tin20_long_gate",
        "bench_tin20_long_plateau",
    ],
)
def test_shipped_specs_name_train_flags_and_parse(name, tmp_path, monkeypatch):
    path = ROOT / "sweeps" / f"{name}.yaml"
    spec = sweep.load_spec(path)
    stand_in_data_root(spec, tmp_path, monkeypatch)
    assert spec.metric is not None and spec.swept()
    sweep.check_names(spec, path)
    sweep.check_first_trial(spec, sweep.trial_params(spec, 0, 0))  # train.py parses and validates its flags
    if name == "smoke":
        assert 2 <= len(sweep.grid_points(spec)) <= 4


def stand_in_data_root(spec, tmp_path: Path, monkeypatch) -> None:
    """Run from tmp_path, where an empty file stands at the spec's relative data.root: train.py's checks want
    the root to exist, and a clean clone holds no data."""
    root = spec.parameters.get("data.root", {}).get("value")
    if root and not Path(root).is_absolute():
        (tmp_path / root).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / root).touch()
    monkeypatch.chdir(tmp_path)


def test_planned_epochs_count_the_rows_of_the_trained_model():
    assert sweep.planned_epochs({"method": "kd", "optim": {"epochs": 240}}) == 240
    assert (
        sweep.planned_epochs(
            {"method": "asmb", "optim": {"epochs": 240}, "asmb": {"num_stages": 2, "student_epochs": 0}}
        )
        == 240
    )
    assert (
        sweep.planned_epochs(
            {"method": "asmb", "optim": {"epochs": 240}, "asmb": {"num_stages": 3, "student_epochs": 5}}
        )
        == 15
    )


# ----------------------------------------------------------------------------------------------
# Sampling (no training)
# ----------------------------------------------------------------------------------------------
def test_random_sweep_with_a_seed_is_reproducible(tmp_path):
    spec = sweep.load_spec(
        write_spec(
            tmp_path,
            {
                "optim.lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-1},
                "kd.temperature": {"min": 1.0, "max": 8.0},
                "optim.epochs": {"min": 2, "max": 5},
                "kd.ce-weight": {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25},
                "optim.name": {"values": ["sgd", "adamw"], "probabilities": [0.25, 0.75]},
                "preset": {"value": "smoke"},
            },
            method="random",
        )
    )
    draws = [sweep.trial_params(spec, i, seed=7) for i in range(20)]
    assert draws == [sweep.trial_params(spec, i, seed=7) for i in range(20)]  # same seed, same trials
    assert draws[5] == sweep.trial_params(spec, 5, seed=7)  # trial i alone: what a resumed sweep draws
    assert draws != [sweep.trial_params(spec, i, seed=8) for i in range(20)]
    for d in draws:
        assert 1e-3 <= d["optim.lr"] <= 1e-1 and 1.0 <= d["kd.temperature"] <= 8.0
        assert d["optim.epochs"] in (2, 3, 4, 5) and isinstance(d["optim.epochs"], int)
        assert d["kd.ce-weight"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert d["optim.name"] in ("sgd", "adamw") and d["preset"] == "smoke"
    assert len({d["optim.lr"] for d in draws}) == 20


def test_grid_enumerates_every_combination_in_spec_order(tmp_path):
    spec = sweep.load_spec(
        write_spec(
            tmp_path,
            {
                "a.x": {"values": [1, 2]},
                "b.y": {"value": "k"},
                "c.z": {"distribution": "int_uniform", "min": 0, "max": 2},
            },
        )
    )
    points = sweep.grid_points(spec)
    assert [(p["a.x"], p["c.z"]) for p in points] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert sweep.trial_params(spec, 6, 0) is None


# ----------------------------------------------------------------------------------------------
# Hyperband (synthetic curves, no training)
# ----------------------------------------------------------------------------------------------
def test_hyperband_bands():
    assert sweep.hyperband_bands({"min_iter": 1, "eta": 3}, limit=30) == [1, 3, 9, 27]
    assert sweep.hyperband_bands({"min_iter": 2, "eta": 2, "s": 2}, limit=30) == [2, 4]
    assert sweep.hyperband_bands({"max_iter": 27, "s": 2, "eta": 3}, limit=30) == [3, 9]
    assert sweep.hyperband_bands({"min_iter": 3, "eta": 3}, limit=2) == []


def test_hyperband_stops_only_trials_outside_the_best_fraction():
    others = [[50.0, 60.0, 70.0, 75.0], [40.0, 50.0, 60.0, 65.0]]
    stop = sweep.hyperband_should_stop
    # maximize, eta 2: at epoch 1 the threshold is the median of {x, 50, 40}
    assert stop([10.0], others, [1], 2.0, "maximize", last_epoch=4)
    assert not stop([55.0], others, [1], 2.0, "maximize", last_epoch=4)
    assert not stop([45.0], others, [1], 2.0, "maximize", last_epoch=4)  # the median itself survives
    # between bands the latest band reached decides: good at band 1, bad at band 3
    assert not stop([55.0, 10.0], others, [1, 3], 2.0, "maximize", last_epoch=4)
    assert stop([55.0, 10.0, 10.0], others, [1, 3], 2.0, "maximize", last_epoch=4)
    # a trial at its last epoch is never stopped, however bad
    assert not stop([1.0, 1.0, 1.0, 1.0], others, [1, 3], 2.0, "maximize", last_epoch=4)
    # before the first band, or alone, nothing is stopped
    assert not stop([1.0, 1.0], others, [3], 2.0, "maximize", last_epoch=4)
    assert not stop([1.0], [], [1], 2.0, "maximize", last_epoch=4)
    # minimize: a high loss is the bad one
    losses = [[1.0, 0.5], [1.2, 0.6]]
    assert stop([3.0], losses, [1], 3.0, "minimize", last_epoch=2)
    assert not stop([0.9], losses, [1], 3.0, "minimize", last_epoch=2)


def fake_trainer(tmp_path: Path, values: list[float], epochs: int) -> list[str]:
    """A stand-in for train.py: writes config.json, then one metrics row at a time, each only after the runner
    has looked at the previous one (it writes `<run_dir>.ack`, see acked), then summary.json. No delays."""
    script = tmp_path / "fake_train.py"
    script.write_text(
        "import json, sys, time, pathlib\n"
        "d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True)\n"
        "ack = d.parent / (d.name + '.ack')\n"
        f"(d / 'config.json').write_text(json.dumps({{'optim': {{'epochs': {epochs}}}}}))\n"
        "rows = []\n"
        f"for e, v in enumerate({values!r}, 1):\n"
        "    rows.append(json.dumps({'phase': 'kd', 'epoch': e, 'val/best_acc': v}))\n"
        "    (d / 'metrics.jsonl').write_text('\\n'.join(rows) + '\\n')\n"
        "    while not (ack.exists() and int(ack.read_text() or 0) >= e): time.sleep(0.01)\n"
        "(d / 'summary.json').write_text(json.dumps({'best/val_acc': max(" + repr(values) + ")}))\n"
    )
    return [sys.executable, str(script)]


def acked(should_stop):
    """`should_stop` that tells the fake trainer how many rows it has judged (so each row is judged)."""

    def judged(run_dir: Path) -> bool:
        seen = len(sweep.read_rows(run_dir))
        stop = should_stop(run_dir)
        if not stop:
            (run_dir.parent / f"{run_dir.name}.ack").write_text(str(seen))
        return stop

    return judged


def test_runner_stops_a_bad_trial_by_its_metrics_file_and_spares_a_good_one(tmp_path):
    spec = sweep.load_spec(
        write_spec(
            tmp_path,
            {"kd.temperature": {"values": [1, 2]}},
            early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2},
        )
    )
    done = tmp_path / "done"
    for i, curve in enumerate([[50.0, 60.0, 70.0, 80.0], [40.0, 50.0, 60.0, 70.0]]):
        (done / f"t{i}").mkdir(parents=True)
        (done / f"t{i}" / "metrics.jsonl").write_text(
            "".join(json.dumps({"phase": "kd", "val/best_acc": v}) + "\n" for v in curve)
        )
    others = [{"status": "finished", "run_dir": f"t{i}"} for i in range(2)]
    check = acked(sweep.hyperband_check(spec, others, done))
    env = dict(os.environ)
    rc, stopped = sweep.run_trial_process(
        [*fake_trainer(tmp_path, [10.0, 10.0, 10.0, 10.0], 4), str(tmp_path / "bad")],
        tmp_path / "bad",
        tmp_path / "bad.log",
        env,
        check,
        poll_s=0.05,
    )
    assert stopped and 1 <= len(sweep.read_rows(tmp_path / "bad")) < 4
    assert not (tmp_path / "bad" / "summary.json").exists()
    rc, stopped = sweep.run_trial_process(
        [*fake_trainer(tmp_path, [90.0, 91.0], 2), str(tmp_path / "good")],
        tmp_path / "good",
        tmp_path / "good.log",
        env,
        check,
        poll_s=0.05,
    )
    assert (rc, stopped) == (0, False) and (tmp_path / "good" / "summary.json").exists()


# ----------------------------------------------------------------------------------------------
# Local sweeps with real train.py trials (tiny sizes)
# ----------------------------------------------------------------------------------------------
def test_local_grid_sweep_end_to_end_and_report(tmp_path):
    spec = write_spec(
        tmp_path,
        {
            **TINY,
            "method": {"value": "kd"},
            "kd.temperature": {"values": [2, 4]},
            "teachers.cache-dir": {"value": str(tmp_path / "cache")},
        },
        name="grid2",
    )
    res = run_py(
        "sweep.py",
        str(spec),
        "--mode",
        "local",
        "--out-dir",
        str(tmp_path / "sweeps"),
        "--trial-wandb",
        "disabled",
        tmp_path=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("trial-")]
    assert len(lines) == 2 and all(" finished " in ln for ln in lines)
    sweep_dir = tmp_path / "sweeps" / "grid2"
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(t["id"], t["status"], t["params"]["kd.temperature"]) for t in state["trials"]] == [
        ("trial-000", "finished", 2),
        ("trial-001", "finished", 4),
    ]
    summaries = {}
    for t in state["trials"]:
        run_dir = sweep_dir / t["id"]
        summaries[t["id"]] = json.loads((run_dir / "summary.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
        assert config["kd"]["temperature"] == t["params"]["kd.temperature"] and config["run"]["name"] == t["id"]
        assert t["metric"] == pytest.approx(summaries[t["id"]]["best/val_acc"])  # val/best_acc's last value
        assert not (run_dir / "wandb").exists()  # disabled wandb writes nothing
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # teachers fine-tuned once, in the first trial
    assert not any(r["phase"].startswith("teacher:") for r in sweep.read_rows(sweep_dir / "trial-001"))

    out = tmp_path / "report"
    assert sweep.main(["report", str(tmp_path / "sweeps"), "--out", str(out)]) == 0
    runs = {r["run"]: r for r in read_csv(out / "runs.csv")}
    assert set(runs) == {"grid2/trial-000", "grid2/trial-001"}
    for trial_id, summary in summaries.items():
        row = runs[f"grid2/{trial_id}"]
        for key in ("best/test_acc", "last/test_acc", "best/val_acc", "wall_time_s"):
            assert float(row[key]) == pytest.approx(summary[key], abs=0.05)  # rounded: 2 decimals, times 1
    groups = read_csv(out / "report.csv")
    assert sorted(g["setting"] for g in groups) == ["kd (kd.temperature=2)", "kd (kd.temperature=4)"]
    for g in groups:
        trial_id = "trial-000" if g["setting"].endswith("=2)") else "trial-001"
        assert g["n"] == "1" and float(g["best/test_acc mean"]) == pytest.approx(
            summaries[trial_id]["best/test_acc"], abs=0.005
        )
    md = (out / "report.md").read_text()
    assert "## Sweep `grid2`" in md and "| trial-000 | finished | 2 |" in md and "| trial-001 | finished | 4 |" in md
    if sweep_has_matplotlib():
        for png in ("curves.png", "sweep-grid2.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 5000


def test_interrupted_local_sweep_resumes_without_repeating_trials(tmp_path):
    spec_path = write_spec(
        tmp_path, {**TINY, "method": {"value": "ce"}, "optim.lr": {"values": [0.05, 0.1, 0.2]}}, name="res"
    )
    spec = sweep.load_spec(spec_path)
    sweep_dir = tmp_path / "sweeps" / "res"
    # As left by a killed sweep: trial 0 finished, trial 1 was running (partial run directory), trial 2 never began.
    state = sweep.new_state(spec, spec_path, "local", seed=0, count=None)
    state["count"] = 3
    state["trials"] = [
        {
            "id": "trial-000",
            "index": 0,
            "params": sweep.trial_params(spec, 0, 0),
            "status": "finished",
            "run_dir": "trial-000",
            "metric": 12.5,
        },
        {
            "id": "trial-001",
            "index": 1,
            "params": sweep.trial_params(spec, 1, 0),
            "status": "running",
            "run_dir": "trial-001",
        },
    ]
    (sweep_dir / "trial-000").mkdir(parents=True)
    (sweep_dir / "trial-000" / "summary.json").write_text(json.dumps({"best/val_acc": 12.5}))
    (sweep_dir / "trial-001").mkdir()
    (sweep_dir / "trial-001" / "metrics.jsonl").write_text('{"phase": "ce", "epoch": 1, "val/best_acc": 1.0}\n')
    sweep.save_state(state, sweep_dir)

    assert sweep.main([str(spec_path), "--mode", "local", "--out-dir", str(tmp_path / "sweeps")]) == 2  # needs --resume
    res = run_py(
        "sweep.py",
        str(spec_path),
        "--mode",
        "local",
        "--resume",
        "--count",
        "2",
        "--out-dir",
        str(tmp_path / "sweeps"),
        "--trial-wandb",
        "disabled",
        tmp_path=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert [ln.split()[0] for ln in res.stdout.splitlines() if ln.startswith("trial-")] == ["trial-001"]
    assert json.loads((sweep_dir / "trial-000" / "summary.json").read_text()) == {"best/val_acc": 12.5}
    assert not (sweep_dir / "trial-000" / "config.json").exists()  # the finished trial was not run again
    rows = sweep.read_rows(sweep_dir / "trial-001")
    assert [r["epoch"] for r in rows] == [1, 2]  # a fresh run, not the partial one
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(t["id"], t["status"]) for t in state["trials"]] == [("trial-000", "finished"), ("trial-001", "finished")]
    assert json.loads((sweep_dir / "trial-001" / "config.json").read_text())["optim"]["lr"] == 0.1


def trial_pids(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (Linux /proc; zombies, already dead, left out)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                marker in (proc / "cmdline").read_bytes().decode(errors="replace")
                and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            ):
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def wait_for(condition, timeout_s: float = 300.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the trial process through /proc")
def test_a_killed_sweep_takes_its_trial_down_and_resume_restarts_it(tmp_path):
    """SIGTERM: forwarded to the trial, which is marked interrupted. SIGKILL: the trial still dies within
    seconds (it used to run on, recreate its directory under the resumed sweep and be counted failed).
    --resume restarts the interrupted trial from a fresh directory and it finishes."""
    spec = write_spec(
        tmp_path,
        {
            **TINY,
            "method": {"value": "ce"},
            "optim.epochs": {"value": 40},
            "run.max-steps-per-epoch": {"value": 2},
            "optim.lr": {"values": [0.1]},
        },
        name="kill",
    )
    sweep_dir = tmp_path / "sweeps" / "kill"
    marker = f"--run.out-dir={sweep_dir}"
    args = [
        sys.executable,
        str(ROOT / "sweep.py"),
        str(spec),
        "--mode",
        "local",
        "--out-dir",
        str(tmp_path / "sweeps"),
        "--trial-wandb",
        "disabled",
        "--poll",
        "0.2",
    ]

    def started(**kw) -> subprocess.Popen:
        proc = subprocess.Popen(
            args + kw.get("extra", []),
            cwd=tmp_path,
            env=offline_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # mid-trial: train.py runs (so an old partial directory is gone) and has logged an epoch
        assert wait_for(
            lambda: (
                (trial_pids(marker) and (sweep_dir / "trial-000" / "metrics.jsonl").exists()) or proc.poll() is not None
            )
        )
        assert proc.poll() is None, proc.stdout.read()
        return proc

    def status() -> str:
        return json.loads((sweep_dir / "sweep.json").read_text())["trials"][0]["status"]

    proc = started()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert not trial_pids(marker) and status() == "interrupted"

    proc = started(extra=["--resume"])
    proc.kill()
    proc.wait()
    assert wait_for(lambda: not trial_pids(marker), timeout_s=120.0), "the trial outlived its SIGKILLed sweep"
    assert status() == "running"  # as the killed sweep left it

    res = subprocess.run(
        args + ["--resume"], cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "restarting trial-000: it was interrupted (running)" in res.stdout
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(t["id"], t["status"], t["restarts"]) for t in state["trials"]] == [("trial-000", "finished", 2)]
    assert [r["epoch"] for r in sweep.read_rows(sweep_dir / "trial-000")] == list(range(1, 41))  # one fresh run


# A stand-in for train.py in --jobs sweeps: marks its start (the file holds its OMP_NUM_THREADS), then waits for
# the file $FAKE_WAIT names in $FAKE_MARKS ({partner}: the other trial of its pair, 0-1, 2-3) before it finishes.
PAIRED_TRAIN = r"""
import json, os, pathlib, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
name, index = args["run.name"], int(args["run.name"].split("-")[1])
run_dir, marks = pathlib.Path(args["run.out-dir"]) / name, pathlib.Path(os.environ["FAKE_MARKS"])
run_dir.mkdir(parents=True)
(run_dir / "config.json").write_text(json.dumps({"optim": {"epochs": 1}, "run": {"name": name, "out_dir": args["run.out-dir"]}}))
(marks / f"started-{index}").write_text(os.environ.get("OMP_NUM_THREADS", "unset"))
wait, deadline = marks / os.environ["FAKE_WAIT"].format(partner=index ^ 1), time.monotonic() + 120
while not wait.exists():
    if time.monotonic() > deadline:  # only a runner that never starts the partner gets here: fail, do not hang
        sys.exit("error: waited in vain for " + str(wait))
    time.sleep(0.05)
(run_dir / "metrics.jsonl").write_text(json.dumps({"phase": "kd", "epoch": 1, "val/best_acc": float(index)}) + "\n")
(run_dir / "summary.json").write_text(json.dumps({"best/val_acc": float(index)}))
"""


def paired_sweep(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A 4-trial grid spec, the fake train.py and its marks folder."""
    fake, marks = tmp_path / "paired_train.py", tmp_path / "marks"
    fake.write_text(PAIRED_TRAIN)
    marks.mkdir()
    spec = write_spec(tmp_path, {"preset": {"value": "smoke"}, "kd.temperature": {"values": [1, 2, 3, 4]}}, name="par")
    return spec, fake, marks


def test_jobs_2_runs_two_trials_at_a_time_and_finishes_all(tmp_path, monkeypatch, capsys):
    """Each trial finishes only once its pair's partner has started: a sequential runner could not finish."""
    spec, fake, marks = paired_sweep(tmp_path)
    monkeypatch.setattr(sweep, "TRAIN", fake)
    monkeypatch.setenv("FAKE_MARKS", str(marks))
    monkeypatch.setenv("FAKE_WAIT", "started-{partner}")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert (
        sweep.main(
            [
                str(spec),
                "--mode",
                "local",
                "--jobs",
                "2",
                "--out-dir",
                str(tmp_path / "s"),
                "--trial-wandb",
                "disabled",
                "--poll",
                "0.05",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert sorted(ln.split()[:2] for ln in out.splitlines() if ln.startswith("trial-")) == [
        [f"trial-00{i}", "finished"] for i in range(4)
    ]
    assert "best: trial-003 val/best_acc=3" in out
    state = json.loads((tmp_path / "s" / "par" / "sweep.json").read_text())
    assert [(t["id"], t["status"], t["metric"]) for t in state["trials"]] == [
        (f"trial-00{i}", "finished", float(i)) for i in range(4)
    ]
    assert all((marks / f"started-{i}").read_text() == "1" for i in range(4))  # OMP_NUM_THREADS=1 with --jobs 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the trial processes through /proc")
def test_interrupted_jobs_2_sweep_stops_both_trials_and_resume_restarts_them(tmp_path):
    spec, fake, marks = paired_sweep(tmp_path)
    sweep_dir = tmp_path / "s" / "par"
    env = {
        **offline_env(tmp_path),
        "PYTHONPATH": str(ROOT),
        "FAKE_MARKS": str(marks),
        "FAKE_WAIT": "release",
        "OMP_NUM_THREADS": "3",
    }
    args = [
        sys.executable,
        "-c",
        f"import sys, sweep; sweep.TRAIN = {str(fake)!r}; sys.exit(sweep.main(sys.argv[1:]))",
        str(spec),
        "--mode",
        "local",
        "--jobs",
        "2",
        "--out-dir",
        str(tmp_path / "s"),
        "--trial-wandb",
        "disabled",
        "--poll",
        "0.05",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_for(
        lambda: (marks / "started-0").exists() and (marks / "started-1").exists() or proc.poll() is not None
    )
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert f"interrupted; continue with: python sweep.py {spec} --resume" in out
    assert not trial_pids(f"--run.out-dir={sweep_dir}")
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(t["id"], t["status"]) for t in state["trials"]] == [
        ("trial-000", "interrupted"),
        ("trial-001", "interrupted"),
    ]
    assert (marks / "started-0").read_text() == "3"  # the user's OMP_NUM_THREADS is kept

    (marks / "release").write_text("")
    res = subprocess.run(args + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "restarting trial-000: it was interrupted (interrupted)" in res.stdout
    assert "restarting trial-001: it was interrupted (interrupted)" in res.stdout
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(t["id"], t["status"], t.get("restarts")) for t in state["trials"]] == [
        ("trial-000", "finished", 1),
        ("trial-001", "finished", 1),
        ("trial-002", "finished", None),
        ("trial-003", "finished", None),
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the trial processes through /proc")
def test_a_second_runner_on_a_running_sweep_is_refused_and_deletes_nothing(tmp_path, capsys):
    spec, fake, marks = paired_sweep(tmp_path)
    sweep_dir = tmp_path / "s" / "par"
    env = {**offline_env(tmp_path), "PYTHONPATH": str(ROOT), "FAKE_MARKS": str(marks), "FAKE_WAIT": "release"}
    args = [
        sys.executable,
        "-c",
        f"import sys, sweep; sweep.TRAIN = {str(fake)!r}; sys.exit(sweep.main(sys.argv[1:]))",
        str(spec),
        "--mode",
        "local",
        "--out-dir",
        str(tmp_path / "s"),
        "--trial-wandb",
        "disabled",
        "--poll",
        "0.05",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: (marks / "started-0").exists() or proc.poll() is not None)
        assert proc.poll() is None, proc.stdout.read()
        before = sorted(p.relative_to(sweep_dir) for p in sweep_dir.rglob("*"))
        assert sweep.main([str(spec), "--mode", "local", "--resume", "--out-dir", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"error: the sweep in {sweep_dir} is being run by another process (pid {proc.pid}); wait for "
            "it to end (or stop it) before resuming"
        )
        assert sorted(p.relative_to(sweep_dir) for p in sweep_dir.rglob("*")) == before  # the live trial is intact
    finally:
        (marks / "release").write_text("")  # the trials may finish
        out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out


def test_a_sweep_named_dot_dot_is_refused(tmp_path, capsys):
    spec = write_spec(tmp_path, {**TINY, "kd.temperature": {"values": [2, 4]}}, name="..")
    assert sweep.main([str(spec), "--mode", "local", "--out-dir", str(tmp_path / "s")]) == 2
    assert "name '..' is not a folder name" in capsys.readouterr().err
    assert not (tmp_path / "sweep.json").exists() and not (tmp_path / "s").exists()


def test_jobs_below_1_or_online_is_a_one_line_error(tmp_path, capsys):
    spec = write_spec(tmp_path, {**TINY, "kd.temperature": {"values": [2, 4]}})
    assert sweep.main([str(spec), "--mode", "local", "--jobs", "0", "--out-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --jobs must be >= 1"
    assert sweep.main([str(spec), "--mode", "online", "--jobs", "2", "--out-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--jobs runs local trials side by side: it needs --mode local" in err
    assert not (tmp_path / "s").exists()


def test_resume_never_deletes_a_directory_that_is_not_its_trial(tmp_path):
    sweep_dir = tmp_path / "sweeps" / "x"
    foreign = sweep_dir / "trial-000"
    foreign.mkdir(parents=True)
    (foreign / "config.json").write_text(json.dumps({"run": {"name": "mine", "out_dir": str(tmp_path)}}))
    with pytest.raises(sweep.ConfigError, match="not the run directory of this sweep's trial-000"):
        sweep.remove_trial_dir(foreign, "trial-000", sweep_dir)
    assert (foreign / "config.json").exists()
    (foreign / "config.json").write_text(json.dumps({"run": {"name": "trial-000", "out_dir": str(sweep_dir)}}))
    sweep.remove_trial_dir(foreign, "trial-000", sweep_dir)
    assert not foreign.exists()


def sweep_has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Report from synthetic run directories (no training)
# ----------------------------------------------------------------------------------------------
def fake_run(
    root: Path, name: str, method: str, seed: int, temperature: float, summary: dict | None, curve: list[float]
) -> None:
    d = root / name
    d.mkdir(parents=True)
    config = {
        "method": method,
        "run": {"seed": seed, "name": name, "out_dir": str(root)},
        "optim": {"lr": 0.05, "epochs": len(curve)},
        "kd": {"temperature": temperature},
        "dkd": {"alpha": 1.0},
        "wandb": {"mode": "disabled"},
    }
    (d / "config.json").write_text(json.dumps(config))
    rows = [{"phase": "teacher:resnet20", "epoch": 1, "val/acc": 99.0}]  # stage 0: never in a curve
    rows += [
        {"phase": method, "epoch": i + 1, "val/acc": v, "val/best_acc": max(curve[: i + 1])}
        for i, v in enumerate(curve)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps({"method": method, **summary}))


def test_report_groups_seeds_and_matches_summaries(tmp_path):
    runs = tmp_path / "runs"
    fake_run(
        runs,
        "kd-s0",
        "kd",
        0,
        4.0,
        {
            "best/test_acc": 70.0,
            "last/test_acc": 69.0,
            "wall_time_s": 10.0,
            "teacher/resnet20/val_acc": 80.0,
            "synergy/test_acc": 81.0,
            "images_per_s": 1000.0,
        },
        [50.0, 60.0],
    )
    fake_run(
        runs,
        "kd-s1",
        "kd",
        1,
        4.0,
        {
            "best/test_acc": 72.0,
            "last/test_acc": 70.0,
            "wall_time_s": 12.0,
            "teacher/resnet20/val_acc": 82.0,
            "synergy/test_acc": 83.0,
            "images_per_s": 1100.0,
        },
        [52.0, 62.0],
    )
    fake_run(
        runs, "dkd-s0", "dkd", 0, 4.0, {"best/test_acc": 75.0, "last/test_acc": 74.0, "wall_time_s": 11.0}, [55.0, 65.0]
    )
    fake_run(
        runs / "nested",
        "kd-t2",
        "kd",
        0,
        2.0,
        {"best/test_acc": 60.0, "last/test_acc": 59.0, "wall_time_s": 9.0},
        [40.0, 45.0],
    )
    fake_run(runs, "kd-crashed", "kd", 2, 4.0, None, [30.0])
    out = tmp_path / "out"
    assert sweep.main(["report", str(runs), "--out", str(out)]) == 0
    groups = {g["setting"]: g for g in read_csv(out / "report.csv")}
    assert set(groups) == {"dkd", "kd (kd.temperature=2)", "kd (kd.temperature=4)"}  # dkd ignores kd.*
    kd4 = groups["kd (kd.temperature=4)"]
    assert kd4["n"] == "2"  # the crashed run has no summary: listed in runs.csv only
    assert float(kd4["best/test_acc mean"]) == pytest.approx(71.0)
    assert float(kd4["best/test_acc std"]) == pytest.approx(2**0.5, abs=0.005)  # sample std of 70, 72 (2 decimals)
    assert float(kd4["teacher/resnet20/val_acc mean"]) == pytest.approx(81.0)
    assert float(kd4["synergy/test_acc mean"]) == pytest.approx(82.0)
    assert float(kd4["images_per_s mean"]) == pytest.approx(1050.0)
    assert float(groups["dkd"]["best/test_acc mean"]) == 75.0 and groups["dkd"]["best/test_acc std"] == ""
    runs_csv = {r["run"]: r for r in read_csv(out / "runs.csv")}
    assert runs_csv["kd-crashed"]["status"] == "incomplete" and runs_csv["nested/kd-t2"]["best/test_acc"] == "60.0"
    md = (out / "report.md").read_text()
    assert "| kd (kd.temperature=4) | 2 | 71.00 ± 1.41 | 69.50 ± 0.71 |" in md


def test_report_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    for seed in (0, 1):
        fake_run(runs, f"kd-s{seed}", "kd", seed, 4.0, {"best/test_acc": 70.0 + seed}, [50.0 + seed, 60.0, 65.0])
    spec_path = write_spec(tmp_path, {"kd.temperature": {"values": [2, 4]}, "optim.lr": {"values": [0.1]}}, name="sw")
    spec = sweep.load_spec(spec_path)
    state = sweep.new_state(spec, spec_path, "local", 0, 2)
    for i, status in enumerate(["finished", "stopped"]):
        fake_run(
            runs / "sw",
            f"trial-00{i}",
            "kd",
            0,
            [2.0, 4.0][i],
            {"best/test_acc": 1.0} if i == 0 else None,
            [10.0, 20.0][: 2 - i],
        )
        state["trials"].append(
            {
                "id": f"trial-00{i}",
                "params": sweep.trial_params(spec, i, 0),
                "status": status,
                "run_dir": f"trial-00{i}",
            }
        )
    sweep.save_state(state, runs / "sw")
    out = tmp_path / "out"
    assert sweep.main(["report", str(runs), "--out", str(out)]) == 0
    for png in ("curves.png", "sweep-sw.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "![validation accuracy per epoch](curves.png)" in (out / "report.md").read_text()


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    assert sweep.main(["report", str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Online path with wandb mocked (no server): trials are train.py subprocesses joining the agent's run
# ----------------------------------------------------------------------------------------------
def test_online_sweep_creates_the_sweep_and_runs_agent_trials_as_subprocesses(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    created, launched = {}, []

    def fake_sweep(spec, project=None, entity=None):
        created.update(spec=spec, project=project)
        return "sw123"

    def fake_agent(sweep_id, function, count=None, project=None, entity=None):
        for i in range(count):
            param_file = tmp_path / f"params-{i}.yaml"
            param_file.write_text(
                "wandb_version: 1\n\n"
                + yaml.safe_dump({"kd.temperature": {"value": [2, 4][i]}, "preset": {"value": "smoke"}})
            )
            monkeypatch.setenv("WANDB_RUN_ID", f"run{i}")
            monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(param_file))
            function()

    def fake_process(argv, run_dir, log_path, env, should_stop=None, poll_s=1.0):
        launched.append((argv, env["WANDB_RUN_ID"]))
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"phase": "kd", "epoch": 1, "val/best_acc": 50.0}) + "\n")
        if env["WANDB_RUN_ID"] == "run1":
            raise Exception  # how wandb.agent stops a run (server-side hyperband): an exception in the trial thread
        (run_dir / "summary.json").write_text(json.dumps({"best/val_acc": 50.0}))
        return 0, False

    monkeypatch.setattr(wandb, "sweep", fake_sweep)
    monkeypatch.setattr(wandb, "agent", fake_agent)
    monkeypatch.setattr(sweep, "run_trial_process", fake_process)
    spec = write_spec(tmp_path, {"preset": {"value": "smoke"}, "kd.temperature": {"values": [2, 4]}}, name="on")
    assert sweep.main([str(spec), "--mode", "online", "--count", "2", "--out-dir", str(tmp_path / "s")]) == 0
    assert created["spec"]["program"] == "train.py" and created["project"] == "kd"
    assert created["spec"]["parameters"]["kd.temperature"] == {"values": [2, 4]}
    argv, run_id = launched[1]
    assert run_id == "run1" and argv[0] == sys.executable and argv[1] == str(ROOT / "train.py")
    assert {"--kd.temperature=4", "--preset=smoke", "--wandb.mode=online", "--run.name=run1"} <= set(argv)
    state = json.loads((tmp_path / "s" / "on" / "sweep.json").read_text())
    assert state["sweep_id"] == "sw123" and state["mode"] == "online"
    assert [(t["id"], t["status"], t["metric"]) for t in state["trials"]] == [
        ("run0", "finished", 50.0),
        ("run1", "stopped", 50.0),
    ]


# ----------------------------------------------------------------------------------------------
# wandb in train.py: offline files hold the logged keys; disabled writes nothing
# ----------------------------------------------------------------------------------------------
def wandb_records(path: Path):
    """Records of a .wandb file: wandb's protobuf Records in LevelDB-log framing (32 KiB blocks of
    [crc32 u32][length u16][type u8] chunks; 1 full, 2 first, 3 middle, 4 last) after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def item_key(item) -> str:
    """A history/config/summary item's key: `key`, or the path in `nested_key` (how wandb-core writes them)."""
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_directory_holds_the_logged_keys(tmp_path):
    env = {**offline_env(tmp_path), "WANDB_MODE": "offline"}
    res = run_py(
        "train.py",
        "--preset",
        "smoke",
        "--method",
        "ce",
        "--data.synthetic-train-size",
        "400",
        "--data.synthetic-test-size",
        "100",
        "--data.batch-size",
        "32",
        "--optim.epochs",
        "2",
        "--run.max-steps-per-epoch",
        "3",
        "--run.out-dir",
        str(tmp_path / "runs"),
        "--run.name",
        "wb",
        "--wandb.mode",
        "offline",
        "--wandb.group",
        "g1",
        "--wandb.tags",
        "a",
        "b",
        tmp_path=tmp_path,
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    run_dir = tmp_path / "runs" / "wb"
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = list(wandb_records(files[0]))
    history = [
        {item_key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")
    ]
    rows = sweep.read_rows(run_dir)
    assert len(history) == len(rows) == 2
    for logged, row in zip(history, rows):
        # every metrics.jsonl key, the value as precise as it measures (rows are rounded for wandb: records.py)
        assert {k: logged[k] for k in row} == pytest.approx(rounded_numbers(row))
    run = next(r.run for r in records if r.HasField("run"))
    assert run.run_group == "g1" and list(run.tags) == ["a", "b"] and run.display_name == "wb"
    config = {item_key(i): json.loads(i.value_json) for i in run.config.update}
    assert config["optim"]["epochs"] == 2 and config["method"] == "ce"
    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update({item_key(i): json.loads(i.value_json) for i in r.summary.update})
    saved = json.loads((run_dir / "summary.json").read_text())
    assert summary["best/test_acc"] == pytest.approx(saved["best/test_acc"])
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "wandb").rglob("*.log"))
    assert "127.0.0.1:9" not in logs  # no connection was attempted


def test_wandb_row_keys_are_the_metrics_keys_with_teacher_rows_prefixed():
    from kd_cli.wandb_env import wandb_keys

    row = {"phase": "kd", "epoch": 3, "lr": 0.1, "train/kd": 1.5, "val/acc": 50.0, "note": [1]}
    assert wandb_keys(row) == {"phase": "kd", "epoch": 3, "lr": 0.1, "train/kd": 1.5, "val/acc": 50.0}
    teacher = wandb_keys({"phase": "teacher:resnet20", "epoch": 1, "val/acc": 40.0})
    assert teacher == {"phase": "teacher:resnet20", "epoch": 1, "teacher/resnet20/val/acc": 40.0}


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    from kd_cli.wandb_env import resolve_wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_wandb_mode("auto") == "disabled"  # no credentials
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("disabled") == "disabled"  # an explicit mode wins


def test_yaml_aliases_are_refused_in_specs_and_configs(tmp_path, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nparameters: {kd.temperature: {value: *b}}\n"
    (tmp_path / "bomb.yaml").write_text("name: bomb\nmethod: grid\n" + bomb)
    assert sweep.main([str(tmp_path / "bomb.yaml"), "--mode", "local", "--out-dir", str(tmp_path / "s")]) == 2
    assert "aliases (*a) are not allowed here" in capsys.readouterr().err
    import train
    from kd.errors import ConfigError

    (tmp_path / "cfg.yaml").write_text(bomb)
    with pytest.raises(ConfigError, match="aliases"):
        train.parse_config(["--config", str(tmp_path / "cfg.yaml")])


def test_compare_cifar_uses_the_reference_values_of_its_pair():
    """resnet32x4 (+ wrn_40_2) -> resnet8x4: DKD beta 8, lr 0.05 (default; 0.01 only for MobileNetV2/ShuffleNet
    students), Nesterov for the multi-teacher arms, float32 students and teachers (README, reference hyperparameters per pair)."""
    spec = sweep.load_spec(ROOT / "sweeps" / "compare_cifar.yaml")
    params = spec.parameters
    assert params["student.model"]["value"] == "resnet8x4" and params["teachers.models"]["value"][0] == "resnet32x4"
    assert params["teachers.precision"]["value"] == "fp32" and "optim.lr" not in params
    assert params["run.amp"]["value"] == "off"  # students train in float32, as the references
    arms = {
        (a if isinstance(a, str) else a[0]): ([] if isinstance(a, str) else a[1:])
        for a in params["method"]["values"]
        if isinstance(a, str) or a[0] != "kd" and a[0] != "asmb"
    }
    assert arms["dkd"] == ["--dkd.beta", "8"]
    for name in ("aver", "camkd", "ebkd", "aekd"):
        assert arms[name] == ["--optim.nesterov", "True"], name
    for name in ("kd", "crd", "fitnet", "asmb"):
        assert "--optim.nesterov" not in arms.get(name, []), name
    readme = (ROOT / "README.md").read_text()
    assert "| resnet32x4 -> resnet8x4 | 8 (default) | 0.05 |" in readme
