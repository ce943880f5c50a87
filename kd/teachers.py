"""Teachers as their own artefacts: the input adapter a teacher sees, its identity (everything that made it:
architecture, stem, input adapter, fine-tuning recipe, its own seed, the data's fingerprint and the validation
split), the cache file named by that identity's hash, and loading a fine-tuned teacher back (checked against
the identity the run expects). A teacher's weights depend on its identity only, never on --run.seed, so every
student seed of a study distils from the same teacher file. Also the forward of a frozen model at
inference cost (frozen_forward, FrozenModel).

Stage 0 itself (fine-tuning a missing teacher) is train.py's: it is an ordinary training phase."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
import timm
import torch
from torch import Tensor

from .engine.distributed import say
from .errors import CheckpointError, WriteError
from .io import atomic_torch_save, safe_torch_load
from .metrics import accuracy, gather_outputs
from .models import KDModel, ModelOutput, check_meta, check_shapes, create_model
from .weights import file_sha256


def teacher_input_spec(
    arch: str, pretrained: bool, image_size: int, data_mean: Sequence[float], data_std: Sequence[float]
) -> dict[str, Any] | None:
    """KDModel.set_input_transform arguments for teacher `arch`, or None (identity): a pretrained teacher
    gets its pretrained_cfg mean/std when they differ from the data's, and `image_size` > 0 a resize."""
    model_mean, model_std = tuple(data_mean), tuple(data_std)
    pretrained_cfg = timm.models.get_pretrained_cfg(arch) if pretrained else None
    if pretrained_cfg is not None and pretrained_cfg.mean and pretrained_cfg.std:
        model_mean, model_std = tuple(pretrained_cfg.mean), tuple(pretrained_cfg.std)
    same = np.allclose(model_mean, data_mean, atol=1e-4) and np.allclose(model_std, data_std, atol=1e-4)
    if same and image_size == 0:
        return None
    return {
        "data_mean": list(data_mean),
        "data_std": list(data_std),
        "model_mean": list(model_mean),
        "model_std": list(model_std),
        "size": image_size,
    }


def teacher_small_input(student_small_input: bool, teacher_image_size: int) -> bool:
    """Teachers adapt their stem like the student, unless they get their own image size (<= 64 px: small)."""
    return teacher_image_size <= 64 if teacher_image_size else student_small_input


class TeacherSettings(Protocol):
    """What of the teachers' config group makes a teacher (train.py: --teachers.*)."""

    models: Sequence[str]
    weights: Sequence[str]
    pretrained: bool
    image_size: int
    seed: int
    epochs: int
    lr: float
    label_smoothing: float


class OptimSettings(Protocol):
    """What of the optimiser's config group stage 0 fine-tunes with (train.py: --optim.*)."""

    name: str
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    milestones: Sequence[int]
    gamma: float
    warmup_epochs: float
    mixup_alpha: float
    cutmix_alpha: float
    grad_clip_norm: float


class DataSettings(Protocol):
    """What of the data's config group a teacher depends on (train.py: --data.*); the classes and image size
    enter through the loaded data (its fingerprint, class subset and size)."""

    dataset: str
    val_fraction: float
    split_seed: int
    batch_size: int
    aug: bool
    randaugment: Sequence[int]
    loader: str


class RunSettings(Protocol):
    """What of the run's config group a teacher depends on (train.py: --run.*)."""

    max_steps_per_epoch: int
    amp: str
    sync_bn: bool


def teacher_identities(
    teachers: TeacherSettings,
    optim: OptimSettings,
    data_cfg: DataSettings,
    run: RunSettings,
    data: Any,
    small_input: bool,
    device: torch.device | str = "cpu",
    bridge_split: float = 0.0,
) -> list[dict[str, Any]]:
    """The identity of each of `teachers.models` (teacher_identity) from the config groups (--teachers, --optim,
    --data, --run), the loaded kd.data.DataSplits `data` and the `device` it is fine-tuned on. Its data part is
    the data itself (fingerprint) and the validation split (fraction, --data.split-seed), not the path. A teacher
    started from a local weight file (--teachers.weights) is identified by the file's sha256, not its path.
    `bridge_split` > 0 (ASMB's --asmb.bridge-split): the teacher fits only the teacher-fit part of the training
    split (kd.data.bridge_split, seeded by --data.split-seed), recorded as data.bridge_split."""
    data_ident = {
        "dataset": data_cfg.dataset,
        "fingerprint": data.fingerprint,
        "image_size": data.image_size,
        "val_fraction": data_cfg.val_fraction,
        "split_seed": data_cfg.split_seed,
    }
    if data.class_subset:  # the kept class ids (absent for the whole dataset: older identities stay valid)
        data_ident["classes"] = list(data.class_subset)
    if bridge_split > 0:  # absent when off: every identity (and cache key) without a bridge split is unchanged
        data_ident["bridge_split"] = bridge_split
    recipe = teacher_recipe(teachers, optim, data_cfg, run)
    weights = list(teachers.weights) or [""] * len(teachers.models)
    # a weight file holds pretrained weights: the teacher sees its pretrained_cfg's input stats, as with the hub's
    return [
        teacher_identity(
            arch,
            num_classes=data.num_classes,
            small_input=small_input,
            recipe=recipe,
            input_spec=teacher_input_spec(
                arch, teachers.pretrained or bool(path), teachers.image_size, data.mean, data.std
            ),
            seed=teachers.seed,
            data=data_ident,
            weights_sha256=file_sha256(path) if path else None,
            compute=compute_identity(device),
        )
        for arch, path in zip(teachers.models, weights)
    ]


def compute_identity(device: torch.device | str) -> dict[str, Any]:
    """What a teacher's bits depend on besides its recipe: the device type, on CPU the intra-op thread count
    (float sums are split across threads: 1 and 2 threads give different teachers from the same seed) and the
    number of processes (each gets its share of a batch)."""
    kind = torch.device(device).type
    world = (
        torch.distributed.get_world_size()
        if torch.distributed.is_available() and torch.distributed.is_initialized()
        else 1
    )
    return {"device": kind, **({"threads": torch.get_num_threads()} if kind == "cpu" else {}), "world_size": world}


def teacher_recipe(
    teachers: TeacherSettings, optim: OptimSettings, data: DataSettings, run: RunSettings
) -> dict[str, Any]:
    """How stage 0 fine-tunes a teacher, from the config groups (--teachers, --optim, --data, --run): every
    setting its weights depend on besides the architecture, the data and its seed. The settings it reads are
    the Protocols above; tests/test_teachers.py checks that every other config field is named as not making a
    teacher, so a new flag cannot be left out by mistake."""
    return {
        "epochs": teachers.epochs,
        "lr": teachers.lr,
        "label_smoothing": teachers.label_smoothing,
        "pretrained": teachers.pretrained,
        "image_size": teachers.image_size,
        "optimizer": optim.name,
        "momentum": optim.momentum,
        "nesterov": optim.nesterov,
        "weight_decay": optim.weight_decay,
        "schedule": optim.schedule,
        "milestones": list(optim.milestones),
        "gamma": optim.gamma,
        "warmup_epochs": optim.warmup_epochs,
        "mixup_alpha": optim.mixup_alpha,
        "cutmix_alpha": optim.cutmix_alpha,
        "grad_clip_norm": optim.grad_clip_norm,
        "batch_size": data.batch_size,
        "aug": data.aug,
        "randaugment": list(data.randaugment),
        "loader": data.loader,
        "max_steps_per_epoch": run.max_steps_per_epoch,
        "amp": run.amp,
        **({"sync_bn": True} if run.sync_bn else {}),
    }  # absent when off: earlier identities stay valid


def teacher_identity(
    arch: str,
    *,
    num_classes: int,
    small_input: bool,
    input_spec: dict[str, Any] | None,
    recipe: dict[str, Any],
    seed: int,
    data: dict[str, Any],
    weights_sha256: str | None = None,
    compute: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that made a teacher, as a JSON-able dict: `data` names the dataset, its fingerprint and the
    validation split (fraction and seed); `seed` is --teachers.seed (not --run.seed); `weights_sha256` the
    content of the local weight file it started from (absent when none: identities without one are unchanged);
    `compute` where it was fine-tuned (compute_identity)."""
    identity = {
        "arch": arch,
        "num_classes": num_classes,
        "stem": "small" if small_input else "std",
        "input": input_spec,
        "recipe": recipe,
        "seed": seed,
        "data": data,
    }
    if weights_sha256 is not None:
        identity["weights"] = {"sha256": weights_sha256}
    if compute is not None:
        identity["compute"] = compute
    return identity


def teacher_key(identity: dict[str, Any]) -> str:
    """12 hex digits of sha1 over the identity: equal keys = the same teacher."""
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def teacher_seed(identity: dict[str, Any]) -> int:
    """The seed of a teacher's initialisation and data order: a function of its identity (its --teachers.seed
    included) only, so the same identity gives the same weights whichever run or method trains it. Where it is
    fine-tuned (`compute`) changes its bits, not its seed: one recipe starts from one initialisation everywhere."""
    recipe_only = {k: v for k, v in identity.items() if k != "compute"}
    return int(teacher_key(recipe_only)[:8], 16) % 2**31


def teacher_cache_path(cache_dir: str | Path, identity: dict[str, Any]) -> Path:
    """<cache_dir>/<dataset>-<arch>-<stem>-<C>c-s<teacher seed>-<identity key>.pt."""
    i = identity
    return (
        Path(cache_dir) / f"{i['data']['dataset']}-{i['arch']}-{i['stem']}-{i['num_classes']}c-s{i['seed']}-"
        f"{teacher_key(i)}.pt"
    )


@contextlib.contextmanager
def teacher_lock(path: Path, wait: bool = True):
    """Hold an exclusive flock on `<path>.lock` (beside the cache file `path`) while a teacher is fine-tuned for
    it, so runs sharing a cache (a sweep's concurrent trials) fine-tune each teacher once: the others wait and
    then load it. Yields True when held, False when `wait` is False and another process holds it."""
    try:  # also the check that the cache is writable, before a teacher is fine-tuned for it
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_name(path.name + ".lock"), "a")
    except OSError as e:
        raise WriteError(
            f"cannot write to the teacher cache {path.parent} (--teachers.cache-dir): "
            f"{os.strerror(e.errno) if e.errno else e}"
        ) from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fill_cache(
    paths: Sequence[Path], finetune: Callable[[int], None], redo: Iterable[int] = (), locked: bool = True
) -> float:
    """Fine-tune (`finetune(i)`) the teachers whose cache files are missing and those in `redo` (the one a resumed
    run was fine-tuning, which continues from its checkpoint), each under its file's lock (teacher_lock): a teacher another process is fine-tuning is left for
    last, then waited for and, once that process wrote it, not fine-tuned again. So two trials of a sweep share
    the work instead of doubling it. `locked` False: no locks (the ranks of one run fine-tune together). Says which
    cached files are used as they are; returns the seconds spent waiting for other processes."""
    tuned, waited, redo = set(), 0.0, set(redo)

    def needed(i: int) -> bool:
        return i in redo or not paths[i].exists()

    for wait in (False, True):
        for i, path in enumerate(paths):
            if i in tuned or not needed(i):
                continue
            asked = time.time()
            with teacher_lock(path, wait) if locked else contextlib.nullcontext(True) as held:
                waited += (time.time() - asked) if wait else 0.0  # the lock's holder was fine-tuning it
                if held and needed(i):
                    finetune(i)
                    tuned.add(i)
    for i, path in enumerate(paths):
        if i not in tuned:
            say(f"teacher: using cached {path}")
    return waited


def identity_difference(here: dict[str, Any] | None, there: dict[str, Any] | None) -> str | None:
    """The first field (dotted, e.g. `recipe.epochs`) whose value differs, as "<field> is A here but B there",
    or None when the identities are equal."""
    flat_here, flat_there = _flatten(here or {}), _flatten(there or {})
    for key in sorted(set(flat_here) | set(flat_there)):
        if flat_here.get(key) != flat_there.get(key):
            return f"{key} is {flat_here.get(key)!r} here but {flat_there.get(key)!r} there"
    return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def check_resume_teachers(now: list[dict[str, Any]], saved: list[dict[str, Any]] | None, path: str) -> None:
    """Refuse (one line) to resume a run whose teachers would differ from the ones it started with (its data
    moved to another, different, root; another recipe): a checkpoint records its teachers' identities."""
    if saved is None:
        return  # a checkpoint of an older version: nothing recorded to compare
    if len(now) != len(saved):
        raise CheckpointError(f"cannot resume from {path}: {len(now)} teacher(s) here, {len(saved)} in the checkpoint")
    for here, there in zip(now, saved):
        if teacher_key(here) != teacher_key(there):
            raise CheckpointError(
                f"cannot resume from {path}: teacher {here['arch']} is not the one the run started "
                f"with ({identity_difference(here, there)} in the checkpoint)"
            )


def save_teacher(path: Path, model: KDModel, state: dict[str, Any], val_acc: float, identity: dict[str, Any]) -> None:
    """The fine-tuned teacher with its validation accuracy and full identity (and the identity's key)."""
    atomic_torch_save(
        {
            "meta": model.meta(),
            "model": state,
            "val_acc": val_acc,
            "identity": identity,
            "key": teacher_key(identity),
            "input_transform": identity["input"],
        },
        path,
    )


def load_teacher(
    path: Path,
    arch: str,
    num_classes: int,
    small_input: bool,
    img_size: int | None = None,
    adapter_dim: int = 0,
    input_spec: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
) -> tuple[KDModel, float | None]:
    """A fine-tuned teacher from `path` and its recorded validation accuracy (None when not recorded).
    `adapter_dim` > 0 adds a new residual adapter (zero-initialised: the same function) on top of the saved
    weights, which have none (ASMB's teacher_freeze adapter). The input adapter recorded in the file wins
    over `input_spec`. `identity`: the teacher the run expects; a file recording another identity is refused
    (one line naming the first field that differs), a file recording none is used with a note, and so is one
    recording the same teacher fit on the whole training split when `identity` has a bridge split (a given
    --teachers.checkpoints file is used as given)."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or "meta" not in ckpt:
        raise CheckpointError(f"teacher checkpoint {path} has no model metadata (not written by kd?)")
    if identity is not None and ckpt.get("identity") is None:
        say(f"note: teacher checkpoint {path} records no identity (how it was trained); using it as given")
    elif identity is not None and teacher_key(ckpt["identity"]) != teacher_key(identity):
        whole = whole_split_identity(identity)
        if whole is not identity and teacher_key(ckpt["identity"]) == teacher_key(whole):
            say(
                f"note: teacher checkpoint {path} was fit on the whole training split: used as given, so ASMB's "
                "bridge part (--asmb.bridge-split) is not held out from it"
            )
        else:
            raise CheckpointError(
                f"teacher checkpoint {path} was made differently from this run's {arch} teacher: "
                f"{identity_difference(identity, ckpt['identity'])} in the file (match the "
                "--teachers/--optim/--data flags, or leave --teachers.checkpoints empty to use the "
                "cache)"
            )
    check_meta(
        {"arch": arch, "num_classes": num_classes, "small_input": small_input},
        ckpt["meta"],
        f"teacher checkpoint {path}",
    )
    model = create_model(arch, num_classes, small_input=small_input, img_size=img_size, adapter_dim=adapter_dim)
    check_shapes(model, ckpt.get("model"), f"teacher checkpoint {path}")
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)  # checked here: one line
    if unexpected or any(not k.startswith("adapter.") for k in missing):  # only a new adapter may be missing
        raise CheckpointError(
            f"teacher checkpoint {path} does not fit {arch} (unexpected keys {unexpected[:3]}, missing {missing[:3]})"
        )
    spec = ckpt.get("input_transform", input_spec)
    if spec is not None:
        model.set_input_transform(**spec)
    val_acc = ckpt.get("val_acc")
    return model, None if val_acc is None else float(val_acc)


def whole_split_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """`identity` as it would be without --asmb.bridge-split: the same teacher fit on the whole training split
    (itself when it has no bridge split)."""
    if "bridge_split" not in identity.get("data", {}):
        return identity
    data = {k: v for k, v in identity["data"].items() if k != "bridge_split"}
    return {**identity, "data": data}


def check_teacher_checkpoints(
    paths: Sequence[str],
    archs: Sequence[str],
    num_classes: int,
    small_input: bool,
    img_size: int | None = None,
    identities: Sequence[dict[str, Any]] = (),
) -> None:
    """Load each given teacher checkpoint once (file, metadata, keys and tensor shapes, and the identity it
    records against `identities`), so a bad one stops the run before it writes anything (stage 0 loads them
    again for use)."""
    for i, (path, arch) in enumerate(zip(paths, archs)):
        load_teacher(
            Path(path),
            arch,
            num_classes,
            small_input,
            img_size,
            identity=identities[i] if i < len(identities) else None,
        )


def select_teachers(select: str, teachers: list[tuple[KDModel, float]]) -> list[KDModel]:
    """The teacher(s) a single-teacher baseline distils from, of (model, val accuracy) pairs: all ("both"),
    the best by validation accuracy ("best"), or one by position ("0", "1", ...)."""
    if select == "both":
        return [m for m, _ in teachers]
    if select == "best":
        return [max(teachers, key=lambda t: t[1])[0]] if teachers else []
    return [teachers[int(select)][0]]


def frozen_forward(
    models: Sequence[KDModel], x: Tensor, *, with_maps: bool = False, dtype: torch.dtype | None = None
) -> list[ModelOutput]:
    """Each frozen model's output for batch `x` at inference cost: under torch.inference_mode (no autograd
    bookkeeping) and autocast to `dtype` (None = float32, autocast off even inside the student's), whatever
    precision the caller trains in. The outputs come back as float32 COPIES made outside inference mode:
    ordinary tensors that autograd may save (FitNet's target, CRD's trained teacher embedding) and that a
    CUDA-graph replay of a compiled model cannot overwrite."""
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        outs = [m(x, with_maps=with_maps) for m in models]
    return [float32_copy(o) for o in outs]


def float32_copy(out: ModelOutput) -> ModelOutput:
    """A new float32 tensor for every tensor of `out` (feature, logits, maps)."""
    copy = lambda t: t.to(torch.float32, copy=True)  # noqa: E731
    return ModelOutput(copy(out.feature), copy(out.logits), None if out.maps is None else [copy(m) for m in out.maps])


class FrozenModel:
    """A model called as frozen_forward calls it (inference mode, autocast to `dtype`, float32 copies out), with
    the model's call signature: for a model that is frozen in one phase and trained in another (ASMB phase A's
    student query). Not an nn.Module, so holding it registers nothing."""

    def __init__(self, model: KDModel, dtype: torch.dtype | None):
        self.model, self.dtype = model, dtype

    def __call__(self, x: Tensor, with_maps: bool = False) -> ModelOutput:
        return frozen_forward([self.model], x, with_maps=with_maps, dtype=self.dtype)[0]


def teacher_test_summary(archs: Sequence[str], models: Sequence[KDModel], loader: Any, device: Any) -> dict[str, float]:
    """`teacher/<arch>/test_acc` of every teacher and, with several, `ensemble/test_acc` (their mean logits),
    from one pass over `loader` (the teachers are put in eval mode)."""
    for model in models:
        model.eval()
    logits, labels = gather_outputs(lambda x: {str(i): m(x).logits for i, m in enumerate(models)}, loader, device)
    out = {f"teacher/{arch}/test_acc": accuracy(logits[str(i)], labels) for i, arch in enumerate(archs)}
    if len(models) > 1:
        out["ensemble/test_acc"] = accuracy(torch.stack(list(logits.values())).mean(0), labels)
    return out
