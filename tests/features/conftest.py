"""Shared fixtures for the features tests: a tiny saved model and a small folder of distinct images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.models.vit import VisionTransformer, ViTConfig
from vitkit.weights import save_pretrained

CLASSES = ("dark", "light")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the shared cores are oversubscribed by parallel jobs, and tiny models run fastest so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vit(embed_dim: int = 16, num_classes: int = 10, seed: int = 0) -> VisionTransformer:
    """A 1-block ViT on 16 x 16 inputs (4 px patches)."""
    torch.manual_seed(seed)
    cfg = ViTConfig(img_size=(16, 16), patch_size=4, embed_dim=embed_dim, depth=1, num_heads=2, num_classes=num_classes)
    model = VisionTransformer(cfg).eval()
    model.preprocess.input_size = (16, 16)
    model.preprocess.crop_fraction = 1.0
    return model


def write_png(path, seed: int, level: int = 0, size: int = 20) -> None:
    """A noise image (distinct per seed) around brightness `level`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(np.clip(rng.integers(0, 80, (size, size + 4, 3)) + level, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture
def model_dir(tmp_path):
    """The tiny ViT saved as a model directory, recording digits as its training data."""
    save_pretrained(tiny_vit(), tmp_path / "model", training={"data": "digits", "seed": 0})
    return tmp_path / "model"


@pytest.fixture
def image_folder(tmp_path):
    """tmp/images/{dark,light}/{0..3}.png: 8 distinct images in 2 class subfolders."""
    root = tmp_path / "images"
    for k, name in enumerate(CLASSES):
        for i in range(4):
            write_png(root / name / f"{i}.png", seed=10 * k + i, level=150 * k)
    return root
