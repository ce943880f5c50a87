"""Test-wide settings: no network, no wandb, small thread count (2-core CI machines)."""

import os
import tempfile

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KD_TEST", "1")
# extracted archives and decoded images of the tests go to a temp dir, never to ~/.cache/kd
os.environ.setdefault("KD_CACHE_DIR", tempfile.mkdtemp(prefix="kd-test-cache-"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: tiny tensors and convs only pay synchronisation (and OpenMP
    spin-waiting) for more on a busy 2-core box, ~10x. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
