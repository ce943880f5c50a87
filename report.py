"""The report of run directories: tables (Markdown, CSV) and PNG plots.

    python sweep.py report runs/sweeps          # report.md, report.csv, runs.csv and PNG plots
    python report.py runs/sweeps --out out/     # the same

A run directory is a folder holding config.json beside metrics.jsonl or summary.json (what train.py writes);
runs are found recursively, and sweeps by their sweep.json (written by sweep.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd.engine.records import final_metric, flatten_config, is_teacher_phase, metric_history, read_json, read_rows
from kd.errors import ConfigError
from kd.io import atomic_write_text
from sweep import DONE, STATE_FILE, Spec, distribution, flatten_parameters

# Config keys that never make two runs different settings (seeds are averaged over).
BOOKKEEPING = ("run.seed", "run.name", "run.out-dir", "run.overwrite", "run.device", "teachers.cache-dir",
               "data.workers", "data.eval-batch-size")
STANDARD_GROUPS = ("data", "student", "teachers", "optim", "run", "wandb")
MAIN_KEYS = ("best/test_acc", "last/test_acc", "best/val_acc")


@dataclass
class Run:
    name: str  # path relative to the report root
    path: Path
    config: dict[str, Any]  # flattened, dash-form keys ("kd.temperature")
    summary: dict[str, Any] | None
    rows: list[dict[str, Any]]

    @property
    def method(self) -> str:
        return str(self.config.get("method", "?"))

    @property
    def finished(self) -> bool:
        return self.summary is not None


def find_runs(root: Path) -> list[Run]:
    """Every run directory (a config.json beside metrics.jsonl or summary.json) under root, sorted by path."""
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("wandb", "checkpoints", "logs"))
        if "config.json" in filenames and ({"metrics.jsonl", "summary.json"} & set(filenames)):
            path = Path(dirpath)
            config = read_json(path / "config.json")
            if isinstance(config, dict):
                name = str(path.relative_to(root)) if path != root else path.name
                runs.append(Run(name, path, flatten_config(config, dash=True), read_json(path / "summary.json"), read_rows(path)))
            dirnames[:] = []  # a run directory holds no other runs
    return runs


def relevant(key: str, method: str) -> bool:
    """Whether a config key can make a run of `method` a different setting (not bookkeeping, not another
    method's option group)."""
    if key in BOOKKEEPING or key.startswith("wandb."):
        return False
    group = key.split(".", 1)[0]
    return "." not in key or group in STANDARD_GROUPS or group == method


def setting_key(run: Run) -> tuple:
    return tuple(sorted((k, json.dumps(v, default=str)) for k, v in run.config.items() if relevant(k, run.method)))


def group_runs(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Runs that differ only in seed (and bookkeeping) form one group, labelled by the method and the
    settings that differ between groups."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(setting_key(run), []).append(run)
    settings = [dict(key) for key in groups]
    varying = sorted({k for d in settings for k in d if k != "method"  # among the groups that have the key
                      and len({other[k] for other in settings if k in other}) > 1})
    out = []
    for key, members in groups.items():
        d = dict(key)
        shown = [f"{k}={format_cell(json.loads(d[k]))}" for k in varying if k in d]
        out.append((members[0].method + (f" ({', '.join(shown)})" if shown else ""), members))
    return sorted(out, key=lambda g: g[0])


def format_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table_keys(runs: list[Run]) -> list[str]:
    """Summary columns: test/val accuracy, teacher and synergy accuracy, images/s, wall time (those present)."""
    present = {k for r in runs if r.summary for k, v in r.summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    extra = sorted(k for k in present if k.startswith("teacher/")) + sorted(k for k in present if "synergy" in k)
    speed = sorted(k for k in present if "images" in k or "img" in k or "throughput" in k)
    keys = [k for k in MAIN_KEYS if k in present] + extra + speed
    keys += ["wall_time_s"] if "wall_time_s" in present else []
    return list(dict.fromkeys(keys))


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    if not values:
        return None, None
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    atomic_write_text(buf.getvalue(), path)


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in [header, *rows]]
    rows = ["| " + " | ".join(r) + " |" for r in esc]
    return [rows[0], "|" + "---|" * len(header), *rows[1:]]


@dataclass
class SweepInfo:
    name: str
    state: dict[str, Any]
    spec: Spec
    path: Path


def find_sweeps(root: Path) -> list[SweepInfo]:
    out = []
    for path in sorted(root.rglob(STATE_FILE)):
        state = read_json(path)
        if not isinstance(state, dict) or "spec" not in state:
            continue
        raw = state["spec"]
        params = flatten_parameters(raw.get("parameters") or {})
        metric = raw.get("metric")
        metric = {"name": metric["name"], "goal": metric.get("goal", "minimize")} if isinstance(metric, dict) else None
        spec = Spec(state.get("name", path.parent.name), raw.get("method", "?"), params, metric,
                    raw.get("early_terminate"), [], raw)
        out.append(SweepInfo(spec.name, state, spec, path.parent))
    return out


def sweep_rows(sweep: SweepInfo) -> tuple[list[str], list[list[Any]]]:
    """One row per trial: status, swept parameters, the metric (from the trial's files), epochs run."""
    metric = sweep.spec.metric["name"] if sweep.spec.metric else "best/val_acc"
    header = ["trial", "status", *sweep.spec.swept(), metric, "epochs"]
    rows = []
    for t in sweep.state["trials"]:
        run_dir = sweep.path / t.get("run_dir", t["id"])
        value = final_metric(run_dir, metric) if run_dir.is_dir() else t.get("metric")
        rows.append([t["id"], t["status"], *[t["params"].get(k) for k in sweep.spec.swept()], value,
                     t.get("epochs")])
    return header, rows


def write_report(root: Path, out: Path) -> list[Path]:
    """report.md, report.csv (settings x metrics, mean ± std over seeds), runs.csv (every run) and plots."""
    runs = find_runs(root)
    if not runs:
        raise ConfigError(f"no run directories (config.json + metrics.jsonl/summary.json) under {root}")
    out.mkdir(parents=True, exist_ok=True)
    finished = [r for r in runs if r.finished]
    keys = table_keys(runs)
    groups = group_runs(finished)
    written = []

    header = ["method", "setting", "n"] + [f"{k} {s}" for k in keys for s in ("mean", "std")]
    csv_rows, md_rows = [], []
    for label, members in groups:
        stats = [mean_std([r.summary[k] for r in members if isinstance(r.summary.get(k), (int, float))]) for k in keys]
        csv_rows.append([members[0].method, label, len(members), *[x for s in stats for x in s]])
        md_rows.append([label, len(members), *[fmt(*s) for s in stats]])
    write_csv(out / "report.csv", header, csv_rows)
    written.append(out / "report.csv")

    varying = _varying_keys(runs)
    run_header = ["run", "method", "seed", "status", *varying, *keys]
    run_rows = [[r.name, r.method, r.config.get("run.seed"), "finished" if r.finished else "incomplete",
                 *[format_cell(r.config.get(k)) for k in varying], *[(r.summary or {}).get(k) for k in keys]]
                for r in runs]
    write_csv(out / "runs.csv", run_header, run_rows)
    written.append(out / "runs.csv")

    sweeps = find_sweeps(root)
    plots, plot_note = make_plots(groups, sweeps, out)
    written += plots

    lines = [f"# Report: {root}", "",
             f"{len(runs)} run(s), {len(finished)} finished. Settings group runs that differ only in seed; "
             "values are mean ± sample std over the group's runs (n).", "", "## Methods", ""]
    lines += md_table(["setting", "n", *keys], md_rows)
    if (out / "curves.png") in plots:
        lines += ["", "![validation accuracy per epoch](curves.png)"]
    for sweep in sweeps:
        header_s, rows_s = sweep_rows(sweep)
        goal = f", {sweep.spec.metric['goal']} {sweep.spec.metric['name']}" if sweep.spec.metric else ""
        lines += ["", f"## Sweep `{sweep.name}` ({sweep.spec.method}{goal}; {sweep.path})", ""]
        lines += md_table(header_s, [[format_cell(c) if c is not None else "" for c in row] for row in rows_s])
        png = out / f"sweep-{sweep.name}.png"
        if png in plots:
            lines += ["", f"![{sweep.name}: metric against each swept parameter]({png.name})"]
    lines += ["", "## Runs", ""]
    lines += md_table(run_header, [[format_cell(c) if c is not None else "" for c in row] for row in run_rows])
    if plot_note:
        lines += ["", f"_{plot_note}_"]
    atomic_write_text("\n".join(lines) + "\n", out / "report.md")
    written.insert(0, out / "report.md")
    if plot_note:
        print(plot_note, file=sys.stderr, flush=True)
    return written


def _varying_keys(runs: list[Run]) -> list[str]:
    """Config keys with more than one value among the runs they matter to (the runs table's columns)."""
    values: dict[str, set[str]] = {}
    for r in runs:
        for k, v in r.config.items():
            if relevant(k, r.method) and k != "method":
                values.setdefault(k, set()).add(json.dumps(v, default=str))
    return sorted(k for k, vs in values.items() if len(vs) > 1)


def make_plots(groups: list[tuple[str, list[Run]]], sweeps: list[SweepInfo], out: Path) -> tuple[list[Path], str]:
    """curves.png (val/acc per epoch, one line per setting, band = ± std over seeds) and, per sweep,
    sweep-<name>.png (the metric per epoch of every trial, and the final metric against each swept parameter)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install -e .[report])"
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, members in groups:
        curves = [[r["val/acc"] for r in run.rows if not is_teacher_phase(r.get("phase", "")) and "val/acc" in r] for run in members]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(map(len, curves))
        arr = np.asarray([c[:n] for c in curves], dtype=float)
        x = np.arange(1, n + 1)
        ax.plot(x, arr.mean(0), marker="o", ms=3, label=f"{label} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(x, arr.mean(0) - arr.std(0, ddof=1), arr.mean(0) + arr.std(0, ddof=1), alpha=0.2)
    if ax.lines:
        ax.set(xlabel="epoch", ylabel="val/acc (%)", title="Validation accuracy per epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
        ax.grid(alpha=0.3)
        fig.savefig(out / "curves.png", dpi=120, bbox_inches="tight")
        written.append(out / "curves.png")
    plt.close(fig)
    for sweep in sweeps:
        path = plot_sweep(plt, sweep, out)
        if path is not None:
            written.append(path)
    return written, ""


def plot_sweep(plt, sweep: SweepInfo, out: Path) -> Path | None:
    """One colour per trial; dashed = stopped early, x = failed (no metric)."""
    metric = sweep.spec.metric["name"] if sweep.spec.metric else "best/val_acc"
    swept = sweep.spec.swept()
    trials = [t for t in sweep.state["trials"] if t["status"] in DONE]
    if not trials:
        return None
    fig, axes = plt.subplots(1, 1 + len(swept), figsize=(4.2 * (1 + len(swept)), 3.8), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    values = {t["id"]: final_metric(sweep.path / t.get("run_dir", t["id"]), metric) for t in trials}
    ax = axes[0][0]
    for i, t in enumerate(trials):
        history = metric_history(read_rows(sweep.path / t.get("run_dir", t["id"])), metric)
        label = f"{t['id']} ({t['status']})"
        ax.plot(range(1, len(history) + 1), history, marker="o", ms=3, color=colors[i % 10], label=label,
                ls="--" if t["status"] == "stopped" else "-")
    ax.set(xlabel="epoch", ylabel=metric, title=f"sweep {sweep.name}: {metric} per epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    for ax, name in zip(axes[0][1:], swept):
        xs = [t["params"].get(name) for t in trials]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        cats = sorted({format_cell(x) for x in xs}) if not numeric else []
        ys = [values[t["id"]] for t in trials]
        low = min((y for y in ys if y is not None), default=0.0)
        for i, (t, x, y) in enumerate(zip(trials, xs, ys)):
            pos = x if numeric else cats.index(format_cell(x))
            ax.scatter(pos, low if y is None else y, color=colors[i % 10], marker="x" if y is None else "o", s=40)
        if not numeric:
            ax.set_xticks(range(len(cats)), cats, rotation=30)
        elif "log" in distribution(sweep.spec.parameters[name]):
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel=metric, title=f"{metric} vs {name}")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize="small")
    fig.tight_layout()
    path = out / f"sweep-{sweep.name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path




def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sweep.py report", description="Tables and plots from run directories (config.json, summary.json, "
        "metrics.jsonl), found recursively; sweeps are recognised by their sweep.json. Plots need matplotlib "
        "(pip install -e .[report]).")
    p.add_argument("runs_dir", type=Path, help="a run directory, a sweep directory, or any folder holding them")
    p.add_argument("--out", type=Path,
                   help="where to write report.md, report.csv, runs.csv and PNGs (default RUNS_DIR)")
    return p



def report_main(argv: list[str]) -> int:
    a = report_parser().parse_args(argv)
    if not a.runs_dir.is_dir():
        raise ConfigError(f"{a.runs_dir} is not a directory")
    for path in write_report(a.runs_dir, a.out or a.runs_dir):
        print(path, flush=True)
    return 0



def main(argv: list[str] | None = None) -> int:
    try:
        return report_main(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
