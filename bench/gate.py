"""The benchmark's checks, read before any comparison (BENCHMARKS.md, "The benchmark"): from the run directories
of one or more sweeps, the student trained alone (ce) and vanilla KD (kd at its defaults) over every seed
found, each teacher's test accuracy and its margin over ce, and KD's gain over ce in standard errors; with
`--plateau DIR`, ce trained for longer (sweeps/bench_tin20_plateau.yaml) against ce at the benchmark's
epochs, seed by seed. Reads only summary.json and config.json.

    python bench/gate.py runs/sweeps/bench_tin20 runs/sweeps/bench_tin20_gate \\
        --plateau runs/sweeps/bench_tin20_plateau
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KD_DEFAULTS = {"temperature": 4.0, "kd_weight": 0.9, "standardize": False}


def read_runs(folders: list[Path]) -> list[dict]:
    """(method, seed, epochs, test accuracy, teachers' test accuracies) of every finished run under `folders`."""
    runs = []
    for folder in folders:
        for summary_path in sorted(folder.glob("**/summary.json")):
            try:
                summary = json.loads(summary_path.read_text())
                config = json.loads((summary_path.parent / "config.json").read_text())
            except (OSError, ValueError):
                continue
            method = config.get("method")
            if method == "kd" and any(config["kd"].get(k) != v for k, v in KD_DEFAULTS.items()):
                method = "kd (other settings)"
            teachers = {
                k.split("/")[1]: v for k, v in summary.items() if k.startswith("teacher/") and k.endswith("/test_acc")
            }
            runs.append(
                {
                    "method": method,
                    "seed": config["run"]["seed"],
                    "epochs": config["optim"]["epochs"],
                    "test": summary["best/test_acc"],
                    "teachers": teachers,
                }
            )
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", type=Path, help="sweep directories holding the ce and kd runs")
    p.add_argument("--plateau", type=Path, help="sweep directory of ce trained longer (same seeds)")
    a = p.parse_args()
    runs = read_runs(a.sweeps)
    ce = {r["seed"]: r for r in runs if r["method"] == "ce"}
    kd = {r["seed"]: r for r in runs if r["method"] == "kd"}
    if len(ce) < 2 or len(kd) < 2:
        raise SystemExit(f"need ce and kd runs on at least 2 seeds each; found ce {sorted(ce)}, kd {sorted(kd)}")
    ce_mean, ce_std = mean_std([r["test"] for r in ce.values()])
    kd_mean, kd_std = mean_std([r["test"] for r in kd.values()])
    print(f"ce  (n={len(ce)}, seeds {sorted(ce)}): {ce_mean:.2f} ± {ce_std:.2f}")
    print(f"kd  (n={len(kd)}, seeds {sorted(kd)}): {kd_mean:.2f} ± {kd_std:.2f}")
    gain = kd_mean - ce_mean
    se = (ce_std**2 / len(ce) + kd_std**2 / len(kd)) ** 0.5
    verdict = "passes" if se and gain > 2 * se else "fails"
    print(
        f"kd - ce: {gain:+.2f} ± {se:.2f} (standard error) = {gain / se if se else float('inf'):.2f} SE: "
        f"the check (> 2 SE) {verdict}"
    )
    teachers = next(iter(kd.values()))["teachers"]
    for name, acc in teachers.items():
        margin = acc - ce_mean
        print(
            f"teacher {name}: {acc:.2f} on test, {margin:+.2f} over ce: the check (>= 8) "
            f"{'passes' if margin >= 8 else 'fails'}"
        )
    if a.plateau:
        longer = {r["seed"]: r for r in read_runs([a.plateau]) if r["method"] == "ce"}
        pairs = [(ce[s]["test"], longer[s]["test"]) for s in sorted(set(ce) & set(longer))]
        if pairs:
            gains = [b - c for c, b in pairs]
            epochs = next(iter(longer.values()))["epochs"], next(iter(ce.values()))["epochs"]
            print(
                f"ce at {epochs[0]} epochs minus ce at {epochs[1]}, seed by seed "
                f"{sorted(set(ce) & set(longer))}: "
                + ", ".join(f"{g:+.2f}" for g in gains)
                + f" (mean {statistics.mean(gains):+.2f})"
            )


if __name__ == "__main__":
    main()
