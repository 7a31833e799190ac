"""torchvision Swin v1 state dicts (torchvision is not installed: its key names are written out below from
torchvision/models/swin_transformer.py, `swin_t`) load into vitkit's Swin by name with the same function."""

import pytest
import torch

import vitkit
from vitkit.weights.torchvision_swin import torchvision_swin_to_timm

DEPTHS = (2, 2, 6, 2)  # swin_t


def _torchvision_keys() -> list[str]:
    """swin_t's state dict keys, from torchvision's module tree: features.0 = (Conv2d, Permute, LayerNorm);
    features.{1,3,5,7} = stages of SwinTransformerBlock (norm1, attn = ShiftedWindowAttention with a persistent
    relative_position_index buffer, norm2, mlp = MLP Sequential(Linear, GELU, Dropout, Linear, Dropout));
    features.{2,4,6} = PatchMerging (reduction, norm); then norm and head."""
    keys = ["features.0.0.weight", "features.0.0.bias", "features.0.2.weight", "features.0.2.bias"]
    for s, depth in enumerate(DEPTHS):
        if s:
            keys += [
                f"features.{2 * s}.reduction.weight",
                f"features.{2 * s}.norm.weight",
                f"features.{2 * s}.norm.bias",
            ]
        for j in range(depth):
            p = f"features.{2 * s + 1}.{j}."
            keys += [p + k for k in ("norm1.weight", "norm1.bias", "attn.relative_position_bias_table",
                                     "attn.relative_position_index", "attn.qkv.weight", "attn.qkv.bias",
                                     "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                                     "mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias")]  # fmt: skip
    return keys + ["norm.weight", "norm.bias", "head.weight", "head.bias"]


def _torchvision_name(ours: str) -> str:
    """vitkit's (timm's) key -> torchvision's, written independently of the converter under test."""
    parts = ours.split(".")
    if parts[0] == "patch_embed":
        return {"proj": "features.0.0.", "norm": "features.0.2."}[parts[1]] + parts[2]
    if parts[0] == "layers":
        stage = int(parts[1])
        if parts[2] == "downsample":
            return f"features.{2 * stage}." + ".".join(parts[3:])
        tail = ".".join(parts[4:]).replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
        return f"features.{2 * stage + 1}.{parts[3]}.{tail}"
    if parts[0] == "head":
        return "head." + parts[-1]
    return ours  # norm.*


def _as_torchvision(model) -> dict[str, torch.Tensor]:
    state = {_torchvision_name(k): v.clone() for k, v in model.state_dict().items()}
    for k in _torchvision_keys():
        if k.endswith("relative_position_index"):
            state[k] = torch.zeros(49 * 49, dtype=torch.long)  # stored by torchvision, recomputed by vitkit
    assert set(state) == set(_torchvision_keys())  # the names torchvision's swin_t has, none more, none less
    return state


def test_torchvision_swin_t_loads_by_name_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = vitkit.create_model("swin_tiny_patch4_window7_224").eval()
    state = _as_torchvision(model)
    assert set(torchvision_swin_to_timm(state)) == set(model.state_dict())
    torch.save(state, tmp_path / "swin_t.pth")
    lines = []
    back = vitkit.load_model(tmp_path / "swin_t.pth", model_name="swin_tiny_patch4_window7_224", log=lines.append)
    assert any("torchvision Swin layout" in line for line in lines), lines
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model(x))


def test_swin_v2_and_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="Swin V2"):
        torchvision_swin_to_timm(
            {"features.0.0.weight": torch.zeros(1), "features.1.0.attn.cpb_mlp.0.weight": torch.zeros(1)}
        )
    with pytest.raises(ValueError, match="no counterpart: features.2.extra, head2.weight"):
        torchvision_swin_to_timm({"features.0.0.weight": torch.zeros(1), "features.2.extra": torch.zeros(1),
                                  "head2.weight": torch.zeros(1)})  # fmt: skip
