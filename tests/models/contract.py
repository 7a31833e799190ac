"""The model contract as one check, for the registry-parametrised tests of every family (after timm's tests).

from tests.models.contract import check_contract
check_contract(model, (H, W))   # a tiny instance of the family, eval mode, float32
"""

from __future__ import annotations

import torch
from torch import nn

import vitkit


def check_contract(model: nn.Module, size: tuple[int, int], tmp_path=None, num_classes: int | None = None) -> None:
    """Assert the contract of docs/models.md on `model` at input `size` (which may be non-square).

    Checks: logits shape, no NaNs, forward == forward_head(forward_features), pre_logits width, as_maps
    intermediates against feature_info, layer ids cover 0..num_layer_ids-1 and the head is the last, every
    parameter gets a gradient, a hook on each feature_info module fires, gradient checkpointing gives the same
    output, reset_classifier, and (with
    `tmp_path`) a bit-exact save/load round trip.
    """
    model = model.eval()
    n = model.num_classes if num_classes is None else num_classes
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, n) and torch.isfinite(y).all()
        f = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(f), y)
        assert model.forward_head(f, pre_logits=True).shape == (2, model.num_features)
        maps = model.forward_intermediates(x, as_maps=True)
    info = model.feature_info
    assert len(maps) == len(info) > 0
    for m, fi in zip(maps, info):
        assert m.shape == (2, fi["num_chs"], size[0] // fi["reduction"], size[1] // fi["reduction"]), (m.shape, fi)
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert set(ids.values()) == set(range(model.num_layer_ids))
    heads = [name for name in ids if model.is_classifier(name)]
    assert heads and all(ids[h] == model.num_layer_ids - 1 for h in heads)
    # Every parameter gets a gradient.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.train()
    model.zero_grad()
    model(x).float().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    model.eval()
    with torch.no_grad():  # the training-mode pass moved BatchNorm statistics; the checks below compare with y
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    # feature_info names modules that run: a forward hook on each fires once per forward (Grad-CAM and feature
    # extractors hook them), on the plain path, the inference path and with gradient checkpointing.
    modules = dict(model.named_modules())
    assert all(fi["module"] in modules for fi in info), [fi["module"] for fi in info]
    fired: list[str] = []
    hooks = [modules[fi["module"]].register_forward_hook(lambda *_, n=fi["module"]: fired.append(n)) for fi in info]
    with torch.no_grad():
        model(x)
    assert fired == [fi["module"] for fi in info], fired
    # Gradient checkpointing: same output (and the same hooks fire, at least once each: recomputation may repeat).
    fired.clear()
    model.set_grad_checkpointing(True)
    with torch.enable_grad():
        y2 = model(x)
    model.set_grad_checkpointing(False)
    assert set(fired) == {fi["module"] for fi in info}, fired
    for h in hooks:
        h.remove()
    torch.testing.assert_close(y2, y)
    if tmp_path is not None:
        model.save_pretrained(tmp_path / "contract")
        back = vitkit.load_model(tmp_path / "contract").eval()
        with torch.no_grad():
            assert torch.equal(back(x), y)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).shape == (2, 3)
