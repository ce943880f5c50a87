"""Teachers as cached artefacts: the input adapter a teacher sees, the cache file that names what made it,
and loading a fine-tuned teacher back (checked against the architecture, class count and stem); and the
forward of a frozen model at inference cost (frozen_forward, FrozenModel).

Stage 0 itself (fine-tuning a missing teacher) is train.py's: it is an ordinary training phase."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import timm
import torch
from torch import Tensor

from .errors import CheckpointError
from .io import atomic_torch_save, safe_torch_load
from .models import KDModel, ModelOutput, check_meta, check_shapes, create_model


def teacher_input_spec(arch: str, pretrained: bool, image_size: int, data_mean: Sequence[float],
                       data_std: Sequence[float]) -> dict[str, Any] | None:
    """KDModel.set_input_transform arguments for teacher `arch`, or None (identity): a pretrained teacher
    gets its pretrained_cfg mean/std when they differ from the data's, and `image_size` > 0 a resize."""
    model_mean, model_std = tuple(data_mean), tuple(data_std)
    pretrained_cfg = timm.models.get_pretrained_cfg(arch) if pretrained else None
    if pretrained_cfg is not None and pretrained_cfg.mean and pretrained_cfg.std:
        model_mean, model_std = tuple(pretrained_cfg.mean), tuple(pretrained_cfg.std)
    same = np.allclose(model_mean, data_mean, atol=1e-4) and np.allclose(model_std, data_std, atol=1e-4)
    if same and image_size == 0:
        return None
    return {"data_mean": list(data_mean), "data_std": list(data_std), "model_mean": list(model_mean),
            "model_std": list(model_std), "size": image_size}


def teacher_small_input(student_small_input: bool, teacher_image_size: int) -> bool:
    """Teachers adapt their stem like the student, unless they get their own image size (<= 64 px: small)."""
    return teacher_image_size <= 64 if teacher_image_size else student_small_input


def teacher_cache_path(cache_dir: str | Path, arch: str, small_input: bool, num_classes: int,
                       data_identity: dict[str, Any], input_spec: dict[str, Any] | None = None) -> Path:
    """<cache_dir>/<dataset>-<arch>-<stem>-<C>c-s<seed>-<hash>.pt; the hash covers the data identity (dataset,
    split, size, seed, root) and the input adapter (a teacher trained behind one is another teacher)."""
    ident = dict(data_identity)
    if input_spec is not None:
        ident["input"] = input_spec
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
    stem = "small" if small_input else "std"
    return Path(cache_dir) / f"{ident['dataset']}-{arch}-{stem}-{num_classes}c-s{ident['seed']}-{digest}.pt"


def save_teacher(path: Path, model: KDModel, state: dict[str, Any], val_acc: float, data_identity: dict[str, Any],
                 input_spec: dict[str, Any] | None) -> None:
    atomic_torch_save({"meta": model.meta(), "model": state, "val_acc": val_acc, "data": data_identity,
                       "input_transform": input_spec}, path)


def load_teacher(path: Path, arch: str, num_classes: int, small_input: bool, img_size: int | None = None,
                 adapter_dim: int = 0, input_spec: dict[str, Any] | None = None) -> tuple[KDModel, float | None]:
    """A fine-tuned teacher from `path` and its recorded validation accuracy (None when not recorded).
    `adapter_dim` > 0 adds a new residual adapter (zero-initialised: the same function) on top of the saved
    weights, which have none (ASMB's teacher_freeze adapter). The input adapter recorded in the file wins
    over `input_spec`."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or "meta" not in ckpt:
        raise CheckpointError(f"teacher checkpoint {path} has no model metadata (not written by kd?)")
    check_meta({"arch": arch, "num_classes": num_classes, "small_input": small_input}, ckpt["meta"],
               f"teacher checkpoint {path}")
    model = create_model(arch, num_classes, small_input=small_input, img_size=img_size, adapter_dim=adapter_dim)
    check_shapes(model, ckpt.get("model"), f"teacher checkpoint {path}")
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)  # checked here: one line
    if unexpected or any(not k.startswith("adapter.") for k in missing):  # only a new adapter may be missing
        raise CheckpointError(f"teacher checkpoint {path} does not fit {arch} (unexpected keys {unexpected[:3]}, "
                              f"missing {missing[:3]})")
    spec = ckpt.get("input_transform", input_spec)
    if spec is not None:
        model.set_input_transform(**spec)
    val_acc = ckpt.get("val_acc")
    return model, None if val_acc is None else float(val_acc)


def check_teacher_checkpoints(paths: Sequence[str], archs: Sequence[str], num_classes: int, small_input: bool,
                              img_size: int | None = None) -> None:
    """Load each given teacher checkpoint once (file, metadata, keys and tensor shapes), so a bad one stops
    the run before it writes anything (stage 0 loads them again for use)."""
    for path, arch in zip(paths, archs):
        load_teacher(Path(path), arch, num_classes, small_input, img_size)


def select_teachers(select: str, teachers: list[tuple[KDModel, float]]) -> list[KDModel]:
    """The teacher(s) a single-teacher baseline distils from, of (model, val accuracy) pairs: all ("both"),
    the best by validation accuracy ("best"), or one by position ("0", "1", ...)."""
    if select == "both":
        return [m for m, _ in teachers]
    if select == "best":
        return [max(teachers, key=lambda t: t[1])[0]] if teachers else []
    return [teachers[int(select)][0]]


def frozen_forward(models: Sequence[KDModel], x: Tensor, *, with_maps: bool = False,
                   dtype: torch.dtype | None = None) -> list[ModelOutput]:
    """Each frozen model's output for batch `x` at inference cost: under torch.inference_mode (no autograd
    bookkeeping) and autocast to `dtype` (None = float32, autocast off even inside the student's), whatever
    precision the caller trains in. The outputs come back as float32 COPIES made outside inference mode:
    ordinary tensors that autograd may save (FitNet's target, CRD's trained teacher embedding) and that a
    CUDA-graph replay of a compiled model cannot overwrite."""
    if not models:
        return []
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
