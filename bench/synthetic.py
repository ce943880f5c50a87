"""Start-up cost of the built-in synthetic data: kd.data._load_synthetic for CIFAR-100's shape (100 classes,
50,000 train + 10,000 test images, 32 px), optionally against another version of kd/data.py (a before/after
in one process, alternating, medians).

    python bench/synthetic.py --threads 1
    git show <commit>:kd/data.py > old_data.py && python bench/synthetic.py --before old_data.py --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kd import data as current  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="another kd/data.py to time against this checkout's (alternating)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--train-size", type=int, default=50_000)
    p.add_argument("--test-size", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    versions = {"after": current}
    if args.before:
        spec = importlib.util.spec_from_file_location("kd.data_before", args.before)
        before = importlib.util.module_from_spec(spec)
        sys.modules["kd.data_before"] = before
        spec.loader.exec_module(before)
        versions = {"before": before, **versions}
    times: dict[str, list[float]] = {k: [] for k in versions}
    for r in range(args.rounds):
        for name in list(versions) if r % 2 == 0 else list(versions)[::-1]:
            mod = versions[name]
            t = time.perf_counter()
            mod._load_synthetic(
                mod.SyntheticSpec(num_classes=100, train_size=args.train_size, test_size=args.test_size, image_size=32)
            )
            times[name].append(time.perf_counter() - t)
            print(f"round {r + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    print(", ".join(f"{k} median {statistics.median(v):.2f} s" for k, v in times.items()))
    if args.before:
        ratio = statistics.median(b / a for b, a in zip(times["before"], times["after"]))
        print(f"before/after (median of per-round ratios): {ratio:.2f}x")


if __name__ == "__main__":
    main()
