"""Grad-CAM against an independent computation, for a CNN and for ViTs (tokens, prefix tokens, non-square)."""

import pytest
import torch
from torch import nn

import vitkit
from vitkit.explain import explain
from vitkit.explain.gradcam import default_gradcam_layer, grad_cam


class TinyCnn(nn.Module):
    """A CNN honouring the parts of the contract Grad-CAM reads: conv features, global average pool, linear head."""

    model_name = "tiny_cnn"

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1))
        self.head = nn.Linear(6, classes)
        self.feature_info = [{"num_chs": 6, "reduction": 2, "module": "features.2"}]

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_gradcam_of_a_pooled_cnn_is_the_class_activation_map():
    # With global average pooling and a linear head, dy/dA_c = w_c / (H W) everywhere, so Grad-CAM equals CAM
    # (Zhou et al. 2016): relu(sum_c w_c A_c) / (H W). Computed here without gradients.
    torch.manual_seed(0)
    model = TinyCnn().eval()
    x = torch.randn(3, 3, 12, 20)
    target = torch.tensor([0, 2, 3])
    cam = grad_cam(model, x, target=target)
    with torch.no_grad():
        a = model.features(x)  # (B, 6, 6, 10)
        w = model.head.weight[target]  # (B, 6)
        ref = torch.relu(torch.einsum("bc,bchw->bhw", w, a)) / (a.shape[2] * a.shape[3])
    assert cam.shape == (3, 6, 10)
    torch.testing.assert_close(cam, ref, rtol=1e-5, atol=1e-7)


def test_gradcam_on_vits_reads_patch_tokens_and_depends_on_the_target():
    model = vitkit.create_model("vit_tiny_patch16_224", embed_dim=32, depth=3, num_heads=2, img_size=(32, 48),
                                num_classes=5).eval()  # fmt: skip
    assert default_gradcam_layer(model) == -2  # class-token head: the last block's patch tokens get no gradient
    x = torch.randn(2, 3, 32, 48)
    cams = [grad_cam(model, x, target=t) for t in (0, 1)]
    assert cams[0].shape == (2, 2, 3) and (cams[0] >= 0).all()
    assert not torch.allclose(cams[0], cams[1])
    # The last block of a class-token ViT gives all-zero maps, the reason for the default.
    assert grad_cam(model, x, target=0, layer=-1).abs().max() == 0
    # Independent: weights from the gradient of the target logit w.r.t. block 1's output, by a plain hook.
    out = {}
    h = model.blocks[1].register_forward_hook(lambda m, i, o: out.setdefault("a", o))
    logits = model(x)
    h.remove()
    (g,) = torch.autograd.grad(logits[:, 0].sum(), out["a"])
    a = out["a"][:, 1:].detach().reshape(2, 2, 3, 32).permute(0, 3, 1, 2)  # (B, D, 2, 3)
    g = g[:, 1:].reshape(2, 2, 3, 32).permute(0, 3, 1, 2)
    ref = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1))
    torch.testing.assert_close(cams[0], ref, rtol=1e-5, atol=1e-7)
    up = explain(model, x, method="gradcam", target=0)
    assert up.shape == (2, 32, 48)


def test_gradcam_errors_name_the_problem():
    model = vitkit.create_model("vit_tiny_patch16_224", embed_dim=32, depth=2, num_heads=2, img_size=32).eval()
    with pytest.raises(ValueError, match=r"layer=5 is out of range for 2 stages \(use -2..1\)"):
        grad_cam(model, torch.randn(1, 3, 32, 32), layer=5)
    plain = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    with pytest.raises(TypeError, match="Grad-CAM needs feature_info .*; Sequential has none"):
        grad_cam(plain, torch.randn(1, 3, 8, 8))
