"""A resumable, shardable batch sampler for DataLoader training.

Every epoch is one permutation drawn from a seeded torch.Generator, cut into global batches of
`batch_size` (the incomplete last one dropped: fixed shapes). With several processes (DDP) every rank
draws the same permutation and takes its contiguous slice of each global batch, so a global batch holds
the same samples whatever the number of processes. The state (`state_dict()`) is the generator state at
the start of the current epoch, the epoch count and the position in it: restoring it continues an
interrupted epoch with exactly the remaining batches, without loading the skipped ones.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler

from .errors import CheckpointError, ConfigError


class EpochCursor:
    """The resumable position of a seeded, epoch-based batch source (EpochBatchSampler, DeviceLoader).

    All of an epoch's random draws are made at its start from `generator`, so the state is just the
    generator state at the epoch start, the epoch count and the position in it. Subclasses set
    `num_samples`, `batch_size`, `__len__` and `_draw_epoch()` (the epoch's draws, from the generator)
    and call `_start_epoch()` at the top of `__iter__`."""

    what = "loader"  # named in the mismatch message

    def _init_cursor(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.seed = seed
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.epoch = 0  # epochs started
        self.position = 0  # batches handed out in the current epoch
        self._epoch_start = self.generator.get_state()
        self._resume = False

    def _draw_epoch(self) -> Any:
        raise NotImplementedError

    def _start_epoch(self) -> Any:
        """Begin an epoch (or continue a restored one) and return its draws."""
        if self._resume:  # continue the restored epoch: same draws, skip the batches already seen
            self._resume = False
            self.generator.set_state(self._epoch_start)
        else:
            self.epoch += 1
            self.position = 0
            self._epoch_start = self.generator.get_state()
        return self._draw_epoch()

    def reseed(self, seed: int) -> None:
        """Start over at epoch 0 with the order drawn from `seed`: each training phase begins the same way
        whatever ran before it in the process."""
        self.generator.manual_seed(seed)
        self.epoch, self.position, self._resume = 0, 0, False
        self._epoch_start = self.generator.get_state()

    def state_dict(self, position: int | None = None) -> dict[str, Any]:
        """{epoch, position, generator (state at the epoch start), seed, num_samples, batch_size}."""
        return {
            "epoch": self.epoch,
            "position": self.position if position is None else position,
            "generator": self._epoch_start.clone(),
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(): the next epoch continues the saved one at `position`, or, when that epoch
        was complete (position >= len), starts the next epoch as the saved run would have."""
        for key in ("num_samples", "batch_size"):
            if state.get(key) != getattr(self, key):
                raise CheckpointError(
                    f"{self.what} state is for {key}={state.get(key)}, this run has {getattr(self, key)}"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._epoch_start = state["generator"].clone()
        self.generator.set_state(self._epoch_start)
        if self.epoch == 0:
            return
        if self.position < len(self):
            self._resume = True
        else:  # replay the finished epoch's draws so the generator is where it was
            self._draw_epoch()


class EpochBatchSampler(EpochCursor, Sampler[list[int]]):
    what = "sampler"

    """Yields this rank's list of dataset indices for each global batch of the epoch (see module doc).

    `batch_size` is the global batch; each of `world_size` ranks gets `batch_size // world_size` indices.
    `position` counts the batches handed out in the current epoch; a training loop that knows how many it
    consumed (a DataLoader prefetches) stores its own count via `state_dict(position=...)`."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or batch_size > num_samples:
            raise ConfigError(f"batch_size {batch_size} must be in [1, {num_samples}] (the split's size)")
        if batch_size % world_size:
            raise ConfigError(f"batch size {batch_size} is not divisible by the {world_size} processes")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self._init_cursor(seed)

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def _draw_epoch(self) -> Tensor:
        return torch.randperm(self.num_samples, generator=self.generator)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._start_epoch()
        per_rank = self.batch_size // self.world_size
        for i in range(self.position, len(self)):
            start = i * self.batch_size + self.rank * per_rank
            self.position = i + 1
            yield order[start : start + per_rank].tolist()
