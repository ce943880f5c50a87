"""kd.fastloader: the device-resident loader against kd.data's DataLoader path (CPU here; same code on CUDA)."""

from __future__ import annotations

import inspect
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from kd import fastloader
from kd.data import TensorImageDataset, _tensor_transform
from kd.errors import CheckpointError, ConfigError
from kd.fastloader import DeviceLoader, crop_flip, crop_padding, sample_crop_flip

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def random_images(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 7


def to_uint8(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """Invert the normalisation of a float batch [B,3,H,W] back to uint8 pixels."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x * s + m).mul(255).round().to(torch.uint8)


def windows(image: torch.Tensor, pad: int) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every (top, left, flipped) window of the zero-padded image, as the reference."""
    h, w = image.shape[-2:]
    padded = F.pad(image, (pad, pad, pad, pad))
    out = {}
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            win = padded[:, top : top + h, left : left + w]
            out[(top, left, False)], out[(top, left, True)] = win, win.flip(-1)
    return out


# ----------------------------------------------------------------------------------------------- batches


def test_train_batches_shapes_dtypes_ranges_and_one_epoch_of_distinct_samples():
    images, labels = random_images(50, 16)
    loader = DeviceLoader(images, labels, batch_size=8, mean=MEAN, std=STD, train=True, seed=0)
    assert len(loader) == 6  # drop_last: fixed shapes
    seen = []
    for x, y, index in loader:
        assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and index.dtype == torch.int64 and y.shape == index.shape == (8,)
        assert torch.equal(y, labels[index])
        pixels = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        seen.append(index)
    seen = torch.cat(seen)
    assert len(seen) == 48 and len(seen.unique()) == 48 and seen.max() < 50
    assert not torch.equal(seen, torch.arange(48))  # shuffled


@pytest.mark.parametrize("image_size", [0, 24])
def test_eval_batches_equal_the_dataloader_eval_transform(image_size):
    images, labels = random_images(20, 16)
    loader = DeviceLoader(images, labels, batch_size=8, mean=MEAN, std=STD, train=False, image_size=image_size)
    size = image_size or 16
    reference = TensorImageDataset(images, labels, _tensor_transform(16, size, MEAN, STD, augment=False))
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [8, 8, 4]  # every sample kept, in order
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (20, 3, size, size)
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(20))
    expected = torch.stack([reference[i][0] for i in range(20)])
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


def test_crop_flip_equals_a_padded_window_per_sample():
    images, _ = random_images(6, 12)
    offsets = torch.tensor([[0, 0], [3, 3], [6, 6], [0, 6], [6, 0], [2, 5]])
    flips = torch.tensor([False, False, True, True, False, True])
    out = crop_flip(images, offsets, flips, pad=3)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for b in range(6):
        top, left = offsets[b].tolist()
        assert torch.equal(out[b], windows(images[b], 3)[(top, left, bool(flips[b]))])
    assert torch.equal(out[1], images[1])  # centre offset, no flip: the image itself
    index = torch.tensor([5, 4, 3, 2, 1, 0])  # the one-gather path on a dataset padded once agrees
    direct = fastloader.gather_windows(F.pad(images, (3, 3, 3, 3)), index, offsets, flips, (12, 12))
    assert torch.equal(direct, crop_flip(images[index], offsets, flips, pad=3))


def test_augmented_batch_is_a_shifted_or_flipped_window_of_the_source():
    images, labels = random_images(64, 16, seed=1)
    loader = DeviceLoader(images, labels, batch_size=32, mean=MEAN, std=STD, train=True, seed=3)
    assert loader.pad == crop_padding(16) == 2
    x, _, index = next(iter(loader))
    pixels = to_uint8(x)
    found = []
    for b in range(32):
        source = images[index[b]]
        matches = [k for k, win in windows(source, 2).items() if torch.equal(win, pixels[b])]
        assert matches, f"sample {b} is not a window of its padded source"
        found.append(matches[0])
    assert sum(1 for k in found if k != (2, 2, False)) >= 24  # most samples really moved or flipped
    assert any(k[2] for k in found) and any(not k[2] for k in found)


def test_no_augmentation_when_aug_off():
    images, labels = random_images(32, 16)
    loader = DeviceLoader(images, labels, batch_size=16, mean=MEAN, std=STD, train=True, augment=False)
    x, _, index = next(iter(loader))
    assert torch.equal(to_uint8(x), images[index])


def test_fixed_seed_reproduces_batches_and_other_seeds_differ():
    images, labels = random_images(40, 16)

    def first_two_epochs(seed: int) -> list[torch.Tensor]:
        loader = DeviceLoader(images, labels, batch_size=10, mean=MEAN, std=STD, train=True, seed=seed)
        return [x for _ in range(2) for x, _, _ in loader]

    a, b, c = first_two_epochs(5), first_two_epochs(5), first_two_epochs(6)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[4])  # the second epoch is a new draw


def test_resize_then_crop_at_the_target_size():
    images, labels = random_images(16, 16)
    loader = DeviceLoader(images, labels, batch_size=8, mean=MEAN, std=STD, train=True, image_size=24)
    x, _, index = next(iter(loader))
    assert x.shape == (8, 3, 24, 24) and loader.pad == 3
    resized = TF.resize(images[index], [24, 24], antialias=True)  # the DataLoader path's Resize
    pixels = to_uint8(x)
    for b in range(8):
        assert any(torch.equal(win, pixels[b]) for win in windows(resized[b], 3).values())


# ----------------------------------------------------------------------------------------------- distribution


def coordinate_image(size: int = 32) -> torch.Tensor:
    """uint8 [3,S,S]: channel 0 = row + 1, channel 1 = column + 1 (0 is the padding), channel 2 constant."""
    r = torch.arange(1, size + 1, dtype=torch.uint8)
    return torch.stack(
        [
            r.view(-1, 1).expand(size, size),
            r.view(1, -1).expand(size, size),
            torch.full((size, size), 200, dtype=torch.uint8),
        ]
    )


def recover_offsets(pixels: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flipped) of crops [B,3,32,32] of coordinate_image(), read from the centre pixels."""
    centre = pixels[:, :, 16, 16].long()
    flipped = pixels[:, 1, 16, 17].long() < centre[:, 1]
    top = centre[:, 0] - 17 + pad
    left = torch.where(flipped, centre[:, 1] - 16 + pad, centre[:, 1] - 17 + pad)
    return top, left, flipped


def frequencies(values: torch.Tensor, bins: int) -> torch.Tensor:
    return torch.bincount(values, minlength=bins).double() / len(values)


def test_fast_and_dataloader_paths_draw_the_same_offset_and_flip_distribution():
    n, pad, identity = 20_000, 4, ((0.0,) * 3, (1 / 255,) * 3)  # identity: normalised values = pixel values
    image = coordinate_image()
    torch.manual_seed(0)
    transform = _tensor_transform(32, 32, *identity, augment=True)
    slow = torch.stack([transform(image) for _ in range(n)]).round().to(torch.uint8)
    loader = DeviceLoader(
        image.expand(2000, 3, 32, 32).contiguous(),
        torch.zeros(2000, dtype=torch.long),
        batch_size=500,
        mean=identity[0],
        std=identity[1],
        train=True,
        seed=0,
    )
    fast = torch.cat([x for _ in range(10) for x, _, _ in loader]).round().to(torch.uint8)
    assert len(fast) == n
    sampled = sample_crop_flip(n, pad, torch.Generator().manual_seed(1))
    paths = {
        "dataloader": recover_offsets(slow, pad),
        "fast": recover_offsets(fast, pad),
        "sampler": (sampled[0][:, 0], sampled[0][:, 1], sampled[1]),
    }
    for name, (top, left, flipped) in paths.items():
        for values in (top, left):
            assert values.min() >= 0 and values.max() <= 2 * pad, name
            freq = frequencies(values, 2 * pad + 1)
            assert (freq - 1 / 9).abs().max() < 0.02, (name, freq)  # ~9 standard errors of 0.0022
        assert abs(flipped.double().mean() - 0.5) < 0.03, name
    for a, b in (("dataloader", "fast"), ("dataloader", "sampler")):
        for k in range(2):
            gap = (frequencies(paths[a][k], 9) - frequencies(paths[b][k], 9)).abs().max()
            assert gap < 0.025, (a, b, k, gap)


# ----------------------------------------------------------------------------------------------- construction


def test_one_batched_call_per_batch_no_per_sample_python():
    images, labels = random_images(40, 16)
    loader = DeviceLoader(images, labels, batch_size=8, mean=MEAN, std=STD, train=True)
    with (
        mock.patch.object(DeviceLoader, "make_batch", autospec=True, side_effect=DeviceLoader.make_batch) as mb,
        mock.patch.object(fastloader, "gather_windows", side_effect=fastloader.gather_windows) as gw,
        mock.patch.object(fastloader, "sample_crop_flip", side_effect=fastloader.sample_crop_flip) as sc,
    ):
        batches = list(loader)
    assert len(batches) == mb.call_count == gw.call_count == 5  # one gather+crop+flip per batch
    assert sc.call_count == 1  # every random draw of the epoch in one call
    for call in gw.call_args_list:
        assert call.args[1].shape == (8,) and call.args[2].shape == (8, 2)  # whole batches, never one sample
    for fn in (
        crop_flip,
        fastloader.gather_windows,
        DeviceLoader.make_batch,
        fastloader.to_normalised_float,
        sample_crop_flip,
    ):
        assert "for " not in inspect.getsource(fn).split('"""')[-1], fn.__name__  # no loop in the code


# ----------------------------------------------------------------------------------------------- state


def test_state_dict_restores_the_rest_of_an_epoch_exactly():
    images, labels = random_images(60, 16)

    def make() -> DeviceLoader:
        return DeviceLoader(images, labels, batch_size=10, mean=MEAN, std=STD, train=True, seed=2)

    loader = make()
    list(loader)  # epoch 1
    it = iter(loader)
    next(it), next(it)  # two batches of epoch 2
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["position"] == 2
    rest = [x for x, _, _ in it] + [x for x, _, _ in loader]  # rest of epoch 2, all of epoch 3
    restored = make()
    restored.load_state_dict(state)
    again = [x for x, _, _ in restored] + [x for x, _, _ in restored]
    assert len(again) == len(rest) == 4 + 6
    assert all(torch.equal(a, b) for a, b in zip(again, rest))


def test_state_of_a_finished_epoch_starts_the_next_one():
    images, labels = random_images(30, 16)
    loader = DeviceLoader(images, labels, batch_size=10, mean=MEAN, std=STD, train=True, seed=4)
    list(loader)
    state = loader.state_dict()
    nxt = [x for x, _, _ in loader]
    restored = DeviceLoader(images, labels, batch_size=10, mean=MEAN, std=STD, train=True, seed=99)
    restored.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip([x for x, _, _ in restored], nxt))
    with pytest.raises(CheckpointError, match="batch_size"):
        DeviceLoader(images, labels, batch_size=5, mean=MEAN, std=STD, train=True).load_state_dict(state)


def test_bad_inputs_raise_config_error():
    images, labels = random_images(10, 16)
    with pytest.raises(ConfigError, match="larger than the split"):
        DeviceLoader(images, labels, batch_size=11, mean=MEAN, std=STD, train=True)
    with pytest.raises(ConfigError, match="uint8"):
        DeviceLoader(images.float(), labels, batch_size=2, mean=MEAN, std=STD, train=True)


def test_the_loader_keeps_no_padded_copy_of_the_dataset():
    """Padding is per batch: on the CPU the loader holds the dataset's own tensor, nothing bigger."""
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(40) % 4, batch_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, train=True)
    held = [v for v in vars(loader).values() if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.ndim == 4]
    assert [t.data_ptr() for t in held] == [images.data_ptr()]
    assert next(iter(loader))[0].shape == (8, 3, 32, 32)
