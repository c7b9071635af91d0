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


@pytest.fixture(params=["native", "torch"], scope="module")
def core_path(request):
    """Run a module's tests twice: with the core's native CPU kernels, and on the torch path (what CUDA runs).

    The native kernels must build on the test machine (a C compiler is part of the set-up): a failed build
    fails the "native" run instead of silently testing the torch path twice. FLOWRL_NATIVE is set as well, for
    the processes a test spawns."""
    from flowrl.core.kernels import native

    old = os.environ.get("FLOWRL_NATIVE")
    os.environ["FLOWRL_NATIVE"] = "1" if request.param == "native" else "0"
    try:
        with native.enabled(request.param == "native"):
            yield request.param
    finally:
        if old is None:
            os.environ.pop("FLOWRL_NATIVE", None)
        else:
            os.environ["FLOWRL_NATIVE"] = old


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """A tiny SD3 (the real diffusers classes, random weights) saved as a diffusers folder, once per test module."""
    from flowrl.pipelines.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("sd3"))
