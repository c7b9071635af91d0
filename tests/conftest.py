"""Shared test set-up: one CPU thread (the machine is shared), a seeded generator, offline hub."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed: every random input in a test comes from it."""
    g = torch.Generator()
    g.manual_seed(1234)
    return g
