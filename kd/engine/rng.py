"""Seeds and RNG state: seeding, per-phase reseeding, and every RNG's state in a form that
torch.load(weights_only=True) accepts, gathered over processes for checkpoints."""

from __future__ import annotations

import io
import os
import random
import zlib
from typing import Any

import numpy as np
import torch

from .distributed import DIST


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def phase_seed(seed: int, tag: str) -> int:
    """The seed of one training phase: a function of (run seed, phase name) only, so a phase's numbers are
    the same whether or not other phases (e.g. stage-0 teacher fine-tuning) ran before it in this process."""
    return (seed * 1_000_003 + zlib.crc32(tag.encode())) % 2**31


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process (numpy's key array as a tensor, for weights_only loading)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng() -> list[dict[str, Any]]:
    """rng_state() of every process, in rank order (a collective: every rank calls it)."""
    if not DIST.enabled:
        return [rng_state()]
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)  # as bytes: all_gather_object mishandles tensors' storages
    states: list[Any] = [None] * DIST.world_size
    torch.distributed.all_gather_object(states, buffer.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in states]


def rank_rng(states: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """This process's RNG states from a checkpoint (rank 0's when the number of processes changed)."""
    if isinstance(states, dict):
        return states
    return states[DIST.rank] if len(states) == DIST.world_size else states[0]
