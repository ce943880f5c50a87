"""One training epoch of KD resnet32x4 -> resnet8x4 on CIFAR-shaped synthetic data, end to end through train.py's
own loop (train.train_epoch on build_loaders()' DeviceLoader, the Trainer from single_trainer), then the same
steps through a separate instrumented copy of Trainer.step that splits the time into data / teacher forward /
student forward + backward / optimiser, and the projected time of a 240-epoch run.

The split needs boundaries inside the step: the instrumented copy puts a device synchronisation
(torch.cuda.synchronize on CUDA) and a time.perf_counter() reading at each one, so on CUDA it runs slower
than the real step (no overlap across boundaries); the end-to-end figure and the projection come from the
real loop, the split only says where the time goes. On CUDA the achieved TFLOP/s and the fraction of the GPU's
bf16 peak come from counting one step's FLOPs with torch.utils.flop_counter.

    python bench/epoch.py --quick                     # CPU: 640 images (10 steps of 64), no reference epoch
    python bench/epoch.py                             # 50,000 images, plus the reference loop's epoch
    python bench/epoch.py --device cuda --flags "--run.amp bf16"
"""

from __future__ import annotations

import argparse
import time

import torch

import _common as C
from kd.freeze import set_train  # noqa: E402  (_common put the checkout on sys.path)
from kd.teachers import frozen_forward  # noqa: E402
from train import LossTracker  # noqa: E402

EPOCHS = 240
CIFAR_TRAIN = 50_000  # the projection's epoch: CIFAR-100's training set


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="640 images (10 steps), no reference epoch")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--flags", default="", help="train.py flags, e.g. '--run.amp bf16'")
    p.add_argument("--images", type=int, help="training images in the epoch (50,000; --quick 640)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--method", default="kd", help="any single-stage method of train.py")
    p.add_argument("--split-steps", type=int, default=200, help="steps of the instrumented copy (at most one epoch)")
    p.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the reference loop (PIL DataLoader, eager, .item()) over the same steps "
        "(default: on, off with --quick)",
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak of the GPU (0: by its name)")
    args = p.parse_args()
    args.images = args.images or (640 if args.quick else 50_000)
    if args.reference is None:
        args.reference = not args.quick
    return args


def instrumented_epoch(b: C.Bundle, steps: int) -> dict[str, float]:
    """Trainer.step's work for `steps` batches, copied with a sync + perf_counter() at each boundary.
    Returns seconds per part: data, teacher, student (forward, loss, backward), optimiser (+ schedule, tracker)."""
    tr, device = b.trainer, b.device
    set_train(tr.model, tr.freeze_policy)
    tr.method.train()
    amp = dict(
        device_type=device.type, dtype=tr.runtime.amp_dtype or torch.float32, enabled=tr.runtime.amp_dtype is not None
    )
    maps = tr.method.needs_maps
    tracker = LossTracker()
    split = dict.fromkeys(("data", "teacher", "student", "optimiser"), 0.0)
    batches = iter(b.loader)
    C.sync(device)
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y, index = (t.to(device, non_blocking=True) for t in next(batches))
        if tr.mixer is not None:
            x, y = tr.mixer(x, y)
        if tr.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        C.sync(device)
        t1 = time.perf_counter()
        with torch.autocast(**amp):  # as train.py's train_step: the teachers' own precision, inference mode
            t_outs = frozen_forward(tr.teachers, x, with_maps=maps, dtype=tr.runtime.teacher_dtype)
        C.sync(device)
        t2 = time.perf_counter()
        with torch.autocast(**amp):
            terms = tr.step_module(x, y, index, 1, t_outs)
            weights = tr.method.loss_weights(1)
            loss = sum(weights.get(k, 1.0) * v for k, v in terms.items())
        tr.optimizer.zero_grad(set_to_none=True)
        tr.scaler.scale(loss).backward()
        C.sync(device)
        t3 = time.perf_counter()
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
        tr.scheduler.step()
        tracker.add({"loss": loss.detach(), **{k: v.detach().float() for k, v in terms.items()}}, 1)
        C.sync(device)
        t4 = time.perf_counter()
        for part, dt in zip(split, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            split[part] += dt
    return split


def main() -> None:
    args = parse_args()
    device = C.setup(args.threads, args.device)
    # the synthetic set holds a stratified 10% validation split (at least one image per class) out of what it
    # generates: generate enough for `images` training images
    generated = max(round(args.images / 0.9), args.images + 100)
    argv = C.train_argv(
        C.CIFAR_PAIR, args.method, batch=args.batch, train_size=generated, steps=0, device=args.device, flags=args.flags
    )
    cfg = C.parse(argv)
    data = C.build_data(cfg)
    ours = C.build_ours(cfg, data)
    steps = len(ours.loader)
    images = steps * args.batch
    print(f"{C.describe_machine()}; device {device}; flags: {args.flags or '(train.py defaults)'}")
    print(
        f"{args.method} {C.CIFAR_PAIR.name}: one epoch of {len(data.train):,} synthetic 32x32 images, "
        f"{steps} steps of {args.batch} ({images:,} images trained)"
    )

    C.ours_steps(ours, min(2, steps))  # warm-up: first-call allocations, oneDNN primitives, CUDA kernels
    C.sync(device)
    t = time.perf_counter()
    C.ours_steps(ours, steps)  # one whole epoch through train.train_epoch
    C.sync(device)
    epoch_s = time.perf_counter() - t
    ips = images / epoch_s

    split_steps = min(args.split_steps, steps)
    split = instrumented_epoch(ours, split_steps)
    total = sum(split.values())

    print(f"\n{'end to end (train.py)':<34}{epoch_s:>10.1f} s/epoch {ips:>10.1f} img/s")
    print(f"instrumented copy, {split_steps} steps (sync at each boundary):")
    for part, name in (
        ("data", "data (DeviceLoader + to device)"),
        ("teacher", "teacher forward"),
        ("student", "student forward + loss + backward"),
        ("optimiser", "optimiser + schedule"),
    ):
        print(f"  {name:<40}{1e3 * split[part] / split_steps:>9.1f} ms/step {100 * split[part] / total:>6.1f}%")
    print(f"  {'sum':<40}{1e3 * total / split_steps:>9.1f} ms/step")

    projected_h = EPOCHS * CIFAR_TRAIN / ips / 3600
    print(
        f"\nprojected {EPOCHS} epochs of {CIFAR_TRAIN:,} images (CIFAR-100's training set) at {ips:.1f} img/s: "
        f"{projected_h:.2f} h ({60 * projected_h:.1f} min)"
    )
    summary = [
        f"{ips:.1f} img/s",
        f"epoch {epoch_s:.1f} s",
        f"{EPOCHS} epochs {projected_h:.2f} h",
        f"data {100 * split['data'] / total:.1f}% of step",
    ]

    if device.type == "cuda":
        flops = C.count_flops(lambda: C.ours_steps(ours, 1))
        tflops = flops * steps / epoch_s / 1e12
        peak = args.peak_tflops or C.bf16_peak_tflops(device)
        frac = f", {100 * tflops / peak:.1f}% of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""
        print(f"FLOPs per step (flop_counter): {flops / 1e9:.1f} GFLOP; achieved {tflops:.1f} TFLOP/s{frac}")
        summary.append(f"{tflops:.1f} TFLOP/s" + (f" ({100 * tflops / peak:.1f}% bf16 peak)" if peak else ""))

    if args.reference:
        ref_cfg = C.parse(
            C.train_argv(
                C.CIFAR_PAIR,
                args.method,
                batch=args.batch,
                train_size=generated,
                steps=0,
                device=args.device,
                flags=C.plain_flags(args.flags),
            )
        )
        loader = C.reference_loader(data, args.batch, args.workers, device)
        ref = C.build_ours(ref_cfg, data)
        ref_steps = C.reference_stepper(ref, iter(C.cycle(loader)))
        ref_steps(min(2, steps))  # warm-up (also starts the workers)
        C.sync(device)
        t = time.perf_counter()
        ref_steps(steps)
        C.sync(device)
        ref_s = time.perf_counter() - t
        print(
            f"{'reference loop, same steps':<34}{ref_s:>10.1f} s/epoch {images / ref_s:>10.1f} img/s  "
            f"(ours {ref_s / epoch_s:.2f}x)"
        )
        summary.append(f"ours/ref per epoch {ref_s / epoch_s:.2f}x")
    print("epoch: " + ", ".join(summary))


if __name__ == "__main__":
    main()
