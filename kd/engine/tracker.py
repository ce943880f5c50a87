"""Loss bookkeeping of one epoch without a host sync per step, and divergence detection."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import KDError
from .distributed import DIST


class TrainingDiverged(KDError):
    """A loss term became NaN or infinite (exit code 3; the last good checkpoint is kept)."""


class LossTracker:
    """One epoch's sums of the loss terms and, per term, the first run-wide step at which it was not
    finite, both kept on the device: no host sync per step. check() reads them (at checkpoints and the
    epoch end) and raises TrainingDiverged naming the step and the term."""

    NEVER = 2**62

    def __init__(self):
        self.names: list[str] = []
        self.sums: Tensor | None = None  # [terms] float32
        self.first_bad: Tensor | None = None  # [terms] int64, NEVER while finite
        self.n = 0  # steps added

    def add(self, terms: dict[str, Tensor], step: int) -> None:
        values = torch.stack([v.float() for v in terms.values()])
        if self.sums is None:
            self.names = list(terms)
            self.sums = torch.zeros_like(values)
            self.first_bad = torch.full(values.shape, self.NEVER, dtype=torch.long, device=values.device)
        self.sums += values
        self.first_bad = torch.where(torch.isfinite(values), self.first_bad, self.first_bad.clamp(max=step))
        self.n += 1

    def reduced(self) -> tuple[Tensor, Tensor]:
        """(sums averaged over processes, first bad step over processes); the local tensors without DDP."""
        if not DIST.enabled:
            return self.sums, self.first_bad
        sums, bad = self.sums.clone(), self.first_bad.clone()
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
        return sums / DIST.world_size, bad

    def check(self, where: str) -> None:
        if self.sums is None:
            return
        _, bad = self.reduced()
        bad = bad.tolist()
        step = min(bad)
        if step == self.NEVER:
            return
        culprits = [k for k, s in zip(self.names, bad) if s == step]
        term = next((k for k in culprits if k != "loss"), culprits[0])  # the term that broke the weighted sum
        raise TrainingDiverged(
            f"training diverged at step {step}, {where}: loss term '{term}' is not finite; "
            "stopped, the last good checkpoint is kept"
        )

    def running_loss(self) -> float:
        """This process's mean of the first term (the weighted loss) so far: a host sync, for progress lines."""
        return self.sums[0].item() / self.n

    def means(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        sums, _ = self.reduced()
        return dict(zip(self.names, (sums / max(self.n, 1)).tolist()))

    def state(self) -> dict[str, Any]:
        """The partial sums of a mid-epoch checkpoint (averaged over processes: every rank restores them)."""
        sums, bad = self.reduced() if self.sums is not None else (None, None)
        return {
            "names": list(self.names),
            "n": self.n,
            "sums": None if sums is None else sums.cpu(),
            "first_bad": None if bad is None else bad.cpu(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "LossTracker":
        t = cls()
        t.names, t.n = list(state["names"]), int(state["n"])
        if state["sums"] is not None:
            t.sums, t.first_bad = state["sums"].to(device), state["first_bad"].to(device)
        return t
