"""Every command in README.md runs as written (on tiny sizes), or is listed in NOT_RUN with the reason.

The fenced ```bash and ```python blocks of the README are parsed (backslash continuations joined, comments
dropped, `VAR="..."` assignments expanded, `a && b` split) and every command is classified:

- `python train.py ...`: its flags must parse with train.py's own parser. A command that needs nothing this
  machine lacks is run in-process, with tiny sizes appended (TINY: 2 steps per epoch, 1 epoch, batch 8), in a fresh
  directory (so `runs/`, `runs/teacher_cache` and `data/` of the README are that directory's); CIFAR-100 (a
  download) is swapped for the built-in synthetic set, and the data paths the README names (`/data/imagenet100`,
  `data/tiny-imagenet-200.zip`, ...) for small generated stand-ins in the same format (or, with KD_DATA_DIR
  holding tiny-imagenet-mini.tar.gz, that real archive for Tiny-ImageNet). A command that needs timm's hub
  weights (`--teachers.pretrained True`, the default, or `--student.pretrained True`) or a GPU is not run: it
  must be in NOT_RUN, its values are validated on the stand-in data, and every model it needs from the hub must
  have pretrained weights in timm (the README once named zoo teachers, which have none, with the default
  `--teachers.pretrained True`).
- `python sweep.py SPEC ...`: the flags parse, the spec loads and its names are checked. Local sweeps of a spec in
  RUNNABLE_SPECS run on a tiny copy of the spec (TINY_SPEC) with one trial (`--count`), the others are validated
  (their first trial's flags by train.py's parser) and must be in NOT_RUN. `python sweep.py report DIR` and
  `python report.py DIR` run on what the block's earlier commands wrote.
- `python -c CODE` and ```python blocks are executed in the block's directory (OFFLINE_VARIANTS: the README's
  own offline variant of a download; `runs/<name>` = a tiny run of the architecture the snippet loads).
- `mkdir` and `ln -s` are done (`/path/to/...` placeholders -> the stand-ins).
- Anything else (pip, venv, pytest, torchrun, ...) must be in NOT_RUN.

A README command that is neither runnable here nor in NOT_RUN fails the test, and so does a NOT_RUN entry that
matches no README command (or matches one that runs offline), so new README commands are covered as they come.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

import report  # noqa: E402
import sweep  # noqa: E402
import kd_cli.session  # noqa: E402
import train  # noqa: E402
from test_data import pack_archive  # noqa: E402

# commands that are not run here (regex searched in the command as written, continuation lines joined): the reason
NOT_RUN: dict[str, str] = {
    r"^python3 -m venv \.venv$": "creates a virtual environment (the test runs in one)",
    r"^\. \.venv/bin/activate$": "activates the virtual environment (shell state)",
    r"^pip install ": "installs packages from the package index (internet)",
    r"^python -m pytest": "runs the test suite this test belongs to",
    r"--student\.model swin_tiny_patch4_window7_224 --student\.pretrained True": "timm's ImageNet weights of swin_tiny and of the default teachers (internet) and ImageNet-100",
    r"--data\.dataset imagefolder --data\.root /data/imagenet100 --data\.image-size 224": "the default teachers start from timm's ImageNet weights (internet)",
    r"--data\.dataset imagefolder --data\.root /data/imagenet --data\.classes imagenet100\.txt": "the default teachers start from timm's ImageNet weights (internet)",
    r"--data\.dataset tiny-imagenet --data\.root /data/tiny-imagenet-200\.zip": "the default teachers start from timm's ImageNet weights (internet)",
    r"^torchrun --standalone --nproc_per_node 4 ": "4 CUDA GPUs (--run.sync-bn True needs CUDA) and the default teachers' hub weights",
    r"^torchrun --nnodes 2 ": "two machines with 8 GPUs each and the default teachers' hub weights",
    r"^python sweep\.py sweeps/baselines\.yaml --mode online": "a wandb server and credentials (internet)",
    r"^python sweep\.py sweeps/bench_tin20\.yaml": "48 trials on Tiny-ImageNet, about 2 hours on 2 cores "
    "(tests/test_bench.py runs a small copy end to end)",
    r"^python sweep\.py report runs/sweeps/bench_tin20$": "reads the 48 trials of the benchmark sweep above",
}

# appended to every train.py command that runs: tiny sizes, no wandb (later flags win)
TINY = (
    "--data.batch-size",
    "8",
    "--optim.epochs",
    "1",
    "--teachers.epochs",
    "1",
    "--run.max-steps-per-epoch",
    "2",
    "--asmb.teacher-epochs",
    "1",
    "--data.workers",
    "0",
    "--data.synthetic-train-size",
    "200",
    "--data.synthetic-test-size",
    "40",
    "--wandb.mode",
    "disabled",
)
# local sweeps that run here (one trial), on a copy of the spec with these parameters fixed
RUNNABLE_SPECS = {"sweeps/smoke.yaml"}
TINY_SPEC = {
    "optim.epochs": 1,
    "teachers.epochs": 1,
    "data.batch-size": 8,
    "run.max-steps-per-epoch": 2,
    "data.synthetic-train-size": 200,
    "data.synthetic-test-size": 40,
}
# network -> offline: the README's comment beside the command names this variant
OFFLINE_VARIANTS = {"pretrained=True": "pretrained=False"}


@dataclasses.dataclass(frozen=True)
class Command:
    line: int  # README line where the command starts
    text: str  # as written (continuations joined, comment dropped, variables expanded)
    argv: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Block:
    line: int
    lang: str
    commands: tuple[Command, ...]


def shell_commands(body: list[tuple[int, str]]) -> list[Command]:
    """The commands of a bash block: continuation lines joined, comments dropped, VAR="..." expanded, && split."""
    logical: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for n, raw in body:
        start, text = pending if pending else (n, "")
        text += raw
        if text.endswith("\\"):
            pending = (start, text[:-1] + " ")
            continue
        pending = None
        logical.append((start, text))
    variables: dict[str, str] = {}
    commands = []
    for n, text in logical:
        expanded = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m[1], m[0]), text)
        tokens = shlex.split(expanded, comments=True)
        if len(tokens) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0], re.S):
            name, value = tokens[0].split("=", 1)
            variables[name] = value
            continue
        while tokens:
            cut = tokens.index("&&") if "&&" in tokens else len(tokens)
            if tokens[:cut]:
                commands.append(Command(n, " ".join(tokens[:cut]), tuple(tokens[:cut])))
            tokens = tokens[cut + 1 :]
    return commands


def readme_blocks(text: str | None = None) -> list[Block]:
    """The README's fenced bash and python blocks that hold at least one command."""
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        lang, start, body = lines[i][3:].strip(), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        if lang in ("bash", "sh", "shell"):
            commands = shell_commands(body)
        elif lang == "python":
            code = "\n".join(line for _, line in body)
            commands = [Command(start + 1, code, ("<python block>", code))]
        else:
            continue
        if commands:
            blocks.append(Block(start, lang, tuple(commands)))
    return blocks


def not_run_reason(command: Command) -> str | None:
    for pattern, reason in NOT_RUN.items():
        if re.search(pattern, command.text):
            return reason
    return None


def script_args(argv: tuple[str, ...], script: str) -> list[str] | None:
    """The arguments of `python <script> ...` (or torchrun ... <script> ...), else None."""
    if argv[0] in ("python", "python3") and len(argv) > 1 and argv[1] == script:
        return list(argv[2:])
    if argv[0] == "torchrun" and script in argv:
        return list(argv[argv.index(script) + 1 :])
    return None


def hub_models(cfg) -> list[str]:
    """The models this config would fetch from timm's hub (nothing when they start from files or checkpoints)."""
    models = []
    if cfg.method != "teacher" and cfg.student.pretrained and not cfg.student.checkpoint:
        models.append(cfg.student.model)
    if cfg.method != "ce" and cfg.teachers.pretrained and not cfg.teachers.checkpoints:
        models += list(cfg.teachers.models)
    return models


def offline_blockers(argv: tuple[str, ...], cfg) -> list[str]:
    """What keeps a train.py command from running on this machine, in words (empty: it runs)."""
    blockers = []
    if argv[0] == "torchrun":
        blockers.append("several processes under torchrun")
    if cfg.run.sync_bn or cfg.run.device.startswith("cuda"):
        blockers.append("a CUDA GPU")
    if hub_models(cfg):
        blockers.append(f"timm's hub weights of {', '.join(hub_models(cfg))}")
    return blockers


# ----------------------------------------------------------------------------------------------- stand-in data
def _image(path: Path, value: int, rng: np.random.Generator, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size, size, 3), value, np.uint8) + rng.integers(0, 30, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def tiny_imagenet_folder(root: Path, classes: int = 3, train: int = 12, val: int = 3) -> Path:
    """A miniature Tiny-ImageNet in the original layout (wnids.txt, train/<wnid>/images, val/val_annotations.txt)."""
    d, rng = root / "tiny-imagenet-200", np.random.default_rng(0)
    wnids = [f"n{i:08d}" for i in range(classes)]
    lines = []
    for c, w in enumerate(wnids):
        for i in range(train):
            _image(d / "train" / w / "images" / f"{w}_{i}.JPEG", 60 * c + 20, rng)
        for i in range(val):
            _image(d / "val" / "images" / f"val_{c}_{i}.JPEG", 60 * c + 20, rng)
            lines.append(f"val_{c}_{i}.JPEG\t{w}\t0\t0\t15\t15")
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return d


def tiny_imagenet_archive(where: Path, suffix: str) -> Path:
    """KD_DATA_DIR/tiny-imagenet-mini.tar.gz when it is there (real images), else a generated archive."""
    real = Path(os.environ.get("KD_DATA_DIR") or "/nonexistent") / "tiny-imagenet-mini.tar.gz"
    if real.is_file():
        return real
    archive = where / f"tiny-imagenet-200{suffix}"
    if not archive.exists():
        pack_archive(tiny_imagenet_folder(where / "src"), archive)
    return archive


def imagefolder(where: Path) -> Path:
    d, rng = where / "imagefolder", np.random.default_rng(1)
    if not d.exists():
        for split, n in (("train", 10), ("val", 3)):
            for c, name in enumerate(("cat", "dog", "eel")):
                for i in range(n):
                    _image(d / split / name / f"{i}.png", 60 * c + 20, rng)
    return d


# the README's data paths (and placeholders) -> a stand-in in the same format, made on first use in the block's folder
STAND_INS = {
    "/data/imagenet100": imagefolder,
    "/data/imagenet": imagefolder,
    "/data/tiny-imagenet-200.zip": lambda where: tiny_imagenet_archive(where, ".zip"),
    "data/tiny-imagenet-200.zip": lambda where: tiny_imagenet_archive(where, ".zip"),
    "/path/to/tiny-imagenet-200.tar.gz": lambda where: tiny_imagenet_archive(where, ".tar.gz"),
}


def stand_in(path: str, cwd: Path) -> Path | None:
    if path not in STAND_INS:
        return None
    (cwd / "stand-in").mkdir(exist_ok=True)
    return STAND_INS[path](cwd / "stand-in")


def substitute(args: list[str], cwd: Path) -> list[str]:
    """Data paths -> stand-ins; a step file the README names but this run never wrote -> its oldest step file."""
    out = []
    for a in args:
        flag, eq, value = a.partition("=") if a.startswith("--") and "=" in a else ("", "", a)
        if value in STAND_INS:
            value = str(stand_in(value, cwd))
        elif re.search(r"/step-\d{9}\.pt$", value) and not (cwd / value).exists():
            steps = sorted((cwd / value).parent.glob("step-*.pt"))
            assert steps, f"no step file in {(cwd / value).parent} to resume from"
            value = str(steps[0].relative_to(cwd))
        out.append(flag + eq + value if eq else value)
    return out


# ----------------------------------------------------------------------------------------------- the commands
def train_config(args: list[str], cwd: Path | None = None):
    cfg = train.parse_config(substitute(args, cwd) if cwd else args)
    return cfg


def run_train(args: list[str], cwd: Path, capsys) -> str:
    args = substitute(args, cwd)
    if train.parse_config(args).data.dataset == "cifar100":  # torchvision's download needs the internet
        args += ["--data.dataset", "synthetic"]
    rc = train.main([*args, *TINY])
    out = capsys.readouterr()
    assert rc == 0, f"train.py exited {rc}:\n{out.err[-3000:]}\n{out.out[-3000:]}"
    return "ran (tiny sizes)"


def check_train(args: list[str], cwd: Path) -> None:
    """Flags and values of a command that is not run, on the stand-in data; its hub models have weights."""
    cfg = train_config(args, cwd)
    train.validate(cfg)
    import timm

    for name in hub_models(cfg):
        pcfg = timm.models.get_pretrained_cfg(name)
        assert pcfg and (pcfg.hf_hub_id or pcfg.url or pcfg.file), (
            f"timm has no pretrained weights for {name}: the command needs --teachers.pretrained False / "
            "--student.pretrained False (or weights from a file)"
        )


def tiny_spec(spec_path: Path, cwd: Path) -> None:
    """A copy of the spec at the same relative path in cwd, with TINY_SPEC's sizes."""
    raw = yaml.safe_load((ROOT / spec_path).read_text())
    raw["parameters"].update({k: {"value": v} for k, v in TINY_SPEC.items()})
    (cwd / spec_path).parent.mkdir(parents=True, exist_ok=True)
    if not (cwd / spec_path).exists():
        (cwd / spec_path).write_text(yaml.safe_dump(raw, sort_keys=False))


def sweep_command(args: list[str], cwd: Path, capsys, runnable: bool) -> str:
    a = sweep.sweep_parser().parse_args(args)
    spec = sweep.load_spec(ROOT / a.spec)
    sweep.check_names(spec, ROOT / a.spec)
    if not runnable:
        if spec.method != "bayes":
            sweep.check_first_trial(spec, sweep.trial_params(spec, 0, 0))
        return "validated"
    tiny_spec(a.spec, cwd)
    extra = ["--mode", "local", "--trial-wandb", "disabled"]
    if a.resume:
        state = sweep.read_json(cwd / a.out_dir / spec.name / sweep.STATE_FILE)
        extra += ["--count", str(len(state["trials"]) + 1)]  # continue: one more trial
    else:
        extra += ["--count", "1"]
        if (cwd / a.out_dir / spec.name).exists():  # an alternative to an earlier command of the block
            extra += ["--out-dir", str(a.out_dir) + f"-{len(list(cwd.glob(str(a.out_dir) + '*')))}"]
    rc = sweep.main([*args, *extra])
    out = capsys.readouterr()
    assert rc == 0, f"sweep.py exited {rc}:\n{out.err[-3000:]}\n{out.out[-3000:]}"
    return f"ran ({' '.join(extra)})"


def report_command(args: list[str], capsys) -> str:
    rc = report.main(args)
    out = capsys.readouterr()
    assert rc == 0, f"report exited {rc}:\n{out.err[-3000:]}"
    runs_dir = Path(args[0])
    assert (runs_dir / "report.md").is_file()
    return "ran"


def tiny_run_of(arch: str, num_classes: int, cwd: Path, capsys) -> Path:
    """A finished tiny run whose student is `arch` with `num_classes` classes (for `runs/<name>`)."""
    name = f"snippet-{arch}-{num_classes}"
    if not (cwd / "runs" / name).exists():
        rc = train.main(
            [
                "--preset",
                "smoke",
                "--method",
                "ce",
                "--student.model",
                arch,
                "--run.name",
                name,
                "--data.synthetic-classes",
                str(num_classes),
                "--data.val-fraction",
                "0.25",
                *TINY,
                "--data.synthetic-train-size",
                str(4 * num_classes),
            ]
        )
        out = capsys.readouterr()
        assert rc == 0, out.err[-3000:]
    return Path("runs") / name


def python_code(code: str, cwd: Path, capsys) -> str:
    for online, offline in OFFLINE_VARIANTS.items():
        code = code.replace(online, offline)
    if "runs/<name>" in code:
        arch = re.search(r"create_model\(\"(\w+)\", num_classes=(\d+)\)", code)
        assert arch, "the snippet loads runs/<name>: name its architecture and class count for the stand-in run"
        code = code.replace("runs/<name>", str(tiny_run_of(arch[1], int(arch[2]), cwd, capsys)))
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    return "ran"


def plan(command: Command) -> str | None:
    """None when the command runs here, else why not (its NOT_RUN reason); raises when unclassified."""
    argv, reason = command.argv, not_run_reason(command)
    where = f"README.md:{command.line}: {command.text[:160]}"
    train_args = script_args(argv, "train.py")
    if train_args is not None:
        blockers = offline_blockers(argv, train_config(train_args))
        if blockers and reason is None:
            raise AssertionError(
                f"{where}\n  needs {'; '.join(blockers)}: make it run offline (zoo teachers with "
                "--teachers.pretrained False, ...) or add it to NOT_RUN with the reason"
            )
        if not blockers and reason is not None:
            raise AssertionError(f"{where}\n  runs offline but NOT_RUN lists it ({reason}): remove the entry")
        return reason
    sweep_args = script_args(argv, "sweep.py")
    if sweep_args is not None and sweep_args[:1] != ["report"]:
        a = sweep.sweep_parser().parse_args(sweep_args)
        runnable = a.mode != "online" and str(a.spec) in RUNNABLE_SPECS
        if not runnable and reason is None:
            raise AssertionError(
                f"{where}\n  not runnable here (online, or a spec outside RUNNABLE_SPECS): add it "
                "to NOT_RUN with the reason"
            )
        if runnable and reason is not None:
            raise AssertionError(f"{where}\n  runs here but NOT_RUN lists it ({reason}): remove the entry")
        return reason
    if reason is not None:
        return reason
    if (
        sweep_args is not None
        or script_args(argv, "report.py") is not None
        or argv[0] in ("mkdir", "ln")
        or argv[0] == "<python block>"
        or (argv[0] in ("python", "python3") and argv[1:2] == ("-c",))
    ):
        return None
    raise AssertionError(f"{where}\n  is neither run by this test nor listed in NOT_RUN (with the reason)")


def execute(command: Command, cwd: Path, capsys) -> str:
    argv, reason = command.argv, plan(command)
    train_args, sweep_args = script_args(argv, "train.py"), script_args(argv, "sweep.py")
    if train_args is not None:
        if reason is not None:
            check_train(train_args, cwd)
            return f"validated; not run: {reason}"
        return run_train(train_args, cwd, capsys)
    if sweep_args is not None and sweep_args[:1] == ["report"]:
        return report_command(sweep_args[1:], capsys) if reason is None else f"not run: {reason}"
    if sweep_args is not None:
        how = sweep_command(sweep_args, cwd, capsys, runnable=reason is None)
        return how if reason is None else f"{how}; not run: {reason}"
    if script_args(argv, "report.py") is not None:
        return report_command(script_args(argv, "report.py"), capsys)
    if reason is not None:
        return f"not run: {reason}"
    if argv[0] == "mkdir":
        for d in argv[1:]:
            if not d.startswith("-"):
                (cwd / d).mkdir(parents=True, exist_ok=True)
        return "ran"
    if argv[0] == "ln":
        assert argv[1] == "-s" and len(argv) == 4, command.text
        source, target = stand_in(argv[2], cwd) or Path(argv[2]), cwd / argv[3]
        target = target / Path(argv[2]).name if argv[3].endswith("/") or target.is_dir() else target
        target.symlink_to(source)
        return "ran (placeholder -> stand-in)"
    if argv[0] == "<python block>":
        return python_code(argv[1], cwd, capsys)
    return python_code(argv[2], cwd, capsys)  # python -c CODE


# ----------------------------------------------------------------------------------------------- the tests
BLOCKS = readme_blocks()


def test_the_readme_has_the_commands_this_test_expects():
    commands = [c for b in BLOCKS for c in b.commands]
    assert sum(c.text.startswith("python train.py") for c in commands) >= 10
    assert any(c.text.startswith("python sweep.py sweeps/smoke.yaml") for c in commands)
    assert any(c.argv[0] == "<python block>" for c in commands)


def test_every_readme_command_is_run_here_or_listed_with_its_reason():
    """Classification only (no run): a new README command fails here until it runs or is in NOT_RUN."""
    problems = []
    for block in BLOCKS:
        for command in block.commands:
            try:
                plan(command)
            except (AssertionError, train.ConfigError, sweep.ConfigError) as e:
                problems.append(str(e))
    assert not problems, "\n".join(problems)


def test_every_not_run_entry_matches_a_readme_command():
    texts = [c.text for b in BLOCKS for c in b.commands]
    stale = [p for p in NOT_RUN if not any(re.search(p, t) for t in texts)]
    assert not stale, f"NOT_RUN entries that match no README command (remove them): {stale}"


def test_the_readme_says_how_to_run_the_real_data_tests():
    text = README.read_text()
    assert "KD_DATA_DIR" in text and "tiny-imagenet-mini.tar.gz" in text


def inline_train_commands() -> list[tuple[int, str]]:
    """`python train.py ...` in the README's running text (inline code), with their line numbers."""
    return [
        (n, m[1])
        for n, line in enumerate(README.read_text().splitlines(), 1)
        for m in re.finditer(r"`(python train\.py [^`]*)`", line)
    ]


def test_inline_train_commands_run_as_written(tmp_path, monkeypatch, capsys, one_thread):
    """`--help` prints help (exit 0); `--config runs/<name> --run.seed 1` reruns a finished (tiny, auto-named) run
    with another seed."""
    monkeypatch.chdir(tmp_path)
    stamps = iter(range(int(time.time()), 2**40, 60))  # a rerun starts later: its directory name (the time) differs
    monkeypatch.setattr(
        kd_cli.session,
        "run_name",
        lambda *a, when=None, _name=kd_cli.session.run_name, **kw: _name(*a, when=next(stamps), **kw),
    )
    commands = inline_train_commands()
    assert len(commands) >= 3
    for n, text in commands:
        args = shlex.split(text)[2:]
        if "--help" in args:
            with pytest.raises(SystemExit) as info:
                train.main(args)
            assert info.value.code in (0, None), f"README.md:{n}: {text}"
            assert "--run.seed" in capsys.readouterr().out
            continue
        if "runs/<name>" in args:
            assert train.main(["--preset", "smoke", "--method", "ce", *TINY]) == 0
            first = [p for p in (tmp_path / "runs").iterdir() if p.name != "teacher_cache"]
            assert len(first) == 1
            args = [a.replace("runs/<name>", f"runs/{first[0].name}") for a in args]
        rc = train.main(args)
        out = capsys.readouterr()
        assert rc == 0, f"README.md:{n}: {text}\n{out.err[-3000:]}"
    reruns = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/config.json")]
    assert sorted(c["run"]["seed"] for c in reruns) == [0, 1]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"L{b.line}" for b in BLOCKS])
def test_readme_block_runs_as_written(block, tmp_path, monkeypatch, capsys, one_thread):
    """The block's commands in order, in a fresh directory (the README's relative paths are relative to it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # sweep trials: one thread each on a busy CI machine
    done = []
    for command in block.commands:
        t0 = time.time()
        try:
            how = execute(command, tmp_path, capsys)
        except BaseException as e:
            before = "".join(f"\n  before it: {line}" for line in done)
            raise AssertionError(f"README.md:{command.line}: {command.text[:200]}\n  failed: {e}{before}") from e
        done.append(f"README.md:{command.line} [{time.time() - t0:.1f}s] {how}: {command.text[:100]}")
