"""Weights a user can take away: a student's plain timm state_dict in the safetensors format.

The format (a little-endian u64 header length, a JSON header of name -> dtype/shape/byte offsets, then the raw
bytes) is written and read here with torch alone, so kd needs no extra package; files open with
`safetensors.torch.load_file` as well. A kd student (kd.models.KDModel) keeps its timm model under
`backbone.`; the export drops that prefix, so `timm.create_model(arch, num_classes=C).load_state_dict(...)`
takes it (a small-input student needs the same stem: kd.models.create_model(arch, C, small_input=True).backbone).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def timm_state_dict(model_state: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Tensor] | None:
    """The timm model's own entries of a KDModel state_dict (`backbone.` stripped); None when the student has
    parts timm's model lacks (a residual adapter, --student.adapter-dim > 0)."""
    if meta.get("adapter_dim", 0) or any(not k.startswith("backbone.") for k in model_state):
        return None
    return {k[len("backbone.") :]: v for k, v in model_state.items()}


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (any device; copied to CPU, contiguous) to `path` in the safetensors format, atomically."""
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file (CPU); a malformed file is a CheckpointError."""
    raw = Path(path).read_bytes()
    try:
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
        data = memoryview(raw)[8 + size :]
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            flat = torch.frombuffer(bytearray(data[start:end]), dtype=torch.uint8)
            out[name] = flat.view(NAME_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        return out
    except (struct.error, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
