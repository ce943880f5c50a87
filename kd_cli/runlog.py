"""The run's records on disk: one row per epoch in metrics.jsonl (rewritten atomically, so readers such as
sweep.py's early termination always see whole rows), summary.json at the end and train.log, a copy of what the
run printed. Rank 0 writes; other ranks keep the rows in memory. An optional `sink` (train.py's wandb run)
receives every row too."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable

from kd.io import atomic_write_json, atomic_write_text
from kd.engine.distributed import DIST, say


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        rows: list[dict[str, Any]] | None = None,
        sink: Callable[[dict[str, Any]], None] | None = None,
        wandb_id: str | None = None,
    ):
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

    def log_epoch(
        self,
        fit,
        epoch: int,
        epochs: int,
        terms: dict[str, float],
        val: tuple[float, float],
        val_key: str = "acc",
        start: float = 0.0,
    ) -> None:
        """The row and the printed line of epoch `epoch` of `epochs` of train.py's fit (kd.engine.trainer.FitState
        `fit`): its mean loss terms, validation top-1/top-5 (`val/<val_key>`, `val/<val_key>5`), the best so far,
        the learning rate, training images/s and the seconds since `start`; the row's epoch is global."""
        tr, progress = fit.trainer, fit.trainer.runtime.clock.progress
        steps = tr.runtime.clock.steps
        row = {
            "phase": fit.tag,
            "epoch": fit.epoch_offset + epoch,
            "step": steps,
            "lr": tr.optimizer.param_groups[0]["lr"],
            **{f"train/{k}": v for k, v in terms.items()},
            f"val/{val_key}": val[0],
            f"val/{val_key}5": val[1],
            f"val/best_{val_key}": fit.best["acc"],
            "train/img_per_s": progress.epoch.rate(),
            "time_s": time.time() - start,
        }
        self.log(row)
        say(
            f"[{fit.tag}] epoch {epoch}/{epochs}  loss {terms['loss']:.4f}  val {val_key} {val[0]:.2f}  "
            f"{row['train/img_per_s']:.0f} img/s  ({row['time_s']:.1f}s)  | "
            + progress.where(fit.tag, epoch, epochs, steps)
        )

    def write_summary(self, summary: dict[str, Any]) -> None:
        if DIST.main:
            atomic_write_json(summary, self.run_dir / "summary.json")


def format_summary(summary: dict[str, Any]) -> str:
    """The end of a run: a few sentences a person reads (teachers, their ensemble, the synergy, the student,
    where the files are), then one `key  value` line per summary entry, floats to 2 decimals."""
    width = max(len(k) for k in summary)
    return (
        "\n"
        + "\n".join(in_words(summary))
        + "\n\nresults\n"
        + "\n".join(
            f"  {k:<{width}}  {v:.2f}" if isinstance(v, float) else f"  {k:<{width}}  {v}" for k, v in summary.items()
        )
    )


def in_words(s: dict[str, Any]) -> list[str]:
    """The summary in short lines (test accuracies, %); only what the run has."""
    teachers = [(k.split("/")[1], v) for k, v in s.items() if k.startswith("teacher/") and k.endswith("/test_acc")]
    lines = []
    if teachers:
        ensemble = f"; their ensemble {s['ensemble/test_acc']:.2f}" if "ensemble/test_acc" in s else ""
        lines.append("teachers (test): " + ", ".join(f"{a} {v:.2f}" for a, v in teachers) + ensemble)
    if "synergy/test_acc" in s:
        guard = f"; residual guard fired {s['asmb/guard_fired']} time(s)" if "asmb/guard_fired" in s else ""
        lines.append(
            f"synergy (test): {s['synergy/test_acc']:.2f} (adapted teachers' ensemble "
            f"{s['adapted_ensemble/test_acc']:.2f}{guard})"
        )
    if "best/test_acc" in s:
        lines.append(
            f"student (test): {s['best/test_acc']:.2f} selected on validation (epoch {s.get('best/epoch')}), "
            f"{s['last/test_acc']:.2f} at the last epoch"
        )
    if "run_dir" in s:
        lines.append(f"files: {s['run_dir']}/ (summary.json, metrics.jsonl, train.log, checkpoints/)")
    return ["summary"] + [f"  {line}" for line in lines]


class _Copy:
    """A text stream that also writes to `log` (a progress bar's carriage-return redraws excepted)."""

    def __init__(self, stream: IO[str], log: IO[str]):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if "\r" not in text:
            self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the terminal's
        return getattr(self.stream, name)


_console: dict[str, Any] = {}


def copy_console_to(path: Path) -> None:
    """From now on, append everything printed to stdout and stderr to `path` as well (rank 0's train.log);
    stop_console_copy() ends it. Starting again first ends the previous copy."""
    stop_console_copy()
    log = open(path, "a", buffering=1)
    copies = _Copy(sys.stdout, log), _Copy(sys.stderr, log)
    _console.update(log=log, streams=(sys.stdout, sys.stderr), copies=copies)
    sys.stdout, sys.stderr = copies


def stop_console_copy() -> None:
    """End the copy; streams someone replaced since (a test's capture) are left as they are."""
    if _console:
        if sys.stdout is _console["copies"][0]:
            sys.stdout = _console["streams"][0]
        if sys.stderr is _console["copies"][1]:
            sys.stderr = _console["streams"][1]
        _console.pop("log").close()
        _console.clear()
