"""What ASMB learned, per run and per setting, from the run directories of a sweep: the teachers as given, their
plain ensemble, the adapted ensemble and the synergy on test, the residual's share (synergy - adapted ensemble),
how often the residual guard fired (the stage rows' guard/fired), the attention split at the last stage (validation
split) and the student. Reads only the files a run writes (summary.json, metrics.jsonl, config.json).

    python bench/asmb_readout.py runs/sweeps/bench_tin20 runs/sweeps/bench_tin20_asmb
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import statistics
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kd.configs import AsmbCfg  # noqa: E402  (torch-free)

COLUMNS = ("seed", "ensemble", "adapted", "synergy", "syn-ens", "syn-adapted", "guard fired", "attn t0/t1", "student")


def read_run(run_dir: Path) -> dict | None:
    """One ASMB run's readout, or None when the directory is not a finished asmb run."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if config.get("method") != "asmb":
        return None
    stages = [r for r in rows if r.get("phase") == "asmb:stage"]
    a = config["asmb"]
    defaults = dataclasses.asdict(AsmbCfg())  # the setting: every --asmb.* option away from its default
    setting = ", ".join(f"{k}={a[k]}" for k, v in defaults.items() if k in a and a[k] != v) or "defaults"
    teachers = {k.split("/")[1]: v for k, v in summary.items() if k.startswith("teacher/") and k.endswith("/test_acc")}
    last = stages[-1] if stages else {}
    return {
        "setting": setting,
        "seed": config["run"]["seed"],
        "teachers": teachers,
        "ensemble": summary.get("ensemble/test_acc"),
        "adapted": summary.get("adapted_ensemble/test_acc"),
        "synergy": summary.get("synergy/test_acc"),
        "student": summary.get("best/test_acc"),
        "guard": [r["guard/fired"] for r in stages if "guard/fired" in r] if a.get("ensemble_base", True) else None,
        "attn": (last.get("attn/teacher0"), last.get("attn/teacher1")),
    }


def cells(r: dict) -> list[str]:
    def f(x):
        return "" if x is None else f"{x:.2f}"

    def diff(x, y):
        return None if x is None or y is None else x - y

    guard = "n/a (no residual)" if r["guard"] is None else f"{sum(r['guard'])} of {len(r['guard'])}"
    attn = "" if r["attn"][0] is None else f"{r['attn'][0]:.3f} / {r['attn'][1]:.3f}"
    return [
        str(r["seed"]),
        f(r["ensemble"]),
        f(r["adapted"]),
        f(r["synergy"]),
        f(diff(r["synergy"], r["ensemble"])),
        f(diff(r["synergy"], r["adapted"])),
        guard,
        attn,
        f(r["student"]),
    ]


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", type=Path, help="sweep directories (or any folders holding run directories)")
    a = p.parse_args()
    runs = [
        r
        for d in a.sweeps
        for run_dir in sorted(d.iterdir())
        if run_dir.is_dir()
        if (r := read_run(run_dir)) is not None
    ]
    by_setting: dict[str, list[dict]] = {}
    for r in runs:
        by_setting.setdefault(r["setting"], []).append(r)
    for setting, members in by_setting.items():
        teachers = ", ".join(f"{k} {v:.2f}" for k, v in members[0]["teachers"].items())
        print(f"\n### asmb ({setting}): teachers as given (test) {teachers}\n")
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for r in sorted(members, key=lambda r: r["seed"]):
            print("| " + " | ".join(cells(r)) + " |")
        fired = [sum(r["guard"]) for r in members if r["guard"] is not None]
        stage_count = sum(len(r["guard"]) for r in members if r["guard"] is not None)
        diff = [r["synergy"] - r["ensemble"] for r in members]
        share = [r["synergy"] - r["adapted"] for r in members]
        print(
            f"| mean ± std (n={len(members)}) | {mean_std([r['ensemble'] for r in members])} | "
            f"{mean_std([r['adapted'] for r in members])} | {mean_std([r['synergy'] for r in members])} | "
            f"{mean_std(diff)} | {mean_std(share)} | "
            f"{f'{sum(fired)} of {stage_count}' if fired else 'n/a'} | "
            f"{mean_std([r['attn'][0] for r in members])} | {mean_std([r['student'] for r in members])} |"
        )


if __name__ == "__main__":
    main()
