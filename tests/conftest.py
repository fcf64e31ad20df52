"""Test-session settings: one torch thread (tiny models run faster without OpenMP hand-offs, and the suite behaves
the same on a busy 2-core machine) and warnings from dgemma's own logger kept quiet."""

import logging

import pytest
import torch

torch.set_num_threads(1)
logging.getLogger("dgemma").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts with one thread, even after one that changed it (e.g. a CLI's --threads)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
