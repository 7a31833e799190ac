"""Every tool works for every family in the registry, or says by name (family and reason) why not.

One tiny model per family (the first registered variant, shrunk through `create_model` overrides); a family added
to the registry is picked up here and fails until it gets a tiny config in `TINY`.
"""

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data.shapes import SHAPE_CLASSES, make_shapes
from vitkit.explain import METHODS, explain
from vitkit.models.registry import create_model, list_models, model_family

matplotlib.use("Agg")

FAMILIES: dict[str, str] = {}
for _name in list_models():
    FAMILIES.setdefault(model_family(_name), _name)

SIDE = 64  # native input of every tiny model; explain also runs on a non-square 48 x 64 batch
TINY = {
    "vit": dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
    "swin": dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=2),
    "convnext": dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
    "resnet": dict(depths=(1, 1, 1, 1), widths=(4, 8, 8, 16), stem_width=8),
    "deit": dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
    "resnetv2": dict(depths=(1, 1, 1), widths=(16, 16, 32), stem_width=8, gn_groups=4),
    "vit_hybrid": dict(
        embed_dim=32,
        depth=2,
        num_heads=2,
        backbone_args={"depths": (1, 1, 1), "widths": (16, 16, 32), "stem_width": 8, "gn_groups": 4},
    ),
    "vit_hybrid_cnn": dict(embed_dim=32, depth=2, num_heads=2),
}
# What each known family supports (None = every method). Anything else must raise a ValueError naming the family.
METHOD_SUPPORT = {
    "vit": None,
    "deit": None,
    "vit_hybrid": None,
    "vit_hybrid_cnn": None,
    "swin": {"attention", "gradcam"},
    "convnext": {"gradcam"},
    "resnet": {"gradcam"},
    "resnetv2": {"gradcam"},
}
GLOBAL_ATTENTION = {
    "vit",
    "deit",
    "vit_hybrid",
    "vit_hybrid_cnn",
}  # the explorer, the attention grid and the layer x head figures need it
# Figures a global-attention family refuses: a hybrid's patch projection reads CNN feature maps, not pixels.
REFUSED_FIGURES = {("vit_hybrid", "filters"), ("vit_hybrid_cnn", "filters")}


def tiny_model(family: str) -> torch.nn.Module:
    if family not in TINY:
        pytest.fail(f"family {family!r} ({FAMILIES[family]}) has no tiny config: add one to TINY in {__file__}")
    torch.manual_seed(0)
    model = create_model(FAMILIES[family], img_size=SIDE, num_classes=len(SHAPE_CLASSES), **TINY[family]).eval()
    model.preprocess.class_names = list(SHAPE_CLASSES)
    return model


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


def _refused_by_name(error: BaseException, family: str) -> None:
    message = str(error)
    assert f"family {family}" in message, message
    assert "need" in message, message  # says what the tool needs, not only that it failed


def _supports(family: str, method: str) -> bool | None:
    if family not in METHOD_SUPPORT:
        return None  # a new family: either outcome, but a refusal must name it
    allowed = METHOD_SUPPORT[family]
    return allowed is None or method in allowed


@pytest.mark.parametrize("method", METHODS)
def test_explain_every_method(model, family, method):
    x = torch.randn(2, 3, 48, 64)
    supported = _supports(family, method)
    try:
        maps = explain(model, x, method=method)
    except ValueError as e:
        assert supported is not True, f"{method} should work on {family}: {e}"
        _refused_by_name(e, family)
        return
    assert supported is not False, f"{method} on {family} should refuse by name, but returned maps"
    assert maps.shape == (2, 48, 64) and torch.isfinite(maps).all()
    assert float(maps.std()) > 0  # not a constant placeholder


@pytest.fixture
def saved(model, tmp_path):
    """The tiny model saved as a model dir, and two shapes images as PNG files."""
    model.save_pretrained(tmp_path / "model")
    images, labels, _, _ = make_shapes(len(SHAPE_CLASSES), SIDE, SIDE, seed=0)
    paths = []
    for i in range(2):
        folder = tmp_path / "data" / SHAPE_CLASSES[int(labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{i}.png")
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(paths[-1])
    return tmp_path / "model", paths


def test_predict_and_evaluate(saved):
    from vitkit.train.evaluate import evaluate, predict

    model_dir, paths = saved
    preds = predict(model_dir, paths, topk=2, device="cpu", threads=None)
    assert [p["path"] for p in preds] == [str(p) for p in paths]
    for p in preds:
        assert len(p["top"]) == 2 and 0 < sum(t["prob"] for t in p["top"]) <= 1 + 1e-6
    result = evaluate(model_dir, data=str(paths[0].parent.parent), split="all", device="cpu", threads=None)
    assert result["n"] == 2 and 0 <= result["top1"] <= 1


def test_explorer_and_attention_visualizer(model, family, saved, tmp_path):
    from vitkit.viz import AttentionVisualizer, write_explorer

    _, paths = saved
    viz = AttentionVisualizer(model)
    if family in GLOBAL_ATTENTION:
        page = write_explorer(tmp_path / "page.html", model, paths, layers=[-1], top_k=2, flow=True)
        assert '"flow":[' in page.read_text()
        viz.visualize_layers_heads(paths[0], save_path=tmp_path / "grid.png")
        assert (tmp_path / "grid.png").stat().st_size > 2000
    else:
        with pytest.raises(ValueError) as excinfo:
            write_explorer(tmp_path / "page.html", model, paths)
        _refused_by_name(excinfo.value, family)
        assert not (tmp_path / "page.html").exists()
        with pytest.raises(ValueError) as excinfo:
            viz.visualize_layers_heads(paths[0])
        _refused_by_name(excinfo.value, family)
    viz.visualize_attention(paths[0], method="gradcam", save_path=tmp_path / "cam.png")
    assert (tmp_path / "cam.png").stat().st_size > 2000
    if _supports(family, "attention") is False:
        with pytest.raises(ValueError) as excinfo:
            viz.visualize_attention(paths[0])
        _refused_by_name(excinfo.value, family)
    else:
        fig = viz.visualize_attention(paths[0], layer_idx=-1)
        assert "attention, layer" in fig._suptitle.get_text()


def test_every_visualization(model, family, saved, tmp_path):
    from vitkit.viz.outputs import VISUALIZATIONS, save_visualization

    _, paths = saved
    for kind in VISUALIZATIONS:
        try:
            path = save_visualization(kind, model, tmp_path / "figs", image=paths[0])
        except ValueError as e:
            assert (family, kind) in REFUSED_FIGURES or family not in GLOBAL_ATTENTION, (
                f"visualize {kind} should work on {family}: {e}"
            )
            if family in GLOBAL_ATTENTION:  # a ViT-like model refuses one figure: it names what the figure needs
                assert "hybrid" in str(e).lower() or "need" in str(e), str(e)
            else:
                _refused_by_name(e, family)
            continue
        assert (family, kind) not in REFUSED_FIGURES, f"visualize {kind} on {family} should refuse"
        assert path.stat().st_size > 2000, kind


def test_forward_intermediates_as_maps(model):
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        maps = model.forward_intermediates(x, as_maps=True)
    maps = maps[1] if isinstance(maps, tuple) else maps
    assert len(maps) == len(model.feature_info)
    for m, info in zip(maps, model.feature_info, strict=True):
        assert m.shape[:2] == (2, info["num_chs"]), (m.shape, info)
        for side, got in ((48, m.shape[2]), (64, m.shape[3])):  # padded (ceil) or not (floor), as the family does
            assert got in (side // info["reduction"], -(-side // info["reduction"])), (m.shape, info)


def test_trainer_with_layer_decay_and_freezing(model):
    """The Trainer checks both settings against the model when it is built, then applies them with these two."""
    from vitkit.train import TrainConfig, Trainer, freeze_backbone, param_groups

    Trainer(model, device="cpu", config=TrainConfig(layer_decay=0.75, freeze_layers=1), log=lambda m: None)
    freeze_backbone(model, 1)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not any(model.is_classifier(n) for n in frozen)
    scales = [g["lr_scale"] for g in param_groups(model, 0.05, layer_decay=0.75)]
    assert max(scales) == 1.0 and min(scales) < 1.0


def test_gradient_checkpointing_backward(model):
    x = torch.randn(2, 3, 32, 32)
    model.train()
    reference = torch.autograd.grad(model(x).square().sum(), [p for p in model.parameters()], allow_unused=True)
    model.set_grad_checkpointing(True)
    out = model(x)
    out.square().sum().backward()
    for (name, p), ref in zip(model.named_parameters(), reference, strict=True):
        if ref is None:
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_bf16_forward(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert np.corrcoef(out.float().flatten().numpy(), ref.flatten().numpy())[0, 1] > 0.9
