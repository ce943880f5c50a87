"""The run's records on disk: one row per epoch in metrics.jsonl (rewritten atomically, so readers such as
sweep.py's early termination always see whole rows) and summary.json at the end. Rank 0 writes; other
ranks keep the rows in memory. An optional `sink` (train.py's wandb run) receives every row too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..io import atomic_write_json, atomic_write_text
from .distributed import DIST


class RunLogger:
    def __init__(self, run_dir: Path, rows: list[dict[str, Any]] | None = None,
                 sink: Callable[[dict[str, Any]], None] | None = None, wandb_id: str | None = None):
        """`rows`: the rows of a resumed run's checkpoint (rows logged after it are redone). `wandb_id`: the
        wandb run it continues (stored in checkpoints)."""
        self.run_dir, self.rows, self.sink, self.wandb_id = Path(run_dir), list(rows or []), sink, wandb_id
        if rows and DIST.main:
            self._write_rows()

    def _write_rows(self) -> None:
        atomic_write_text("".join(json.dumps(r) + "\n" for r in self.rows), self.run_dir / "metrics.jsonl")

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if DIST.main:
            self._write_rows()
            if self.sink is not None:
                self.sink(row)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if DIST.main:
            atomic_write_json(summary, self.run_dir / "summary.json")


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table: one `key  value` line per summary entry, floats to 2 decimals."""
    width = max(len(k) for k in summary)
    return "\nresults\n" + "\n".join(f"  {k:<{width}}  {v:.2f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
                                      for k, v in summary.items())
