"""Every figure: returns a Figure with the expected axes, saves a non-empty PNG, refuses bad input by name."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from tests.viz.conftest import make_model
from vitkit.data.transforms import TrainTransform
from vitkit.explain import mean_attention_distance
from vitkit.viz import (
    AttentionVisualizer,
    compare_receptive_fields,
    plot_attention_distance,
    plot_attention_grid,
    plot_attention_overlay,
    plot_augmentations,
    plot_patch_embedding_filters,
    plot_patch_grid,
    plot_position_embedding_similarity,
    plot_topk,
    uniform_attention_distance,
    visualize_patch_embedding,
)


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    with Image.open(path) as img:
        assert img.width > 100 and img.height > 100


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def test_patch_grid(tmp_path, image):
    fig = plot_patch_grid(image, 8, save_path=tmp_path / "p.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert "4x6 = 24 tokens" in fig.axes[0].get_title()
    assert len(fig.axes[0].lines) == 3 + 5  # inner grid lines: 3 horizontal, 5 vertical
    check_png(tmp_path / "p.png")
    assert len(visualize_patch_embedding(Image.fromarray(image), 8).axes) == 2
    with pytest.raises(ValueError, match="image width 48 is not a multiple of patch size 32"):
        plot_patch_grid(image, 32)


def test_filters(tmp_path, model):
    fig = plot_patch_embedding_filters(model, num_components=10, save_path=tmp_path / "f.png")
    assert len(image_axes(fig)) == 10
    assert fig.axes[0].get_title().startswith("PC1")
    check_png(tmp_path / "f.png")


@pytest.mark.parametrize(
    ("name", "args", "part"),
    [
        ("vit_hybrid_cnn_tiny_s4_32", dict(embed_dim=32, depth=1, num_heads=2), "stem"),
        ("vit_base_r50_s16_224", dict(embed_dim=32, depth=1, num_heads=2, img_size=32, backbone="resnet18",
                                      backbone_args=dict(widths=(8, 8, 8, 8), stem_width=8)), "backbone"),
    ],
)  # fmt: skip
def test_filters_refuse_hybrids_whose_projection_reads_feature_maps(name, args, part):
    """A hybrid's patch_embed.proj is a 1x1 convolution over CNN channels: drawn as 'filters' it gave a grid of
    black squares; it is refused by name instead."""
    from vitkit.explain._common import UnsupportedModelError
    from vitkit.models import create_model

    model = create_model(name, **args)
    with pytest.raises(UnsupportedModelError, match=rf"family vit_hybrid.*feature map of its CNN {part}"):
        plot_patch_embedding_filters(model)


@pytest.mark.parametrize("pos", ["learn", "sincos"])
def test_position_similarity_non_square(tmp_path, pos):
    model = make_model(pos_embed=pos)
    fig = plot_position_embedding_similarity(model, save_path=tmp_path / "s.png")
    assert len(fig.axes) == 2  # the mosaic and its colorbar
    mosaic = fig.axes[0].images[0].get_array()
    assert mosaic.shape == (4 * 5 - 1, 6 * 7 - 1)  # 4 x 6 cells of 4 x 6 maps with 1 px gaps
    assert np.isclose(mosaic[0, 0], 1.0) and np.isclose(mosaic[5 + 1, 7 * 3 + 3], 1.0)  # self-similarity of cell (1, 3)
    check_png(tmp_path / "s.png")
    with pytest.raises(ValueError, match="no position embedding"):
        plot_position_embedding_similarity(make_model(pos_embed="none"))


def test_attention_overlay(tmp_path, image):
    sal = torch.rand(4, 6)
    fig = plot_attention_overlay(image, sal, title="t", save_path=tmp_path / "o.png")
    assert len(image_axes(fig)) == 3
    heat = fig.axes[2].images[1].get_array()
    assert heat.shape == (32, 48) and heat.min() == 0 and heat.max() == 1
    check_png(tmp_path / "o.png")


def test_attention_grid(tmp_path, model, image):
    fig = plot_attention_grid(model, image, save_path=tmp_path / "g.png")
    assert len(fig.axes) == 2 * (2 + 1)  # layers x (heads + mean)
    assert fig.axes[0].get_title() == "head 0" and fig.axes[2].get_title() == "mean"
    assert fig.axes[3].get_ylabel() == "layer 1"
    check_png(tmp_path / "g.png")


def test_topk(tmp_path, model):
    probs = torch.tensor([0.05, 0.6, 0.2, 0.15])
    fig = plot_topk(probs, model.preprocess.class_names, k=3, save_path=tmp_path / "k.png")
    ticks = sorted(fig.axes[0].get_yticklabels(), key=lambda t: -t.get_position()[1])
    assert [t.get_text() for t in ticks] == ["square", "<img src=x onerror=alert(1)>", "star"]  # best at the top
    widths = sorted((p.get_y(), p.get_width()) for p in fig.axes[0].patches)
    np.testing.assert_allclose([w for _, w in widths], [0.15, 0.2, 0.6], rtol=1e-6)
    check_png(tmp_path / "k.png")
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        plot_topk(probs, ["a", "b", "c"])


def test_augmentations(tmp_path, image):
    t = TrainTransform((32, 48), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), scale=(0.3, 1.0))
    fig = plot_augmentations(image, t, n=5, save_path=tmp_path / "a.png")
    shown = image_axes(fig)
    assert len(shown) == 6
    assert np.array_equal(shown[0].images[0].get_array(), image)
    assert not np.array_equal(shown[1].images[0].get_array(), shown[2].images[0].get_array())
    check_png(tmp_path / "a.png")
    state = torch.random.get_rng_state()
    plot_augmentations(image, t, n=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def test_attention_distance(tmp_path, model):
    d = mean_attention_distance(model, torch.randn(2, 3, 32, 48))
    ref = uniform_attention_distance((4, 6), 8)
    fig = plot_attention_distance(d, reference=ref, save_path=tmp_path / "d.png")
    ax = fig.axes[0]
    assert len(ax.collections) == 2  # one scatter per head
    np.testing.assert_allclose(ax.collections[1].get_offsets()[:, 1], d[:, 1].numpy(), rtol=1e-6)
    check_png(tmp_path / "d.png")


def test_receptive_fields(tmp_path):
    fig = compare_receptive_fields(depths=(1, 3), size=32, save_path=tmp_path / "r.png")
    assert len(image_axes(fig)) == 4
    curves = {line.get_label(): line.get_ydata() for line in fig.axes[-1].lines}
    cnn, vit = np.asarray(curves["CNN, measured"]), np.asarray(curves["ViT, measured"])
    assert cnn[0] <= 9 / 32**2 + 1e-9 and cnn[1] > cnn[0]  # a 3x3 conv sees 9 pixels
    assert vit[0] > 0.5 and (vit > cnn).all()  # one block already reaches most of the image
    check_png(tmp_path / "r.png")


@pytest.mark.parametrize("kind", ["pil", "path", "array", "tensor", "float-tensor"])
def test_attention_visualizer_inputs(tmp_path, model, image, kind):
    pil = Image.fromarray(image)
    pil.save(tmp_path / "in.png")
    given = {
        "pil": pil,
        "path": tmp_path / "in.png",
        "array": image,
        "tensor": torch.from_numpy(image).permute(2, 0, 1),
        "float-tensor": torch.from_numpy(image).permute(2, 0, 1).float() / 255,
    }[kind]
    viz = AttentionVisualizer(model, device="cpu")
    fig = viz.visualize_attention(given, layer_idx=-1, head_idx=None, save_path=tmp_path / "v.png")
    assert len(fig.axes) == 4 and "layer 1 of 2, mean of heads" in fig.get_suptitle()
    check_png(tmp_path / "v.png")
    _, m, probs = viz.attention(given, layer_idx=0, head_idx=1)
    assert m.shape == (4, 6) and torch.isclose(probs.sum(), torch.tensor(1.0))


def test_attention_visualizer_errors(model, image):
    viz = AttentionVisualizer(model)
    with pytest.raises(ValueError, match="head 5 is out of range for 2 heads"):
        viz.visualize_attention(image, head_idx=5)
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        viz.visualize_attention(image, layer_idx=9)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        viz.visualize_attention("nope.png")
    with pytest.raises(TypeError, match="cannot read an image from int"):
        viz.visualize_attention(3)


@pytest.mark.parametrize("name", ["fig.png", "fig.pdf", "noext"])
def test_figures_are_written_atomically(tmp_path, monkeypatch, name):
    from vitkit.viz._common import finish, new_figure

    path = tmp_path / name
    path.write_bytes(b"the previous figure")
    real_savefig = Figure.savefig

    def interrupted(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"half a fig")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finish(new_figure(1, 1), path)
    assert path.read_bytes() == b"the previous figure"  # a kill mid-write leaves the old file whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # and no temporary file behind
    monkeypatch.setattr(Figure, "savefig", real_savefig)
    finish(new_figure(1, 1), path)
    assert path.read_bytes().startswith(b"%PDF" if name.endswith(".pdf") else b"\x89PNG\r\n\x1a\n")  # no suffix: PNG
