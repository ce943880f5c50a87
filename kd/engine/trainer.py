"""The state of one training phase: what it trains, how it steps its optimiser, and the fit in progress, as one
object whose state_dict() is a whole resumable checkpoint (the Checkpointer calls it only when it writes).
The training loop itself (fit and the step) is train.py's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..methods.base import Method, StepInputs
from ..models import KDModel, check_meta
from .checkpoint import load_loader_state, loader_state
from .distributed import say
from .rng import rank_rng, set_rng_state
from .tracker import LossTracker


@dataclass
class StepClock:
    """The run-wide count of optimisation steps, shared by every phase's trainer (checkpoints are named by it),
    and the application's progress report (train.py: kd_cli.progress.RunProgress; steps planned, ETA, how often
    to print), which kd/ never reads."""
    steps: int = 0
    progress: Any = None


@dataclass
class Trainer:
    """What one fit() trains: a model (the one selected and tested) plus a method (loss terms and auxiliary
    modules), with frozen teachers whose outputs are computed once per batch; and the fit in progress (epochs
    done, the running epoch's tracker, the best model so far), so state_dict() is a whole checkpoint."""

    model: KDModel
    method: Method
    teachers: list[KDModel]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    mixer: Any
    grad_clip_norm: float
    channels_last: bool
    clock: StepClock
    steps_per_epoch: int
    step_module: nn.Module  # model + method as one module; DDP-wrapped with several processes
    freeze_policy: str = "none"  # the model's partial-freeze policy: frozen norm layers stay in eval
    seed: int = 0  # --run.seed: each phase reseeds from it
    teacher_dtype: torch.dtype | None = None  # autocast dtype of the teachers' frozen forward (None = float32)
    extra: Any = None  # more state its checkpoints carry (state_dict/load_state_dict): ASMB's whole run
    # the fit in progress (set by train.py's fit)
    tag: str = ""
    loader: Any = None
    epoch_offset: int = 0
    epochs_done: int = 0
    tracker: LossTracker | None = None
    best: dict[str, Any] = field(default_factory=lambda: {"acc": -1.0, "epoch": 0, "state": None})

    def optim_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_optim_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint of the fit in progress: weights, method, optimiser/schedule/scaler, data position,
        best so far. A diverged state is never checkpointed (raises TrainingDiverged)."""
        if self.tracker is not None:
            self.tracker.check(f"epoch {self.epoch_offset + self.epochs_done + 1} ({self.tag})")
        position = self.steps_per_epoch if self.tracker is None else self.tracker.n
        return {"meta": self.model.meta(), "model": self.model.state_dict(), "method": self.method.state_dict(),
                **self.optim_state(), **({"extra": self.extra.state_dict()} if self.extra is not None else {}),
                "epoch": self.epoch_offset + self.epochs_done,
                "loader": loader_state(self.loader, len(self.loader) if self.tracker is None else position),
                "best": self.best["state"],
                "progress": {"epoch": self.epochs_done, "position": position,
                             "tracker": None if self.tracker is None else self.tracker.state(),
                             "best_acc": self.best["acc"], "best_epoch": self.best["epoch"]}}

    def load_state_dict(self, ck: dict[str, Any]) -> dict[str, Any] | None:
        """Restore a fit() checkpoint (model, method, optimiser, extra, data position, progress). Returns the
        RNG states to set once the epoch's iterator exists when it stopped mid-epoch; at an epoch boundary
        they are set here."""
        check_meta(self.model.meta(), ck["meta"], "resume checkpoint")
        self.model.load_state_dict(ck["model"])
        self.method.load_state_dict(ck["method"])
        self.load_optim_state(ck)
        if self.extra is not None:
            self.extra.load_state_dict(ck["extra"])
        load_loader_state(self.loader, ck["loader"])
        p = ck["progress"]
        self.epochs_done, self.best = int(p["epoch"]), {"acc": p["best_acc"], "epoch": p["best_epoch"], "state": ck["best"]}
        self.tracker = None if p["tracker"] is None else LossTracker.from_state(p["tracker"], self.device)
        say(f"resumed {ck['phase']} at step {p['step']} (epoch {p['epoch']} done"
            + (f", {p['position']} steps into the next)" if self.tracker else ")"))
        rng = rank_rng(ck["rng"])
        if self.tracker is None:
            set_rng_state(rng)
            return None
        return rng


class StudentStep(nn.Module):
    """The trained part of a step as one module (the student's forward and the method's loss terms), so
    DistributedDataParallel can wrap it; teachers stay outside (frozen, no gradient to reduce)."""

    def __init__(self, model: KDModel, method: Method):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: Tensor, y: Tensor, index: Tensor, epoch: int, t_outs: list) -> dict[str, Tensor]:
        s_out = self.model(x, with_maps=self.method.needs_maps)
        return self.method(StepInputs(x=x, target=y, index=index, epoch=epoch, student=s_out, teachers=t_outs))
