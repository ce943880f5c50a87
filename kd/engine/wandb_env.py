"""Whether and how to talk to wandb, decided without importing wandb (slow to import; kd/ never needs it):
the mode a run logs in, whether credentials exist, whether the server answers. Shared by train.py and
sweep.py, the only places that import wandb itself."""

from __future__ import annotations

import os
import socket
from pathlib import Path
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
