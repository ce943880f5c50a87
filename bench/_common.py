"""Shared pieces of bench/step.py and bench/epoch.py: train.py configs for a model pair, the objects run()
builds from them (student, teachers, method, Trainer, DeviceLoader), and the plain reference loop in the style
of the standard KD toolboxes (PIL-backed dataset, torchvision PIL transforms, DataLoader workers, eager NCHW
float32 models, plain torch.optim, `.item()` every step).

"Ours" is train.py's own code: the Trainer from single_trainer (or ASMB's phase trainers from AsmbRun), stepped
through train.train_epoch on the DeviceLoader that build_loaders makes. The reference loop and the
hand-written loop call the same models and the same loss functions (Method.loss_terms), so a ratio between
them isolates the loop: data path, teacher mode, memory layout, precision, syncs and optimiser.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train.py and kd/ of this checkout, installed or not

import train  # noqa: E402
from kd.asmb import build_asmb_modules  # noqa: E402
from kd.engine.checkpoint import Checkpointer  # noqa: E402
from kd.engine.device import resolve_device  # noqa: E402
from kd.engine.rng import seed_everything  # noqa: E402
from kd.engine.trainer import FitState, Trainer  # noqa: E402
from kd.freeze import apply_freeze, set_train  # noqa: E402
from kd.methods import METHOD_SPECS  # noqa: E402
from kd.methods.base import StepInputs  # noqa: E402
from kd.models import create_model  # noqa: E402
from kd.teachers import FrozenModel, frozen_forward, select_teachers, teacher_small_input  # noqa: E402


@dataclass(frozen=True)
class Pair:
    """A student, its teacher(s) and the methods benchmarked on them."""

    name: str
    student: str
    teachers: tuple[str, ...]
    methods: tuple[str, ...]


CIFAR_PAIR = Pair("resnet32x4->resnet8x4", "resnet8x4", ("resnet32x4",), ("ce", "kd", "dkd", "at", "fitnet", "crd"))
ASMB_PAIR = Pair(
    "resnet152+efficientnet_b2->convnext_tiny", "convnext_tiny", ("resnet152", "efficientnet_b2"), ("asmb:A", "asmb:B")
)


def setup(threads: int, device: str) -> torch.device:
    """Apply --threads (> 0) and check --device; the common start of every bench script."""
    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_argv(
    pair: Pair, method: str, *, batch: int, train_size: int, steps: int, device: str, flags: str = ""
) -> list[str]:
    """train.py's command line for `method` on `pair` (synthetic CIFAR-shaped data, 100 classes, 32 px),
    `steps` steps per train_epoch call, then the caller's extra train.py `flags`."""
    return [
        "--method",
        method.split(":")[0],
        "--student.model",
        pair.student,
        "--teachers",
        ",".join(pair.teachers),
        "--teachers.pretrained",
        "False",
        "--data.dataset",
        "synthetic",
        "--data.synthetic-classes",
        "100",
        "--data.synthetic-train-size",
        str(train_size),
        "--data.synthetic-test-size",
        "100",
        "--data.synthetic-image-size",
        "32",
        "--data.batch-size",
        str(batch),
        "--run.device",
        device,
        "--run.max-steps-per-epoch",
        str(steps),
        "--wandb.mode",
        "disabled",
        *shlex.split(flags),
    ]


def parse(argv: list[str]) -> train.Config:
    cfg = train.parse_config(argv)
    train.validate(cfg)
    return cfg


def build_data(cfg: train.Config):
    """DataSplits of the synthetic set, exactly as train.run() builds them."""
    return train.load_data(cfg)


# ----------------------------------------------------------------------------------------------- train.py's objects


@dataclass
class Bundle:
    """What one training phase of train.run() holds: the Trainer, its loader, and the models it steps."""

    cfg: train.Config
    trainer: Trainer
    loader: Any
    student: nn.Module
    teachers: list[nn.Module]
    phase: str  # "single", "A" or "B"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.trainer.device


def build_ours(cfg: train.Config, data, phase: str = "single") -> Bundle:
    """The objects train.run() (single-stage methods: single_trainer) or train_asmb() (phase "A" / "B": AsmbRun)
    builds for `cfg`, through train.py's own builders, with randomly initialised teachers prepared as stage 0
    prepares the fine-tuned ones (speed does not depend on the weights; the bench never fine-tunes)."""
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    device = resolve_device(cfg.run.device)
    small = cfg.student.small_stem(data.image_size)
    student = train.build_student(cfg, data, small, None)
    loader = train.build_loaders(cfg, data, device)["train"]
    steps = train.steps_per_epoch(cfg, loader)
    asmb = cfg.method == "asmb"
    adapter_dim = cfg.asmb.teacher_adapter_dim if asmb and cfg.asmb.teacher_freeze == "adapter" else 0
    teachers = (
        [
            train.prepare(
                create_model(
                    arch,
                    data.num_classes,
                    small_input=teacher_small_input(small, cfg.teachers.image_size),
                    adapter_dim=adapter_dim,
                ),
                cfg,
                device,
                inference=True,
            )
            for arch in cfg.teachers.models
        ]
        if METHOD_SPECS[cfg.method].uses_teachers
        else []
    )
    if not asmb:
        teachers = select_teachers(cfg.teachers.select, [(t, 0.0) for t in teachers])
        tr = train.single_trainer(cfg, data, train.make_runtime(cfg, device), student, teachers, steps)
        return Bundle(cfg, tr, loader, tr.model, teachers, "single")
    for t in teachers:
        apply_freeze(t, cfg.asmb.teacher_freeze)  # as train_asmb() does after stage 0
    modules = build_asmb_modules(cfg.asmb, [t.num_features for t in teachers], student, data.num_classes)
    run = train.build_asmb_run(
        cfg,
        train.make_runtime(cfg, device),
        train.prepare(student, cfg, device),
        teachers,
        modules,
        steps,
        data.num_classes,
    )
    return Bundle(cfg, run.phase_a if phase == "A" else run.phase_b, loader, student, teachers, phase, {"run": run})


def ours_steps(b: Bundle, steps: int) -> None:
    """`steps` steps of train.py's own loop: train.train_epoch over the DeviceLoader (steps_per_epoch = steps)."""
    b.trainer.steps_per_epoch = steps
    train.train_epoch(FitState(b.trainer, "bench", b.loader), 1, "bench", Checkpointer.disabled())


# ----------------------------------------------------------------------------------------------- hand-written loop


def cycle(loader) -> Iterator:
    while True:
        yield from loader


def forward_loss(
    b: Bundle, x: Tensor, y: Tensor, index: Tensor, weights: dict[str, float], reference: bool = False
) -> tuple[Any, Tensor]:
    """The forward and weighted loss both hand-written loops share: phase A runs the (frozen) student for the
    query and the teachers with grad; otherwise the teachers run frozen (kd.teachers.frozen_forward at
    --teachers.precision) and the student trains. `reference`: as the toolboxes do, the frozen models run
    under no_grad in the caller's precision (float32 for the reference loop)."""
    method = b.trainer.method
    if reference:
        with torch.no_grad():
            s_out = b.extra["run"].synergy.student(x) if b.phase == "A" else None
            t_outs = [] if b.phase == "A" else [t(x, with_maps=method.needs_maps) for t in b.teachers]
        if b.phase == "A":
            t_outs = [t(x) for t in b.extra["run"].synergy.teachers]
        else:
            s_out = b.student(x, with_maps=method.needs_maps)
    elif b.phase == "A":
        synergy = b.extra["run"].synergy
        s_out = FrozenModel(synergy.student, b.trainer.runtime.teacher_dtype)(x)
        t_outs = [t(x) for t in synergy.teachers]
    else:
        t_outs = frozen_forward(b.teachers, x, with_maps=method.needs_maps, dtype=b.trainer.runtime.teacher_dtype)
        s_out = b.student(x, with_maps=method.needs_maps)
    terms = method.loss_terms(StepInputs(x=x, target=y, index=index, epoch=1, student=s_out, teachers=t_outs))
    return s_out, sum(weights.get(k, 1.0) * v for k, v in terms.items())


def hand_stepper(b: Bundle) -> Callable[[int], None]:
    """The best loop a user would write by hand with the same kernels: our data path (DeviceLoader), the same
    models, flags (layout, precision), loss calls, optimiser and schedule, inline, without the Trainer, the
    StudentStep module, the loss tracker or the progress bar."""
    tr, device = b.trainer, b.device
    batches = cycle(b.loader)
    method, opt, sched = tr.method, tr.optimizer, tr.scheduler
    amp = dict(
        device_type=device.type, dtype=tr.runtime.amp_dtype or torch.float32, enabled=tr.runtime.amp_dtype is not None
    )
    weights = method.loss_weights(1)
    if b.phase == "A":
        b.extra["run"].synergy.train()  # teachers in their freeze policy's modes, student in eval
    else:
        set_train(b.student, tr.freeze_policy)
    method.train()

    def steps(n: int) -> None:
        for _ in range(n):
            x, y, index = next(batches)
            if tr.runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(**amp):
                _, loss = forward_loss(b, x, y, index, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    return steps


# ----------------------------------------------------------------------------------------------- reference loop


class PILImageDataset(Dataset):
    """CIFAR-style dataset as torchvision's CIFAR100 keeps it: uint8 HWC arrays, one PIL image per item,
    then the PIL transform pipeline. Items (image, label, index) (CRD's instance-sample datasets add the index)."""

    def __init__(self, images_nchw: Tensor, labels: Tensor, transform: Callable):
        self.data = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()  # [N,H,W,3] like CIFAR100.data
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i], i


def reference_loader(data, batch: int, workers: int, device: torch.device) -> DataLoader:
    """DataLoader over PILImageDataset with the toolboxes' CIFAR augmentation (torchvision PIL transforms)."""
    tf = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(data.mean, data.std)]
    )
    ds = PILImageDataset(data.train_images, data.train_labels, tf)
    return DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def accuracy(logits: Tensor, target: Tensor, topk: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """Top-k accuracy (%) of a batch, as the toolboxes log it every step."""
    pred = logits.topk(max(topk), dim=1).indices
    correct = pred.eq(target[:, None])
    return [correct[:, :k].any(dim=1).float().mean() * 100 for k in topk]


def reference_stepper(b: Bundle, batches: Iterator) -> Callable[[int], None]:
    """A plain loop in the style of the standard toolboxes (RepDistiller / mdistiller): batches from a PIL
    DataLoader, eager NCHW float32 models (the Bundle must be built without layout/precision flags), teachers
    under no_grad, plain torch.optim (default implementation, no per-step schedule), loss and top-1/top-5
    accuracy read with `.item()` every step. `b` supplies the models and the method (the same loss code)."""
    device, method = b.device, b.trainer.method
    weights = method.loss_weights(1)
    trained = [p for g in b.trainer.optimizer.param_groups for p in g["params"]]
    if b.phase == "A":  # the same two parameter groups, plain Adam
        opt = torch.optim.Adam(
            [
                {k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")}
                for g in b.trainer.optimizer.param_groups
            ]
        )
        b.extra["run"].synergy.train()
    else:
        o = b.cfg.optim
        opt = torch.optim.SGD(trained, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        set_train(b.student, b.trainer.freeze_policy)
    method.train()
    meters = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "n": 0}

    def steps(n: int) -> None:
        for _ in range(n):
            x, y, index = next(batches)
            x, y, index = x.float().to(device), y.to(device), index.to(device)
            s_out, loss = forward_loss(b, x, y, index, weights, reference=True)
            top1, top5 = accuracy(s_out.logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            meters["loss"] += loss.item() * len(y)
            meters["top1"] += top1.item() * len(y)
            meters["top5"] += top5.item() * len(y)
            meters["n"] += len(y)

    return steps


def plain_flags(flags: str) -> str:
    """The reference loop's train.py flags: the caller's with layout / precision / compile set to the toolboxes'
    eager NCHW float32 (the Bundle's models are prepared with them)."""
    out, words = [], shlex.split(flags)
    skip = {
        "--run.channels-last",
        "--run.channels_last",
        "--run.amp",
        "--run.compile",
        "--teachers.precision",
        "--teachers.compile",
    }
    it = iter(words)
    for w in it:
        key = w.split("=", 1)[0]
        if key in skip:
            if "=" not in w:
                next(it, None)
            continue
        out.append(w)
    return shlex.join(
        out
        + ["--run.channels-last", "False", "--run.amp", "off", "--run.compile", "False", "--teachers.precision", "fp32"]
    )


def describe_machine() -> str:
    """lscpu model name, core count, torch version (and the GPU's name when present)."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    parts = [f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    return "; ".join(parts)


# bf16 dense tensor-core peak (TFLOP/s) by GPU name, for the achieved fraction; --peak-tflops overrides.
BF16_PEAK_TFLOPS = {
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
}


def bf16_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return 989.0 if "H100" in name else None


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of fn (torch.utils.flop_counter: matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median(values: list[float]) -> float:
    return float(np.median(values))


__all__ = [
    "ASMB_PAIR",
    "CIFAR_PAIR",
    "Bundle",
    "Pair",
    "accuracy",
    "bf16_peak_tflops",
    "build_data",
    "build_ours",
    "count_flops",
    "cycle",
    "describe_machine",
    "hand_stepper",
    "median",
    "ours_steps",
    "parse",
    "plain_flags",
    "reference_loader",
    "reference_stepper",
    "sync",
    "train_argv",
]
