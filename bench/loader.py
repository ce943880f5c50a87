"""Samples/s of the device-resident loader (kd.fastloader) against the DataLoader path (kd.data's
TensorImageDataset with torchvision v2 transforms and worker processes), on CIFAR-shaped data.

Both paths do the same work per sample: random crop (pad 4) + horizontal flip + float + normalise, and
deliver the batch on the training device. Each round times one full training epoch of each path; the
paths alternate (and swap which goes first every round) so that load from other processes on a shared
machine hits both alike. Reported: median samples/s over the rounds, and the ratio of the medians.

    python bench/loader.py --quick        # under a minute on 2 CPU cores
    python bench/loader.py                # 50k images (CIFAR-100 train size), 5 rounds, CPU and CUDA
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kd.data import CIFAR100_MEAN, CIFAR100_STD, TensorImageDataset, _tensor_transform, make_loader  # noqa: E402
from kd.fastloader import DeviceLoader  # noqa: E402


def epoch_samples_per_s(loader, device: torch.device) -> float:
    """Iterate one epoch, with every batch on `device`; samples/s including the host-to-device copy."""
    n = 0
    start = time.perf_counter()
    for x, y, _ in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def bench_device(
    device: torch.device, images: torch.Tensor, labels: torch.Tensor, batch_size: int, workers: int, rounds: int
) -> dict[str, list[float]]:
    dataset = TensorImageDataset(images, labels, _tensor_transform(32, 32, CIFAR100_MEAN, CIFAR100_STD, True))
    loaders = {
        "fast": DeviceLoader(
            images,
            labels,
            batch_size=batch_size,
            mean=CIFAR100_MEAN,
            std=CIFAR100_STD,
            train=True,
            device=device,
            seed=0,
        ),
        "dataloader": make_loader(dataset, batch_size, train=True, workers=workers, seed=0),
    }
    for loader in loaders.values():  # warm-up: worker start-up, CUDA context and kernels
        epoch_samples_per_s(loader, device)
    results: dict[str, list[float]] = {name: [] for name in loaders}
    for r in range(rounds):
        order = list(loaders) if r % 2 == 0 else list(reversed(loaders))
        for name in order:
            results[name].append(epoch_samples_per_s(loaders[name], device))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k images, 3 rounds (under a minute on 2 cores)")
    ap.add_argument("--samples", type=int, default=50_000, help="images in the synthetic training set")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timed epochs per path")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--device", choices=["all", "cpu", "cuda"], default="all", help="all = cpu and cuda if present")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads of the main process (0 = torch's default); 1 avoids the stalls "
        "of multi-threaded ops on a machine whose cores are busy with other processes",
    )
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.samples, args.rounds = 10_240, 3

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.samples, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 100, (args.samples,), generator=g)
    devices = [torch.device("cpu")] if args.device in ("all", "cpu") else []
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        sys.exit("--device cuda but no CUDA device is available")

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.samples} CIFAR-shaped images, "
        f"batch {args.batch_size}, DataLoader workers {args.workers}, {args.rounds} alternating rounds"
    )
    print(f"{'device':<8} {'path':<11} {'median samples/s':>17} {'min':>10} {'max':>10}")
    ratios = []
    for device in devices:
        res = bench_device(device, images, labels, args.batch_size, args.workers, args.rounds)
        for name, values in res.items():
            print(
                f"{device.type:<8} {name:<11} {statistics.median(values):>17,.0f} {min(values):>10,.0f} "
                f"{max(values):>10,.0f}"
            )
        ratio = statistics.median(res["fast"]) / statistics.median(res["dataloader"])
        ratios.append(f"{device.type} {ratio:.1f}x")
    print(f"ratio fast / DataLoader (median samples/s): {', '.join(ratios)}")


if __name__ == "__main__":
    main()
