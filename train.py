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
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

import numpy as np
import timm
import torch
import tyro
from torch import Tensor, nn
from tqdm import tqdm

from kd.data import DATASETS, SyntheticSpec, build_data, make_loader
from kd.errors import CheckpointError, ConfigError, KDError
from kd.fastloader import DeviceLoader
from kd.io import atomic_torch_save, atomic_write_json, atomic_write_text, safe_torch_load
from kd.methods import METHODS, Method, StepInputs
from kd.methods import ATCfg, CRDCfg, DISTCfg, DKDCfg, FitNetCfg, PKTCfg, RKDCfg, SPCfg
from kd.methods.kd import KDCfg
from kd.freeze import apply_freeze, freeze_report, set_train
from kd.metrics import evaluate_acc
from kd.mix import build_mixer
from kd.models import KDModel, check_meta, create_model, model_checkpoint

METHOD_NAMES = Literal["teacher", "ce", "kd", "fitnet", "at", "dkd", "crd", "rkd", "pkt", "sp", "dist"]


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
    channels_last: bool = False
    """use the channels_last memory layout for the models and inputs."""
    compile: bool = False
    """torch.compile the student (and teachers separately)."""
    max_steps_per_epoch: int = 0
    """stop each epoch after this many steps (0 = full epoch); for quick checks."""


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
    """what to train: teacher (fine-tune the teachers), ce (student alone), kd, ..."""
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


def smoke_preset() -> Config:
    """Tiny zoo models on built-in synthetic data: the whole pipeline in a few CPU minutes."""
    cfg = Config(preset="smoke")
    cfg.data = DataCfg(dataset="synthetic", batch_size=64, workers=0, synthetic_train_size=2000,
                       synthetic_test_size=500)
    cfg.student = StudentCfg(model="resnet8")
    cfg.teachers = TeachersCfg(models=("resnet20", "wrn_16_2"), pretrained=False, epochs=3, lr=0.05)
    cfg.optim = OptimCfg(lr=0.05, epochs=3, schedule="cosine", milestones=())
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

    for group in (cfg.data, cfg.teachers, cfg.optim, cfg.run, getattr(cfg, cfg.method, None)):
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
    check(cfg.optim.lr > 0, f"--optim.lr must be > 0, got {cfg.optim.lr}")
    check(cfg.optim.epochs > 0, "--optim.epochs must be > 0")
    check(cfg.teachers.epochs > 0, "--teachers.epochs must be > 0")
    check(cfg.optim.label_smoothing < 1 and cfg.teachers.label_smoothing < 1, "label smoothing must be < 1")
    check(all(m > 0 for m in cfg.optim.milestones), "--optim.milestones must be positive epochs")
    check(cfg.optim.warmup_epochs < cfg.optim.epochs, "--optim.warmup-epochs must be < --optim.epochs")
    if cfg.method != "ce":
        check(len(cfg.teachers.models) >= 1, "--teachers needs at least one model")
        check(not cfg.teachers.checkpoints or len(cfg.teachers.checkpoints) == len(cfg.teachers.models),
              f"--teachers.checkpoints has {len(cfg.teachers.checkpoints)} paths for "
              f"{len(cfg.teachers.models)} teachers")
        if cfg.teachers.select in ("0", "1"):
            check(int(cfg.teachers.select) < len(cfg.teachers.models),
                  f"--teachers.select {cfg.teachers.select} but only {len(cfg.teachers.models)} teacher(s)")
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

    def __init__(self, run_dir: Path, cfg: Config):
        self.run_dir, self.rows, self.wandb = run_dir, [], None
        mode = resolve_wandb_mode(cfg.wandb.mode)
        if mode != "disabled":
            self.wandb = init_wandb(cfg, run_dir, mode)

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        atomic_write_text("".join(json.dumps(r) + "\n" for r in self.rows), self.run_dir / "metrics.jsonl")
        if self.wandb is not None:
            self.wandb.log(wandb_row(row))

    def finish(self, summary: dict[str, Any]) -> None:
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


def init_wandb(cfg: Config, run_dir: Path, mode: str):
    """A wandb run logging under run_dir/wandb/. Online falls back to offline (sync later with `wandb sync`)
    when the server is unreachable (a 3 s probe) or init takes over 20 s: no network never hangs a run."""
    import wandb  # imported only when used: it is slow to import and kd/ never needs it

    kwargs = dict(project=cfg.wandb.project, entity=cfg.wandb.entity or None, group=cfg.wandb.group or None,
                  tags=list(cfg.wandb.tags) or None, name=run_dir.name, dir=str(run_dir), job_type=cfg.method,
                  config=dataclasses.asdict(cfg))
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
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.run.overwrite:
        raise ConfigError(f"run directory {run_dir} exists; pass --run.overwrite True or another --run.name")
    return run_dir


def progress(it: Iterable, **kw) -> Iterable:
    """tqdm bar on a terminal, nothing when stdout is redirected."""
    return tqdm(it, disable=not sys.stdout.isatty(), leave=False, dynamic_ncols=True, **kw)


def say(msg: str) -> None:
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
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


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


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------
def build_optimizer(params: list[nn.Parameter], o: OptimCfg, lr: float, device: torch.device):
    fused = {"foreach": True} if device.type == "cuda" else {}
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
            s_out = self.model(x, with_maps=maps)
            terms = self.method(StepInputs(x=x, target=y, index=index, epoch=epoch, student=s_out, teachers=t_outs))
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

    def train_epoch(self, loader, epoch: int, desc: str) -> dict[str, float]:
        set_train(self.model, self.freeze_policy)
        self.method.train()
        sums: dict[str, Tensor] = {}
        n = 0
        for i, (x, y, index) in enumerate(progress(loader, desc=desc)):
            if self.max_steps and i >= self.max_steps:
                break
            x, y, index = (t.to(self.device, non_blocking=True) for t in (x, y, index))
            for k, v in self.step(x, y, index, epoch).items():
                sums[k] = sums[k] + v if k in sums else v
            n += 1
        means = {k: v.item() / max(n, 1) for k, v in sums.items()}  # one host sync per epoch
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            raise KDError(f"training diverged in epoch {epoch} ({desc}): loss term '{bad[-1]}' is not finite; "
                          "the last good checkpoint is kept")
        return means


def fit(tr: Trainer, train_loader, val_loader, epochs: int, tag: str, logger: RunLogger,
        ckpt: "Checkpointer | None", epoch_offset: int = 0) -> dict[str, Any]:
    """Train for `epochs`, validate every epoch, keep the best weights by validation accuracy
    (a copy, never an alias of the live weights). Returns best/last state and accuracies."""
    best_acc, best_state, best_epoch = -1.0, None, 0
    for e in range(1, epochs + 1):
        t0 = time.time()
        terms = tr.train_epoch(train_loader, epoch_offset + e, desc=f"{tag} {e}/{epochs}")
        val_acc = evaluate_acc(tr.model, val_loader, tr.device)
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, e
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in tr.model.state_dict().items()}
        row = {"phase": tag, "epoch": epoch_offset + e, "lr": tr.optimizer.param_groups[0]["lr"],
               **{f"train/{k}": v for k, v in terms.items()}, "val/acc": val_acc, "val/best_acc": best_acc,
               "time_s": time.time() - t0}
        logger.log(row)
        say(f"[{tag}] epoch {e}/{epochs}  loss {terms['loss']:.4f}  val acc {val_acc:.2f}  ({row['time_s']:.1f}s)")
        if ckpt is not None:
            ckpt.save_epoch(tr, epoch_offset + e, best_state, best_acc)
    return {"best_acc": best_acc, "best_epoch": best_epoch, "best_state": best_state,
            "last_state": {k: v.detach().to("cpu", copy=True) for k, v in tr.model.state_dict().items()}}


class Checkpointer:
    """checkpoints/last.pt (everything needed to continue) and checkpoints/best.pt (selected model)."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.dir = run_dir / "checkpoints"
        self.config = dataclasses.asdict(cfg)

    def save_epoch(self, tr: Trainer, epoch: int, best_state: dict | None, best_acc: float) -> None:
        atomic_torch_save({
            "meta": tr.model.meta(), "model": tr.model.state_dict(), "method": tr.method.state_dict(),
            "optimizer": tr.optimizer.state_dict(), "scheduler": tr.scheduler.state_dict(),
            "scaler": tr.scaler.state_dict(), "epoch": epoch, "rng": rng_state(), "config": self.config,
        }, self.dir / "last.pt")
        if best_state is not None:
            atomic_torch_save({"meta": tr.model.meta(), "model": best_state, "val_acc": best_acc,
                               "config": self.config}, self.dir / "best.pt")


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
        max_steps=cfg.run.max_steps_per_epoch,
    )


def prepare(model: KDModel, cfg: Config, device: torch.device, inference: bool = False) -> KDModel:
    """Move to the device (channels_last on request) and, with --run.compile, torch.compile the model in
    place (nn.Module.compile: same module and state_dict keys). Teachers pass inference=True: they are put
    in eval mode and frozen first, so each is compiled on its own for its no-grad forward."""
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
    """train/val/test loaders: device-resident (kd.fastloader) for tensor-backed data, else DataLoaders."""
    d = cfg.data
    if not use_fast_loader(cfg, data):
        return {
            "train": make_loader(data.train, d.batch_size, train=True, workers=d.workers, seed=cfg.run.seed),
            "val": make_loader(data.val, d.eval_batch_size, train=False, workers=d.workers),
            "test": make_loader(data.test, d.eval_batch_size, train=False, workers=d.workers),
        }
    common = dict(mean=data.mean, std=data.std, image_size=data.image_size, device=device)
    return {
        "train": DeviceLoader(data.train_images, data.train_labels, batch_size=d.batch_size, train=True,
                              augment=d.aug, seed=cfg.run.seed, **common),
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


def finetune_teacher(cfg: Config, arch: str, data, loaders, device, logger: RunLogger, small_input: bool) -> Path:
    """Stage 0: fine-tune one teacher with cross-entropy, select by validation accuracy, cache it."""
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
    res = fit(tr, loaders["train"], loaders["val"], cfg.teachers.epochs, f"teacher:{arch}", logger, None)
    atomic_torch_save({"meta": model.meta(), "model": res["best_state"], "val_acc": res["best_acc"],
                       "data": data_identity(cfg), "input_transform": spec}, path)
    return path


def load_teachers(cfg: Config, data, loaders, device, logger: RunLogger, small_input: bool) -> list[tuple[KDModel, float]]:
    """Every configured teacher, frozen and in eval mode, with its validation accuracy: from
    --teachers.checkpoints, else from the cache, fine-tuning (stage 0) the ones that are missing."""
    out = []
    for i, arch in enumerate(cfg.teachers.models):
        spec = teacher_input_spec(cfg, arch, data)
        path = Path(cfg.teachers.checkpoints[i]) if cfg.teachers.checkpoints else \
            teacher_cache_path(cfg, arch, small_input, data.num_classes, spec)
        if not cfg.teachers.checkpoints and not path.exists():
            path = finetune_teacher(cfg, arch, data, loaders, device, logger, small_input)
        elif not cfg.teachers.checkpoints:
            say(f"teacher {arch}: using cached {path}")
        ckpt = safe_torch_load(path)
        if not isinstance(ckpt, dict) or "meta" not in ckpt:
            raise CheckpointError(f"teacher checkpoint {path} has no model metadata (not written by kd?)")
        check_meta({"arch": arch, "num_classes": data.num_classes, "small_input": small_input},
                   ckpt["meta"], f"teacher checkpoint {path}")
        model = create_model(arch, data.num_classes, small_input=small_input, img_size=cfg.teachers.image_size or None)
        model.load_state_dict(ckpt["model"])
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
    for arch in cfg.teachers.models if cfg.method != "ce" else ():
        create_model(arch, data.num_classes, small_input=teacher_small)  # fail fast on unknown names
    run_dir = make_run_dir(cfg)
    if run_dir.exists() and cfg.run.overwrite:
        import shutil
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    atomic_write_json(dataclasses.asdict(cfg), run_dir / "config.json")
    logger = RunLogger(run_dir, cfg)
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
                                                                              teacher_small)):
            summary[f"teacher/{arch}/val_acc"] = val_acc
            summary[f"teacher/{arch}/test_acc"] = evaluate_acc(model, loaders["test"], device)
    else:
        teachers = []
        if METHODS[cfg.method][0].uses_teachers:
            all_teachers = load_teachers(cfg, data, loaders, device, logger, teacher_small)
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
        res = fit(tr, loaders["train"], loaders["val"], cfg.optim.epochs, cfg.method, logger,
                  Checkpointer(run_dir, cfg))
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
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
