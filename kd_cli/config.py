"""train.py's configuration: every option a run takes (one dataclass group per `--group.*`, the method groups
from kd/methods/__init__.py's table), presets, parsing (tyro) and the checks of values before any work.

Imports no torch: `python train.py --help` and a bad flag answer in a fraction of a second, and sweep.py and
report.py read the same config without loading the training machinery.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro
import yaml

from kd.configs import AsmbCfg
from kd.errors import ConfigError
from kd.methods import METHOD_SPECS, MethodSpec, method_names
from kd_cli.cli import (
    bool_flags,
    first_message,
    flag_names,
    focused_config,
    load_config_json,
    normalize_booleans,
    pop_option,
    unknown_flag_message,
)
from kd_cli.rundir import check_run_name

DESCRIPTION = "Train a model with any kd method: teacher fine-tuning, single-stage baselines, or multi-stage ASMB."


MethodName = Literal[method_names()]  # every name in kd/methods/__init__.py's table


# ---- Config: every field is a CLI flag (`--group.field`); the docstring under it is its --help line.
@dataclass
class DataCfg:
    dataset: Literal["synthetic", "cifar100", "imagefolder", "tiny-imagenet"] = "cifar100"
    """which dataset: synthetic (built in), cifar100 (downloaded to root), imagefolder (root/train, root/val), tiny-imagenet (folder or archive)."""
    root: str = "data"
    """where the dataset lives (or is downloaded to); for tiny-imagenet the folder or its .zip/.tar.gz."""
    classes: str = ""
    """class subset of imagefolder/tiny-imagenet: N = the first N classes (wnids.txt / sorted folders), or a file of class ids, one per line; empty = all."""
    cache_dir: str = ""
    """where archives are extracted and decoded images cached (empty = $KD_CACHE_DIR or ~/.cache/kd); never the data root."""
    max_extract_gb: float = 50.0
    """an archive (tiny-imagenet .zip/.tar.gz) whose members declare more bytes than this is refused before extracting."""
    max_extract_files: int = 1_000_000
    """an archive with more members than this is refused before extracting (Tiny-ImageNet-200: ~120k)."""
    val_fraction: float = 0.1
    """share of the training set held out (stratified, seeded) as the validation split used for model selection."""
    split_seed: int = 0
    """seed of the validation split (and of synthetic data): fixed, so every --run.seed sees the same split."""
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
    """start the student from timm's ImageNet weights (from the Hugging Face hub or its local cache; offline: --student.weights)."""
    checkpoint: str = ""
    """start the student from this local kd checkpoint instead (same model, classes and stem: loaded as it is)."""
    weights: str = ""
    """start the student from this local file of pretrained weights instead: a timm/torchvision state_dict
    (torch.save), a checkpoint dict holding it under 'state_dict'/'model', or .safetensors; a classifier of
    another class count and an ImageNet stem replaced for small inputs are re-initialised (said in one line)."""
    small_input: Literal["auto", "on", "off"] = "auto"
    """adapt the stem for 32/64 px inputs; auto = on when images are <= 64 px."""
    drop_rate: float = 0.0
    """dropout before the classifier."""
    freeze: Literal["none", "head", "bn_head", "adapter", "last_block"] = "none"
    """what of the student trains: none (everything), head, bn_head (norm affines + head), adapter (+ head), last_block (+ head)."""
    adapter_dim: int = 0
    """residual bottleneck MLP (D -> N -> D, zero-initialised) on the student's pooled feature; 0 = off."""

    def small_stem(self, image_size: int) -> bool:
        """Whether the student's stem is adapted for images of `image_size` px (--student.small-input)."""
        return self.small_input == "on" or (self.small_input == "auto" and 0 < image_size <= 64)

    def model_options(self) -> dict:
        """kd.models.create_model's keyword arguments of this group (besides the name, classes and stem)."""
        return {
            "pretrained": self.pretrained,
            "checkpoint": self.checkpoint or None,
            "drop_rate": self.drop_rate,
            "adapter_dim": self.adapter_dim,
            "weights": self.weights or None,
        }


@dataclass
class TeachersCfg:
    models: Annotated[tuple[str, ...], tyro.conf.arg(aliases=("--teachers",))] = ("resnet152", "efficientnet_b2")
    """teacher architectures (timm or zoo names); also accepts one comma-separated string."""
    checkpoints: tuple[str, ...] = ()
    """fine-tuned teacher checkpoints, one per model; empty = use the cache (fine-tuning what is missing)."""
    pretrained: bool = True
    """fine-tune teachers from timm's ImageNet weights (from the Hugging Face hub or its local cache; offline:
    --teachers.weights with --teachers.pretrained False)."""
    weights: tuple[str, ...] = ()
    """fine-tune the teachers from local files of pretrained weights instead, one per --teachers.models, in its
    order (as --student.weights; needs --teachers.pretrained False); a file's sha256 is part of the teacher's identity."""
    cache_dir: str = "runs/teacher_cache"
    """where fine-tuned teachers are cached (the name records dataset, arch, stem, classes, seed, data hash)."""
    select: Literal["best", "0", "1", "both"] = "best"
    """teacher(s) a single-teacher baseline distils from: best by val accuracy, by position, or both (KD of the
    mean logits); multi-teacher methods (aver, camkd, ebkd, aekd) always use every teacher."""
    epochs: int = 30
    """teacher fine-tuning epochs (stage 0)."""
    lr: float = 0.01
    """teacher fine-tuning learning rate (optimiser and schedule as in --optim)."""
    label_smoothing: float = 0.0
    """label smoothing for teacher fine-tuning."""
    image_size: int = 0
    """teachers see the batch resized to this size inside their wrapper (0 = the student's size)."""
    seed: int = 0
    """seed of teacher fine-tuning (with the teacher's identity: its init and data order); not --run.seed."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """precision of the frozen teachers' forward (inference mode; outputs float32), whatever --run.amp: auto =
    bf16 on CUDA and on CPUs with AMX / AVX-512-BF16, else fp32. ASMB: phase B's teachers, phase A's student."""
    compile: bool = False
    """torch.compile the frozen teachers for inference (weights frozen into the graph; CUDA graphs on GPU), instead
    of --run.compile's; not with --method asmb, whose teachers train in phase A."""


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

    def mix_alphas(self, distill: bool) -> tuple[float, float]:
        """(mixup_alpha, cutmix_alpha) of a training phase: distillation phases use cutmix_alpha_distill instead of
        cutmix_alpha when it is > 0 (CutMix still wins over MixUp)."""
        return (
            self.mixup_alpha,
            self.cutmix_alpha_distill if distill and self.cutmix_alpha_distill > 0 else self.cutmix_alpha,
        )


@dataclass
class RunCfg:
    name: str = ""
    """run directory name, relative, under out_dir; empty = <method>-<student>-from-<teachers joined by +>-<dataset>-s<seed>-<YYYYmmdd-HHMMSS>, e.g. kd-resnet8-from-resnet32x4-cifar100-s0-20250101-120000 (ce: ce-<student>-<dataset>-s<seed>-<time>; teacher: teacher-<teachers>-<dataset>-s<seed>-<time>)."""
    out_dir: str = "runs"
    """parent directory of run directories."""
    overwrite: bool = False
    """empty and reuse an existing kd run directory of the same name (one holding .kd-run), after every check."""
    seed: int = 0
    """seed of the student: its initialisation and data order (the split: --data.split-seed; teachers: --teachers.seed)."""
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
    dist_timeout_min: float = 30.0
    """with several processes: a rank waiting longer than this in a collective ends the run with one line (no hang)."""
    log_every: int = 0
    """off a terminal (slurm, `| tee`): a progress line (step, loss, images/s, ETA) every N steps; 0 = about every 30 s."""


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
class CommonConfig:
    """Knowledge distillation with kd. Every option below is `--group.option VALUE`; booleans take true/false
    (or 1/0, yes/no); `--config PATH` starts from a saved config.json (flags override it)."""

    method: MethodName = "kd"
    """what to train: teacher (fine-tune the teachers), ce (the student alone), a single-teacher baseline (logit or
    feature), a multi-teacher baseline (every --teachers model) or asmb (two-teacher ASMB, see --asmb.*); the
    families are kd/methods/__init__.py's table."""
    preset: Literal["none", "smoke"] = "none"
    """start from a preset (smoke: tiny models and synthetic data, a few CPU minutes); flags override it."""
    data: DataCfg = field(default_factory=DataCfg)
    student: StudentCfg = field(default_factory=StudentCfg)
    teachers: TeachersCfg = field(default_factory=TeachersCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    run: RunCfg = field(default_factory=RunCfg)
    wandb: WandbCfg = field(default_factory=WandbCfg)

    @property
    def spec(self) -> MethodSpec:
        """The method's line in kd/methods/__init__.py's table: code asks it (family, uses_teachers,
        multi_teacher), never the method's name."""
        return METHOD_SPECS[self.method]


# The whole config: the common groups, then one `--<method>.*` group per method of the table that has options.
METHOD_GROUPS = tuple(name for name, spec in METHOD_SPECS.items() if spec.config is not None)
Config = dataclasses.make_dataclass(
    "Config",
    [(name, METHOD_SPECS[name].config, field(default_factory=METHOD_SPECS[name].config)) for name in METHOD_GROUPS],
    bases=(CommonConfig,),
    namespace={"__doc__": CommonConfig.__doc__},
)
Config.__module__ = __name__


def smoke_preset() -> Config:
    """Tiny zoo models on built-in synthetic data: the whole pipeline in a few CPU minutes."""
    cfg = Config(preset="smoke")
    cfg.data = DataCfg(
        dataset="synthetic", batch_size=64, workers=0, synthetic_train_size=2000, synthetic_test_size=500
    )
    cfg.student = StudentCfg(model="resnet8")
    cfg.teachers = TeachersCfg(models=("resnet20", "wrn_16_2"), pretrained=False, epochs=3, lr=0.05)
    cfg.optim = OptimCfg(lr=0.05, epochs=3, schedule="cosine", milestones=())
    cfg.asmb = AsmbCfg(num_stages=2, teacher_epochs=1, student_epochs=2)
    return cfg


PRESETS = {"none": Config, "smoke": smoke_preset}


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases (`*name`): a few lines of nested aliases expand to gigabytes (a "billion laughs"),
    and no config or sweep spec needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(f"aliases (*{self.peek_event().anchor}) are not allowed here")
        return super().compose_node(parent, index)


def load_yaml(text: str):
    """yaml.safe_load without aliases (config files and sweep specs)."""
    return yaml.load(text, Loader=_NoAliasLoader)


CONFIG_HELP = (
    " `--config PATH` starts from a run's config.json (or its run directory) or a YAML/JSON file of "
    "config groups (`optim: {lr: 0.1}`); flags given with it override it."
)


def parse_config(argv: list[str]) -> Config:
    """Parse argv with tyro on top of the chosen preset and `--config PATH` (a saved config.json, or a run
    directory holding one). Booleans take explicit values (true/false, 1/0, yes/no in any case) so wandb
    agents' `--flag=True` works; `--teachers a,b` is split on commas; `--method X --help` shows X's group only."""
    config_path, argv = pop_option(argv, "--config")
    argv = normalize_booleans(argv, bool_flags(Config))
    preset = "none"
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    default = PRESETS[preset]()
    if config_path is not None:
        yaml_file = Path(config_path).suffix.lower() in (".yaml", ".yml")
        default = load_config_json(config_path, default, *((load_yaml, "YAML") if yaml_file else ()))
    cfg_type, description = Config, DESCRIPTION + CONFIG_HELP
    if "--help" in argv or "-h" in argv:  # focused help: the common groups and the chosen method's group only
        method = pop_option(argv, "--method")[0] or default.method
        cfg_type = focused_config(Config, method, METHOD_GROUPS, lambda t: Annotated[t, tyro.conf.Suppress])
        default = cfg_type(**{f.name: getattr(default, f.name) for f in dataclasses.fields(Config)})
        description += f" Showing --method {method}'s options; `--method X --help` shows another method's."
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            cfg, unknown = tyro.cli(
                cfg_type,
                args=argv,
                default=default,
                description=description,
                config=(tyro.conf.FlagConversionOff,),
                return_unknown_args=True,
            )
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise ConfigError(first_message(captured.getvalue())) from None
    if unknown:
        raise ConfigError(unknown_flag_message(unknown, flag_names(Config())))
    cfg.teachers.models = tuple(m.strip() for s in cfg.teachers.models for m in s.split(",") if m.strip())
    return cfg


def check_weights_path(path: str, flag: str) -> None:
    """A weight file named by `flag` exists and is a readable file (its content is checked in run())."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{flag}: file {path} not found")
    if not p.is_file() or not os.access(p, os.R_OK):
        raise ConfigError(f"{flag}: {path} is not a readable file")


def validate(cfg: Config) -> None:
    """Reject bad values before any work (ConfigError -> one line, exit 2)."""

    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for name in ("data", "student", "teachers", "optim", "run", cfg.method):
        group = getattr(cfg, name, None)
        for f in dataclasses.fields(group) if dataclasses.is_dataclass(group) else ():
            v, flag = getattr(group, f.name), f"--{name}.{f.name.replace('_', '-')}"
            check(not isinstance(v, float) or math.isfinite(v), f"{flag} must be finite, got {v}")
            check(not isinstance(v, (int, float)) or isinstance(v, bool) or v >= 0, f"{flag} must be >= 0, got {v}")
    method_group = getattr(cfg, cfg.method, None)
    if hasattr(method_group, "check"):
        method_group.check()  # the method's own range checks (e.g. temperature > 0)
    check(0.0 < cfg.data.val_fraction < 1.0, f"--data.val-fraction must be in (0, 1), got {cfg.data.val_fraction}")
    check(cfg.student.drop_rate < 1, f"--student.drop-rate must be < 1, got {cfg.student.drop_rate}")
    check(cfg.optim.momentum < 1, f"--optim.momentum must be in [0, 1), got {cfg.optim.momentum}")
    check(cfg.run.seed < 2**32, f"--run.seed must be in [0, 2**32), got {cfg.run.seed}")
    check(
        max(cfg.data.image_size, cfg.teachers.image_size, cfg.data.synthetic_image_size) <= 1024,
        "--data.image-size, --teachers.image-size and --data.synthetic-image-size must be <= 1024",
    )
    for flag, size in (("data.image-size", cfg.data.image_size), ("teachers.image-size", cfg.teachers.image_size)):
        check(size == 0 or size >= 8, f"--{flag} {size} is too small for any model here (0 = native, else >= 8)")
    check_run_name(cfg.run.name)
    check(cfg.optim.label_smoothing < 1 and cfg.teachers.label_smoothing < 1, "label smoothing must be < 1")
    check(all(m > 0 for m in cfg.optim.milestones), "--optim.milestones must be positive epochs")
    check(cfg.optim.warmup_epochs < cfg.optim.epochs, "--optim.warmup-epochs must be < --optim.epochs")
    check(cfg.run.keep_last >= 1, "--run.keep-last must be >= 1")
    check(cfg.run.dist_timeout_min > 0, f"--run.dist-timeout-min must be > 0, got {cfg.run.dist_timeout_min}")
    check(
        cfg.data.max_extract_gb > 0 and cfg.data.max_extract_files >= 1,
        "--data.max-extract-gb must be > 0 and --data.max-extract-files >= 1",
    )
    for flag in (
        "data.batch_size",
        "data.eval_batch_size",
        "optim.lr",
        "optim.epochs",
        "optim.gamma",
        "teachers.lr",
        "teachers.epochs",
    ):
        value = getattr(getattr(cfg, flag.split(".")[0]), flag.split(".")[1])
        check(value > 0, f"--{flag.replace('_', '-')} must be > 0, got {value}")
    check(not (cfg.run.resume and cfg.run.overwrite), "--run.resume and --run.overwrite exclude each other")
    check(
        cfg.run.resume != "auto" or bool(cfg.run.name),
        "--run.resume auto needs --run.name (the run directory to continue)",
    )
    if cfg.spec.family != "teacher" and cfg.student.weights:
        check(
            not cfg.student.pretrained,
            "--student.weights and --student.pretrained True both choose the student's "
            "start: pass --student.pretrained False with a weights file",
        )
        check(
            not cfg.student.checkpoint,
            "--student.weights and --student.checkpoint both choose the student's start: pass one of them",
        )
        check_weights_path(cfg.student.weights, "--student.weights")
    if cfg.spec.uses_teachers:
        check(len(cfg.teachers.models) >= 1, "--teachers needs at least one model")
        check(
            not cfg.teachers.checkpoints or len(cfg.teachers.checkpoints) == len(cfg.teachers.models),
            f"--teachers.checkpoints has {len(cfg.teachers.checkpoints)} paths for {len(cfg.teachers.models)} teachers",
        )
        check(
            not cfg.teachers.weights or len(cfg.teachers.weights) == len(cfg.teachers.models),
            f"--teachers.weights has {len(cfg.teachers.weights)} files for {len(cfg.teachers.models)} teachers "
            f"({', '.join(cfg.teachers.models)}): give one per --teachers.models, in its order",
        )
        check(
            not (cfg.teachers.weights and cfg.teachers.pretrained),
            "--teachers.weights replaces timm's hub weights, but --teachers.pretrained is True (its default): "
            "pass --teachers.pretrained False with --teachers.weights",
        )
        for path in cfg.teachers.weights:
            check_weights_path(path, "--teachers.weights")
        if cfg.teachers.select in ("0", "1"):
            check(
                int(cfg.teachers.select) < len(cfg.teachers.models),
                f"--teachers.select {cfg.teachers.select} but only {len(cfg.teachers.models)} teacher(s)",
            )
    if cfg.spec.family == "multi-teacher":
        check(
            len(cfg.teachers.models) >= 2,
            f"--method {cfg.method} distils from several teachers, --teachers has {len(cfg.teachers.models)}",
        )
    if cfg.spec.family == "asmb":
        check(
            len(cfg.teachers.models) == 2,
            f"--method asmb distils from two teachers, --teachers has {len(cfg.teachers.models)}",
        )
        check(
            not cfg.teachers.compile,
            "--teachers.compile freezes the teachers' weights into the graph, but asmb's "
            "teachers train in phase A (use --run.compile)",
        )
    check(
        min(cfg.data.randaugment) >= 0 and cfg.data.randaugment[1] <= 30,
        f"--data.randaugment needs N >= 0 and M in [0, 30], got {' '.join(map(str, cfg.data.randaugment))}",
    )
    if cfg.data.loader == "fast":
        check(
            cfg.data.dataset != "imagefolder",
            "--data.loader fast needs tensor-backed data (synthetic, cifar100, "
            "tiny-imagenet), not imagefolder; use auto or torch",
        )
        check(cfg.data.randaugment[0] == 0, "--data.loader fast does not do RandAugment; use auto or torch")
    check(
        not cfg.data.classes or cfg.data.dataset in ("imagefolder", "tiny-imagenet"),
        f"--data.classes selects classes of imagefolder or tiny-imagenet, not {cfg.data.dataset}",
    )
    if cfg.data.dataset != "synthetic":
        check(
            Path(cfg.data.root).exists() or cfg.data.dataset == "cifar100",
            f"data root {cfg.data.root} does not exist (--data.root)",
        )


# What may differ between a run and its resumption: where it runs and writes, how it loads data and
# checkpoints, wandb. Everything else (method, models, data, batch size, optimiser, schedule, epochs, seed,
# precision) must match, or the continued run would not be the run that was started.
RESUME_MAY_CHANGE = (
    "preset",
    "run.resume",
    "run.overwrite",
    "run.name",
    "run.out_dir",
    "run.device",
    "run.deterministic",
    "run.compile",
    "run.ckpt_every_steps",
    "run.keep_last",
    "run.log_every",
    "data.workers",
    "data.root",
    "data.cache_dir",
    "data.eval_batch_size",
    "teachers.cache_dir",
    "data.max_extract_gb",
    "data.max_extract_files",
    "run.dist_timeout_min",
    "teachers.compile",
    "wandb.",
)


def preflight(argv: list[str]) -> int | None:
    """train.py's first step, before torch loads: --help prints (0), a bad flag or value prints one line (2;
    under torchrun, rank 0 only: every rank fails alike); None = go on to the run."""
    try:
        validate(parse_config(argv))
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except BrokenPipeError:  # --help | head: the reader stopped reading; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 0
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return None
