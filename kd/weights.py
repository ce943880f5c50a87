"""Pretrained weights a model starts from: local weight files (--student.weights, --teachers.weights) adapted to
the model kd builds, and timm's hub weights checked before a run starts (offline: one line, not minutes of retries).

A local file is a state dict saved with torch.save (timm or torchvision layout; a checkpoint dict holding it under
'state_dict' or 'model', kd's checkpoints included) or a .safetensors file. It is loaded as timm's pretrained
loading adapts hub weights: the architecture's own timm checkpoint filter runs first (it remaps foreign layouts and
resamples ViT/Swin patch and position embeddings to the model's grid), a classifier whose class count differs is
dropped (re-initialised), and kd's small-input stem (kd.models) replaces an ImageNet stem conv that no longer fits
(re-initialised, reported). Any other missing key, unexpected key or shape mismatch is one line (CheckpointError).
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import Tensor, nn

from .errors import CheckpointError, first_line
from .io import check_load_size

WRAPPER_KEYS = ("state_dict", "model")  # checkpoint dicts holding the state dict (timm/torchvision scripts, kd)
HUB_PROBE_TIMEOUT_S = 3.0


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of a local weight file, keys as the bare timm model names them (a `module.` (DDP),
    `_orig_mod.` (torch.compile) or `backbone.` (kd) prefix removed). One-line CheckpointError for a missing,
    unreadable or corrupt file and for one that holds no state dict."""
    p = Path(path)
    what = f"weights file {p}"
    if not p.exists():
        raise CheckpointError(f"{what} not found")
    if not p.is_file():
        raise CheckpointError(f"{what} is not a file")
    if not os.access(p, os.R_OK):
        raise CheckpointError(f"{what} cannot be read (permission denied)")
    check_load_size(p, what="weights file")
    try:
        if p.suffix.lower() == ".safetensors":
            import safetensors.torch

            obj: Any = safetensors.torch.load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle/safetensors errors come in many types: all mean "not a weight file"
        kind = "safetensors file" if p.suffix.lower() == ".safetensors" else "torch.save file of tensors"
        reason = first_line(e)
        reason = reason if len(reason) > 12 else f"{type(e).__name__}: {reason}"
        raise CheckpointError(f"{what} is not a readable {kind} ({reason})") from None
    for _ in range(2):  # {'state_dict': ...}, {'model': ...}, kd's {'meta', 'model'}
        if isinstance(obj, dict) and not _all_tensors(obj):
            key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if key is not None:
                obj = obj[key]
    if not isinstance(obj, dict) or not obj or not _all_tensors(obj):
        found = (
            f"a dict with keys {', '.join(map(str, list(obj)[:5]))}"
            if isinstance(obj, dict) and obj
            else "an empty dict"
            if isinstance(obj, dict)
            else type(obj).__name__
        )
        raise CheckpointError(
            f"{what} holds no state dict (found {found}; expected tensors by parameter name, "
            f"or a dict holding them under {' or '.join(map(repr, WRAPPER_KEYS))})"
        )
    state = {str(k).removeprefix("module.").replace("_orig_mod.", ""): v for k, v in obj.items()}
    if all(k.startswith("backbone.") for k in state):  # a kd KDModel (checkpoint or teacher cache)
        state = {k[len("backbone.") :]: v for k, v in state.items()}
    return state


def _all_tensors(d: dict) -> bool:
    return all(isinstance(v, Tensor) for v in d.values())


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content (hex), cached per (path, size, mtime): the identity of a teacher's start."""
    p = Path(path).resolve()
    try:
        st = p.stat()
        return _sha256(str(p), st.st_size, st.st_mtime_ns)
    except OSError as e:
        raise CheckpointError(f"weights file {path} cannot be read ({e.strerror or e})") from None


def classifier_keys(backbone: nn.Module) -> set[str]:
    """State-dict keys of the timm model's classifier (found by identity, so any head name works)."""
    head = backbone.get_classifier()
    names = [n for n, m in backbone.named_modules() if m is head and n]
    return {f"{n}.{k}" for n in names for k, _ in head.named_parameters(recurse=True)}


def load_backbone_weights(backbone: nn.Module, name: str, state: dict[str, Tensor], what: str) -> list[str]:
    """Load `state` (read_weights) into a freshly built timm `backbone` as timm's pretrained loading would, before
    kd adapts its stem. Returns what was adapted, as short notes ("classifier re-initialised (1000 -> 20
    classes)"); raises CheckpointError (one line) for anything else that does not fit."""
    notes: list[str] = []
    state = dict(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    filter_fn = getattr(sys.modules.get(timm.models.model_entrypoint(name).__module__), "checkpoint_filter_fn", None)
    if callable(filter_fn):  # the architecture's own adapter of foreign layouts / other patch or grid sizes
        try:
            state = filter_fn(state, backbone)
        except Exception as e:
            raise CheckpointError(
                f"{what} cannot be adapted to {name} by timm's checkpoint filter ({first_line(e)})"
            ) from None
        resampled = sorted(k for k, v in state.items() if k in shapes and tuple(v.shape) != shapes[k])
        if resampled:
            notes.append(
                f"{', '.join(resampled[:3])}{' ...' if len(resampled) > 3 else ''} resampled by timm "
                "to the model's patch/grid size"
            )
    own = backbone.state_dict()
    head = classifier_keys(backbone)
    head_weight = next((k for k in sorted(head) if k.endswith("weight") and k in state), None)
    want_classes = int(getattr(backbone, "num_classes", 0) or 0)
    if head_weight is not None and state[head_weight].ndim >= 1 and state[head_weight].shape[0] != want_classes:
        notes.append(f"classifier re-initialised ({state[head_weight].shape[0]} -> {want_classes} classes)")
        state = {k: v for k, v in state.items() if k not in head}
        allowed_missing = head
    elif head_weight is None and not head & set(state):  # a headless (feature) file
        notes.append(f"classifier initialised (none in the file; {want_classes} classes)")
        allowed_missing = head
    else:
        allowed_missing = set()
    missing = [
        k for k in own if k not in state and k not in allowed_missing and not k.endswith("num_batches_tracked")
    ]  # older BatchNorm files lack the counter
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [
            f"{len(keys)} {kind} keys (e.g. {', '.join(keys[:3])})"
            for kind, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise CheckpointError(f"{what} does not fit {name}: {'; '.join(parts)}; is it a {name} state dict?")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{what}: {k} has shape {tuple(v.shape)}, {name} expects {tuple(own[k].shape)}")
    backbone.load_state_dict(state, strict=False)  # missing: the dropped classifier and counters only (checked)
    return notes


# ---- timm's hub weights (--student.pretrained / --teachers.pretrained) ----------------------------------------
def hub_weights_status(name: str) -> tuple[str, str]:
    """Where timm's default pretrained weights of `name` would come from, without downloading them:
    ("none", why) when timm has none, ("cached", path) when they are in the local Hugging Face or torch hub cache,
    ("online", host) when the hub answers, ("offline", why) when it cannot be reached or HF_HUB_OFFLINE is set.
    Takes at most about HUB_PROBE_TIMEOUT_S (one TCP connection attempt). Weights cached while the hub cannot be
    reached switch huggingface_hub to its cache (use_hub_cache_only), so loading them does not retry the network."""
    cfg = timm.models.get_pretrained_cfg(name)
    hf_id, url, file = (getattr(cfg, k, None) for k in ("hf_hub_id", "url", "file")) if cfg else (None, None, None)
    if not (hf_id or url or file):
        return "none", f"timm has no pretrained weights for {name}"
    if file:
        return (
            ("cached", str(file)) if Path(file).is_file() else ("offline", f"its pretrained_cfg file {file} is missing")
        )
    host = ""
    if hf_id:
        import huggingface_hub
        from huggingface_hub import constants

        repo, _, revision = hf_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        for filename in names:
            found = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                if not constants.HF_HUB_OFFLINE and not host_reachable(host):
                    use_hub_cache_only()
                return "cached", found
        if constants.HF_HUB_OFFLINE:
            return "offline", "HF_HUB_OFFLINE is set"
    elif url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if cached.is_file():
            return "cached", str(cached)
        host = urlparse(url).hostname or ""
    return ("online", host) if host_reachable(host) else ("offline", f"{host} cannot be reached")


def host_reachable(host: str, port: int = 443, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within timeout_s (name resolution included: it runs in a
    thread, so a hanging resolver cannot hold the caller longer)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def use_hub_cache_only() -> None:
    """Make huggingface_hub read its local cache without trying the network (this process): for weights found
    cached while the hub cannot be reached, which would otherwise be retried for a minute before the cache."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
