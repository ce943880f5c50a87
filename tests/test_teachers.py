"""Teachers as their own artefacts (kd/teachers.py): a teacher is named by everything that made it, reused by
every student seed, retrained when anything that made it changes, and never swapped under a resumed run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kd.teachers
import kd_cli.session
import train
from kd.data import SyntheticSpec, build_data, tensor_fingerprint
from kd.errors import CheckpointError, ConfigError
from kd.teachers import (
    identity_difference,
    teacher_cache_path,
    teacher_identities,
    teacher_key,
    teacher_lock,
    teacher_seed,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--preset",
    "smoke",
    "--data.synthetic-train-size",
    "200",
    "--data.synthetic-test-size",
    "40",
    "--data.synthetic-image-size",
    "16",
    "--data.batch-size",
    "16",
    "--optim.epochs",
    "1",
    "--teachers.epochs",
    "1",
    "--run.max-steps-per-epoch",
    "2",
    "--student.model",
    "resnet8",
    "--teachers.models",
    "resnet8",
    "--wandb.mode",
    "disabled",
]


def tiny_cfg(tmp_path: Path, *extra: str) -> train.Config:
    return train.parse_config(
        [*TINY, "--run.out-dir", str(tmp_path / "runs"), "--teachers.cache-dir", str(tmp_path / "cache"), *extra]
    )


def cache_path_of(*extra: str) -> Path:
    cfg = train.parse_config([*TINY, *extra])
    (identity,) = teacher_identities(cfg.teachers, cfg.optim, cfg.data, cfg.run, train.load_data(cfg), True)
    return teacher_cache_path("cache", identity)


def test_two_student_seeds_reuse_one_teacher_file(tmp_path):
    first = train.run(tiny_cfg(tmp_path, "--method", "kd", "--run.seed", "0", "--run.name", "s0"))
    (cached,) = (tmp_path / "cache").glob("*.pt")
    written = cached.stat().st_mtime_ns
    second = train.run(tiny_cfg(tmp_path, "--method", "kd", "--run.seed", "1", "--run.name", "s1"))
    assert list((tmp_path / "cache").glob("*.pt")) == [cached] and cached.stat().st_mtime_ns == written
    for key in ("teacher/resnet8/val_acc", "teacher/resnet8/test_acc"):
        assert first[key] == second[key]
    assert {"teacher_time_s", "wall_time_s"} <= set(first) & set(second)  # the teachers' time apart
    # the second run did not fine-tune: its rows hold no teacher phase
    rows = (tmp_path / "runs" / "s1" / "metrics.jsonl").read_text()
    assert (
        "teacher:resnet8" not in rows and "teacher:resnet8" in (tmp_path / "runs" / "s0" / "metrics.jsonl").read_text()
    )


def test_teacher_weights_do_not_depend_on_the_method_or_run_seed(tmp_path):
    """The teacher's init and data order come from its identity: made by `--method teacher` or by a kd run of
    another --run.seed (which builds a student first), the file holds the same weights."""
    train.run(tiny_cfg(tmp_path / "a", "--method", "teacher", "--run.name", "t"))
    train.run(tiny_cfg(tmp_path / "b", "--method", "kd", "--run.seed", "3", "--run.name", "k"))
    (a,), (b,) = (tmp_path / "a" / "cache").glob("*.pt"), (tmp_path / "b" / "cache").glob("*.pt")
    assert a.name == b.name
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert wa["identity"]["recipe"]["epochs"] == 1 and wa["key"] == teacher_key(wa["identity"])


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--teachers.epochs", "2"),
        ("--teachers.lr", "0.2"),
        ("--teachers.label-smoothing", "0.1"),
        ("--teachers.pretrained", "True"),
        ("--teachers.image-size", "24"),
        ("--teachers.seed", "1"),
        ("--optim.name", "adamw"),
        ("--optim.schedule", "multistep"),
        ("--optim.milestones", "1"),
        ("--optim.gamma", "0.5"),
        ("--optim.warmup-epochs", "0.5"),
        ("--optim.weight-decay", "0.001"),
        ("--optim.momentum", "0.8"),
        ("--optim.mixup-alpha", "0.2"),
        ("--optim.cutmix-alpha", "1.0"),
        ("--optim.grad-clip-norm", "1.0"),
        ("--data.batch-size", "32"),
        ("--data.aug", "False"),
        ("--data.loader", "torch"),
        ("--data.randaugment", "2 9"),
        ("--data.val-fraction", "0.2"),
        ("--data.split-seed", "1"),
        ("--data.synthetic-train-size", "240"),
        ("--run.max-steps-per-epoch", "3"),
        ("--run.amp", "bf16"),
    ],
)
def test_any_recipe_or_data_change_makes_another_teacher(flag, value):
    assert cache_path_of(flag, *value.split()) != cache_path_of()


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--run.seed", "1"),
        ("--optim.lr", "0.2"),
        ("--optim.epochs", "5"),
        ("--method", "dkd"),
        ("--student.model", "resnet14"),
    ],
)
def test_student_settings_keep_the_teacher(flag, value):
    assert cache_path_of(flag, value) == cache_path_of()


def test_data_fingerprint_covers_labels_and_images():
    images, labels = torch.randint(0, 255, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50) % 5
    test_images, test_labels = images[:10].clone(), labels[:10].clone()
    base = tensor_fingerprint(images, labels, test_images, test_labels)
    relabelled = labels.clone()
    relabelled[7] = (relabelled[7] + 1) % 5
    assert tensor_fingerprint(images, relabelled, test_images, test_labels) != base
    changed = images.clone()
    changed[0, 0, 0, 0] += 1
    assert tensor_fingerprint(changed, labels, test_images, test_labels) != base
    assert tensor_fingerprint(images.clone(), labels.clone(), test_images, test_labels) == base
    assert (
        build_data("synthetic", "", synthetic=SyntheticSpec(seed=1)).fingerprint
        != build_data("synthetic", "", synthetic=SyntheticSpec(seed=2)).fingerprint
    )


def test_the_split_does_not_follow_the_run_seed():
    splits = [train.load_data(train.parse_config([*TINY, "--run.seed", s])) for s in ("0", "1")]
    assert torch.equal(splits[0].val.labels, splits[1].val.labels)
    assert torch.equal(splits[0].val.images, splits[1].val.images)
    other = train.load_data(train.parse_config([*TINY, "--data.split-seed", "1"]))
    assert not torch.equal(other.val.images, splits[0].val.images)


def test_given_checkpoint_made_differently_is_refused(tmp_path):
    train.run(tiny_cfg(tmp_path, "--method", "teacher", "--run.name", "t"))
    (cached,) = (tmp_path / "cache").glob("*.pt")
    ok = train.run(tiny_cfg(tmp_path, "--method", "kd", "--teachers.checkpoints", str(cached), "--run.name", "k"))
    assert 0 <= ok["best/test_acc"] <= 100
    with pytest.raises(CheckpointError, match=r"recipe\.epochs is 2 here but 1"):
        train.run(
            tiny_cfg(
                tmp_path,
                "--method",
                "kd",
                "--teachers.checkpoints",
                str(cached),
                "--teachers.epochs",
                "2",
                "--run.name",
                "k2",
            )
        )
    # a file recording no identity (another tool, an older kd) is used as given
    bare = torch.load(cached, weights_only=True)
    del bare["identity"]
    torch.save(bare, tmp_path / "bare.pt")
    train.run(
        tiny_cfg(
            tmp_path,
            "--method",
            "kd",
            "--teachers.checkpoints",
            str(tmp_path / "bare.pt"),
            "--teachers.epochs",
            "2",
            "--run.name",
            "k3",
        )
    )


def test_untrained_teacher_is_refused():
    with pytest.raises(ConfigError, match="--teachers.lr must be > 0"):
        train.validate(train.parse_config([*TINY, "--method", "kd", "--teachers.lr", "0"]))


def test_identity_difference_names_the_field():
    a = {"arch": "resnet8", "recipe": {"epochs": 1, "lr": 0.1}, "data": {"fingerprint": "x"}}
    assert identity_difference(a, a) is None
    assert identity_difference(a, {**a, "recipe": {"epochs": 1, "lr": 0.2}}) == "recipe.lr is 0.1 here but 0.2 there"


# ----------------------------------------------------------------------------------------------- real folders


def write_tiny(root: Path, swap: bool = False) -> Path:
    """A 3-class Tiny-ImageNet in the original layout (8 train, 2 val images of 8x8 px per class); `swap`
    exchanges the training images of classes 0 and 1 (a relabelled copy)."""
    wnids = ["n001", "n002", "n003"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    for c, w in enumerate(wnids):
        folder = root / "train" / wnids[(1 - c) if swap and c < 2 else c] / "images"
        folder.mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(rng.normal(60 + 60 * c, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{w}_{i}.JPEG")
    lines = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "val" / "images" / f"v{i}.JPEG")
        lines.append(f"v{i}.JPEG\t{wnids[i % 3]}\t0\t0\t7\t7")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_relabelled_data_makes_a_new_teacher_and_a_resumed_run_refuses_it(tmp_path):
    original, relabelled = write_tiny(tmp_path / "tiny"), write_tiny(tmp_path / "tiny-relabelled", swap=True)
    args = (
        "--method",
        "kd",
        "--data.dataset",
        "tiny-imagenet",
        "--data.batch-size",
        "4",
        "--data.val-fraction",
        "0.25",
        "--data.cache-dir",
        str(tmp_path / "data-cache"),
    )
    train.run(tiny_cfg(tmp_path, *args, "--data.root", str(original), "--run.name", "r"))
    with pytest.raises(
        CheckpointError,
        match=r"teacher resnet8 is not the one the run started with "
        r"\(data\.fingerprint",
    ):
        train.run(tiny_cfg(tmp_path, *args, "--data.root", str(relabelled), "--run.name", "r", "--run.resume", "auto"))
    # the same data moved elsewhere is the same data: the resume is accepted and the teacher reused
    moved = tmp_path / "moved"
    shutil.copytree(original, moved)
    train.run(tiny_cfg(tmp_path, *args, "--data.root", str(moved), "--run.name", "r", "--run.resume", "auto"))
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    # a fresh run on the relabelled copy trains its own teacher
    train.run(tiny_cfg(tmp_path, *args, "--data.root", str(relabelled), "--run.name", "r2"))
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_a_class_subset_is_part_of_the_teacher_identity():
    cfg = train.parse_config([*TINY])
    data = train.load_data(cfg)
    (whole,) = teacher_identities(cfg.teachers, cfg.optim, cfg.data, cfg.run, data, True)
    assert "classes" not in whole["data"]  # identities of whole datasets are unchanged by the option
    data.class_subset = ("n001", "n002")
    (subset,) = teacher_identities(cfg.teachers, cfg.optim, cfg.data, cfg.run, data, True)
    assert subset["data"]["classes"] == ["n001", "n002"] and teacher_key(subset) != teacher_key(whole)


def test_the_cpu_thread_count_and_device_are_part_of_the_teacher_identity():
    """1 and 2 intra-op threads fine-tune different teachers from one seed (float sums split differently):
    they must not share a cache file. The device type is part of it too."""
    cfg = train.parse_config([*TINY])
    data = train.load_data(cfg)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        (one,) = teacher_identities(cfg.teachers, cfg.optim, cfg.data, cfg.run, data, True)
        torch.set_num_threads(2)
        (two,) = teacher_identities(cfg.teachers, cfg.optim, cfg.data, cfg.run, data, True)
    finally:
        torch.set_num_threads(threads)
    (gpu,) = teacher_identities(cfg.teachers, cfg.optim, cfg.data, cfg.run, data, True, device="cuda")
    assert one["compute"] == {"device": "cpu", "threads": 1, "world_size": 1}
    assert gpu["compute"] == {"device": "cuda", "world_size": 1}
    assert len({teacher_key(one), teacher_key(two), teacher_key(gpu)}) == 3
    assert "compute.threads" in identity_difference(one, two)  # what a resume with other threads is told
    assert teacher_seed(one) == teacher_seed(two) == teacher_seed(gpu)  # one recipe, one initialisation


def test_teacher_lock_is_exclusive_between_holders(tmp_path):
    path = tmp_path / "cache" / "t.pt"
    with teacher_lock(path) as held:
        assert held
        with teacher_lock(path, wait=False) as second:  # another open file: as another process would be
            assert not second
    with teacher_lock(path, wait=False) as again:
        assert again


def test_a_teacher_being_fine_tuned_elsewhere_is_left_for_last_then_loaded(tmp_path, monkeypatch):
    """Two trials of a sweep share the teachers' work: a run finds the first teacher's lock held (another process
    fine-tuning it), fine-tunes the second one meanwhile, then waits for the lock and uses the cached file."""
    cfg = tiny_cfg(tmp_path, "--method", "aver", "--teachers.models", "resnet8,wrn_16_1", "--run.name", "a")
    first_path = tmp_path / cache_path_of("--teachers.models", "resnet8")
    train.run(tiny_cfg(tmp_path, "--method", "teacher", "--teachers.models", "resnet8", "--run.name", "elsewhere"))
    shutil.move(first_path, tmp_path / "cache" / "made-elsewhere.pt")
    order, real_finetune = [], train.finetune_teacher
    holder = teacher_lock(first_path)
    holder.__enter__()  # "another process" is fine-tuning resnet8

    def finetune(ctx, i, *args, **kwargs):
        arch = ctx.cfg.teachers.models[i]
        order.append(arch)
        real_finetune(ctx, i, *args, **kwargs)
        if arch == "wrn_16_1":  # the other process finishes resnet8 while this run fine-tunes wrn_16_1
            shutil.copy(tmp_path / "cache" / "made-elsewhere.pt", first_path)
            holder.__exit__(None, None, None)

    monkeypatch.setattr(train, "finetune_teacher", finetune)
    summary = train.run(cfg)
    assert order == ["wrn_16_1"] and first_path.is_file()
    assert "teacher/resnet8/test_acc" in summary and "teacher/wrn_16_1/test_acc" in summary


def test_a_teacher_loaded_after_waiting_for_another_run_counts_its_load_time_not_the_wait(
    tmp_path, monkeypatch, capsys
):
    """Another process fine-tunes the teacher (holds its cache lock) while this run waits: the wait is
    teacher_wait_s, teacher_time_s is this run's own (loading the cached teacher and testing it). No real
    waiting: the lock below jumps train's clock by 1000 s and writes the file the other process would."""
    import contextlib
    import types

    train.run(tiny_cfg(tmp_path, "--method", "teacher", "--run.name", "made"))
    (cached,) = (tmp_path / "cache").glob("*.pt")
    made_elsewhere = cached.rename(tmp_path / "elsewhere.pt")
    offset = [0.0]
    real_time = train.time.time
    shifted = types.SimpleNamespace(time=lambda: real_time() + offset[0])
    monkeypatch.setattr(train, "time", shifted)  # the run's start
    monkeypatch.setattr(kd_cli.session, "time", shifted)  # the teacher time and the wall time, in the summary
    monkeypatch.setattr(kd.teachers, "time", shifted)  # the wait, measured where the cache is filled

    @contextlib.contextmanager
    def busy_lock(path, wait=True):
        if not wait:
            yield False  # held by the other process
            return
        offset[0] += 1000.0  # ... which fine-tunes for 1000 s while this run waits, then writes the file
        made_elsewhere.rename(path)
        yield True

    monkeypatch.setattr(kd.teachers, "teacher_lock", busy_lock)
    summary = train.run(tiny_cfg(tmp_path, "--method", "kd", "--run.name", "waited"))
    assert "using cached" in capsys.readouterr().out
    assert summary["teacher_wait_s"] >= 1000.0
    assert 0.0 <= summary["teacher_time_s"] < 1000.0 and summary["wall_time_s"] < 1000.0
    rows = (tmp_path / "runs" / "waited" / "metrics.jsonl").read_text()
    assert "teacher:resnet8" not in rows  # loaded, not fine-tuned
    first = train.run(tiny_cfg(tmp_path, "--method", "kd", "--run.name", "cached"))  # cached: no wait at all
    assert first["teacher_wait_s"] == 0.0 and first["teacher_time_s"] < 1000.0


# Config fields that do not make a teacher, each with the reason: everything else in these groups must be read
# by kd.teachers' settings Protocols (the recipe and identity). A new flag fails the test below until it is put
# on one side, so one that changes how stage 0 fine-tunes can never silently reuse a teacher made differently.
NOT_A_TEACHER_SETTING = {
    "data.root": "where the data lives: the data itself is identified by its fingerprint",
    "data.classes": "enters through the loaded data (its class subset and fingerprint)",
    "data.image_size": "enters through the loaded data (its image size and fingerprint)",
    "data.cache_dir": "where archives are extracted: not the data",
    "data.max_extract_gb": "a safety cap on extraction",
    "data.max_extract_files": "a safety cap on extraction",
    "data.eval_batch_size": "evaluation only",
    "data.workers": "loading parallelism: the fast loader ignores it; DataLoader worker seeds are phase-seeded",
    "data.synthetic_classes": "synthetic data: enters through its fingerprint",
    "data.synthetic_train_size": "synthetic data: enters through its fingerprint",
    "data.synthetic_test_size": "synthetic data: enters through its fingerprint",
    "data.synthetic_image_size": "synthetic data: enters through its fingerprint",
    "teachers.checkpoints": "given teachers are used as they are, never fine-tuned",
    "teachers.cache_dir": "where teachers are cached",
    "teachers.select": "which cached teacher a baseline distils from",
    "teachers.precision": "the frozen teachers' inference precision",
    "teachers.compile": "the frozen teachers' inference compilation",
    "optim.lr": "the student's (teachers: --teachers.lr)",
    "optim.epochs": "the student's (teachers: --teachers.epochs)",
    "optim.label_smoothing": "the student's (teachers: --teachers.label-smoothing)",
    "optim.cutmix_alpha_distill": "distillation phases only",
    "run.name": "bookkeeping",
    "run.out_dir": "bookkeeping",
    "run.overwrite": "bookkeeping",
    "run.seed": "the student's seed (teachers: --teachers.seed)",
    "run.resume": "bookkeeping",
    "run.ckpt_every_steps": "checkpoint frequency (a resumed run is bit-identical)",
    "run.keep_last": "bookkeeping",
    "run.log_every": "progress lines",
    "run.dist_timeout_min": "a timeout",
    "run.deterministic": "algorithm choice of the device, as compute (recorded apart)",
    "run.device": "recorded as the identity's compute part",
    "run.channels_last": "memory layout",
    "run.compile": "compilation of the same computation",
}


def test_every_config_field_is_a_teacher_setting_or_named_as_not_one():
    import dataclasses
    import typing

    import kd.teachers as kt

    protocols = {
        "data": kt.DataSettings,
        "teachers": kt.TeacherSettings,
        "optim": kt.OptimSettings,
        "run": kt.RunSettings,
    }
    read = {f"{group}.{name}" for group, proto in protocols.items() for name in typing.get_type_hints(proto)}
    fields = {f"{group}.{f.name}" for group in protocols for f in dataclasses.fields(getattr(train.Config(), group))}
    assert read <= fields, f"the Protocols read fields the config lacks: {sorted(read - fields)}"
    unclassified = fields - read - set(NOT_A_TEACHER_SETTING)
    assert not unclassified, (
        f"{sorted(unclassified)}: a new flag? add it to kd.teachers' settings Protocols (and "
        "teacher_recipe) if it changes how a teacher is made, else to NOT_A_TEACHER_SETTING"
    )
    assert not read & set(NOT_A_TEACHER_SETTING)


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--optim.momentum", "0.8"),
        ("--optim.weight-decay", "1e-4"),
        ("--optim.warmup-epochs", "0.5"),
        ("--data.batch-size", "8"),
        ("--run.amp", "bf16"),
        ("--teachers.label-smoothing", "0.1"),
        ("--teachers.seed", "3"),
        ("--data.split-seed", "1"),
    ],
)
def test_a_teacher_setting_makes_another_teacher(flag, value):
    assert cache_path_of(flag, value) != cache_path_of()
