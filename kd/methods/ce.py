"""Cross-entropy only: the student trained alone (the no-distillation baseline)."""

from __future__ import annotations

from torch import Tensor

from ..losses import cross_entropy
from .base import Method, StepInputs


class CE(Method):
    name = "ce"
    uses_teachers = False

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        return {"ce": cross_entropy(inp.student.logits, inp.target, self.label_smoothing)}
