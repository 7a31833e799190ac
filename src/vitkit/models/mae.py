"""Masked autoencoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

Read top-down: the config, the fixed position table, the model (mask -> encode -> decode -> loss), then
`mae_from_vit`, which wraps any registered ViT. MAE has no registry names of its own: `vitkit models` lists
classifiers, and an MAE is a training-time wrapper of one (`mae_from_vit("vit_base_patch16_224")` is MAE-B/16).

A random 75% of each image's patches are hidden. The encoder (a vitkit `VisionTransformer`) sees only the visible
patches plus its class token; a light decoder puts a shared learned mask token at every hidden position, adds its
own fixed sin-cos positions, runs a few narrow blocks and predicts the pixels of every patch. The loss is the mean
squared error on the hidden patches only, optionally against per-patch normalised pixels (`norm_pix_loss`, which
the paper finds gives sharper features). After pretraining the decoder is thrown away and the encoder is
fine-tuned as an ordinary ViT (`encoder_model()`; `vitkit.load_model(mae_dir, num_classes=N)` does it for you).

Masking, shapes and conventions follow transformers' `ViTMAEForPreTraining`: the same `noise` gives the same mask,
`logits` are (B, L, p*p*C) in (row, column, channel) order inside a patch, and `mask` is 1 for hidden patches, so
weights converted with `vitkit.weights.mae` give the same loss and reconstruction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vitkit.layers import Block, get_layer, get_norm
from vitkit.models.base import Preprocess, config_kwargs
from vitkit.models.registry import register_family
from vitkit.models.serialization import save_pretrained
from vitkit.models.vit import VisionTransformer, ViTConfig


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class MAEConfig(ViTConfig):
    """Architecture of a masked autoencoder: the encoder's ViTConfig fields (defaults ViT-B/16 at 224 px) plus the
    decoder and the masking. The encoder has no classifier (num_classes=0): the decoder's pixels are the output."""

    num_classes: int = 0  # the encoder has no head while pretraining; fine-tuning adds one (`encoder_model`)
    decoder_embed_dim: int = 512  # decoder width; the paper's 512 is a fraction of the encoder's compute
    decoder_depth: int = 8  # decoder blocks (the paper's default; 1 block already fine-tunes almost as well)
    decoder_num_heads: int = 16  # decoder attention heads
    decoder_mlp_ratio: float = 4.0  # decoder MLP hidden width / decoder width
    mask_ratio: float = 0.75  # share of patches hidden from the encoder; 75% is the paper's sweet spot for images
    norm_pix_loss: bool = False  # targets normalised per patch (mean 0, var 1): the paper's better features

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes != 0:
            raise ValueError(
                f"an MAE encoder has no classifier (num_classes=0), got num_classes={self.num_classes}; fine-tune "
                "its encoder instead (MaskedAutoencoderViT.encoder_model(), or vitkit.load_model(dir, num_classes=N))"
            )
        # The encoder runs on a subset of the patches: no patch grid survives masking, so only layers that do not
        # need one (and positions added at the embedding, which the paper fixes to sin-cos) fit.
        for name, value, allowed in (
            ("attn_layer", self.attn_layer, "mha"),
            ("embed_layer", self.embed_layer, "patch"),
            ("pos_embed", self.pos_embed, "learn"),
            ("pool", self.pool, "token"),
        ):
            if value != allowed:
                raise ValueError(
                    f"MAE needs {name}={allowed!r} (the encoder sees a random subset of patches), got {value!r}"
                )
        if not self.class_token or self.distilled or self.reg_tokens:
            raise ValueError(
                "MAE's encoder has exactly one prefix token, the class token (no distillation/register tokens)"
            )
        if self.run_patch_size is not None:
            raise ValueError(
                f"MAE pretrains at its own patch size; run_patch_size={self.run_patch_size} is not supported"
            )
        for name in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by decoder_num_heads {self.decoder_num_heads}"
            )
        for name, dim in (("embed_dim", self.embed_dim), ("decoder_embed_dim", self.decoder_embed_dim)):
            if dim % 4:
                raise ValueError(f"{name} must be a multiple of 4 for the 2-D sin-cos position table, got {dim}")
        if self.decoder_mlp_ratio <= 0:
            raise ValueError(f"decoder_mlp_ratio must be positive, got {self.decoder_mlp_ratio}")
        if isinstance(self.mask_ratio, bool) or not 0.0 <= float(self.mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1) (the share of patches hidden), got {self.mask_ratio!r}")
        if not isinstance(self.norm_pix_loss, bool):
            raise TypeError(f"norm_pix_loss must be true or false, got {self.norm_pix_loss!r}")

    def encoder_config(self, num_classes: int = 0) -> ViTConfig:
        """The encoder's ViTConfig (every ViTConfig field of this config), with `num_classes` outputs."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(ViTConfig)}
        return ViTConfig(**{**fields, "num_classes": num_classes})


# ----------------------------------------------------------------------------------------------------------------
# The fixed position table
# ----------------------------------------------------------------------------------------------------------------
def mae_sincos_table(grid: tuple[int, int], dim: int) -> Tensor:
    """MAE's fixed 2-D sin-cos table (1, 1 + H'*W', dim) with a zero row first for the class token.

    Channels are [sin(col), cos(col), sin(row), cos(row)] at dim/4 frequencies, computed in float64 and rounded
    once, as the MAE reference and transformers do, so converted checkpoints hold the same table to the last bit.
    """
    gh, gw = grid
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    row, col = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    r = row.flatten().outer(omega)  # (H'*W', dim/4)
    c = col.flatten().outer(omega)  # (H'*W', dim/4)
    table = torch.cat([c.sin(), c.cos(), r.sin(), r.cos()], dim=1)  # (H'*W', dim)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).unsqueeze(0).float()  # (1, 1 + H'*W', dim)


@dataclass
class MAEOutput:
    """What `MaskedAutoencoderViT.forward` returns (the fields of transformers' ViTMAEForPreTrainingOutput).

    Attributes:
        loss: scalar, mean squared error over the hidden patches (per-patch normalised targets with norm_pix_loss).
        logits: (B, L, p*p*C) predicted pixels of every patch, in the model's input normalisation (per-patch
            normalised with norm_pix_loss); `unpatchify` turns them into images.
        mask: (B, L) 1 where the patch was hidden from the encoder, 0 where it was seen.
        ids_restore: (B, L) the permutation that undoes the shuffle (argsort of the argsort of the noise).
    """

    loss: Tensor
    logits: Tensor
    mask: Tensor
    ids_restore: Tensor


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder around a vitkit ViT encoder.

    Parameters: `encoder.*` (a VisionTransformer without head; its `pos_embed` holds the fixed sin-cos table and is
    not trained), `decoder_embed`, `mask_token`, `decoder_blocks.*`, `decoder_norm`, `decoder_pred`; the decoder's
    own sin-cos table is the buffer `decoder_pos_embed`.

    Args:
        cfg: architecture; `MAEConfig()` (ViT-B/16 encoder, 8-block 512-wide decoder) when None.
        **overrides: fields of MAEConfig to change.
    """

    family = "mae"

    def __init__(self, cfg: MAEConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        overrides = config_kwargs(MAEConfig, overrides, base=cfg)
        cfg = MAEConfig(**overrides) if cfg is None else dataclasses.replace(cfg, **overrides)
        self.cfg = cfg
        self.preprocess = Preprocess(input_size=cfg.img_size)
        self.encoder = VisionTransformer(cfg.encoder_config())
        self.grid = self.encoder.native_grid
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_size = cfg.patch_size
        # Fixed sin-cos positions, as in the paper and transformers' ViTMAE (a parameter that is never trained).
        self.encoder.pos_embed.requires_grad_(False)

        D, Dd = cfg.decoder_embed_dim, cfg.decoder_depth
        norm_layer = get_norm(cfg.norm_layer, cfg.norm_eps)
        self.decoder_embed = nn.Linear(cfg.embed_dim, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("decoder_pos_embed", mae_sincos_table(self.grid, D), persistent=True)
        self.decoder_blocks = nn.ModuleList(
            Block(
                D,
                cfg.decoder_num_heads,
                mlp_ratio=cfg.decoder_mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                norm_layer=norm_layer,
                act_layer=get_layer("act", cfg.act_layer),
                mlp_layer=get_layer("mlp", cfg.mlp_layer),
            )
            for _ in range(Dd)
        )
        self.decoder_norm = norm_layer(D)
        self.decoder_pred = nn.Linear(D, cfg.patch_size**2 * cfg.in_chans)  # pixels of one patch
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """The MAE reference's init: fixed sin-cos tables, xavier-uniform linear layers and patch projection (as a
        linear layer), normal(0.02) class and mask tokens, zero biases."""
        with torch.no_grad():
            self.encoder.pos_embed.copy_(mae_sincos_table(self.grid, self.cfg.embed_dim))
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --- the contract vitkit's tools read ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """0: the model reconstructs pixels; it has no classifier."""
        return 0

    def describe(self) -> MAEConfig:
        return dataclasses.replace(self.cfg)

    def save_pretrained(self, directory, **extra: Any) -> None:
        """Write `config.json` + `model.safetensors` to `directory` (atomically); see `vitkit.load_model`."""
        save_pretrained(self, directory, **extra)

    @property
    def num_features(self) -> int:
        """Width of the encoder's pooled features (`forward_head(..., pre_logits=True)`)."""
        return self.encoder.num_features

    def forward_features(self, images: Tensor) -> Tensor:
        """The encoder on every patch (no masking): tokens (B, 1 + L, D), normed. With `forward_head(pre_logits=
        True)` this is the feature contract `vitkit embed`, `eval --knn` and `probe` read, so an MAE checkpoint is
        probed as it is (the class token's features, as the paper's linear probe)."""
        return self.encoder.forward_features(images)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, N, D) -> the encoder's pooled features (B, D); `pre_logits=True` is required.

        Raises:
            ValueError: pre_logits=False (an MAE has no classifier to give logits).
        """
        if not pre_logits:
            raise ValueError(
                "a masked autoencoder has no classifier: use forward_head(x, pre_logits=True) for features, or "
                "fine-tune its encoder (encoder_model(num_classes), or vitkit.load_model(dir, num_classes=N))"
            )
        return self.encoder.forward_head(x, pre_logits=True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (encoder and decoder)."""
        self.grad_checkpointing = bool(enable)
        self.encoder.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Tokens are not weight-decayed (the position tables are not trained at all)."""
        return {"encoder.cls_token", "mask_token"}

    # --- pixels <-> patches --------------------------------------------------------------------------------
    def patchify(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) -> patches (B, L, p*p*C), pixels in (row, column, channel) order within a patch."""
        B, C, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, H', p, W', p)
        x = x.permute(0, 2, 4, 3, 5, 1)  # (B, H', W', p, p, C)
        return x.reshape(B, (H // p) * (W // p), p * p * C)  # (B, L, p*p*C)

    def unpatchify(self, patches: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Patches (B, L, p*p*C) -> images (B, C, H, W); `size` (H, W) defaults to the model's input size."""
        H, W = self.cfg.img_size if size is None else size
        p, C = self.patch_size, self.cfg.in_chans
        B, L, _ = patches.shape
        if L != (H // p) * (W // p):
            raise ValueError(f"{L} patches do not tile a {H}x{W} image with {p}-pixel patches")
        x = patches.reshape(B, H // p, W // p, p, p, C)  # (B, H', W', p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, H', p, W', p)
        return x.reshape(B, C, H, W)

    # --- masking, encoder, decoder -------------------------------------------------------------------------
    def num_visible(self, num_patches: int | None = None) -> int:
        """Patches the encoder sees: int(L * (1 - mask_ratio)), transformers' rounding."""
        L = self.num_patches if num_patches is None else num_patches
        return int(L * (1 - self.cfg.mask_ratio))

    def random_masking(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Keep a random subset of each image's patch tokens by sorting noise (lowest noise = kept).

        Args:
            x: patch tokens (B, L, D).
            noise: (B, L) values whose ascending order decides which patches stay visible; None = uniform random
                from torch's global generator (what training uses, so checkpoints carry the masking's state).

        Returns:
            visible tokens (B, L_keep, D), mask (B, L) with 1 = hidden, ids_restore (B, L).
        """
        B, L, D = x.shape
        keep = self.num_visible(L)
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        elif tuple(noise.shape) != (B, L):
            raise ValueError(f"noise must have shape (batch, patches) = ({B}, {L}), got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)  # (B, L) ascending noise first
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
        ids_keep = ids_shuffle[:, :keep]  # (B, L_keep)
        visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, L_keep, D)
        mask = torch.ones(B, L, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # (B, L) back in patch order
        return visible, mask, ids_restore

    def forward_encoder(self, images: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Images (B, C, H, W) at the model's size -> encoded (B, 1 + L_keep, D) class + visible tokens, normed;
        plus mask and ids_restore (see `random_masking`)."""
        size = tuple(images.shape[-2:])
        if size != tuple(self.cfg.img_size):
            raise ValueError(
                f"MAE input must be {self.cfg.img_size[0]}x{self.cfg.img_size[1]} (its fixed position tables), "
                f"got {size[0]}x{size[1]}"
            )
        enc = self.encoder
        tokens = enc.embed(images)  # (B, 1 + L, D): positions added to class token and patches alike
        visible, mask, ids_restore = self.random_masking(tokens[:, 1:], noise)
        x = torch.cat([tokens[:, :1], visible], dim=1)  # (B, 1 + L_keep, D)
        for blk in enc.blocks:  # no patch grid survives masking; MAE's attention does not need one
            x = self._block(blk, x)
        return enc.norm(x), mask, ids_restore

    def _block(self, blk: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Encoded tokens (B, 1 + L_keep, D) -> predicted pixels (B, L, p*p*C) for every patch."""
        x = self.decoder_embed(latent)  # (B, 1 + L_keep, Dd)
        B, n, Dd = x.shape
        L = ids_restore.shape[1]
        masked = self.mask_token.expand(B, L + 1 - n, -1).to(x.dtype)  # (B, L - L_keep, Dd)
        patches = torch.cat([x[:, 1:], masked], dim=1)  # (B, L, Dd) visible first, as shuffled
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # (B, L, Dd) patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)  # (B, 1 + L, Dd)
        for blk in self.decoder_blocks:
            x = self._block(blk, x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, L, p*p*C), class token dropped

    def target(self, images: Tensor) -> Tensor:
        """What the decoder is trained to predict: the patches (B, L, p*p*C), normalised per patch with
        norm_pix_loss (mean 0, variance 1 with the unbiased variance and eps 1e-6, as the reference)."""
        target = self.patchify(images)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def loss(self, images: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error per patch, averaged over the hidden patches (mask 1)."""
        per_patch = ((logits - self.target(images)) ** 2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: Tensor, noise: Tensor | None = None) -> MAEOutput:
        """Images (B, C, H, W) in the model's input normalisation -> `MAEOutput` (loss, logits, mask, ids_restore).

        Args:
            images: a batch at the model's input size (the position tables are fixed to its grid).
            noise: (B, L) to fix the masks (see `random_masking`); None draws them from torch's generator.

        Raises:
            ValueError: another input size, or noise of another shape.
        """
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        logits = self.forward_decoder(latent, ids_restore)
        return MAEOutput(loss=self.loss(images, logits, mask), logits=logits, mask=mask, ids_restore=ids_restore)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Images -> (masked input, reconstruction, mask) as images (B, C, H, W), for figures.

        The reconstruction shows the prediction on hidden patches and the input on visible ones (as the paper's
        figures). With norm_pix_loss the prediction is per-patch normalised, so it is put back on each patch's own
        mean and spread (known from the input, as in the MAE demo). The masked input has hidden patches at 0
        (the mean colour after normalisation). The mask image is 1 on hidden pixels.
        """
        out = self.forward(images, noise)
        pred = out.logits.float()
        if self.cfg.norm_pix_loss:
            patches = self.patchify(images.float())
            mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        size = tuple(images.shape[-2:])
        m = out.mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1])  # (B, L, p*p*C)
        mask_img = self.unpatchify(m.float(), size)  # (B, C, H, W), 1 = hidden
        recon = self.unpatchify(pred, size)
        x = images.float()
        return x * (1 - mask_img), x * (1 - mask_img) + recon * mask_img, mask_img

    # --- after pretraining ---------------------------------------------------------------------------------
    def encoder_model(self, num_classes: int = 0) -> VisionTransformer:
        """The encoder as a standalone ViT to fine-tune (a copy; the decoder is left behind).

        Its position table becomes an ordinary trainable one, initialised with the fixed sin-cos values, as MAE's
        fine-tuning does; a new head of `num_classes` outputs is added (0 = features only).
        """
        import copy

        vit = copy.deepcopy(self.encoder)
        vit.pos_embed.requires_grad_(True)
        if num_classes:
            vit.reset_classifier(num_classes)
        vit.preprocess = dataclasses.replace(self.preprocess, class_names=None)
        name = getattr(self, "model_name", None)
        if name:
            vit.model_name = name.removeprefix("mae_")
        return vit

    def adapt_state_dict(self, state: dict[str, Tensor], source_cfg: dict[str, Any], log=None) -> dict:
        """A state dict saved at another input size, made to fit: both position tables are fixed sin-cos, so they
        are recomputed for this model's grid (exactly what they would have been), everything else must match."""
        old = source_cfg.get("img_size")
        old = tuple(old) if isinstance(old, (list, tuple)) else (old, old)
        if old != tuple(self.cfg.img_size):
            state = dict(state)
            # Computed afresh: the model may have been built without initialising its tensors (`empty_model`).
            for key, dim in (
                ("encoder.pos_embed", self.cfg.embed_dim),
                ("decoder_pos_embed", self.cfg.decoder_embed_dim),
            ):
                dtype = state[key].dtype if key in state else torch.float32  # a bf16 checkpoint stays bf16
                state[key] = mae_sincos_table(self.grid, dim).to(dtype)
            if log is not None:
                log(f"MAE sin-cos position tables recomputed for {self.grid[0]}x{self.grid[1]} patches")
        return state


register_family("mae", MAEConfig, MaskedAutoencoderViT)


def mae_from_vit(name: str, **overrides: Any) -> MaskedAutoencoderViT:
    """An MAE whose encoder is the registered ViT `name` (e.g. "vit_nano_patch4_32"), with encoder and decoder
    fields overridden, e.g. `mae_from_vit("vit_nano_patch4_32", img_size=64, patch_size=8, decoder_depth=2)`.

    Raises:
        ValueError: `name` is not a plain ViT (family "vit"), or a field value MAE cannot use.
        TypeError: an unknown field.
    """
    from vitkit.models.registry import create_model, default_preprocess, model_family

    if model_family(name) != "vit":
        raise ValueError(f"MAE's encoder must be a ViT (family 'vit'); {name!r} is of family {model_family(name)!r}")
    mae_fields = {f.name for f in dataclasses.fields(MAEConfig)} - {f.name for f in dataclasses.fields(ViTConfig)}
    vit_overrides = {k: v for k, v in overrides.items() if k not in mae_fields}
    with torch.device("meta"):  # only the config is wanted
        base = create_model(name, **{**vit_overrides, "num_classes": 0}).cfg
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(ViTConfig)}
    model = MaskedAutoencoderViT(MAEConfig(**fields, **{k: v for k, v in overrides.items() if k in mae_fields}))
    model.model_name = f"mae_{name}"
    model.preprocess = Preprocess(**{**default_preprocess(name), "input_size": tuple(model.cfg.img_size)})
    return model
