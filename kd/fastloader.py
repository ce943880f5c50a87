"""A device-resident loader for tensor-backed datasets (synthetic, CIFAR-100, Tiny-ImageNet).

The decoded uint8 dataset [N,3,H,W] lives on the training device. Each batch is gathered, (resized),
randomly cropped with zero padding (pad = size // 8: 32 px -> 4, 64 px -> 8), horizontally flipped,
converted to float and normalised on that device in a few batched ops: no workers, no PIL, no Python
loop over samples. Each batch is gathered, padded and cut (crop + flip in one indexing op), then converted
and normalised in one multiply-add; the dataset itself is never copied (a padded copy of the training set
would hold 1.56x its bytes for 32 px images, for no measurable speed: the data path is well under 1% of a
step). It is the same augmentation as kd.data's DataLoader path (torchvision's RandomCrop
with padding + RandomHorizontalFlip), with the per-sample randomness drawn from a seeded
torch.Generator on the device, so a run is reproducible and its position can be saved and restored.

Batches are `(x float32 [B,3,S,S], y int64 [B], index int64 [B])` like the DataLoader path, where
`index` is the sample's position in its split.
"""

from __future__ import annotations

import math
from typing import Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from .engine.distributed import DIST
from .errors import ConfigError
from .sampler import EpochCursor


def crop_padding(size: int) -> int:
    """Zero padding of the random crop for `size` px images: size // 8 (32 px -> 4, 64 px -> 8)."""
    return size // 8


def sample_crop_flip(n: int, pad: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-sample crop offsets and flips, drawn on the generator's device.

    Returns offsets int64 [n, 2] (top, left), each uniform in [0, 2*pad] like torchvision's
    RandomCrop on a padded image, and flips bool [n], each True with probability 0.5."""
    device = generator.device
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < 0.5
    return offsets, flips


def gather_windows(padded: Tensor, index: Tensor, offsets: Tensor, flips: Tensor, size: tuple[int, int]) -> Tensor:
    """Batch gather + crop + horizontal flip in one indexing op.

    padded [N,C,H',W'] (any dtype), index int64 [B] (images to take), offsets int64 [B,2] (top, left),
    flips bool [B], size (h, w). Output [B,C,h,w]: out[b] = padded[index[b], :, top:top+h, left:left+w],
    mirrored left-right when flips[b]."""
    h, w = size
    device = padded.device
    rows = offsets[:, 0, None] + torch.arange(h, device=device)  # [B, h]
    cols = offsets[:, 1, None] + torch.arange(w, device=device)  # [B, w]
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # flipping the crop = reading its columns backwards
    channel = torch.arange(padded.shape[1], device=device)[None, :, None, None]
    return padded[index[:, None, None, None], channel, rows[:, None, :, None], cols[:, None, None, :]]


def crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, pad: int) -> Tensor:
    """Random crop with zero padding + horizontal flip of a whole batch.

    images [B,C,H,W] (any dtype), offsets int64 [B,2] (top, left) in the padded image, flips bool [B].
    Output [B,C,H,W]: out[b] = window of pad(images[b]) at offsets[b], mirrored left-right when flips[b].
    """
    padded = F.pad(images, (pad, pad, pad, pad)) if pad > 0 else images
    batch = torch.arange(len(images), device=images.device)
    return gather_windows(padded, batch, offsets, flips, tuple(images.shape[-2:]))


def normalise_factors(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[Tensor, Tensor]:
    """(scale, shift), each float32 [1,C,1,1], with uint8 * scale + shift = (uint8 / 255 - mean) / std."""
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in (mean, std))
    return 1.0 / (255.0 * std_t), -mean_t / std_t


def to_normalised_float(images: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """uint8 [B,C,H,W] -> float32 (x / 255 - mean) / std as torchvision's ToDtype(scale=True) + Normalize,
    folded into one multiply-add (normalise_factors) to make two passes over the batch instead of four."""
    return torch.addcmul(shift, images.to(torch.float32), scale)


class DeviceLoader(EpochCursor):
    """Iterates `(x, y, index)` batches of a uint8 image tensor kept on `device`.

    train=True: reshuffled every epoch from the seeded generator, the incomplete last batch dropped
    (fixed shapes), augmented when `augment`. train=False: in order, every sample kept, no augmentation.
    `image_size` > 0 resizes (bilinear, antialiased, like kd.data's Resize) when it differs from the
    stored size. The state (`state_dict()`) is the generator state at the start of the current epoch,
    the epoch count and the position in it: every draw of an epoch is made at its start, so restoring
    it and skipping `position` batches reproduces the rest of the epoch exactly.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        augment: bool = True,
        image_size: int = 0,
        device: torch.device | str = "cpu",
        seed: int = 0,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        # rank/world_size (DDP): `batch_size` is the global batch; every rank draws the same epoch and takes
        # its contiguous batch_size // world_size slice of each global batch.
        if batch_size % world_size:
            raise ConfigError(f"batch size {batch_size} is not divisible by the {world_size} processes")
        self.rank, self.world_size = rank, world_size
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"DeviceLoader needs uint8 images [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ConfigError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.drop_last = train if drop_last is None else drop_last
        if self.drop_last and len(images) < batch_size:
            raise ConfigError(f"batch_size {batch_size} is larger than the split ({len(images)} samples); lower it")
        self.device = torch.device(device)
        images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size, self.train = batch_size, train
        self.augment = train and augment
        self.mean, self.std = tuple(mean), tuple(std)
        self.native = images.shape[-1]
        self.size = image_size or self.native
        self.pad = crop_padding(self.size)
        self.scale, self.shift = normalise_factors(mean, std, self.device)
        self.images = images  # the only copy on the device (on the CPU, the dataset's own tensor)
        self._init_cursor(seed, self.device)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def _draw_epoch(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The epoch's order [N] and, when augmenting, offsets [n,2] / flips [n] for the n samples used."""
        n = len(self.labels)
        if not self.train:
            return torch.arange(n, device=self.device), None, None
        order = torch.randperm(n, generator=self.generator, device=self.device)
        if not self.augment:
            return order, None, None
        offsets, flips = sample_crop_flip(min(n, len(self) * self.batch_size), self.pad, self.generator)
        return order, offsets, flips

    def make_batch(self, index: Tensor, offsets: Tensor | None, flips: Tensor | None) -> Tensor:
        """The float batch for dataset positions `index` [B]: gather, resize, pad + crop + flip, normalise."""
        x = self.images[index]
        if self.size != self.native:
            x = TF.resize(x, [self.size, self.size], antialias=True)
        if offsets is not None:
            x = crop_flip(x, offsets, flips, self.pad)
        return to_normalised_float(x, self.scale, self.shift)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order, offsets, flips = self._start_epoch()
        bs = self.batch_size
        per_rank = bs // self.world_size
        for i in range(self.position, len(self)):
            first = i * bs + self.rank * per_rank
            sl = slice(first, min(first + per_rank, len(order)))
            index = order[sl]
            x = self.make_batch(
                index, offsets[sl] if offsets is not None else None, flips[sl] if flips is not None else None
            )
            self.position = i + 1
            yield x, self.labels[index], index


class LoaderSettings(Protocol):
    """What of the data's settings the loaders read (train.py: --data.*)."""

    batch_size: int  # global: each process loads its share
    eval_batch_size: int
    workers: int
    aug: bool
    loader: str  # auto / fast: device-resident for tensor-backed data; torch: DataLoaders
    randaugment: Sequence[int]  # (N, M); N > 0 needs DataLoaders (the device-resident loader does none)


def make_loaders(data, d: LoaderSettings, *, seed: int, device: torch.device, train_only: bool = False) -> dict:
    """train/val/test loaders of kd.data.DataSplits `data`: device-resident DeviceLoaders for tensor-backed data
    (unless `d.loader` is torch or RandAugment is on), else DataLoaders with `d.workers`. With several processes
    each rank's train loader yields its slice of every global batch (`d.batch_size`); every rank evaluates the
    whole val/test split. `train_only`: the train loader alone (a part of the training split that shares
    another set's val/test loaders)."""
    from .data import make_loader  # kd.data imports torchvision's datasets: only here, where they are used

    fast = d.loader != "torch" and d.randaugment[0] == 0
    batch_size, eval_batch_size, workers, aug = d.batch_size, d.eval_batch_size, d.workers, d.aug
    shard = dict(rank=DIST.rank, world_size=DIST.world_size)
    if not fast or data.train_images is None:
        train = make_loader(data.train, batch_size, train=True, workers=workers, seed=seed, **shard)
        if train_only:
            return {"train": train}
        return {
            "train": train,
            "val": make_loader(data.val, eval_batch_size, train=False, workers=workers),
            "test": make_loader(data.test, eval_batch_size, train=False, workers=workers),
        }
    common = dict(mean=data.mean, std=data.std, image_size=data.image_size, device=device)
    train = DeviceLoader(
        data.train_images,
        data.train_labels,
        batch_size=batch_size,
        train=True,
        augment=aug,
        seed=seed,
        **shard,
        **common,
    )
    if train_only:
        return {"train": train}
    return {
        "train": train,
        "val": DeviceLoader(*data.val.tensor_view(), batch_size=eval_batch_size, train=False, **common),
        "test": DeviceLoader(*data.test.tensor_view(), batch_size=eval_batch_size, train=False, **common),
    }
