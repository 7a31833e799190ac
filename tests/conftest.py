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
def _cpu_without_native_bf16(monkeypatch):
    """What depends on native bf16 (int8's mixed_bf16=None default, bf16 attention as three ops, the trainer's
    amp='bf16' warning) follows `vitkit.cpu.has_native_bf16`; CI machines differ, so tests see a CPU without it
    unless they say otherwise (`native_bf16` below)."""
    monkeypatch.setattr(importlib.import_module("vitkit.cpu"), "NATIVE_BF16", False)


@pytest.fixture
def native_bf16(monkeypatch):
    """The test sees a CPU with native bf16 (AVX-512-bf16 or AMX)."""
    monkeypatch.setattr(importlib.import_module("vitkit.cpu"), "NATIVE_BF16", True)


@pytest.fixture(scope="session")
def astronaut():
    """A real RGB photograph, uint8 (512, 512, 3)."""
    from skimage import data

    return data.astronaut()
