"""Progress of a run for people watching it: the running loss, images/s and ETAs of an epoch, and where the run
stands as a whole. `RunProgress.epoch_batches` wraps an epoch's batches: a tqdm bar with `postfix()` on a terminal,
and off one (slurm logs, `| tee`) a `line()` when `due()` says so, as timm's log_interval does."""

from __future__ import annotations

import itertools
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from kd.engine.distributed import DIST, say


@dataclass
class RunProgress:
    """The whole run: optimisation steps planned (grown as phases are planned, e.g. a teacher that must be
    fine-tuned) and the step rate of this session, for the run ETA. `log_every`: off a terminal, one line every
    N steps (0 = one about every `interval_s` seconds)."""

    planned_steps: int = 0
    log_every: int = 0
    interval_s: float = 30.0
    num_stages: int = 0
    now: Callable[[], float] = time.monotonic
    start_step: int | None = None
    start_time: float = field(default=0.0)
    epoch: "EpochMeter | None" = None  # the running or last epoch's meter

    def plan(self, steps: int) -> None:
        self.planned_steps += steps

    def eta_s(self, step: int) -> float | None:
        """Seconds left at run-wide step `step` at this session's mean step rate (None before the first step)."""
        if self.start_step is None:
            return None
        done, elapsed = step - self.start_step, self.now() - self.start_time
        if done <= 0 or elapsed <= 0:
            return None
        return max(self.planned_steps - step, 0) * elapsed / done

    def where(self, tag: str, epoch: int, epochs: int, step: int) -> str:
        """ "stage 1/2 phase A, epoch 3/4, run 40%, run ETA 12 min" for the phase `tag` at run-wide `step`."""
        share = f", run {100 * min(step / self.planned_steps, 1):.0f}%" if self.planned_steps else ""
        eta = self.eta_s(step)
        return f"{describe_phase(tag, self.num_stages)}, epoch {epoch}/{epochs}{share}" + (
            f", run ETA {format_duration(eta)}" if eta is not None else ""
        )

    def meter(self, total: int, initial: int = 0, step: int = 0) -> "EpochMeter":
        """The meter of an epoch of `total` steps, `initial` of them done, starting at run-wide `step` (the first
        meter of the session starts the run clock)."""
        if self.start_step is None:
            self.start_step, self.start_time = step, self.now()
        self.epoch = EpochMeter(total, initial, self.log_every, self.interval_s, self.now)
        return self.epoch

    def epoch_batches(
        self, batches: Iterable, total: int, done: int, step: int, desc: str, running_loss: Callable[[], float]
    ) -> Iterator:
        """The batches of an epoch of `total` steps, `done` of them already (a resumed epoch), from run-wide
        `step`, each metered once the caller's step has run: a bar with the running loss and images/s on a
        terminal (rank 0), else a line() every --run.log-every steps (or ~30 s). `running_loss()` syncs the
        device: it is read only when a report is due. Call `self.epoch.stop()` once the epoch's loss is read."""
        meter = self.meter(total, done, step)
        bar = tqdm(
            itertools.islice(batches, total - done),
            desc=desc,
            total=total,
            initial=done,
            disable=not (sys.stdout.isatty() and DIST.main),
            leave=False,
            dynamic_ncols=True,
        )
        for batch in bar:
            yield batch
            meter.add(len(batch[0]) * DIST.world_size)
            if meter.due(interval_s=None if bar.disable else 1.0):
                loss = running_loss()
                bar.set_postfix(meter.postfix(loss)) if not bar.disable else say(meter.line(desc, loss))


class EpochMeter:
    """One epoch's step counter: images/s since the epoch (re)started, ETA of the epoch, and when a report is
    due (every `every` steps, or every `interval_s` seconds when `every` is 0)."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        every: int = 0,
        interval_s: float = 30.0,
        now: Callable[[], float] = time.monotonic,
    ):
        self.total, self.step, self.every, self.interval_s, self.now = total, initial, every, interval_s, now
        self.start = self.last_report = now()
        self.end: float | None = None  # when training stopped (stop()): validation is not training
        self.steps_here = self.images = 0

    def add(self, images: int) -> None:
        self.step += 1
        self.steps_here += 1
        self.images += images

    def due(self, interval_s: float | None = None) -> bool:
        """True when a report is due (and then counts it as made); the last step never reports (the epoch line
        follows). `interval_s` overrides the time between reports (a terminal bar refreshes faster)."""
        if self.step >= self.total:
            return False
        if self.every and interval_s is None:
            return self.step % self.every == 0
        if self.now() - self.last_report >= (self.interval_s if interval_s is None else interval_s):
            self.last_report = self.now()
            return True
        return False

    def stop(self) -> None:
        """The epoch's training is over (call it after the device has finished, e.g. after reading the loss):
        rate() counts the time up to here only, whatever follows (validation, checkpoints)."""
        self.end = self.now()

    def rate(self) -> float:
        """Training images per second since the epoch (re)started, up to stop() (0 before the first step)."""
        elapsed = (self.now() if self.end is None else self.end) - self.start
        return self.images / elapsed if elapsed > 0 and self.images else 0.0

    def eta_s(self) -> float:
        elapsed = self.now() - self.start
        return (self.total - self.step) * elapsed / self.steps_here if self.steps_here else 0.0

    def postfix(self, loss: float) -> dict[str, str]:
        return {"loss": f"{loss:.4f}", "img/s": f"{self.rate():.0f}"}

    def line(self, desc: str, loss: float) -> str:
        return (
            f"[{desc}] step {self.step}/{self.total}  loss {loss:.4f}  {self.rate():.0f} img/s  "
            f"ETA {format_duration(self.eta_s())}"
        )


def describe_phase(tag: str, num_stages: int = 0) -> str:
    """A phase tag as words: asmb:A:s1 -> "stage 1/2 phase A", teacher:resnet20 -> "stage 0 teacher resnet20"."""
    asmb = re.fullmatch(r"asmb:([AB]):s(\d+)", tag)
    if asmb:
        return f"stage {asmb.group(2)}{f'/{num_stages}' if num_stages else ''} phase {asmb.group(1)}"
    if tag.startswith("teacher:"):
        return f"stage 0 teacher {tag.split(':', 1)[1]}"
    return tag


def format_duration(seconds: float) -> str:
    """45 s, 12 min, 2.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def mean_img_per_s(rows: list[dict], phases: Callable[[str], bool]) -> dict[str, float]:
    """{"img_per_s": mean training images/s over the epoch rows of the phases `phases` accepts} ({} without)."""
    rates = [r["train/img_per_s"] for r in rows if "train/img_per_s" in r and phases(str(r.get("phase", "")))]
    return {"img_per_s": sum(rates) / len(rates)} if rates else {}
