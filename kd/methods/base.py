"""The uniform method API (in the spirit of mdistiller): a method owns its auxiliary trainable
modules (regressors, embeddings, memory banks as buffers) and turns one batch's model outputs into
a dict of named, unweighted loss terms plus a dict of weights. The training loop sums
weight * term and logs every term, so logging, weighting and sweeps need no special cases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..freeze import kept_modes
from ..models import KDModel, ModelOutput


@dataclass
class StepInputs:
    """Everything a method may read for one training batch.

    x: [B,3,H,W] images (already mixed when MixUp/CutMix is on); target: [B] indices or [B,C]
    probabilities; index: [B] positions in the training split; epoch: 1-based global epoch.
    student / teachers: outputs computed once per batch by the loop (teachers without grad).
    """

    x: Tensor
    target: Tensor
    index: Tensor
    epoch: int
    student: ModelOutput
    teachers: list[ModelOutput]


class Method(nn.Module):
    """Base class. Subclasses set `name`, the class attributes below, and implement `loss_terms`."""

    name: ClassVar[str] = ""
    uses_teachers: ClassVar[bool] = True  # False: trains without teachers (ce)
    needs_maps: ClassVar[bool] = False  # True: the loop asks models for intermediate feature maps
    needs_index: ClassVar[bool] = False  # True: uses sample indices (CRD)
    multi_teacher: ClassVar[bool] = False  # True: gets every --teachers model (>= 2), ignoring --teachers.select

    def __init__(
        self,
        cfg,
        student: KDModel,
        teachers: list[KDModel],
        *,
        num_classes: int,
        num_train: int,
        label_smoothing: float = 0.0,
        image_size: int = 0,
        train_labels: Tensor | None = None,
    ):
        """`image_size`: side of the training images (0 = unknown), for methods that probe feature-map
        shapes to size their auxiliary modules (FitNet). `train_labels`: [num_train] int64 labels of
        the training split in loader index order, for methods that sample by class (CRD); others
        ignore both."""
        # The models are not registered as submodules: the loop trains and saves them; the method's
        # state_dict holds only its own auxiliary modules and buffers.
        super().__init__()
        if self.multi_teacher and len(teachers) < 2:
            raise ConfigError(
                f"--method {self.name} distils from several teachers; got {len(teachers)} (--teachers a,b)"
            )
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_train = num_train
        self.label_smoothing = label_smoothing
        self.image_size = image_size

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss_weights(self, epoch: int) -> dict[str, float]:
        """Weight of each term at `epoch` (1-based). Terms without a weight count with weight 1."""
        return {}

    def forward(self, inp: StepInputs) -> dict[str, Tensor]:
        return self.loss_terms(inp)

    def total_loss(self, terms: dict[str, Tensor], epoch: int) -> Tensor:
        """The scalar to backpropagate: the terms weighted by loss_weights(epoch) (weighted_loss: zero-weight
        terms left out of the graph), for train.py's step and any loop of your own."""
        return weighted_loss(terms, self.loss_weights(epoch))


def warmup_factor(epoch: int, warmup: int) -> float:
    """A loss weight's linear warm-up: min(epoch / warmup, 1) for 1-based epochs; 1 when warmup is 0 (DKD and
    ASMB's phase-B dkd)."""
    return 1.0 if warmup <= 0 else min(epoch / warmup, 1.0)


def weighted_loss(terms: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """sum of weight * term over the terms (weight 1 when not listed), leaving out every term whose weight is
    0: such a term stays out of the graph, so parameters only it reaches get no gradient (grad None) and the
    optimiser skips them (no weight decay or momentum from a zero gradient; CA-MKD's embeddings in epoch 1,
    as in the authors' loop). The other terms are summed in the same order as before (same numbers).
    All weights 0: 0 * the first term (a zero loss with a graph)."""
    kept = [weights.get(k, 1.0) * v for k, v in terms.items() if weights.get(k, 1.0) != 0]
    if not kept:
        return 0.0 * next(iter(terms.values()))
    return sum(kept)


@torch.no_grad()
def map_shapes(model: KDModel, image_size: int) -> list[tuple[int, int, int]]:
    """(C, H, W) of each map model(x, with_maps=True) returns for `image_size` px inputs, from one
    forward of a zero image in eval mode (so BatchNorm statistics are untouched)."""
    param = next(model.parameters())
    with kept_modes(model):
        model.eval()
        x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
        maps = model(x, with_maps=True).maps
    return [tuple(m.shape[1:]) for m in maps]


def teacher_logits(inp: StepInputs) -> Tensor:
    """The teacher logits the logit-based methods distil from: the single selected teacher, or the
    mean of the selected teachers' logits (`--teachers.select both`)."""
    if len(inp.teachers) == 1:
        return inp.teachers[0].logits
    return torch.stack([t.logits for t in inp.teachers]).mean(0)
