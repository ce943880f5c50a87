"""Datasets for distillation: synthetic (built-in), CIFAR-100, ImageFolder (ImageNet-100 style), Tiny-ImageNet.

Every item is `(image float32 [3,H,W] normalised, label int, index int)`; `index` is the item's position in
its split, so CRD can address a memory bank of the training split. Our validation split is held out from the
training data (stratified, seeded) and uses the eval transform; the dataset's own val/test set is the test split.
Tensor-backed datasets (synthetic, cifar100, tiny-imagenet) keep uint8 images [N,3,H,W] in memory and also
expose the training subset as `DataSplits.train_images` / `train_labels` for a GPU-resident loader.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import shutil
import tarfile
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets as tvd
from torchvision.transforms import v2

from .engine.distributed import say  # one line about long one-time work (extraction, decoding), rank 0 only
from .errors import CheckpointError, ConfigError, DataError, WriteError, first_line
from .io import atomic_torch_save, current_umask, remove_orphans, safe_torch_load
from .sampler import EpochBatchSampler

DATASETS = ("synthetic", "cifar100", "imagefolder", "tiny-imagenet")
# RepDistiller's / CRD's / CA-MKD's CIFAR-100 normalisation (dataset/cifar100.py), as kd.zoo's pretrained_cfg
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYNTHETIC_MEAN, SYNTHETIC_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
TINY_CACHE_NAME = "decoded_uint8.pt"
_CACHE_FORMAT = 1
_ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class ExtractLimits:
    """The most an archive may expand to (--data.max-extract-gb, --data.max-extract-files), read from its member
    list before anything is extracted: a small zip can declare hundreds of GB or millions of files. The defaults
    hold Tiny-ImageNet-200 (~120k files, ~0.25 GB) and ImageNet-100-sized sets (~135k files, ~16 GB) with room."""

    max_bytes: int = 50 * 10**9
    max_files: int = 1_000_000

    @classmethod
    def from_flags(cls, max_gb: float, max_files: int) -> "ExtractLimits":
        if not max_gb > 0 or max_files < 1:
            raise ConfigError(
                f"--data.max-extract-gb must be > 0 and --data.max-extract-files >= 1, got {max_gb} and {max_files}"
            )
        return cls(int(max_gb * 10**9), int(max_files))


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and seed of the built-in procedurally generated dataset (same bytes for the same spec)."""

    num_classes: int = 10
    train_size: int = 2000  # total, before the val split
    test_size: int = 500
    image_size: int = 32
    seed: int = 0


@dataclass
class DataSplits:
    """The three splits plus what a model and a loader need to know about them."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    image_size: int  # side of the images the model sees (after any resize)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str]
    # uint8 [N,3,H,W] at native resolution / int64 [N]: the training subset (val removed); None for imagefolder
    train_images: Tensor | None = field(default=None, repr=False)
    train_labels: Tensor | None = field(default=None, repr=False)
    # a short hash of the data itself (labels, a sample of images or files): what a cached teacher learnt from
    fingerprint: str = ""
    # the class ids kept by a class subset (--data.classes), in label order; empty = every class of the dataset
    class_subset: tuple[str, ...] = ()


class TensorImageDataset(Dataset):
    """uint8 images [N,3,H,W] + int64 labels [N] in memory; item i = (transform(images[i]), label, i)."""

    def __init__(self, images: Tensor, labels: Tensor, transform: v2.Transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return self.transform(self.images[i]), int(self.labels[i]), i

    def tensor_view(self) -> tuple[Tensor, Tensor]:
        """(uint8 images [N,3,H,W] at native resolution, int64 labels [N]) for a device-resident loader."""
        return self.images, self.labels


class FileSubset(Dataset):
    """A subset of an ImageFolder (decoded from disk per item) with its own transform; item i = (x, label, i)."""

    def __init__(self, folder: tvd.ImageFolder, indices: Tensor, transform: v2.Transform):
        self.samples = [folder.samples[j] for j in indices.tolist()]
        self.loader, self.transform = folder.loader, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        path, label = self.samples[i]
        try:
            image = self.loader(path)
        except Exception as e:  # a file whose header was fine but whose pixels are not (truncated)
            raise DataError(f"cannot decode image {path}: {first_line(e)}") from None
        return self.transform(image), label, i


# ----------------------------------------------------------------------------------------------- splits, loaders


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded per-class split of positions 0..N-1 into (train_idx, val_idx), both sorted int64.

    Each class gives round(n_c * val_fraction) samples to val, at least 1 and at most n_c - 1 (a class with a
    single sample stays in train)."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = labels.long()
    shuffled = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    grouped = shuffled[labels[shuffled].argsort(stable=True)]  # by class, random order within each class
    counts = torch.bincount(labels)
    n_val = (counts * val_fraction).round().long().clamp(min=1).minimum(counts - 1).clamp(min=0)
    starts = counts.cumsum(0) - counts
    grouped_labels = labels[grouped]
    rank_in_class = torch.arange(len(labels)) - starts[grouped_labels]
    is_val = rank_in_class < n_val[grouped_labels]
    return grouped[~is_val].sort().values, grouped[is_val].sort().values


def validation_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """stratified_split of the training labels, refusing an empty validation split (every class a single image:
    nothing could select a model, and the run would fail after its first epoch)."""
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    if len(val_idx) == 0:
        raise DataError(
            f"the validation split is empty: each of the {int(labels.max()) + 1} classes has a single "
            "training image, and a class needs 2 to give one to validation"
        )
    return train_idx, val_idx


def bridge_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """ASMB's --asmb.bridge-split: the positions of the training split `labels` divided, per class and seeded by
    `seed` (--data.split-seed), into (teacher-fit, bridge), both sorted int64: stratified_split with the bridge in
    the held-out role (round(n_c * fraction) of class c, at least 1 and at most n_c - 1)."""
    return stratified_split(labels, fraction, seed)


def train_subset(data: DataSplits, indices: Tensor) -> DataSplits:
    """`data` with its training split cut to the positions `indices` (validation and test unchanged, the same
    transforms); an item's index is its position in the subset."""
    ds, indices = data.train, indices.long()
    if isinstance(ds, TensorImageDataset):  # its tensors are data.train_images / train_labels: one copy of each
        train = TensorImageDataset(ds.images[indices], ds.labels[indices], ds.transform)
        return dataclasses.replace(data, train=train, train_images=train.images, train_labels=train.labels)
    if isinstance(ds, FileSubset):
        train = copy.copy(ds)
        train.samples = [ds.samples[i] for i in indices.tolist()]
        return dataclasses.replace(data, train=train)
    raise TypeError(f"train_subset: unsupported training dataset {type(ds).__name__}")


def make_loader(
    ds: Dataset,
    batch_size: int,
    *,
    train: bool,
    workers: int = 0,
    seed: int = 0,
    drop_last: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Training: reshuffled every epoch from a seeded generator, incomplete last batch dropped (fixed shapes
    for torch.compile), through a resumable kd.sampler.EpochBatchSampler (`loader.batch_sampler`) that
    gives rank `rank` of `world_size` its slice of each global batch of `batch_size`. Eval: in order,
    every sample kept."""
    drop_last = train if drop_last is None else drop_last
    if drop_last and len(ds) < batch_size:
        raise ConfigError(f"batch_size {batch_size} is larger than the split ({len(ds)} samples); lower it")
    if train and drop_last:
        return DataLoader(
            ds,
            batch_sampler=EpochBatchSampler(len(ds), batch_size, seed=seed, rank=rank, world_size=world_size),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=train,
        drop_last=drop_last,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed) if train else None,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


# ----------------------------------------------------------------------------------------------- transforms


def _randaugment(randaugment: tuple[int, int]) -> list[v2.Transform]:
    """RandAugment (Cubuk et al., 2020) with N ops of magnitude M (of 30), or nothing for (0, 0)."""
    num_ops, magnitude = randaugment
    return [v2.RandAugment(num_ops=num_ops, magnitude=magnitude)] if num_ops > 0 else []


def _tensor_transform(
    native: int, size: int, mean, std, augment: bool, randaugment: tuple[int, int] = (0, 0)
) -> v2.Transform:
    """uint8 [3,H,W] -> (resize) -> (random crop, pad size//8 + flip, RandAugment) -> float normalised."""
    steps: list[v2.Transform] = [v2.Resize((size, size), antialias=True)] if size != native else []
    if augment:
        steps += [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip(), *_randaugment(randaugment)]
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _file_transform(size: int, mean, std, augment: bool, randaugment: tuple[int, int] = (0, 0)) -> v2.Transform:
    """PIL image -> ImageNet-style RandomResizedCrop + flip (+ RandAugment) (train) or Resize + CenterCrop
    (eval), normalised."""
    if augment:
        steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *_randaugment(randaugment)]
    else:  # the usual 224/256 ratio
        steps = [v2.Resize(math.ceil(size / 0.875), antialias=True), v2.CenterCrop(size)]
    return v2.Compose(
        [v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]
    )


# ----------------------------------------------------------------------------------------------- synthetic


def _synthetic_images(labels: Tensor, params: dict[str, Tensor], size: int, g: torch.Generator) -> Tensor:
    """Per class: a 3-colour palette, an oriented sinusoidal grating and a Gaussian blob at a class position;
    per sample: random shift, grating phase, orientation jitter, colour jitter, contrast and pixel noise.
    Returns uint8 [N,3,size,size]."""
    n = len(labels)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = coords.view(1, -1, 1), coords.view(1, 1, -1)
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.3  # up to +-15% of the image
    sx, sy = (x - shift[:, 0, None, None]), (y - shift[:, 1, None, None])
    theta = params["theta"][labels] + torch.randn(n, generator=g) * 0.25
    phase = torch.rand(n, generator=g) * 2 * math.pi
    freq = params["freq"][labels] * (1 + torch.randn(n, generator=g) * 0.08)
    along = sx * theta.cos().view(-1, 1, 1) + sy * theta.sin().view(-1, 1, 1)
    grating = 0.5 + 0.5 * torch.sin(2 * math.pi * freq.view(-1, 1, 1) * along + phase.view(-1, 1, 1))
    centre = params["centre"][labels]
    dist2 = (sx - centre[:, 0, None, None]) ** 2 + (sy - centre[:, 1, None, None]) ** 2
    blob = torch.exp(-dist2 / (2 * params["radius"][labels].view(-1, 1, 1) ** 2))
    palette = params["palette"][labels] + torch.randn(n, 3, 3, generator=g) * 0.2  # [N, colour, rgb]
    c0, c1, c2 = (palette[:, k, :, None, None] for k in range(3))
    # In place on two image-sized buffers (fresh ones cost a page-faulting allocation each); the same operations
    # in the same order as c0 + (c1 - c0) * grating, img + (c2 - img) * blob, 0.5 + contrast * (img - 0.5) + noise.
    img = ((c1 - c0) * grating[:, None]).add_(c0)  # grating between colours 0 and 1
    img.add_(torch.sub(c2, img).mul_(blob[:, None]))  # blob in colour 2 on top
    contrast = 0.15 + 0.85 * torch.rand(n, 1, 1, 1, generator=g)
    img.sub_(0.5).mul_(contrast).add_(0.5).add_(torch.randn(img.shape, generator=g).mul_(0.2))
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _load_synthetic(spec: SyntheticSpec) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """Deterministic (train_images, train_labels, test_images, test_labels, class_names) from `spec`."""
    if spec.num_classes < 2 or spec.image_size < 4 or spec.train_size < 1 or spec.test_size < 1:
        raise ConfigError(f"invalid synthetic data spec {spec}: need >= 2 classes, image_size >= 4, sizes >= 1")
    g = torch.Generator().manual_seed(spec.seed)
    c = spec.num_classes
    params = {
        "theta": torch.rand(c, generator=g) * math.pi,
        "freq": 1.5 + 4.5 * torch.rand(c, generator=g),
        "centre": 0.25 + 0.5 * torch.rand(c, 2, generator=g),
        "radius": 0.08 + 0.1 * torch.rand(c, generator=g),
        "palette": torch.rand(c, 3, 3, generator=g),
    }
    out = []
    for n in (spec.train_size, spec.test_size):
        labels = (torch.arange(n) % c)[torch.randperm(n, generator=g)]  # balanced, shuffled
        chunks = [_synthetic_images(part, params, spec.image_size, g) for part in labels.split(4096)]
        out += [torch.cat(chunks), labels]
    return (*out, [f"class_{i}" for i in range(c)])


# ----------------------------------------------------------------------------------------------- cifar100


def _load_cifar100(root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """CIFAR-100 via torchvision (downloads when missing); decoded arrays as uint8 [N,3,32,32] tensors."""
    folder = root / "cifar-100-python"
    try:
        splits = [tvd.CIFAR100(str(root), train=train, download=True) for train in (True, False)]
    except (OSError, RuntimeError) as e:  # URLError/HTTPError are OSErrors; a bad md5 is a RuntimeError
        raise DataError(
            f"CIFAR-100 not found (or corrupt) at {folder} and the download failed ({first_line(e)}); "
            f"download cifar-100-python.tar.gz from {CIFAR100_URL} and extract it under {root}"
        ) from None
    except Exception as e:  # files pass the md5 check but do not unpickle to the expected arrays
        raise DataError(f"malformed CIFAR-100 files in {folder} ({type(e).__name__}: {first_line(e)})") from None
    out: list = []
    for ds in splits:
        out += [torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets).long()]
    return (*out, list(splits[0].classes))


# ----------------------------------------------------------------------------------------------- class subsets


def parse_class_selection(spec: str) -> int | list[str] | None:
    """--data.classes: "" = every class, a number N = the first N classes in the dataset's own order, else the
    path of a text file with one class id per line (blank lines and `#` comments ignored)."""
    spec = spec.strip()
    if not spec:
        return None
    if spec.isdigit():
        if int(spec) < 2:
            raise ConfigError(f"--data.classes {spec}: a class subset needs at least 2 classes")
        return int(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"--data.classes {spec}: neither a number of classes nor a file of class ids")
    try:
        ids = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--data.classes {spec}: cannot read it ({first_line(e)})") from None
    ids = [i for i in ids if i]
    seen: set[str] = set()
    duplicate = next((i for i in ids if i in seen or seen.add(i)), None)
    if duplicate is not None:
        raise ConfigError(f"--data.classes {spec}: class {duplicate!r} is listed twice")
    if len(ids) < 2:
        raise ConfigError(f"--data.classes {spec}: a class subset needs at least 2 classes, the file lists {len(ids)}")
    return ids


def select_classes(all_ids: list[str], selection: int | list[str] | None, where: str) -> list[str]:
    """The kept class ids in the dataset's own order (so a subset's labels do not depend on the file's order)."""
    if selection is None:
        return list(all_ids)
    if isinstance(selection, int):
        if selection > len(all_ids):
            raise DataError(f"--data.classes {selection}: {where} has only {len(all_ids)} classes")
        return list(all_ids[:selection])
    known = set(all_ids)
    unknown = [i for i in selection if i not in known]
    if unknown:
        raise DataError(
            f"--data.classes: class {unknown[0]!r} is not in {where}"
            f"{f' (nor {len(unknown) - 1} more)' if len(unknown) > 1 else ''}"
        )
    wanted = set(selection)
    return [i for i in all_ids if i in wanted]


# ----------------------------------------------------------------------------------------------- tiny-imagenet


def _is_tiny_dir(path: Path) -> bool:
    return (path / "wnids.txt").is_file()


def _archive_stem(path: Path) -> str | None:
    """Name without the archive suffix, or None when `path` is not a supported archive."""
    return next((path.name[: -len(s)] for s in _ARCHIVE_SUFFIXES if path.name.endswith(s)), None)


def default_cache_dir() -> Path:
    """Where archives are extracted and decoded images cached: $KD_CACHE_DIR, else ~/.cache/kd. Never the
    data's own folder, which may be read-only or shared."""
    return Path(os.environ.get("KD_CACHE_DIR") or Path.home() / ".cache" / "kd").expanduser()


def _identity_digest(path: Path) -> str:
    """A short hash of a file's or folder's resolved path, size and modification time: a replaced archive at
    the same path is another archive."""
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]


def _archive_totals(archive: Path, limits: ExtractLimits) -> tuple[int, int]:
    """(members, uncompressed bytes) of a .zip or .tar.gz archive from its member list alone (a zip's central
    directory; a tar's headers, read by decompressing the stream without writing anything), counted until a
    limit is passed."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            return len(infos), sum(i.file_size for i in infos)
    members, total = 0, 0
    with tarfile.open(archive, "r|gz") as tf:  # a stream: headers only, none kept (tf.members cleared)
        while (m := tf.next()) is not None:
            members, total = members + 1, total + max(m.size, 0)
            tf.members.clear()
            if members > limits.max_files or total > limits.max_bytes:
                break
    return members, total


def _check_archive_size(archive: Path, limits: ExtractLimits) -> None:
    """DataError (one line) when `archive` declares more members or bytes than `limits`, before extraction."""
    try:
        members, total = _archive_totals(archive, limits)
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise DataError(f"could not read the member list of {archive}: {first_line(e)}") from None
    if members > limits.max_files:
        raise DataError(
            f"{archive} holds more than {limits.max_files:,} files (--data.max-extract-files); nothing "
            "was extracted (raise the flag if the archive is what you meant)"
        )
    if total > limits.max_bytes:
        raise DataError(
            f"{archive} expands to more than {limits.max_bytes / 1e9:.3g} GB (--data.max-extract-gb; it "
            f"declares {total / 1e9:.3g} GB or more); nothing was extracted (raise the flag if the "
            "archive is what you meant)"
        )


def _extract_once(archive: Path, cache_dir: Path, limits: ExtractLimits = ExtractLimits()) -> Path:
    """Extract `archive` into <cache_dir>/extracted/<stem>-<digest>/ (once; atomic via temp dir + rename),
    after checking its declared member count and size against `limits`; any failure removes the temp dir."""
    target = cache_dir / "extracted" / f"{_archive_stem(archive)}-{_identity_digest(archive)}"
    if target.is_dir():
        return target
    _check_archive_size(archive, limits)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target.parent, f".{target.name}.extract-")  # the half-extracted folders of killed runs
    say(f"extracting {archive} once into {target}")
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.extract-{os.getpid()}-"))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700: the cache is shared like any folder
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        else:
            with tarfile.open(archive, "r:gz") as tf:
                tf.extractall(tmp, filter="data")
        entries = [p for p in tmp.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        # an archive of one top folder (tiny-imagenet-200.zip -> tiny-imagenet-200/) becomes the target itself
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() and not _is_tiny_dir(tmp) else tmp
        try:
            os.rename(source, target)
        except OSError:
            if not target.is_dir():  # else another process finished the same extraction first
                raise
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise DataError(f"could not extract {archive}: {first_line(e, 200)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _find_tiny_dir(root: Path, cache_dir: Path, limits: ExtractLimits = ExtractLimits()) -> Path:
    """The folder holding wnids.txt: `root`, its single dataset subfolder, or an extracted archive."""
    expected = "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
    if root.is_file() and _archive_stem(root) is not None:
        root = _extract_once(root, cache_dir, limits)
    if not root.is_dir():
        problem = "is not a folder or a .zip/.tar.gz archive" if root.exists() else "does not exist"
        raise DataError(
            f"Tiny-ImageNet root {root} {problem}; expected a folder with {expected}, "
            f"a folder containing one, or a .zip/.tar.gz archive of it"
        )
    if _is_tiny_dir(root):
        return root
    found = [p for p in sorted(root.iterdir()) if p.is_dir() and _is_tiny_dir(p)]
    if not found:
        archives = [p for p in sorted(root.iterdir()) if p.is_file() and _archive_stem(p) is not None]
        if len(archives) == 1:
            return _find_tiny_dir(_extract_once(archives[0], cache_dir, limits), cache_dir, limits)
        if len(archives) > 1:
            raise DataError(f"several archives in {root} ({', '.join(p.name for p in archives)}); pass one as root")
        raise DataError(f"no Tiny-ImageNet data in {root}: expected {expected} (or a .zip/.tar.gz of them)")
    if len(found) > 1:
        raise DataError(f"several Tiny-ImageNet folders in {root} ({', '.join(p.name for p in found)}); pass one")
    return found[0]


def _tiny_file_lists(
    d: Path, classes: int | list[str] | None = None
) -> tuple[list[str], list[Path], list[int], list[Path], list[int]]:
    """(wnids, train_files, train_labels, test_files, test_labels) from the original Tiny-ImageNet layout, for the
    classes kept by `classes` (parse_class_selection; None = all): only their folders are listed."""
    all_wnids = [w.strip() for w in (d / "wnids.txt").read_text().splitlines() if w.strip()]
    wnids = select_classes(all_wnids, classes, str(d / "wnids.txt"))
    index = {w: i for i, w in enumerate(wnids)}
    known = set(all_wnids)
    train_files, train_labels = [], []
    for w in wnids:
        folder = d / "train" / w / "images"
        names = sorted(os.listdir(folder)) if folder.is_dir() else []
        files = [folder / n for n in names if n.lower().endswith(_IMAGE_SUFFIXES)]
        if not files:
            raise DataError(f"no training images for class {w} in {folder} (expected *.JPEG)")
        train_files += files
        train_labels += [index[w]] * len(files)
    annotations = d / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataError(f"missing {annotations} (expected '<file>\\t<wnid>\\t...' per val image)")
    test_files, test_labels = [], []
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, wnid = (line.split("\t") + [""])[:2]
        if not name or name in (".", "..") or "/" in name or "\\" in name:  # never a path out of val/images
            raise DataError(f"{annotations}:{n}: {name!r} is not a file name in {d / 'val' / 'images'}")
        if wnid not in known:
            raise DataError(f"{annotations}:{n}: class {wnid!r} is not in {d / 'wnids.txt'}")
        if wnid not in index:  # a class left out by --data.classes
            continue
        test_files.append(d / "val" / "images" / name)
        test_labels.append(index[wnid])
    if not test_files:
        raise DataError(f"{annotations} lists no images (expected '<file>\t<wnid>\t...' per val image)")
    return wnids, train_files, train_labels, test_files, test_labels


def rgb(img: Image.Image) -> Image.Image:
    """An image as 8-bit RGB. 16- and 32-bit integer images (PNG mode I;16 / I) keep their top 8 bits: PIL's own
    convert("RGB") clips them at 255, which turns almost every pixel of a 16-bit image white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.int64)
        top = wide.max(initial=0)  # mode I holds 8-, 16- or 32-bit data: scale by the range it uses
        shift = 8 if img.mode.startswith("I;16") else 0 if top < 256 else 8 if top < 65536 else 24
        img = Image.fromarray((np.clip(wide, 0, None) >> shift).clip(0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def rgb_loader(path: str) -> Image.Image:
    """ImageFolder's loader: the file decoded as 8-bit RGB (rgb)."""
    with open(path, "rb") as f, Image.open(f) as img:
        return rgb(img)


def _decode_images(files: list[Path]) -> Tensor:
    """Decode image files (grayscale -> RGB) into one uint8 tensor [N,3,H,W]; all must share one size."""

    def decode(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                return np.array(rgb(img))
        except (OSError, ValueError) as e:  # missing file or undecodable bytes
            raise DataError(f"cannot read image {path}: {first_line(e)}") from None

    first = decode(files[0])
    out = torch.empty(len(files), 3, *first.shape[:2], dtype=torch.uint8)  # filled in place: one copy in memory

    def fill(i: int) -> None:
        img = decode(files[i])
        if img.shape != first.shape:
            raise DataError(f"image {files[i]} is {img.shape[:2]}, expected {first.shape[:2]} like {files[0]}")
        out[i] = torch.from_numpy(img).permute(2, 0, 1)

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # Pillow releases the GIL while decoding
        list(pool.map(fill, range(len(files))))
    return out


def _class_names(d: Path, wnids: list[str]) -> list[str]:
    """First human-readable name per wnid from words.txt when present, else the wnid itself."""
    words = d / "words.txt"
    table = (
        dict(line.split("\t", 1) for line in words.read_text().splitlines() if "\t" in line) if words.is_file() else {}
    )
    return [table.get(w, w).split(",")[0].strip() or w for w in wnids]


def tiny_cache_path(dataset_dir: Path, cache_dir: Path, subset: list[str] | None = None) -> Path:
    """The decoded-image cache file of the Tiny-ImageNet folder `dataset_dir`, or of its class subset `subset`
    (one file per subset beside the full one, so subsets never overwrite each other)."""
    digest = hashlib.sha1(str(dataset_dir.resolve()).encode()).hexdigest()[:10]
    name = TINY_CACHE_NAME
    if subset is not None:
        name = name.replace(".pt", f"-{len(subset)}c-{hashlib.sha1(' '.join(subset).encode()).hexdigest()[:10]}.pt")
    return cache_dir / "decoded" / f"{dataset_dir.name}-{digest}" / name


def _read_cache(path: Path) -> dict | None:
    """The decoded-image cache, or None when absent or unreadable (then it is rebuilt)."""
    try:
        return safe_torch_load(path, size_cap=False) if path.is_file() else None  # kd's own file, GBs for big sets
    except CheckpointError:  # truncated/corrupt/changed file: decode again
        warnings.warn(f"ignoring unreadable cache {path}; decoding the images again")
        return None


def _load_tiny_imagenet(
    root: Path, cache_dir: Path, classes: int | list[str] | None = None, limits: ExtractLimits = ExtractLimits()
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str], list[str]]:
    """Tiny-ImageNet decoded once into uint8 tensors, cached as <cache_dir>/decoded/<folder>-<hash of its
    path>/decoded_uint8.pt (rebuilt when the class list or any label changed). With a class subset `classes`
    only its images are decoded, into a cache file of that subset. The last item is the kept wnids."""
    d = _find_tiny_dir(root, cache_dir, limits)
    wnids, train_files, train_labels, test_files, test_labels = _tiny_file_lists(d, classes)
    cache_path = tiny_cache_path(d, cache_dir, None if classes is None else wnids)
    key = {
        "format": _CACHE_FORMAT,
        "wnids": wnids,
        "train_labels": torch.tensor(train_labels),
        "test_labels": torch.tensor(test_labels),
    }
    cache = _read_cache(cache_path)
    if not (
        cache
        and cache.get("format") == key["format"]
        and cache.get("wnids") == wnids
        and torch.equal(cache["train_labels"], key["train_labels"])
        and torch.equal(cache["test_labels"], key["test_labels"])
    ):  # stale: the files changed
        say(
            f"decoding {len(train_files) + len(test_files)} images of {d} once into {cache_path} (about a minute "
            "per 100,000 images on 2 cores)"
        )
        cache = {**key, "train_images": _decode_images(train_files), "test_images": _decode_images(test_files)}
        try:
            atomic_torch_save(cache, cache_path)
        except WriteError as e:  # a read-only or full cache folder: still usable, just decoded again next time
            warnings.warn(f"could not write the decoded-image cache {cache_path}: {e}")
    return (
        cache["train_images"],
        cache["train_labels"],
        cache["test_images"],
        cache["test_labels"],
        _class_names(d, wnids),
        wnids,
    )


# ----------------------------------------------------------------------------------------------- build_data


def _check_labels(labels: Tensor, num_classes: int, split: str, every_class: bool) -> None:
    if len(labels) == 0:
        raise DataError(f"the {split} split is empty")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{split} labels must lie in [0, {num_classes}), found [{labels.min()}, {labels.max()}]")
    missing = (torch.bincount(labels, minlength=num_classes) == 0).nonzero().flatten().tolist()
    if every_class and missing:
        raise DataError(f"{split} split has no samples of class(es) {missing[:10]} (of {num_classes})")


def tensor_fingerprint(
    images: Tensor,
    labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    sample: int = 512,
    classes: tuple[str, ...] = (),
) -> str:
    """16 hex digits of sha1 over the shapes, every label of both splits and the bytes of an evenly strided
    sample of `sample` images of each split (and the kept class ids of a class subset): relabelled or replaced
    data gets another fingerprint, cheaply."""
    h = hashlib.sha1()
    if classes:
        h.update(("classes:" + " ".join(classes) + "|").encode())
    for imgs, labs in ((images, labels), (test_images, test_labels)):
        h.update(f"{tuple(imgs.shape)}|{tuple(labs.shape)}".encode())
        h.update(labs.long().contiguous().numpy().tobytes())
        h.update(imgs[:: max(1, len(imgs) // sample)].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def folder_fingerprint(folders: list[tvd.ImageFolder], sample: int = 256, head_bytes: int = 4096) -> str:
    """16 hex digits of sha1 over each folder's classes, every (relative path, label) and the size and first
    `head_bytes` bytes of an evenly strided sample of `sample` files (not the whole dataset: cheap)."""
    h = hashlib.sha1()
    for folder in folders:
        root = Path(folder.root)
        h.update("|".join(folder.classes).encode())
        for path, label in folder.samples:
            h.update(f"{Path(path).relative_to(root)}:{label};".encode())
        for path, _ in folder.samples[:: max(1, len(folder.samples) // sample)]:
            with open(path, "rb") as f:
                h.update(f"{os.path.getsize(path)}".encode() + f.read(head_bytes))
    return h.hexdigest()[:16]


class _ClassSubsetFolder(tvd.ImageFolder):
    """An ImageFolder of the class folders kept by `classes` (parse_class_selection): the others are never
    listed. Labels follow the sorted folder names, as ImageFolder's own."""

    def __init__(self, root: str, classes: int | list[str] | None):
        self._selection = classes
        super().__init__(root, loader=rgb_loader)

    def find_classes(self, directory):
        names, _ = super().find_classes(directory)
        kept = select_classes(names, self._selection, f"the class folders of {directory}")
        return kept, {name: i for i, name in enumerate(kept)}


def _check_no_folder_twice(top: Path) -> None:
    """Refuse a folder tree that reaches one folder twice through symbolic links: ImageFolder follows links,
    so a link to an ancestor walks forever and a link to a sibling counts its images twice (into both the
    training and the validation split)."""
    seen: set[str] = set()
    for here, dirs, _ in os.walk(top, followlinks=True):
        for folder in [here, *(os.path.join(here, d) for d in dirs)]:
            if os.path.realpath(folder) in seen:  # an ancestor (a loop) or a folder walked before (a duplicate)
                raise DataError(
                    f"{folder} reaches a folder already in {top} ({os.path.realpath(folder)}) through a "
                    "symbolic link; remove the link"
                )
        seen.add(os.path.realpath(here))


def _load_imagefolder(root: Path, classes: int | list[str] | None = None) -> tuple[tvd.ImageFolder, tvd.ImageFolder]:
    folders = []
    for split in ("train", "val"):
        path = root / split
        if not path.is_dir():
            raise DataError(f"missing {path}: imagefolder expects {root}/train/<class>/* and {root}/val/<class>/*")
        _check_no_folder_twice(path)
        try:
            folders.append(_ClassSubsetFolder(str(path), classes))
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"bad image folder {path}: {first_line(e)}") from None
    if folders[0].classes != folders[1].classes:
        only = sorted(set(folders[0].classes) ^ set(folders[1].classes))[:5]
        raise DataError(f"class folders of {root}/train and {root}/val differ (e.g. {only})")
    _check_image_headers([path for folder in folders for path, _ in folder.samples])
    return folders[0], folders[1]


def _check_image_headers(files: list[str]) -> None:
    """Every image file opens as an image (its header is read, not the pixels: fast), so an undecodable file
    is reported naming it before the run writes anything instead of stopping training later."""

    def check(path: str) -> None:
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 (parsed from the header)
        except Exception as e:  # PIL raises many types for one meaning: not a readable image
            raise DataError(f"cannot read image {path}: {first_line(e)}") from None

    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        for _ in pool.map(check, files):
            pass


def build_data(
    dataset: str,
    root: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_size: int = 0,
    aug: bool = True,
    synthetic: SyntheticSpec = SyntheticSpec(),
    randaugment: tuple[int, int] = (0, 0),
    cache_dir: str | Path | None = None,
    classes: str = "",
    extract_limits: ExtractLimits = ExtractLimits(),
) -> DataSplits:
    """Train / val (held out from train, eval transform) / test splits of `dataset` at `root`.

    seed: the validation split's seed (keep it fixed across student seeds: every run then sees the same split).
    cache_dir: where archives are extracted and decoded images cached (None = default_cache_dir()).
    extract_limits: the most members and bytes an archive may declare before it is extracted (ExtractLimits).

    image_size: 0 = native (imagefolder: 224), > 0 resizes. aug: train-time augmentation.
    randaugment: (N ops, magnitude M of 30) added to the training augmentation when aug; (0, 0) = off.
    classes: a class subset of imagefolder / tiny-imagenet (parse_class_selection): "" = all, "N" = the first N
    in the dataset's order (wnids.txt, sorted folders), else a file of class ids; labels follow the dataset's
    order. The kept ids are `DataSplits.class_subset` and enter the fingerprint."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if image_size < 0:
        raise ConfigError(f"image_size must be >= 0 (0 = native), got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(randaugment) != 2 or randaugment[0] < 0 or not 0 <= randaugment[1] <= 30:
        raise ConfigError(f"randaugment must be (N >= 0, M in [0, 30]), got {tuple(randaugment)}")
    root_path = Path(root).expanduser()
    selection = parse_class_selection(classes)
    if selection is not None and dataset not in ("imagefolder", "tiny-imagenet"):
        raise ConfigError(f"--data.classes selects classes of imagefolder or tiny-imagenet, not {dataset}")

    if dataset == "imagefolder":
        train_folder, test_folder = _load_imagefolder(root_path, selection)
        subset = tuple(train_folder.classes) if selection is not None else ()
        num_classes, size = len(train_folder.classes), image_size or 224
        labels = torch.tensor(train_folder.targets).long()
        _check_labels(labels, num_classes, "train", every_class=True)
        train_idx, val_idx = validation_split(labels, val_fraction, seed)
        eval_tf = _file_transform(size, IMAGENET_MEAN, IMAGENET_STD, augment=False)
        return DataSplits(
            train=FileSubset(
                train_folder, train_idx, _file_transform(size, IMAGENET_MEAN, IMAGENET_STD, aug, randaugment)
            ),
            val=FileSubset(train_folder, val_idx, eval_tf),
            test=FileSubset(test_folder, torch.arange(len(test_folder)), eval_tf),
            num_classes=num_classes,
            image_size=size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            class_names=list(train_folder.classes),
            class_subset=subset,
            fingerprint=folder_fingerprint([train_folder, test_folder]),
        )

    subset: tuple[str, ...] = ()
    if dataset == "synthetic":
        loaded, (mean, std) = _load_synthetic(synthetic), (SYNTHETIC_MEAN, SYNTHETIC_STD)
    elif dataset == "cifar100":
        loaded, (mean, std) = _load_cifar100(root_path), (CIFAR100_MEAN, CIFAR100_STD)
    else:
        cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        *loaded, wnids = _load_tiny_imagenet(root_path, cache, selection, extract_limits)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        subset = tuple(wnids) if selection is not None else ()
    images, labels, test_images, test_labels, class_names = loaded
    num_classes, native = len(class_names), images.shape[-1]
    _check_labels(labels, num_classes, "train", every_class=True)
    _check_labels(test_labels, num_classes, "test", every_class=False)
    train_idx, val_idx = validation_split(labels, val_fraction, seed)
    size = image_size or native
    eval_tf = _tensor_transform(native, size, mean, std, augment=False)
    train_images, train_labels = images[train_idx], labels[train_idx]
    return DataSplits(
        train=TensorImageDataset(
            train_images, train_labels, _tensor_transform(native, size, mean, std, aug, randaugment)
        ),
        val=TensorImageDataset(images[val_idx], labels[val_idx], eval_tf),
        test=TensorImageDataset(test_images, test_labels, eval_tf),
        num_classes=num_classes,
        image_size=size,
        mean=mean,
        std=std,
        class_names=class_names,
        train_images=train_images,
        train_labels=train_labels,
        class_subset=subset,
        fingerprint=tensor_fingerprint(images, labels, test_images, test_labels, classes=subset),
    )


class DatasetSettings(Protocol):
    """A dataset as a config group names it (train.py: --data.*): build_data's arguments, the archive limits
    (ExtractLimits.from_flags) and the synthetic data's size (SyntheticSpec, seeded by `split_seed`)."""

    dataset: str
    root: str
    val_fraction: float
    split_seed: int
    image_size: int
    aug: bool
    randaugment: Sequence[int]
    cache_dir: str  # "" = default_cache_dir()
    classes: str
    max_extract_gb: float
    max_extract_files: int
    synthetic_classes: int
    synthetic_train_size: int
    synthetic_test_size: int
    synthetic_image_size: int


def load_dataset(d: DatasetSettings) -> DataSplits:
    """build_data from a dataset's settings."""
    synthetic = SyntheticSpec(
        num_classes=d.synthetic_classes,
        train_size=d.synthetic_train_size,
        test_size=d.synthetic_test_size,
        image_size=d.synthetic_image_size,
        seed=d.split_seed,
    )
    return build_data(
        d.dataset,
        d.root,
        val_fraction=d.val_fraction,
        seed=d.split_seed,
        image_size=d.image_size,
        aug=d.aug,
        randaugment=d.randaugment,
        cache_dir=d.cache_dir or None,
        classes=d.classes,
        extract_limits=ExtractLimits.from_flags(d.max_extract_gb, d.max_extract_files),
        synthetic=synthetic,
    )


def labels_in_order(dataset, labels: Tensor | None = None) -> Tensor:
    """[N] int64 labels of `dataset` in loader index order (CRD samples negatives by class): `labels` when the
    split is tensor-backed, else an image folder's sample list, else one pass over the dataset."""
    if labels is not None:
        return labels
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return torch.tensor([label for _, label in samples], dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)
