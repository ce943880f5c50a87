"""Images/s of one training step per method: train.py's own step against a plain reference loop in the style of
the standard KD toolboxes, and against the best hand-written loop using the same kernels.

Three loops on the same models, batch shape and images, per method:
  ours  train.py's code: the Trainer built as run() builds it (make_trainer; ASMB: AsmbRun's phase trainers),
        stepped through Trainer.train_epoch on build_loaders()' DeviceLoader, with the train.py --flags given.
  ref   a plain loop as RepDistiller / mdistiller write it: DataLoader (2 workers) over a PIL-backed CIFAR-shaped
        dataset with torchvision PIL transforms (RandomCrop(32, padding=4), flip, ToTensor, Normalize), eager NCHW
        float32 models, teachers under no_grad, plain torch.optim.SGD (Adam for ASMB phase A), `.item()` of the
        loss and top-1/top-5 accuracy every step.
  hand  our data path and the same models, flags, loss calls, optimiser and schedule written inline without the
        Trainer abstraction (what train.py's step should be within 5% of).
The loss math is the same code in all three (Method.loss_terms), so the ratios measure the loops. After warm-up
the loops alternate in one process (the order rotates every round), so load from other processes hits all
alike; figures are medians over the rounds.

Pairs: resnet32x4 -> resnet8x4 (kd zoo, CIFAR shapes, 100 classes, batch 64; ce kd dkd at fitnet crd) and the
ASMB default pair resnet152 + efficientnet_b2 -> convnext_tiny at 32 px (small-input stems; asmb phase A and B).

    python bench/step.py --quick                    # CPU, ~2 min: smaller batches, 2 rounds (printed)
    python bench/step.py --quick --flags "--run.channels-last True"
    python bench/step.py                            # batch 64 (ASMB pair 16), 5 rounds of 2 steps
    python bench/step.py --device cuda --flags "--run.channels-last True --run.amp bf16"
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import _common as C


FULL = {"batch": 64, "asmb_batch": 16, "rounds": 5, "steps": 2, "train_size": 20_000}
QUICK = {"batch": 16, "asmb_batch": 2, "rounds": 3, "steps": 1, "train_size": 4_000}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smaller figures for a CPU: batch 16 (ASMB pair 2), 3 rounds of 1 step, 4k images")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pairs", nargs="+", choices=["cifar", "asmb"], default=["cifar", "asmb"])
    p.add_argument("--methods", nargs="+", default=None, help="subset of ce kd dkd at fitnet crd asmb:A asmb:B")
    p.add_argument("--flags", default="", help="train.py flags of ours and hand, e.g. '--run.channels-last True'")
    p.add_argument("--batch", type=int, help="batch of the resnet32x4 -> resnet8x4 pair (64; --quick 16)")
    p.add_argument("--asmb-batch", type=int, help="batch of the ASMB pair (16; --quick 2)")
    p.add_argument("--rounds", type=int, help="timed rounds, each timing every loop once (5; --quick 3)")
    p.add_argument("--steps", type=int, help="steps per loop per round (2; --quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed blocks of --steps per loop first")
    p.add_argument("--train-size", type=int,
                   help="synthetic images before the 10%% validation split (20000: CRD gets its 16384 negatives; "
                        "--quick 4000)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak of the GPU (0: by its name)")
    args = p.parse_args()
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def bench_method(pair: C.Pair, method: str, data, batch: int, ref_batches, args) -> dict[str, float]:
    device = torch.device(args.device)
    phase = method.split(":")[1] if ":" in method else "single"
    argv = dict(batch=batch, train_size=args.train_size, steps=args.steps, device=args.device)
    cfg = C.parse(C.train_argv(pair, method, flags=args.flags, **argv))
    ref_cfg = C.parse(C.train_argv(pair, method, flags=C.plain_flags(args.flags), **argv))
    ours, hand, ref = C.build_ours(cfg, data, phase), C.build_ours(cfg, data, phase), C.build_ours(ref_cfg, data, phase)
    loops = {"ours": lambda n: C.ours_steps(ours, n), "ref": C.reference_stepper(ref, ref_batches),
             "hand": C.hand_stepper(hand)}
    for _ in range(args.warmup):
        for run in loops.values():
            run(args.steps)
    times: dict[str, list[float]] = {k: [] for k in loops}
    names = list(loops)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            C.sync(device)
            t = time.perf_counter()
            loops[name](args.steps)
            C.sync(device)
            times[name].append(time.perf_counter() - t)
    out = {f"{k}_ips": batch * args.steps / C.median(v) for k, v in times.items()}
    if device.type == "cuda":
        flops = C.count_flops(lambda: C.ours_steps(ours, 1))
        out["tflops"] = flops * out["ours_ips"] / batch / 1e12
    del ours, hand, ref, loops
    gc.collect()
    return out


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    pairs = {"cifar": C.CIFAR_PAIR, "asmb": C.ASMB_PAIR}
    peak = args.peak_tflops or C.bf16_peak_tflops(device)
    print(f"{C.describe_machine()}; device {device}; ours/hand flags: {args.flags or '(train.py defaults)'}")
    print(f"median of {args.rounds} alternating rounds of {args.steps} step(s) per loop after {args.warmup} warm-up "
          f"block(s); reference loop: DataLoader with {args.workers} workers over PIL images"
          + ("; --quick: batch and rounds reduced" if args.quick else ""))
    head = f"{'pair':<42}{'method':<8}{'batch':>6}{'ours img/s':>12}{'ref img/s':>11}{'hand img/s':>12}" \
           f"{'ours/ref':>10}{'ours/hand':>11}"
    print(head + (f"{'TFLOP/s':>9}{'% bf16 peak':>13}" if device.type == "cuda" else ""))
    ratios, hand_ratios = [], []
    for key in args.pairs:
        pair = pairs[key]
        methods = [m for m in pair.methods if args.methods is None or m in args.methods]
        if not methods:
            continue
        batch = args.batch if key == "cifar" else args.asmb_batch
        base = C.parse(C.train_argv(pair, methods[0], batch=batch, train_size=args.train_size, steps=args.steps,
                                    device=args.device))
        data = C.build_data(base)
        ref_batches = C.cycle(C.reference_loader(data, batch, args.workers, device))
        next(ref_batches)  # start the worker processes before the models exist (smaller forks)
        for method in methods:
            r = bench_method(pair, method, data, batch, ref_batches, args)
            line = f"{pair.name:<42}{method:<8}{batch:>6}{r['ours_ips']:>12.1f}{r['ref_ips']:>11.1f}" \
                   f"{r['hand_ips']:>12.1f}{r['ours_ips'] / r['ref_ips']:>9.2f}x{r['ours_ips'] / r['hand_ips']:>10.2f}x"
            if "tflops" in r:
                line += f"{r['tflops']:>9.1f}" + (f"{100 * r['tflops'] / peak:>12.1f}%" if peak else f"{'-':>13}")
            print(line, flush=True)
            ratios.append(f"{method} {r['ours_ips'] / r['ref_ips']:.2f}x")
            hand_ratios.append(f"{method} {r['ours_ips'] / r['hand_ips']:.2f}x")
        del ref_batches
        gc.collect()
    print(f"ours/ref: {', '.join(ratios)}; ours/hand: {', '.join(hand_ratios)}")


if __name__ == "__main__":
    main()
