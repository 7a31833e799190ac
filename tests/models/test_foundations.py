"""What tutorial users try first, and the fault kinds of issue 7 that live in models, layers and weights.

Each test names the item it covers (A1 head assignment, A2 hooks and capture, A3 spellings, A4 run directories,
B1 stale position cache, B3 dtype, B4 corrupt files, C1 contract, C2 pluggable layers).
"""

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import vitkit
from vitkit.layers import capture_attention, register_layer, resample_pos_embed
from vitkit.layers.attention import Attention
from vitkit.models.vit import VisionTransformer

TINY = dict(embed_dim=32, depth=2, num_heads=2)
ALL = [n for n in vitkit.list_models() if vitkit.models.registry.model_family(n) == "vit"]


def tiny(name="vit_tiny_patch16_224", **kw):
    return vitkit.create_model(name, **{**TINY, "img_size": 32, **kw}).eval()


# ---------------------------------------------------------------------------------------------------------------
# A1. Head replacement by assignment
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("new_head", ["linear5", "identity"])
def test_assigned_head_is_saved_as_it_is_and_loads_bit_exactly(tmp_path, new_head):
    model = vitkit.create_vit_small(n_classes=10, **TINY, img_size=32).eval()
    model.head = nn.Linear(model.head.in_features, 5) if new_head == "linear5" else nn.Identity()
    expected = 5 if new_head == "linear5" else 0
    assert model.num_classes == expected and model.cfg.num_classes == expected
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    assert y.shape == ((2, 5) if expected else (2, 32))
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architecture"]["num_classes"] == expected
    back = vitkit.load_model(tmp_path / "m").eval()
    assert back.num_classes == expected
    assert torch.equal(back(x), y)


def test_assigned_deit_heads_are_saved_and_must_agree(tmp_path):
    model = tiny("deit_tiny_distilled_patch16_224", num_classes=10)
    model.head = nn.Linear(32, 4)
    with pytest.raises(ValueError, match="DeiT heads differ: head has 4 outputs, head_dist 10"):
        model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    model.head_dist = nn.Linear(32, 4)
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    model.save_pretrained(tmp_path / "m")
    back = vitkit.load_model(tmp_path / "m").eval()
    assert back.num_classes == 4 and torch.equal(back(x), y)


def test_head_config_cannot_describe_is_refused_by_name(tmp_path):
    model = tiny(num_classes=10)
    model.head = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    assert model.num_classes == 3 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match=r"model.head is Sequential.*nn.Linear\(32, classes\)"):
        model.save_pretrained(tmp_path / "m")


def test_assigned_head_drops_class_names_of_another_count():
    model = tiny(num_classes=3)
    model.preprocess.class_names = ["a", "b", "c"]
    model.head = nn.Linear(32, 3)
    assert model.preprocess.class_names == ["a", "b", "c"]
    model.head = nn.Linear(32, 5)
    assert model.preprocess.class_names is None


# ---------------------------------------------------------------------------------------------------------------
# A2. Forward hooks see tensors; attention capture lives outside forward
# ---------------------------------------------------------------------------------------------------------------
def test_forward_hooks_on_blocks_and_attention_receive_plain_tensors():
    model = tiny(num_classes=3)
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, i, out: seen.update(block=out.detach()))
    model.blocks[1].attn.register_forward_hook(lambda m, i, out: seen.update(attn=out.shape))
    model(torch.randn(2, 3, 32, 32))
    assert isinstance(seen["block"], torch.Tensor) and seen["block"].shape == (2, 1 + 4, 32)
    assert seen["attn"] == (2, 5, 32)


def test_capture_context_matches_return_attention_and_a_manual_softmax():
    model = tiny(num_classes=3)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad(), capture_attention(model, [-1]) as rec:
        y = model(x)
    (a,) = rec.maps
    y2, (b,) = model(x, return_attention=[-1])
    assert torch.equal(a, b) and torch.allclose(y, y2, atol=1e-6)
    # The map is softmax(q k^T / sqrt(d)) of the last block's normalised input.
    blk = model.blocks[-1]
    with torch.no_grad():
        h = blk.norm1(model.forward_intermediates(x, [0])[0])
        q, k, _ = blk.attn.qkv(h).reshape(2, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        ref = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(a, ref)
    assert all(m.capture is None for m in model.modules() if isinstance(m, Attention))


def test_capture_declines_models_without_global_attention():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="Sequential has no global self-attention"), capture_attention(cnn):
        pass


def test_capture_works_with_gradient_checkpointing_and_gives_gradients():
    model = tiny(num_classes=3)
    model.set_grad_checkpointing(True)
    x = torch.randn(1, 3, 32, 32)
    with capture_attention(model, True) as rec:
        y = model(x)
    grads = torch.autograd.grad(y[0, 0], rec.maps)
    assert all(g.shape == (1, 2, 5, 5) and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------------------------------------------
# A3. Tutorial spellings
# ---------------------------------------------------------------------------------------------------------------
def test_tutorial_spellings_are_accepted():
    assert vitkit.create_vit_small(num_classes=10, **TINY).num_classes == 10
    assert vitkit.create_vit_tiny(n_classes=7, **TINY).num_classes == 7
    with torch.device("meta"):
        m = VisionTransformer(img_size=224, patch_size=8, embed_dim=384, depth=12, n_heads=6, n_classes=10)
    assert (m.cfg.num_heads, m.num_classes, m.cfg.patch_size, m.native_grid) == (6, 10, 8, (28, 28))
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, n_heads=2, in_channels=1, dropout=0.1,
                          mlp_dim=128, n_classes=3)  # fmt: skip
    assert (m.cfg.in_chans, m.cfg.drop_rate, m.cfg.mlp_ratio) == (1, 0.1, 2.0)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_unknown_or_conflicting_spellings_list_the_accepted_names():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['n_head'\].*accepted: .*num_heads.*n_heads"):
        VisionTransformer(n_head=3)
    with pytest.raises(TypeError, match="'num_heads' and 'n_heads' both set 'num_heads'"):
        VisionTransformer(num_heads=3, n_heads=4)
    with pytest.raises(TypeError, match="n_classes=3 and num_classes=4 disagree"):
        vitkit.create_vit_tiny(n_classes=3, num_classes=4)


def test_mlp_dim_is_resolved_against_the_variants_own_width():
    m = vitkit.create_model("vit_small_patch16_224", mlp_dim=1536, depth=1)
    assert (m.cfg.mlp_ratio, m.blocks[0].mlp.fc1.out_features) == (4.0, 1536)
    assert vitkit.create_vit_small(mlp_dim=768, depth=1).blocks[0].mlp.fc1.out_features == 768
    with pytest.raises(TypeError, match="n_classes=10 and num_classes=5 disagree"):
        vitkit.create_vit_model("small", n_classes=10, num_classes=5)


def test_head_weight_reassignment_is_seen(tmp_path):
    model = tiny(num_classes=10)
    model.head.weight = nn.Parameter(torch.randn(5, 32))
    model.head.bias = nn.Parameter(torch.zeros(5))
    assert model.num_classes == 5
    model.save_pretrained(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(vitkit.load_model(tmp_path / "m").eval()(x), model(x))


def test_a_forward_in_another_thread_during_a_capture_is_not_recorded():
    import threading

    model = tiny(num_classes=3)
    xa, xb = torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain_b = model(xb)
        out = {}
        with capture_attention(model, [-1]) as rec:
            t = threading.Thread(target=lambda: out.update(b=model(xb)))
            t.start()
            t.join()
            with pytest.raises(RuntimeError, match="no attention was recorded"):
                _ = rec.maps  # the other thread's forward is not ours
            model(xa)
        assert rec.maps[0].shape[0] == 1  # the capturing thread's own batch
    torch.testing.assert_close(out["b"], plain_b)


def test_create_vit_model_by_size_or_name():
    assert vitkit.create_vit_model("small", n_classes=3, **TINY).model_name == "vit_small_patch16_224"
    assert vitkit.create_vit_model("deit_tiny_distilled_patch16_224", **TINY).head_dist is not None
    with pytest.raises(ValueError, match=r"not a size \(tiny, small, base, large, huge\).*closest: vit_small"):
        vitkit.create_vit_model("vit_smal_patch16_224")


# ---------------------------------------------------------------------------------------------------------------
# A4. Loading a run directory
# ---------------------------------------------------------------------------------------------------------------
def _fake_run(root, with_best=True):
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({"data": "digits", "epochs": 2}))
    models = {}
    for name in ("best", "last") if with_best else ("last",):
        m = tiny(num_classes=3)
        m.save_pretrained(root / name, training={"epoch": 2 if name == "best" else 3})
        models[name] = m
    return models


def test_load_model_of_a_run_loads_best_and_says_so(tmp_path, capsys):
    models = _fake_run(tmp_path / "run")
    model = vitkit.load_model(tmp_path / "run").eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(x), models["best"](x))
    err = capsys.readouterr().err
    assert "run/best (best validation checkpoint, epoch 2)" in err
    lines = []
    vitkit.load_model(tmp_path / "run", log=lines.append)
    assert any("best validation checkpoint" in line for line in lines)


def test_load_model_of_a_run_without_best_takes_last(tmp_path, capsys):
    models = _fake_run(tmp_path / "run", with_best=False)
    model = vitkit.load_model(tmp_path / "run").eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(x), models["last"](x))
    assert "latest checkpoint (the run has no best/)" in capsys.readouterr().err


def test_load_model_of_a_run_with_no_checkpoint_says_so(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("epochs: 1\n")
    with pytest.raises(ValueError, match="has no checkpoint yet"):
        vitkit.load_model(tmp_path / "run")


# ---------------------------------------------------------------------------------------------------------------
# B1. No write path leaves the position cache stale
# ---------------------------------------------------------------------------------------------------------------
def _fresh_output(model, x):
    """The output with the run-time resample computed from scratch (no cache)."""
    ref = VisionTransformer(model.cfg)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    with torch.no_grad():
        return ref(x)


WRITES = {
    "data.copy_": lambda m, new: m.pos_embed.data.copy_(new),
    "no_grad copy_": lambda m, new: torch.no_grad()(m.pos_embed.copy_)(new),
    "data =": lambda m, new: setattr(m.pos_embed, "data", new.clone()),
    "new Parameter": lambda m, new: setattr(m, "pos_embed", nn.Parameter(new.clone())),
    "load_state_dict": lambda m, new: m.load_state_dict({**m.state_dict(), "pos_embed": new}),
    "mul_ in place": lambda m, new: m.pos_embed.data.mul_(3.0),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_position_cache_follows_every_write(write):
    model = tiny(num_classes=3)
    x = torch.randn(2, 3, 48, 64)  # not the native 32 x 32: the table is resampled and cached
    with torch.no_grad():
        before = model(x)
    WRITES[write](model, torch.randn_like(model.pos_embed) * 3)
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(after, before)
    assert torch.equal(after, _fresh_output(model, x))


def test_optimizer_step_invalidates_the_cache():
    model = tiny(num_classes=3)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        model(x)
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), _fresh_output(model, x))


# ---------------------------------------------------------------------------------------------------------------
# B3. The saved dtype survives every load path
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_kept_when_loading_at_another_size(tmp_path, dtype):
    tiny(num_classes=3).to(dtype).save_pretrained(tmp_path / "m")
    assert next(vitkit.load_model(tmp_path / "m").parameters()).dtype == dtype
    resized = vitkit.load_model(tmp_path / "m", img_size=48)
    assert resized.cfg.img_size == (48, 48)
    assert {p.dtype for p in resized.parameters()} == {dtype}


def test_dtype_kept_for_a_bf16_timm_state_dict(tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in tiny(num_classes=3, embed_dim=64, num_heads=1).state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    model = vitkit.load_model(tmp_path / "w.pth")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.head.weight, state["head.weight"])


# ---------------------------------------------------------------------------------------------------------------
# B4. Corrupt or truncated files are named as such
# ---------------------------------------------------------------------------------------------------------------
def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_native_weights_are_named(tmp_path):
    tiny(num_classes=3).save_pretrained(tmp_path / "m")
    _truncate(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"m/model.safetensors is incomplete or corrupt"):
        vitkit.load_model(tmp_path / "m")
    with pytest.raises(ValueError, match=r"m/model.safetensors is incomplete or corrupt"):
        vitkit.load_model(tmp_path / "m", img_size=48)


def test_truncated_config_is_named(tmp_path):
    tiny(num_classes=3).save_pretrained(tmp_path / "m")
    _truncate(tmp_path / "m" / "config.json")
    with pytest.raises(ValueError, match=r"m/config.json is incomplete or corrupt"):
        vitkit.load_model(tmp_path / "m")


def test_truncated_pth_and_npz_are_named(tmp_path):
    torch.save(tiny(num_classes=3).state_dict(), tmp_path / "w.pth")
    _truncate(tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"w.pth as a PyTorch checkpoint: the file is incomplete or corrupt"):
        vitkit.load_model(tmp_path / "w.pth")
    np.savez(tmp_path / "w.npz", a=np.zeros((64, 64), np.float32), b=np.ones(10, np.float32))
    _truncate(tmp_path / "w.npz")
    with pytest.raises(ValueError, match=r"w.npz is incomplete or corrupt"):
        vitkit.load_model(tmp_path / "w.npz")


# ---------------------------------------------------------------------------------------------------------------
# C1. One contract, read by the consumers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_contract_feature_info_maps_and_layer_ids(name):
    model = vitkit.create_model(name, **TINY)
    p = model.cfg.patch_size
    model = vitkit.create_model(name, **TINY, img_size=(2 * p, 3 * p)).eval()
    info = model.feature_info
    maps = model.forward_intermediates(torch.randn(1, 3, 2 * p, 3 * p), as_maps=True)
    assert len(maps) == len(info)
    for fmap, fi in zip(maps, info):
        assert fmap.shape == (1, fi["num_chs"], 2 * p // fi["reduction"], 3 * p // fi["reduction"])
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert set(ids.values()) == set(range(model.num_layer_ids))
    assert all(model.is_classifier(n) == n.startswith(("head.", "head_dist.")) for n in ids)


def test_registered_default_preprocessing():
    jax = vitkit.create_model("vit_base_patch16_224", **TINY).preprocess
    assert (jax.mean, jax.std, jax.crop_fraction) == ((0.5,) * 3, (0.5,) * 3, 0.9)
    assert vitkit.create_model("vit_base_patch16_384", **TINY).preprocess.crop_fraction == 1.0
    deit = vitkit.create_model("deit_tiny_distilled_patch16_224", **TINY).preprocess
    assert deit.mean == (0.485, 0.456, 0.406) and deit.crop_fraction == 0.875
    assert vitkit.create_model("vit_tiny_patch16_224", **TINY, img_size=48).preprocess.input_size == (48, 48)


def test_freeze_and_layer_decay_follow_layer_ids():
    from vitkit.train.optim import freeze_backbone, param_groups

    model = tiny(num_classes=3)
    n = freeze_backbone(model, 1)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in model.named_parameters() if model.layer_id(name) <= 1}
    assert n == sum(p.numel() for name, p in model.named_parameters() if name in frozen)
    groups = param_groups(tiny(num_classes=3), 0.05, layer_decay=0.5)
    scales = {name: g["lr_scale"] for g in groups for name in g["param_names"]}
    assert scales["head.weight"] == 1.0 and scales["blocks.1.mlp.fc1.weight"] == 0.5
    assert scales["patch_embed.proj.weight"] == 0.5**3


def test_consumers_name_what_a_model_lacks():
    from vitkit.explain import attention_map
    from vitkit.train.optim import freeze_backbone, param_groups

    class Cnn(nn.Sequential):
        model_name = "tiny_cnn"

    cnn = Cnn(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match="need global self-attention; tiny_cnn has none"):
        attention_map(cnn, torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="freeze_backbone needs layer ids .*; tiny_cnn has none"):
        freeze_backbone(cnn, 1)
    with pytest.raises(TypeError, match="layer_decay needs layer ids"):
        param_groups(cnn, 0.05, layer_decay=0.7)


# ---------------------------------------------------------------------------------------------------------------
# C2. Pluggable layers by name
# ---------------------------------------------------------------------------------------------------------------
def test_layers_chosen_by_name_train_save_and_load(tmp_path):
    model = tiny(num_classes=3, mlp_layer="swiglu", norm_layer="rmsnorm", act_layer="gelu_tanh")
    assert isinstance(model.blocks[0].norm1, nn.RMSNorm) and hasattr(model.blocks[0].mlp, "fc1_g")
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval().save_pretrained(tmp_path / "m")
    arch = json.loads((tmp_path / "m" / "config.json").read_text())["architecture"]
    assert (arch["mlp_layer"], arch["norm_layer"], arch["act_layer"]) == ("swiglu", "rmsnorm", "gelu_tanh")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(vitkit.load_model(tmp_path / "m").eval()(x), model(x))


def test_unknown_layer_names_list_the_choices():
    with pytest.raises(ValueError, match=r"attn_layer='flash' is not a known attn layer; choose one of 'mha'"):
        tiny(attn_layer="flash")
    with pytest.raises(ValueError, match=r"norm_layer='batchnorm'.*'layernorm', 'rmsnorm'"):
        tiny(norm_layer="batchnorm")


def test_registered_attention_variant_is_used_by_every_block_with_its_options():
    class ScaledAttention(Attention):
        def __init__(self, dim, num_heads, temperature=1.0, **kw):
            super().__init__(dim, num_heads, **kw)
            self.scale = self.scale / temperature

    if "test_scaled" not in vitkit.layers.layer_names("attn"):
        register_layer("attn", "test_scaled", ScaledAttention)
    model = tiny(num_classes=3, attn_layer="test_scaled", attn_args={"temperature": 2.0})
    assert all(isinstance(b.attn, ScaledAttention) and b.attn.scale == 16**-0.5 / 2 for b in model.blocks)
    with pytest.raises(TypeError, match="attn_args must be a dict"):
        tiny(attn_args=[1])


def test_position_resample_matches_the_load_time_function():
    # The run-time table and the load-time one are the same function (kept from before the cache change).
    model = tiny(num_classes=3)
    table = model._pos_embed_for((3, 4), torch.float32, torch.device("cpu"))
    assert torch.equal(table, resample_pos_embed(model.pos_embed.detach(), (3, 4), (2, 2), 1))


# ---------------------------------------------------------------------------------------------------------------
# C4. Layering: no package imports a higher one or the package root
# ---------------------------------------------------------------------------------------------------------------
LEVELS = {"_io": 0, "_validate": 0, "_version": 0, "allocator": 0, "cpu": 0, "runs": 0, "threads": 0, "layers": 1, "models": 2, "weights": 3, "data": 4,
          "train": 5, "explain": 6, "features": 6, "deploy": 6, "viz": 7, "compare": 7, "cli": 8, "__main__": 8}  # fmt: skip


def _imports(path):
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno


def test_no_package_imports_a_higher_one_or_the_root():
    from pathlib import Path

    src = Path(vitkit.__file__).parent
    bad = []
    for path in src.rglob("*.py"):
        rel = path.relative_to(src)
        own = rel.parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for module, line in _imports(path):
            parts = module.split(".")
            if parts[0] != "vitkit":
                continue
            if len(parts) == 1:
                bad.append(f"{rel}:{line} imports the package root")
            elif LEVELS[parts[1]] > LEVELS[own]:
                bad.append(f"{rel}:{line} ({own}) imports vitkit.{parts[1]}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_inside_a_package():
    from pathlib import Path

    src = Path(vitkit.__file__).parent
    graph = {}
    for path in src.rglob("*.py"):
        mod = "vitkit." + ".".join(path.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        graph[mod] = {m for m, _ in _imports(path) if m.startswith("vitkit.") and m != mod}
    # Only module-to-module edges within one subpackage (package __init__ re-exports excluded).
    cycles = []
    for a, deps in graph.items():
        for b in deps:
            if b in graph and a in graph.get(b, ()) and not a.endswith("__init__") and a.count(".") == b.count("."):
                if not (a in sys.modules and hasattr(sys.modules[a], "__path__")):
                    cycles.append(tuple(sorted((a, b))))
    assert not sorted(set(cycles)), sorted(set(cycles))
