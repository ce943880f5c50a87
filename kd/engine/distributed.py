"""Several processes: `torchrun --nproc_per_node N train.py ...` runs DistributedDataParallel (NCCL on CUDA,
gloo on CPU). Every rank trains on its slice of each global batch; rank 0 alone prints, logs, checkpoints
and talks to wandb. `DIST` describes this process; with one process every helper here is a no-op."""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn

from ..errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_min: float = 30.0  # how long a collective waits for the other ranks (--run.dist-timeout-min)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


DIST = DistInfo()


def init_distributed(global_batch_size: int, use_cuda: bool, sync_bn: bool, timeout_min: float = 30.0) -> None:
    """Join the process group when torchrun started several processes (WORLD_SIZE > 1); bad settings are a
    ConfigError before joining. A collective that waits more than `timeout_min` minutes for the other ranks
    fails (gloo: a RuntimeError, told in one line by collective_timeout; NCCL: its watchdog ends the process
    and names the operation) instead of waiting forever."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and sync_bn:
        raise ConfigError(
            "--run.sync-bn True synchronises BatchNorm across torchrun processes; this run has one "
            "(start it with torchrun --nproc_per_node N, or drop the flag)"
        )
    if world <= 1 or torch.distributed.is_initialized():
        return
    DIST.rank, DIST.local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = use_cuda and torch.cuda.is_available()
    if global_batch_size % world:
        raise ConfigError(f"--data.batch-size {global_batch_size} (global) is not divisible by the {world} processes")
    if sync_bn and not cuda:
        raise ConfigError("--run.sync-bn True needs CUDA (SyncBatchNorm has no CPU implementation)")
    if cuda:
        torch.cuda.set_device(DIST.local_rank)
    if not timeout_min > 0:
        raise ConfigError(f"--run.dist-timeout-min must be > 0, got {timeout_min}")
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_min))
    DIST.world_size, DIST.timeout_min = world, timeout_min


def close_distributed() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    DIST.rank, DIST.world_size, DIST.local_rank, DIST.timeout_min = 0, 1, 0, 30.0


def barrier() -> None:
    if DIST.enabled:
        torch.distributed.barrier()


def distribute(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around a phase's trained modules (the module itself with one process).
    Unused parameters are allowed (any method, any freeze policy). Buffers are not broadcast (broadcasting
    them at every forward would also send the method's buffers, e.g. CRD's memory banks, tens of MB a step),
    so BatchNorm running statistics stay per rank (synchronised with --run.sync-bn): rank 0's are saved, and
    every decision taken on validation numbers is rank 0's (rank0_values), so the ranks never disagree."""
    if not DIST.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
        broadcast_buffers=False,
    )


def rank0_values(*values: float) -> tuple[float, ...]:
    """Rank 0's `values` on every rank (the values themselves with one process). Every rank evaluates the
    whole validation split with its own replica, whose BatchNorm statistics may differ from rank 0's; a
    decision taken on such numbers (a new best epoch, ASMB's residual guard) must be the same on every rank,
    or the ranks wait in different collectives forever."""
    if not DIST.enabled:
        return values
    on = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=on)
    torch.distributed.broadcast(t, src=0)
    return tuple(t.tolist())


def collective_timeout(e: BaseException) -> str | None:
    """The one-line report of a collective that timed out under DDP, naming this rank, the collective
    (torch.distributed's function, or DDP's gradient all-reduce) and the kd function that called it; None
    for any other error. A rank waits there when another rank stopped, hangs or took another branch."""
    text = str(e)
    if (
        not DIST.enabled
        or not isinstance(e, RuntimeError)
        or not ("timed out" in text.lower() or "timeout" in text.lower())
    ):
        return None
    frames = traceback.extract_tb(e.__traceback__)
    ops = [
        f.name
        for f in frames
        if f.filename.endswith("distributed_c10d.py") and not f.name.startswith("_") and f.name != "wrapper"
    ]
    caller = next((f for f in reversed(frames) if f"{os.sep}torch{os.sep}" not in f.filename), None)
    op = (
        ops[-1]
        if ops
        else "DDP's gradient all-reduce"
        if caller and caller.name in ("backward", "step") or any("autograd" in f.filename for f in frames)
        else "a collective"
    )
    where = f" (called from {caller.name}, {os.path.basename(caller.filename)}:{caller.lineno})" if caller else ""
    return (
        f"rank {DIST.rank}: {op}{where} timed out after {DIST.timeout_min:g} min (--run.dist-timeout-min) "
        "waiting for the other ranks; one of them stopped, hangs or took another path"
    )


def say(msg: str) -> None:
    """Print on rank 0 only (every rank runs the same code)."""
    if DIST.main:
        print(msg, flush=True)
