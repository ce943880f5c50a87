"""Whether and how to talk to wandb, decided without importing wandb (slow to import; kd/ never needs it):
the mode a run logs in, whether credentials exist, whether the server answers. Shared by train.py and
sweep.py, the only places that import wandb itself."""

from __future__ import annotations

import os
import socket
import re
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

DEFAULT_URL = "https://api.wandb.ai"


def resolve_wandb_mode(mode: str) -> str:
    """auto = WANDB_MODE when set (WANDB_DISABLED=true -> disabled), else online when credentials exist
    (WANDB_API_KEY or a `wandb login` entry in ~/.netrc), else disabled. Explicit modes win."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    if os.environ.get("WANDB_MODE") in ("disabled", "offline", "online"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_credentials_present() else "disabled"


def wandb_credentials_present() -> bool:
    """An API key in the environment or a netrc entry for the wandb host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_URL).hostname or "api.wandb.ai"
    try:
        return host in Path(os.environ.get("NETRC") or Path.home() / ".netrc").read_text()
    except OSError:
        return False


def wandb_server_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the wandb API host opens (online mode only)."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_URL)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s):
            return True
    except OSError:
        return False


# The x-axes of every chart: the global epoch (phase A and B epochs counted alike) and the run-wide step.
WANDB_AXES = ("epoch", "step")


def wandb_keys(row: dict[str, Any], teachers: Sequence[str] = ()) -> dict[str, Any]:
    """A metrics.jsonl row as wandb keys (metrics.jsonl keeps its own): its numbers and strings, with the keys
    of phases other than the student's own training scoped so no chart mixes two phases: stage-0 teacher rows
    under teacher/<arch>/, ASMB phase A and B (Adam vs --optim, two different losses) under asmb_a/ and asmb_b/,
    ASMB stage rows under asmb_stage/, and `teacher<i>` named teacher/<arch> as everywhere else. The axes
    (epoch, step), `phase` and the validation accuracies (distinct names already) keep their names."""
    row = {k: v for k, v in row.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    scope = wandb_scope(str(row.get("phase", "")))

    def key(k: str) -> str:
        if k in (*WANDB_AXES, "phase") or not scope or (scope.startswith("asmb") and k.startswith("val/")):
            return k
        return scope + re.sub(r"teacher(\d+)", lambda m: f"teacher/{_name(teachers, int(m.group(1)))}", k)

    return {key(k): v for k, v in row.items()}


def wandb_scope(phase: str) -> str:
    if phase.startswith("teacher:"):
        return f"teacher/{phase.split(':', 1)[1]}/"
    if phase.startswith(("asmb:A", "asmb:B")):
        return f"asmb_{phase[5].lower()}/"
    return "asmb_stage/" if phase == "asmb:stage" else ""


def _name(teachers: Sequence[str], i: int) -> str:
    return teachers[i] if i < len(teachers) else str(i)


def wandb_config(config: dict[str, Any], method: str, method_groups: Sequence[str]) -> dict[str, Any]:
    """The run's config for wandb: every common group and the chosen method's group only."""
    return {k: v for k, v in config.items() if k not in method_groups or k == method}
