"""How much a newcomer reads: the functions of this repository entered from train.py's main() to the first
optimizer.step() (their lines, train.py's apart), and the files one ASMB phase-A and phase-B step enters
(issue 22's measures). A trace (sys.settrace), not a timing: the numbers do not depend on the machine.

    python bench/read_path.py -- --preset smoke --method kd --teachers resnet20 --run.out-dir /tmp/read
    python bench/read_path.py --asmb-step

The first counts whole functions (a function entered is read whole, docstring included); comprehensions are
part of their function. The path with the teachers cached: run `python train.py` with the same flags first (its
first step is otherwise stage 0's fine-tuning, which the trace stops in, so the cache stays empty).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

import train  # noqa: E402


class FirstStep(Exception):
    pass


def function_spans(path: Path) -> dict[tuple[str, int], int]:
    """(name, first line) -> lines, for every function of a file (decorators included)."""
    spans = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            spans[(node.name, node.lineno)] = node.end_lineno - node.lineno + 1
    return spans


def trace(fn) -> dict[str, set[tuple[str, int]]]:
    """Run fn() under a tracer; the functions of this repository (not its tests) it entered, per file."""
    entered: dict[str, set[tuple[str, int]]] = {}

    def tracer(frame, event, arg):
        f = frame.f_code.co_filename
        if event == "call" and f.startswith(str(ROOT)) and "/.venv/" not in f and "/tests/" not in f and f != __file__:
            entered.setdefault(os.path.relpath(f, ROOT), set()).add((frame.f_code.co_name, frame.f_code.co_firstlineno))

    sys.settrace(tracer)
    try:
        fn()
    except FirstStep:
        pass
    finally:
        sys.settrace(None)
    return entered


def read_to_first_step(train_args: list[str]) -> None:
    def stop(optimizer, args, kwargs):
        raise FirstStep

    handle = register_optimizer_step_pre_hook(stop)
    entered = trace(lambda: train.main(train_args))
    handle.remove()
    for path, functions in sorted(entered.items()):
        spans = function_spans(ROOT / path)
        lines = sum(spans.get(f, 0) for f in functions)
        names = sorted({n for n, _ in functions if not n.startswith("<")})
        listed = f": {', '.join(names)}" if path == "train.py" else ""
        print(f"{path}: {len(names)} functions, {lines} lines{listed}")
    print(f"files entered: {len(entered)}")


def asmb_step_files() -> None:
    from kd.asmb import build_asmb_modules
    from kd.freeze import apply_freeze
    from kd.models import create_model
    from kd_cli.config import smoke_preset

    cfg, cpu, classes = smoke_preset(), torch.device("cpu"), 10
    cfg.method = "asmb"
    student = create_model("resnet8", classes, small_input=True)
    teachers = [
        train.prepare(create_model(a, classes, small_input=True), cfg, cpu, inference=True) for a in cfg.teachers.models
    ]
    for t in teachers:
        apply_freeze(t, cfg.asmb.teacher_freeze)
    modules = build_asmb_modules(cfg.asmb, [t.num_features for t in teachers], student, classes)
    run = train.build_asmb_run(
        cfg,
        train.make_runtime(cfg, cpu),
        train.prepare(student, cfg, cpu),
        teachers,
        modules,
        steps=2,
        classes=classes,
    )
    x, y, index = torch.randn(8, 3, 32, 32), torch.randint(0, classes, (8,)), torch.arange(8)
    for name, tr in (("A", run.phase_a), ("B", run.phase_b)):
        train.set_train(tr.model, tr.freeze_policy)
        tr.method.train()
        entered = trace(lambda: train.train_step(tr, x, y, index, 1))
        internals = [f for f in entered if f.startswith(("kd/zoo", "kd/models.py"))]
        print(f"phase {name}: {len(entered)} files ({len(entered) - len(internals)} without model internals)")
        for path, functions in sorted(entered.items()):
            print(f"  {path}: {', '.join(sorted({n for n, _ in functions if not n.startswith('<')}))}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--asmb-step", action="store_true", help="the files of one ASMB phase-A and phase-B step")
    p.add_argument("train_args", nargs="*", help="train.py flags (after --)")
    a = p.parse_args()
    asmb_step_files() if a.asmb_step else read_to_first_step(a.train_args)
