"""Run records: what a run directory holds (config.json, metrics.jsonl, summary.json) and the rules that
readers of it (train.py's wandb logging, sweep.py's early termination, the report) share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEACHER_PHASE = "teacher:"  # stage-0 teacher fine-tuning rows have phase "teacher:<arch>"


def rounded_number(key: str, value: Any, significant: int = 6) -> Any:
    """A float as precise as what it measures, without float32 noise (23.999999463558197 -> 24.0): accuracies
    (%, keys with "acc") to 2 decimals, times and throughputs (keys with "time", "_s", "img", "images") to 1,
    other floats (losses, learning rates, weights) to `significant` significant digits; everything else (ints,
    bools, strings, NaN, inf) unchanged."""
    if not isinstance(value, float) or value != value or value in (float("inf"), float("-inf")):
        return value
    name = key.lower()
    if "acc" in name:
        return round(value, 2)
    if "time" in name or name.endswith("_s") or "per_s" in name or "img" in name or "images" in name:
        return round(value, 1)
    return float(f"{value:.{significant}g}")


def rounded_numbers(record: dict[str, Any]) -> dict[str, Any]:
    """rounded_number() of every entry: what summary.json and the wandb summary hold."""
    return {k: rounded_number(k, v) for k, v in record.items()}


def is_teacher_phase(phase: Any) -> bool:
    """Rows of stage-0 teacher fine-tuning, not of the trained model (their curves never mix into its)."""
    return str(phase).startswith(TEACHER_PHASE)


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows (rewritten atomically by train.py, so always whole); [] when there are none."""
    try:
        text = (Path(run_dir) / "metrics.jsonl").read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def metric_history(rows: list[dict[str, Any]], metric: str) -> list[float]:
    """The trained model's values of `metric`, one per row that logged it (teacher rows left out)."""
    return [
        float(r[metric])
        for r in rows
        if not is_teacher_phase(r.get("phase", "")) and isinstance(r.get(metric), (int, float))
    ]


def final_metric(run_dir: Path, metric: str) -> float | None:
    """The summary's value when it has the key, else the last logged value (wandb's summary rule)."""
    summary = read_json(Path(run_dir) / "summary.json") or {}
    if isinstance(summary.get(metric), (int, float)):
        return float(summary[metric])
    history = metric_history(read_rows(run_dir), metric)
    return history[-1] if history else None
