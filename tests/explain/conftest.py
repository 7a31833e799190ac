import pytest
import torch
from torch import nn

from vitkit.models.detr import ViTDETR
from vitkit.models.segmentation import ViTSegmentation
from vitkit.models.vit import VisionTransformer, ViTConfig

# Small models covering every token layout: class + registers, class + distillation + register, no class token.
# The input is non-square (32 x 48 with 8 px patches -> a 4 x 6 grid) so rows and columns cannot be confused.
LAYOUTS = {
    "registers": dict(reg_tokens=2),
    "distilled": dict(distilled=True, reg_tokens=1),
    "pooled": dict(class_token=False, pool="avg", reg_tokens=1),
}
H, W, PATCH = 32, 48, 8


def make_model(layout: str = "registers", depth: int = 2, **kw) -> VisionTransformer:
    base = dict(img_size=(H, W), patch_size=PATCH, embed_dim=32, depth=depth, num_heads=2, num_classes=5)
    cfg = ViTConfig(**{**base, **LAYOUTS[layout], **kw})
    model = VisionTransformer(cfg)
    # The 0.02 init gives near-uniform attention, which would let a wrong token index pass unnoticed; bigger
    # q/k weights and positions make every row of every map distinct.
    for blk in model.blocks:
        nn.init.normal_(blk.attn.qkv.weight, std=0.5)
    nn.init.normal_(model.pos_embed, std=1.0)
    return model.eval()


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request):
    return request.param


@pytest.fixture
def model(layout):
    return make_model(layout)


@pytest.fixture
def images():
    return torch.randn(3, 3, H, W)


# Dense models on a 2-block ViT with 8 px patches (tests/explain/test_dense.py, tests/viz/test_explorer.py).
BACKBONE = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def _peaked(model: nn.Module) -> nn.Module:
    """Bigger q/k weights than the 0.02 init, so attention differs from patch to patch and image to image."""
    torch.manual_seed(0)
    for blk in model.backbone.blocks:
        nn.init.normal_(blk.attn.qkv.weight, std=0.5)
    nn.init.normal_(model.backbone.pos_embed, std=1.0)
    return model.eval()


def seg_model(head: str = "linear") -> nn.Module:
    torch.manual_seed(0)
    model = ViTSegmentation("vit_nano_patch4_32", 3, head=head, backbone_args=BACKBONE, decoder_depth=1)
    _peaked(model)
    nn.init.normal_(model.head.proj.weight if head == "linear" else model.head.cls_emb, std=1.0)  # varied masks
    return model


def detr_model() -> nn.Module:
    torch.manual_seed(0)
    model = ViTDETR("vit_nano_patch4_32", 2, backbone_args=BACKBONE, hidden_dim=32, dec_layers=2, dec_heads=2,
                    dec_ffn_dim=64, num_queries=5)  # fmt: skip
    return _peaked(model)
