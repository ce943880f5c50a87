"""The tree passes ruff's lint rules (pyproject.toml [tool.ruff.lint]: pyflakes and pycodestyle's errors):
no undefined or unused names, no imports below code except train.py's --help fast path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_lint_passes():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
