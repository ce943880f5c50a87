"""Checkpoints and resume, as one component the training loop calls on every step.

`Checkpointer.save(step, ...)` is called after every optimisation step and at every epoch end; it decides
whether to write (epoch ends, every `every_steps` steps) and builds the payload only then, by calling the
state function it is given. A disabled checkpointer (no run directory) returns at once. Files (rank 0 only):

- checkpoints/step-<run-wide step>.pt: everything a resume needs (phase, epoch, position in the epoch,
  model(s), method, optimiser(s), schedule(s), scaler, loader, RNG states of every process, best so far,
  the logged rows, the wandb run id, the config); the newest `keep_last` are kept;
- checkpoints/last.pt: the newest of them (a hard link, replaced by a rename), read by resume;
- checkpoints/best.pt: the model selected on validation.
Every file is written to a temp file, fsynced and renamed: a kill at any moment leaves the previous complete
checkpoint or the new one; each ends with a sha256 of its bytes, verified on load (kd.io: weights_only,
a changed file is refused and resume falls back to an older one). No file is written holding a non-finite
tensor (weights, buffers such as BatchNorm statistics, optimiser state): such a state stops the run as
diverged (TrainingDiverged, exit 3) even when its loss still looked finite."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError, Preempted
from ..export import save_safetensors, timm_state_dict
from ..io import atomic_link, atomic_torch_save, safe_torch_load
from .distributed import DIST, say
from ..configs import flatten_config
from .rng import gather_rng
from .tracker import TrainingDiverged

CKPT_FORMAT = 2  # 1: the foundation's last.pt without data position; 2: resumable at any step
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # a scheduler's stop and pre-emption notice (SLURM --signal)
STOP_POLL_STEPS = 20  # under DDP: how often the ranks agree on a stop (a scalar all-reduce and a host sync)
_stop = {"signal": 0}  # the stop signal received, 0 = none (set by the handler, read by Checkpointer.save)


def checkpoint_on_stop_signals() -> None:
    """Make SIGTERM and SIGUSR1 end a run at the next step boundary with a checkpoint there (Checkpointer.save
    writes it and raises Preempted) instead of losing everything since the last one; a second signal ends the
    process at once. Call from the main thread of the training script."""

    def request_stop(signum, frame):
        if _stop["signal"]:  # asked twice: do not wait for the step to end
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        _stop["signal"] = signum

    for s in STOP_SIGNALS:
        signal.signal(s, request_stop)


def stop_requested() -> int:
    """The stop signal to act on now, 0 for none; under DDP the ranks agree (one scalar all-reduce per call,
    so Checkpointer.save asks every STOP_POLL_STEPS steps), since a rank that saves and stops alone would leave
    the others waiting in a collective."""
    if not DIST.enabled:
        return _stop["signal"]
    nccl = torch.distributed.get_backend() == "nccl"
    flag = torch.tensor([float(_stop["signal"])], device=torch.cuda.current_device() if nccl else "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


class Checkpointer:
    def __init__(
        self,
        run_dir: Path | None,
        config: dict[str, Any],
        *,
        every_steps: int = 0,
        keep_last: int = 2,
        resume: dict[str, Any] | None = None,
        logger: Any = None,
    ):
        """`config`: the run's resolved config (stored in every file, compared on resume). `resume`: a loaded
        checkpoint, handed to the phase it belongs to by take(). `logger`: its `rows` and `wandb_id` are
        stored so a resumed run continues its metrics and wandb run."""
        self.dir = None if run_dir is None else Path(run_dir) / "checkpoints"
        self.config, self.logger = config, logger
        self.every, self.keep_last = every_steps, keep_last
        self.pending = resume
        self.resume_step = int(resume["progress"]["step"]) if resume else 0  # where the run-wide step count resumes
        if DIST.main and self.dir is not None and self.dir.is_dir():
            for stale in self.dir.glob(".*.tmp"):  # a kill mid-write leaves its temp file behind
                stale.unlink(missing_ok=True)
            if resume is not None:  # resumed from an older checkpoint: the newer ones are an abandoned branch
                for later in self.dir.glob("step-*.pt"):
                    number = later.stem.removeprefix("step-")
                    if number.isdigit() and int(number) > self.resume_step:
                        later.unlink()
                source = Path(resume.get("path", ""))
                if source.name.startswith("step-") and source.parent == self.dir and source.is_file():
                    atomic_link(source, self.dir / "last.pt")  # a kill before the next checkpoint resumes here too

    @classmethod
    def disabled(cls) -> "Checkpointer":
        return cls(None, {})

    def pending_phase(self) -> str | None:
        return None if self.pending is None else self.pending.get("phase")

    def take(self, phase: str) -> dict[str, Any] | None:
        """The resume checkpoint if it belongs to `phase` (handed out once), else None."""
        if self.pending is not None and self.pending.get("phase") == phase:
            ck, self.pending = self.pending, None
            return ck
        return None

    def save(self, step: int, phase: str, state: Callable[[], dict[str, Any]], *, epoch_end: bool = False) -> None:
        """Called by every process after every step (epoch_end False) and at every epoch end: writes a step
        checkpoint of `phase` holding state() (which must contain "progress") at epoch ends and every
        `every_steps` steps, points last.pt at it, and deletes step checkpoints beyond `keep_last`. After a stop
        signal (checkpoint_on_stop_signals) it writes one whatever the step and raises Preempted."""
        # under DDP the ranks agree on a stop by a collective: every STOP_POLL_STEPS steps, not in every step
        polled = not DIST.enabled or epoch_end or step % STOP_POLL_STEPS == 0
        stop = stop_requested() if self.dir is not None and polled else 0
        if self.dir is None or not (stop or epoch_end or (self.every and step % self.every == 0)):
            return
        payload = state()  # before the collective: it may raise (a diverged run is never checkpointed)
        check_finite(payload, f"at step {step} ({phase})")
        rng = gather_rng()
        if DIST.main:
            payload = {
                **payload,
                "format": CKPT_FORMAT,
                "phase": phase,
                "progress": {**payload["progress"], "step": step},
                "rng": rng,
                "rows": list(self.logger.rows) if self.logger else [],
                "wandb_id": self.logger.wandb_id if self.logger else None,
                "world_size": DIST.world_size,
                "config": self.config,
            }
            path = self.dir / f"step-{step:09d}.pt"
            atomic_torch_save(payload, path)
            atomic_link(path, self.dir / "last.pt")
            for old in sorted(self.dir.glob("step-*.pt"))[: -self.keep_last]:
                old.unlink(missing_ok=True)
        if stop:
            raise Preempted(stop, step, phase, self.dir / "last.pt")

    def save_best(self, meta: dict[str, Any], model_state: dict[str, Tensor], val_acc: float, epoch: int) -> None:
        if self.dir is not None:
            check_finite(model_state, f"at epoch {epoch} (best model)")
        if self.dir is not None and DIST.main:
            atomic_torch_save(
                {"meta": meta, "model": model_state, "val_acc": val_acc, "epoch": epoch, "config": self.config},
                self.dir / "best.pt",
            )
            weights = timm_state_dict(model_state, meta)  # the same weights, loadable into timm.create_model
            if weights is not None:
                save_safetensors(
                    weights,
                    self.dir / "best.safetensors",
                    {
                        "arch": meta["arch"],
                        "num_classes": meta["num_classes"],
                        "small_input": meta["small_input"],
                        "val_acc": f"{val_acc:.4f}",
                    },
                )


def check_finite(state: Any, where: str) -> None:
    """Raise TrainingDiverged naming the first floating tensor of the nested `state` that holds NaN or inf
    (one host sync per device; every process agrees under DDP, so all stop together)."""
    named = list(_float_tensors(state, ""))
    flags: dict[torch.device, list[Tensor]] = {}
    for _, t in named:
        flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    finite = {device: torch.stack(fs).tolist() for device, fs in flags.items()}
    position = {device: 0 for device in flags}
    bad = None
    for name, t in named:
        ok, position[t.device] = finite[t.device][position[t.device]], position[t.device] + 1
        if not ok and bad is None:
            bad = name
    if DIST.enabled:  # one rank's BatchNorm statistics may break alone
        nccl = torch.distributed.get_backend() == "nccl"
        flag = torch.tensor([float(bad is not None)], device=torch.cuda.current_device() if nccl else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and bad is None:
            bad = "a tensor of another process"
    if bad is not None:
        raise TrainingDiverged(
            f"training diverged {where}: {bad} is not finite (NaN/inf in the state, not only "
            "the loss); stopped, the last good checkpoint is kept"
        )


def _float_tensors(obj: Any, name: str):
    if isinstance(obj, Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield name or "tensor", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _float_tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _float_tensors(v, f"{name}[{i}]")


# ----------------------------------------------------------------------------------------------
# Resume: which checkpoint, and whether the command line may continue it
# ----------------------------------------------------------------------------------------------
def find_resume(spec: str, named_dir: Path | None) -> tuple[Path | None, dict[str, Any] | None]:
    """(run directory, loaded checkpoint) for a resume `spec`, before any work.

    auto: `named_dir` (the --run.name directory), resumed when it holds a checkpoint, else started fresh in
    it. A run directory: its newest readable checkpoint (last.pt, then older step files). A file: that
    checkpoint; the run continues in its run directory, or in `named_dir` when given."""
    if not spec:
        return None, None
    if spec == "auto":
        candidates, explicit = checkpoint_files(named_dir), False
        if not candidates:
            return named_dir, None
    else:
        path = Path(spec)
        if path.is_dir():
            run_dir = path.parent if path.name == "checkpoints" else path
            candidates, explicit = checkpoint_files(run_dir), False
            if not candidates:
                raise CheckpointError(f"--run.resume {spec}: no checkpoint in {run_dir / 'checkpoints'}")
        elif path.is_file():
            candidates, explicit = [path], True
        else:
            raise CheckpointError(f"--run.resume {spec}: no such checkpoint file or run directory")
    ck, path = load_resume_checkpoint(candidates, explicit)
    own = path.parent.parent if path.parent.name == "checkpoints" else None
    run_dir = named_dir or own
    if run_dir is None:
        raise ConfigError(f"--run.resume {spec} is not inside a run directory; give --run.name for the run to write")
    if own is not None and run_dir.resolve() != own.resolve() and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} exists and is not the run of {path}; choose another --run.name")
    ck["path"] = str(path)
    return run_dir, ck


def checkpoint_files(run_dir: Path) -> list[Path]:
    """A run directory's resumable checkpoints, newest first: last.pt, then the step files."""
    ck_dir = run_dir / "checkpoints"
    steps = sorted(ck_dir.glob("step-*.pt"), reverse=True) if ck_dir.is_dir() else []
    return [p for p in [ck_dir / "last.pt", *steps] if p.is_file()]


def load_resume_checkpoint(candidates: list[Path], explicit: bool) -> tuple[dict[str, Any], Path]:
    """The first readable resumable checkpoint of `candidates` (only the given one when `explicit`);
    corrupt or foreign files raise CheckpointError (one line), or are skipped with a note."""
    problems = []
    for path in candidates:
        try:
            ck = safe_torch_load(path)
            if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT or "progress" not in ck:
                raise CheckpointError(
                    f"{path} is not a resumable kd checkpoint (written by another version "
                    "or a model-only file such as best.pt)"
                )
            if problems:
                say(f"note: skipped {len(problems)} unreadable checkpoint(s): {problems[0]}")
            return ck, path
        except CheckpointError as e:
            if explicit:
                raise
            problems.append(str(e))
    raise CheckpointError(problems[0])


def check_resume_config(
    now: dict[str, Any], saved: dict[str, Any], groups: Iterable[str], may_change: Iterable[str], path: Path | str
) -> None:
    """Refuse (one line naming the flag) a resume whose config differs from the checkpoint's. Compared: the
    top level and `groups`; `may_change` lists keys (or prefixes ending in ".") that may differ."""
    groups, may_change = tuple(groups), tuple(may_change)

    def flat(c: dict[str, Any]) -> dict[str, Any]:
        return flatten_config({k: v for k, v in c.items() if not isinstance(v, dict) or k in groups})

    now_flat, then_flat = flat(now), flat(saved)
    for key, a in now_flat.items():
        if key not in then_flat or any(key == m or (m.endswith(".") and key.startswith(m)) for m in may_change):
            continue
        b = then_flat[key]
        if a != b:
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(
                f"cannot resume from {path}: {flag} is {_show(a)} here but {_show(b)} in the "
                "checkpoint's run (only paths, devices, workers, checkpointing and wandb may "
                "change)"
            )


def _show(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


# ----------------------------------------------------------------------------------------------
# The data position: a DeviceLoader or a DataLoader's EpochBatchSampler (both state_dict-able)
# ----------------------------------------------------------------------------------------------
def loader_state(loader, position: int) -> dict[str, Any]:
    """The training loader's state with `position` = the batches consumed in this epoch (len(loader): done)."""
    return {**_stateful(loader).state_dict(), "position": position}


def load_loader_state(loader, state: dict[str, Any]) -> None:
    _stateful(loader).load_state_dict(state)


def reseed_loader(loader, seed: int) -> None:
    _stateful(loader).reseed(seed)


def _stateful(loader):
    return loader.batch_sampler if isinstance(loader, torch.utils.data.DataLoader) else loader
