"""Train a model with any kd method: teacher fine-tuning, single-stage baselines, or multi-stage ASMB.

    python train.py --preset smoke --method kd          # tiny models, synthetic data, CPU, minutes
    python train.py --method kd --data.dataset cifar100 --student.model resnet8x4 --teachers resnet32x4
    python train.py --help                               # every option, its default and meaning

Order of work (read top to bottom): config -> validate -> data -> models (teachers from the cache, fine-tuned
first when missing) -> method -> epochs of (train, validate, checkpoint) -> test of the selected and the
last model -> summary. Outputs go to runs/<name>/ (see README "Outputs").
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import random
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal

import numpy as np
import timm
import torch
import tyro
from torch import Tensor, nn
from tqdm import tqdm

from kd.data import SyntheticSpec, build_data, make_loader
from kd.asmb import (AsmbCfg, AsmbDistill, AsmbAdapt, AsmbModules, SynergyModel, TeacherAdaptStep, adapted_keys,
                     build_asmb_modules, guard_residual, stage_metrics, synergy_warning,
                     temperature_table)
from kd.errors import CheckpointError, ConfigError, KDError
from kd.fastloader import DeviceLoader
from kd.io import atomic_link, atomic_torch_save, atomic_write_json, atomic_write_text, safe_torch_load
from kd.methods import METHODS, Method, StepInputs
from kd.methods import ATCfg, CRDCfg, DISTCfg, DKDCfg, FitNetCfg, PKTCfg, RKDCfg, SPCfg
from kd.methods.kd import KDCfg
from kd.freeze import apply_freeze, freeze_report, set_train
from kd.metrics import evaluate_acc
from kd.mix import build_mixer
from kd.models import KDModel, check_meta, create_model

METHOD_NAMES = Literal["teacher", "ce", "kd", "fitnet", "at", "dkd", "crd", "rkd", "pkt", "sp", "dist", "asmb"]


# ----------------------------------------------------------------------------------------------
# Config: every field is a CLI flag (`--group.field`); the docstring under it is its --help line.
# ----------------------------------------------------------------------------------------------
@dataclass
class DataCfg:
    dataset: Literal["synthetic", "cifar100", "imagefolder", "tiny-imagenet"] = "cifar100"
    """which dataset: synthetic (built in), cifar100 (downloaded to root), imagefolder (root/train, root/val), tiny-imagenet (folder or archive)."""
    root: str = "data"
    """where the dataset lives (or is downloaded to); for tiny-imagenet the folder or its .zip/.tar.gz."""
    val_fraction: float = 0.1
    """share of the training set held out (stratified, seeded) as the validation split used for model selection."""
    image_size: int = 0
    """resize images to this size (0 = the dataset's native size)."""
    aug: bool = True
    """training augmentation: random crop with padding + horizontal flip (RandomResizedCrop for imagefolder)."""
    batch_size: int = 64
    """global training batch size."""
    eval_batch_size: int = 256
    """batch size for validation and test."""
    workers: int = 2
    """DataLoader worker processes (0 = load in the main process)."""
    loader: Literal["auto", "fast", "torch"] = "auto"
    """fast = the dataset lives on the training device and batches are augmented there (tensor-backed data only);
    torch = a DataLoader with workers; auto = fast for synthetic/cifar100/tiny-imagenet without RandAugment."""
    randaugment: tuple[int, int] = (0, 0)
    """RandAugment N ops of magnitude M (0..30) added to the training augmentation (0 0 = off; DataLoader path)."""
    synthetic_classes: int = 10
    """synthetic data: number of classes."""
    synthetic_train_size: int = 5000
    """synthetic data: training images (before the validation split)."""
    synthetic_test_size: int = 1000
    """synthetic data: test images."""
    synthetic_image_size: int = 32
    """synthetic data: image side in pixels."""


@dataclass
class StudentCfg:
    model: str = "convnext_tiny"
    """student architecture: any timm model name or a kd zoo name (resnet8x4, wrn_16_2, ...)."""
    pretrained: bool = False
    """start the student from timm's ImageNet weights (needs them online or in the local timm cache)."""
    checkpoint: str = ""
    """start the student from this local checkpoint instead."""
    small_input: Literal["auto", "on", "off"] = "auto"
    """adapt the stem for 32/64 px inputs; auto = on when images are <= 64 px."""
    drop_rate: float = 0.0
    """dropout before the classifier."""
    freeze: Literal["none", "head", "bn_head", "adapter", "last_block"] = "none"
    """what of the student trains: none (everything), head, bn_head (norm affines + head), adapter (+ head), last_block (+ head)."""
    adapter_dim: int = 0
    """residual bottleneck MLP (D -> N -> D, zero-initialised) on the student's pooled feature; 0 = off."""


@dataclass
class TeachersCfg:
    models: Annotated[tuple[str, ...], tyro.conf.arg(aliases=("--teachers",))] = ("resnet152", "efficientnet_b2")
    """teacher architectures (timm or zoo names); also accepts one comma-separated string."""
    checkpoints: tuple[str, ...] = ()
    """fine-tuned teacher checkpoints, one per model; empty = use the cache (fine-tuning what is missing)."""
    pretrained: bool = True
    """fine-tune teachers from timm's ImageNet weights (needs them online or in the local timm cache)."""
    cache_dir: str = "runs/teacher_cache"
    """where fine-tuned teachers are cached (the name records dataset, arch, stem, classes, seed, data hash)."""
    select: Literal["best", "0", "1", "both"] = "best"
    """teacher(s) a single-teacher baseline distils from: best by val accuracy, by position, or both averaged."""
    epochs: int = 30
    """teacher fine-tuning epochs (stage 0)."""
    lr: float = 0.01
    """teacher fine-tuning learning rate (optimiser and schedule as in --optim)."""
    label_smoothing: float = 0.0
    """label smoothing for teacher fine-tuning."""
    image_size: int = 0
    """teachers see the batch resized to this size inside their wrapper (0 = the student's size)."""


@dataclass
class OptimCfg:
    name: Literal["sgd", "adamw"] = "sgd"
    """optimiser of the trained model."""
    lr: float = 0.05
    """base learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    weight_decay: float = 5e-4
    """weight decay."""
    epochs: int = 240
    """training epochs of the student."""
    schedule: Literal["cosine", "multistep", "constant"] = "multistep"
    """learning-rate schedule (stepped every iteration)."""
    milestones: tuple[int, ...] = (150, 180, 210)
    """multistep: epochs at which the lr is multiplied by gamma."""
    gamma: float = 0.1
    """multistep: lr decay factor."""
    warmup_epochs: float = 0.0
    """linear warm-up epochs from ~0 to lr."""
    label_smoothing: float = 0.0
    """label smoothing of every cross-entropy on labels."""
    mixup_alpha: float = 0.0
    """MixUp Beta(alpha, alpha) on training batches (0 = off)."""
    cutmix_alpha: float = 0.0
    """CutMix Beta(alpha, alpha) on training batches (0 = off); wins over MixUp when both are > 0."""
    cutmix_alpha_distill: float = 0.0
    """CutMix alpha of distillation training (methods with teachers); > 0 replaces --optim.cutmix-alpha there."""
    grad_clip_norm: float = 0.0
    """clip the gradient norm to this value (0 = off)."""


@dataclass
class RunCfg:
    name: str = ""
    """run directory name under out_dir (default: <method>-<student>-<dataset>-<time>)."""
    out_dir: str = "runs"
    """parent directory of run directories."""
    overwrite: bool = False
    """replace an existing run directory of the same name."""
    seed: int = 0
    """seed for python, numpy, torch and the data order and split."""
    deterministic: bool = False
    """use deterministic algorithms (slower on GPU)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where to train: auto = cuda when available."""
    amp: Literal["off", "fp16", "bf16"] = "off"
    """mixed precision: fp16 (with a GradScaler, CUDA only) or bf16."""
    channels_last: bool = True
    """use the channels_last memory layout for the models and inputs (faster convolutions; False = NCHW)."""
    compile: bool = False
    """torch.compile the student (and teachers separately)."""
    max_steps_per_epoch: int = 0
    """stop each epoch after this many steps (0 = full epoch); for quick checks."""
    resume: str = ""
    """continue a run exactly: a checkpoint file, a run directory, or auto (the latest checkpoint of
    --run.name's directory when there is one, else a fresh start: one command line for pre-emptible jobs)."""
    ckpt_every_steps: int = 0
    """also checkpoint every N optimisation steps, mid-epoch (0 = at epoch ends only)."""
    keep_last: int = 2
    """how many step checkpoints (checkpoints/step-*.pt) to keep besides best.pt and last.pt."""
    sync_bn: bool = False
    """with several processes (torchrun), convert BatchNorm to SyncBatchNorm (CUDA only)."""


@dataclass
class WandbCfg:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto = online when credentials exist (falling back to offline without network), else disabled."""
    project: str = "kd"
    """wandb project."""
    entity: str = ""
    """wandb entity (team or user); empty = your default."""
    group: str = ""
    """wandb group."""
    tags: tuple[str, ...] = ()
    """wandb tags."""


@dataclass
class Config:
    """Knowledge distillation with kd. Every option below is `--group.option VALUE`; booleans take True/False."""

    method: METHOD_NAMES = "kd"
    """what to train: teacher (fine-tune the teachers), ce (student alone), kd, ..., asmb (two-teacher ASMB, see --asmb.*)."""
    preset: Literal["none", "smoke"] = "none"
    """start from a preset (smoke: tiny models and synthetic data, a few CPU minutes); flags override it."""
    data: DataCfg = field(default_factory=DataCfg)
    student: StudentCfg = field(default_factory=StudentCfg)
    teachers: TeachersCfg = field(default_factory=TeachersCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    run: RunCfg = field(default_factory=RunCfg)
    wandb: WandbCfg = field(default_factory=WandbCfg)
    kd: KDCfg = field(default_factory=KDCfg)
    fitnet: FitNetCfg = field(default_factory=FitNetCfg)
    at: ATCfg = field(default_factory=ATCfg)
    dkd: DKDCfg = field(default_factory=DKDCfg)
    crd: CRDCfg = field(default_factory=CRDCfg)
    rkd: RKDCfg = field(default_factory=RKDCfg)
    pkt: PKTCfg = field(default_factory=PKTCfg)
    sp: SPCfg = field(default_factory=SPCfg)
    dist: DISTCfg = field(default_factory=DISTCfg)
    asmb: AsmbCfg = field(default_factory=AsmbCfg)


def smoke_preset() -> Config:
    """Tiny zoo models on built-in synthetic data: the whole pipeline in a few CPU minutes."""
    cfg = Config(preset="smoke")
    cfg.data = DataCfg(dataset="synthetic", batch_size=64, workers=0, synthetic_train_size=2000,
                       synthetic_test_size=500)
    cfg.student = StudentCfg(model="resnet8")
    cfg.teachers = TeachersCfg(models=("resnet20", "wrn_16_2"), pretrained=False, epochs=3, lr=0.05)
    cfg.optim = OptimCfg(lr=0.05, epochs=3, schedule="cosine", milestones=())
    cfg.asmb = AsmbCfg(num_stages=2, teacher_epochs=1, student_epochs=2)
    return cfg


PRESETS = {"none": Config, "smoke": smoke_preset}


def parse_config(argv: list[str]) -> Config:
    """Parse argv with tyro on top of the chosen preset. Booleans take explicit values so wandb agents'
    `--flag=True` works; `--teachers a,b` is split on commas."""
    preset = "none"
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            cfg = tyro.cli(Config, args=argv, default=PRESETS[preset](), description=__doc__.split("\n\n")[0],
                           config=(tyro.conf.FlagConversionOff,))
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise ConfigError(first_message(captured.getvalue())) from None
    cfg.teachers.models = tuple(m.strip() for s in cfg.teachers.models for m in s.split(",") if m.strip())
    return cfg


def first_message(tyro_error: str) -> str:
    """tyro reports a bad flag in a multi-line box; keep its message (the lines before the first rule)."""
    lines = []
    for raw in tyro_error.splitlines():
        line = raw.strip().strip("│╭╮╰╯").strip()
        if line.startswith("─") or not line:
            if lines:
                break
            continue
        if raw.lstrip().startswith("╭"):
            continue  # the box title ("Invalid choice"): the message below says it better
        lines.append(line)
    return " ".join(lines) or "invalid command line (see --help)"


def validate(cfg: Config) -> None:
    """Reject bad values before any work (ConfigError -> one line, exit 2)."""

    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for group in (cfg.data, cfg.student, cfg.teachers, cfg.optim, cfg.run, getattr(cfg, cfg.method, None)):
        if group is None or not dataclasses.is_dataclass(group):
            continue
        for f in dataclasses.fields(group):
            v = getattr(group, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"--{_group_name(cfg, group)}.{f.name.replace('_', '-')} must be finite, got {v}")
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0 and f.name != "seed":
                raise ConfigError(f"--{_group_name(cfg, group)}.{f.name.replace('_', '-')} must be >= 0, got {v}")
    method_group = getattr(cfg, cfg.method, None)
    if hasattr(method_group, "check"):
        method_group.check()  # the method's own range checks (e.g. temperature > 0)
    check(0.0 < cfg.data.val_fraction < 1.0, f"--data.val-fraction must be in (0, 1), got {cfg.data.val_fraction}")
    check(cfg.data.batch_size > 0, "--data.batch-size must be > 0")
    check(cfg.data.eval_batch_size > 0, "--data.eval-batch-size must be > 0")
    check(cfg.student.drop_rate < 1, f"--student.drop-rate must be < 1, got {cfg.student.drop_rate}")
    check(cfg.optim.lr > 0, f"--optim.lr must be > 0, got {cfg.optim.lr}")
    check(cfg.optim.epochs > 0, "--optim.epochs must be > 0")
    check(cfg.teachers.epochs > 0, "--teachers.epochs must be > 0")
    check(cfg.optim.label_smoothing < 1 and cfg.teachers.label_smoothing < 1, "label smoothing must be < 1")
    check(all(m > 0 for m in cfg.optim.milestones), "--optim.milestones must be positive epochs")
    check(cfg.optim.warmup_epochs < cfg.optim.epochs, "--optim.warmup-epochs must be < --optim.epochs")
    check(cfg.run.keep_last >= 1, "--run.keep-last must be >= 1")
    check(not (cfg.run.resume and cfg.run.overwrite), "--run.resume and --run.overwrite exclude each other")
    check(cfg.run.resume != "auto" or bool(cfg.run.name),
          "--run.resume auto needs --run.name (the run directory to continue)")
    if cfg.method != "ce":
        check(len(cfg.teachers.models) >= 1, "--teachers needs at least one model")
        check(not cfg.teachers.checkpoints or len(cfg.teachers.checkpoints) == len(cfg.teachers.models),
              f"--teachers.checkpoints has {len(cfg.teachers.checkpoints)} paths for "
              f"{len(cfg.teachers.models)} teachers")
        if cfg.teachers.select in ("0", "1"):
            check(int(cfg.teachers.select) < len(cfg.teachers.models),
                  f"--teachers.select {cfg.teachers.select} but only {len(cfg.teachers.models)} teacher(s)")
    if cfg.method == "asmb":
        check(len(cfg.teachers.models) == 2,
              f"--method asmb distils from two teachers, --teachers has {len(cfg.teachers.models)}")
    check(min(cfg.data.randaugment) >= 0 and cfg.data.randaugment[1] <= 30,
          f"--data.randaugment needs N >= 0 and M in [0, 30], got {' '.join(map(str, cfg.data.randaugment))}")
    if cfg.data.loader == "fast":
        check(cfg.data.dataset != "imagefolder", "--data.loader fast needs tensor-backed data (synthetic, cifar100, "
                                                 "tiny-imagenet), not imagefolder; use auto or torch")
        check(cfg.data.randaugment[0] == 0, "--data.loader fast does not do RandAugment; use auto or torch")
    if cfg.data.dataset != "synthetic":
        check(Path(cfg.data.root).exists() or cfg.data.dataset == "cifar100",
              f"data root {cfg.data.root} does not exist (--data.root)")


def _group_name(cfg: Config, group: Any) -> str:
    return next(f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is group)


# ----------------------------------------------------------------------------------------------
# Run directory and logging
# ----------------------------------------------------------------------------------------------
class RunLogger:
    """Per-epoch rows to metrics.jsonl (rewritten atomically) and, when enabled, to wandb.

    The wandb keys are the metrics.jsonl keys (README "Outputs"), except that stage-0 rows (phase
    `teacher:<arch>`) go to `teacher/<arch>/<key>`: teacher curves never mix into the student's
    `val/acc` history, which sweeps' early termination reads."""

    def __init__(self, run_dir: Path, cfg: Config, resume: dict[str, Any] | None = None):
        # A resumed run continues the checkpoint's rows (rows logged after that checkpoint are redone) and
        # its wandb run. Only rank 0 writes; other ranks keep the rows in memory.
        self.run_dir, self.rows, self.wandb = run_dir, list(resume["rows"]) if resume else [], None
        self.wandb_id: str | None = resume.get("wandb_id") if resume else None
        if resume and DIST.main:
            self._write_rows()
        mode = resolve_wandb_mode(cfg.wandb.mode)
        if mode != "disabled" and DIST.main:
            self.wandb = init_wandb(cfg, run_dir, mode, run_id=self.wandb_id)
            self.wandb_id = self.wandb.id

    def _write_rows(self) -> None:
        atomic_write_text("".join(json.dumps(r) + "\n" for r in self.rows), self.run_dir / "metrics.jsonl")

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if DIST.main:
            self._write_rows()
        if self.wandb is not None:
            self.wandb.log(wandb_row(row))

    def finish(self, summary: dict[str, Any]) -> None:
        if not DIST.main:
            return
        atomic_write_json(summary, self.run_dir / "summary.json")
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            best = self.run_dir / "checkpoints" / "best.pt"
            if not self.wandb.offline and best.is_file():
                log_best_checkpoint(self.wandb, best, summary)
            self.wandb.finish()


def wandb_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl row as wandb keys: numbers and strings as they are, stage-0 teacher rows prefixed."""
    row = {k: v for k, v in row.items() if isinstance(v, (int, float, str))}
    phase = str(row.get("phase", ""))
    if not phase.startswith("teacher:"):
        return row
    prefix = f"teacher/{phase.split(':', 1)[1]}/"
    return {k if k == "phase" else prefix + k: v for k, v in row.items()}


def log_best_checkpoint(run, path: Path, summary: dict[str, Any]) -> None:
    """Upload the selected model as a `model` artifact (online runs; offline runs keep it on disk only).
    A failed upload is reported and never fails the run."""
    import wandb

    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{run.name or run.id}-best")
    meta = {k: summary[k] for k in ("best/val_acc", "best/test_acc", "best/epoch", "method") if k in summary}
    try:
        artifact = wandb.Artifact(name, type="model", metadata=meta)
        artifact.add_file(str(path), name="best.pt")
        run.log_artifact(artifact, aliases=["best"])
    except Exception as e:  # network or quota trouble must not lose the finished run
        say(f"wandb: could not upload the best checkpoint ({type(e).__name__}: {e}); it stays at {path}")


def resolve_wandb_mode(mode: str) -> str:
    """auto = WANDB_MODE when set (WANDB_DISABLED=true -> disabled), else online when credentials exist
    (WANDB_API_KEY or a `wandb login` entry in ~/.netrc), else disabled. Explicit modes win."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    if os.environ.get("WANDB_MODE") in ("disabled", "offline", "online"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_credentials_present() else "disabled"


def wandb_credentials_present() -> bool:
    """An API key in the environment or a netrc entry for the wandb host (what `wandb login` writes)."""
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    return bool(os.environ.get("WANDB_API_KEY")) or host in _read(netrc)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def init_wandb(cfg: Config, run_dir: Path, mode: str, run_id: str | None = None):
    """A wandb run logging under run_dir/wandb/. Online falls back to offline (sync later with `wandb sync`)
    when the server is unreachable (a 3 s probe) or init takes over 20 s: no network never hangs a run.
    `run_id`: the run to continue (--run.resume)."""
    import wandb  # imported only when used: it is slow to import and kd/ never needs it

    kwargs = dict(project=cfg.wandb.project, entity=cfg.wandb.entity or None, group=cfg.wandb.group or None,
                  tags=list(cfg.wandb.tags) or None, name=run_dir.name, dir=str(run_dir), job_type=cfg.method,
                  config=dataclasses.asdict(cfg))
    if run_id:
        kwargs.update(id=run_id, resume="allow")
    if mode == "online" and not wandb_server_reachable():
        say(f"wandb server unreachable; logging offline under {run_dir}/wandb (upload later with `wandb sync`)")
        mode = "offline"
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=20), **kwargs)
    except Exception as e:  # no network: never block or fail the run
        if mode != "online":
            raise
        say(f"wandb online init failed ({type(e).__name__}); logging offline under {run_dir}/wandb")
        return wandb.init(mode="offline", **kwargs)


def wandb_server_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the wandb API host opens (online mode only)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s):
            return True
    except OSError:
        return False


def make_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or f"{cfg.method}-{cfg.student.model}-{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.run.out_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.run.overwrite and not cfg.run.resume:
        raise ConfigError(f"run directory {run_dir} exists; pass --run.resume auto to continue it, "
                          "--run.overwrite True to replace it, or another --run.name")
    return run_dir


def progress(it: Iterable, **kw) -> Iterable:
    """tqdm bar on a terminal (rank 0's), nothing when stdout is redirected."""
    return tqdm(it, disable=not (sys.stdout.isatty() and DIST.main), leave=False, dynamic_ncols=True, **kw)


def say(msg: str) -> None:
    if DIST.main:
        print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Devices, seeds, precision
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--run.device cuda but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", DIST.local_rank) if DIST.enabled else torch.device("cuda")
    return torch.device("cpu")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            say("note: --run.amp fp16 needs CUDA; training in float32 on CPU (use bf16 for CPU mixed precision)")
            return None
        return torch.float16
    return None


def rng_state() -> dict[str, Any]:
    """Every RNG state, in types that torch.load(weights_only=True) accepts (numpy's array as a tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
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


# ----------------------------------------------------------------------------------------------
# Several processes: `torchrun --nproc_per_node N train.py ...` runs DistributedDataParallel (NCCL on
# CUDA, gloo on CPU). Every rank trains on its slice of each global batch; rank 0 alone prints, logs,
# checkpoints and talks to wandb. All of it lives here and in LossTracker.reduced / gather_rng.
# ----------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


DIST = DistInfo()


def init_distributed(cfg: Config) -> None:
    """Join the process group when torchrun started several processes (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or torch.distributed.is_initialized():
        return
    DIST.rank, DIST.local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = cfg.run.device != "cpu" and torch.cuda.is_available()
    if cfg.data.batch_size % world:
        raise ConfigError(f"--data.batch-size {cfg.data.batch_size} (global) is not divisible by the {world} processes")
    if cfg.run.sync_bn and not cuda:
        raise ConfigError("--run.sync-bn True needs CUDA (SyncBatchNorm has no CPU implementation)")
    if cuda:
        torch.cuda.set_device(DIST.local_rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    DIST.world_size = world


def close_distributed() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    DIST.rank, DIST.world_size, DIST.local_rank = 0, 1, 0


def barrier() -> None:
    if DIST.enabled:
        torch.distributed.barrier()


def distribute(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around a phase's trained modules (the module itself with one process).
    Unused parameters are allowed (any method, any freeze policy); buffers are not broadcast, so
    BatchNorm statistics stay per rank (synchronised with --run.sync-bn) and rank 0's are saved."""
    if not DIST.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True, broadcast_buffers=False)


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------
def build_optimizer(params: list[nn.Parameter], o: OptimCfg, lr: float, device: torch.device):
    """SGD / AdamW, fused (one kernel over all parameters) on CPU and CUDA: on CPU 2-3x faster than the default
    per-parameter loop, which foreach is slower than (bench/step.py's optimiser rows, BENCHMARKS.md)."""
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay, **fused)


def build_scheduler(optimizer, o: OptimCfg, epochs: int, steps_per_epoch: int):
    """Per-iteration LambdaLR: linear warm-up, then cosine / multistep / constant over `epochs`."""
    warmup = o.warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        if o.schedule == "multistep":
            return o.gamma ** sum(step // steps_per_epoch >= m for m in o.milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------
@dataclass
class Trainer:
    """What one fit() trains: a model (the one selected and tested) plus a method (loss terms and
    auxiliary modules), with frozen teachers whose outputs are computed once per batch."""

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
    max_steps: int = 0
    freeze_policy: str = "none"  # the model's partial-freeze policy: frozen norm layers stay in eval
    seed: int = 0  # --run.seed: each phase reseeds from it (begin_phase)
    step_module: nn.Module | None = None  # model + method as one module; DDP-wrapped with several processes
    steps: int = 0  # optimisation steps of the whole run (fit() keeps it in step with the Checkpointer)
    extra: Any = None  # more state its checkpoints carry (state_dict/load_state_dict): ASMB's whole run

    def __post_init__(self):
        if self.step_module is None:
            self.step_module = StudentStep(self.model, self.method)

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> dict[str, Tensor]:
        """One optimisation step; returns the detached loss terms (no host sync)."""
        if self.mixer is not None:
            x, y = self.mixer(x, y)  # teachers and student see the same mixed batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        maps = self.method.needs_maps
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            with torch.no_grad():
                t_outs = [t(x, with_maps=maps) for t in self.teachers]
            terms = self.step_module(x, y, index, epoch, t_outs)
            weights = self.method.loss_weights(epoch)
            loss = sum(weights.get(k, 1.0) * v for k, v in terms.items())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {"loss": loss.detach(), **{k: v.detach().float() for k, v in terms.items()}}

    def train_epoch(self, loader, epoch: int, desc: str, on_step: Callable[[LossTracker], None] | None = None,
                    start: dict[str, Any] | None = None) -> dict[str, float]:
        """One epoch, or the rest of one from a mid-epoch checkpoint (`start`: its tracker state and RNG
        states). `on_step(tracker)` runs after every step (checkpoints). Returns the epoch's mean loss terms
        (one host sync, averaged over processes); raises TrainingDiverged on a non-finite term."""
        set_train(self.model, self.freeze_policy)
        self.method.train()
        tracker = LossTracker.from_state(start["tracker"], self.device) if start else LossTracker()
        steps = min(len(loader), self.max_steps) if self.max_steps else len(loader)
        batches = iter(loader)
        if start is not None:  # after iter(): a DataLoader draws its worker seed there, as it did before the kill
            set_rng_state(start["rng"])
        for x, y, index in progress(itertools.islice(batches, steps - tracker.n), desc=desc, total=steps,
                                    initial=tracker.n):
            x, y, index = (t.to(self.device, non_blocking=True) for t in (x, y, index))
            self.steps += 1
            tracker.add(self.step(x, y, index, epoch), self.steps)
            if on_step is not None:
                on_step(tracker)
        tracker.check(f"epoch {epoch} ({desc})")
        return tracker.means()

    def state_dict(self) -> dict[str, Any]:
        """What continues this training exactly: model, method (auxiliary modules), optimiser, schedule, scaler."""
        return {"model": self.model.state_dict(), "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), **({"extra": self.extra.state_dict()} if self.extra is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.extra is not None:
            self.extra.load_state_dict(state["extra"])


class StudentStep(nn.Module):
    """The trained part of a step as one module (the student's forward and the method's loss terms), so
    DistributedDataParallel can wrap it; teachers stay outside (frozen, no gradient to reduce)."""

    def __init__(self, model: KDModel, method: Method):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: Tensor, y: Tensor, index: Tensor, epoch: int, t_outs: list) -> dict[str, Tensor]:
        s_out = self.model(x, with_maps=self.method.needs_maps)
        return self.method(StepInputs(x=x, target=y, index=index, epoch=epoch, student=s_out, teachers=t_outs))


class TrainingDiverged(KDError):
    """A loss term became NaN or infinite (exit code 3; the last good checkpoint is kept)."""


class LossTracker:
    """One epoch's sums of the loss terms and, per term, the first run-wide step at which it was not
    finite, both kept on the device: no host sync per step. check() reads them (at checkpoints and the
    epoch end) and raises TrainingDiverged naming the step and the term."""

    NEVER = 2 ** 62

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
        raise TrainingDiverged(f"training diverged at step {step}, {where}: loss term '{term}' is not finite; "
                               "stopped, the last good checkpoint is kept")

    def means(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        sums, _ = self.reduced()
        return dict(zip(self.names, (sums / max(self.n, 1)).tolist()))

    def state(self) -> dict[str, Any]:
        """The partial sums of a mid-epoch checkpoint (averaged over processes: every rank restores them)."""
        sums, bad = self.reduced() if self.sums is not None else (None, None)
        return {"names": list(self.names), "n": self.n, "sums": None if sums is None else sums.cpu(),
                "first_bad": None if bad is None else bad.cpu()}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "LossTracker":
        t = cls()
        t.names, t.n = list(state["names"]), int(state["n"])
        if state["sums"] is not None:
            t.sums, t.first_bad = state["sums"].to(device), state["first_bad"].to(device)
        return t


def fit(tr: Trainer, train_loader, val_loader, epochs: int, tag: str, logger: RunLogger,
        ckpt: "Checkpointer | None", epoch_offset: int = 0, save_best: bool = True,
        initial_best: dict[str, Any] | None = None, val_key: str = "acc") -> dict[str, Any]:
    """Train for `epochs`, validate every epoch, keep the best weights by validation accuracy
    (a copy, never an alias of the live weights). Checkpoints at every epoch end and every
    --run.ckpt-every-steps steps; when the run resumes from a checkpoint of this phase (`tag`), continues
    it exactly. `save_best`: also write checkpoints/best.pt. `initial_best`: the best so far of earlier fits
    ({"acc", "epoch" relative to epoch_offset, "state"}), so selection spans them (ASMB's stages). `val_key`:
    the rows' name of the validation accuracy (val/<key>, val/best_<key>). Returns best/last state and accuracies."""
    best: dict[str, Any] = dict(initial_best) if initial_best else {"acc": -1.0, "epoch": 0, "state": None}
    done, start = 0, None
    resumed = ckpt.take(tag) if ckpt is not None else None
    if resumed is not None:
        done, start, best = restore_fit(tr, train_loader, resumed)
    else:
        begin_phase(tr.seed, tag, train_loader)
        if save_best and best["state"] is not None:  # best.pt may be ahead of the checkpoint: make them agree
            ckpt.save_best(tr.model.meta(), best["state"], best["acc"], epoch_offset + best["epoch"])
    if ckpt is not None:
        tr.steps = ckpt.step
    steps = min(len(train_loader), tr.max_steps) if tr.max_steps else len(train_loader)

    def state(epochs_done: int, tracker: LossTracker | None) -> dict[str, Any]:
        position = steps if tracker is None else tracker.n
        return {"meta": tr.model.meta(), **tr.state_dict(), "epoch": epoch_offset + epochs_done,
                "loader": loader_state(train_loader, len(train_loader) if tracker is None else position),
                "best": best["state"], "progress": {"epoch": epochs_done, "position": position,
                                                    "tracker": None if tracker is None else tracker.state(),
                                                    "best_acc": best["acc"], "best_epoch": best["epoch"]}}

    for e in range(done + 1, epochs + 1):
        def on_step(tracker: LossTracker) -> None:
            ckpt.step = tr.steps
            if tracker.n == steps:
                return  # the epoch-end checkpoint follows validation
            if ckpt.every and tr.steps % ckpt.every == 0:
                tracker.check(f"epoch {epoch_offset + e} ({tag})")  # never checkpoint a diverged model
                ckpt.save(tag, state(e - 1, tracker))
            kill_point(tr.steps)

        t0 = time.time()
        terms = tr.train_epoch(train_loader, epoch_offset + e, desc=f"{tag} {e}/{epochs}",
                               on_step=on_step if ckpt is not None else None, start=start)
        start = None
        val_acc = evaluate_acc(tr.model, val_loader, tr.device)
        if val_acc > best["acc"]:
            best = {"acc": val_acc, "epoch": e,
                    "state": {k: v.detach().to("cpu", copy=True) for k, v in tr.model.state_dict().items()}}
            if ckpt is not None and save_best:
                ckpt.save_best(tr.model.meta(), best["state"], val_acc, epoch_offset + e)
        row = {"phase": tag, "epoch": epoch_offset + e, "lr": tr.optimizer.param_groups[0]["lr"],
               **{f"train/{k}": v for k, v in terms.items()}, f"val/{val_key}": val_acc, f"val/best_{val_key}": best["acc"],
               "time_s": time.time() - t0}
        logger.log(row)
        say(f"[{tag}] epoch {e}/{epochs}  loss {terms['loss']:.4f}  val {val_key} {val_acc:.2f}  ({row['time_s']:.1f}s)")
        if ckpt is not None:
            ckpt.save(tag, state(e, None))
            kill_point(tr.steps)
    return {"best_acc": best["acc"], "best_epoch": best["epoch"], "best_state": best["state"],
            "last_state": {k: v.detach().to("cpu", copy=True) for k, v in tr.model.state_dict().items()}}


def begin_phase(seed: int, tag: str, train_loader) -> None:
    """A fresh phase reseeds the RNGs and the data order from (seed, phase name), so its numbers are the
    same whether or not other phases (e.g. stage-0 teacher fine-tuning) ran before it in this process."""
    phase_seed = (seed * 1_000_003 + zlib.crc32(tag.encode())) % 2**31
    random.seed(phase_seed)
    np.random.seed(phase_seed)
    torch.manual_seed(phase_seed)
    _stateful(train_loader).reseed(phase_seed)


def restore_fit(tr: Trainer, train_loader, ck: dict[str, Any]) -> tuple[int, dict | None, dict[str, Any]]:
    """Load a fit() checkpoint into the trainer and the loader. Returns (epochs done, the mid-epoch start
    for train_epoch or None, best so far). At an epoch boundary the RNG states are restored here; mid-epoch,
    train_epoch restores them once the loader's iterator exists."""
    check_meta(tr.model.meta(), ck["meta"], "resume checkpoint")
    tr.load_state_dict(ck)
    load_loader_state(train_loader, ck["loader"])
    p = ck["progress"]
    rng = rank_rng(ck["rng"])
    start = None if p["tracker"] is None else {"tracker": p["tracker"], "rng": rng}
    if start is None:
        set_rng_state(rng)
    say(f"resumed {ck['phase']} at step {ck['progress']['step']} (epoch {p['epoch']} done"
        + (f", {p['position']} steps into the next)" if start else ")"))
    return int(p["epoch"]), start, {"acc": p["best_acc"], "epoch": p["best_epoch"], "state": ck["best"]}


def loader_state(loader, position: int) -> dict[str, Any]:
    """The training loader's state (DeviceLoader or the DataLoader's EpochBatchSampler) with `position` =
    the batches the loop consumed in this epoch (len(loader): the epoch is done)."""
    return {**_stateful(loader).state_dict(), "position": position}


def load_loader_state(loader, state: dict[str, Any]) -> None:
    _stateful(loader).load_state_dict(state)


def _stateful(loader):
    return loader.batch_sampler if isinstance(loader, torch.utils.data.DataLoader) else loader


def kill_point(step: int) -> None:
    """Tests of exact resume: KD_TEST_KILL_AT_STEP=N kills this process with SIGKILL right after step N
    (and the checkpoint made at it), as a pre-emption would."""
    if os.environ.get("KD_TEST_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


CKPT_FORMAT = 2  # 1: the foundation's last.pt without data position; 2: resumable at any step


class Checkpointer:
    """The run's checkpoints, written by rank 0 only:

    - checkpoints/step-<run-wide step>.pt: everything a resume needs (phase, epoch, position in the epoch,
      model(s), method, optimiser(s), schedule(s), scaler, loader, RNG states of every process, best so
      far, the logged rows, the wandb run id, the config); the newest --run.keep-last are kept;
    - checkpoints/last.pt: the newest of them (a hard link, replaced by a rename), read by --run.resume;
    - checkpoints/best.pt: the model selected on validation.
    Every file is written to a temp file, fsynced and renamed: a kill at any moment leaves the previous
    complete checkpoint or the new one. `save` must be called by every process (it gathers RNG states)."""

    def __init__(self, run_dir: Path, cfg: Config, logger: "RunLogger | None" = None,
                 resume: dict[str, Any] | None = None):
        self.dir = run_dir / "checkpoints"
        self.config = dataclasses.asdict(cfg)
        self.logger = logger
        self.every, self.keep_last = cfg.run.ckpt_every_steps, cfg.run.keep_last
        self.pending = resume  # a loaded checkpoint, restored by the phase it belongs to
        self.step = int(resume["progress"]["step"]) if resume else 0  # optimisation steps of the whole run
        if DIST.main and self.dir.is_dir():
            for stale in self.dir.glob(".*.tmp"):  # a kill mid-write leaves its temp file behind
                stale.unlink(missing_ok=True)
            if resume is not None:  # resumed from an older checkpoint: the newer ones are an abandoned branch
                for later in self.dir.glob("step-*.pt"):
                    number = later.stem.removeprefix("step-")
                    if number.isdigit() and int(number) > self.step:
                        later.unlink()

    def pending_phase(self) -> str | None:
        return None if self.pending is None else self.pending.get("phase")

    def take(self, phase: str) -> dict[str, Any] | None:
        """The resume checkpoint if it belongs to `phase` (handed out once), else None."""
        if self.pending is not None and self.pending.get("phase") == phase:
            ck, self.pending = self.pending, None
            return ck
        return None

    def save(self, phase: str, state: dict[str, Any]) -> None:
        """Write a step checkpoint of `phase` holding `state` (must contain "progress") plus what every
        checkpoint holds; point last.pt at it; delete step checkpoints beyond --run.keep-last."""
        rng = gather_rng()
        if not DIST.main:
            return
        logger = self.logger
        payload = {**state, "format": CKPT_FORMAT, "phase": phase, "progress": {**state["progress"], "step": self.step},
                   "rng": rng, "rows": list(logger.rows) if logger else [],
                   "wandb_id": logger.wandb_id if logger else None, "world_size": DIST.world_size,
                   "config": self.config}
        path = self.dir / f"step-{self.step:09d}.pt"
        atomic_torch_save(payload, path)
        atomic_link(path, self.dir / "last.pt")
        for old in sorted(self.dir.glob("step-*.pt"))[:-self.keep_last]:
            old.unlink(missing_ok=True)

    def save_best(self, meta: dict[str, Any], model_state: dict[str, Tensor], val_acc: float, epoch: int) -> None:
        if DIST.main:
            atomic_torch_save({"meta": meta, "model": model_state, "val_acc": val_acc, "epoch": epoch,
                               "config": self.config}, self.dir / "best.pt")


# What may differ between a run and its resumption: where it runs and writes, how it loads data and
# checkpoints, wandb. Everything else (method, models, data, batch size, optimiser, schedule, epochs, seed,
# precision) must match, or the continued run would not be the run that was started.
RESUME_MAY_CHANGE = ("preset", "run.resume", "run.overwrite", "run.name", "run.out_dir", "run.device",
                     "run.deterministic", "run.compile", "run.ckpt_every_steps", "run.keep_last", "data.workers",
                     "data.root", "data.eval_batch_size", "teachers.cache_dir", "wandb.")


def find_resume(cfg: Config) -> tuple[Path | None, dict[str, Any] | None]:
    """(run directory, loaded checkpoint) for --run.resume, checked against the config before any work.

    auto: --run.name's directory, resumed when it holds a checkpoint, else started fresh in it. A run
    directory: its newest readable checkpoint (last.pt, then older step files). A file: that checkpoint;
    the run continues in its run directory, or in --run.name's when given."""
    spec = cfg.run.resume
    if not spec:
        return None, None
    named = Path(cfg.run.out_dir) / cfg.run.name if cfg.run.name else None
    if spec == "auto":
        candidates, explicit = checkpoint_files(named), False
        if not candidates:
            return named, None
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
    run_dir = named or own
    if run_dir is None:
        raise ConfigError(f"--run.resume {spec} is not inside a run directory; give --run.name for the run to write")
    if own is not None and run_dir.resolve() != own.resolve() and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} exists and is not the run of {path}; choose another --run.name")
    check_resume_config(cfg, ck["config"], path)
    say(f"resuming from {path} ({ck['phase']}, step {ck['progress']['step']})")
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
                raise CheckpointError(f"{path} is not a resumable kd checkpoint (written by another version "
                                      "or a model-only file such as best.pt)")
            if problems:
                say(f"note: skipped {len(problems)} unreadable checkpoint(s): {problems[0]}")
            return ck, path
        except CheckpointError as e:
            if explicit:
                raise
            problems.append(str(e))
    raise CheckpointError(problems[0])


def check_resume_config(cfg: Config, saved: dict[str, Any], path: Path) -> None:
    """Refuse (one line) a resume whose config differs from the checkpoint's on a key that must match:
    the top level, data, student, teachers, optim and run groups and the method's own group."""
    groups = ("data", "student", "teachers", "optim", "run", cfg.method)

    def flat(c: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in c.items() if not isinstance(v, dict)}
        for g in groups:
            out.update({f"{g}.{k}": v for k, v in (c.get(g) or {}).items()})
        return out

    now, then = flat(dataclasses.asdict(cfg)), flat(saved)
    for key in now:
        if key not in then or any(key == m or (m.endswith(".") and key.startswith(m)) for m in RESUME_MAY_CHANGE):
            continue
        a, b = now[key], then[key]
        if (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"cannot resume from {path}: {flag} is {_show(a)} here but {_show(b)} in the "
                                  "checkpoint's run (only paths, devices, workers, checkpointing and wandb may "
                                  "change)")


def _show(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def mix_alphas(o: OptimCfg, distill: bool) -> tuple[float, float]:
    """(mixup_alpha, cutmix_alpha) of a training phase: distillation phases use --optim.cutmix-alpha-distill
    instead of --optim.cutmix-alpha when it is > 0 (CutMix still wins over MixUp)."""
    cutmix = o.cutmix_alpha_distill if distill and o.cutmix_alpha_distill > 0 else o.cutmix_alpha
    return o.mixup_alpha, cutmix


def make_trainer(cfg: Config, model: KDModel, method: Method, teachers: list[KDModel], device: torch.device,
                 lr: float, epochs: int, steps_per_epoch: int, num_classes: int, distill: bool = False) -> Trainer:
    params = [p for p in list(model.parameters()) + list(method.parameters()) if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim, lr, device)
    amp_dtype = resolve_amp(cfg.run.amp, device)
    return Trainer(
        model=model, method=method, teachers=teachers, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.optim, epochs, steps_per_epoch), device=device,
        amp_dtype=amp_dtype, scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        mixer=build_mixer(num_classes, *mix_alphas(cfg.optim, distill)),
        grad_clip_norm=cfg.optim.grad_clip_norm, channels_last=cfg.run.channels_last,
        max_steps=cfg.run.max_steps_per_epoch, step_module=distribute(StudentStep(model, method), device),
        seed=cfg.run.seed,
    )


def prepare(model: KDModel, cfg: Config, device: torch.device, inference: bool = False) -> KDModel:
    """Move to the device (channels_last on request) and, with --run.compile, torch.compile the model in
    place (nn.Module.compile: same module and state_dict keys). Teachers pass inference=True: they are put
    in eval mode and frozen first, so each is compiled on its own for its no-grad forward."""
    if cfg.run.sync_bn and DIST.enabled and not inference:
        model = timm.layers.convert_sync_batchnorm(model)  # timm's: keeps BatchNormAct's activation; same object
    model = model.to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if inference:
        model.eval().requires_grad_(False)
    if cfg.run.compile:
        model.compile()
    return model


def use_fast_loader(cfg: Config, data) -> bool:
    """--data.loader: fast needs tensor-backed data (DataSplits.train_images) and no RandAugment."""
    fast_ok = data.train_images is not None and cfg.data.randaugment[0] == 0
    if cfg.data.loader == "fast" and not fast_ok:
        raise ConfigError("--data.loader fast needs tensor-backed data without RandAugment; use auto or torch")
    return cfg.data.loader != "torch" and fast_ok


def build_loaders(cfg: Config, data, device: torch.device) -> dict[str, Any]:
    """train/val/test loaders: device-resident (kd.fastloader) for tensor-backed data, else DataLoaders.
    With several processes each rank's train loader yields its slice of every global batch (--data.batch-size);
    every rank evaluates the whole val/test split (no communication, the same model selection everywhere)."""
    d = cfg.data
    shard = dict(rank=DIST.rank, world_size=DIST.world_size)
    if not use_fast_loader(cfg, data):
        return {
            "train": make_loader(data.train, d.batch_size, train=True, workers=d.workers, seed=cfg.run.seed, **shard),
            "val": make_loader(data.val, d.eval_batch_size, train=False, workers=d.workers),
            "test": make_loader(data.test, d.eval_batch_size, train=False, workers=d.workers),
        }
    common = dict(mean=data.mean, std=data.std, image_size=data.image_size, device=device)
    return {
        "train": DeviceLoader(data.train_images, data.train_labels, batch_size=d.batch_size, train=True,
                              augment=d.aug, seed=cfg.run.seed, **shard, **common),
        "val": DeviceLoader(*data.val.tensor_view(), batch_size=d.eval_batch_size, train=False, **common),
        "test": DeviceLoader(*data.test.tensor_view(), batch_size=d.eval_batch_size, train=False, **common),
    }


# ----------------------------------------------------------------------------------------------
# Stage 0: teachers (fine-tuned once per dataset/arch/stem/seed, then cached)
# ----------------------------------------------------------------------------------------------
def data_identity(cfg: Config) -> dict[str, Any]:
    """What the teacher's training data depends on: a cached teacher is reused only for the same data
    and the same held-out validation split (otherwise it would have trained on our val split)."""
    d = cfg.data
    ident = {"dataset": d.dataset, "val_fraction": d.val_fraction, "image_size": d.image_size, "seed": cfg.run.seed}
    if d.dataset == "synthetic":
        ident.update(classes=d.synthetic_classes, train=d.synthetic_train_size, size=d.synthetic_image_size)
    else:
        ident["root"] = str(Path(d.root).resolve())
    return ident


def teacher_input_spec(cfg: Config, arch: str, data) -> dict[str, Any] | None:
    """KDModel.set_input_transform arguments for teacher `arch`, or None (identity): a pretrained teacher
    gets its pretrained_cfg mean/std when they differ from the data's, and --teachers.image-size a resize."""
    model_mean, model_std = tuple(data.mean), tuple(data.std)
    pretrained_cfg = timm.models.get_pretrained_cfg(arch) if cfg.teachers.pretrained else None
    if pretrained_cfg is not None and pretrained_cfg.mean and pretrained_cfg.std:
        model_mean, model_std = tuple(pretrained_cfg.mean), tuple(pretrained_cfg.std)
    same = np.allclose(model_mean, data.mean, atol=1e-4) and np.allclose(model_std, data.std, atol=1e-4)
    if same and cfg.teachers.image_size == 0:
        return None
    return {"data_mean": list(data.mean), "data_std": list(data.std), "model_mean": list(model_mean),
            "model_std": list(model_std), "size": cfg.teachers.image_size}


def teacher_small_input(cfg: Config, small_input: bool) -> bool:
    """Teachers adapt their stem like the student, unless --teachers.image-size gives them their own size."""
    return resolve_small_input("auto", cfg.teachers.image_size) if cfg.teachers.image_size else small_input


def teacher_cache_path(cfg: Config, arch: str, small_input: bool, num_classes: int,
                       input_spec: dict[str, Any] | None = None) -> Path:
    ident_dict = data_identity(cfg)
    if input_spec is not None:  # a teacher trained behind an input adapter is another teacher
        ident_dict["input"] = input_spec
    ident = json.dumps(ident_dict, sort_keys=True)
    digest = hashlib.sha1(ident.encode()).hexdigest()[:8]
    stem = "small" if small_input else "std"
    return Path(cfg.teachers.cache_dir) / f"{cfg.data.dataset}-{arch}-{stem}-{num_classes}c-s{cfg.run.seed}-{digest}.pt"


def finetune_teacher(cfg: Config, arch: str, data, loaders, device, logger: RunLogger, small_input: bool,
                     run_ckpt: "Checkpointer | None" = None) -> Path:
    """Stage 0: fine-tune one teacher with cross-entropy, select by validation accuracy, cache it.
    `run_ckpt`: the run's checkpointer, so a killed fine-tuning resumes (phase `teacher:<arch>`)."""
    spec = teacher_input_spec(cfg, arch, data)
    path = teacher_cache_path(cfg, arch, small_input, data.num_classes, spec)
    say(f"stage 0: fine-tuning teacher {arch} for {cfg.teachers.epochs} epochs -> {path}")
    model = create_model(arch, data.num_classes, pretrained=cfg.teachers.pretrained, small_input=small_input,
                         img_size=cfg.teachers.image_size or None)
    if spec is not None:
        model.set_input_transform(**spec)
    model = prepare(model, cfg, device)
    method = METHODS["ce"][0](None, model, [], num_classes=data.num_classes, num_train=len(data.train),
                              label_smoothing=cfg.teachers.label_smoothing)
    tr = make_trainer(cfg, model, method, [], device, cfg.teachers.lr, cfg.teachers.epochs,
                      steps_per_epoch(cfg, loaders["train"]), data.num_classes)
    res = fit(tr, loaders["train"], loaders["val"], cfg.teachers.epochs, f"teacher:{arch}", logger, run_ckpt,
              save_best=False)
    if DIST.main:
        atomic_torch_save({"meta": model.meta(), "model": res["best_state"], "val_acc": res["best_acc"],
                           "data": data_identity(cfg), "input_transform": spec}, path)
    barrier()  # the other ranks load the teacher from the cache rank 0 just wrote
    return path


def load_teachers(cfg: Config, data, loaders, device, logger: RunLogger, small_input: bool,
                  run_ckpt: "Checkpointer | None" = None, adapter_dim: int = 0) -> list[tuple[KDModel, float]]:
    """Every configured teacher, frozen and in eval mode, with its validation accuracy: from
    --teachers.checkpoints, else from the cache, fine-tuning (stage 0) the ones that are missing (and the
    one a resumed run was fine-tuning when it stopped, even if cached, so it continues exactly).
    `adapter_dim` > 0 gives each teacher a new residual adapter (zero-initialised: the same function) on top
    of the cached weights, which have none (ASMB's teacher_freeze adapter)."""
    out = []
    for i, arch in enumerate(cfg.teachers.models):
        spec = teacher_input_spec(cfg, arch, data)
        path = Path(cfg.teachers.checkpoints[i]) if cfg.teachers.checkpoints else \
            teacher_cache_path(cfg, arch, small_input, data.num_classes, spec)
        resuming = run_ckpt is not None and run_ckpt.pending_phase() == f"teacher:{arch}"
        if not cfg.teachers.checkpoints and (not path.exists() or resuming):
            path = finetune_teacher(cfg, arch, data, loaders, device, logger, small_input, run_ckpt)
        elif not cfg.teachers.checkpoints:
            say(f"teacher {arch}: using cached {path}")
        ckpt = safe_torch_load(path)
        if not isinstance(ckpt, dict) or "meta" not in ckpt:
            raise CheckpointError(f"teacher checkpoint {path} has no model metadata (not written by kd?)")
        check_meta({"arch": arch, "num_classes": data.num_classes, "small_input": small_input},
                   ckpt["meta"], f"teacher checkpoint {path}")
        model = create_model(arch, data.num_classes, small_input=small_input, img_size=cfg.teachers.image_size or None,
                             adapter_dim=adapter_dim)
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=not adapter_dim)
        if unexpected or any(not k.startswith("adapter.") for k in missing):
            raise CheckpointError(f"teacher checkpoint {path} does not fit {arch} with an adapter "
                                  f"(unexpected {unexpected[:3]}, missing {missing[:3]})")
        spec = ckpt.get("input_transform", spec)  # the adapter the teacher was trained behind, when recorded
        if spec is not None:
            model.set_input_transform(**spec)
        model = prepare(model, cfg, device, inference=True)
        val_acc = ckpt.get("val_acc")
        if val_acc is None:
            val_acc = evaluate_acc(model, loaders["val"], device)
        out.append((model, float(val_acc)))
    return out


def select_teachers(cfg: Config, teachers: list[tuple[KDModel, float]]) -> list[KDModel]:
    if cfg.teachers.select == "both":
        return [m for m, _ in teachers]
    if cfg.teachers.select == "best":
        return [max(teachers, key=lambda t: t[1])[0]]
    return [teachers[int(cfg.teachers.select)][0]]


# ----------------------------------------------------------------------------------------------
# ASMB (docs/asmb.md): stage 0 (both teachers), then num_stages x (phase A: the teachers' trainable
# part + MBM + head learn the synergy; phase B: the student distils from it). The pieces live in kd/asmb.py;
# each phase is an ordinary Trainer run by fit(), its optimiser and schedule built once for all stages.
# ----------------------------------------------------------------------------------------------
def teacher_adapt_trainer(cfg: Config, synergy: SynergyModel, adapt: AsmbAdapt, device: torch.device,
                          steps: int) -> Trainer:
    """Phase A's trainer: Adam over each teacher's trainable part (teacher_lr, teacher_weight_decay) and the
    MBM + head (teacher_lr * mbm_lr_factor, no decay: mbm_reg_lambda), scheduled over every phase-A step of the
    run. Its model is the synergy classifier (validated every epoch as val/synergy_acc). No MixUp/CutMix."""
    a = cfg.asmb
    teacher_params = [p for t in synergy.teachers for p in t.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([
        {"params": teacher_params, "lr": a.teacher_lr, "weight_decay": a.teacher_weight_decay},
        {"params": list(synergy.bridge.parameters()), "lr": a.teacher_lr * a.mbm_lr_factor, "weight_decay": 0.0},
    ], **({"fused": True} if device.type in ("cpu", "cuda") else {}))  # fused: see build_optimizer
    schedule = dataclasses.replace(cfg.optim, schedule=a.teacher_schedule, warmup_epochs=0.0)
    amp_dtype = resolve_amp(cfg.run.amp, device)
    step = TeacherAdaptStep(synergy.student, synergy.teachers, synergy.bridge, adapt)
    return Trainer(model=synergy, method=adapt, teachers=[], optimizer=optimizer,
                   scheduler=build_scheduler(optimizer, schedule, a.num_stages * a.teacher_epochs, steps),
                   device=device, amp_dtype=amp_dtype,
                   scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), mixer=None,
                   grad_clip_norm=cfg.optim.grad_clip_norm, channels_last=cfg.run.channels_last,
                   max_steps=cfg.run.max_steps_per_epoch, step_module=distribute(step, device), seed=cfg.run.seed)


class AsmbRun:
    """An ASMB run's models, its two phase trainers (built once, persisting across stages) and its progress.

    Phase A: `phase_a` trains the synergy model (each teacher's trainable part + MBM + head) with AsmbAdapt's
    terms. Phase B: `phase_b` trains the student (+ projections) with AsmbDistill's terms, with --optim's
    optimiser and a schedule over all phase-B epochs. Both carry this object as Trainer.extra, so every
    checkpoint holds the whole run (state_dict): student, each teacher's adapted entries (what phase A changes;
    the cached teacher plus these rebuild it), bridge, projections, both optimisers/schedules/scalers, the stage
    and the best student so far. Everything loads with torch.load(weights_only=True)."""

    def __init__(self, cfg: Config, student: KDModel, teachers: list[KDModel], modules: AsmbModules,
                 device: torch.device, steps: int, num_classes: int):
        a = cfg.asmb
        self.num_stages = a.num_stages
        self.teacher_epochs, self.student_epochs = a.epochs_per_stage(cfg.optim.epochs)
        temperatures = temperature_table(a, a.num_stages * (self.teacher_epochs + self.student_epochs), device)
        self.student, self.teachers, self.bridge = student, teachers, modules.bridge.to(device)
        self.teacher_keys = [adapted_keys(t, a.teacher_freeze) for t in teachers]
        self.synergy = SynergyModel(self.bridge, student, teachers, a.teacher_freeze)
        adapt = AsmbAdapt(a, self.bridge, teachers, temperatures, num_classes=num_classes,
                          label_smoothing=cfg.optim.label_smoothing)
        self.distill = AsmbDistill(a, student, teachers, modules, temperatures, num_classes=num_classes,
                                   label_smoothing=cfg.optim.label_smoothing).to(device)
        self.phase_a = teacher_adapt_trainer(cfg, self.synergy, adapt, device, steps)
        self.phase_b = make_trainer(cfg, student, self.distill, teachers, device, cfg.optim.lr,
                                    a.num_stages * self.student_epochs, steps, num_classes, distill=True)
        self.phase_b.freeze_policy = cfg.student.freeze
        self.phase_a.extra = self.phase_b.extra = self
        self.stage = 0
        self.best: dict[str, Any] = {"acc": -1.0, "epoch": 0, "state": None}  # best student (global epoch)

    def state_dict(self) -> dict[str, Any]:
        def optim_state(tr: Trainer) -> dict[str, Any]:
            return {"optimizer": tr.optimizer.state_dict(), "scheduler": tr.scheduler.state_dict(),
                    "scaler": tr.scaler.state_dict()}

        return {
            "stage": self.stage, "student_meta": self.student.meta(), "student": self.student.state_dict(),
            "teachers": [{"meta": t.meta(), "adapted": {k: v for k, v in t.state_dict().items() if k in keys}}
                         for t, keys in zip(self.teachers, self.teacher_keys)],
            "bridge": self.bridge.state_dict(), "projections": self.distill.state_dict(),
            "phase_a": optim_state(self.phase_a), "phase_b": optim_state(self.phase_b),
            # the best student before the running phase B (during one, fit()'s own "best"/"progress" lead)
            "best": {"acc": self.best["acc"], "epoch": self.best["epoch"]}, "best_student": self.best["state"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state["stage"])
        self.student.load_state_dict(state["student"])
        for teacher, saved in zip(self.teachers, state["teachers"]):
            teacher.load_state_dict(saved["adapted"], strict=False)
        self.bridge.load_state_dict(state["bridge"])
        self.distill.load_state_dict(state["projections"])
        for tr, saved in ((self.phase_a, state["phase_a"]), (self.phase_b, state["phase_b"])):
            tr.optimizer.load_state_dict(saved["optimizer"])
            tr.scheduler.load_state_dict(saved["scheduler"])
            tr.scaler.load_state_dict(saved["scaler"])
        self.best = {**state["best"], "state": state["best_student"]}


def asmb_teachers(cfg: Config, data, loaders, device, logger: RunLogger, ckpt: "Checkpointer | None",
                  small_input: bool) -> list[tuple[KDModel, float]]:
    """Stage 0: both teachers (fine-tuned once, cached), with a new adapter under teacher_freeze adapter, then
    partly unfrozen by the policy (requires_grad; their modes are set per phase)."""
    a = cfg.asmb
    teachers = load_teachers(cfg, data, loaders, device, logger, small_input, ckpt,
                             adapter_dim=a.teacher_adapter_dim if a.teacher_freeze == "adapter" else 0)
    for teacher, _ in teachers:
        apply_freeze(teacher, a.teacher_freeze)
    return teachers


def run_asmb(cfg: Config, data, loaders, device: torch.device, logger: RunLogger, ckpt: "Checkpointer | None",
             student: KDModel, modules: AsmbModules, teacher_small: bool) -> dict[str, Any]:
    """The ASMB stages after stage 0; returns the summary entries. Selection: the best student by validation
    accuracy over every phase-B epoch of every stage (best.pt); the test split only reports."""
    summary: dict[str, Any] = {}
    teachers = []
    for arch, (teacher, val_acc) in zip(cfg.teachers.models, asmb_teachers(cfg, data, loaders, device, logger, ckpt,
                                                                          teacher_small)):
        summary[f"teacher/{arch}/val_acc"] = val_acc
        teachers.append(teacher)
    run = AsmbRun(cfg, prepare(student, cfg, device), teachers, modules, device,
                  steps_per_epoch(cfg, loaders["train"]), data.num_classes)
    say(freeze_report({"student": student, **{f"teacher {t.arch} ({cfg.asmb.teacher_freeze})": t for t in teachers},
                       "MBM + head": run.bridge, "projections": run.distill}))
    # A resumed run skips the phases before its checkpoint's; fit() restores that one (and, via Trainer.extra, all).
    order = [f"asmb:{phase}:s{stage}" for stage in range(1, run.num_stages + 1) for phase in "AB"]
    pending = ckpt.pending_phase() if ckpt is not None else None
    resume_at = order.index(pending) if pending in order else 0
    epoch = 0  # the global epoch counter (phase A and B alike): the temperature schedule and rows use it
    for stage in range(1, run.num_stages + 1):
        run.stage = stage
        tag = f"asmb:A:s{stage}"
        if order.index(tag) >= resume_at:
            fit(run.phase_a, loaders["train"], loaders["val"], run.teacher_epochs, tag, logger, ckpt,
                epoch_offset=epoch, save_best=False, val_key="synergy_acc")
            if cfg.asmb.residual_guard and (line := guard_residual(run.synergy, loaders["val"], stage, device)):
                say(line)
        epoch += run.teacher_epochs
        tag = f"asmb:B:s{stage}"
        if order.index(tag) >= resume_at:
            prior = {**run.best, "epoch": run.best["epoch"] - epoch}  # fit() counts epochs from its offset
            res = fit(run.phase_b, loaders["train"], loaders["val"], run.student_epochs, tag, logger, ckpt,
                      epoch_offset=epoch, initial_best=prior)
            run.best = {"acc": res["best_acc"], "epoch": epoch + res["best_epoch"], "state": res["best_state"]}
        epoch += run.student_epochs
        if order.index(tag) >= resume_at:
            metrics = stage_metrics(run.synergy, loaders["val"], device)
            logger.log({"phase": "asmb:stage", "stage": stage, "epoch": epoch, **metrics})
            say(f"[asmb stage {stage}/{run.num_stages}] " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
            if warning := synergy_warning(stage, metrics):
                say(warning)
    test_metrics = stage_metrics(run.synergy, loaders["test"], device)
    summary["synergy/test_acc"], summary["ensemble/test_acc"] = test_metrics["synergy/acc"], test_metrics["ensemble/acc"]
    summary["last/test_acc"] = evaluate_acc(student, loaders["test"], device)
    summary["last/val_acc"] = next(r["val/acc"] for r in reversed(logger.rows) if "val/acc" in r)
    student.load_state_dict(run.best["state"])
    summary["best/test_acc"] = evaluate_acc(student, loaders["test"], device)
    summary["best/val_acc"] = run.best["acc"]
    summary["best/epoch"] = run.best["epoch"]
    return summary


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def steps_per_epoch(cfg: Config, loader) -> int:
    n = len(loader)
    return min(n, cfg.run.max_steps_per_epoch) if cfg.run.max_steps_per_epoch else n


def train_labels_of(data) -> Tensor:
    """[N] int64 labels of the training split in loader index order (CRD samples negatives by class):
    DataSplits.train_labels, else the image folder's sample list, else one pass over the dataset."""
    if data.train_labels is not None:
        return data.train_labels
    samples = getattr(data.train, "samples", None)
    if samples is not None:
        return torch.tensor([label for _, label in samples], dtype=torch.long)
    return torch.tensor([int(data.train[i][1]) for i in range(len(data.train))], dtype=torch.long)


def resolve_small_input(choice: str, image_size: int) -> bool:
    return image_size <= 64 if choice == "auto" else choice == "on"


def run(cfg: Config) -> dict[str, Any]:
    validate(cfg)
    init_distributed(cfg)
    resume_dir, resume = find_resume(cfg)  # a corrupt or mismatched checkpoint stops here, before any work
    run_dir = resume_dir or make_run_dir(cfg)  # an existing run directory too (nothing is created yet)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    device = resolve_device(cfg.run.device)
    d = cfg.data
    data = build_data(d.dataset, d.root, val_fraction=d.val_fraction, seed=cfg.run.seed, image_size=d.image_size,
                      aug=d.aug, randaugment=d.randaugment, synthetic=SyntheticSpec(num_classes=d.synthetic_classes,
                                                         train_size=d.synthetic_train_size,
                                                         test_size=d.synthetic_test_size,
                                                         image_size=d.synthetic_image_size, seed=cfg.run.seed))
    if len(data.train) < d.batch_size:
        raise ConfigError(f"--data.batch-size {d.batch_size} is larger than the training split ({len(data.train)})")
    small_input = resolve_small_input(cfg.student.small_input, data.image_size)
    teacher_small = teacher_small_input(cfg, small_input)
    # Build the student first: an unknown model name or bad checkpoint fails before anything is written.
    student = None
    if cfg.method != "teacher":
        student = create_model(cfg.student.model, data.num_classes, pretrained=cfg.student.pretrained,
                               small_input=small_input, checkpoint=cfg.student.checkpoint or None,
                               drop_rate=cfg.student.drop_rate, adapter_dim=cfg.student.adapter_dim)
        apply_freeze(student, cfg.student.freeze)
        if resume is not None and resume["phase"] == cfg.method:
            check_meta(student.meta(), resume["meta"], f"resume checkpoint {cfg.run.resume}")
    teacher_dims = [create_model(arch, data.num_classes, small_input=teacher_small).num_features  # fail fast on
                    for arch in (cfg.teachers.models if cfg.method != "ce" else ())]  # unknown names
    # ASMB's bridge and projections now: an impossible dimension (e.g. --asmb.mbm-query-dim) stops before any work
    asmb_modules = build_asmb_modules(cfg.asmb, teacher_dims, student, data.num_classes) if cfg.method == "asmb" else None
    barrier()  # every rank has checked the run directory before rank 0 creates it
    if DIST.main:
        if run_dir.exists() and cfg.run.overwrite:
            import shutil
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=bool(cfg.run.resume))
        atomic_write_json(dataclasses.asdict(cfg), run_dir / "config.json")
    barrier()
    logger = RunLogger(run_dir, cfg, resume)
    ckpt = Checkpointer(run_dir, cfg, logger, resume)
    say(f"run directory: {run_dir}  (device {device}, {data.num_classes} classes, "
        f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test)")

    loaders = build_loaders(cfg, data, device)
    if isinstance(loaders["train"], DeviceLoader):
        say(f"data: device-resident loader on {device} (--data.loader {d.loader})")
    t_start = time.time()
    summary: dict[str, Any] = {"method": cfg.method, "dataset": d.dataset, "num_classes": data.num_classes,
                               "run_dir": str(run_dir)}

    if cfg.method == "teacher":
        for arch, (model, val_acc) in zip(cfg.teachers.models, load_teachers(cfg, data, loaders, device, logger,
                                                                              teacher_small, ckpt)):
            summary[f"teacher/{arch}/val_acc"] = val_acc
            summary[f"teacher/{arch}/test_acc"] = evaluate_acc(model, loaders["test"], device)
    elif cfg.method == "asmb":
        summary.update(run_asmb(cfg, data, loaders, device, logger, ckpt, student, asmb_modules, teacher_small))
    else:
        teachers = []
        if METHODS[cfg.method][0].uses_teachers:
            all_teachers = load_teachers(cfg, data, loaders, device, logger, teacher_small, ckpt)
            for arch, (m, acc) in zip(cfg.teachers.models, all_teachers):
                summary[f"teacher/{arch}/val_acc"] = acc
            teachers = select_teachers(cfg, all_teachers)
        student = prepare(student, cfg, device)
        method_cls, _ = METHODS[cfg.method]
        method = method_cls(getattr(cfg, cfg.method, None), student, teachers, num_classes=data.num_classes,
                            num_train=len(data.train), label_smoothing=cfg.optim.label_smoothing,
                            image_size=data.image_size,
                            train_labels=train_labels_of(data) if method_cls.needs_index else None).to(device)
        tr = make_trainer(cfg, student, method, teachers, device, cfg.optim.lr, cfg.optim.epochs,
                          steps_per_epoch(cfg, loaders["train"]), data.num_classes, distill=bool(teachers))
        tr.freeze_policy = cfg.student.freeze
        say(freeze_report({"student": student, "method": method,
                           **{f"teacher {t.arch}": t for t in teachers}}))
        res = fit(tr, loaders["train"], loaders["val"], cfg.optim.epochs, cfg.method, logger, ckpt)
        summary["last/test_acc"] = evaluate_acc(student, loaders["test"], device)
        summary["last/val_acc"] = logger.rows[-1]["val/acc"]
        student.load_state_dict(res["best_state"])
        summary["best/test_acc"] = evaluate_acc(student, loaders["test"], device)
        summary["best/val_acc"] = res["best_acc"]
        summary["best/epoch"] = res["best_epoch"]
    summary["wall_time_s"] = time.time() - t_start
    logger.finish(summary)
    print_results(summary)
    return summary


def print_results(summary: dict[str, Any]) -> None:
    say("\nresults")
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        say(f"  {k:<{width}}  {v:.2f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_config(argv)
        run(cfg)
    except KDError as e:
        rank = int(os.environ.get("RANK", "0"))  # under torchrun every rank fails alike on bad input
        if rank == 0 or not isinstance(e, ConfigError):
            print(f"{f'[rank {rank}] ' if rank else ''}error: {e}", file=sys.stderr, flush=True)
        return 3 if isinstance(e, TrainingDiverged) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
