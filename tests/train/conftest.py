"""Shared helpers for the training tests: tiny models, tiny configs, and running `python -m vitkit` as a process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from vitkit.data.dataset import ImageDataset

# A 2-block, 32-wide ViT on 8x8 digits (2x2 patches of 4 px): a training step takes milliseconds.
TINY_MODEL_ARGS = {"depth": 2, "embed_dim": 32, "num_heads": 2}
TINY = {
    "data": "digits",
    "model": "vit_nano_patch4_32",
    "model_args": TINY_MODEL_ARGS,
    "img_size": 8,
    "batch_size": 32,
    "epochs": 2,
    "lr": 2e-3,
    "warmup_epochs": 0.5,
    "crop_fraction": 1.0,
    "scale": [0.5, 1.0],
    "hflip": 0.0,
    "progress": False,
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the 2 shared cores are oversubscribed by parallel test jobs, and OpenMP's spinning
    threads then make tiny models many times slower than a single thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Subprocesses use one thread: results are then bit-identical from run to run on this machine, and the tests do
# not oversubscribe the 2 cores they share.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny_model(num_classes: int = 10, **overrides) -> torch.nn.Module:
    return vitkit.create_model(
        "vit_nano_patch4_32", num_classes=num_classes, img_size=8, **{**TINY_MODEL_ARGS, **overrides}
    )


def toy_dataset(n: int = 96, num_classes: int = 2, size: int = 8, seed: int = 0) -> ImageDataset:
    """A trivially separable dataset: class k is a noisy image of brightness level k."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    step = 200 // max(num_classes - 1, 1)
    images = torch.randint(0, 50, (n, 3, size, size), generator=g) + (labels * step).view(-1, 1, 1, 1)
    return ImageDataset(labels=labels, class_names=[f"c{k}" for k in range(num_classes)], images=images.to(torch.uint8))


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def vitkit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitkit", *args]


def run_vitkit(*args: str, cwd: str | Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        vitkit_cmd(*args), env=SUBPROCESS_ENV, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write a YAML recipe with the TINY settings (plus extras) and return its path."""
    import yaml

    def write(**extra) -> Path:
        path = tmp_path / f"recipe_{len(list(tmp_path.glob('recipe_*')))}.yaml"
        path.write_text(yaml.safe_dump({**TINY, **extra}))
        return path

    return write
