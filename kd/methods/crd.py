"""Contrastive Representation Distillation (Tian et al., ICLR 2020), as in RepDistiller's CRDLoss:
CE on labels + the NCE contrast between student and teacher embeddings of the pooled features.
Published CIFAR-100 defaults: CRD weight 0.8, CE 1 (RepDistiller's KD term has weight 0 and is left
out), 128-d embeddings, 16384 negatives, temperature 0.07, memory momentum 0.5.

State, all in the method (so in the optimiser and in checkpoints):
  - embed_s, embed_t: linear heads on the student / teacher pooled features, outputs L2-normalised;
    both are trained (the teacher itself stays frozen).
  - memory_s, memory_t: [num_train, embed_dim] momentum memory banks of student / teacher embeddings
    (buffers), updated at the batch's sample indices after each training step's scores.
  - z_s, z_t: the NCE normalising constants, estimated on the first training batch, then fixed
    (buffers; 0 means not yet estimated).
Negatives: per sample, `nce_k` training indices drawn without replacement from the other classes,
capped at the fewest other-class samples any class has (small datasets). Needs the training labels
(`train_labels` in loader index order) and the loader's sample indices.

With two selected teachers (`--teachers.select both`) the first one is contrasted: CRD's teacher
memory bank holds one network's embeddings.

Several processes (torchrun): the embeddings and sample indices of all ranks are gathered before the
memory update, negatives are drawn for the global batch, and z is estimated on the global batch, so
the banks equal one process's with the same global batch (see `CRD.crd_term`).

Recipe: CRD's CIFAR-100 protocol trains with lr 0.05, except MobileNetV2 / ShuffleNetV1 / ShuffleNetV2
students at lr 0.01 (`--optim.lr 0.01`), as in RepDistiller's train_student.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import crd_contrast, crd_init_memory, crd_loss, crd_sample_negatives, crd_update_memory, cross_entropy
from ..models import KDModel
from ..configs import CRDCfg
from .base import Method, StepInputs


def num_negatives(train_labels: Tensor, nce_k: int) -> int:
    """min(nce_k, fewest samples outside any one class): every anchor can draw that many distinct negatives."""
    largest_class = int(torch.bincount(train_labels).max())
    return min(nce_k, len(train_labels) - largest_class)


class CRD(Method):
    name = "crd"
    needs_index = True

    def __init__(
        self, cfg: CRDCfg, student: KDModel, teachers: list[KDModel], *, train_labels: Tensor | None = None, **kwargs
    ):
        super().__init__(cfg, student, teachers, **kwargs)
        if train_labels is None or len(train_labels) != self.num_train:
            raise ConfigError(f"crd needs the {self.num_train} training labels (train_labels=...)")
        self.k = num_negatives(train_labels, cfg.nce_k)
        if self.k < 1:
            raise ConfigError("crd needs at least two classes in the training set to draw negatives")
        self.embed_s = nn.Linear(student.num_features, cfg.embed_dim)
        self.embed_t = nn.Linear(teachers[0].num_features, cfg.embed_dim)
        self.register_buffer("train_labels", train_labels.long().clone(), persistent=False)
        self.register_buffer("memory_s", crd_init_memory(self.num_train, cfg.embed_dim))
        self.register_buffer("memory_t", crd_init_memory(self.num_train, cfg.embed_dim))
        self.register_buffer("z_s", torch.zeros(()))
        self.register_buffer("z_t", torch.zeros(()))
        # negatives come from a generator seeded by sample_seed + sample_step, so resumed and multi-process
        # runs draw alike. kd builds DDP with broadcast_buffers=False (DDP then syncs no buffer, not even at
        # construction), so rank 0's banks, z and sample_seed are broadcast here: every rank starts from the
        # same state whatever its RNG (a resumed run then loads the same checkpoint on every rank).
        self.register_buffer("sample_seed", torch.randint(0, 2**31, (), dtype=torch.int64))
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64))
        _broadcast_buffers_from_rank0(self)

    def crd_term(self, f_s: Tensor, f_t: Tensor, index: Tensor) -> Tensor:
        """The CRD loss of one batch of pooled features; in training mode also updates the memory
        banks and, on the first batch, fixes z. Runs in float32 without autocast: exp(./0.07)
        reaches ~1e6, beyond float16.

        Several processes (torch.distributed, each rank a contiguous slice of the global batch): the
        negatives are drawn for the GLOBAL batch from a generator seeded by (sample_seed, step), the
        same on every rank, and each rank keeps its rows; z is the mean over the global batch; the
        memory banks are updated with the embeddings and indices of all ranks. So every rank holds
        the banks one process would hold with the same global batch."""
        world, rank = _world()
        training = self.training
        with torch.autocast(f_s.device.type, enabled=False):
            e_s = F.normalize(self.embed_s(f_s.float()), dim=1)
            e_t = F.normalize(self.embed_t(f_t.float()), dim=1)
            global_index = _gather(index, world)
            generator = torch.Generator(device=self.train_labels.device)
            generator.manual_seed(int(self.sample_seed) + int(self.sample_step))
            contrast_idx = crd_sample_negatives(self.train_labels, global_index, self.k, generator)
            contrast_idx = contrast_idx[rank * len(index) : (rank + 1) * len(index)]
            z_known = bool(self.z_s > 0)  # one host sync; the negative sampling syncs anyway
            if z_known:
                z_s, z_t = self.z_s, self.z_t
            else:  # estimated on the first batch from the global batch's scores, then fixed
                _, _, z_s, z_t = crd_contrast(e_s, e_t, self.memory_s, self.memory_t, contrast_idx, self.cfg.nce_t)
                z_s, z_t = _mean_over_ranks(z_s, world), _mean_over_ranks(z_t, world)
            scores_s, scores_t, _, _ = crd_contrast(
                e_s, e_t, self.memory_s, self.memory_t, contrast_idx, self.cfg.nce_t, z_s, z_t
            )
            loss = crd_loss(scores_s, scores_t, self.num_train)
        if training:
            if not z_known:
                self.z_s.copy_(z_s)
                self.z_t.copy_(z_t)
            self.sample_step += 1
            all_e_s, all_e_t = _gather(e_s.detach(), world), _gather(e_t.detach(), world)
            self.memory_s = crd_update_memory(self.memory_s, all_e_s, global_index, self.cfg.momentum)
            self.memory_t = crd_update_memory(self.memory_t, all_e_t, global_index, self.cfg.momentum)
        return loss

    def loss_terms(self, inp: StepInputs) -> dict[str, Tensor]:
        return {
            "ce": cross_entropy(inp.student.logits, inp.target, self.label_smoothing),
            "crd": self.crd_term(inp.student.feature, inp.teachers[0].feature.detach(), inp.index),
        }

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"ce": self.cfg.ce_weight, "crd": self.cfg.crd_weight}


def _world() -> tuple[int, int]:
    """(world size, rank) of torch.distributed, (1, 0) without it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _broadcast_buffers_from_rank0(module: nn.Module) -> None:
    """Overwrite every buffer of `module` with rank 0's (torch.distributed initialised, several ranks; no-op
    otherwise). Buffers live on the CPU at construction: with NCCL they travel through this rank's GPU."""
    world, _ = _world()
    if world == 1:
        return
    device = torch.device("cpu")
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    for buf in module.buffers():
        t = buf.detach().to(device, copy=True).contiguous()
        torch.distributed.broadcast(t, src=0)
        buf.copy_(t)


def _gather(t: Tensor, world: int) -> Tensor:
    """Concatenation over ranks, in rank order, of equally shaped tensors (no gradient); t itself for one process."""
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _mean_over_ranks(t: Tensor, world: int) -> Tensor:
    """Mean of a tensor over ranks (equal per-rank batches: the global-batch mean of per-rank means)."""
    if world == 1:
        return t
    t = t.clone()
    torch.distributed.all_reduce(t)
    return t / world
