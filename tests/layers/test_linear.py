"""vitkit.layers.Linear: nn.Linear, except that CPU bf16/fp16 inference computes in fp32 where oneDNN has no
low-precision kernel (the products are exact in fp32; only the summation order differs)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkit.layers.linear as linear_mod
from vitkit.layers import Linear


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return Linear(96, 288).to(torch.bfloat16)


def test_same_parameters_and_state_dict_as_nn_linear(layer):
    plain = nn.Linear(96, 288)
    assert isinstance(layer, nn.Linear)
    assert list(layer.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    plain.load_state_dict(layer.float().state_dict())  # interchangeable checkpoints


@pytest.mark.parametrize("native", [False, True])
def test_low_precision_inference_rule(layer, monkeypatch, native):
    monkeypatch.setattr(linear_mod, "_native", lambda dtype: native)
    x = torch.randn(3, 50, 96).to(torch.bfloat16)
    with torch.inference_mode():
        out = layer(x)
        direct = F.linear(x, layer.weight, layer.bias)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 50, 288)
    if native:
        assert torch.equal(out, direct)
    else:
        in_fp32 = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        assert torch.equal(out, in_fp32.to(torch.bfloat16))
        # The low-precision kernel accumulates in fp32 too: at most one bf16 rounding step apart.
        step = in_fp32.abs().clamp_min(1e-3) * 2**-7
        assert ((out.float() - direct.float()).abs() <= step).all()


def test_autograd_and_fp32_take_nn_linears_path(layer, monkeypatch):
    monkeypatch.setattr(linear_mod, "_native", lambda dtype: False)
    x = torch.randn(4, 96).to(torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # autograd on: untouched
    f32 = Linear(96, 8)
    y = torch.randn(4, 96)
    with torch.no_grad():
        assert torch.equal(f32(y), F.linear(y, f32.weight, f32.bias))
