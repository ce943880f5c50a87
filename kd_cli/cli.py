"""Command-line helpers of a dataclass config (no torch, no parser library): boolean spellings, loading a saved
config.json under the command line, a --help focused on one method's group, and run names that say what ran.
They take the config class or instance explicitly, so any script with a nested-dataclass config can use them."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import time
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from kd.errors import ConfigError, first_line

TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def bool_flags(cfg_type: type, prefix: str = "--") -> set[str]:
    """Every boolean flag of a nested config dataclass, with dashes and with underscores (`--run.channels-last`,
    `--run.channels_last`): the parser accepts both."""
    flags: set[str] = set()
    hints = typing.get_type_hints(cfg_type)
    for f in dataclasses.fields(cfg_type):
        hint, name = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(hint):
            flags |= bool_flags(hint, name + ".")
        elif hint is bool:
            flags |= {name, prefix + f.name.replace("_", "-")}
    return flags


def normalize_booleans(argv: Sequence[str], flags: set[str]) -> list[str]:
    """argv with every boolean flag's value spelled True/False: true/false in any case, 1/0, yes/no, on/off are
    accepted (`--data.aug false`, `--data.aug=NO`); other values pass through for the parser to reject."""
    out = list(argv)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if name not in flags:
            continue
        if eq:
            out[i] = f"{name}={_bool_word(value)}"
        elif i + 1 < len(out):
            out[i + 1] = _bool_word(out[i + 1])
    return out


def _bool_word(value: str) -> str:
    low = value.strip().lower()
    return "True" if low in TRUE_WORDS else "False" if low in FALSE_WORDS else value


def pop_option(argv: Sequence[str], option: str) -> tuple[str | None, list[str]]:
    """(value of `option VALUE` / `option=VALUE`, argv without it); (None, argv) when absent."""
    rest, value, skip = [], None, False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == option:
            if i + 1 >= len(argv):
                raise ConfigError(f"{option} needs a value")
            value, skip = argv[i + 1], True
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return value, rest


def load_config_json(path: str | Path, base: Any, parse: Callable[[str], Any] = json.loads, kind: str = "JSON") -> Any:
    """`base` (a config dataclass instance) with the values of a saved config.json (a run's, or any subset of
    its keys; a run directory means its config.json) put over it; an unknown key or a missing/unreadable file
    is a ConfigError. `parse` reads another format of the same mapping (the caller's YAML reader, `kind`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        saved = parse(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except Exception as e:  # OSError, or the parser's own error type for malformed text
        raise ConfigError(f"--config {path}: not a readable {kind} config ({first_line(e)})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--config {path}: expected a {kind} mapping of config groups")
    return _overlay(base, saved, f"--config {path}", "")


def _overlay(obj: Any, values: dict[str, Any], where: str, prefix: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    changes = {}
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown option {prefix}{key}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {prefix}{key} must be a group of options")
            changes[key] = _overlay(current, value, where, f"{prefix}{key}.")
        else:
            changes[key] = tuple(value) if isinstance(value, list) and "tuple" in str(hints[key]) else value
    return dataclasses.replace(obj, **changes)


def focused_config(cfg_type: type, keep: str, groups: Sequence[str], hide: Callable[[Any], Any]) -> type:
    """A subclass of `cfg_type` whose fields in `groups` other than `keep` are wrapped by `hide` (e.g. the
    parser's suppress marker): `--method X --help` then lists the common groups and X's only. The field
    docstrings stay those of `cfg_type` (the parser reads them through the base class)."""
    hints = typing.get_type_hints(cfg_type, include_extras=True)
    namespace: dict[str, Any] = {
        "__annotations__": {},
        "__module__": cfg_type.__module__,
        "__qualname__": cfg_type.__qualname__,
        "__doc__": cfg_type.__doc__,
    }
    for f in dataclasses.fields(cfg_type):
        if f.name in groups and f.name != keep:
            namespace["__annotations__"][f.name] = hide(hints[f.name])
            namespace[f.name] = dataclasses.field(default_factory=f.default_factory)
    return dataclasses.dataclass(type(cfg_type.__name__, (cfg_type,), namespace))


def run_name(
    method: str, student: str, teachers: Sequence[str], dataset: str, when: float | None = None, seed: int | None = None
) -> str:
    """A run directory name that says what ran: `kd-resnet8-from-resnet32x4-cifar100-s0-20250101-120000`; a
    teacher run is named after its teachers (`teacher-resnet20+wrn_16_2-cifar100-...`), a ce run after its
    student. The seed is in it so that the seeds of a study started in the same second get their own names."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    if method == "teacher":
        what = "+".join(teachers)
    elif method == "ce" or not teachers:
        what = student
    else:
        what = f"{student}-from-{'+'.join(teachers)}"
    seeded = "" if seed is None else f"-s{seed}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", f"{method}-{what}-{dataset}{seeded}-{stamp}")


def first_message(tyro_error: str) -> str:
    """tyro reports a bad value in a box (on stderr): keep its message (the lines before the first rule)."""
    lines = []
    for raw in tyro_error.splitlines():
        line = raw.strip().strip("│╭╮╰╯").strip()
        if raw.lstrip().startswith("╭"):
            continue  # the box title ("Invalid choice"): the message below says it better
        if line.startswith("─") or not line:
            if lines:
                break
            continue
        lines.append(line)
    return " ".join(lines) or "invalid command line (see --help)"


def unknown_flag_message(unknown: list[str], valid: list[str]) -> str:
    """One line for flags the parser does not know (`valid`: flag_names of the config), suggesting the flags they
    most likely meant: the same field in another group (`--lr` -> `--optim.lr`), else the closest spellings."""
    name = next((a.split("=", 1)[0] for a in unknown if a.startswith("-")), unknown[0])
    field_name = name.lstrip("-").replace("_", "-")
    close = [f for f in valid if f.rsplit(".", 1)[-1] == field_name.rsplit(".", 1)[-1]] or difflib.get_close_matches(
        field_name, valid, n=3, cutoff=0.6
    )
    return f"unrecognized option {name}" + (
        f"; did you mean {' or '.join('--' + f for f in close)}?" if close else " (see --help)"
    )


def flag_names(cfg: Any, prefix: str = "") -> list[str]:
    """Every flag of a config dataclass in its dotted dash form (`optim.lr`, `kd.ce-weight`)."""
    names = []
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), prefix + f.name.replace("_", "-")
        names += flag_names(value, name + ".") if dataclasses.is_dataclass(value) else [name]
    return names
