"""Tiny checkpoints in every supported layout, built in tmp directories (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

LABELS = ["cat", "dog", "bird", "fish", "frog"]
MEAN = (0.45, 0.4, 0.5)
STD = (0.25, 0.3, 0.2)


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Replace every parameter with seeded noise, LayerNorm gains around 1, so that any mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            is_norm_gain = p.ndim == 1 and name.endswith("weight") and "norm" in name
            p.copy_(1.0 + noise if is_norm_gain else noise)


def make_hf(
    directory: Path,
    *,
    bare: bool = False,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    image: int = 32,
    patch: int = 8,
    eps: float = 1e-12,
    seed: int = 0,
    preprocessor: bool = True,
):
    """Save a random transformers ViT (classifier, or a bare ViTModel with its pooler) and return the model."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        image_size=image,
        patch_size=patch,
        layer_norm_eps=eps,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    model = transformers.ViTModel(cfg) if bare else transformers.ViTForImageClassification(cfg)
    randomise_(model, seed)
    model.eval()
    model.save_pretrained(directory)
    if preprocessor:
        (directory / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_processor_type": "ViTImageProcessor",
                    "do_resize": True,
                    "size": {"height": image, "width": image},
                    "resample": 2,
                    "do_rescale": True,
                    "rescale_factor": 1 / 255,
                    "do_normalize": True,
                    "image_mean": list(MEAN),
                    "image_std": list(STD),
                }
            )
        )
    return model


def hf_to_timm_reference(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse mapping, written out independently of vitkit: transformers ViT keys -> timm keys."""
    out, qkv = {}, {}
    for key, v in hf_state.items():
        k = key.removeprefix("vit.")
        if k.startswith("pooler."):
            continue
        simple = {
            "embeddings.cls_token": "cls_token",
            "embeddings.position_embeddings": "pos_embed",
            "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
            "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            "layernorm.weight": "norm.weight",
            "layernorm.bias": "norm.bias",
            "classifier.weight": "head.weight",
            "classifier.bias": "head.bias",
        }
        if k in simple:
            out[simple[k]] = v
            continue
        parts = k.split(".")  # encoder.layer.{i}.<rest> (what save_pretrained writes)
        assert parts[:2] == ["encoder", "layer"], k
        i, rest = parts[2], ".".join(parts[3:])
        if rest.startswith("attention.attention."):
            name, kind = parts[-2], parts[-1]
            qkv.setdefault((i, kind), {})[name] = v
            continue
        rename = {
            "layernorm_before": "norm1",
            "layernorm_after": "norm2",
            "attention.output.dense": "attn.proj",
            "intermediate.dense": "mlp.fc1",
            "output.dense": "mlp.fc2",
        }
        module, kind = rest.rsplit(".", 1)
        out[f"blocks.{i}.{rename[module]}.{kind}"] = v
    for (i, kind), p in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([p["query"], p["key"], p["value"]])
    return out


def hf_file_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def image_batch(astronaut: np.ndarray, size: int, mean=MEAN, std=STD) -> torch.Tensor:
    """The astronaut photo resized to size x size, scaled to 0..1 and normalised: (1, 3, size, size)."""
    from PIL import Image

    img = Image.fromarray(astronaut).resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x[None]


class Lines(list):
    """A `log` callback that keeps the lines, for asserting on what was reported."""

    def __call__(self, msg: str) -> None:
        self.append(msg)

    def text(self) -> str:
        return "\n".join(self)


@pytest.fixture
def lines() -> Lines:
    return Lines()


@pytest.fixture(scope="session")
def hf_cls(tmp_path_factory):
    """(directory, model): a 64-wide, 2-block, 4-head ViTForImageClassification at 32 px, patch 8, 5 labels."""
    d = tmp_path_factory.mktemp("hf_cls")
    return d, make_hf(d)


@pytest.fixture(scope="session")
def hf_bare(tmp_path_factory):
    """(directory, model): the same size as a bare ViTModel, pooler included, no preprocessor config."""
    d = tmp_path_factory.mktemp("hf_bare")
    return d, make_hf(d, bare=True, seed=1, preprocessor=False)


@pytest.fixture(scope="session")
def hf_nano(tmp_path_factory):
    """(directory, model): the shapes of vit_nano_patch4_32 (128 wide, 6 blocks, 4 heads), LayerNorm eps 1e-6."""
    d = tmp_path_factory.mktemp("hf_nano")
    return d, make_hf(d, hidden=128, layers=6, heads=4, intermediate=512, patch=4, eps=1e-6, seed=2)


@pytest.fixture(scope="session")
def hf_head64(tmp_path_factory):
    """(directory, model): 128 wide with 2 heads of 64 (what the embed_dim // 64 guess assumes), eps 1e-6."""
    d = tmp_path_factory.mktemp("hf_head64")
    return d, make_hf(d, hidden=128, layers=2, heads=2, intermediate=256, eps=1e-6, seed=3)
