import os

import pytest
import torch

# Deterministic, small thread count: CI has 2 cores and tests must not fight each other.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def astronaut():
    """A real RGB photograph, uint8 (512, 512, 3)."""
    from skimage import data

    return data.astronaut()
