"""A run's start and end around train.py's training: the checks before anything is written (model names, weight
files, hub weights, given teacher checkpoints), the run directory (new, or the one a resumed run continues), its
records (config.json, train.log, metrics.jsonl through RunLogger, checkpoints through kd's Checkpointer, wandb)
and the summary at the end. train.py calls these in order; the training itself is train.py's.

wandb is only imported here (when a run logs to it): rows as they are, stage-0 teacher rows under
teacher/<arch>/, the summary and the selected model at the end. `auto` = online with credentials, else
disabled; no network never hangs a run."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.engine.checkpoint import Checkpointer, check_resume_config, find_resume
from kd.engine.distributed import DIST, barrier, collective_timeout, say
from kd.errors import ConfigError, KDError, Preempted, WriteError
from kd.io import atomic_write_json
from kd.models import check_model_name, create_model
from kd.teachers import (
    check_resume_teachers,
    check_teacher_checkpoints,
    teacher_cache_path,
    teacher_identities,
    teacher_small_input,
    teacher_test_summary,
)
from kd.weights import hub_weights_status
from kd_cli.cli import run_name
from kd_cli.config import METHOD_GROUPS, RESUME_MAY_CHANGE, Config
from kd_cli.progress import mean_img_per_s
from kd_cli.records import rounded_numbers
from kd_cli.rundir import check_run_dir, new_run_dir, prepare_run_dir
from kd_cli.runlog import RunLogger, copy_console_to, format_summary, stop_console_copy
from kd_cli.wandb_env import WANDB_AXES, resolve_wandb_mode, wandb_config, wandb_keys, wandb_server_reachable


# ---- Before anything is written ------------------------------------------------------------------
def check_before_data(cfg: Config) -> None:
    """Model names, then weight files and hub weights (check_start_weights): before any data is downloaded,
    extracted or decoded."""
    students = [cfg.student.model] if cfg.spec.family != "teacher" else []
    for name in students + (list(cfg.teachers.models) if cfg.spec.uses_teachers else []):
        check_model_name(name)
    check_start_weights(cfg)


def check_start_weights(cfg: Config) -> None:
    """Before any data is decoded or anything written (one line, exit 2): every --student.weights /
    --teachers.weights file is read and fitted to its model (as the run will build it, where the data's size and
    class count are known from the config; otherwise the file must fit the ImageNet-stem model, which covers the
    small-input one), and the student's hub weights (--student.pretrained) must be cached or reachable. The
    teachers' hub weights are checked once their cache is known (a cached teacher needs none)."""
    d = cfg.data
    size = d.image_size or {"synthetic": d.synthetic_image_size, "cifar100": 32, "tiny-imagenet": 64}.get(d.dataset)
    classes = {"synthetic": d.synthetic_classes, "cifar100": 100}.get(d.dataset, 1000) if not d.classes else 1000
    small = cfg.student.small_stem(size or 0)
    fits = []
    if cfg.spec.family != "teacher":
        if cfg.student.weights:
            fits.append((cfg.student.model, cfg.student.weights, small, None, "--student.weights"))
        if cfg.student.pretrained:
            check_hub_weights(cfg.student.model, "--student")
    if cfg.spec.uses_teachers:
        fits += [
            (
                arch,
                path,
                teacher_small_input(small, cfg.teachers.image_size),
                cfg.teachers.image_size or None,
                "--teachers.weights",
            )
            for arch, path in zip(cfg.teachers.models, cfg.teachers.weights)
        ]
    for arch, path, small_input, img_size, flag in fits:
        try:
            create_model(arch, classes, small_input=small_input, img_size=img_size, weights=path)
        except KDError as e:
            raise type(e)(f"{flag}: {e}") from None


def check_hub_weights(arch: str, group: str) -> None:
    """`{group}.pretrained True` can get timm's weights of `arch`: cached locally, or the hub answers (a probe of
    at most a few seconds); else one line naming `{group}.weights` as the way out."""
    status, detail = hub_weights_status(arch)
    if status == "none":
        raise ConfigError(
            f"{group}.pretrained True, but timm has no pretrained weights for {arch}: pass "
            f"{group}.pretrained False (train from scratch) or {group}.weights FILE"
        )
    if status == "offline":
        raise ConfigError(
            f"{group}.pretrained True needs timm's pretrained weights of {arch}, which are not in the "
            f"local cache, and the hub cannot be reached ({detail}): pass a downloaded weight file "
            f"with {group}.weights FILE and {group}.pretrained False (README: pretrained teachers "
            "from local files)"
        )


def teacher_sources(
    cfg: Config, data, teacher_small: bool, device, resume: dict[str, Any] | None, bridge: bool = False
) -> list[dict[str, Any]]:
    """The identities of the run's teachers (none for a method without), then the checks of where they come from:
    given --teachers.checkpoints fit their models and identities; teachers to fine-tune from timm's hub have its
    weights (cached teachers need none); a resumed run's teachers are still the ones it started with (the data
    may have moved: --data.root). `bridge`: the teachers fit --asmb.bridge-split's teacher-fit part."""
    t, split, ids = cfg.teachers, cfg.asmb.bridge_split if bridge else 0.0, []
    if cfg.spec.uses_teachers:
        ids = teacher_identities(t, cfg.optim, cfg.data, cfg.run, data, teacher_small, device, bridge_split=split)
    check_teacher_checkpoints(t.checkpoints, t.models, data.num_classes, teacher_small, t.image_size or None, ids)
    if t.pretrained and not t.checkpoints:  # hub weights for the teachers to fine-tune
        for arch, identity in zip(t.models, ids):
            if not teacher_cache_path(t.cache_dir, identity).exists():
                check_hub_weights(arch, "--teachers")
    if resume is not None:
        check_resume_teachers(ids, resume["config"].get("teacher_identities"), resume["path"])
    return ids


def run_dir_and_resume(cfg: Config) -> tuple[Path, dict[str, Any] | None]:
    """The run directory: the one --run.resume continues (its checkpoint's config checked against this one:
    only RESUME_MAY_CHANGE may differ), else a new one named by --run.name or after what runs; checked (held by
    another run? overwritable?) but not yet created."""
    named_dir = Path(cfg.run.out_dir) / cfg.run.name if cfg.run.name else None
    resume_dir, resume = find_resume(cfg.run.resume, named_dir)
    if resume is not None:
        check_resume_config(
            dataclasses.asdict(cfg),
            resume["config"],
            ("data", "student", "teachers", "optim", "run", cfg.method),
            RESUME_MAY_CHANGE,
            resume["path"],
        )
        say(f"resuming from {resume['path']} ({resume['phase']}, step {resume['progress']['step']})")
    teachers = cfg.teachers.models if cfg.spec.uses_teachers else ()
    run_dir = resume_dir or new_run_dir(
        cfg.run.out_dir,
        cfg.run.name or run_name(cfg.method, cfg.student.model, teachers, cfg.data.dataset, seed=cfg.run.seed),
        overwrite=cfg.run.overwrite,
    )
    if DIST.main:
        check_run_dir(run_dir, overwrite=cfg.run.overwrite)
    return run_dir, resume


def announce(cfg: Config, run_dir: Path, device, data) -> None:
    """The lines a run starts with: its directory, device and data, then student_notes."""
    say(
        f"run directory: {run_dir}  (device {device}, {data.num_classes} classes, "
        f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test)"
    )
    for note in student_notes(cfg):
        say(note)


def student_notes(cfg: Config) -> list[str]:
    """One line each, said at the start of a run: no best.safetensors with --student.adapter-dim (timm's model
    has no adapter), and a warning when --student.freeze freezes a randomly initialised student."""
    if cfg.spec.family == "teacher":
        return []
    s, notes = cfg.student, []
    if s.adapter_dim > 0:
        notes.append(
            f"note: --student.adapter-dim {s.adapter_dim}: the student has a part timm's {s.model} lacks, "
            "so no checkpoints/best.safetensors is written (the weights are in checkpoints/best.pt)"
        )
    if s.freeze != "none" and not (s.pretrained or s.checkpoint or s.weights):
        starts = "--student.pretrained, --student.checkpoint or --student.weights"
        notes.append(
            f"warning: --student.freeze {s.freeze} freezes a randomly initialised student (no {starts}): "
            "its frozen layers stay random"
        )
    return notes


def start_summary(cfg: Config, data, run_dir: Path, parts=None) -> dict[str, Any]:
    """The summary's first entries: what ran on what (and the sizes of --asmb.bridge-split's `parts`)."""
    summary = {
        "method": cfg.method,
        "dataset": cfg.data.dataset,
        "num_classes": data.num_classes,
        "run_dir": str(run_dir),
    }
    if parts:
        summary.update({"data/teacher_fit_images": len(parts[0].train), "data/bridge_images": len(parts[1].train)})
    return summary


def teacher_summary(records: "Records", archs, teachers: list, test_loader, device, waited: float) -> dict[str, Any]:
    """Stage 0's entries: each teacher's validation and test accuracy, their ensemble's, and this run's teacher
    time (fine-tuning, or loading from the cache, and testing) apart from the `waited` seconds it waited for
    another run fine-tuning the same teacher, so a teacher loaded from the cache costs its load time."""
    out = {f"teacher/{arch}/val_acc": acc for arch, (_, acc) in zip(archs, teachers)}
    out.update(teacher_test_summary(archs, [t for t, _ in teachers], test_loader, device))
    return {**out, "teacher_wait_s": waited, "teacher_time_s": time.time() - records.started - waited}


def exit_code(e: BaseException) -> int:
    """How train.py's main() ends on `e`, after one line on stderr: Preempted 128 + its signal (with the command
    that continues the run), bad input 2 (under torchrun rank 0 alone says a ConfigError: every rank fails alike),
    TrainingDiverged 3, an unwritable folder 1, a collective past --run.dist-timeout-min 1, Ctrl-C 130. Any other
    RuntimeError is re-raised."""
    rank = int(os.environ.get("RANK", "0"))
    if isinstance(e, Preempted):
        if rank == 0:
            print(
                f"{e}: checkpoint {e.path} written; continue with the same command and --run.resume "
                f"{e.path.parent.parent}",
                file=sys.stderr,
                flush=True,
            )
        return 128 + e.signum
    if isinstance(e, KDError):
        if rank == 0 or not isinstance(e, ConfigError):
            print(f"{f'[rank {rank}] ' if rank else ''}error: {e}", file=sys.stderr, flush=True)
        return 3 if type(e).__name__ == "TrainingDiverged" else 1 if isinstance(e, WriteError) else 2
    if isinstance(e, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    line = collective_timeout(e) if isinstance(e, RuntimeError) else None
    if line is None:
        raise e
    print(f"error: {line}", file=sys.stderr, flush=True)
    return 1


# ---- The records ---------------------------------------------------------------------------------
@dataclass
class Records:
    """A run's records: its directory, the row logger (metrics.jsonl, and wandb when on), the checkpointer and
    the wandb run (None when off); `started` the time training began (after the checks and records)."""

    run_dir: Path
    logger: RunLogger
    ckpt: Checkpointer
    wandb_run: Any = None
    started: float = 0.0


def open_records(
    cfg: Config, run_dir: Path, resume: dict[str, Any] | None, teacher_ids: list[dict[str, Any]]
) -> Records:
    """Create (or reuse) the run directory with config.json and train.log (rank 0), start wandb, and build the
    row logger and the checkpointer, which continues `resume` and records the teachers' identities (a resumed
    run checks them)."""
    barrier()  # every rank has checked the run directory before rank 0 creates it
    if DIST.main:
        prepare_run_dir(run_dir, overwrite=cfg.run.overwrite, fresh=not cfg.run.resume and not cfg.run.overwrite)
        atomic_write_json(dataclasses.asdict(cfg), run_dir / "config.json")
        copy_console_to(run_dir / "train.log")  # what the run prints, kept beside its records
    barrier()
    wandb_run = start_wandb(cfg, run_dir, resume)
    sink = (
        None
        if wandb_run is None
        # rounded (no float32 noise): wandb's summary shows the last values
        else (lambda row: wandb_run.log(rounded_numbers(wandb_keys(row, cfg.teachers.models))))
    )
    logger = RunLogger(
        run_dir,
        resume["rows"] if resume else None,
        sink=sink,  # wandb keys: phase-scoped
        wandb_id=wandb_run.id if wandb_run is not None else (resume or {}).get("wandb_id"),
    )
    ckpt = Checkpointer(
        run_dir,
        {**dataclasses.asdict(cfg), "teacher_identities": teacher_ids},
        every_steps=cfg.run.ckpt_every_steps,
        keep_last=cfg.run.keep_last,
        resume=resume,
        logger=logger,
    )
    return Records(run_dir, logger, ckpt, wandb_run, time.time())


def close_records(records: Records, summary: dict[str, Any], teacher_run: bool = False) -> dict[str, Any]:
    """Finish the summary (images/s of the phases the run trains: stage 0's for `teacher_run`, else the student's,
    the wall time without the teachers', numbers as precise as they measure), write summary.json, close wandb,
    print it; returns it."""

    def trained(phase: str) -> bool:
        return phase.startswith("teacher:") if teacher_run else not phase.startswith(("teacher:", "asmb:A"))

    summary.update(mean_img_per_s(records.logger.rows, trained))
    teacher_s = summary.get("teacher_time_s", 0.0) + summary.get("teacher_wait_s", 0.0)
    summary["wall_time_s"] = time.time() - records.started - teacher_s
    summary = rounded_numbers(summary)  # as precise as what each measures (summary.json, wandb, the return value)
    records.logger.write_summary(summary)
    finish_wandb(records.wandb_run, summary, records.run_dir)
    say(format_summary(summary))
    stop_console_copy()
    return summary


# ---- wandb (the only wandb code) -----------------------------------------------------------------
def start_wandb(cfg: Config, run_dir: Path, resume: dict[str, Any] | None):
    """A wandb run logging under run_dir/wandb/ (rank 0; None when disabled), continuing a resumed run's."""
    mode = resolve_wandb_mode(cfg.wandb.mode)
    if mode == "disabled" or not DIST.main:
        return None
    return init_wandb(cfg, run_dir, mode, (resume or {}).get("wandb_id"))


def init_wandb(cfg: Config, run_dir: Path, mode: str, run_id: str | None = None):
    """wandb.init; online falls back to offline (sync later with `wandb sync`) when the server is unreachable
    (a 3 s probe) or init takes over 20 s. `run_id`: the run to continue (--run.resume)."""
    import wandb  # imported only when used: it is slow to import and kd/ never needs it

    kwargs = dict(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity or None,
        group=cfg.wandb.group or None,
        tags=list(cfg.wandb.tags) or None,
        name=run_dir.name,
        dir=str(run_dir),
        job_type=cfg.method,
        config=wandb_config(dataclasses.asdict(cfg), cfg.method, METHOD_GROUPS),
    )
    if run_id:
        kwargs.update(id=run_id, resume="allow")
    if mode == "online" and not wandb_server_reachable():
        say(f"wandb server unreachable; logging offline under {run_dir}/wandb (upload later with `wandb sync`)")
        mode = "offline"
    try:
        wandb_run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=20), **kwargs)
    except Exception as e:  # no network: never block or fail the run
        if mode != "online":
            raise
        say(f"wandb online init failed ({type(e).__name__}); logging offline under {run_dir}/wandb")
        wandb_run = wandb.init(mode="offline", **kwargs)
    for axis in WANDB_AXES:
        wandb_run.define_metric(axis)
    wandb_run.define_metric("*", step_metric="epoch")  # charts over the global epoch, not wandb's _step
    return wandb_run


def finish_wandb(wandb_run, summary: dict[str, Any], run_dir: Path) -> None:
    """The summary's numbers and strings into the wandb run summary; online runs upload checkpoints/best.pt as
    a `model` artifact (a failed upload is reported and never fails the run)."""
    if wandb_run is None:
        return
    wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    best = run_dir / "checkpoints" / "best.pt"
    if not wandb_run.offline and best.is_file():
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{wandb_run.name or wandb_run.id}-best")
        meta = {k: summary[k] for k in ("best/val_acc", "best/test_acc", "best/epoch", "method") if k in summary}
        try:
            import wandb

            artifact = wandb.Artifact(name, type="model", metadata=meta)
            artifact.add_file(str(best), name="best.pt")
            wandb_run.log_artifact(artifact, aliases=["best"])
        except Exception as e:  # network or quota trouble must not lose the finished run
            say(f"wandb: could not upload the best checkpoint ({type(e).__name__}: {e}); it stays at {best}")
    wandb_run.finish()
