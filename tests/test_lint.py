"""The tree passes ruff (pyproject.toml [tool.ruff]): its lint rules (pyflakes and pycodestyle's errors: no
undefined or unused names, no imports below code except train.py's --help fast path) and its formatter (every
file as `ruff format` writes it, line length 120)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check", "--output-format", "concise"], ["format", "--check"]])
def test_ruff_passes(command):
    out = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
