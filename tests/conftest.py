"""Test-wide settings: no network, no wandb, small thread count (2-core CI machines)."""

import os
import tempfile

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KD_TEST", "1")
# extracted archives and decoded images of the tests go to a temp dir, never to ~/.cache/kd
os.environ.setdefault("KD_CACHE_DIR", tempfile.mkdtemp(prefix="kd-test-cache-"))
