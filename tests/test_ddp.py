"""Several processes: `torchrun --nproc_per_node 2` (gloo on CPU) trains the same model as one process with
the same global batch, and only rank 0 writes files or prints."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from test_resume import assert_equal_tree

ROOT = Path(__file__).resolve().parents[1]

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")

# BatchNorm-free models (timm's tiny LayerNorm test ConvNeXt): with BatchNorm each rank would normalise
# with the statistics of its half batch (--run.sync-bn needs CUDA), so the runs could not agree.
# kd: stage 0 fine-tunes the teacher under DDP too, then the student distils; no augmentation
# randomness beyond the shared fast-loader draws; SGD (Adam would magnify rounding in near-zero
# gradients); 2 epochs x 3 global batches of 32.
ARGS = [
    "--preset",
    "smoke",
    "--method",
    "kd",
    "--student.model",
    "test_convnext",
    "--teachers",
    "test_convnext",
    "--teachers.epochs",
    "1",
    "--teachers.lr",
    "0.05",
    "--optim.name",
    "sgd",
    "--optim.lr",
    "0.05",
    "--data.synthetic-train-size",
    "240",
    "--data.synthetic-test-size",
    "60",
    "--data.synthetic-image-size",
    "16",
    "--data.batch-size",
    "32",
    "--optim.epochs",
    "2",
    "--run.max-steps-per-epoch",
    "3",
    "--run.deterministic",
    "True",
    "--wandb.mode",
    "disabled",
    "--run.name",
    "r",
]


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_two_gloo_processes_match_one_process_and_only_rank0_writes(tmp_path):
    one = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *ARGS,
            "--run.out-dir",
            str(tmp_path / "one"),
            "--teachers.cache-dir",
            str(tmp_path / "cache-one"),
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    # Each rank runs in its own empty working directory with relative output paths (the teacher cache is
    # shared, as on a cluster's file system): whatever rank 1 wrote would land in r1/.
    for rank in (0, 1):
        (tmp_path / f"r{rank}").mkdir()
    script = (
        f"cd {tmp_path}/r$RANK && exec {sys.executable} {ROOT / 'train.py'} {' '.join(ARGS)} "
        f"--run.out-dir runs --teachers.cache-dir {tmp_path / 'cache-two'}"
    )
    two = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "--no-python", "bash", "-c", script],
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert list((tmp_path / "r1").iterdir()) == []  # rank 1 wrote nothing
    assert two.stdout.count("[kd] epoch 2/2") == 1 and two.stdout.count("results") == 1  # rank 0 alone prints

    def final(run_dir: Path) -> tuple[dict, list]:
        last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return last["model"], rows

    (model_1, rows_1), (model_2, rows_2) = final(tmp_path / "one" / "r"), final(tmp_path / "r0" / "runs" / "r")
    for k in model_1:  # same global batches, gradients averaged over ranks: equal up to summation order
        torch.testing.assert_close(model_2[k], model_1[k], rtol=1e-4, atol=1e-5, msg=k)
    assert [r["phase"] for r in rows_2] == [r["phase"] for r in rows_1] == ["teacher:test_convnext", "kd", "kd"]
    for r1, r2 in zip(rows_1, rows_2):  # loss means are averaged over the ranks
        assert r2["train/loss"] == pytest.approx(r1["train/loss"], rel=1e-4)
    teachers = [sorted((tmp_path / c).glob("*.pt")) for c in ("cache-one", "cache-two")]
    assert len(teachers[0]) == len(teachers[1]) == 1
    t1, t2 = (torch.load(p[0], weights_only=True)["model"] for p in teachers)
    for k in t1:
        torch.testing.assert_close(t2[k], t1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_global_batch_must_split_evenly_and_sync_bn_needs_cuda(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = train.parse_config(["--preset", "smoke", "--data.batch-size", "64", "--run.device", "cpu"])
    with pytest.raises(train.ConfigError, match="--data.batch-size 64 .global. is not divisible by the 3 processes"):
        train.init_distributed(cfg.data.batch_size, use_cuda=False, sync_bn=cfg.run.sync_bn)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = train.parse_config(["--preset", "smoke", "--run.sync-bn", "True", "--run.device", "cpu"])
    with pytest.raises(train.ConfigError, match="--run.sync-bn True needs CUDA"):
        train.init_distributed(cfg.data.batch_size, use_cuda=False, sync_bn=cfg.run.sync_bn)
    assert not train.DIST.enabled  # refused before joining any process group
    train.close_distributed()


def test_ranks_take_disjoint_slices_of_the_same_global_batches():
    from kd.fastloader import DeviceLoader
    from kd.sampler import EpochBatchSampler

    images, labels = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50)
    kw = dict(batch_size=12, mean=(0.5,) * 3, std=(0.5,) * 3, train=True, seed=3)
    whole = [i for _, _, i in DeviceLoader(images, labels, **kw)]
    halves = [[i for _, _, i in DeviceLoader(images, labels, rank=r, world_size=2, **kw)] for r in (0, 1)]
    assert len(whole) == len(halves[0]) == len(halves[1]) == 4
    for b, (h0, h1) in enumerate(zip(*halves)):
        assert torch.equal(torch.cat([h0, h1]), whole[b])
    batches = [list(EpochBatchSampler(50, 12, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    full = list(EpochBatchSampler(50, 12, seed=3))
    assert [a + b for a, b in zip(*batches)] == full


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_crd_memory_banks_under_two_gloo_processes_equal_one_process(tmp_path):
    """CRD's memory banks, z and negatives are global state: after one epoch (every step a memory update),
    rank 0's banks under 2 processes equal the one-process banks with the same global batch (before the
    fix each rank updated its banks with its own half batch only)."""
    args = [a for a in ARGS if a not in ("--run.max-steps-per-epoch", "3")]
    args[args.index("--method") + 1] = "crd"
    args[args.index("--optim.epochs") + 1] = "1"
    args += ["--crd.nce-k", "64", "--teachers.precision", "fp32"]  # bf16 rounds half and whole batches differently
    one = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *args,
            "--run.out-dir",
            str(tmp_path / "one"),
            "--teachers.cache-dir",
            str(tmp_path / "cache-one"),
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    # its own teacher cache: both runs fine-tune the teacher, so the method is built from the same RNG state
    script = (
        f"exec {sys.executable} {ROOT / 'train.py'} {' '.join(args)} --run.out-dir {tmp_path / 'two'} "
        f"--teachers.cache-dir {tmp_path / 'cache-two'}"
    )
    two = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "--no-python", "bash", "-c", script],
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    m1, m2 = (
        torch.load(tmp_path / d / "r" / "checkpoints" / "last.pt", weights_only=True)["method"] for d in ("one", "two")
    )
    assert float(m1["z_s"]) > 0
    for k in ("memory_s", "memory_t", "z_s", "z_t"):
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-4, atol=1e-5, msg=k)
    assert int(m1["sample_step"]) == int(m2["sample_step"]) == 6  # 216 training samples, batches of 32


# Rank 1 sees its validation accuracy fall every epoch while rank 0's is the real one: the ranks would disagree
# on "a new best epoch" (rank 0 alone would enter save_best's collective check and wait forever). Decisions are
# rank 0's on every rank, so the run ends. A BatchNorm student and teacher, as most users' models are.
SKEWED = """
import os, sys
import train
real, calls = train.evaluate_top1_top5, []
def skewed(model, loader, device):
    calls.append(1)
    top1, top5 = real(model, loader, device)
    return (top1, top5) if os.environ["RANK"] == "0" else (100.0 - len(calls), top5)
train.evaluate_top1_top5 = skewed
try:
    train.run(train.parse_config(sys.argv[1:]))
finally:
    train.close_distributed()
"""


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_ranks_whose_validation_numbers_differ_take_rank0s_decisions_and_finish(tmp_path):
    args = [
        "--preset",
        "smoke",
        "--method",
        "kd",
        "--student.model",
        "resnet8",
        "--teachers",
        "resnet8",
        "--teachers.epochs",
        "2",
        "--data.synthetic-train-size",
        "240",
        "--data.synthetic-test-size",
        "60",
        "--data.synthetic-image-size",
        "16",
        "--data.batch-size",
        "32",
        "--optim.epochs",
        "3",
        "--run.max-steps-per-epoch",
        "2",
        "--wandb.mode",
        "disabled",
        "--run.name",
        "bn",
        "--run.out-dir",
        str(tmp_path / "runs"),
        "--teachers.cache-dir",
        str(tmp_path / "cache"),
    ]
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED)
    two = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script), *args],
        capture_output=True,
        text=True,
        env={**env(), "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "bn" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["phase"] == "kd"] == [1, 2, 3]
    assert (tmp_path / "runs" / "bn" / "checkpoints" / "best.pt").is_file()


# ---- BatchNorm models under 2 gloo processes (issue 23): ce, asmb, a killed rank resumed, a collective timeout.
# resnet8 (BatchNorm) on 16 px synthetic data, global batches of 32, 3 steps an epoch, a checkpoint every 2 steps.
# Rank 0 alone logs (metrics.jsonl, stdout) and its validation numbers decide for every rank (rank0_values).
BN = [
    "--preset",
    "smoke",
    "--student.model",
    "resnet8",
    "--data.synthetic-train-size",
    "240",
    "--data.synthetic-test-size",
    "60",
    "--data.synthetic-image-size",
    "16",
    "--data.batch-size",
    "32",
    "--optim.epochs",
    "3",
    "--run.max-steps-per-epoch",
    "3",
    "--run.ckpt-every-steps",
    "2",
    "--run.deterministic",
    "True",
    "--wandb.mode",
    "disabled",
    "--run.dist-timeout-min",
    "0.5",
]
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")


def torchrun(
    tmp: Path, name: str, *args: str, script: str | None = None, script_args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """train.py (or `script`, given `script_args` before the flags) under torchrun with 2 gloo processes,
    writing the run `name` under tmp/runs (teachers cached in tmp/cache)."""
    program = [str(ROOT / "train.py")]
    if script is not None:
        (tmp / "script.py").write_text(script)
        program = [str(tmp / "script.py"), *script_args]
    return subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            *program,
            *BN,
            *args,
            "--run.name",
            name,
            "--run.out-dir",
            str(tmp / "runs"),
            "--teachers.cache-dir",
            str(tmp / "cache"),
        ],
        capture_output=True,
        text=True,
        env={**env(), "PYTHONPATH": str(ROOT)},
        timeout=600,
    )


def logged(tmp: Path, name: str) -> tuple[dict, list[dict]]:
    """The run's final checkpoint (without its rows, config and wandb id) and its metrics rows (without
    timings), as rank 0 wrote them."""
    run_dir = tmp / "runs" / name
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timings = ("time_s", "img_per_s", "train/img_per_s", "wall_time_s", "teacher_time_s")
    return (
        {k: v for k, v in last.items() if k not in ("rows", "config", "wandb_id")},
        [{k: v for k, v in r.items() if k not in timings} for r in rows],
    )


@pytest.fixture(scope="module")
def bn_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp_bn")


@pytest.fixture(scope="module")
def ce_two(bn_tmp) -> str:
    """An uninterrupted 2-process ce run of resnet8 (the reference of the resume test)."""
    out = torchrun(bn_tmp, "ce", "--method", "ce")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("[ce] epoch 3/3") == 1 and out.stdout.count("results") == 1  # rank 0 alone prints
    return "ce"


def assert_logged_by_rank0(tmp: Path, name: str, phases: list[str]) -> None:
    """One row per epoch and phase (rank 0's: the other ranks log nothing), finite numbers, a best model."""
    _, rows = logged(tmp, name)
    assert [r["phase"] for r in rows] == phases
    for r in rows:
        assert all(v is None or math.isfinite(v) for v in r.values() if isinstance(v, float)), r
    assert (tmp / "runs" / name / "checkpoints" / "best.pt").is_file()


@needs_torchrun
def test_ce_with_batchnorm_under_two_processes_ends_and_rank0_logs(bn_tmp, ce_two):
    assert_logged_by_rank0(bn_tmp, ce_two, ["ce"] * 3)


@needs_torchrun
def test_asmb_with_batchnorm_under_two_processes_ends_and_rank0_logs(bn_tmp):
    out = torchrun(
        bn_tmp,
        "asmb",
        "--method",
        "asmb",
        "--teachers",
        "resnet8,resnet14",
        "--teachers.epochs",
        "1",
        "--asmb.num-stages",
        "1",
        "--asmb.teacher-epochs",
        "1",
        "--asmb.student-epochs",
        "1",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("results") == 1
    _, rows = logged(bn_tmp, "asmb")
    assert [r["phase"] for r in rows] == ["teacher:resnet8", "teacher:resnet14", "asmb:A:s1", "asmb:B:s1", "asmb:stage"]
    assert_logged_by_rank0(bn_tmp, "asmb", [r["phase"] for r in rows])


# Rank 1 is SIGKILLed right after the checkpoint of run-wide step 4 (mid-epoch 2), once rank 0 has written it
# (rank 0 says so through a file: the kill is placed by the run's progress, never by a delay). Rank 0 then
# fails in its next collective and torchrun ends the job.
KILL_RANK1 = """
import os, signal, sys, time
from pathlib import Path
from kd.engine.checkpoint import Checkpointer
save, written = Checkpointer.save, Path(sys.argv[1])
def save_then_kill_rank1(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == 4:
        if os.environ["RANK"] == "0":
            written.write_text("step 4 written")
        else:
            while not written.exists():
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
Checkpointer.save = save_then_kill_rank1
import train
sys.exit(train.main(sys.argv[2:]))
"""


@needs_torchrun
def test_a_killed_rank_resumes_with_auto_to_the_uninterrupted_runs_end(bn_tmp, ce_two):
    killed = torchrun(bn_tmp, "ce-killed", "--method", "ce", script=KILL_RANK1, script_args=(str(bn_tmp / "written"),))
    assert killed.returncode != 0 and (bn_tmp / "written").is_file(), killed.stdout[-2000:] + killed.stderr[-2000:]
    ck = torch.load(bn_tmp / "runs" / "ce-killed" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["progress"]["step"] == 4 and ck["world_size"] == 2
    resumed = torchrun(bn_tmp, "ce-killed", "--method", "ce", "--run.resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    (ck_a, rows_a), (ck_b, rows_b) = logged(bn_tmp, ce_two), logged(bn_tmp, "ce-killed")
    assert_equal_tree(ck_b, ck_a)  # weights, BatchNorm statistics, optimiser, loader and RNG states of both ranks
    assert rows_b == rows_a


# Rank 1 never joins the broadcast of rank 0's validation numbers (a rank on another path, or stuck): rank 0
# gives up after --run.dist-timeout-min and ends in one line naming itself and the collective.
STUCK_RANK1 = """
import os, sys, time
from pathlib import Path
import kd.engine.distributed as dist
done = Path(sys.argv[1])
if os.environ["RANK"] == "1":
    def stuck(*values):
        while not done.exists():
            time.sleep(0.02)
        os._exit(0)
    dist.rank0_values = stuck
import train
code = train.main(sys.argv[2:])
done.write_text(str(code))
sys.exit(code)
"""


@needs_torchrun
def test_a_rank_left_waiting_in_a_collective_ends_in_one_line_after_the_timeout(tmp_path):
    out = torchrun(
        tmp_path,
        "stuck",
        "--method",
        "ce",
        "--optim.epochs",
        "1",
        "--run.dist-timeout-min",
        "0.2",
        script=STUCK_RANK1,
        script_args=(str(tmp_path / "done"),),
    )
    assert out.returncode != 0 and (tmp_path / "done").read_text() == "1", out.stdout[-2000:] + out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if "timed out" in line]
    assert len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith("error: rank 0: broadcast (called from rank0_values, distributed.py:")
    assert lines[0].endswith(
        "timed out after 0.2 min (--run.dist-timeout-min) waiting for the other ranks; one of "
        "them stopped, hangs or took another path"
    )
