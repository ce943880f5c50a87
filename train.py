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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd.asmb import (
    AsmbModules,
    AsmbRun,
    TeacherAdaptStep,
    build_asmb_modules,
    guard_residual,
    stage_metrics,
    synergy_warning,
)
from kd.data import bridge_split, labels_in_order, load_dataset, train_subset
from kd.engine.checkpoint import Checkpointer, checkpoint_on_stop_signals, reseed_loader
from kd.engine.device import prepare_model, resolve_amp, resolve_device, resolve_teacher_dtype
from kd.engine.distributed import DIST, barrier, close_distributed, init_distributed, rank0_values, say
from kd.engine.optim import build_optimizer, build_scheduler, fused_kwargs
from kd.engine.rng import phase_seed, seed_everything, set_rng_state
from kd.engine.tracker import LossTracker
from kd.engine.trainer import FitState, Runtime, StepClock, Trainer
from kd.errors import ConfigError, KDError, Preempted
from kd.fastloader import DeviceLoader, make_loaders
from kd.freeze import apply_freeze, freeze_report, set_train
from kd.methods import build_method
from kd.metrics import evaluate_acc, evaluate_top1_top5
from kd.mix import build_mixer
from kd.models import KDModel, check_meta, check_shapes, create_model
from kd.teachers import (
    FrozenModel,
    fill_cache,
    frozen_forward,
    load_teacher,
    save_teacher,
    select_teachers,
    teacher_cache_path,
    teacher_seed,
    teacher_small_input,
)
from kd_cli.config import Config, OptimCfg, parse_config, validate
from kd_cli.progress import RunProgress
from kd_cli.rundir import release_run_dirs
from kd_cli.runlog import RunLogger, stop_console_copy
from kd_cli.session import (
    announce,
    check_before_data,
    close_records,
    exit_code,
    open_records,
    run_dir_and_resume,
    start_summary,
    teacher_sources,
    teacher_summary,
)


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
    runtime: Runtime  # the device, precisions, memory format, gradient clip and the run-wide step clock
    logger: RunLogger | None  # metrics.jsonl rows (and wandb's)
    ckpt: Checkpointer  # called every step; writes when due


def run(cfg: Config) -> dict[str, Any]:
    # 1. Every check before anything is written: values, names, weight files, processes, the resume checkpoint,
    # the data, the models' dimensions, the teachers' sources.
    validate(cfg)
    spec = cfg.spec  # the method's family and teachers (kd/methods/__init__.py's table)
    asmb = spec.family == "asmb"
    check_before_data(cfg)  # model names, weight files read and fitted, the student's hub weights reachable
    init_distributed(cfg.data.batch_size, cfg.run.device != "cpu", cfg.run.sync_bn, cfg.run.dist_timeout_min)
    run_dir, resume = run_dir_and_resume(cfg)  # new, or the one --run.resume continues (its config checked)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    device = resolve_device(cfg.run.device)
    data = load_data(cfg)
    parts = bridge_parts(cfg, data) if asmb else None  # --asmb.bridge-split's (teacher-fit, bridge) parts, or None
    small_input = cfg.student.small_stem(data.image_size)
    teacher_small = teacher_small_input(small_input, cfg.teachers.image_size)
    student = None if spec.family == "teacher" else build_student(cfg, data, small_input, resume)
    archs = cfg.teachers.models if spec.uses_teachers else ()  # built here: a model that cannot be built fails now
    teacher_dims = [create_model(arch, data.num_classes, small_input=teacher_small).num_features for arch in archs]
    asmb_modules = build_asmb_modules(cfg.asmb, teacher_dims, student, data.num_classes) if asmb else None
    # the teachers' identities; given checkpoints, hub weights and a resumed run's teachers checked against them
    teacher_ids = teacher_sources(cfg, data, teacher_small, device, resume, bridge=parts is not None)

    # 2. The run directory and its records (config.json, train.log, metrics.jsonl, checkpoints, wandb); loaders.
    records = open_records(cfg, run_dir, resume, teacher_ids)
    announce(cfg, run_dir, device, data)
    loaders = build_loaders(cfg, data, device)
    # stage 0 fits the teachers on the teacher-fit part, phase A trains on the bridge part (both: all without a split)
    fit_loaders, bridge_loaders = split_loaders(cfg, data, parts, loaders, device) if parts else (loaders, loaders)
    progress = RunProgress(
        planned_steps(cfg, loaders, bridge_loaders), cfg.run.log_every, num_stages=cfg.asmb.num_stages * asmb
    )
    clock = StepClock(records.ckpt.resume_step, progress)
    ctx = RunContext(cfg, data, loaders, make_runtime(cfg, device, clock), records.logger, records.ckpt)
    summary = start_summary(cfg, data, run_dir, parts)
    records.started = time.time()

    # 3. Stage 0 (teachers, fine-tuned when not cached), then the method's training.
    teachers = []
    if spec.uses_teachers:  # the teachers' time and accuracies are reported apart from the student's
        adapter_dim = cfg.asmb.teacher_adapter_dim if asmb and cfg.asmb.teacher_freeze == "adapter" else 0
        teachers, waited = stage0_teachers(
            ctx, parts[0] if parts else data, fit_loaders, teacher_small, teacher_ids, adapter_dim
        )
        summary.update(teacher_summary(records, cfg.teachers.models, teachers, loaders["test"], device, waited))
    if asmb:
        summary.update(train_asmb(ctx, student, [t for t, _ in teachers], asmb_modules, bridge_loaders))
    elif spec.family != "teacher":
        chosen = [t for t, _ in teachers] if spec.multi_teacher else select_teachers(cfg.teachers.select, teachers)
        summary.update(train_single(ctx, student, chosen))
    return close_records(records, summary, teacher_run=spec.family == "teacher")  # summary.json, wandb, printed


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
    s = cfg.student
    student = create_model(s.model, data.num_classes, small_input=small_input, **s.model_options())
    if s.weights:
        say(weights_line(f"student {s.model}", s.weights, student))
    apply_freeze(student, s.freeze)
    if resume is not None and resume["phase"] == cfg.method:
        check_meta(student.meta(), resume["meta"], f"resume checkpoint {cfg.run.resume}")
        check_shapes(student, resume["model"], f"resume checkpoint {cfg.run.resume}", same_keys=True)
    return student


def weights_line(who: str, path: str, model: KDModel) -> str:
    """The one line a model started from a weight file prints: the file and what was re-initialised."""
    return f"{who}: weights {path}" + "".join(f"; {note}" for note in model.weights_notes)


def make_runtime(cfg: Config, device: torch.device, clock: StepClock | None = None) -> Runtime:
    """What every phase steps with: --run.amp, --teachers.precision, --run.channels-last, --optim.grad-clip-norm."""
    amp, teacher_dtype = resolve_amp(cfg.run.amp, device), resolve_teacher_dtype(cfg.teachers.precision, device)
    clock = clock or StepClock(progress=RunProgress())
    return Runtime(device, amp, teacher_dtype, cfg.run.channels_last, cfg.optim.grad_clip_norm, clock, cfg.run.seed)


# ---- Data ----------------------------------------------------------------------------------------
def load_data(cfg: Config):
    data = load_dataset(cfg.data)  # kd.data.build_data from the --data.* flags
    if len(data.train) < cfg.data.batch_size:
        raise ConfigError(
            f"--data.batch-size {cfg.data.batch_size} is larger than the training split ({len(data.train)})"
        )
    return data


def build_loaders(cfg: Config, data, device: torch.device, train_only: bool = False) -> dict[str, Any]:
    """Device-resident loaders for tensor-backed data (--data.loader auto/fast, no RandAugment), else DataLoaders.
    `train_only`: the training loader alone (of a part of the training split)."""
    loaders = make_loaders(data, cfg.data, seed=cfg.run.seed, device=device, train_only=train_only)
    if isinstance(loaders["train"], DeviceLoader) and not train_only:
        say(f"data: device-resident loader on {device} (--data.loader {cfg.data.loader})")
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
        raise ConfigError(
            f"--asmb.bridge-split {fraction}: class {data.class_names[c]} has "
            f"{int((labels == c).sum())} training image(s), none left for the bridge part (each class "
            "needs 2)"
        )
    for name, idx in (("bridge", bridge_idx), ("teacher-fit", fit_idx)):
        if len(idx) < cfg.data.batch_size:
            raise ConfigError(
                f"--asmb.bridge-split {fraction}: the {name} part has {len(idx)} images, fewer than "
                f"--data.batch-size {cfg.data.batch_size}"
            )
    return train_subset(data, fit_idx), train_subset(data, bridge_idx)


def split_loaders(cfg: Config, data, parts, loaders, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """--asmb.bridge-split: the loaders of stage 0 (the teacher-fit part's training loader) and of phase A (the
    bridge part's); validation and test as the run's."""
    fit_loaders, bridge_loaders = (
        {**loaders, "train": build_loaders(cfg, part, device, train_only=True)["train"]} for part in parts
    )
    say(
        f"bridge split {cfg.asmb.bridge_split}: the teachers fit {len(parts[0].train)} training images, phase A "
        f"trains on the other {len(parts[1].train)} (the bridge part), phase B on all {len(data.train)}"
    )
    return fit_loaders, bridge_loaders


def steps_per_epoch(cfg: Config, loader) -> int:
    """Optimisation steps per epoch: the loader's batches, or --run.max-steps-per-epoch when smaller."""
    return min(len(loader), cfg.run.max_steps_per_epoch) if cfg.run.max_steps_per_epoch else len(loader)


# ---- Stage 0: teachers (fine-tuned once per identity: what made them, then cached; kd/teachers.py)
def stage0_teachers(
    ctx: RunContext, data, loaders, small_input: bool, identities: list[dict[str, Any]], adapter_dim: int = 0
) -> tuple[list[tuple[KDModel, float]], float]:
    """Every configured teacher, frozen and in eval mode, with its validation accuracy (from --teachers.checkpoints,
    else from the cache, fine-tuning what is missing), and the seconds spent waiting for another process's
    fine-tuning (not this run's teacher time). `adapter_dim` > 0: each gets a new zero-initialised residual adapter
    (ASMB's teacher_freeze adapter). `data`, `loaders`: what the teachers fit (--asmb.bridge-split's part)."""
    t, device = ctx.cfg.teachers, ctx.runtime.device
    paths = [Path(p) for p in t.checkpoints] or [teacher_cache_path(t.cache_dir, i) for i in identities]
    waited = 0.0
    if not t.checkpoints:  # fine-tune the missing ones and the one a resumed run was fine-tuning (it continues)
        redo = [i for i, arch in enumerate(t.models) if ctx.ckpt.pending_phase() == f"teacher:{arch}"]
        finetune = lambda i: finetune_teacher(ctx, i, paths[i], identities[i], data, loaders, small_input)
        waited = fill_cache(paths, finetune, redo, locked=DIST.world_size == 1)
    teachers = []
    for arch, identity, path in zip(t.models, identities, paths):
        model, val_acc = load_teacher(
            path, arch, data.num_classes, small_input, t.image_size or None, adapter_dim, identity["input"], identity
        )
        model = prepare(model, ctx.cfg, device, inference=True)
        teachers.append((model, evaluate_acc(model, loaders["val"], device) if val_acc is None else val_acc))
    return teachers, waited


def finetune_teacher(
    ctx: RunContext, i: int, path: Path, identity: dict[str, Any], data, loaders, small_input: bool
) -> None:
    """Fine-tune teacher `i` of --teachers with cross-entropy (phase `teacher:<arch>`, resumable), select it by
    validation accuracy and cache it at `path` with its identity. Its init and data order come from
    teacher_seed(identity); it starts from timm's hub weights (--teachers.pretrained), its --teachers.weights file,
    or from scratch."""
    cfg, t, device = ctx.cfg, ctx.cfg.teachers, ctx.runtime.device
    arch, weights, steps = t.models[i], t.weights[i] if t.weights else "", steps_per_epoch(cfg, loaders["train"])
    say(f"stage 0: fine-tuning teacher {arch} for {t.epochs} epochs -> {path}")
    ctx.runtime.clock.progress.plan(t.epochs * steps)
    seed_everything(teacher_seed(identity))
    start = dict(pretrained=t.pretrained, weights=weights or None)  # timm's hub weights, a local file or nothing
    model = create_model(arch, data.num_classes, small_input=small_input, img_size=t.image_size or None, **start)
    if weights:
        say(weights_line(f"teacher {arch}", weights, model))
    if identity["input"] is not None:
        model.set_input_transform(**identity["input"])
    model = prepare(model, cfg, device)
    method = build_method("ce", None, model, [], data, t.label_smoothing)
    optimizer = optimizer_for([model], cfg.optim, t.lr, device)
    scheduler = build_scheduler(optimizer, cfg.optim, t.epochs, steps)
    mixer = build_mixer(data.num_classes, *cfg.optim.mix_alphas(distill=False))
    # its phase is seeded from the teacher's own seed, not --run.seed; best.pt is the student's
    tr = Trainer(model, method, [], optimizer, scheduler, ctx.runtime, steps, mixer, seed=teacher_seed(identity))
    tr.save_best = False
    best = fit(ctx, tr, loaders, t.epochs, f"teacher:{arch}").best
    if DIST.main:
        save_teacher(path, model, best["state"], best["acc"], identity)
    barrier()  # the other ranks load the teacher from the cache rank 0 just wrote


def prepare(model: KDModel, cfg: Config, device: torch.device, inference: bool = False) -> KDModel:
    """On the device, compiled as --run.compile / --teachers.compile ask (kd.engine.device.prepare_model)."""
    r, frozen_compile = cfg.run, cfg.teachers.compile and cfg.spec.family not in ("asmb", "teacher")
    options = dict(channels_last=r.channels_last, compile=r.compile, sync_bn=r.sync_bn, frozen_compile=frozen_compile)
    return prepare_model(model, device, inference=inference, **options)


# ---- Single-stage training: ce and the baselines (one student, frozen teachers) ------------------
def train_single(ctx: RunContext, student: KDModel, teachers: list[KDModel]) -> dict[str, Any]:
    cfg, loaders = ctx.cfg, ctx.loaders
    tr = single_trainer(cfg, ctx.data, ctx.runtime, student, teachers, steps_per_epoch(cfg, loaders["train"]))
    say(freeze_report({"student": tr.model, "method": tr.method, **{f"teacher {t.arch}": t for t in teachers}}))
    best = fit(ctx, tr, loaders, cfg.optim.epochs, cfg.method).best
    return test_summary(tr.model, best, loaders, tr.device, ctx.logger)


def single_trainer(
    cfg: Config, data, runtime: Runtime, student: KDModel, teachers: list[KDModel], steps: int
) -> Trainer:
    """The student on its device, the method (its loss terms and auxiliary modules) and their Trainer."""
    o, options = cfg.optim, getattr(cfg, cfg.method, None)  # the method's own options: --<method>.*
    student = prepare(student, cfg, runtime.device)
    method = build_method(cfg.method, options, student, teachers, data, o.label_smoothing).to(runtime.device)
    optimizer = optimizer_for([student, method], o, o.lr, runtime.device)
    mixer = build_mixer(data.num_classes, *o.mix_alphas(distill=bool(teachers)))
    scheduler = build_scheduler(optimizer, o, o.epochs, steps)
    return Trainer(student, method, teachers, optimizer, scheduler, runtime, steps, mixer, cfg.student.freeze)


def test_summary(student: KDModel, best: dict[str, Any], loaders, device, logger: RunLogger) -> dict[str, Any]:
    """Test accuracy of the last and of the selected (best validation) student; the test split only reports."""
    last = dict(
        zip(("last/test_acc", "last/test_acc5"), evaluate_top1_top5(student, loaders["test"], device)),
        **{"last/val_acc": next(r["val/acc"] for r in reversed(logger.rows) if "val/acc" in r)},
    )
    student.load_state_dict(best["state"])
    best_test = dict(zip(("best/test_acc", "best/test_acc5"), evaluate_top1_top5(student, loaders["test"], device)))
    return {**last, **best_test, "best/val_acc": best["acc"], "best/epoch": best["epoch"]}


# ---- ASMB (docs/asmb.md): stage 0 (both teachers), then num_stages x (phase A: the teachers' trainable part +
# MBM + head learn the synergy; phase B: the student distils from it). The pieces live in kd/asmb.py; each
# phase is an ordinary Trainer run by fit(), its optimiser and schedule built once for all stages.
def train_asmb(ctx: RunContext, student: KDModel, teachers: list[KDModel], modules: AsmbModules, bridge_loaders):
    """The ASMB stages after stage 0; returns the summary entries. Selection: the best student by validation
    accuracy over every phase-B epoch of every stage (best.pt); the test split only reports. Phase A trains on
    `bridge_loaders["train"]` (--asmb.bridge-split's bridge part, else the whole training split), phase B on
    `loaders["train"]`."""
    cfg, loaders, logger, ckpt, device = ctx.cfg, ctx.loaders, ctx.logger, ctx.ckpt, ctx.runtime.device
    for teacher in teachers:
        apply_freeze(teacher, cfg.asmb.teacher_freeze)  # partly trainable; modes are set per phase
    steps, steps_a = steps_per_epoch(cfg, loaders["train"]), steps_per_epoch(cfg, bridge_loaders["train"])
    student = prepare(student, cfg, device)
    run = build_asmb_run(cfg, ctx.runtime, student, teachers, modules, steps, ctx.data.num_classes, steps_a)
    trained = {f"teacher {t.arch} ({cfg.asmb.teacher_freeze})": t for t in teachers}
    say(freeze_report({"student": student, **trained, "MBM + head": run.bridge, "projections": run.distill}))
    # A resumed run skips the phases before its checkpoint's; fit() restores that one (and, via Trainer.extra, all).
    phases = run.phases()  # (stage, tag, global epoch before it): A then B per stage
    tags = [tag for _, tag, _ in phases]
    resume_at = tags.index(ckpt.pending_phase()) if ckpt.pending_phase() in tags else 0
    guard_on = cfg.asmb.residual_guard and cfg.asmb.ensemble_base  # without the base there is no residual to reset
    fired = 0
    for stage, tag, epoch in phases[resume_at:]:
        run.stage = stage
        if tag.startswith("asmb:A"):
            fit(ctx, run.phase_a, bridge_loaders, run.teacher_epochs, tag, epoch)
            if guard_on and (line := guard_residual(run.synergy, loaders["val"], stage, device)):
                say(line)
                fired = 1
            continue
        prior = {**run.best, "epoch": run.best["epoch"] - epoch}  # fit() counts epochs from its offset
        best = fit(ctx, run.phase_b, loaders, run.student_epochs, tag, epoch, prior).best
        run.best = {**best, "epoch": epoch + best["epoch"]}
        metrics = stage_metrics(run.synergy, loaders["val"], device)
        guard = {"guard/fired": fired} if guard_on else {}
        logger.log({"phase": "asmb:stage", "stage": stage, "epoch": epoch + run.student_epochs, **metrics, **guard})
        say(f"[asmb stage {stage}/{run.num_stages}] " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        if warning := synergy_warning(stage, metrics):
            say(warning)
        fired = 0
    test = stage_metrics(run.synergy, loaders["test"], device)
    # ensemble/test_acc stays the teachers' as stage 0 left them (as for every method); the adapted ones apart
    firings = [r["guard/fired"] for r in logger.rows if r.get("phase") == "asmb:stage" and "guard/fired" in r]
    # best/epoch counts the student's training epochs (phase B), as for every method; the row's epoch is global
    summary = {"synergy/test_acc": test["synergy/acc"], "adapted_ensemble/test_acc": test["ensemble/acc"]}
    summary.update({"asmb/guard_fired": sum(firings)} if guard_on else {})
    summary.update(test_summary(student, run.best, loaders, device, logger))
    return {
        **summary,
        "best/epoch": run.distill.student_epoch(run.best["epoch"]),
        "best/global_epoch": run.best["epoch"],
    }


def build_asmb_run(cfg: Config, runtime: Runtime, student, teachers, modules, steps: int, classes: int, steps_a=0):
    """ASMB's models and progress (kd.asmb.AsmbRun) and its two phase trainers, built once and persisting across
    stages: phase A trains the synergy model (each teacher's trainable part + MBM + head) by Adam, validated as
    val/synergy_acc, without MixUp/CutMix; phase B trains the student (+ projections) with --optim's optimiser,
    scheduled over all phase-B epochs. Both carry the run as Trainer.extra: every checkpoint holds all of it.
    `steps`: phase B's steps per epoch; `steps_a`: phase A's (its training part, --asmb.bridge-split), default
    `steps`."""
    a, o, device = cfg.asmb, cfg.optim, runtime.device
    frozen_student = FrozenModel(student, runtime.teacher_dtype)  # phase A's query
    run = AsmbRun(a, student, teachers, modules, device, classes, o.epochs, o.label_smoothing)
    steps_a = steps_a or steps
    adam = torch.optim.Adam(run.adapt_param_groups(), **fused_kwargs(device))
    settings_a = dataclasses.replace(o, schedule=a.teacher_schedule, warmup_epochs=0.0)
    schedule_a = build_scheduler(adam, settings_a, a.num_stages * run.teacher_epochs, steps_a)
    adapt_step = TeacherAdaptStep(frozen_student, teachers, run.bridge, run.adapt)
    run.phase_a = Trainer(run.synergy, run.adapt, [], adam, schedule_a, runtime, steps_a, step_module=adapt_step)
    run.phase_a.save_best, run.phase_a.val_key = False, "synergy_acc"  # best.pt is the student's
    optimizer = optimizer_for([student, run.distill], o, o.lr, device)
    schedule_b = build_scheduler(optimizer, o, a.num_stages * run.student_epochs, steps)
    mixer = build_mixer(classes, *o.mix_alphas(distill=True))
    run.phase_b = Trainer(
        student, run.distill, teachers, optimizer, schedule_b, runtime, steps, mixer, cfg.student.freeze
    )
    run.phase_a.extra = run.phase_b.extra = run
    return run


# ---- The trainer, fit() and the step -------------------------------------------------------------
def optimizer_for(modules: list[nn.Module], o: OptimCfg, lr: float, device: torch.device):
    return build_optimizer([p for m in modules for p in m.parameters() if p.requires_grad], o, lr, device)


def fit(ctx: RunContext, tr: Trainer, loaders, epochs: int, tag: str, epoch_offset: int = 0, best=None) -> FitState:
    """Train for `epochs` after global epoch `epoch_offset`, validate every epoch, keep the best weights by
    validation accuracy (and in checkpoints/best.pt when tr.save_best); continues exactly when the run resumes
    from a checkpoint of this phase (`tag`). `best`: the best so far of earlier fits ({"acc", "epoch" relative to
    epoch_offset, "state"}), so selection spans them (ASMB's stages). Returns the finished FitState."""
    ckpt, save_best = ctx.ckpt, tr.save_best
    fs = FitState(tr, tag, loaders["train"], epoch_offset)
    fs.best = dict(best) if best else fs.best
    resumed = ckpt.take(tag)
    start_rng = fs.load_state_dict(resumed) if resumed is not None else None
    if resumed is None:  # a fresh phase: RNGs and data order from (seed, phase name) only
        seed = phase_seed(tr.seed, tag)
        seed_everything(seed)
        reseed_loader(fs.loader, seed)
    if save_best and fs.best["state"] is not None:  # best.pt may be ahead of the checkpoint (an earlier phase's, or
        # an abandoned branch's after a resume from an older step file): make them agree
        ckpt.save_best(tr.model.meta(), fs.best["state"], fs.best["acc"], epoch_offset + fs.best["epoch"])
    for e in range(fs.epochs_done + 1, epochs + 1):
        start, epoch = time.time(), epoch_offset + e
        terms = train_epoch(fs, epoch, f"{tag} {e}/{epochs}", ckpt, start_rng)
        start_rng, fs.epochs_done = None, e
        val = rank0_values(*evaluate_top1_top5(tr.model, loaders["val"], tr.device))  # every rank agrees
        if val[0] > fs.best["acc"]:
            fs.keep_best(val[0], e)
            if save_best:
                ckpt.save_best(tr.model.meta(), fs.best["state"], val[0], epoch)
        ctx.logger.log_epoch(fs, e, epochs, terms, val, tr.val_key, start)
        ckpt.save(tr.runtime.clock.steps, tag, fs.state_dict, epoch_end=True)
    return fs


def train_epoch(
    fs: FitState, epoch: int, desc: str, ckpt: Checkpointer, start_rng: dict[str, Any] | None = None
) -> dict[str, float]:
    """One epoch (the trainer's steps_per_epoch steps), or the rest of one when fs.tracker holds a resumed
    mid-epoch state (`start_rng`: its RNG states). The checkpointer is called after every step but the last (the
    epoch-end checkpoint follows validation). Returns the mean loss terms (one host sync); raises
    TrainingDiverged."""
    tr, clock = fs.trainer, fs.trainer.runtime.clock
    set_train(tr.model, tr.freeze_policy)
    tr.method.train()
    fs.tracker = fs.tracker or LossTracker()
    batches = iter(fs.loader)
    if start_rng is not None:  # after iter(): a DataLoader draws its worker seed there, as it did before the kill
        set_rng_state(start_rng)
    steps, tracker = tr.steps_per_epoch, fs.tracker
    for x, y, index in clock.progress.epoch_batches(batches, steps, tracker.n, clock.steps, desc, tracker.running_loss):
        x, y, index = (t.to(tr.device, non_blocking=True) for t in (x, y, index))
        clock.steps += 1
        tracker.add(train_step(tr, x, y, index, epoch), clock.steps)
        if tracker.n < steps:
            ckpt.save(clock.steps, fs.tag, fs.state_dict)
    tracker.check(f"epoch {epoch} ({fs.tag})")
    terms, fs.tracker = tracker.means(), None
    clock.progress.epoch.stop()  # after the loss was read (the device is done): img/s counts training time only
    return terms


def train_step(tr: Trainer, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> dict[str, Tensor]:
    """One optimisation step; returns the detached loss terms (no host sync)."""
    rt = tr.runtime
    if tr.mixer is not None:
        x, y = tr.mixer(x, y)  # teachers and student see the same mixed batch
    if rt.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None):
        # the frozen teachers' outputs, once per batch (none for CE, stage 0 and ASMB's phase A, whose teachers train)
        maps = tr.method.needs_maps
        t_outs = frozen_forward(tr.teachers, x, with_maps=maps, dtype=rt.teacher_dtype) if tr.teachers else []
        terms = tr.step_module(x, y, index, epoch, t_outs)
        loss = tr.method.total_loss(terms, epoch)  # zero-weight terms left out of the graph
    tr.optimizer.zero_grad(set_to_none=True)
    tr.scaler.scale(loss).backward()
    if rt.grad_clip_norm > 0:
        tr.scaler.unscale_(tr.optimizer)
        params = [p for g in tr.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, rt.grad_clip_norm)
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    tr.scheduler.step()
    return {"loss": loss.detach(), **{k: v.detach().float() for k, v in terms.items()}}


if __name__ == "__main__":
    sys.exit(main())
