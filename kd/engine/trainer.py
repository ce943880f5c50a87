"""The state of a training phase as three objects: the Runtime every phase shares (device, precisions, clock),
the Trainer (what one phase trains and how it steps its optimiser) and the FitState (a fit in progress: epochs
done, the running epoch's tracker, the best model so far), whose state_dict() is a whole resumable checkpoint
(the Checkpointer calls it only when it writes). The training loop itself (fit and the step) is train.py's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..methods.base import Method, StepInputs
from ..models import KDModel, check_meta
from .checkpoint import load_loader_state, loader_state
from .distributed import distribute, say
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
class Runtime:
    """What every phase of a run steps with: the device, the autocast dtype of the trained model's forward (None
    = float32) and of the frozen teachers' (None = float32), the memory format, the gradient-norm clip (0 = off),
    the run-wide step clock and the run's seed."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    teacher_dtype: torch.dtype | None = None
    channels_last: bool = False
    grad_clip_norm: float = 0.0
    clock: StepClock = field(default_factory=StepClock)
    seed: int = 0  # --run.seed: each phase reseeds from it (stage 0's teachers from their own)


@dataclass
class Trainer:
    """What one phase trains: a model (the one selected and tested) plus a method (loss terms and auxiliary
    modules), with frozen teachers whose outputs are computed once per batch, its optimiser and per-step schedule
    over `steps_per_epoch`-step epochs, MixUp/CutMix (`mixer`, None = off), the seed its phase is seeded from
    (default: the runtime's), and how its fit validates: `val_key` names the rows' validation accuracy
    (val/<key>), `save_best` writes the best model to checkpoints/best.pt (the run's selected model). The step
    module (default: the model's forward and the method's terms) is DDP-wrapped with several processes; the
    GradScaler follows the runtime's autocast dtype (enabled for float16 only)."""

    model: KDModel
    method: Method
    teachers: list[KDModel]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    runtime: Runtime
    steps_per_epoch: int
    mixer: Any = None
    freeze_policy: str = "none"  # the model's partial-freeze policy: frozen norm layers stay in eval
    seed: int | None = None  # fit() reseeds the phase from it: the runtime's, or a teacher's own in stage 0
    save_best: bool = True
    val_key: str = "acc"
    step_module: nn.Module | None = None  # the trained part of a step as one module (StudentStep by default)
    extra: Any = None  # more state its checkpoints carry (state_dict/load_state_dict): ASMB's whole run
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self):
        device = self.runtime.device
        self.seed = self.runtime.seed if self.seed is None else self.seed
        self.step_module = distribute(self.step_module or StudentStep(self.model, self.method), device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.runtime.amp_dtype == torch.float16)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def optim_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_optim_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def no_best() -> dict[str, Any]:
    return {"acc": -1.0, "epoch": 0, "state": None}


@dataclass
class FitState:
    """A fit of `trainer` in progress, as train.py's fit() runs and returns it: the phase `tag`, its training
    `loader`, the global epoch before it (`epoch_offset`), the epochs done, the running epoch's tracker (None
    between epochs) and the best model so far by validation accuracy ({"acc", "epoch" counted from the
    offset, "state": a CPU copy of the weights}). state_dict() is a whole checkpoint of the phase."""

    trainer: Trainer
    tag: str
    loader: Any
    epoch_offset: int = 0
    epochs_done: int = 0
    tracker: LossTracker | None = None
    best: dict[str, Any] = field(default_factory=no_best)

    def keep_best(self, acc: float, epoch: int) -> None:
        """The trainer's model is the best so far: keep a copy of its weights (never an alias of the live ones)."""
        weights = {k: v.detach().to("cpu", copy=True) for k, v in self.trainer.model.state_dict().items()}
        self.best = {"acc": acc, "epoch": epoch, "state": weights}

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint of the fit in progress: weights, method, optimiser/schedule/scaler, data position,
        best so far. A diverged state is never checkpointed (raises TrainingDiverged)."""
        tr = self.trainer
        if self.tracker is not None:
            self.tracker.check(f"epoch {self.epoch_offset + self.epochs_done + 1} ({self.tag})")
        position = tr.steps_per_epoch if self.tracker is None else self.tracker.n
        return {
            "meta": tr.model.meta(),
            "model": tr.model.state_dict(),
            "method": tr.method.state_dict(),
            **tr.optim_state(),
            **({"extra": tr.extra.state_dict()} if tr.extra is not None else {}),
            "epoch": self.epoch_offset + self.epochs_done,
            "loader": loader_state(self.loader, len(self.loader) if self.tracker is None else position),
            "best": self.best["state"],
            "progress": {
                "epoch": self.epochs_done,
                "position": position,
                "tracker": None if self.tracker is None else self.tracker.state(),
                "best_acc": self.best["acc"],
                "best_epoch": self.best["epoch"],
            },
        }

    def load_state_dict(self, ck: dict[str, Any]) -> dict[str, Any] | None:
        """Restore a fit() checkpoint (model, method, optimiser, extra, data position, progress). Returns the
        RNG states to set once the epoch's iterator exists when it stopped mid-epoch; at an epoch boundary
        they are set here."""
        tr = self.trainer
        check_meta(tr.model.meta(), ck["meta"], "resume checkpoint")
        tr.model.load_state_dict(ck["model"])
        tr.method.load_state_dict(ck["method"])
        tr.load_optim_state(ck)
        if tr.extra is not None:
            tr.extra.load_state_dict(ck["extra"])
        load_loader_state(self.loader, ck["loader"])
        p = ck["progress"]
        self.epochs_done, self.best = (
            int(p["epoch"]),
            {"acc": p["best_acc"], "epoch": p["best_epoch"], "state": ck["best"]},
        )
        self.tracker = None if p["tracker"] is None else LossTracker.from_state(p["tracker"], tr.device)
        say(
            f"resumed {ck['phase']} at step {p['step']} (epoch {p['epoch']} done"
            + (f", {p['position']} steps into the next)" if self.tracker else ")")
        )
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
