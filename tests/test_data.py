"""kd.data: splits, loaders, synthetic data, and each dataset's loading path on small generated data."""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

from kd import data as kd_data
from kd.data import SyntheticSpec, build_data, make_loader, stratified_split
from kd.errors import ConfigError, DataError

# the real 10-class Tiny-ImageNet subset, where the machine has it (KD_DATA_DIR: a folder holding the archive)
REAL_MINI = Path(os.environ.get("KD_DATA_DIR") or "/nonexistent") / "tiny-imagenet-mini.tar.gz"
SMALL = SyntheticSpec(num_classes=4, train_size=80, test_size=20, image_size=16, seed=3)


def _denormalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """float normalised [3,H,W] -> uint8, the inverse of the eval transform."""
    return (x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).mul(255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------- splits, loaders


def test_stratified_split_is_seeded_disjoint_and_per_class():
    labels = torch.arange(103) % 5  # classes of 21/21/21/20/20 samples
    train_idx, val_idx = stratified_split(labels, 0.2, seed=1)
    assert torch.equal(torch.cat([train_idx, val_idx]).sort().values, torch.arange(103))
    assert torch.bincount(labels[val_idx]).tolist() == [4, 4, 4, 4, 4]
    again = stratified_split(labels, 0.2, seed=1)
    assert torch.equal(again[0], train_idx) and torch.equal(again[1], val_idx)
    assert not torch.equal(stratified_split(labels, 0.2, seed=2)[1], val_idx)


def test_stratified_split_keeps_one_val_per_class_when_possible():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])  # class 2 has a single sample: it stays in train
    train_idx, val_idx = stratified_split(labels, 0.01, seed=0)
    assert sorted(labels[val_idx].tolist()) == [0, 1]
    assert 5 in train_idx.tolist()
    _, val_idx = stratified_split(labels, 0.99, seed=0)  # never empties a class's train part
    assert torch.bincount(labels[val_idx], minlength=3).tolist() == [1, 2, 0]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction_is_a_config_error(fraction):
    with pytest.raises(ConfigError, match="val_fraction"):
        stratified_split(torch.arange(10) % 2, fraction, seed=0)
    with pytest.raises(ConfigError, match="val_fraction"):
        build_data("synthetic", "", val_fraction=fraction, synthetic=SMALL)


def test_make_loader_train_is_seeded_shuffled_and_drops_last():
    splits = build_data("synthetic", "", synthetic=SMALL, aug=False)

    def order(seed):
        return torch.cat([i for _, _, i in make_loader(splits.train, 16, train=True, seed=seed)])

    assert len(splits.train) == 72 and len(order(0)) == 64  # 72 // 16 full batches
    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    assert not torch.equal(order(0), torch.arange(64))
    ordered = torch.cat([i for _, _, i in make_loader(splits.train, 16, train=False)])
    assert torch.equal(ordered, torch.arange(72))
    with pytest.raises(ConfigError, match="batch_size"):
        make_loader(splits.train, 100, train=True)


# ----------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_well_formed():
    a, b = build_data("synthetic", "", synthetic=SMALL), build_data("synthetic", "", synthetic=SMALL)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.train_labels, b.train_labels)
    assert torch.equal(a.test[5][0], b.test[5][0])
    other = build_data("synthetic", "", synthetic=SyntheticSpec(**{**SMALL.__dict__, "seed": 4}))
    assert not torch.equal(other.train_images, a.train_images)
    assert (a.num_classes, a.image_size, len(a.class_names)) == (4, 16, 4)
    assert len(a.train) + len(a.val) == 80 and len(a.test) == 20
    assert a.train_images.dtype == torch.uint8 and a.train_images.shape == (len(a.train), 3, 16, 16)
    assert torch.bincount(a.train_labels).tolist() == [18, 18, 18, 18]
    assert a.train_images.float().std() > 20  # real content, not a constant
    image, label, index = a.val[3]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert isinstance(label, int) and index == 3


def test_synthetic_bytes_are_those_of_the_original_generator():
    """The in-place generator makes the same bytes as the original out-of-place formulas (SHA-1 recorded from
    them), so teachers cached on synthetic data stay valid."""
    import hashlib

    images, _, test_images, _, _ = kd_data._load_synthetic(
        SyntheticSpec(num_classes=5, train_size=300, test_size=50, image_size=16, seed=7)
    )
    digest = hashlib.sha1(images.numpy().tobytes() + test_images.numpy().tobytes()).hexdigest()
    assert digest == "e6a7adf4ea1800f2f4566be4eee69203047a41d0"


def test_val_uses_eval_transform_and_train_subset_matches_train_images():
    splits = build_data("synthetic", "", synthetic=SMALL, aug=True)
    x1, x2 = splits.val[0][0], splits.val[0][0]
    assert torch.equal(x1, x2)  # no augmentation on val
    torch.manual_seed(0)
    crops = torch.stack([splits.train[0][0] for _ in range(8)])
    assert not all(torch.equal(c, crops[0]) for c in crops)  # augmented
    plain = build_data("synthetic", "", synthetic=SMALL, aug=False)
    for i in (0, 7, len(plain.train) - 1):
        x, label, _ = plain.train[i]
        assert torch.equal(_denormalise(x, plain.mean, plain.std), plain.train_images[i])
        assert label == plain.train_labels[i]
    images, labels, *_ = kd_data._load_synthetic(SMALL)
    train_idx, val_idx = stratified_split(labels, 0.1, seed=0)
    assert torch.equal(splits.train_images, images[train_idx]) and torch.equal(splits.train_labels, labels[train_idx])
    assert torch.equal(_denormalise(splits.val[2][0], splits.mean, splits.std), images[val_idx[2]])


def test_image_size_resizes_tensor_datasets():
    splits = build_data("synthetic", "", synthetic=SMALL, image_size=24)
    assert (
        splits.image_size == 24 and splits.train[0][0].shape == (3, 24, 24) and splits.test[0][0].shape == (3, 24, 24)
    )
    assert splits.train_images.shape[-1] == 16  # stored at native resolution


def test_synthetic_is_learnable_by_a_tiny_cnn(one_thread):
    torch.manual_seed(0)
    spec = SyntheticSpec(num_classes=10, train_size=1200, test_size=300, image_size=16, seed=0)
    splits = build_data("synthetic", "", synthetic=spec, aug=False)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    steps = 0
    while steps < 100:
        for x, y, _ in make_loader(splits.train, 32, train=True, seed=steps):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == 100:
                break
    with torch.no_grad():
        correct = sum((net(x).argmax(1) == y).sum().item() for x, y, _ in make_loader(splits.test, 300, train=False))
    assert correct / len(splits.test) > 0.4  # chance is 0.1; this reaches 0.58


def test_unknown_dataset_and_bad_image_size_are_config_errors():
    with pytest.raises(ConfigError, match="unknown dataset"):
        build_data("mnist", "")
    with pytest.raises(ConfigError, match="image_size"):
        build_data("synthetic", "", image_size=-1, synthetic=SMALL)
    with pytest.raises(DataError, match="class"):  # fewer train samples than classes: a class is missing
        build_data("synthetic", "", synthetic=SyntheticSpec(num_classes=5, train_size=3, test_size=2))


# ----------------------------------------------------------------------------------------------- cifar100


def _write_fake_cifar100(root: Path, n_train: int = 60, n_test: int = 20, classes: int = 5) -> None:
    """Pickles in the real CIFAR-100 layout (cifar-100-python/{train,test,meta}): 'data' [N,3072] uint8
    (R, G, B planes), 'fine_labels', 'coarse_labels'; meta 'fine_label_names'. The official files are
    Python 2 pickles whose keys read back as str under torchvision's encoding='latin1', so keys are str here."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": [i % classes for i in range(n)],
            "coarse_labels": [0] * n,
            "filenames": [f"{i}.png" for i in range(n)],
            "batch_label": name,
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"fine{i}" for i in range(classes)], "coarse_label_names": ["all"]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_cifar100_loads_real_pickle_format(tmp_path, monkeypatch):
    _write_fake_cifar100(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    monkeypatch.setattr(
        tv_cifar,
        "download_and_extract_archive",
        lambda *a, **k: pytest.fail("must not download when the files are present"),
    )
    splits = build_data("cifar100", str(tmp_path), val_fraction=0.2, aug=False)
    assert splits.num_classes == 5 and splits.class_names == [f"fine{i}" for i in range(5)]
    assert (splits.image_size, splits.mean, splits.std) == (32, kd_data.CIFAR100_MEAN, kd_data.CIFAR100_STD)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 10, 20)
    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes())["data"]
    full = torch.from_numpy(raw).view(-1, 3, 32, 32)  # the official layout: R plane, G plane, B plane
    train_idx, _ = stratified_split(torch.arange(60) % 5, 0.2, seed=0)
    assert torch.equal(splits.train_images, full[train_idx])
    assert torch.equal(_denormalise(splits.train[4][0], splits.mean, splits.std), full[train_idx[4]])
    assert splits.train_labels.tolist() == (train_idx % 5).tolist()


def test_cifar100_missing_and_download_failing_is_a_data_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as info:
        build_data("cifar100", str(tmp_path / "data"))
    message = str(info.value)
    assert str(tmp_path / "data" / "cifar-100-python") in message and "download" in message
    assert "cifar-100-python.tar.gz" in message and "\n" not in message


def test_cifar100_malformed_files_are_a_data_error(tmp_path, monkeypatch):
    _write_fake_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps({"images": []}, protocol=2))
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    with pytest.raises(DataError, match="malformed CIFAR-100"):
        build_data("cifar100", str(tmp_path))


# ----------------------------------------------------------------------------------------------- imagefolder


def _write_image(path: Path, size: int = 8, seed: int = 0, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def _write_imagefolder(root: Path, classes=("cat", "dog", "eel"), per_class=(5, 2)) -> None:
    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            for i in range(n):
                _write_image(root / split / c / f"{i}.png", size=20, seed=i)


def test_imagefolder_splits_and_transforms(tmp_path):
    _write_imagefolder(tmp_path)
    splits = build_data("imagefolder", str(tmp_path), val_fraction=0.2, image_size=16)
    assert splits.num_classes == 3 and splits.class_names == ["cat", "dog", "eel"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 3, 6)
    assert splits.train_images is None and splits.train_labels is None
    assert splits.mean == kd_data.IMAGENET_MEAN
    for ds in (splits.train, splits.val, splits.test):
        image, label, index = ds[1]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and type(image) is torch.Tensor
        assert 0 <= label < 3 and index == 1
    assert sorted(y for _, y, _ in splits.val) == [0, 1, 2]
    assert build_data("imagefolder", str(tmp_path)).image_size == 224


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="missing .*train"):
        build_data("imagefolder", str(tmp_path / "nowhere"))
    _write_imagefolder(tmp_path)
    _write_image(tmp_path / "val" / "fox" / "0.png")
    with pytest.raises(DataError, match="differ"):
        build_data("imagefolder", str(tmp_path))


# ----------------------------------------------------------------------------------------------- tiny-imagenet


def _write_tiny(root: Path, wnids=("n001", "n002", "n003"), train_per_class: int = 4, val_per_class: int = 2) -> Path:
    """A miniature Tiny-ImageNet in the original layout; train image 0 of class 0 is grayscale."""
    d = root / "tiny-fake"
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (d / "words.txt").write_text("n001\tgoldfish, Carassius auratus\nn002\ttabby cat\nn999\tother\n")
    for c, w in enumerate(wnids):
        for i in range(train_per_class):
            _write_image(
                d / "train" / w / "images" / f"{w}_{i}.JPEG", seed=10 * c + i, mode="L" if c == i == 0 else "RGB"
            )
    lines = []
    for i in range(val_per_class * len(wnids)):
        _write_image(d / "val" / "images" / f"val_{i}.JPEG", seed=100 + i)
        lines.append(f"val_{i}.JPEG\t{wnids[i % len(wnids)]}\t0\t0\t7\t7")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return d


def _check_tiny(splits, cache_dir: Path) -> None:
    assert splits.num_classes == 3 and splits.class_names == ["goldfish", "tabby cat", "n003"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 6)
    assert splits.image_size == 8 and splits.train_images.shape == (9, 3, 8, 8)
    assert splits.train_images.dtype == torch.uint8
    assert [y for _, y, _ in splits.test] == [0, 1, 2, 0, 1, 2]
    assert len(list(cache_dir.glob(f"decoded/*/{kd_data.TINY_CACHE_NAME}"))) == 1


def test_tiny_imagenet_folder_decodes_grayscale_and_caches(tmp_path, monkeypatch):
    d, cache_dir = _write_tiny(tmp_path), tmp_path / "cache"
    before = sorted(d.rglob("*"))
    splits = build_data("tiny-imagenet", str(d), val_fraction=0.25, aug=False, cache_dir=cache_dir)
    _check_tiny(splits, cache_dir)
    assert sorted(d.rglob("*")) == before  # nothing written into the data folder
    cache = torch.load(kd_data.tiny_cache_path(d, cache_dir), weights_only=True)
    gray = cache["train_images"][0]  # n001_0.JPEG, saved in mode "L"
    assert gray.shape == (3, 8, 8) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    expected = torch.from_numpy(np.array(Image.open(d / "val" / "images" / "val_1.JPEG").convert("RGB")))
    assert torch.equal(cache["test_images"][1], expected.permute(2, 0, 1))
    # the second run reads the cache instead of decoding; the parent folder resolves to the same data
    monkeypatch.setattr(kd_data, "_decode_images", lambda files: pytest.fail("should use the cache"))
    again = build_data("tiny-imagenet", str(tmp_path), val_fraction=0.25, aug=False, cache_dir=cache_dir)
    assert torch.equal(again.train_images, splits.train_images)
    assert torch.equal(again.test[3][0], splits.test[3][0])


def pack_archive(source: Path, archive: Path) -> Path:
    """`source` (a folder) packed as `archive`, a .zip or a .tar.gz, with the folder as its top-level entry."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(source.rglob("*")):
                zf.write(path, path.relative_to(source.parent))
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(source, arcname=source.name)
    return archive


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_tiny_imagenet_from_archive_extracts_once(tmp_path, kind, monkeypatch):
    source = _write_tiny(tmp_path / "src")
    data = tmp_path / "data"
    data.mkdir()
    archive = pack_archive(source, data / f"tiny-fake.{kind}")
    cache = tmp_path / "cache"
    _check_tiny(build_data("tiny-imagenet", str(archive), val_fraction=0.25, cache_dir=cache), cache)
    assert [p.name for p in data.iterdir()] == [archive.name]  # extracted into the cache, never beside the archive
    (extracted,) = (cache / "extracted").iterdir()  # no temp dirs left
    assert extracted.name.startswith("tiny-fake-") and (extracted / "wnids.txt").is_file()
    for cls in (zipfile.ZipFile, tarfile.TarFile):
        monkeypatch.setattr(cls, "extractall", lambda *a, **k: pytest.fail("extracted twice"))
    _check_tiny(build_data("tiny-imagenet", str(data), val_fraction=0.25, cache_dir=cache), cache)
    _check_tiny(build_data("tiny-imagenet", str(archive), val_fraction=0.25, cache_dir=cache), cache)


def test_tiny_imagenet_folder_containing_only_an_archive(tmp_path):
    source = _write_tiny(tmp_path / "src")
    shutil.make_archive(str(tmp_path / "data" / "tiny-fake"), "gztar", source.parent, source.name)
    _check_tiny(
        build_data("tiny-imagenet", str(tmp_path / "data"), val_fraction=0.25, cache_dir=tmp_path / "c"), tmp_path / "c"
    )


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_data("tiny-imagenet", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="wnids.txt"):
        build_data("tiny-imagenet", str(tmp_path))
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match="not a folder"):
        build_data("tiny-imagenet", str(tmp_path / "notes.txt"))
    d = _write_tiny(tmp_path)
    annotations = d / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_0.JPEG\tn777\t0\t0\t7\t7\n")
    with pytest.raises(DataError, match="n777"):
        build_data("tiny-imagenet", str(d))
    annotations.write_text("\n")
    with pytest.raises(DataError, match="lists no images"):
        build_data("tiny-imagenet", str(d))
    annotations.unlink()
    with pytest.raises(DataError, match="val_annotations.txt"):
        build_data("tiny-imagenet", str(d))
    shutil.rmtree(d / "train" / "n002")
    with pytest.raises(DataError, match="n002"):
        build_data("tiny-imagenet", str(d))


@pytest.mark.skipif(not REAL_MINI.is_file(), reason="set KD_DATA_DIR to a folder holding tiny-imagenet-mini.tar.gz")
def test_tiny_imagenet_mini_real_data(tmp_path):
    splits = build_data("tiny-imagenet", str(REAL_MINI), val_fraction=0.1, cache_dir=tmp_path)
    assert splits.num_classes == 10 and splits.image_size == 64
    assert len(splits.train) + len(splits.val) == 1000 and len(splits.val) == 100 and len(splits.test) == 500
    assert torch.bincount(splits.train_labels).tolist() == [90] * 10
    assert splits.train_images.shape == (900, 3, 64, 64)
    image, label, index = splits.train[0]
    assert image.shape == (3, 64, 64) and 0 <= label < 10 and index == 0
    assert len(list(tmp_path.glob(f"decoded/*/{kd_data.TINY_CACHE_NAME}"))) == 1


# ----------------------------------------------------------------------------------------------- class subsets


def test_tiny_imagenet_class_subset_decodes_only_its_classes(tmp_path, monkeypatch):
    d, cache_dir = _write_tiny(tmp_path, wnids=("n001", "n002", "n003", "n004")), tmp_path / "cache"
    decoded: list[int] = []
    real_decode = kd_data._decode_images
    monkeypatch.setattr(kd_data, "_decode_images", lambda files: decoded.append(len(files)) or real_decode(files))
    full = build_data("tiny-imagenet", str(d), val_fraction=0.25, aug=False, cache_dir=cache_dir)
    first2 = build_data("tiny-imagenet", str(d), val_fraction=0.25, aug=False, cache_dir=cache_dir, classes="2")
    assert decoded == [16, 8, 8, 4]  # full: 16 train + 8 val; the subset: 2 x 4 train + 2 x 2 val only
    assert first2.num_classes == 2 and first2.class_names == ["goldfish", "tabby cat"]
    assert first2.class_subset == ("n001", "n002") and full.class_subset == ()
    assert (len(first2.train) + len(first2.val), len(first2.test)) == (8, 4)
    assert sorted(set(first2.test.labels.tolist())) == [0, 1]
    assert first2.fingerprint != full.fingerprint
    # one decoded cache per subset, beside the full one (never overwriting it)
    assert len(list(cache_dir.glob("decoded/*/decoded_uint8*.pt"))) == 2
    # a file of ids: labels follow wnids.txt, not the file's order; comments and blank lines are ignored
    listed = tmp_path / "classes.txt"
    listed.write_text("# my subset\nn004\n\nn002  # tabby\n")
    picked = build_data("tiny-imagenet", str(d), val_fraction=0.25, aug=False, cache_dir=cache_dir, classes=str(listed))
    assert picked.class_subset == ("n002", "n004") and picked.class_names == ["tabby cat", "n004"]
    assert len(picked.test) == 4 and picked.fingerprint not in (full.fingerprint, first2.fingerprint)
    # the cached subset is read back without decoding
    monkeypatch.setattr(kd_data, "_decode_images", lambda files: pytest.fail("should use the subset's cache"))
    again = build_data("tiny-imagenet", str(d), val_fraction=0.25, aug=False, cache_dir=cache_dir, classes="2")
    assert again.fingerprint == first2.fingerprint


def test_imagefolder_class_subset_lists_only_its_folders(tmp_path):
    _write_imagefolder(tmp_path, classes=("cat", "dog", "eel", "fox"))
    full = build_data("imagefolder", str(tmp_path), val_fraction=0.2, image_size=16)
    two = build_data("imagefolder", str(tmp_path), val_fraction=0.2, image_size=16, classes="2")
    assert two.class_names == ["cat", "dog"] and two.class_subset == ("cat", "dog") and two.num_classes == 2
    assert (len(two.train) + len(two.val), len(two.test)) == (10, 4)
    assert all("/eel/" not in p and "/fox/" not in p for p, _ in two.train.samples + two.test.samples)
    listed = tmp_path / "ids.txt"
    listed.write_text("fox\ndog\n")
    picked = build_data("imagefolder", str(tmp_path), val_fraction=0.2, image_size=16, classes=str(listed))
    assert picked.class_names == ["dog", "fox"] and sorted({y for _, y in picked.test.samples}) == [0, 1]
    assert len({full.fingerprint, two.fingerprint, picked.fingerprint}) == 3


@pytest.mark.parametrize(
    "content, message",
    [
        ("n001\nn999\n", "class 'n999' is not in"),
        ("n001\nn002\nn001\n", "class 'n001' is listed twice"),
        ("n001\n", "needs at least 2 classes, the file lists 1"),
    ],
)
def test_bad_class_lists_are_one_line_errors(tmp_path, content, message):
    d = _write_tiny(tmp_path)
    listed = tmp_path / "classes.txt"
    listed.write_text(content)
    with pytest.raises((ConfigError, DataError), match=message):
        build_data("tiny-imagenet", str(d), cache_dir=tmp_path / "cache", classes=str(listed))
    assert not (tmp_path / "cache" / "decoded").exists()  # refused before any decoding


@pytest.mark.parametrize(
    "classes, message",
    [("1", "needs at least 2 classes"), ("4", "has only 3 classes"), ("nowhere.txt", "neither a number")],
)
def test_bad_class_counts_and_paths(tmp_path, classes, message):
    d = _write_tiny(tmp_path)
    with pytest.raises((ConfigError, DataError), match=message):
        build_data("tiny-imagenet", str(d), cache_dir=tmp_path / "cache", classes=classes)
    with pytest.raises(ConfigError, match="imagefolder or tiny-imagenet"):
        build_data("synthetic", "", classes="2")


def test_sixteen_bit_images_keep_their_contrast(tmp_path):
    """PIL's convert("RGB") clips 16-bit pixels at 255 (a white image); kd keeps the top 8 bits."""
    ramp = (np.arange(64, dtype=np.uint16) * 1024).reshape(8, 8)  # 0 .. 64,512 over the image
    path = tmp_path / "wide.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as img:
        out = np.asarray(kd_data.rgb(img))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], (ramp >> 8).astype(np.uint8)) and (out[..., 0] == out[..., 2]).all()
    assert np.array_equal(
        np.asarray(kd_data.rgb(Image.fromarray(ramp.astype(np.int32) // 1024))),
        np.repeat((ramp // 1024).astype(np.uint8)[..., None], 3, axis=2),
    )  # 8-bit data in mode I
    for folder in ("train/a", "train/b", "val/a", "val/b"):
        (tmp_path / "folder" / folder).mkdir(parents=True)
        Image.fromarray(ramp).save(tmp_path / "folder" / folder / "0.png")
        Image.fromarray(ramp).save(tmp_path / "folder" / folder / "1.png")
    splits = build_data("imagefolder", str(tmp_path / "folder"), val_fraction=0.5, image_size=8, aug=False)
    image = splits.test[0][0]  # normalised: a saturated image would be one value everywhere
    assert image.std() > 0.5


def test_val_annotations_naming_paths_outside_the_data_are_refused(tmp_path):
    for bad in ("/etc/passwd", "../../secret.JPEG", ".."):
        d = _write_tiny(tmp_path / bad.replace("/", "_").replace(".", "d"))
        lines = (d / "val" / "val_annotations.txt").read_text().splitlines()
        lines[1] = "\t".join([bad] + lines[1].split("\t")[1:])
        (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=r"val_annotations.txt:2: .* is not a file name"):
            build_data("tiny-imagenet", str(d), cache_dir=tmp_path / "cache")


def test_imagefolder_links_that_reach_a_folder_twice_are_refused(tmp_path):
    _write_imagefolder(tmp_path / "loop", per_class=(3, 1))
    (tmp_path / "loop" / "train" / "cat" / "again").symlink_to(tmp_path / "loop" / "train")  # walks forever
    with pytest.raises(DataError, match="cat/again reaches a folder already in .* through a symbolic link"):
        build_data("imagefolder", str(tmp_path / "loop"))
    _write_imagefolder(tmp_path / "twice", per_class=(3, 1))
    (tmp_path / "twice" / "train" / "dog" / "cats").symlink_to(tmp_path / "twice" / "train" / "cat")  # duplicates
    with pytest.raises(DataError, match="through a symbolic link"):
        build_data("imagefolder", str(tmp_path / "twice"))
    _write_imagefolder(tmp_path / "fine", per_class=(3, 1))
    (tmp_path / "elsewhere" / "eel").mkdir(parents=True)
    _write_image(tmp_path / "elsewhere" / "eel" / "9.png", size=20)
    (tmp_path / "fine" / "train" / "eel" / "more").symlink_to(tmp_path / "elsewhere" / "eel")  # outside: fine
    assert (
        len(build_data("imagefolder", str(tmp_path / "fine"), val_fraction=0.3).train)
        + len(build_data("imagefolder", str(tmp_path / "fine"), val_fraction=0.3).val)
        == 10
    )


def test_the_leftovers_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    """A kill during an extraction or an atomic write leaves a temp folder/file named with the writer's pid;
    the next extraction or write of the same target removes the ones whose process has ended."""
    import subprocess
    import sys

    from kd.io import atomic_write_json

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    orphan, live = tmp_path / f".x.json.{ended.pid}.abcd.tmp", tmp_path / f".x.json.{os.getpid()}.efgh.tmp"
    orphan.write_text("partial")
    live.write_text("being written by a live process")
    atomic_write_json({"a": 1}, tmp_path / "x.json")
    assert not orphan.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "x.json"])

    source = _write_tiny(tmp_path / "src")
    archive = tmp_path / "tiny-fake.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source, arcname=source.name)
    target = kd_data._extract_once(archive, tmp_path / "cache")
    target.rename(target.with_name("moved"))  # extract again, with a killed run's half-extracted folder beside
    half = target.parent / f".{target.name}.extract-{ended.pid}-xyz"
    (half / "train").mkdir(parents=True)
    assert kd_data._extract_once(archive, tmp_path / "cache") == target and not half.exists()


# ---- archive extraction caps: the member list is read before anything is extracted (issue 23)
def _zip_of(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent))
    return archive


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_over_the_member_or_size_cap_is_refused_before_extracting(tmp_path, kind, monkeypatch):
    source = _write_tiny(tmp_path / "src")
    (source / "zeros.bin").write_bytes(bytes(3_000_000))  # compresses to a few kB, declares 3 MB
    archive = tmp_path / f"tiny-fake.{kind}"
    if kind == "zip":
        _zip_of(source, archive)
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(source, arcname=source.name)
    assert archive.stat().st_size < 100_000
    members = len(list(source.rglob("*"))) + (kind == "tar.gz")  # a tar also lists the top folder
    for cls in (zipfile.ZipFile, tarfile.TarFile):
        monkeypatch.setattr(cls, "extractall", lambda *a, **k: pytest.fail("extracted past the cap"))
    cache = tmp_path / "cache"
    few_files = kd_data.ExtractLimits(max_bytes=10**9, max_files=members - 1)
    with pytest.raises(
        DataError,
        match=rf"holds more than {members - 1} files \(--data.max-extract-files\); "
        "nothing was extracted",
    ):
        build_data("tiny-imagenet", str(archive), val_fraction=0.25, cache_dir=cache, extract_limits=few_files)
    few_bytes = kd_data.ExtractLimits(max_bytes=2_000_000, max_files=1000)
    with pytest.raises(DataError, match=r"expands to more than 0.002 GB \(--data.max-extract-gb; it declares "):
        build_data("tiny-imagenet", str(archive), val_fraction=0.25, cache_dir=cache, extract_limits=few_bytes)
    assert not cache.exists() or not any(cache.rglob("*"))  # not a byte written
    monkeypatch.undo()
    enough = kd_data.ExtractLimits(max_bytes=4_000_000, max_files=members)
    _check_tiny(
        build_data("tiny-imagenet", str(archive), val_fraction=0.25, cache_dir=cache, extract_limits=enough), cache
    )


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_extraction_leaves_no_half_extracted_folder(tmp_path, failure, monkeypatch):
    archive = _zip_of(_write_tiny(tmp_path / "src"), tmp_path / "tiny-fake.zip")
    real = zipfile.ZipFile.extractall

    def extract_then_fail(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)  # everything written, then the disk fills (or Ctrl-C)
        raise failure

    monkeypatch.setattr(zipfile.ZipFile, "extractall", extract_then_fail)
    cache = tmp_path / "cache"
    expected = (
        (DataError, "could not extract .*No space left on device")
        if isinstance(failure, OSError)
        else (KeyboardInterrupt, None)
    )
    with pytest.raises(expected[0], match=expected[1]):
        build_data("tiny-imagenet", str(archive), val_fraction=0.25, cache_dir=cache)
    assert list((cache / "extracted").iterdir()) == []  # the temp folder went with the failure


def test_extraction_caps_are_flags_refused_in_one_line(tmp_path, capsys):
    import train

    source = _write_tiny(tmp_path / "src")
    archive = _zip_of(source, tmp_path / "tiny-fake.zip")
    members = len(list(source.rglob("*")))
    base = [
        "--preset",
        "smoke",
        "--method",
        "ce",
        "--student.model",
        "resnet8",
        "--data.dataset",
        "tiny-imagenet",
        "--data.root",
        str(archive),
        "--data.cache-dir",
        str(tmp_path / "cache"),
        "--wandb.mode",
        "disabled",
        "--run.out-dir",
        str(tmp_path / "runs"),
        "--run.name",
        "r",
    ]
    assert train.main([*base, "--data.max-extract-files", str(members - 1)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {archive} holds more than {members - 1} files (--data.max-extract-files); nothing was "
        "extracted (raise the flag if the archive is what you meant)"
    )
    assert train.main([*base, "--data.max-extract-gb", "0"]) == 2
    assert "--data.max-extract-gb must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
