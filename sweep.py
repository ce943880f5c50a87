"""Hyperparameter sweeps of train.py from a standard wandb sweep YAML (the report lives in report.py).

    python sweep.py sweeps/smoke.yaml --count 4            # local: our runner, no server (default without credentials)
    python sweep.py sweeps/baselines.yaml --mode online    # a real wandb sweep: wandb.sweep + wandb.agent
    python sweep.py sweeps/smoke.yaml --jobs 2             # local: up to 2 trials at the same time
    python sweep.py sweeps/smoke.yaml --resume             # continue an interrupted local sweep
    python sweep.py report runs/sweeps                     # report.md, report.csv, runs.csv and PNG plots

Parameter names are train.py's flags in dotted form (`kd.temperature`, `optim.lr`, `data.synthetic-train-size`);
fixed settings are parameters with a single `value:`. Every trial is train.py in its own subprocess writing
its own run directory `<out-dir>/<sweep name>/<trial>/`; the runner reads the trial's metrics.jsonl while it
runs (early termination) and its summary.json at the end. Sweep state: `<out-dir>/<sweep name>/sweep.json`.
With --jobs N > 1 each trial runs with OMP_NUM_THREADS=1 (unless your environment sets OMP_NUM_THREADS), so
N trials use about N cores instead of each taking them all.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from kd_cli.child import Child, Interrupted, raise_on_termination, signal_of
from kd_cli.rundir import lock_or_holder
from kd_cli.records import final_metric, is_teacher_phase, metric_history, read_json, read_rows
from kd_cli.wandb_env import wandb_credentials_present, wandb_server_reachable
from kd.errors import ConfigError, WriteError
from kd.io import atomic_write_json
from kd_cli.config import parse_config, validate
from kd_cli.sweep_spec import DONE, STATE_FILE, Spec, check_names, distribution, flag_name, load_spec

TRAIN = Path(__file__).resolve().parent / "train.py"


def check_first_trial(spec: Spec, params: dict[str, Any]) -> None:
    """Parse and validate the first trial's flags with train.py's own parser: bad values fail at once too."""
    validate(parse_config(trial_args(spec, params)))


# ----------------------------------------------------------------------------------------------
# Parameter values: grid points and seeded random draws
# ----------------------------------------------------------------------------------------------
def grid_points(spec: Spec) -> list[dict[str, Any]]:
    """Every combination, the first parameter varying slowest (spec order)."""
    choices = []
    for p in spec.parameters.values():
        kind = distribution(p)
        choices.append(
            [p["value"]]
            if kind == "constant"
            else list(p["values"])
            if kind == "categorical"
            else list(range(p["min"], p["max"] + 1))
        )
    return [dict(zip(spec.parameters, combo)) for combo in itertools.product(*choices)]


def draw(p: dict, rng: np.random.Generator) -> Any:
    """One value from a wandb parameter spec (wandb's meaning of each distribution)."""
    kind = distribution(p)
    q = p.get("q", 1)
    if kind == "constant":
        return p["value"]
    if kind == "categorical":
        return p["values"][int(rng.choice(len(p["values"]), p=p.get("probabilities")))]
    if kind == "int_uniform":
        return int(rng.integers(p["min"], p["max"] + 1))
    if kind in ("uniform", "q_uniform"):
        x = float(rng.uniform(p["min"], p["max"]))
    elif kind == "log_uniform":  # min/max are natural logs
        x = math.exp(rng.uniform(p["min"], p["max"]))
    elif kind in ("log_uniform_values", "q_log_uniform_values"):
        x = math.exp(rng.uniform(math.log(p["min"]), math.log(p["max"])))
    elif kind in ("normal", "q_normal"):
        x = float(rng.normal(p.get("mu", 0.0), p.get("sigma", 1.0)))
    elif kind == "log_normal":
        x = math.exp(rng.normal(p.get("mu", 0.0), p.get("sigma", 1.0)))
    else:  # beta
        x = float(rng.beta(p["a"], p["b"]))
    if kind.startswith("q_"):
        x = round(x / q) * q
        return int(x) if isinstance(q, int) else x
    return x


def trial_params(spec: Spec, index: int, seed: int) -> dict[str, Any] | None:
    """Parameters of trial `index` (None past the end of a grid). A random trial's draw depends only on
    (seed, index): the same seed gives the same trials, and a resumed sweep continues the same sequence."""
    if spec.method == "grid":
        points = grid_points(spec)
        return points[index] if index < len(points) else None
    rng = np.random.default_rng([seed, index])
    return {name: draw(p, rng) for name, p in spec.parameters.items()}


def format_value(v: Any) -> str:
    return "True" if v is True else "False" if v is False else str(v)


def shown_value(v: Any) -> str:
    """A value as a progress line shows it: a list as the arguments it becomes (`asmb --asmb.loss dkd`)."""
    return " ".join(map(format_value, v)) if isinstance(v, (list, tuple)) else format_value(v)


def trial_args(spec: Spec, params: dict[str, Any]) -> list[str]:
    """train.py arguments: `--flag=value` (as wandb agents write them); a list becomes `--flag a b`."""
    args = list(spec.fixed_args)
    for name, value in params.items():
        if isinstance(value, (list, tuple)):
            args += [f"--{name}", *map(format_value, value)]
        else:
            args.append(f"--{name}={format_value(value)}")
    return args


# ----------------------------------------------------------------------------------------------
# Hyperband early termination (Li et al., 2018, "Hyperband", JMLR; wandb's early_terminate semantics)
# ----------------------------------------------------------------------------------------------
def hyperband_bands(et: dict, limit: int) -> list[int]:
    """Epochs at which trials are compared: min_iter * eta^k (k = 0.., s of them when s is given), or
    max_iter / eta^k for k = 1..s. Bands above `limit` epochs are never reached and left out."""
    eta = float(et.get("eta", 3))
    if "min_iter" in et:
        count = int(et.get("s", 10**6))
        bands, band = [], float(et["min_iter"])
        while band <= limit and len(bands) < count:
            bands.append(int(band))
            band *= eta
    else:
        bands = [int(et["max_iter"] / eta**k) for k in range(1, int(et["s"]) + 1)]
    return sorted({b for b in bands if 1 <= b <= limit})


def hyperband_should_stop(
    history: list[float], others: list[list[float]], bands: list[int], eta: float, goal: str, last_epoch: int
) -> bool:
    """Stop a running trial whose metric at the latest band it reached is outside the best 1/eta of every
    trial's value at that band (itself included). history[i] is the metric after epoch i + 1; a trial that
    has reached its last epoch is never stopped."""
    if len(history) >= last_epoch:
        return False
    reached = [b for b in bands if b <= len(history)]
    if not reached:
        return False
    band = reached[-1]
    sign = -1.0 if goal == "maximize" else 1.0  # lower is better after the sign flip
    values = [sign * h[band - 1] for h in [history, *others] if len(h) >= band]
    threshold = float(np.quantile(values, 1.0 / eta))
    return sign * history[band - 1] > threshold


# ----------------------------------------------------------------------------------------------
# Reading a trial's run directory (while it runs and when it ends)
# ----------------------------------------------------------------------------------------------
def last_error(log_path: Path) -> str:
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if ln.startswith(("error:", "Traceback")) or "Error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


# ----------------------------------------------------------------------------------------------
# Running one trial: train.py in a subprocess (crash-isolated), stopped by SIGINT when told to
# ----------------------------------------------------------------------------------------------
def start_trial(argv: list[str], log_path: Path, env: dict[str, str]) -> Child:
    """train.py with its output to `log_path`, its own process group, dying with this process (kd_cli.child)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:  # the child holds its own copy of the file
        return Child(argv, log, env)


def poll_trial(child: Child, run_dir: Path, should_stop: Callable[[Path], bool] | None) -> tuple[int, bool] | None:
    """None while the trial runs on; (exit code, stopped) once it has exited, or once `should_stop(run_dir)`
    said so and it was stopped by SIGINT (train.py exits cleanly, wandb finishes the run; SIGKILL after 60 s)."""
    stopped = should_stop is not None and child.poll() is None and should_stop(run_dir)
    if child.poll() is None and not stopped:
        return None
    return child.stop(signal.SIGINT), stopped


def run_trial_process(
    argv: list[str],
    run_dir: Path,
    log_path: Path,
    env: dict[str, str],
    should_stop: Callable[[Path], bool] | None = None,
    poll_s: float = 1.0,
) -> tuple[int, bool]:
    """Run train.py until it exits or `should_stop(run_dir)` says so. Returns (exit code, stopped).
    An interruption of this process (Ctrl-C, SIGTERM, the wandb agent's stop) is forwarded to the trial
    as the same signal before it propagates."""
    child = start_trial(argv, log_path, env)
    try:
        while True:
            time.sleep(poll_s)
            if (ended := poll_trial(child, run_dir, should_stop)) is not None:
                return ended
    except BaseException as e:
        child.stop(signal_of(e))
        raise


def trial_command(
    spec: Spec, params: dict[str, Any], sweep_dir: Path, trial_id: str, wandb_mode: str, extra: list[str] = ()
) -> list[str]:
    args = [
        sys.executable,
        str(TRAIN),
        *trial_args(spec, params),
        f"--run.out-dir={sweep_dir}",
        f"--run.name={trial_id}",
        f"--wandb.mode={wandb_mode}",
        *extra,
    ]
    if "wandb.group" not in params:
        args.append(f"--wandb.group={spec.name}")
    return args


def finish_trial(trial: dict[str, Any], spec: Spec, run_dir: Path, log_path: Path, rc: int, stopped: bool) -> None:
    """Trial outcome from its files: finished needs summary.json (not just exit code 0)."""
    has_summary = (run_dir / "summary.json").is_file()
    trial["rc"] = rc
    trial["status"] = "stopped" if stopped else "finished" if rc == 0 and has_summary else "failed"
    metric = spec.metric["name"] if spec.metric else None
    rows = read_rows(run_dir)
    # epochs = rows that logged the metric (the iterations hyperband counts)
    trial["epochs"] = (
        len(metric_history(rows, metric)) if metric else sum(not is_teacher_phase(r.get("phase", "")) for r in rows)
    )
    trial["metric"] = final_metric(run_dir, metric) if metric else None
    trial["error"] = last_error(log_path) if trial["status"] == "failed" else None


def describe(trial: dict[str, Any], spec: Spec) -> str:
    """One progress line per trial."""
    metric = spec.metric["name"] if spec.metric else None
    value = trial.get("metric")
    shown = f"{metric}={value:.4g}" if metric and value is not None else f"{metric}=n/a" if metric else ""
    params = " ".join(f"{k}={shown_value(trial['params'][k])}" for k in spec.swept() if k in trial["params"])
    extra = f"  ({trial['error']})" if trial.get("error") else ""
    return f"{trial['id']:<10} {trial['status']:<8} {shown}  {params}  {trial.get('wall_s', 0):.1f}s{extra}"


# ----------------------------------------------------------------------------------------------
# Sweep state (sweep.json, written atomically) and the local runner
# ----------------------------------------------------------------------------------------------
def new_state(spec: Spec, spec_path: Path, mode: str, seed: int, count: int | None) -> dict[str, Any]:
    return {
        "version": 1,
        "name": spec.name,
        "mode": mode,
        "spec_file": str(spec_path),
        "spec": spec.raw,
        "spec_sha": spec.sha(),
        "seed": seed,
        "count": count,
        "sweep_id": None,
        "trials": [],
    }


def open_state(
    spec: Spec, spec_path: Path, sweep_dir: Path, mode: str, resume: bool, seed: int | None, count: int | None
) -> dict[str, Any]:
    """The saved state when resuming (same spec, same seed), else a new one in an empty directory."""
    path = sweep_dir / STATE_FILE
    if path.is_file():
        if not resume:
            raise ConfigError(f"sweep state {path} exists; pass --resume to continue it, or use another --out-dir")
        state = read_json(path)
        if not isinstance(state, dict) or "trials" not in state:
            raise ConfigError(f"sweep state {path} is unreadable; remove it to start over")
        if state.get("spec_sha") != spec.sha():
            raise ConfigError(f"{spec_path} changed since the sweep in {sweep_dir} started; use another --out-dir")
        if state.get("mode") != mode:
            raise ConfigError(f"the sweep in {sweep_dir} ran with --mode {state.get('mode')}; resume it with that mode")
        if seed is not None and seed != state["seed"]:
            raise ConfigError(f"the sweep in {sweep_dir} used --seed {state['seed']}; resume it with that seed")
        if count is not None:
            state["count"] = count
        return state
    if resume:
        print(f"no sweep state in {sweep_dir}; starting a new sweep", flush=True)
    if sweep_dir.is_dir() and any(sweep_dir.iterdir()):
        raise ConfigError(f"{sweep_dir} exists and holds no sweep state; use another --out-dir or remove it")
    return new_state(spec, spec_path, mode, 0 if seed is None else seed, count)


_sweep_locks: dict[str, int] = {}  # sweep directory -> the open lock file this process holds for its lifetime


def claim_sweep_dir(sweep_dir: Path) -> None:
    """Create the sweep directory and take its lock (an flock on `.sweep.lock`, released when this process
    ends), or raise ConfigError: a second runner on the same sweep (say `--resume` while it runs) would restart
    live trials as interrupted and both would rewrite sweep.json."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if str(sweep_dir.resolve()) in _sweep_locks:
        return
    fd, holder = lock_or_holder(sweep_dir / ".sweep.lock")
    if fd is None:
        raise ConfigError(
            f"the sweep in {sweep_dir} is being run by another process (pid {holder}); wait for it "
            "to end (or stop it) before resuming"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _sweep_locks[str(sweep_dir.resolve())] = fd


def save_state(state: dict[str, Any], sweep_dir: Path) -> None:
    atomic_write_json(state, sweep_dir / STATE_FILE)


def run_local(
    spec: Spec,
    spec_path: Path,
    sweep_dir: Path,
    count: int | None,
    seed: int | None,
    resume: bool,
    trial_wandb: str,
    poll_s: float = 1.0,
    jobs: int = 1,
) -> int:
    """Our own runner: grid or seeded random, hyperband on the spec's metric, up to `jobs` trials at a time
    (started in index order; sweep.json is written here only)."""
    if spec.method == "bayes":
        raise ConfigError(
            "method bayes needs the wandb server: run with --mode online (local sweeps do grid and random)"
        )
    state = open_state(spec, spec_path, sweep_dir, "local", resume, seed, count)
    if state["count"] is None:
        if spec.method == "random":
            raise ConfigError("random search runs until stopped: pass --count N")
        state["count"] = len(grid_points(spec))
    trials = {t["id"]: t for t in state["trials"]}
    first = trial_params(spec, 0, state["seed"])
    check_first_trial(spec, first)
    claim_sweep_dir(sweep_dir)
    save_state(state, sweep_dir)
    done = sum(t["status"] in DONE for t in trials.values())
    print(f"sweep {spec.name}: {spec.method}, {state['count']} trials ({done} done) in {sweep_dir}", flush=True)
    env = {**os.environ, "WANDB_MODE": trial_wandb}
    if jobs > 1:  # trials side by side, each with a thread per core, would oversubscribe the CPUs
        env.setdefault("OMP_NUM_THREADS", "1")
    running: list[tuple[dict[str, Any], Child, Callable[[Path], bool] | None, float]] = []  # trial, its process

    def wait_until(limit: int) -> None:
        """Poll the running trials every poll_s until at most `limit` run; record and print each that ends."""
        while len(running) > limit:
            time.sleep(poll_s)
            for entry in list(running):
                trial, child, should_stop, t0 = entry
                ended = poll_trial(child, sweep_dir / trial["run_dir"], should_stop)
                if ended is not None:
                    running.remove(entry)
                    trial["wall_s"] = time.time() - t0
                    finish_trial(
                        trial, spec, sweep_dir / trial["run_dir"], sweep_dir / "logs" / f"{trial['id']}.log", *ended
                    )
                    save_state(state, sweep_dir)
                    print(describe(trial, spec), flush=True)

    try:
        for index in range(state["count"]):
            trial_id = f"trial-{index:03d}"
            if trial_id in trials and trials[trial_id]["status"] in DONE:
                continue
            params = trial_params(spec, index, state["seed"])
            if params is None:
                print(f"grid exhausted after {index} trials", flush=True)
                break
            wait_until(jobs - 1)
            trial = {"id": trial_id, "index": index, "params": params, "status": "running", "run_dir": trial_id}
            run_dir, log_path = sweep_dir / trial_id, sweep_dir / "logs" / f"{trial_id}.log"
            if trial_id in trials:  # started before and interrupted (or its sweep was killed): start it over
                interrupted = trials[trial_id]
                trial["restarts"] = interrupted.get("restarts", 0) + 1
                state["trials"][state["trials"].index(interrupted)] = trial
                print(f"restarting {trial_id}: it was interrupted ({interrupted['status']})", flush=True)
                remove_trial_dir(run_dir, trial_id, sweep_dir)
            else:
                state["trials"].append(trial)
            trials[trial_id] = trial
            save_state(state, sweep_dir)
            should_stop = hyperband_check(spec, [t for t in state["trials"] if t is not trial], sweep_dir)
            t0 = time.time()
            child = start_trial(trial_command(spec, params, sweep_dir, trial_id, trial_wandb), log_path, env)
            running.append((trial, child, should_stop, t0))
        wait_until(0)
    except BaseException as e:  # Ctrl-C, SIGTERM (or an error): every running trial gets the same signal
        for _, child, _, _ in running:
            child.send(signal_of(e))
        for trial, child, _, _ in running:
            child.stop(signal_of(e))
            trial["status"] = "interrupted"
        save_state(state, sweep_dir)
        if not isinstance(e, (KeyboardInterrupt, Interrupted)):
            raise
        print(
            f"interrupted; continue with: python sweep.py {spec_path} --resume --out-dir {sweep_dir.parent}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + signal_of(e)
    print_best(state, spec, sweep_dir)
    return 0


def remove_trial_dir(run_dir: Path, trial_id: str, sweep_dir: Path) -> None:
    """Delete the partial run directory of this sweep's own interrupted trial, and nothing else: a directory
    whose config.json names another run is left alone (and stops the sweep)."""
    if not run_dir.exists():
        return
    config = read_json(run_dir / "config.json")
    run = config.get("run", {}) if isinstance(config, dict) else {}
    if (run_dir / "config.json").exists() and (
        run.get("name") != trial_id or Path(str(run.get("out_dir"))).resolve() != sweep_dir.resolve()
    ):
        raise ConfigError(f"{run_dir} is not the run directory of this sweep's {trial_id}; move it away to resume")
    shutil.rmtree(run_dir)


def hyperband_check(spec: Spec, others: list[dict[str, Any]], sweep_dir: Path) -> Callable[[Path], bool] | None:
    """A should_stop(run_dir) for run_trial_process, or None without early_terminate."""
    if not spec.early_terminate:
        return None
    metric, goal = spec.metric["name"], spec.metric["goal"]
    eta = float(spec.early_terminate.get("eta", 3))
    histories = [metric_history(read_rows(sweep_dir / t["run_dir"]), metric) for t in others if t["status"] in DONE]

    def should_stop(run_dir: Path) -> bool:
        last_epoch = planned_epochs(read_json(run_dir / "config.json") or {})
        history = metric_history(read_rows(run_dir), metric)
        if not last_epoch or not history:
            return False
        bands = hyperband_bands(spec.early_terminate, last_epoch)
        return hyperband_should_stop(history, histories, bands, eta, goal, last_epoch)

    return should_stop


def planned_epochs(config: dict[str, Any]) -> int:
    """How many rows of the trained model a run logs: --optim.epochs, or for ASMB its phase-B epochs over
    all stages (phase A rows log synergy accuracy, not the student's). 0 when unknown (never stop then)."""
    epochs = int(config.get("optim", {}).get("epochs", 0))
    if config.get("method") == "asmb":
        a = config.get("asmb", {})
        stages = int(a.get("num_stages", 1))
        return stages * (int(a.get("student_epochs", 0)) or max(1, epochs // max(stages, 1)))
    return epochs


def print_best(state: dict[str, Any], spec: Spec, sweep_dir: Path) -> None:
    scored = [t for t in state["trials"] if t.get("metric") is not None and t["status"] in ("finished", "stopped")]
    if spec.metric and scored:
        pick = max if spec.metric["goal"] == "maximize" else min
        best = pick(scored, key=lambda t: t["metric"])
        params = " ".join(f"{k}={shown_value(best['params'][k])}" for k in spec.swept())
        print(f"best: {best['id']} {spec.metric['name']}={best['metric']:.4g}  {params}", flush=True)
    finished = [t for t in state["trials"] if t["status"] == "finished"]
    if spec.metric and finished and not scored:  # most likely a misspelt metric name
        run_dir = sweep_dir / finished[-1]["run_dir"]
        keys = sorted({k for r in read_rows(run_dir) for k in r} | set(read_json(run_dir / "summary.json") or {}))
        print(f"note: no trial logged the metric {spec.metric['name']!r}; logged keys: {', '.join(keys)}", flush=True)
    print(f"report: python sweep.py report {sweep_dir}", flush=True)


# ----------------------------------------------------------------------------------------------
# Online: a real wandb sweep; wandb.agent hands us each run, we run train.py in a subprocess
# ----------------------------------------------------------------------------------------------
def run_online(
    spec: Spec,
    spec_path: Path,
    sweep_dir: Path,
    count: int | None,
    sweep_id: str | None,
    resume: bool,
    project: str | None,
    entity: str | None,
) -> int:
    if not wandb_credentials_present():
        raise ConfigError(
            "--mode online needs wandb credentials: set WANDB_API_KEY or run `wandb login` (or use --mode local)"
        )
    import wandb

    attach = bool(sweep_id) and (sweep_dir / STATE_FILE).is_file()  # --sweep-id of a sweep we ran here before
    state = open_state(spec, spec_path, sweep_dir, "online", resume or attach, None, count)
    if sweep_id and state.get("sweep_id") not in (None, sweep_id):
        raise ConfigError(
            f"{sweep_dir} belongs to wandb sweep {state['sweep_id']}, not {sweep_id}; use another --out-dir"
        )
    project = project or spec.raw.get("project") or "kd"
    entity = entity or spec.raw.get("entity")
    sweep_id = sweep_id or state.get("sweep_id")
    if not sweep_id:
        server_spec = {"program": "train.py", **spec.raw, "name": spec.name}
        sweep_id = wandb.sweep(server_spec, project=project, entity=entity)
    state.update(sweep_id=sweep_id, project=project, entity=entity)
    claim_sweep_dir(sweep_dir)
    save_state(state, sweep_dir)
    print(f"sweep {spec.name}: wandb sweep {sweep_id} (project {project}); runs in {sweep_dir}", flush=True)
    extra = [f"--wandb.project={project}"] + ([f"--wandb.entity={entity}"] if entity else [])

    def trial() -> None:
        run_online_trial(spec, state, sweep_dir, extra)

    wandb.agent(sweep_id, function=trial, count=count, project=project, entity=entity)
    print_best(state, spec, sweep_dir)
    return 0


def agent_params() -> dict[str, Any]:
    """The parameters wandb.agent chose for the current run (the YAML it writes for the run's process)."""
    data = yaml.safe_load(Path(os.environ["WANDB_SWEEP_PARAM_PATH"]).read_text()) or {}

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and set(v) == {"value"}:
                v = v["value"]
            if isinstance(v, dict):
                out.update(flat({kk: {"value": vv} for kk, vv in v.items()}, f"{prefix}{k}."))
            else:
                out[flag_name(f"{prefix}{k}")] = v
        return out

    return flat({k: v for k, v in data.items() if k != "wandb_version"})


def run_online_trial(spec: Spec, state: dict[str, Any], sweep_dir: Path, extra: list[str]) -> None:
    """One agent run: train.py joins it through WANDB_RUN_ID / WANDB_SWEEP_ID (inherited environment).
    A stop from the server (hyperband) interrupts this thread; the finally in run_trial_process ends the child."""
    run_id = os.environ["WANDB_RUN_ID"]
    params = agent_params()
    trial = {"id": run_id, "index": len(state["trials"]), "params": params, "status": "running", "run_dir": run_id}
    state["trials"].append(trial)
    save_state(state, sweep_dir)
    run_dir, log_path = sweep_dir / run_id, sweep_dir / "logs" / f"{run_id}.log"
    t0 = time.time()
    rc, stopped = -1, False
    try:
        rc, stopped = run_trial_process(
            trial_command(spec, params, sweep_dir, run_id, "online", extra), run_dir, log_path, dict(os.environ)
        )
    except Exception:  # wandb.agent stops a run (server-side hyperband) by raising Exception in this thread
        stopped = True
    finally:
        trial["wall_s"] = time.time() - t0
        finish_trial(trial, spec, run_dir, log_path, rc, stopped)
        save_state(state, sweep_dir)
        print(describe(trial, spec), flush=True)
    if trial["status"] == "failed":
        raise RuntimeError(f"trial {run_id} failed: {trial['error']}")  # the agent counts failed runs


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (ConfigError: `error: ...`, exit 2) instead of the usage block."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see python {self.prog} --help)")


def sweep_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="sweep.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="Report: python sweep.py report RUNS_DIR [--out DIR]  (python sweep.py report --help)",
    )
    p.add_argument(
        "spec", type=Path, help="wandb sweep YAML; parameter names are train.py flags (kd.temperature, optim.lr)"
    )
    p.add_argument(
        "--mode",
        choices=("auto", "local", "online"),
        default="auto",
        help="online: a wandb sweep (needs WANDB_API_KEY or `wandb login`); local: our runner, no server; "
        "auto (default): online with credentials and a reachable server, else local",
    )
    p.add_argument(
        "--count",
        type=int,
        help="trials to run (local: total for the sweep, default the whole grid; online: trials for this agent)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="local: run up to N trials at the same time, started in order (default 1); with N > 1 "
        "each trial gets OMP_NUM_THREADS=1 unless your environment sets OMP_NUM_THREADS",
    )
    p.add_argument("--sweep-id", help="online: attach to this existing wandb sweep instead of creating one")
    p.add_argument(
        "--resume", action="store_true", help="continue the sweep in <out-dir>/<name>/ (finished trials are kept)"
    )
    p.add_argument(
        "--out-dir", type=Path, default=Path("runs/sweeps"), help="parent of the sweep directory (default runs/sweeps)"
    )
    p.add_argument("--seed", type=int, help="local random search: seed of the parameter draws (default 0)")
    p.add_argument(
        "--trial-wandb",
        choices=("offline", "disabled"),
        default="offline",
        help="local: wandb mode of each trial (offline: files under the trial's run directory)",
    )
    p.add_argument("--project", help="online: wandb project (default: the spec's `project`, else kd)")
    p.add_argument("--entity", help="online: wandb entity (default: the spec's `entity`, else your default)")
    p.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    return p


def resolve_mode(mode: str) -> str:
    """auto = online with wandb credentials and a reachable server, else local."""
    if mode != "auto":
        return mode
    return "online" if wandb_credentials_present() and wandb_server_reachable() else "local"


def sweep_main(argv: list[str]) -> int:
    a = sweep_parser().parse_args(argv)
    if a.count is not None and a.count < 1:
        raise ConfigError("--count must be >= 1")
    if a.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    spec = load_spec(a.spec)
    mode = resolve_mode(a.mode)
    sweep_dir = a.out_dir / spec.name
    if a.sweep_id and mode != "online":
        raise ConfigError("--sweep-id attaches to a wandb sweep: it needs --mode online")
    if a.jobs > 1 and mode == "online":
        raise ConfigError(
            "--jobs runs local trials side by side: it needs --mode local (online, start more agents with --sweep-id)"
        )
    check_names(spec, a.spec)
    raise_on_termination()  # SIGTERM/SIGHUP end the sweep like Ctrl-C: the running trial gets the signal too
    if mode == "online":
        return run_online(spec, a.spec, sweep_dir, a.count, a.sweep_id, a.resume, a.project, a.entity)
    return run_local(spec, a.spec, sweep_dir, a.count, a.seed, a.resume, a.trial_wandb, a.poll, a.jobs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["report"]:  # the report is a module of its own; `sweep.py report` stays its entry
            import report

            return report.report_main(argv[1:])
        return sweep_main(argv)
    except (ConfigError, WriteError) as e:  # bad input: 2; a folder that cannot be written: 1
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1 if isinstance(e, WriteError) else 2
    except (KeyboardInterrupt, Interrupted) as e:
        print("interrupted", file=sys.stderr, flush=True)
        return 128 + signal_of(e)


if __name__ == "__main__":
    sys.exit(main())
