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
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kd.configs import flatten_config
from kd_cli.records import final_metric, is_teacher_phase, metric_history, read_json, read_rows, rounded_number
from kd.errors import ConfigError, WriteError
from kd.io import atomic_write_bytes, atomic_write_text
from kd.methods import method_names
from kd_cli.sweep_spec import DONE, STATE_FILE, Spec, distribution, flatten_parameters

# Config keys that never make two runs different settings (seeds are averaged over).
BOOKKEEPING = (
    "run.seed",
    "run.name",
    "run.out-dir",
    "run.overwrite",
    "run.device",
    "teachers.cache-dir",
    "data.workers",
    "data.eval-batch-size",
)
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


def save_figure(fig, path: Path) -> None:
    """`fig` as a PNG at `path`, rendered in memory and written atomically: a killed or failed report leaves the
    previous file or none, never a 0-byte or truncated PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(buf.getvalue(), path)


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
                runs.append(
                    Run(
                        name, path, flatten_config(config, dash=True), read_json(path / "summary.json"), read_rows(path)
                    )
                )
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
    settings that differ between the groups of that method (`kd (teachers.select=both)` beside `dkd`)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(setting_key(run), []).append(run)
    settings = [dict(key) for key in groups]
    out = []
    for key, members in groups.items():
        d = dict(key)
        same_method = [other for other in settings if other.get("method") == d.get("method")]
        varying = sorted(
            k
            for k in d
            if k != "method"  # among this method's groups that have the key
            and len({other[k] for other in same_method if k in other}) > 1
        )
        shown = [f"{k}={format_cell(json.loads(d[k]))}" for k in varying]
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
    """Summary columns: test/val accuracy, teacher, ensemble (ASMB: adapted ensemble) and synergy accuracy, how
    often ASMB's residual guard fired, images/s, wall time (those present)."""
    present = {
        k
        for r in runs
        if r.summary
        for k, v in r.summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    fused = [k for k in ("ensemble/test_acc", "adapted_ensemble/test_acc", "synergy/test_acc") if k in present]
    extra = (
        sorted(k for k in present if k.startswith("teacher/"))
        + fused
        + sorted(k for k in present if "synergy" in k and k not in fused)
        + [k for k in ("asmb/guard_fired",) if k in present]
    )
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
        spec = Spec(
            state.get("name", path.parent.name),
            raw.get("method", "?"),
            params,
            metric,
            raw.get("early_terminate"),
            [],
            raw,
        )
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
        rows.append([t["id"], t["status"], *[t["params"].get(k) for k in sweep.spec.swept()], value, t.get("epochs")])
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
        csv_rows.append(
            [members[0].method, label, len(members), *[rounded(k, x) for k, s in zip(keys, stats) for x in s]]
        )
        md_rows.append([label, len(members), *[fmt(*s) for s in stats]])
    write_csv(out / "report.csv", header, csv_rows)
    written.append(out / "report.csv")

    varying = _varying_keys(runs)
    run_header = ["run", "method", "seed", "status", *varying, *keys]
    run_rows = [
        [
            r.name,
            r.method,
            r.config.get("run.seed"),
            "finished" if r.finished else "incomplete",
            *[format_cell(r.config.get(k)) for k in varying],
            *[rounded(k, (r.summary or {}).get(k)) for k in keys],
        ]
        for r in runs
    ]
    write_csv(out / "runs.csv", run_header, run_rows)
    written.append(out / "runs.csv")

    comparison = comparison_rows(groups) if len(groups) > 1 else []
    if comparison:
        written += write_comparison(comparison, out)

    sweeps = find_sweeps(root)
    plots, plot_note = make_plots(groups, sweeps, out)
    run_plots = [] if plot_note else write_run_plots(runs, single=len(runs) == 1)
    written += plots + run_plots

    lines = [
        f"# Report: {root}",
        "",
        f"{len(runs)} run(s), {len(finished)} finished. Settings group runs that differ only in seed; "
        "values are mean ± sample std over the group's runs (n).",
        "",
        "## Methods",
        "",
    ]
    lines += md_table(["setting", "n", *keys], md_rows)
    if (out / "curves.png") in plots:
        lines += ["", "![validation accuracy per epoch](curves.png)"]
    if comparison:
        lines += ["", "## Comparison", "", COMPARISON_NOTE, ""]
        lines += (out / "comparison.md").read_text().splitlines()
        if (out / "comparison.png") in written:
            lines += ["", "![test accuracy per method, mean ± std over seeds](comparison.png)"]
    if run_plots:
        lines += ["", "## Per-run plots", ""]
        lines += [f"![{p.parent.name}: {p.stem}]({os.path.relpath(p, out)})" for p in run_plots]
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
    fig = curves_figure(plt, groups)
    if fig.axes[0].lines:
        save_figure(fig, out / "curves.png")
        written.append(out / "curves.png")
    plt.close(fig)
    for sweep in sweeps:
        path = plot_sweep(plt, sweep, out)
        if path is not None:
            written.append(path)
    return written, ""


def curves_figure(plt, groups: list[tuple[str, list[Run]]]):
    """val/acc per epoch, one line per setting (band = ± std over seeds, only with n >= 2). The epoch is the
    student's for single-phase methods and ASMB's global epoch (phase A and B counted) for ASMB runs."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    asmb = any(run.method == "asmb" for _, members in groups for run in members)
    others = any(run.method != "asmb" for _, members in groups for run in members)
    for label, members in groups:
        curves = [val_acc_by_epoch(run.rows) for run in members]
        curves = [c for c in curves if c]
        if not curves:
            continue
        x = sorted(set.intersection(*(set(c) for c in curves)))  # epochs every seed logged
        arr = np.asarray([[c[e] for e in x] for c in curves], dtype=float)
        ax.plot(x, arr.mean(0), marker="o", ms=3, label=f"{label} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(x, arr.mean(0) - arr.std(0, ddof=1), arr.mean(0) + arr.std(0, ddof=1), alpha=0.2)
    if ax.lines:
        xlabel = (
            "epoch (ASMB: global, phase A and B counted)"
            if asmb and others
            else "epoch (global: phase A and B counted)"
            if asmb
            else "epoch"
        )
        ax.set(xlabel=xlabel, ylabel="val/acc (%)", title="Validation accuracy per epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
        ax.grid(alpha=0.3)
    return fig


def val_acc_by_epoch(rows: list[dict[str, Any]]) -> dict[int, float]:
    """The trained model's val/acc by its `epoch` (ASMB: the global epoch of its phase-B rows)."""
    model_rows = [r for r in rows if not is_teacher_phase(r.get("phase", "")) and "val/acc" in r]
    return {int(r.get("epoch", i + 1)): float(r["val/acc"]) for i, r in enumerate(model_rows)}


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
        ax.plot(
            range(1, len(history) + 1),
            history,
            marker="o",
            ms=3,
            color=colors[i % 10],
            label=label,
            ls="--" if t["status"] == "stopped" else "-",
        )
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
    save_figure(fig, path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Rounding: numbers as precise as what they measure (no float32 noise such as 26.499998569488525)
# ----------------------------------------------------------------------------------------------
def rounded(key: str, value: Any) -> Any:
    """Accuracies (%) and gains to 2 decimals, times and throughputs to 1, other floats to 4 significant
    digits; everything else unchanged."""
    if isinstance(value, float) and ("gain" in key.lower() or "selected" in key.lower() or "last" in key.lower()):
        return round(value, 2)
    return rounded_number(key, value, significant=4)  # the rule of summary.json (kd_cli.records)


# ----------------------------------------------------------------------------------------------
# Comparison across methods: comparison.md / .csv / .tex and comparison.png
# ----------------------------------------------------------------------------------------------
# the families of kd/methods/__init__.py's table, in its order (teacher runs train no student: not compared)
FAMILIES = {family: method_names(family) for family in ("baseline", "logit", "feature", "multi-teacher", "asmb")}
SINGLE_TEACHER = FAMILIES["logit"] + FAMILIES["feature"]
COMPARISON_NOTE = (
    "Test accuracy (%) of the student selected on validation (selected, best/test_acc) and of the "
    "last epoch's (last/test_acc), mean ± sample std over seeds (n); gains are differences of the "
    "selected means ± their standard error (seeds independent; a gain above ~2 SE is resolved at "
    "this n); the best single-teacher method is the one with the best mean validation "
    "accuracy among kd/dkd/dist and the feature methods that distil from one teacher (not "
    "--teachers.select both)."
)


def family_of(method: str) -> str:
    return next((f for f, methods in FAMILIES.items() if method in methods), "other")


def family_order(method: str) -> tuple[int, int]:
    """ce, the single-teacher logit then feature methods, the multi-teacher baselines, anything else, asmb."""
    order = [*FAMILIES["baseline"], *SINGLE_TEACHER, *FAMILIES["multi-teacher"]]
    return (order.index(method), 0) if method in order else (len(order) + (method == "asmb"), 0)


@dataclass
class Compared:
    label: str
    method: str
    n: int
    single_teacher: bool
    stats: dict[str, tuple[float | None, float | None]]  # summary key -> (mean, std) over seeds
    gains: dict[str, float | None]  # "ce", "single" -> selected mean minus theirs
    gain_se: dict[str, float | None] = field(default_factory=dict)  # standard error of each gain (n >= 2 both)


def comparison_rows(groups: list[tuple[str, list[Run]]]) -> list[Compared]:
    """One row per setting with a selected test accuracy, in family order, with its gains."""
    rows = []
    for label, members in groups:
        keys = ["best/test_acc", "last/test_acc", "best/val_acc", *comparison_extra_keys(members)]
        stats = {
            k: mean_std([float(r.summary[k]) for r in members if isinstance(r.summary.get(k), (int, float))])
            for k in keys
        }
        if stats["best/test_acc"][0] is None:
            continue
        method = members[0].method
        single = method in SINGLE_TEACHER and members[0].config.get("teachers.select") != "both"
        rows.append(Compared(label, method, len(members), single, stats, {}))
    rows.sort(key=lambda r: (family_order(r.method), r.label))
    ce = next((r for r in rows if r.method == "ce"), None)
    # the best single-teacher setting is chosen on validation accuracy, like every other choice in kd
    best_single = max(
        (r for r in rows if r.single_teacher and r.stats["best/val_acc"][0] is not None),
        key=lambda r: r.stats["best/val_acc"][0],
        default=None,
    )
    for row in rows:
        for name, other in (("ce", ce), ("single", best_single)):
            compared = other is not None and row is not other and (name == "ce" or row.method != "ce")
            row.gains[name] = row.stats["best/test_acc"][0] - other.stats["best/test_acc"][0] if compared else None
            row.gain_se[name] = gain_se(row, other) if compared else None
    return rows


def gain_se(a: Compared, b: Compared) -> float | None:
    """Standard error of the difference of two settings' mean selected accuracy, sqrt(s_a^2/n_a + s_b^2/n_b)
    (independent seeds); None unless both have n >= 2. A gain above ~2 SE is resolved at this n."""
    (_, sa), (_, sb) = a.stats["best/test_acc"], b.stats["best/test_acc"]
    if sa is None or sb is None or a.n < 2 or b.n < 2:
        return None
    return math.sqrt(sa**2 / a.n + sb**2 / b.n)


def comparison_extra_keys(members: list[Run]) -> list[str]:
    """Teacher accuracies (test when the summaries have it, else val) and the ensemble's and synergy's."""
    present = {k for r in members for k in r.summary}
    archs = sorted({k.split("/")[1] for k in present if k.startswith("teacher/") and k.count("/") == 2})
    teachers = [
        f"teacher/{a}/test_acc" if f"teacher/{a}/test_acc" in present else f"teacher/{a}/val_acc" for a in archs
    ]
    fused = [k for k in ("ensemble/test_acc", "adapted_ensemble/test_acc", "synergy/test_acc") if k in present]
    return [k for k in teachers if k in present] + fused


def comparison_columns(rows: list[Compared]) -> list[str]:
    return list(
        dict.fromkeys(k for r in rows for k in r.stats if k not in ("best/test_acc", "last/test_acc", "best/val_acc"))
    )


def column_title(key: str) -> str:
    """`teacher/resnet20/test_acc` -> `teacher resnet20 (test)`, `synergy/test_acc` -> `synergy (test)`."""
    parts = key.split("/")
    split = parts[-1].split("_")[0]
    return " ".join(parts[:-1]) + f" ({split})"


def signed(x: float | None, se: float | None = None) -> str:
    return "" if x is None else f"{x:+.2f}" + ("" if se is None else f" ± {se:.2f}")


def write_comparison(rows: list[Compared], out: Path) -> list[Path]:
    extra = comparison_columns(rows)
    titles = ["method", "n", "selected", "last", "gain vs ce", "gain vs best single", *map(column_title, extra)]
    md_rows, csv_rows, tex_rows = [], [], []
    for r in rows:
        sel, last = r.stats["best/test_acc"], r.stats["last/test_acc"]
        cells = [
            fmt(*sel),
            fmt(*last),
            signed(r.gains["ce"], r.gain_se["ce"]),
            signed(r.gains["single"], r.gain_se["single"]),
            *[fmt(*r.stats.get(k, (None, None))) for k in extra],
        ]
        md_rows.append([r.label, r.n, *cells])
        tex_rows.append((r.method, [latex_escape(r.label), str(r.n), *[latex_cell(c) for c in cells]]))
        csv_rows.append(
            [
                r.label,
                r.method,
                family_of(r.method),
                r.n,
                *[rounded("acc", x) for x in (*sel, *last)],
                rounded("gain", r.gains["ce"]),
                rounded("gain", r.gain_se["ce"]),
                rounded("gain", r.gains["single"]),
                rounded("gain", r.gain_se["single"]),
                *[rounded(k, x) for k in extra for x in r.stats.get(k, (None, None))],
            ]
        )
    atomic_write_text("\n".join(md_table(titles, md_rows)) + "\n", out / "comparison.md")
    write_csv(
        out / "comparison.csv",
        [
            "setting",
            "method",
            "family",
            "n",
            "selected mean",
            "selected std",
            "last mean",
            "last std",
            "gain vs ce",
            "gain vs ce se",
            "gain vs best single",
            "gain vs best single se",
            *[f"{k} {s}" for k in extra for s in ("mean", "std")],
        ],
        csv_rows,
    )
    atomic_write_text(latex_table(titles, tex_rows), out / "comparison.tex")
    written = [out / "comparison.md", out / "comparison.csv", out / "comparison.tex"]
    png = plot_comparison(rows, out)
    return written + ([png] if png else [])


LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "_": r"\_",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def latex_cell(cell: str) -> str:
    """`71.00 ± 1.41` -> `$71.00 \\pm 1.41$`."""
    return "$" + cell.replace("±", r"\pm") + "$" if cell else ""


def latex_table(titles: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """A booktabs table (\\usepackage{booktabs}) with a rule between method families."""
    lines = [
        r"\begin{tabular}{l" + "r" * (len(titles) - 1) + "}",
        r"\toprule",
        " & ".join(latex_escape(t) for t in titles) + r" \\",
        r"\midrule",
    ]
    previous = None
    for method, cells in rows:
        if previous is not None and family_of(method) != family_of(previous):
            lines.append(r"\midrule")
        lines.append(" & ".join(cells) + r" \\")
        previous = method
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"


FAMILY_COLORS = {
    "baseline": "#7f7f7f",
    "logit": "#1f77b4",
    "feature": "#2ca02c",
    "multi-teacher": "#9467bd",
    "asmb": "#d62728",
    "other": "#8c564b",
}


def plot_comparison(rows: list[Compared], out: Path) -> Path | None:
    """Selected (solid) and last (hatched) test accuracy per method, error bars ± std, ce as a dashed line."""
    plt = pyplot()
    if plt is None:
        return None
    fig = comparison_figure(plt, rows)
    path = out / "comparison.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


def comparison_figure(plt, rows: list[Compared]):
    """The bar chart of plot_comparison; error bars (± std) only on settings with n >= 2 (one seed has none)."""
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 4.2))
    for offset, key, hatch, name in ((-0.2, "best/test_acc", None, "selected"), (0.2, "last/test_acc", "//", "last")):
        means = [r.stats[key][0] if r.stats[key][0] is not None else np.nan for r in rows]
        colors = [FAMILY_COLORS[family_of(r.method)] for r in rows]
        bars = ax.bar(
            x + offset,
            means,
            0.4,
            color=colors,
            hatch=hatch,
            alpha=1.0 if hatch is None else 0.55,
            edgecolor="black",
            linewidth=0.5,
            label=name,
        )
        spread = [
            (xi + offset, m, r.stats[key][1])
            for xi, m, r in zip(x, means, rows)
            if r.n >= 2 and r.stats[key][1] is not None
        ]
        if spread:
            xs, ms, ss = zip(*spread)
            ax.errorbar(xs, ms, yerr=ss, fmt="none", ecolor="black", elinewidth=0.8, capsize=3)
        if hatch is None:
            ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=2, fontsize=7)
    ce = next((r for r in rows if r.method == "ce"), None)
    if ce is not None:
        ax.axhline(ce.stats["best/test_acc"][0], color="black", ls="--", lw=0.8, label="ce (selected)")
    low = np.nanmin(
        [
            r.stats[k][0] - (r.stats[k][1] or 0)
            for r in rows
            for k in ("best/test_acc", "last/test_acc")
            if r.stats[k][0] is not None
        ]
    )
    ax.set_ylim(max(0.0, low - 5), None)
    ax.set_xticks(x, [r.label for r in rows], rotation=30, ha="right")
    seeds = "mean ± std over seeds" if any(r.n >= 2 for r in rows) else "one seed each: no error bars"
    ax.set(ylabel="test accuracy (%)", title=f"Test accuracy per method ({seeds})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# ----------------------------------------------------------------------------------------------
# Plots of one run, written into its run directory: ASMB's stages, and curves over the global epoch
# ----------------------------------------------------------------------------------------------
STAGE_PHASE = "asmb:stage"
STAGE_ACCS = ("teacher0/acc", "teacher1/acc", "ensemble/acc", "synergy/acc", "student/acc")


def write_run_plots(runs: list[Run], single: bool) -> list[Path]:
    """asmb_stages.png and run_curves.png for every ASMB run; run_curves.png for any run reported alone."""
    plt = pyplot()
    if plt is None:
        return []
    written = []
    for run in runs:
        stages = [r for r in run.rows if r.get("phase") == STAGE_PHASE]
        if stages:
            written.append(plot_asmb_stages(plt, run, stages))
        if (stages or single) and any("epoch" in r for r in run.rows):
            written.append(plot_run_curves(plt, run))
    return written


def teacher_names(run: Run) -> list[str]:
    models = run.config.get("teachers.models") or ()
    models = models.split(",") if isinstance(models, str) else list(models)
    return [f"teacher{i} ({models[i]})" if i < len(models) else f"teacher{i}" for i in range(2)]


GUARD_LABEL = "residual guard fired: synergy reset to the ensemble"


def plot_asmb_stages(plt, run: Run, stages: list[dict[str, Any]]) -> Path:
    """asmb_stages.png in the run directory (asmb_stages_figure)."""
    fig = asmb_stages_figure(plt, run, stages)
    path = run.path / "asmb_stages.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


def asmb_stages_figure(plt, run: Run, stages: list[dict[str, Any]]):
    """Left: validation accuracy of teachers 0/1, their ensemble, the synergy head and the student at the end
    of each stage; a stage whose residual guard fired (`guard/fired` 1: the synergy was below the ensemble, so
    the bridge's residual was reset and the synergy IS the ensemble) has its synergy point circled in black and
    labelled "guard". Right: the MBM's mean attention weight on each teacher per stage. One title for the figure
    (the run), short ones per panel, constrained layout: nothing overlaps."""
    x = [int(r.get("stage", i + 1)) for i, r in enumerate(stages)]
    names = dict(zip(("teacher0/acc", "teacher1/acc"), teacher_names(run)))
    fig, (acc_ax, attn_ax) = plt.subplots(
        1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [3, 2]}, layout="constrained"
    )
    styles = {
        "teacher0/acc": ("#1f77b4", "s", ":"),
        "teacher1/acc": ("#ff7f0e", "s", ":"),
        "ensemble/acc": ("#7f7f7f", "D", "--"),
        "synergy/acc": ("#9467bd", "o", "-"),
        "student/acc": ("#d62728", "o", "-"),
    }
    for key in STAGE_ACCS:
        if any(key in r for r in stages):
            color, marker, ls = styles[key]
            acc_ax.plot(
                x,
                [r.get(key, np.nan) for r in stages],
                marker=marker,
                ls=ls,
                color=color,
                lw=1.8,
                label=names.get(key, key.split("/")[0]),
            )
    fired = [
        (xi, float(r.get("synergy/acc", r.get("ensemble/acc", np.nan))))
        for xi, r in zip(x, stages)
        if r.get("guard/fired")
    ]
    if fired:
        fx, fy = zip(*fired)
        acc_ax.scatter(
            fx, fy, s=160, facecolors="none", edgecolors="black", linewidths=1.6, zorder=5, label=GUARD_LABEL
        )
        for xi, yi in fired:
            acc_ax.annotate(
                "guard",
                (xi, yi),
                xytext=(0, 10),
                textcoords="offset points",
                ha="center",
                fontsize=8,
                fontweight="bold",
            )
    acc_ax.set(xlabel="stage", ylabel="val accuracy (%)", title="accuracy at the end of each stage")
    acc_ax.set_xticks(x)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize="small")
    bottom = np.zeros(len(x))
    for key, color, name in (
        ("attn/teacher0", "#1f77b4", teacher_names(run)[0]),
        ("attn/teacher1", "#ff7f0e", teacher_names(run)[1]),
    ):
        w = np.asarray([float(r.get(key, np.nan)) for r in stages])
        if np.isnan(w).all():
            continue
        attn_ax.bar(x, w, 0.6, bottom=bottom, color=color, label=name)
        for xi, b, wi in zip(x, bottom, w):
            attn_ax.text(xi, b + wi / 2, f"{wi:.2f}", ha="center", va="center", fontsize=8, color="white")
        bottom = bottom + np.nan_to_num(w)
    attn_ax.set(xlabel="stage", ylabel="mean attention weight", ylim=(0, 1.05), title="MBM attention per teacher")
    attn_ax.set_xticks(x)
    attn_ax.legend(fontsize="small", loc="lower right")
    where = f"stage{'s' if len(fired) > 1 else ''} {', '.join(str(xi) for xi, _ in fired)}"
    fig.suptitle(f"{run.name}: ASMB stages" + (f" (residual guard fired at {where})" if fired else ""))
    return fig


def plot_run_curves(plt, run: Run) -> Path:
    """Accuracy (top) and training loss (bottom) over the global epoch. ASMB: phase A shaded (there the
    synergy head's val accuracy is what is logged, and its loss is another objective than phase B's, so
    each phase is its own line) and stage ends marked."""
    rows = [
        r
        for r in run.rows
        if not is_teacher_phase(r.get("phase", "")) and r.get("phase") != STAGE_PHASE and "epoch" in r
    ]
    fig, (acc_ax, loss_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    series = (
        ("val/acc", "student val acc", "#d62728", acc_ax),
        ("train/acc", "student train acc", "#ff9896", acc_ax),
        ("val/synergy_acc", "synergy val acc (phase A)", "#9467bd", acc_ax),
    )
    for key, name, color, ax in series:
        plot_segments(ax, rows, key, name, color)
    losses = {"A": "phase A loss (synergy)", "B": "phase B loss (student)"}
    for phase, name in losses.items():
        plot_segments(
            loss_ax,
            [r for r in rows if phase_kind(r) == phase],
            "train/loss",
            name,
            "#9467bd" if phase == "A" else "#d62728",
        )
    plot_segments(loss_ax, [r for r in rows if phase_kind(r) is None], "train/loss", "train loss", "#d62728")
    for ax in (acc_ax, loss_ax):
        shade_phase_a(ax, rows)
        for stage_row in (r for r in run.rows if r.get("phase") == STAGE_PHASE):
            ax.axvline(stage_row["epoch"] + 0.5, color="black", ls="--", lw=0.8)
            if ax is acc_ax:
                ax.annotate(
                    f"end of stage {stage_row.get('stage', '')}",
                    (stage_row["epoch"] + 0.5, 1.0),
                    xycoords=("data", "axes fraction"),
                    ha="right",
                    va="bottom",
                    fontsize=8,
                )
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    acc_ax.set(ylabel="accuracy (%)")
    acc_ax.set_title(f"{run.name}: accuracy and loss per epoch", pad=14)
    loss_ax.set(
        xlabel="epoch (global: phase A and B counted)" if any(phase_kind(r) for r in rows) else "epoch",
        ylabel="train loss",
    )
    for ax in (acc_ax, loss_ax):
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(
                dict(zip(labels, handles)).values(),
                dict(zip(labels, handles)).keys(),
                fontsize="small",
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
            )
    fig.tight_layout()
    path = run.path / "run_curves.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


def phase_kind(row: dict[str, Any]) -> str | None:
    """ "A" or "B" for ASMB rows (`asmb:A:s1`), None for single-phase methods."""
    parts = str(row.get("phase", "")).split(":")
    return parts[1] if len(parts) == 3 and parts[0] == "asmb" else None


def plot_segments(ax, rows: list[dict[str, Any]], key: str, name: str, color: str) -> None:
    """`key` against epoch, one line per phase (no line joins two phases), one legend entry."""
    segments: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if isinstance(r.get(key), (int, float)):
            segments.setdefault(str(r.get("phase")), []).append((int(r["epoch"]), float(r[key])))
    for points in segments.values():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", ms=3, color=color, label=name)


def shade_phase_a(ax, rows: list[dict[str, Any]]) -> None:
    """Grey band over each ASMB phase A (a row at epoch e covers e - 0.5 .. e + 0.5)."""
    spans: dict[str, list[int]] = {}
    for r in rows:
        if phase_kind(r) == "A":
            spans.setdefault(str(r["phase"]), []).append(int(r["epoch"]))
    for epochs in spans.values():
        ax.axvspan(min(epochs) - 0.5, max(epochs) + 0.5, color="#9467bd", alpha=0.12, lw=0, label="phase A")


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sweep.py report",
        description="Tables and plots from run directories (config.json, summary.json, "
        "metrics.jsonl), found recursively; sweeps are recognised by their sweep.json. Plots need matplotlib "
        "(pip install -e .[report]).",
    )
    p.add_argument("runs_dir", type=Path, help="a run directory, a sweep directory, or any folder holding them")
    p.add_argument(
        "--out", type=Path, help="where to write report.md, report.csv, runs.csv and PNGs (default RUNS_DIR)"
    )
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
    except (ConfigError, WriteError) as e:  # bad input: 2; a folder that cannot be written: 1
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1 if isinstance(e, WriteError) else 2


if __name__ == "__main__":
    sys.exit(main())
