"""Peak resident memory of a short kd run: train.py's loop (device-resident loader) vs the toolboxes' loop
(PIL DataLoader with 2 workers, float32 eager), resnet32x4 -> resnet8x4, batch 64, CIFAR-100-shaped synthetic
data (50,000 training images, 100 classes). Each loop runs in its own fresh process (peak RSS never goes
down, so one process per measurement); the loops alternate over the rounds; medians are printed.

    python bench/memory.py                      # 2 rounds, 3 steps per run
    python bench/memory.py --rounds 3 --steps 5 --images 50000

Reported per loop: the main process's peak RSS (resource.getrusage(RUSAGE_SELF).ru_maxrss) and the largest
worker's (RUSAGE_CHILDREN; the reference's 2 DataLoader workers each hold a forked view of the dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="training steps per run (after one warm-up step)")
    p.add_argument("--images", type=int, default=50_000, help="training images (CIFAR-100: 50,000)")
    p.add_argument("--flags", default="", help="train.py flags of train.py's loop")
    p.add_argument("--one", choices=["ours", "ref"], help=argparse.SUPPRESS)  # the child process
    return p.parse_args()


def run_one(args: argparse.Namespace) -> None:
    import torch

    import _common as C

    torch.set_num_threads(1)
    generated = round(args.images / 0.9)  # the 10% validation split comes out of the generated set
    flags = args.flags if args.one == "ours" else C.plain_flags(args.flags)
    cfg = C.parse(
        C.train_argv(
            C.CIFAR_PAIR, "kd", batch=64, train_size=generated, steps=args.steps + 1, device="cpu", flags=flags
        )
    )
    data = C.build_data(cfg)
    bundle = C.build_ours(cfg, data)
    if args.one == "ours":
        C.ours_steps(bundle, args.steps + 1)
    else:
        C.reference_stepper(bundle, C.cycle(C.reference_loader(data, 64, 2, torch.device("cpu"))))(args.steps + 1)
    kib = 1024  # ru_maxrss is in KiB on Linux
    print(
        json.dumps(
            {
                "main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
                "worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib,
            }
        )
    )


def main() -> None:
    args = parse_args()
    if args.one:
        return run_one(args)
    results: dict[str, list[dict[str, float]]] = {"ours": [], "ref": []}
    for r in range(args.rounds):
        for loop in ("ours", "ref") if r % 2 == 0 else ("ref", "ours"):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                loop,
                "--steps",
                str(args.steps),
                "--images",
                str(args.images),
                "--flags",
                args.flags,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if out.returncode:
                raise SystemExit(f"{loop} failed:\n{out.stderr[-2000:]}")
            results[loop].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {loop}: {results[loop][-1]}", flush=True)
    print(
        f"kd resnet32x4 -> resnet8x4, batch 64, {args.images:,} CIFAR-shaped images, {args.steps} steps; "
        f"medians over {args.rounds} rounds (MiB):"
    )
    for loop, rows in results.items():
        main_mib = statistics.median(row["main_mib"] for row in rows)
        worker_mib = statistics.median(row["worker_mib"] for row in rows)
        print(f"  {loop:5s} main process {main_mib:8.0f}   largest worker {worker_mib:8.0f}")


if __name__ == "__main__":
    main()
