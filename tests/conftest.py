"""Test-wide settings: no network, no wandb, small thread count (2-core CI machines)."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KD_TEST", "1")
