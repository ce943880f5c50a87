"""Sweep specs: a wandb sweep YAML whose parameter names are train.py flags, read and checked before any trial
starts (structure, distributions, early termination, every name against train.py's config, the first trial's
values with train.py's own parser). Shared by sweep.py (which runs them) and report.py (which reads them back)."""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kd.errors import ConfigError
from kd_cli.cli import flag_names
from kd_cli.config import Config, load_yaml

SEARCH_METHODS = ("grid", "random", "bayes")
# The top-level keys of a wandb sweep configuration (docs.wandb.ai, "Sweep configuration options").
SPEC_KEYS = (
    "name",
    "description",
    "program",
    "method",
    "metric",
    "parameters",
    "early_terminate",
    "command",
    "project",
    "entity",
    "run_cap",
)
# Flags the runner sets for every trial: a spec may not set them.
RESERVED = ("run.out-dir", "run.name", "wandb.mode")
DONE = ("finished", "stopped", "failed")  # trial states never re-run on --resume (running/interrupted are)
STATE_FILE = "sweep.json"


# ----------------------------------------------------------------------------------------------
# Spec: a wandb sweep YAML with train.py flags as parameter names
# ----------------------------------------------------------------------------------------------
@dataclass
class Spec:
    name: str
    method: str
    parameters: dict[str, dict]  # flag name in dash form ("data.synthetic-train-size") -> wandb parameter spec
    metric: dict[str, str] | None  # {"name": ..., "goal": "minimize" | "maximize"}
    early_terminate: dict | None
    fixed_args: list[str]  # literal arguments from the spec's `command` (after ${program})
    raw: dict

    def swept(self) -> list[str]:
        """Parameters that take more than one value (the report plots the metric against them)."""
        return [n for n, p in self.parameters.items() if distribution(p) != "constant"]

    def sha(self) -> str:
        return hashlib.sha1(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:12]


def flag_name(name: str) -> str:
    """`data.synthetic_train_size` -> `data.synthetic-train-size` (tyro accepts both; we compare one form)."""
    return name.strip().lstrip("-").replace("_", "-")


def load_spec(path: Path) -> Spec:
    """Read and check a sweep YAML (structure only; names are checked against train.py by check_names)."""
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} not found")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep spec {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("parameters"), dict) or not raw["parameters"]:
        raise ConfigError(f"sweep spec {path} needs a `parameters:` mapping")
    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:  # a misspelt `early_terminate:` would otherwise silently run without early termination
        close = difflib.get_close_matches(str(unknown[0]), SPEC_KEYS, n=1)
        raise ConfigError(
            f"sweep spec {path}: unknown key {unknown[0]!r}"
            + (f"; did you mean {close[0]}?" if close else f" (keys: {', '.join(SPEC_KEYS)})")
        )
    method = raw.get("method")
    if method not in SEARCH_METHODS:
        raise ConfigError(f"sweep spec {path}: method must be one of {', '.join(SEARCH_METHODS)}, got {method!r}")
    metric = raw.get("metric")
    if metric is not None:
        if not isinstance(metric, dict) or not metric.get("name"):
            raise ConfigError(
                f"sweep spec {path}: metric needs a name (e.g. metric: {{name: val/best_acc, goal: maximize}})"
            )
        metric = {"name": str(metric["name"]), "goal": str(metric.get("goal", "minimize"))}
        if metric["goal"] not in ("minimize", "maximize"):
            raise ConfigError(f"sweep spec {path}: metric goal must be minimize or maximize, got {metric['goal']!r}")
    early = raw.get("early_terminate")
    if early is not None:
        check_early_terminate(early, metric, path)
    if method == "bayes" and metric is None:
        raise ConfigError(f"sweep spec {path}: method bayes needs a metric")
    params = flatten_parameters(raw["parameters"])
    for name, p in params.items():
        check_parameter(name, p, method, path)
    name = str(raw.get("name") or path.stem)
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    if not name.strip("."):  # "." or "..": the sweep directory would be --out-dir itself or its parent
        raise ConfigError(f"sweep spec {path}: name {name!r} is not a folder name; use letters, digits, - or _")
    return Spec(
        name=name,
        method=method,
        parameters=params,
        metric=metric,
        early_terminate=early,
        fixed_args=command_fixed_args(raw.get("command")),
        raw=raw,
    )


def flatten_parameters(params: dict, prefix: str = "") -> dict[str, dict]:
    """wandb's nested form `{kd: {parameters: {temperature: {...}}}}` becomes `kd.temperature`."""
    out: dict[str, dict] = {}
    for name, p in params.items():
        full = flag_name(f"{prefix}{name}")
        if isinstance(p, dict) and isinstance(p.get("parameters"), dict):
            out.update(flatten_parameters(p["parameters"], f"{full}."))
        elif isinstance(p, dict):
            out[full] = p
        else:
            raise ConfigError(f"parameter {full!r} must be a mapping such as {{value: 4}} or {{values: [2, 4]}}")
    return out


def command_fixed_args(command: Any) -> list[str]:
    """Literal arguments after `${program}` in a wandb `command` list (e.g. `--preset smoke`) are passed to
    every trial; the macros themselves (${env}, ${interpreter}, ${args}, ...) are ours to fill."""
    if not command:
        return []
    if not isinstance(command, list):
        raise ConfigError("`command` must be a list, as in wandb (e.g. [${env}, ${interpreter}, ${program}, ${args}])")
    tokens = [str(t) for t in command]
    start = tokens.index("${program}") + 1 if "${program}" in tokens else len(tokens)
    return [t for t in tokens[start:] if not (t.startswith("${") and t.endswith("}"))]


DISTRIBUTIONS = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform_values",
    "normal",
    "q_normal",
    "log_normal",
    "beta",
)


def distribution(p: dict) -> str:
    """The wandb distribution of a parameter spec, inferred as wandb does when not given."""
    if "distribution" in p:
        return str(p["distribution"])
    if "value" in p:
        return "constant"
    if "values" in p:
        return "categorical"
    if "min" in p and "max" in p:
        ints = all(isinstance(p[k], int) and not isinstance(p[k], bool) for k in ("min", "max"))
        return "int_uniform" if ints else "uniform"
    if "mu" in p or "sigma" in p:
        return "normal"
    return "unknown"


def check_parameter(name: str, p: dict, method: str, path: Path) -> None:
    kind = distribution(p)
    where = f"sweep spec {path}: parameter {name!r}"
    if kind not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where}: unsupported distribution {kind!r} (local runner supports {', '.join(DISTRIBUTIONS)})"
        )
    if kind == "categorical":
        if not isinstance(p.get("values"), list) or not p["values"]:
            raise ConfigError(f"{where}: values must be a non-empty list")
        probs = p.get("probabilities")
        if probs is not None and (len(probs) != len(p["values"]) or abs(sum(probs) - 1) > 1e-6):
            raise ConfigError(f"{where}: probabilities must match values and sum to 1")
    needs = {"constant": ("value",), "categorical": ("values",), "beta": ("a", "b")}.get(
        kind, ("mu", "sigma") if "normal" in kind else ("min", "max")
    )
    if kind not in ("normal", "q_normal", "log_normal") and any(k not in p for k in needs):
        raise ConfigError(f"{where}: distribution {kind} needs {' and '.join(needs)}")
    if "min" in needs and not p["min"] < p["max"]:
        raise ConfigError(f"{where}: min must be < max")
    if kind in ("log_uniform_values", "q_log_uniform_values") and p["min"] <= 0:
        raise ConfigError(f"{where}: {kind} needs min > 0")
    if method == "grid" and kind not in ("constant", "categorical", "int_uniform"):
        raise ConfigError(f"{where}: grid search needs discrete parameters (value, values or int_uniform), got {kind}")


def check_early_terminate(et: Any, metric: dict | None, path: Path) -> None:
    if not isinstance(et, dict) or et.get("type") != "hyperband":
        raise ConfigError(f"sweep spec {path}: early_terminate supports type hyperband only")
    if metric is None:
        raise ConfigError(f"sweep spec {path}: early_terminate needs a metric")
    if "min_iter" not in et and not ("max_iter" in et and "s" in et):
        raise ConfigError(f"sweep spec {path}: hyperband needs min_iter, or max_iter and s")
    if float(et.get("eta", 3)) <= 1:
        raise ConfigError(f"sweep spec {path}: hyperband eta must be > 1")


def check_names(spec: Spec, spec_path: Path) -> None:
    """A typo fails before the first trial, in one short line naming the closest flags (not all ~200)."""
    valid = flag_names(Config())  # every train.py flag in dotted dash form
    names = list(spec.parameters) + [flag_name(a.split("=", 1)[0]) for a in spec.fixed_args if a.startswith("--")]
    for name in names:
        if name in RESERVED:
            raise ConfigError(f"parameter {name!r} in {spec_path} is set by sweep.py for every trial; remove it")
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown parameter {name!r} in {spec_path}{hint} (python train.py --help lists every flag)"
            )
