"""Eager vs torch.compile for the synergy loss path (kd.asmb.synergy_losses), forward + backward.

Realistic ASMB dims by default: teachers 2048 (resnet152) and 1408 (efficientnet_b2), student 768
(convnext_tiny), 100 classes, batch 128. Phase A differentiates w.r.t. the bridge parameters and
the teacher features; phase B w.r.t. the student logits and a caller-owned feature-KD projection.
Eager and compiled steps alternate in one process after warm-up, so machine load hits both alike.

    python bench/synergy.py --quick          # < 1 min on CPU, compile included
    python bench/synergy.py --quick --threads 1   # on a machine shared with other jobs
    python bench/synergy.py --device cuda --iters 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kd.mbm import build_bridge  # noqa: E402
from kd.asmb import compile_synergy, synergy_losses  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few iterations (CPU run < 1 min incl. compile)")
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cpu, plus cuda when available"
    )
    p.add_argument("--kind", choices=["attn", "mlp", "ib"], default="attn")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--teacher-dims", type=int, nargs="+", default=[2048, 1408])
    p.add_argument("--student-dim", type=int, default=768)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--iters", type=int, default=50, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant after the compiling call")
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 on a shared machine"
    )
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(args: argparse.Namespace, device: torch.device, phase: str, fn: Callable) -> Callable[[int], None]:
    """A closure doing one forward + backward of `fn` (eager or compiled) with step-dependent
    weights and temperature (as a training loop would change them)."""
    torch.manual_seed(0)
    bridge = build_bridge(args.kind, args.teacher_dims, args.student_dim, args.classes).to(device)
    params = {**dict(bridge.named_parameters()), **dict(bridge.named_buffers())}
    b, c = args.batch, args.classes
    feats = [torch.randn(b, d, device=device, requires_grad=True) for d in args.teacher_dims]
    student_feat = torch.randn(b, args.student_dim, device=device)
    logits_s = torch.randn(b, c, device=device, requires_grad=True)
    y = torch.randint(0, c, (b,), device=device)
    teacher_logits = [torch.randn(b, c, device=device, requires_grad=True) for _ in args.teacher_dims]
    proj = nn.Linear(args.student_dim, args.student_dim).to(device)
    if phase == "A":
        bridge.train()
        leaves = [*bridge.parameters(), *feats, *teacher_logits]
    else:
        bridge.eval()
        leaves = [logits_s, *proj.parameters()]

    def step(i: int) -> None:
        temperature = torch.tensor(4.0 - 0.01 * i, device=device)
        if phase == "A":
            w = {"synergy_ce": 1.0, "adapt_kd": 0.5 + 0.001 * i, "ib_kl": 1e-3, "mbm_l2": 1e-4}
            _, _, terms = fn(bridge, params, student_feat, feats, teacher_logits, logits_s, y, temperature, phase="A")
        else:
            w = {"kd": 1.0, "feat_kd": 0.1 + 0.001 * i}
            hybrid_beta = torch.tensor(0.3, device=device)
            _, _, terms = fn(
                bridge, params, student_feat, feats, teacher_logits, logits_s, y, temperature,
                phase="B", hybrid_beta=hybrid_beta, feat_pred=proj(student_feat),
            )  # fmt: skip
        total = sum(w.get(name, 0.0) * term for name, term in terms.items())  # the loop's loss_weights() weighing
        torch.autograd.grad(total, leaves)

    return step


def bench_one(args: argparse.Namespace, device: torch.device, phase: str) -> dict[str, float]:
    torch._dynamo.reset()
    eager = make_step(args, device, phase, synergy_losses)
    compiled = make_step(args, device, phase, compile_synergy(synergy_losses, enabled=True))
    t0 = time.perf_counter()
    compiled(0)  # compiles forward and backward
    sync(device)
    compile_s = time.perf_counter() - t0
    for i in range(args.warmup):
        eager(i)
        compiled(i)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for i in range(args.iters):
        for name, step in (("eager", eager), ("compiled", compiled)):
            sync(device)
            t = time.perf_counter()
            step(i)
            sync(device)
            times[name].append(time.perf_counter() - t)
    eager_ms = 1e3 * statistics.median(times["eager"])
    compiled_ms = 1e3 * statistics.median(times["compiled"])
    return {"eager_ms": eager_ms, "compiled_ms": compiled_ms, "speedup": eager_ms / compiled_ms, "compile_s": compile_s}


def main() -> None:
    args = parse_args()
    if args.quick:
        args.iters, args.warmup = 10, 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu"]
    if args.device == "auto" and torch.cuda.is_available():
        devices.append("cuda")
    print(
        f"synergy path, mbm={args.kind}, teachers {args.teacher_dims}, student {args.student_dim}, "
        f"{args.classes} classes, batch {args.batch}, median of {args.iters} fwd+bwd steps, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(f"{'device':<7}{'phase':<7}{'eager ms':>10}{'compiled ms':>13}{'speedup':>9}{'compile s':>11}")
    ratios = []
    for dev in devices:
        for phase in ("A", "B"):
            r = bench_one(args, torch.device(dev), phase)
            print(
                f"{dev:<7}{phase:<7}{r['eager_ms']:>10.3f}{r['compiled_ms']:>13.3f}{r['speedup']:>8.2f}x{r['compile_s']:>11.1f}"
            )
            ratios.append(f"{dev} {phase} {r['speedup']:.2f}x")
    print("speedup (eager time / compiled time): " + ", ".join(ratios))


if __name__ == "__main__":
    main()
