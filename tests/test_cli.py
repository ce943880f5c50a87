"""The command line a researcher types: focused and light --help, boolean spellings, --config, run names."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from kd_cli.session import student_notes
from kd.configs import AsmbCfg
from kd_cli.config import RESUME_MAY_CHANGE
from kd_cli.cli import run_name
from kd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# Runs train.py as a script and reports which heavy libraries it imported.
PROBE = """
import runpy, sys
sys.argv = ["train.py", *{args!r}]
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as e:
    print("exit", e.code)
print("heavy", sorted(m for m in ("torch", "timm", "wandb", "tqdm") if m in sys.modules))
"""


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE.format(args=list(args))], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_help_into_a_closed_pipe_exits_quietly():
    """`python train.py --help | head` stops reading early: no traceback, exit 0 (the pipe's reader is closed
    before the help is written, so every write fails)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run(
            [sys.executable, "train.py", "--help"], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(write_end)
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]


def test_help_and_config_errors_never_import_torch_or_timm():
    for args, code in [
        (["--help"], 0),
        (["--method", "asmb", "--help"], 0),
        (["--data.aug", "maybe"], 2),
        (["--lr", "0.1"], 2),
        (["--optim.lr", "-1"], 2),
        (["--method", "aver", "--teachers", "a"], 2),
    ]:
        out = probe(*args)
        assert f"exit {code}" in out.stdout, (args, out.stdout, out.stderr)
        assert "heavy []" in out.stdout, (args, out.stdout)


def test_method_help_shows_the_common_groups_and_that_method_only():
    out = probe("--method", "asmb", "--help").stdout
    for flag in (
        "--data.dataset",
        "--student.model",
        "--teachers.models",
        "--optim.lr",
        "--run.seed",
        "--wandb.mode",
        "--asmb.num-stages",
        "--asmb.tau-start",
    ):
        assert flag in out, flag
    for other in ("--kd.temperature", "--dkd.beta", "--crd.nce-k", "--camkd.feature-weight"):
        assert other not in out, other
    assert "--method asmb's options" in out
    plain = probe("--help").stdout  # no --method: the default method's group, and a pointer to the others
    assert "--kd.temperature" in plain and "--asmb.num-stages" not in plain and "--method X --help" in plain


def test_unknown_flag_keeps_the_suggestion(capsys):
    assert train.main(["--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and "--optim.epochs" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "word, value",
    [
        ("true", True),
        ("TRUE", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("Yes", True),
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        ("NO", False),
    ],
)
def test_booleans_accept_common_spellings(word, value):
    cfg = train.parse_config(["--data.aug", word, f"--run.channels_last={word}", "--kd.standardize", word])
    assert cfg.data.aug is value and cfg.run.channels_last is value and cfg.kd.standardize is value


def test_a_bad_boolean_is_one_clear_line(capsys):
    with pytest.raises(ConfigError, match="--data.aug"):
        train.parse_config(["--data.aug", "maybe"])


def test_config_loads_a_saved_config_and_the_command_line_wins(tmp_path):
    saved = train.parse_config(
        [
            "--preset",
            "smoke",
            "--method",
            "dkd",
            "--dkd.beta",
            "3",
            "--optim.lr",
            "0.2",
            "--teachers",
            "resnet20,wrn_16_2",
            "--data.aug",
            "false",
        ]
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(saved)))
    cfg = train.parse_config(["--config", str(run_dir / "config.json"), "--optim.lr", "0.3"])
    assert cfg.method == "dkd" and cfg.dkd.beta == 3 and cfg.data.aug is False and cfg.data.dataset == "synthetic"
    assert cfg.teachers.models == ("resnet20", "wrn_16_2") and cfg.optim.milestones == ()  # lists back to tuples
    assert cfg.optim.lr == 0.3  # the command line on top
    assert train.parse_config([f"--config={run_dir}"]) == saved  # a run directory works too


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        train.parse_config(["--config", str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optim": {"lrr": 0.1}}))
    with pytest.raises(ConfigError, match="unknown option optim.lrr"):
        train.parse_config(["--config", str(bad)])


def test_config_reads_yaml_and_is_in_the_help(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("method: dkd\npreset: smoke\noptim:\n  lr: 0.2\n  milestones: [5, 8]\ndkd: {beta: 3}\n")
    cfg = train.parse_config(["--config", str(path), "--dkd.alpha", "2"])
    assert (cfg.method, cfg.optim.lr, cfg.optim.milestones, cfg.dkd.beta, cfg.dkd.alpha) == ("dkd", 0.2, (5, 8), 3, 2)
    path.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not a readable YAML config"):
        train.parse_config(["--config", str(path)])
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping"):
        train.parse_config(["--config", str(path)])
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    assert "--config PATH" in " ".join(capsys.readouterr().out.split())


def test_run_names_describe_the_run():
    when = 0.0
    assert run_name("kd", "resnet8", ("resnet32x4",), "cifar100", when).startswith(
        "kd-resnet8-from-resnet32x4-cifar100-"
    )
    assert run_name("teacher", "resnet8", ("resnet20", "wrn_16_2"), "synthetic", when).startswith(
        "teacher-resnet20+wrn_16_2-synthetic-"
    )
    assert run_name("ce", "resnet8", (), "cifar100", when).startswith("ce-resnet8-cifar100-")
    assert "/" not in run_name("kd", "hf_hub:org/net", ("a",), "x", when)
    # seeds of one study started in the same second get their own directories
    assert run_name("kd", "resnet8", ("r",), "x", when, seed=0) != run_name("kd", "resnet8", ("r",), "x", when, seed=1)
    assert "-s1-" in run_name("kd", "resnet8", ("r",), "x", when, seed=1)


def test_light_configs_agree_with_the_methods():
    """kd.configs holds the method configs without torch; the method modules use the same classes."""
    import kd.asmb
    from kd import configs
    from kd.methods import METHOD_SPECS, method_class

    for name, spec in METHOD_SPECS.items():  # the table and each Method class say the same
        if spec.impl:
            cls = method_class(name)
            assert cls.name == name
            assert (cls.multi_teacher, cls.uses_teachers) == (spec.multi_teacher, spec.uses_teachers), name
        assert spec.config is None or spec.config is getattr(configs, spec.config.__name__)
    # kd/asmb.py is to import AsmbCfg from kd.configs; until then the two definitions must not drift apart
    fields = lambda cls: [(f.name, f.type, f.default) for f in dataclasses.fields(cls)]  # noqa: E731
    assert fields(kd.asmb.AsmbCfg) == fields(configs.AsmbCfg)


def help_text(capsys, monkeypatch, *args: str) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # one help entry per line: no wrapping inside a name
    with pytest.raises(SystemExit):
        train.parse_config([*args, "--help"])
    return " ".join(capsys.readouterr().out.replace("│", " ").split())


def test_help_describes_the_real_run_name_and_mbm_query(capsys, monkeypatch):
    import re
    import time

    text = help_text(capsys, monkeypatch, "--method", "asmb")
    example = re.search(r"e\.g\. (\S+)", text).group(1)
    when = time.mktime((2025, 1, 1, 12, 0, 0, 0, 0, -1))  # the example's time, local
    assert example == run_name("kd", "resnet8", ("resnet32x4",), "cifar100", when, seed=0)
    assert "<method>-<student>-from-<teachers joined by +>-<dataset>-s<seed>-<YYYYmmdd-HHMMSS>" in text
    kind = text[text.index("--asmb.mbm-kind") : text.index("--asmb.mbm-query-dim")]
    assert "student-query" not in kind and "learned token by default" in kind
    assert AsmbCfg().learnable_query  # what "by default" says


def test_adapter_students_and_freezing_a_random_student_are_said_at_the_start():
    def notes(*args: str) -> list[str]:
        return student_notes(train.parse_config(["--preset", "smoke", *args]))

    assert notes() == []
    (line,) = notes("--student.adapter-dim", "8")
    assert "no checkpoints/best.safetensors" in line and "\n" not in line
    (line,) = notes("--student.freeze", "bn_head")
    assert line.startswith("warning: --student.freeze bn_head freezes a randomly initialised student")
    assert notes("--student.freeze", "bn_head", "--student.checkpoint", "some.pt") == []
    assert notes("--student.freeze", "none", "--student.pretrained", "True") == []
    assert notes("--method", "teacher", "--student.freeze", "head") == []  # no student is trained
    assert len(notes("--student.freeze", "adapter", "--student.adapter-dim", "8")) == 2


TOY_METHOD = '''
from dataclasses import dataclass

from kd.losses import cross_entropy, kd_loss
from kd.methods.base import Method, teacher_logits


@dataclass
class ToyKDCfg:
    """--method toykd: CE + KD at a fixed temperature (a test's own method)."""
    weight: float = 1.0
    """weight of the KD term."""


class ToyKD(Method):
    name = "toykd"

    def loss_terms(self, inp):
        return {"ce": cross_entropy(inp.student.logits, inp.target),
                "toy": kd_loss(inp.student.logits, teacher_logits(inp).detach(), 4.0)}

    def loss_weights(self, epoch):
        return {"toy": self.cfg.weight}
'''

REGISTER_AND_RUN = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import kd.methods
from toy_method import ToyKDCfg
# the one line a new method adds to kd/methods/__init__.py's table, here from outside it
kd.methods.METHOD_SPECS["toykd"] = kd.methods.MethodSpec("toykd", "logit", ToyKDCfg, "toy_method:ToyKD")
import train, report
print("FAMILY", report.family_of("toykd"))
sys.exit(train.main(sys.argv[3:]))
"""


def test_a_new_method_is_one_file_and_one_table_line(tmp_path):
    """A method registered by one MethodSpec line gets its --method choice, its --toykd.* group (with --help),
    validation, a whole run through train.py's loop with its named terms and weights, and its report family:
    nothing else lists methods."""
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    script = tmp_path / "register.py"
    script.write_text(REGISTER_AND_RUN)
    base = [sys.executable, str(script), str(tmp_path), str(ROOT)]
    shown = subprocess.run(base + ["--method", "toykd", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "--toykd.weight" in shown.stdout and "--kd.temperature" not in shown.stdout
    bad = subprocess.run(base + ["--method", "toykd", "--toykd.weight", "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--toykd.weight must be >= 0" in bad.stderr
    args = [
        "--preset",
        "smoke",
        "--method",
        "toykd",
        "--toykd.weight",
        "0.5",
        "--data.synthetic-train-size",
        "200",
        "--data.synthetic-test-size",
        "40",
        "--teachers.epochs",
        "1",
        "--optim.epochs",
        "1",
        "--run.max-steps-per-epoch",
        "2",
        "--wandb.mode",
        "disabled",
        "--run.out-dir",
        str(tmp_path / "runs"),
        "--run.name",
        "toy",
        "--teachers.cache-dir",
        str(tmp_path / "cache"),
        "--teachers",
        "resnet20",
    ]
    done = subprocess.run(base + args, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FAMILY logit" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "runs" / "toy" / "metrics.jsonl").read_text().splitlines()]
    toy = [r for r in rows if r["phase"] == "toykd"]
    assert toy and all("train/toy" in r and "train/ce" in r for r in toy)
    assert json.loads((tmp_path / "runs" / "toy" / "config.json").read_text())["toykd"] == {"weight": 0.5}


def test_kd_never_imports_the_application_and_report_needs_no_sweep():
    """kd/ is the library a user copies out: none of its files imports kd_cli, train, sweep, report, tyro, wandb
    or tqdm (timm itself may load the last two), and importing every module of it loads nothing of the
    application; report.py reads sweep specs from kd_cli.sweep_spec (no report <-> sweep cycle)."""
    import ast

    banned = {"kd_cli", "train", "sweep", "report", "tyro", "wandb", "tqdm"}
    for path in (ROOT / "kd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            assert not {n.split(".")[0] for n in names} & banned, f"{path.relative_to(ROOT)} imports {names}"
    probe = """
import importlib, pkgutil, sys
import kd
for m in pkgutil.walk_packages(kd.__path__, "kd."):
    importlib.import_module(m.name)
print(sorted(n for n in sys.modules if n.split(".")[0] in ("kd_cli", "train", "sweep", "report")))
import report
print(sorted(n for n in ("sweep", "train") if n in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]


def test_resume_may_change_names_existing_settings():
    """Every entry of RESUME_MAY_CHANGE is a config field or group (a renamed flag must not leave a stale one)."""
    from kd.configs import flatten_config

    keys = set(flatten_config(dataclasses.asdict(train.Config())))
    for entry in RESUME_MAY_CHANGE:
        assert entry in keys or any(k.startswith(entry) for k in keys if entry.endswith(".")), entry
