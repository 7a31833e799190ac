import pytest
import torch
from torch import nn

from vitkit.models.vit import VisionTransformer, ViTConfig

XSS = "<img src=x onerror=alert(1)>"


def make_model(**kw) -> VisionTransformer:
    """A 2-block ViT on 32 x 48 images (8 px patches, a 4 x 6 grid) with two registers and peaked attention."""
    cfg = dict(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4, reg_tokens=2)
    model = VisionTransformer(ViTConfig(**{**cfg, **kw}))
    for blk in model.blocks:
        nn.init.normal_(blk.attn.qkv.weight, std=0.5)  # peaked attention, so different patches look different
    if model.pos_embed is not None:
        nn.init.normal_(model.pos_embed, std=1.0)
    model.preprocess.crop_fraction = 1.0
    model.preprocess.class_names = ["circle", "square", XSS, "star"]
    return model.eval()


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def image():
    """A uint8 (H, W, 3) image at the model's input size with a bright square in it."""
    g = torch.Generator().manual_seed(1)
    img = (torch.rand(32, 48, 3, generator=g) * 80).to(torch.uint8)
    img[8:20, 16:32] = 230
    return img.numpy()
