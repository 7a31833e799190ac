import importlib
import os

import pytest
import torch

# Deterministic, small thread count: CI has 2 cores and tests must not fight each other.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _int8_mixed_bf16_off_by_default(monkeypatch):
    """int8's mixed_bf16=None ("auto") turns mixed bf16 on where the CPU has native bf16; CI machines differ, so
    tests see a CPU without it unless they say otherwise (tests/deploy/test_quantize.py tests the auto choice)."""
    # The module, not `vitkit.deploy.quantize` by name: the package exports a function of that name.
    monkeypatch.setattr(importlib.import_module("vitkit.deploy.quantize"), "has_native_bf16", lambda: False)


@pytest.fixture(scope="session")
def astronaut():
    """A real RGB photograph, uint8 (512, 512, 3)."""
    from skimage import data

    return data.astronaut()
