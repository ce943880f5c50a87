"""Single-stage training methods with the uniform API of `base.Method`.

Each method is one file holding its config dataclass (its `--<method>.*` CLI group) and its
`Method` subclass; the math lives in kd/losses.py. Register new methods in `METHODS`.
"""

from __future__ import annotations

from .base import Method, StepInputs, teacher_logits
from .ce import CE
from .kd import KD, KDCfg

# name -> (Method subclass, its config dataclass or None)
METHODS: dict[str, tuple[type[Method], type]] = {
    "ce": (CE, None),
    "kd": (KD, KDCfg),
}

__all__ = ["METHODS", "Method", "StepInputs", "teacher_logits"]
