"""MaskedAutoencoderViT: parity with transformers' ViTMAEForPreTraining (same weights and noise -> same mask,
logits and loss within 1e-5), the masking conventions, import of transformers directories (whole model or encoder
for fine-tuning), save/load and the config's errors."""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.models.mae import MAEConfig, MaskedAutoencoderViT, mae_from_vit, mae_sincos_table

transformers = pytest.importorskip("transformers")

TINY_HF = dict(
    image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
    decoder_intermediate_size=32, layer_norm_eps=1e-12, qkv_bias=True,
)  # fmt: skip


def _hf_table(grid: int, dim: int) -> torch.Tensor:
    """transformers' own MAE table: its 2-D sin-cos with the halves swapped, as ViTMAEEmbeddings builds it."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    table = build_2d_sinusoidal_position_embedding(grid, grid, embed_dim=dim, cls_token=True)
    return torch.cat([table[..., dim // 2 :], table[..., : dim // 2]], dim=-1)[None]


def _hf_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ViTMAEConfig(**{**TINY_HF, **overrides})
    model = transformers.ViTMAEForPreTraining(cfg).eval()
    with torch.no_grad():  # random, non-trivial values everywhere (init leaves biases and norms at 0/1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        # The fixed tables (a freshly built transformers 5 model leaves them at zero until from_pretrained).
        model.vit.embeddings.position_embeddings.copy_(_hf_table(4, 32))
        model.decoder.decoder_pos_embed.copy_(_hf_table(4, 16))
    return model


@pytest.fixture
def hf_dir(tmp_path):
    model = _hf_model(norm_pix_loss=True, mask_ratio=0.5)
    model.save_pretrained(tmp_path / "hf_mae")
    return model, tmp_path / "hf_mae"


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_same_weights_and_noise_give_transformers_mask_logits_and_loss(norm_pix_loss):
    from vitkit.weights.mae import hf_vitmae_to_timm

    hf = _hf_model(norm_pix_loss=norm_pix_loss)
    arch, state = hf_vitmae_to_timm(hf.state_dict(), hf.config.to_dict())
    ours = MaskedAutoencoderViT(MAEConfig(**arch)).eval()
    ours.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        ref = hf(pixel_values=x, noise=noise)
        out = ours(x, noise=noise)
    assert torch.equal(out.mask, ref.mask) and torch.equal(out.ids_restore, ref.ids_restore)
    assert out.mask.sum(dim=1).tolist() == [12.0, 12.0, 12.0]  # int(16 * 0.25) = 4 visible patches each
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert out.loss.item() > 0.1  # random weights: a real error, not a trivially equal zero
    # The reconstruction is transformers' unpatchify of the same logits.
    torch.testing.assert_close(ours.unpatchify(out.logits), hf.unpatchify(ref.logits), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.patchify(x), hf.patchify(x), atol=0, rtol=0)


def test_fixed_tables_equal_transformers_and_are_not_trained():
    assert torch.equal(mae_sincos_table((4, 4), 32), _hf_table(4, 32))
    assert torch.equal(mae_sincos_table((4, 4), 16), _hf_table(4, 16))
    model = mae_from_vit("vit_nano_patch4_32", img_size=16, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder.pos_embed" not in trained and "decoder_pos_embed" not in dict(model.named_parameters())
    assert "mask_token" in trained and "encoder.cls_token" in trained


def test_masking_follows_the_noise_and_the_ratio():
    model = mae_from_vit("vit_nano_patch4_32", img_size=16, embed_dim=32, depth=1, num_heads=2,
                         decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mask_ratio=0.75)  # fmt: skip
    tokens = torch.arange(16.0).view(1, 16, 1).expand(2, 16, 4)
    noise = torch.stack([torch.arange(16.0), torch.arange(16.0).flip(0)])  # keep the first / the last patches
    visible, mask, restore = model.random_masking(tokens, noise)
    assert visible[0, :, 0].tolist() == [0, 1, 2, 3] and visible[1, :, 0].tolist() == [15, 14, 13, 12]
    assert mask[0].tolist() == [0] * 4 + [1] * 12 and mask[1].tolist() == [1] * 12 + [0] * 4
    assert torch.equal(torch.argsort(restore, dim=1), torch.argsort(noise, dim=1))
    with pytest.raises(ValueError, match=r"noise must have shape \(batch, patches\) = \(2, 16\), got \(2, 15\)"):
        model.random_masking(tokens, noise[:, :15])
    with pytest.raises(ValueError, match="MAE input must be 16x16"):
        model(torch.zeros(1, 3, 32, 32))


def test_the_loss_only_sees_hidden_patches():
    model = mae_from_vit("vit_nano_patch4_32", img_size=16, embed_dim=32, depth=1, num_heads=2,
                         decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2).eval()  # fmt: skip
    x = torch.randn(1, 3, 16, 16)
    noise = torch.arange(16.0)[None]  # patches 0-3 visible
    with torch.no_grad():
        out = model(x, noise=noise)
        changed = x.clone()
        changed[..., :4, :16] += 5  # the first patch row = patches 0-3, the visible ones
        target_diff = model.loss(changed, out.logits, out.mask) - model.loss(x, out.logits, out.mask)
    assert target_diff.abs().item() == 0.0
    per_patch = ((out.logits - model.patchify(x)) ** 2).mean(-1)[0, 4:].mean()
    torch.testing.assert_close(out.loss, per_patch)


def test_transformers_directory_imports_as_the_model_or_as_the_encoder(hf_dir, tmp_path):
    hf, path = hf_dir
    model = vitkit.load_model(path).eval()
    assert isinstance(model, MaskedAutoencoderViT) and model.cfg.norm_pix_loss and model.cfg.mask_ratio == 0.5
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        ref, out = hf(pixel_values=x, noise=noise), model(x, noise=noise)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    # vitkit's own format round trip.
    model.save_pretrained(tmp_path / "ours")
    again = vitkit.load_model(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(x, noise=noise).logits, out.logits)
    # The encoder for fine-tuning: a plain ViT whose class token features are transformers' ViTMAEModel's on an
    # unmasked input (mask_ratio 0 there keeps every patch in order).
    lines = []
    vit = vitkit.load_model(path, num_classes=5, log=lines.append).eval()
    assert type(vit) is vitkit.VisionTransformer and vit.num_classes == 5 and vit.pos_embed.requires_grad
    assert any("the decoder" in m and "is dropped" in m for m in lines)
    full = transformers.ViTMAEModel.from_pretrained(path, mask_ratio=0.0).eval()
    with torch.no_grad():
        ref_tokens = full(pixel_values=x, noise=torch.arange(16.0).expand(2, 16)).last_hidden_state
        torch.testing.assert_close(vit.forward_features(x), ref_tokens, atol=1e-5, rtol=0)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        MAEConfig(mask_ratio=1.0)
    with pytest.raises(ValueError, match="MAE needs attn_layer='mha'"):
        MAEConfig(attn_layer="local", attn_args={"window": 3})
    with pytest.raises(ValueError, match="decoder_embed_dim 30 is not divisible by decoder_num_heads 4"):
        MAEConfig(decoder_embed_dim=30, decoder_num_heads=4)
    with pytest.raises(ValueError, match="an MAE encoder has no classifier"):
        MAEConfig(num_classes=10)
    with pytest.raises(ValueError, match="MAE's encoder must be a ViT"):
        mae_from_vit("resnet18")


def test_every_transformers_key_layout_converts_to_the_same_weights(hf_dir):
    """The module names (transformers 5), what transformers 5 writes (`decoder.decoder_encoder.layer`) and the 4.x
    layout of the published facebook/vit-mae-* files (`decoder.decoder_layers.{i}.attention.attention.query`)."""
    from safetensors.torch import load_file

    from vitkit.weights.mae import hf_vitmae_to_timm

    hf, path = hf_dir
    config = hf.config.to_dict()
    on_disk = load_file(str(path / "model.safetensors"))
    assert any(k.startswith("decoder.decoder_encoder.layer.") for k in on_disk)
    v4 = {k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v for k, v in on_disk.items()}
    converted = [hf_vitmae_to_timm(s, config) for s in (hf.state_dict(), on_disk, v4)]
    for arch, state in converted[1:]:
        assert arch == converted[0][0] and state.keys() == converted[0][1].keys()
        assert all(torch.equal(state[k], converted[0][1][k]) for k in state)
    with pytest.raises(ValueError, match=r"no counterpart in vitkit's MaskedAutoencoderViT: \['decoder.extra'\]"):
        hf_vitmae_to_timm({**on_disk, "decoder.extra": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="architecture \\['ViTMAEModel'\\] is not supported"):
        hf_vitmae_to_timm(on_disk, {**config, "architectures": ["ViTMAEModel"]})


def test_loading_at_another_size_recomputes_the_fixed_tables(tmp_path):
    model = mae_from_vit("vit_nano_patch4_32", img_size=16, embed_dim=32, depth=1, num_heads=2,
                         decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    model.save_pretrained(tmp_path / "mae")
    lines = []
    big = vitkit.load_model(tmp_path / "mae", img_size=32, log=lines.append)
    assert big.num_patches == 64 and tuple(big.preprocess.input_size) == (32, 32)
    assert torch.equal(big.encoder.pos_embed.detach(), mae_sincos_table((8, 8), 32))
    assert torch.equal(big.decoder_pos_embed, mae_sincos_table((8, 8), 16))
    assert "MAE sin-cos position tables recomputed for 8x8 patches" in lines
    small = dict(model.named_parameters())
    assert all(torch.equal(p, small[n]) for n, p in big.named_parameters() if n != "encoder.pos_embed")
    assert big(torch.randn(1, 3, 32, 32)).logits.shape == (1, 64, 48)
