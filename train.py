"""Train a model with any kd method: teacher fine-tuning, single-stage baselines, or multi-stage ASMB.

    python train.py --preset smoke --method kd          # tiny models, synthetic data, CPU, minutes
    python train.py --method kd --data.dataset cifar100 --student.model resnet8x4 --teachers resnet32x4
    python train.py --help                               # every option, its default and meaning

The file reads in the order a run happens: main() -> run() (the contents page: checks, records, stage 0,
the method) -> data -> stage 0 (teachers) -> single-stage training or the ASMB stages -> fit() and the step.
The config, its parsing and checks are kd_cli/config.py's; a run's start and end around the training (checks
before any write, run directory, records, wandb, summary) kd_cli/session.py's; the library (losses, methods,
models, data, ASMB, checkpoints, RNG, processes, optimisers) kd/'s. Outputs go to runs/<name>/ (README "Outputs").
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # --help and a bad flag answer here, before torch and timm load (seconds)
    from kd_cli.config import preflight

    if (code := preflight(sys.argv[1:])) is not None:
        sys.exit(code)

import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from kd.asmb import (AsmbModules, AsmbRun, TeacherAdaptStep, build_asmb_modules, guard_residual, stage_metrics,
                     synergy_warning)
from kd.data import ExtractLimits, SyntheticSpec, bridge_split, build_data, labels_in_order, train_subset
from kd.engine.checkpoint import (Checkpointer, checkpoint_on_stop_signals, reseed_loader)
from kd.engine.device import prepare_model, resolve_amp, resolve_device, resolve_teacher_dtype
from kd.engine.distributed import (DIST, barrier, close_distributed, distribute, init_distributed,
                                   rank0_values, say)
from kd.engine.optim import build_optimizer, build_scheduler, fused_kwargs
from kd.engine.rng import phase_seed, seed_everything, set_rng_state
from kd.engine.tracker import LossTracker
from kd.engine.trainer import StepClock, StudentStep, Trainer
from kd.errors import ConfigError, KDError, Preempted
from kd.fastloader import DeviceLoader, make_loaders
from kd.freeze import apply_freeze, freeze_report, set_train
from kd.methods import method_class
from kd.methods.base import Method
from kd.metrics import evaluate_acc, evaluate_top1_top5
from kd.mix import build_mixer
from kd.models import KDModel, check_meta, check_shapes, create_model
from kd.teachers import (FrozenModel, fill_cache, frozen_forward, load_teacher, save_teacher, select_teachers,
                         teacher_cache_path, teacher_identities, teacher_seed, teacher_small_input,
                         teacher_test_summary)
from kd_cli.config import Config, OptimCfg, parse_config, validate
from kd_cli.progress import RunProgress
from kd_cli.session import (check_before_data, check_teacher_sources, close_records, exit_code, open_records,
                             run_dir_and_resume, student_notes)
from kd_cli.rundir import release_run_dirs
from kd_cli.runlog import RunLogger, stop_console_copy


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        checkpoint_on_stop_signals()  # SIGTERM/SIGUSR1: a checkpoint at the next step, then Preempted
        run(cfg)
        return 0
    except (KDError, Preempted, RuntimeError, KeyboardInterrupt) as e:
        return exit_code(e)  # one line on stderr (how to continue, for Preempted); other errors raise
    finally:
        stop_console_copy()
        release_run_dirs()
        close_distributed()


# ---- The run, as a contents page -----------------------------------------------------------------
@dataclass
class RunContext:
    """What every phase of one run shares, built once by run() and passed as one object."""
    cfg: Config
    data: Any  # kd.data.DataSplits: train / val / test, classes, image size
    loaders: dict[str, Any]  # "train", "val", "test"
    device: torch.device
    logger: RunLogger | None  # metrics.jsonl rows (and wandb's)
    ckpt: Checkpointer  # called every step; writes when due
    clock: StepClock  # the run-wide step count and progress lines


def run(cfg: Config) -> dict[str, Any]:
    # 1. Every check before anything is written: values, names, weight files, processes, the resume checkpoint,
    # the data, the models' dimensions, the teachers' sources.
    validate(cfg)
    spec = cfg.spec  # the method's family and teachers (kd/methods/__init__.py's table)
    asmb = spec.family == "asmb"
    check_before_data(cfg)  # model names, weight files read and fitted, the student's hub weights reachable
    init_distributed(cfg.data.batch_size, use_cuda=cfg.run.device != "cpu", sync_bn=cfg.run.sync_bn,
                     timeout_min=cfg.run.dist_timeout_min)
    run_dir, resume = run_dir_and_resume(cfg)  # new, or the one --run.resume continues (its config checked)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    device = resolve_device(cfg.run.device)
    data = load_data(cfg)
    # --asmb.bridge-split: (teacher-fit, bridge) parts of the training split, or None
    parts = bridge_parts(cfg, data) if asmb and cfg.asmb.bridge_split > 0 else None
    small_input = cfg.student.small_input == "on" or (cfg.student.small_input == "auto" and data.image_size <= 64)
    teacher_small = teacher_small_input(small_input, cfg.teachers.image_size)
    student = None if spec.family == "teacher" else build_student(cfg, data, small_input, resume)
    teacher_dims = [create_model(arch, data.num_classes, small_input=teacher_small).num_features  # unknown names
                    for arch in (cfg.teachers.models if spec.uses_teachers else ())]  # fail here, before any write
    asmb_modules = build_asmb_modules(cfg.asmb, teacher_dims, student, data.num_classes) if asmb else None
    teacher_ids = teacher_identities(cfg.teachers, cfg.optim, cfg.data, cfg.run, data, teacher_small, device,
                                     bridge_split=cfg.asmb.bridge_split if parts else 0.0) if spec.uses_teachers else []
    check_teacher_sources(cfg, teacher_ids, data.num_classes, teacher_small, resume)

    # 2. The run directory and its records (config.json, train.log, metrics.jsonl, checkpoints, wandb); loaders.
    records = open_records(cfg, run_dir, resume, teacher_ids)
    say(f"run directory: {run_dir}  (device {device}, {data.num_classes} classes, "
        f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test)")
    for note in student_notes(cfg):
        say(note)
    loaders = build_loaders(cfg, data, device)
    # stage 0 fits the teachers on the teacher-fit part, phase A trains on the bridge part (both: all without a split)
    fit_loaders, bridge_loaders = split_loaders(cfg, data, parts, loaders, device) if parts else (loaders, loaders)
    progress = RunProgress(planned_steps(cfg, loaders, bridge_loaders), log_every=cfg.run.log_every,
                           num_stages=cfg.asmb.num_stages * asmb)
    ctx = RunContext(cfg, data, loaders, device, records.logger, records.ckpt,
                     StepClock(records.ckpt.resume_step, progress))
    records.started = t_start = time.time()
    summary: dict[str, Any] = {"method": cfg.method, "dataset": cfg.data.dataset, "num_classes": data.num_classes,
                               "run_dir": str(run_dir)}
    if parts:
        summary.update({"data/teacher_fit_images": len(parts[0].train), "data/bridge_images": len(parts[1].train)})

    # 3. Stage 0 (teachers, fine-tuned when not cached), then the method's training.
    teachers = []
    if spec.uses_teachers:  # the teachers' time and accuracies are reported apart from the student's
        adapter_dim = cfg.asmb.teacher_adapter_dim if asmb and cfg.asmb.teacher_freeze == "adapter" else 0
        timing: dict[str, float] = {}
        teachers = stage0_teachers(ctx, parts[0] if parts else data, fit_loaders, teacher_small, teacher_ids,
                                   adapter_dim, timing=timing)
        summary.update({f"teacher/{arch}/val_acc": acc for arch, (_, acc) in zip(cfg.teachers.models, teachers)})
        summary.update(teacher_test_summary(cfg.teachers.models, [t for t, _ in teachers], loaders["test"], device))
        # this run's teacher time (fine-tuning, or loading from the cache, and testing); the time it waited for
        # another run fine-tuning the same teacher is apart, so a teacher loaded from the cache costs its load time
        summary["teacher_wait_s"] = timing.get("wait_s", 0.0)
        summary["teacher_time_s"] = time.time() - t_start - summary["teacher_wait_s"]
    if asmb:
        summary.update(train_asmb(ctx, student, [t for t, _ in teachers], asmb_modules, bridge_loaders=bridge_loaders))
    elif spec.family != "teacher":
        chosen = [t for t, _ in teachers] if spec.multi_teacher else select_teachers(cfg.teachers.select, teachers)
        summary.update(train_single(ctx, student, chosen))
    trained = (lambda p: p.startswith("teacher:")) if spec.family == "teacher" else \
        (lambda p: not p.startswith(("teacher:", "asmb:A")))  # the phases of the model the run trains
    return close_records(records, summary, trained)  # summary.json, wandb's summary, the printed summary


def planned_steps(cfg: Config, loaders, bridge_loaders) -> int:
    """Optimisation steps of the method's training (stage-0 teachers are planned when they start: they may be
    cached); ASMB's phase A runs on `bridge_loaders`' training part."""
    steps = steps_per_epoch(cfg, loaders["train"])
    if cfg.spec.family != "asmb":
        return 0 if cfg.spec.family == "teacher" else cfg.optim.epochs * steps
    epochs_a, epochs_b = cfg.asmb.epochs_per_stage(cfg.optim.epochs)
    return cfg.asmb.num_stages * (epochs_a * steps_per_epoch(cfg, bridge_loaders["train"]) + epochs_b * steps)


def build_student(cfg: Config, data, small_input: bool, resume: dict[str, Any] | None) -> KDModel:
    """The student, partly frozen by --student.freeze; an unknown name or a bad checkpoint fails here."""
    student = create_model(cfg.student.model, data.num_classes, pretrained=cfg.student.pretrained,
                           small_input=small_input, checkpoint=cfg.student.checkpoint or None,
                           drop_rate=cfg.student.drop_rate, adapter_dim=cfg.student.adapter_dim,
                           weights=cfg.student.weights or None)
    if cfg.student.weights:
        say(weights_line(f"student {cfg.student.model}", cfg.student.weights, student))
    apply_freeze(student, cfg.student.freeze)
    if resume is not None and resume["phase"] == cfg.method:
        check_meta(student.meta(), resume["meta"], f"resume checkpoint {cfg.run.resume}")
        check_shapes(student, resume["model"], f"resume checkpoint {cfg.run.resume}", same_keys=True)
    return student


def weights_line(who: str, path: str, model: KDModel) -> str:
    """The one line a model started from a weight file prints: the file and what was re-initialised."""
    return f"{who}: weights {path}" + "".join(f"; {note}" for note in model.weights_notes)


# ---- Data ----------------------------------------------------------------------------------------
def load_data(cfg: Config):
    d = cfg.data
    data = build_data(d.dataset, d.root, val_fraction=d.val_fraction, seed=d.split_seed, image_size=d.image_size,
                      aug=d.aug, randaugment=d.randaugment, cache_dir=d.cache_dir or None, classes=d.classes,
                      extract_limits=ExtractLimits.from_flags(d.max_extract_gb, d.max_extract_files),
                      synthetic=SyntheticSpec(num_classes=d.synthetic_classes, train_size=d.synthetic_train_size,
                                              test_size=d.synthetic_test_size, image_size=d.synthetic_image_size,
                                              seed=d.split_seed))
    if len(data.train) < d.batch_size:
        raise ConfigError(f"--data.batch-size {d.batch_size} is larger than the training split ({len(data.train)})")
    return data


def build_loaders(cfg: Config, data, device: torch.device, train_only: bool = False) -> dict[str, Any]:
    """Device-resident loaders for tensor-backed data (--data.loader auto/fast, no RandAugment), else DataLoaders.
    `train_only`: the training loader alone (of a part of the training split)."""
    d = cfg.data
    loaders = make_loaders(data, fast=d.loader != "torch" and d.randaugment[0] == 0, batch_size=d.batch_size,
                           eval_batch_size=d.eval_batch_size, workers=d.workers, aug=d.aug, seed=cfg.run.seed,
                           device=device, rank=DIST.rank, world_size=DIST.world_size, train_only=train_only)
    if isinstance(loaders["train"], DeviceLoader) and not train_only:
        say(f"data: device-resident loader on {device} (--data.loader {d.loader})")
    return loaders


def bridge_parts(cfg: Config, data):
    """--asmb.bridge-split F > 0 (asmb): the training split as (teacher-fit part, bridge part), two
    kd.data.DataSplits sharing val and test, divided per class and seeded by --data.split-seed only (not --run.seed:
    every student seed sees the same parts, and a resumed run the same); None when off. A part too small to train
    on (a class without a bridge image, fewer images than --data.batch-size) is a ConfigError, before any write."""
    fraction = cfg.asmb.bridge_split if cfg.spec.family == "asmb" else 0.0
    if fraction <= 0:
        return None
    labels = labels_in_order(data.train, data.train_labels)
    fit_idx, bridge_idx = bridge_split(labels, fraction, cfg.data.split_seed)
    per_class = torch.bincount(labels[bridge_idx], minlength=data.num_classes)
    if int(per_class.min()) < 1:
        c = int(per_class.argmin())
        raise ConfigError(f"--asmb.bridge-split {fraction}: class {data.class_names[c]} has "
                          f"{int((labels == c).sum())} training image(s), none left for the bridge part (each class "
                          "needs 2)")
    for name, idx in (("bridge", bridge_idx), ("teacher-fit", fit_idx)):
        if len(idx) < cfg.data.batch_size:
            raise ConfigError(f"--asmb.bridge-split {fraction}: the {name} part has {len(idx)} images, fewer than "
                              f"--data.batch-size {cfg.data.batch_size}")
    return train_subset(data, fit_idx), train_subset(data, bridge_idx)


def split_loaders(cfg: Config, data, parts, loaders, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """--asmb.bridge-split: the loaders of stage 0 (the teacher-fit part's training loader) and of phase A (the
    bridge part's); validation and test as the run's."""
    fit_loaders, bridge_loaders = ({**loaders, "train": build_loaders(cfg, part, device, train_only=True)["train"]}
                                   for part in parts)
    say(f"bridge split {cfg.asmb.bridge_split}: the teachers fit {len(parts[0].train)} training images, phase A "
        f"trains on the other {len(parts[1].train)} (the bridge part), phase B on all {len(data.train)}")
    return fit_loaders, bridge_loaders


def steps_per_epoch(cfg: Config, loader) -> int:
    """Optimisation steps per epoch: the loader's batches, or --run.max-steps-per-epoch when smaller."""
    return min(len(loader), cfg.run.max_steps_per_epoch) if cfg.run.max_steps_per_epoch else len(loader)


# ---- Stage 0: teachers (fine-tuned once per identity: what made them, then cached; kd/teachers.py)
def stage0_teachers(ctx: RunContext, data, loaders, small_input: bool, identities: list[dict[str, Any]],
                    adapter_dim: int = 0, timing: dict[str, float] | None = None) -> list[tuple[KDModel, float]]:
    """Every configured teacher, frozen and in eval mode, with its validation accuracy: from
    --teachers.checkpoints, else from the cache, fine-tuning the ones that are missing (and the one a resumed
    run was fine-tuning when it stopped, even if cached, so it continues exactly). `adapter_dim` > 0 gives
    each a new zero-initialised residual adapter (ASMB's teacher_freeze adapter). `timing["wait_s"]`: the seconds
    spent waiting for another process's fine-tuning (its cache lock), which is not this run's teacher time.
    `data`, `loaders`: what the teachers fit (--asmb.bridge-split's teacher-fit part, else the run's)."""
    cfg, given = ctx.cfg, bool(ctx.cfg.teachers.checkpoints)
    archs = cfg.teachers.models
    paths = [Path(p) for p in cfg.teachers.checkpoints] if given else \
        [teacher_cache_path(cfg.teachers.cache_dir, identity) for identity in identities]
    weights = list(cfg.teachers.weights) or [""] * len(archs)
    tuned, waited = set(), 0.0
    if not given:  # fine-tune the missing ones and the one a resumed run was fine-tuning (kd.teachers.fill_cache)
        tuned, waited = fill_cache(
            paths, lambda i: ctx.ckpt.pending_phase() == f"teacher:{archs[i]}" or not paths[i].exists(),
            lambda i: finetune_teacher(ctx, archs[i], paths[i], identities[i], data, loaders, small_input,
                                       **({"weights": weights[i]} if weights[i] else {})),
            locked=DIST.world_size == 1)
    if timing is not None:
        timing["wait_s"] = waited
    out = []
    for i, (arch, identity, path) in enumerate(zip(archs, identities, paths)):
        if not given and i not in tuned:
            say(f"teacher {arch}: using cached {path}")
        model, val_acc = load_teacher(path, arch, data.num_classes, small_input, cfg.teachers.image_size or None,
                                      adapter_dim, identity["input"], identity)
        model = prepare(model, cfg, ctx.device, inference=True)
        if val_acc is None:
            val_acc = evaluate_acc(model, loaders["val"], ctx.device)
        out.append((model, val_acc))
    return out


def finetune_teacher(ctx: RunContext, arch: str, path: Path, identity: dict[str, Any], data, loaders,
                     small_input: bool, weights: str = "") -> None:
    """Fine-tune one teacher with cross-entropy (phase `teacher:<arch>`, resumable), select it by validation
    accuracy and cache it at `path` with its identity. Its init and data order come from teacher_seed(identity);
    it starts from timm's hub weights (--teachers.pretrained), the local file `weights`, or from scratch."""
    cfg, device = ctx.cfg, ctx.device
    say(f"stage 0: fine-tuning teacher {arch} for {cfg.teachers.epochs} epochs -> {path}")
    ctx.clock.progress.plan(cfg.teachers.epochs * steps_per_epoch(cfg, loaders["train"]))
    seed_everything(teacher_seed(identity))
    spec = identity["input"]
    model = create_model(arch, data.num_classes, pretrained=cfg.teachers.pretrained, small_input=small_input,
                         img_size=cfg.teachers.image_size or None, weights=weights or None)
    if weights:
        say(weights_line(f"teacher {arch}", weights, model))
    if spec is not None:
        model.set_input_transform(**spec)
    model = prepare(model, cfg, device)
    method = method_class("ce")(None, model, [], num_classes=data.num_classes, num_train=len(data.train),
                              label_smoothing=cfg.teachers.label_smoothing)
    optimizer = optimizer_for([model], cfg.optim, cfg.teachers.lr, device)
    tr = make_trainer(cfg, model, method, [], device, ctx.clock, optimizer, cfg.optim, cfg.teachers.epochs,
                      steps_per_epoch(cfg, loaders["train"]), data.num_classes)
    tr.seed = teacher_seed(identity)  # fit() reseeds the phase from it, not from --run.seed
    best = fit(tr, loaders, cfg.teachers.epochs, f"teacher:{arch}", ctx.logger, ctx.ckpt, save_best=False)
    if DIST.main:
        save_teacher(path, model, best["state"], best["acc"], identity)
    barrier()  # the other ranks load the teacher from the cache rank 0 just wrote


def prepare(model: KDModel, cfg: Config, device: torch.device, inference: bool = False) -> KDModel:
    return prepare_model(model, device, channels_last=cfg.run.channels_last, compile=cfg.run.compile,
                         sync_bn=cfg.run.sync_bn, inference=inference,
                         frozen_compile=cfg.teachers.compile and cfg.spec.family not in ("asmb", "teacher"))


# ---- Single-stage training: ce and the baselines (one student, frozen teachers) ------------------
def train_single(ctx: RunContext, student: KDModel, teachers: list[KDModel]) -> dict[str, Any]:
    cfg, loaders = ctx.cfg, ctx.loaders
    tr = single_trainer(cfg, ctx.data, ctx.device, ctx.clock, student, teachers, steps_per_epoch(cfg, loaders["train"]))
    say(freeze_report({"student": tr.model, "method": tr.method, **{f"teacher {t.arch}": t for t in teachers}}))
    best = fit(tr, loaders, cfg.optim.epochs, cfg.method, ctx.logger, ctx.ckpt)
    return test_summary(tr.model, best, loaders, ctx.device, ctx.logger)


def single_trainer(cfg: Config, data, device, clock: StepClock, student: KDModel, teachers: list[KDModel],
                   steps: int) -> Trainer:
    """The student on its device, the method (its loss terms and auxiliary modules) and their Trainer."""
    student = prepare(student, cfg, device)
    method_cls = method_class(cfg.method)
    method = method_cls(getattr(cfg, cfg.method, None), student, teachers, num_classes=data.num_classes,
                        num_train=len(data.train), label_smoothing=cfg.optim.label_smoothing,
                        image_size=data.image_size,
                        train_labels=labels_in_order(data.train, data.train_labels) if method_cls.needs_index else None)
    method = method.to(device)
    optimizer = optimizer_for([student, method], cfg.optim, cfg.optim.lr, device)
    return make_trainer(cfg, student, method, teachers, device, clock, optimizer, cfg.optim, cfg.optim.epochs,
                        steps, data.num_classes, distill=bool(teachers), freeze_policy=cfg.student.freeze)


def test_summary(student: KDModel, best: dict[str, Any], loaders, device, logger: RunLogger) -> dict[str, Any]:
    """Test accuracy of the last and of the selected (best validation) student; the test split only reports."""
    last = dict(zip(("last/test_acc", "last/test_acc5"), evaluate_top1_top5(student, loaders["test"], device)),
                **{"last/val_acc": next(r["val/acc"] for r in reversed(logger.rows) if "val/acc" in r)})
    student.load_state_dict(best["state"])
    best_test = dict(zip(("best/test_acc", "best/test_acc5"), evaluate_top1_top5(student, loaders["test"], device)))
    return {**last, **best_test, "best/val_acc": best["acc"], "best/epoch": best["epoch"]}


# ---- ASMB (docs/asmb.md): stage 0 (both teachers), then num_stages x (phase A: the teachers' trainable part +
# MBM + head learn the synergy; phase B: the student distils from it). The pieces live in kd/asmb.py; each
# phase is an ordinary Trainer run by fit(), its optimiser and schedule built once for all stages.
def train_asmb(ctx: RunContext, student: KDModel, teachers: list[KDModel], modules: AsmbModules,
               bridge_loaders: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ASMB stages after stage 0; returns the summary entries. Selection: the best student by validation
    accuracy over every phase-B epoch of every stage (best.pt); the test split only reports. Phase A trains on
    `bridge_loaders["train"]` (--asmb.bridge-split's bridge part; default: the whole training split), phase B on
    `loaders["train"]`."""
    cfg, data, loaders, device, logger, ckpt = ctx.cfg, ctx.data, ctx.loaders, ctx.device, ctx.logger, ctx.ckpt
    bridge_loaders = bridge_loaders or loaders
    for teacher in teachers:
        apply_freeze(teacher, cfg.asmb.teacher_freeze)  # partly trainable; modes are set per phase
    run = build_asmb_run(cfg, prepare(student, cfg, device), teachers, modules, device,
                         steps_per_epoch(cfg, loaders["train"]), data.num_classes, ctx.clock,
                         steps_a=steps_per_epoch(cfg, bridge_loaders["train"]))
    say(freeze_report({"student": student, **{f"teacher {t.arch} ({cfg.asmb.teacher_freeze})": t for t in teachers},
                       "MBM + head": run.bridge, "projections": run.distill}))
    # A resumed run skips the phases before its checkpoint's; fit() restores that one (and, via Trainer.extra, all).
    phases = run.phases()  # (stage, tag, global epoch before it): A then B per stage
    tags = [tag for _, tag, _ in phases]
    resume_at = tags.index(ckpt.pending_phase()) if ckpt.pending_phase() in tags else 0
    guard_on = cfg.asmb.residual_guard and cfg.asmb.ensemble_base  # without the base there is no residual to reset
    fired = 0
    for stage, tag, epoch in phases[resume_at:]:
        run.stage = stage
        if tag.startswith("asmb:A"):
            fit(run.phase_a, bridge_loaders, run.teacher_epochs, tag, logger, ckpt, epoch_offset=epoch,
                save_best=False, val_key="synergy_acc")
            if guard_on and (line := guard_residual(run.synergy, loaders["val"], stage, device)):
                say(line)
                fired = 1
            continue
        prior = {**run.best, "epoch": run.best["epoch"] - epoch}  # fit() counts epochs from its offset
        best = fit(run.phase_b, loaders, run.student_epochs, tag, logger, ckpt, epoch_offset=epoch, initial_best=prior)
        run.best = {**best, "epoch": epoch + best["epoch"]}
        metrics = stage_metrics(run.synergy, loaders["val"], device)
        logger.log({"phase": "asmb:stage", "stage": stage, "epoch": epoch + run.student_epochs, **metrics,
                    **({"guard/fired": fired} if guard_on else {})})
        say(f"[asmb stage {stage}/{run.num_stages}] " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        if warning := synergy_warning(stage, metrics):
            say(warning)
        fired = 0
    test = stage_metrics(run.synergy, loaders["test"], device)
    # ensemble/test_acc stays the teachers' as stage 0 left them (as for every method); the adapted ones apart
    firings = [r["guard/fired"] for r in logger.rows if r.get("phase") == "asmb:stage" and "guard/fired" in r]
    # best/epoch counts the student's training epochs (phase B), as for every method; the row's epoch is global
    return {"synergy/test_acc": test["synergy/acc"], "adapted_ensemble/test_acc": test["ensemble/acc"],
            **({"asmb/guard_fired": sum(firings)} if guard_on else {}),
            **test_summary(student, run.best, loaders, device, logger),
            "best/epoch": run.distill.student_epoch(run.best["epoch"]), "best/global_epoch": run.best["epoch"]}


def build_asmb_run(cfg: Config, student: KDModel, teachers: list[KDModel], modules: AsmbModules, device,
                   steps: int, num_classes: int, clock: StepClock | None = None,
                   steps_a: int | None = None) -> AsmbRun:
    """ASMB's models and progress (kd.asmb.AsmbRun) and its two phase trainers, built once and persisting across
    stages: phase A trains the synergy model (each teacher's trainable part + MBM + head) by Adam, validated as
    val/synergy_acc, without MixUp/CutMix; phase B trains the student (+ projections) with --optim's optimiser,
    scheduled over all phase-B epochs. Both carry the run as Trainer.extra: every checkpoint holds all of it.
    `steps`: phase B's steps per epoch; `steps_a`: phase A's (its training part, --asmb.bridge-split), default
    `steps`."""
    a, clock = cfg.asmb, clock or StepClock(progress=RunProgress())
    frozen_student = FrozenModel(student, resolve_teacher_dtype(cfg.teachers.precision, device))  # phase A's query
    run = AsmbRun(a, student, teachers, modules, device, num_classes, cfg.optim.epochs, cfg.optim.label_smoothing)
    run.phase_a = make_trainer(cfg, run.synergy, run.adapt, [], device, clock,
                               torch.optim.Adam(run.adapt_param_groups(), **fused_kwargs(device)),
                               dataclasses.replace(cfg.optim, schedule=a.teacher_schedule, warmup_epochs=0.0),
                               a.num_stages * run.teacher_epochs, steps_a or steps, num_classes, mix=False,
                               step_module=TeacherAdaptStep(frozen_student, teachers, run.bridge, run.adapt))
    run.phase_b = make_trainer(cfg, student, run.distill, teachers, device, clock,
                               optimizer_for([student, run.distill], cfg.optim, cfg.optim.lr, device),
                               cfg.optim, a.num_stages * run.student_epochs, steps, num_classes, distill=True,
                               freeze_policy=cfg.student.freeze)
    run.phase_a.extra = run.phase_b.extra = run
    return run


# ---- The trainer, fit() and the step -------------------------------------------------------------
def optimizer_for(modules: list[nn.Module], o: OptimCfg, lr: float, device: torch.device):
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return build_optimizer(params, o.name, lr, device, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay)


def make_trainer(cfg: Config, model: KDModel, method: Method, teachers: list[KDModel], device: torch.device,
                 clock: StepClock, optimizer, schedule: OptimCfg, epochs: int, steps: int, num_classes: int, *,
                 distill: bool = False, mix: bool = True, freeze_policy: str = "none",
                 step_module: nn.Module | None = None) -> "Trainer":
    """The one Trainer builder of every phase: its schedule spans `epochs` of `steps` steps; MixUp/CutMix from
    --optim (distillation phases use --optim.cutmix-alpha-distill when it is > 0)."""
    o = cfg.optim
    amp_dtype = resolve_amp(cfg.run.amp, device)
    return Trainer(
        model=model, method=method, teachers=teachers, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, schedule.schedule, epochs, steps, warmup_epochs=schedule.warmup_epochs,
                                  milestones=schedule.milestones, gamma=schedule.gamma),
        device=device, amp_dtype=amp_dtype, scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        mixer=build_mixer(num_classes, *mix_alphas(o, distill)) if mix else None, grad_clip_norm=o.grad_clip_norm,
        channels_last=cfg.run.channels_last, clock=clock, steps_per_epoch=steps, freeze_policy=freeze_policy,
        seed=cfg.run.seed, step_module=distribute(step_module or StudentStep(model, method), device),
        teacher_dtype=resolve_teacher_dtype(cfg.teachers.precision, device))


def mix_alphas(o: OptimCfg, distill: bool) -> tuple[float, float]:
    """(mixup_alpha, cutmix_alpha) of a training phase: distillation phases use --optim.cutmix-alpha-distill
    instead of --optim.cutmix-alpha when it is > 0 (CutMix still wins over MixUp)."""
    return o.mixup_alpha, o.cutmix_alpha_distill if distill and o.cutmix_alpha_distill > 0 else o.cutmix_alpha


def fit(tr: Trainer, loaders: dict[str, Any], epochs: int, tag: str, logger: RunLogger, ckpt: Checkpointer, *,
        epoch_offset: int = 0, save_best: bool = True, initial_best: dict[str, Any] | None = None,
        val_key: str = "acc") -> dict[str, Any]:
    """Train for `epochs`, validate every epoch, keep the best weights by validation accuracy (a copy, never an
    alias of the live weights); continues exactly when the run resumes from a checkpoint of this phase (`tag`).
    `save_best`: also write checkpoints/best.pt. `initial_best`: the best so far of earlier fits ({"acc",
    "epoch" relative to epoch_offset, "state"}), so selection spans them (ASMB's stages). `val_key`: the rows'
    name of the validation accuracy (val/<key>, val/best_<key>). Returns the best {"acc", "epoch", "state"}."""
    train_loader = loaders["train"]
    tr.tag, tr.loader, tr.epoch_offset, tr.epochs_done, tr.tracker = tag, train_loader, epoch_offset, 0, None
    tr.best = dict(initial_best) if initial_best else {"acc": -1.0, "epoch": 0, "state": None}
    resumed = ckpt.take(tag)
    start_rng = tr.load_state_dict(resumed) if resumed is not None else None
    if resumed is None:  # a fresh phase: RNGs and data order from (seed, phase name) only
        seed = phase_seed(tr.seed, tag)
        seed_everything(seed)
        reseed_loader(train_loader, seed)
    if save_best and tr.best["state"] is not None:  # best.pt may be ahead of the checkpoint (an earlier phase's, or
        # an abandoned branch's after a resume from an older step file): make them agree
        ckpt.save_best(tr.model.meta(), tr.best["state"], tr.best["acc"], epoch_offset + tr.best["epoch"])
    for e in range(tr.epochs_done + 1, epochs + 1):
        t0, epoch = time.time(), epoch_offset + e
        terms = train_epoch(tr, train_loader, epoch, f"{tag} {e}/{epochs}", ckpt, start_rng)
        start_rng, tr.epochs_done = None, e
        val_acc, val_acc5 = rank0_values(*evaluate_top1_top5(tr.model, loaders["val"], tr.device))  # ranks agree
        if val_acc > tr.best["acc"]:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in tr.model.state_dict().items()}  # a copy
            tr.best = {"acc": val_acc, "epoch": e, "state": weights}
            if save_best:
                ckpt.save_best(tr.model.meta(), tr.best["state"], val_acc, epoch)
        row = {"phase": tag, "epoch": epoch, "step": tr.clock.steps, "lr": tr.optimizer.param_groups[0]["lr"],
               **{f"train/{k}": v for k, v in terms.items()}, f"val/{val_key}": val_acc, f"val/{val_key}5": val_acc5,
               f"val/best_{val_key}": tr.best["acc"], "train/img_per_s": tr.clock.progress.epoch.rate(),
               "time_s": time.time() - t0}
        logger.log(row)
        say(f"[{tag}] epoch {e}/{epochs}  loss {terms['loss']:.4f}  val {val_key} {val_acc:.2f}  "
            f"{row['train/img_per_s']:.0f} img/s  ({row['time_s']:.1f}s)  | "
            + tr.clock.progress.where(tag, e, epochs, tr.clock.steps))
        ckpt.save(tr.clock.steps, tag, tr.state_dict, epoch_end=True)
    return dict(tr.best)


def train_epoch(tr: Trainer, loader, epoch: int, desc: str, ckpt: Checkpointer,
                start_rng: dict[str, Any] | None = None) -> dict[str, float]:
    """One epoch (tr.steps_per_epoch steps), or the rest of one when tr.tracker holds a resumed mid-epoch state
    (`start_rng`: its RNG states). The checkpointer is called after every step but the last (the epoch-end
    checkpoint follows validation). Returns the mean loss terms (one host sync); raises TrainingDiverged. The bar
    shows the running loss and images/s; off a terminal a line every --run.log-every steps (or ~30 s)."""
    set_train(tr.model, tr.freeze_policy)
    tr.method.train()
    tr.tracker = tr.tracker or LossTracker()
    steps, batches = tr.steps_per_epoch, iter(loader)
    if start_rng is not None:  # after iter(): a DataLoader draws its worker seed there, as it did before the kill
        set_rng_state(start_rng)
    meter = tr.clock.progress.meter(steps, tr.tracker.n, tr.clock.steps)
    bar = tqdm(itertools.islice(batches, steps - tr.tracker.n), desc=desc, total=steps, initial=tr.tracker.n,
               disable=not (sys.stdout.isatty() and DIST.main), leave=False, dynamic_ncols=True)  # a bar on a terminal
    for x, y, index in bar:
        x, y, index = (t.to(tr.device, non_blocking=True) for t in (x, y, index))
        tr.clock.steps += 1
        tr.tracker.add(train_step(tr, x, y, index, epoch), tr.clock.steps)
        meter.add(len(x) * DIST.world_size)
        if meter.due(interval_s=None if bar.disable else 1.0):  # reading the loss syncs the device: not every step
            loss = tr.tracker.sums[0].item() / tr.tracker.n
            bar.set_postfix(meter.postfix(loss)) if not bar.disable else say(meter.line(desc, loss))
        if tr.tracker.n < steps:
            ckpt.save(tr.clock.steps, tr.tag, tr.state_dict)
    tr.tracker.check(f"epoch {epoch} ({tr.tag})")
    terms, tr.tracker = tr.tracker.means(), None
    meter.stop()  # after the loss was read (the device is done): the epoch line's img/s is training time only
    return terms


def train_step(tr: Trainer, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> dict[str, Tensor]:
    """One optimisation step; returns the detached loss terms (no host sync)."""
    if tr.mixer is not None:
        x, y = tr.mixer(x, y)  # teachers and student see the same mixed batch
    if tr.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    maps = tr.method.needs_maps
    with torch.autocast(tr.device.type, dtype=tr.amp_dtype or torch.float32, enabled=tr.amp_dtype is not None):
        t_outs = frozen_forward(tr.teachers, x, with_maps=maps, dtype=tr.teacher_dtype)
        terms = tr.step_module(x, y, index, epoch, t_outs)
        loss = tr.method.total_loss(terms, epoch)  # zero-weight terms left out of the graph
    tr.optimizer.zero_grad(set_to_none=True)
    tr.scaler.scale(loss).backward()
    if tr.grad_clip_norm > 0:
        tr.scaler.unscale_(tr.optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in tr.optimizer.param_groups for p in g["params"]],
                                       tr.grad_clip_norm)
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    tr.scheduler.step()
    return {"loss": loss.detach(), **{k: v.detach().float() for k, v in terms.items()}}


if __name__ == "__main__":
    sys.exit(main())
