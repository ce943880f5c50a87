"""Images/s of one training step per method: train.py's own step against a plain reference loop in the style of
the standard KD toolboxes, and against the best hand-written loop using the same kernels.

Three loops on the same models, batch shape and images, per method:
  ours  train.py's code: the Trainer built as run() builds it (single_trainer; ASMB: AsmbRun's phase trainers),
        stepped through train.train_epoch on build_loaders()' DeviceLoader, with the train.py --flags given.
  ref   a plain loop as RepDistiller / mdistiller write it: DataLoader (2 workers) over a PIL-backed CIFAR-shaped
        dataset with torchvision PIL transforms (RandomCrop(32, padding=4), flip, ToTensor, Normalize), eager NCHW
        float32 models, teachers under no_grad, plain torch.optim.SGD (Adam for ASMB phase A), `.item()` of the
        loss and top-1/top-5 accuracy every step.
  hand  our data path and the same models, flags, loss calls, optimiser and schedule written inline without the
        Trainer abstraction (what train.py's step should be within 5% of).
The loss math is the same code in all three (Method.loss_terms), so the ratios measure the loops. After warm-up
the loops alternate in one process (in a new seeded order every round), so load from other processes hits all
alike; img/s are medians over the rounds, ratios the medians of the per-round ratios. `--alt-flags` adds a
fourth loop, train.py's step with other flags (a before/after of a flag in one run). With both ce and kd on
the resnet32x4 pair, a last line bounds what any teacher speed-up can give: ours ce (the same step with no
teacher at all) over ref kd. Then two ablations: the teacher forward as the toolboxes run it vs train.py's
frozen forward (float32 and the --flags' --teachers.precision), and the SGD step default vs foreach vs fused.

Pairs: resnet32x4 -> resnet8x4 (kd zoo, CIFAR shapes, 100 classes, batch 64; ce kd dkd at fitnet crd) and the
ASMB default pair resnet152 + efficientnet_b2 -> convnext_tiny at 32 px (small-input stems; asmb phase A and B).

    python bench/step.py --quick                    # CPU, a few minutes: 3 rounds, ASMB pair at batch 2
    python bench/step.py --quick --threads 1        # on a machine shared with other jobs
    python bench/step.py --quick --flags "--run.amp bf16" --alt-flags ""   # bf16 vs float32 in one run
    python bench/step.py                            # batch 64 (ASMB pair 16), 5 rounds of 2 steps
    python bench/step.py --device cuda --flags "--run.amp bf16"
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from typing import Callable

import torch

import _common as C
from kd.models import create_model  # noqa: E402  (_common put the checkout on sys.path)
from kd.teachers import frozen_forward  # noqa: E402


FULL = {"batch": 64, "asmb_batch": 16, "rounds": 5, "steps": 2, "train_size": 20_000, "hand": None}
QUICK = {"batch": 64, "asmb_batch": 2, "rounds": 3, "steps": 1, "train_size": 4_000, "hand": ["kd", "asmb:A", "asmb:B"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="for a CPU: 3 rounds of 1 step, ASMB pair at batch 2, 4k images (CRD gets ~3.5k negatives), "
        "the hand-written loop for kd and asmb only",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pairs", nargs="+", choices=["cifar", "asmb"], default=["cifar", "asmb"])
    p.add_argument("--methods", nargs="+", default=None, help="subset of ce kd dkd at fitnet crd asmb:A asmb:B")
    p.add_argument("--flags", default="", help="train.py flags of ours and hand, e.g. '--run.amp bf16'")
    p.add_argument(
        "--alt-flags",
        default=None,
        help="also time train.py's step with these flags instead of --flags (column alt, ratio ours/alt)",
    )
    p.add_argument("--batch", type=int, help="batch of the resnet32x4 -> resnet8x4 pair (64)")
    p.add_argument(
        "--hand",
        nargs="*",
        default=None,
        help="methods that also time the hand-written loop (all; --quick: kd asmb:A asmb:B; none: --hand)",
    )
    p.add_argument("--asmb-batch", type=int, help="batch of the ASMB pair (16; --quick 2)")
    p.add_argument("--rounds", type=int, help="timed rounds, each timing every loop once (5; --quick 3)")
    p.add_argument("--steps", type=int, help="steps per loop per round (2; --quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed blocks of --steps per loop first")
    p.add_argument(
        "--train-size",
        type=int,
        help="synthetic images before the 10%% validation split (20000: CRD gets its 16384 negatives; --quick 4000)",
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-ablations", action="store_true", help="skip the teacher-forward and optimiser rows")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak of the GPU (0: by its name)")
    args = p.parse_args()
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.hand is None:
        args.hand = list(C.CIFAR_PAIR.methods + C.ASMB_PAIR.methods)
    return args


def bench_method(pair: C.Pair, method: str, data, batch: int, ref_batches, args) -> dict[str, float]:
    device = torch.device(args.device)
    phase = method.split(":")[1] if ":" in method else "single"
    argv = dict(batch=batch, train_size=args.train_size, steps=args.steps, device=args.device)
    cfg = C.parse(C.train_argv(pair, method, flags=args.flags, **argv))
    ref_cfg = C.parse(C.train_argv(pair, method, flags=C.plain_flags(args.flags), **argv))
    ours, ref = C.build_ours(cfg, data, phase), C.build_ours(ref_cfg, data, phase)
    hand = C.build_ours(cfg, data, phase) if method in args.hand else None
    loops = {"ours": lambda n: C.ours_steps(ours, n), "ref": C.reference_stepper(ref, ref_batches)}
    if hand is not None:
        loops["hand"] = C.hand_stepper(hand)
    if args.alt_flags is not None:  # train.py's step once more, with other flags (before/after in one run)
        alt = C.build_ours(C.parse(C.train_argv(pair, method, flags=args.alt_flags, **argv)), data, phase)
        loops["alt"] = lambda n: C.ours_steps(alt, n)
    for _ in range(args.warmup):
        for run in loops.values():
            run(args.steps)
    times: dict[str, list[float]] = {k: [] for k in loops}
    order = random.Random(0)
    for _ in range(args.rounds):
        names = list(loops)
        order.shuffle(names)  # a new order every round: no loop always runs after the same one
        for name in names:
            C.sync(device)
            t = time.perf_counter()
            loops[name](args.steps)
            C.sync(device)
            times[name].append(time.perf_counter() - t)
    out = {f"{k}_ips": batch * args.steps / C.median(v) for k, v in times.items()}
    # ratios: median over rounds of the paired ratio (same round, so slow phases of the machine cancel)
    out.update({f"ours/{k}": C.median([t / o for t, o in zip(v, times["ours"])]) for k, v in times.items()})
    if device.type == "cuda":
        flops = C.count_flops(lambda: C.ours_steps(ours, 1))
        out["tflops"] = flops * out["ours_ips"] / batch / 1e12
    return out


def alternate(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each fn, called in turn `rounds` times after one untimed call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            C.sync(device)
            t = time.perf_counter()
            fn()
            C.sync(device)
            times[name].append(time.perf_counter() - t)
    return {k: C.median(v) for k, v in times.items()}


def ablations(args, data) -> None:
    """Evidence for choices of train.py's step, each set measured alternately: the teacher's forward as the
    toolboxes run it (float32, NCHW, no_grad) vs train.py's frozen forward (kd.teachers.frozen_forward: inference
    mode, channels_last) in float32 and at the --flags' --teachers.precision, and the optimiser step over the
    student's parameters: torch's default implementation vs foreach vs fused (train.py uses fused)."""
    device = torch.device(args.device)
    cfg = C.parse(
        C.train_argv(
            C.CIFAR_PAIR,
            "kd",
            batch=args.batch,
            train_size=args.train_size,
            steps=1,
            device=args.device,
            flags=args.flags,
        )
    )
    b = C.build_ours(cfg, data)
    teacher, tr = b.teachers[0], b.trainer
    x, _, _ = next(iter(b.loader))
    ref_teacher = create_model(C.CIFAR_PAIR.teachers[0], 100, small_input=True).to(device).eval()
    ref_teacher.load_state_dict(teacher.state_dict())
    x_ours = x.contiguous(memory_format=torch.channels_last) if tr.runtime.channels_last else x

    def ref_forward():
        with torch.no_grad():
            return ref_teacher(x)

    precision = str(tr.runtime.teacher_dtype or torch.float32).removeprefix("torch.")
    t = alternate(
        {
            "ref": ref_forward,
            "float32": lambda: frozen_forward([teacher], x_ours),
            precision: lambda: frozen_forward([teacher], x_ours, dtype=tr.runtime.teacher_dtype),
        },
        args.rounds,
        device,
    )
    gflop = C.count_flops(ref_forward) / 1e9  # convolutions and matmuls: how close each runs to the hardware's peak
    print(
        f"teacher forward ({C.CIFAR_PAIR.teachers[0]}, batch {args.batch}, {gflop:.1f} GFLOP): toolbox float32 "
        f"NCHW no_grad {1e3 * t['ref']:.1f} ms ({gflop / t['ref']:.0f} GFLOP/s); train.py frozen forward float32 "
        f"{1e3 * t['float32']:.1f} ms ({t['ref'] / t['float32']:.2f}x), {precision} {1e3 * t[precision]:.1f} ms "
        f"({t['ref'] / t[precision]:.2f}x, {gflop / t[precision]:.0f} GFLOP/s)"
    )
    models = [b.student] + (
        [create_model(C.ASMB_PAIR.student, 100, small_input=True).to(device)] if "asmb" in args.pairs else []
    )
    for model in models:
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        o = cfg.optim
        kw = dict(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        opts = {
            "default": torch.optim.SGD(params, **kw),
            "foreach": torch.optim.SGD(params, foreach=True, **kw),
            "fused": torch.optim.SGD(params, fused=True, **kw),
        }
        with torch.no_grad():
            t = alternate({k: opt.step for k, opt in opts.items()}, 10, device)
        timings = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in t.items())
        print(
            f"SGD step ({model.arch}, {len(params)} tensors): {timings} (fused {t['default'] / t['fused']:.1f}x default)"
        )


def table_row(pair: C.Pair, method: str, batch: int, r: dict[str, float], peak: float | None) -> str:
    hand = (f"{r['hand_ips']:>12.1f}", f"{r['ours/hand']:>10.2f}x") if "hand_ips" in r else (f"{'-':>12}", f"{'-':>11}")
    line = (
        f"{pair.name:<42}{method:<8}{batch:>6}{r['ours_ips']:>12.1f}{r['ref_ips']:>11.1f}"
        f"{hand[0]}{r['ours/ref']:>9.2f}x{hand[1]}"
    )
    if "alt_ips" in r:
        line += f"{r['alt_ips']:>11.1f}{r['ours/alt']:>9.2f}x"
    if "tflops" in r:
        line += f"{r['tflops']:>9.1f}" + (f"{100 * r['tflops'] / peak:>12.1f}%" if peak else f"{'-':>13}")
    return line


def main() -> None:
    args = parse_args()
    device = C.setup(args.threads, args.device)
    pairs = {"cifar": C.CIFAR_PAIR, "asmb": C.ASMB_PAIR}
    peak = args.peak_tflops or C.bf16_peak_tflops(device)
    print(f"{C.describe_machine()}; device {device}; ours/hand flags: {args.flags or '(train.py defaults)'}")
    print(
        f"{args.rounds} rounds of {args.steps} step(s) per loop, loops in a new order every round, after "
        f"{args.warmup} warm-up block(s); img/s: median over rounds; ratios: median of the per-round ratios; "
        f"reference loop: DataLoader with {args.workers} workers over PIL images"
        + (f"; --quick: ASMB pair at batch {args.asmb_batch}, {args.train_size} images" if args.quick else "")
    )
    head = (
        f"{'pair':<42}{'method':<8}{'batch':>6}{'ours img/s':>12}{'ref img/s':>11}{'hand img/s':>12}"
        f"{'ours/ref':>10}{'ours/hand':>11}"
    )
    alt = args.alt_flags is not None
    if alt:
        print(f"alt: train.py's step with flags: {args.alt_flags or '(train.py defaults)'}")
        head += f"{'alt img/s':>11}{'ours/alt':>10}"
    print(head + (f"{'TFLOP/s':>9}{'% bf16 peak':>13}" if device.type == "cuda" else ""))
    ratios, hand_ratios, alt_ratios = [], [], []
    ips: dict[tuple[str, str], dict[str, float]] = {}
    data = None
    for key in args.pairs:
        pair = pairs[key]
        methods = [m for m in pair.methods if args.methods is None or m in args.methods]
        if not methods:
            continue
        batch = args.batch if key == "cifar" else args.asmb_batch
        base = C.parse(
            C.train_argv(
                pair, methods[0], batch=batch, train_size=args.train_size, steps=args.steps, device=args.device
            )
        )
        data = C.build_data(base)
        ref_batches = C.cycle(C.reference_loader(data, batch, args.workers, device))
        next(ref_batches)  # start the worker processes before the models exist (smaller forks)
        for method in methods:
            r = ips[key, method] = bench_method(pair, method, data, batch, ref_batches, args)
            gc.collect()  # this method's models go before the next method's are built
            print(table_row(pair, method, batch, r, peak), flush=True)
            ratios.append(f"{method} {r['ours/ref']:.2f}x")
            if "hand_ips" in r:
                hand_ratios.append(f"{method} {r['ours/hand']:.2f}x")
            if alt:
                alt_ratios.append(f"{method} {r['ours/alt']:.2f}x")
        del ref_batches
        gc.collect()
    if ("cifar", "ce") in ips and ("cifar", "kd") in ips:
        free, ref = ips["cifar", "ce"]["ours_ips"], ips["cifar", "kd"]["ref_ips"]
        print(
            f"bound: a kd step whose teacher cost nothing (ours ce, {free:.1f} img/s) runs {free / ref:.2f}x the "
            f"reference kd loop ({ref:.1f} img/s); ours kd: {ips['cifar', 'kd']['ours/ref']:.2f}x"
        )
    if not args.no_ablations:
        ablations(
            args,
            data
            if data is not None
            else C.build_data(
                C.parse(
                    C.train_argv(
                        C.CIFAR_PAIR, "kd", batch=args.batch, train_size=args.train_size, steps=1, device=args.device
                    )
                )
            ),
        )
    print(
        f"ours/ref: {', '.join(ratios)}"
        + (f"; ours/hand: {', '.join(hand_ratios)}" if hand_ratios else "")
        + (f"; ours/alt: {', '.join(alt_ratios)}" if alt else "")
    )


if __name__ == "__main__":
    main()
