"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Read top-down: the config, then the model (embed -> blocks -> norm -> head), then the registered variants.

The image is cut into patches, each patch becomes a token, a learned class token is prepended, position
embeddings are added, and a stack of pre-norm transformer blocks mixes the tokens. The class token's final state
(or the mean of the patch tokens) goes to a linear classifier. Parameter names follow the timm layout, which is
also the layout most published checkpoints use, so foreign weights map onto this model with few renames.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.layers import (
    Attention,
    Block,
    PosConv,
    attention_layers,
    capture_attention,
    check_image_size,
    check_layer_args,
    drop_path_rates,
    get_layer,
    get_norm,
    layer_options,
    resample_pos_embed,
    resample_pos_embed_traced,
    resolve_intermediates,
    run_with_captures,
    sincos_2d,
)
from vitkit.layers.tome import TomeSetting, check_tome_blocks, run_tome_blocks, tome_schedule
from vitkit.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    Preprocess,
    check_literal,
    check_savable_head,
    config_kwargs,
    follow_assigned_head,
    head_outputs,
)
from vitkit.models.contract import ContractMixin
from vitkit.models.registry import register_family, register_model

Pool = Literal["token", "avg", "none"]
PosEmbed = Literal["learn", "sincos", "peg", "none"]


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ViTConfig:
    """Architecture of a VisionTransformer. Defaults are ViT-B/16 at 224 px, as in the paper."""

    img_size: int | tuple[int, int] = 224  # native input (H, W); other multiples of the patch size also work
    patch_size: int = 16  # side of a square patch; 16 is the paper's accuracy/compute sweet spot
    in_chans: int = 3  # input channels (RGB)
    num_classes: int = 1000  # classifier outputs; 0 means no head (features only)
    embed_dim: int = 768  # token width D
    depth: int = 12  # number of transformer blocks
    num_heads: int = 12  # attention heads; D / heads = 64 in every published ViT
    mlp_ratio: float = 4.0  # MLP hidden width / D, 4 as in the original transformer
    qkv_bias: bool = True  # bias on the q, k, v projection (all ViT/DeiT checkpoints have it)
    qk_norm: bool = False  # LayerNorm on q and k per head (ViT-22B) for stable large-scale training
    class_token: bool = True  # prepend a learned [CLS] token (BERT style); off for pooled models
    reg_tokens: int = 0  # register tokens (Darcet et al. 2024) soak up the high-norm "artifact" attention
    distilled: bool = False  # DeiT distillation token with its own head, logits the mean of both (models/deit.py)
    pool: Pool = "token"  # how to pool tokens for the head: class token, mean of patch tokens, or none
    # learned table (ViT), fixed 2-D sin-cos (MAE, Simple ViT), CPVT's depthwise-conv generator after the first
    # block ("peg": no table, any input size), or none
    pos_embed: PosEmbed = "learn"
    fc_norm: bool | None = None  # LayerNorm after pooling instead of before; None = on exactly when pool="avg"
    drop_rate: float = 0.0  # dropout after the position embedding, in the MLP and after attention projection
    attn_drop_rate: float = 0.0  # dropout on attention probabilities
    drop_path_rate: float = 0.0  # stochastic depth at the last block, rising linearly from 0 (DeiT uses 0.1)
    head_drop_rate: float = 0.0  # dropout on the pooled features just before the classifier
    init_values: float | None = None  # LayerScale initial gain; None disables LayerScale (as in ViT/DeiT)
    norm_eps: float = 1e-6  # LayerNorm epsilon: 1e-6 in the JAX/timm models, 1e-12 in transformers' ViT
    # Pluggable layers, by name (see vitkit.layers.create): names keep config.json plain JSON.
    attn_layer: str = "mha"  # token mixer; "mha" = global multi-head self-attention with the fused kernel
    attn_args: dict[str, Any] = field(default_factory=dict)  # options for the attention variant (JSON values)
    mlp_layer: str = "mlp"  # "mlp" (ViT) or "swiglu" (gated, as in EVA-02 / LLaMA)
    act_layer: str = "gelu"  # MLP activation; exact GELU as in ViT/BERT
    norm_layer: str = "layernorm"  # block and final norm; "rmsnorm" drops the mean and bias
    embed_layer: str = "patch"  # image -> tokens; "patch" = non-overlapping strided convolution
    embed_args: dict[str, Any] = field(default_factory=dict)  # options for the embedding (JSON), e.g. kernel_size
    # FlexiViT: the patch size the model runs at (`set_patch_size`), the kernel PI-resized from the trained one
    # (patch_size); None = patch_size. Only for embed_layer="patch".
    run_patch_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):
            self.img_size = (self.img_size, self.img_size)
        self.img_size = tuple(int(s) for s in self.img_size)
        check_literal("pool", self.pool, Pool)
        check_literal("pos_embed", self.pos_embed, PosEmbed)
        for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no head), got {self.num_classes}")
        if self.reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, got {self.reg_tokens}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pool == "token" and not self.class_token:
            raise ValueError("pool='token' needs class_token=True; use pool='avg' for a model without a class token")
        if self.distilled and not self.class_token:
            raise ValueError("distilled=True needs class_token=True (DeiT has both tokens)")
        if self.distilled and self.pool != "token":
            raise ValueError(
                f"distilled=True reads the class and distillation tokens, so pool must be 'token', got {self.pool!r}"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.init_values is not None and self.init_values <= 0:
            raise ValueError(f"init_values must be positive (or None to disable LayerScale), got {self.init_values}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate", "head_drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        check_image_size(self.img_size[0], self.img_size[1], (self.patch_size, self.patch_size))
        if not isinstance(self.embed_args, dict):
            raise TypeError(f"embed_args must be a dict of options, got {self.embed_args!r}")
        self.embed_args = dict(self.embed_args)
        if self.embed_layer == "convstem":
            # The conv stem's name before issue 9 named it "conv_stem"; it then had GELU where the paper has ReLU.
            # Configs saved under the old name load as the model they were trained as.
            self.embed_layer = "conv_stem"
            self.embed_args = {"act": "gelu", **self.embed_args}
        if self.run_patch_size is not None:
            check_run_patch_size(self.run_patch_size, self.img_size, self.embed_layer)
            if self.run_patch_size == self.patch_size:
                self.run_patch_size = None  # one spelling for "the trained size", so configs compare equal
        for kind in ("attn", "mlp", "act", "norm", "embed"):
            get_layer(kind, getattr(self, f"{kind}_layer"))  # a ValueError listing the known names
        if not isinstance(self.attn_args, dict):
            raise TypeError(f"attn_args must be a dict of options, got {self.attn_args!r}")
        self.attn_args = dict(self.attn_args)
        check_layer_args("attn", self.attn_layer, self.attn_args)
        check_layer_args("embed", self.embed_layer, self.embed_args)


def check_run_patch_size(patch_size: Any, img_size: tuple[int, int], embed_layer: str) -> None:
    """Refuse a FlexiViT patch size that is not an int >= 1 dividing both image sides, or an embedding that cannot
    change its patch size.

    Raises:
        TypeError: not an int.
        ValueError: < 1, not dividing the image, or embed_layer other than "patch" (each named).
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        raise TypeError(f"patch size must be an int, got {patch_size!r}")
    if patch_size < 1:
        raise ValueError(f"patch size must be >= 1, got {patch_size}")
    if embed_layer != "patch":
        raise ValueError(
            f"the patch size can change at run time (FlexiViT) only for embed_layer='patch', not {embed_layer!r}: "
            "the PI-resize applies to a single linear patch projection"
        )
    for name, side in zip(("height", "width"), img_size):
        if side % patch_size:
            divisors = [d for d in range(1, side + 1) if img_size[0] % d == 0 and img_size[1] % d == 0]
            raise ValueError(
                f"patch size {patch_size} does not divide the image {name} {side} (img_size {img_size[0]}x"
                f"{img_size[1]}); patch sizes that do: {divisors}"
            )


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class VisionTransformer(ContractMixin, nn.Module):
    """Vision Transformer classifier.

    Token layout: [class, distillation, registers..., patches...]; `num_prefix_tokens` counts the leading
    non-patch tokens. Position embeddings cover the class/distillation tokens and the patch grid; registers
    have none, as in "Vision Transformers Need Registers".

    Args:
        cfg: architecture; `ViTConfig()` (ViT-B/16) when None.
        **overrides: fields of ViTConfig to change, e.g. `num_classes=10`. The tutorials' spellings are accepted
            too (`n_classes`, `n_heads`, `in_channels`, `dropout`, `num_layers`, `mlp_dim`, lucidrains'
            `image_size`/`dim`/`heads`/`channels`); anything else is a TypeError listing the accepted names.
    """

    family = "vit"

    def __init__(self, cfg: ViTConfig | None = None, **overrides):
        super().__init__()
        overrides = config_kwargs(ViTConfig, overrides, base=cfg)
        # A private copy: reset_classifier edits the config, and two models must never share one.
        cfg = ViTConfig(**overrides) if cfg is None else dataclasses.replace(cfg, **overrides)
        self.cfg = cfg
        self.preprocess = Preprocess(input_size=cfg.img_size)
        D = cfg.embed_dim
        self.embed_dim = self.num_features = D
        self.grad_checkpointing = False
        self.tome_r: list[int] = []  # token merges per block (set_tome); a runtime setting, not in config.json
        self._pos_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # grid -> table, a few recent grids

        norm_layer = get_norm(cfg.norm_layer, cfg.norm_eps)
        # Patches -> tokens, plus the extra tokens.
        self.patch_embed = self.build_patch_embed(cfg)
        self.native_grid = self.patch_embed.grid_size(*cfg.img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, D)) if cfg.reg_tokens else None
        self.num_pos_prefix = int(cfg.class_token) + int(cfg.distilled)  # prefix tokens that get a position
        self.num_prefix_tokens = self.num_pos_prefix + cfg.reg_tokens
        num_pos = self.num_pos_prefix + self.native_grid[0] * self.native_grid[1]
        if cfg.pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, D))
        else:
            self.pos_embed = None
        # CPVT puts its generator after the first block (its best place); with one block that would be after the
        # last, where the class token no longer reads the patches, so there it goes before the block.
        self.pos_block = PosConv(D) if cfg.pos_embed == "peg" else None
        self.pos_block_index = min(1, cfg.depth - 1)  # the block whose input the generator changes
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self._pos_src: torch.Tensor | None = None  # the learned table the cached resamples were made from

        # The transformer.
        dpr = drop_path_rates(cfg.drop_path_rate, cfg.depth)
        attn_args = self._attn_args(cfg)  # once for all blocks
        self.blocks = nn.ModuleList(
            Block(
                D,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                qk_norm=cfg.qk_norm,
                proj_drop=cfg.drop_rate,
                attn_drop=cfg.attn_drop_rate,
                drop_path=dpr[i],
                init_values=cfg.init_values,
                norm_layer=norm_layer,
                act_layer=get_layer("act", cfg.act_layer),
                attn_layer=get_layer("attn", cfg.attn_layer),
                mlp_layer=get_layer("mlp", cfg.mlp_layer),
                attn_args=attn_args,
            )
            for i in range(cfg.depth)
        )
        # With avg pooling the norm moves after pooling (fc_norm), as in BEiT/MAE fine-tuning.
        use_fc_norm = cfg.pool == "avg" if cfg.fc_norm is None else cfg.fc_norm
        self.norm = nn.Identity() if use_fc_norm else norm_layer(D)
        self.fc_norm = norm_layer(D) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.head_drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.head_dist = None
        if cfg.distilled:
            self.head_dist = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()
        if cfg.run_patch_size is not None:
            self.set_patch_size(cfg.run_patch_size)

    def _attn_args(self, cfg: ViTConfig) -> dict[str, Any]:
        """The attention options: `cfg.attn_args`, plus the model's native patch grid for a variant whose parameters
        are sized by a `grid_size` option (the relative-position tables) when the config leaves it out, so the tables
        fit the model's own grid. It is written into the config (and so config.json): loading the model at another
        `img_size` keeps the tables' size, and the layer resamples them to the grid it sees."""
        args = dict(cfg.attn_args)
        if "grid_size" in layer_options("attn", cfg.attn_layer) and "grid_size" not in args:
            args["grid_size"] = list(self.native_grid)
            cfg.attn_args = dict(args)
        return args

    def build_patch_embed(self, cfg: ViTConfig) -> nn.Module:
        """The image -> tokens layer named by `cfg.embed_layer` with `cfg.embed_args`; a family whose embedding
        needs more than the config's numbers (the hybrids' CNN backbone) overrides this."""
        return get_layer("embed", cfg.embed_layer)(cfg.patch_size, cfg.in_chans, cfg.embed_dim, **cfg.embed_args)

    # --- FlexiViT -------------------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        """The patch size the model runs at (`set_patch_size`); `cfg.patch_size` is the trained kernel's."""
        return self.patch_embed.patch_size[0]

    def set_patch_size(self, patch_size: int) -> None:
        """Run at another patch size (FlexiViT, Beyer et al. 2023), e.g. a model trained at 8 at 16 (4x fewer tokens).

        The trained kernel stays the parameter: every forward PI-resizes it (`vitkit.layers.pi_resize_kernel`), so
        `set_patch_size(cfg.patch_size)` gives back the trained model exactly and fine-tuning at the new size updates
        the trained kernel. The learned position table (at the trained grid, `native_grid`) is resampled to the new
        grid as for any input size. The size is saved (`cfg.run_patch_size`) and restored by `load_model`.

        Raises:
            TypeError: not an int.
            ValueError: < 1, not dividing the native image size `cfg.img_size`, or an embedding other than
                "patch" (overlap, conv stem and hybrid embeddings have no single patch kernel to resize).
        """
        check_run_patch_size(patch_size, self.cfg.img_size, self.cfg.embed_layer)
        self.patch_embed.set_patch_size(patch_size)
        self.cfg.run_patch_size = None if patch_size == self.cfg.patch_size else patch_size

    # --- the head as it is ------------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # `model.head = nn.Linear(D, 5)` (the tutorials' way to change the class count) must leave a model whose
        # config, `num_classes` and saved config.json describe the new head; reset_classifier does the same.
        if name == "head" and isinstance(value, nn.Module) and "cfg" in self.__dict__:
            follow_assigned_head(self, value)

    def describe(self) -> ViTConfig:
        """The config of the model as it is, for saving: checks that the heads can be rebuilt from it.

        Raises:
            ValueError: a head that config.json cannot describe (not a Linear from the embedding width, nor
                Identity), or DeiT heads of different sizes.
        """
        for name in ("head", "head_dist"):
            check_savable_head(name, getattr(self, name), self.embed_dim)
        if self.head_dist is not None and head_outputs(self.head_dist) != head_outputs(self.head):
            raise ValueError(
                f"DeiT heads differ: head has {head_outputs(self.head)} outputs, head_dist "
                f"{head_outputs(self.head_dist)}; assign both (or use reset_classifier) so their logits can be averaged"
            )
        return dataclasses.replace(self.cfg, num_classes=self.num_classes)

    # --- initialisation -------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """timm/JAX-style init: truncated normal 0.02 for linear layers and position table, zero biases."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for tok in (self.cls_token, self.dist_token, self.reg_token):
            if tok is not None:
                nn.init.normal_(tok, std=1e-6)
        # The patch projection is a linear layer on flattened patches: init it as one (lecun-normal like JAX).
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)
        # Layers inside the patch embedding keep their own init (a hybrid's CNN backbone may come pretrained).
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("patch_embed."):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --- shapes ---------------------------------------------------------------------------------------------
    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (H', W') for an input of this size; ValueError naming the side that does not divide."""
        return self.patch_embed.grid_size(height, width)

    def num_tokens(self, height: int, width: int) -> int:
        gh, gw = self.patch_grid(height, width)
        return self.num_prefix_tokens + gh * gw

    # --- embedding ------------------------------------------------------------------------------------------
    POS_CACHE_SIZE = 8  # recent grids kept; enough for multi-scale eval without growing without bound

    def _cache_get(self, key: tuple) -> torch.Tensor | None:
        table = self._pos_cache.get(key)
        if table is not None:
            self._pos_cache.move_to_end(key)
        return table

    def _cache_put(self, key: tuple, table: torch.Tensor) -> torch.Tensor:
        self._pos_cache[key] = table
        while len(self._pos_cache) > self.POS_CACHE_SIZE:
            self._pos_cache.popitem(last=False)
        return table

    def _pos_embed_for(self, grid: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Position table (1, pos_prefix + H'*W', D) for a patch grid: learned (resampled when not native) or sin-cos."""
        cfg = self.cfg
        if cfg.pos_embed in ("none", "peg"):  # PEG adds its positions after the first block (`_pos_block`)
            return None
        if torch.compiler.is_exporting():
            # torch.export with symbolic sizes (vitkit.deploy.export): no cache keyed by the grid and no branch on
            # it, or the exported program would hold the example size's table only.
            if cfg.pos_embed == "sincos":
                table = sincos_2d(grid, self.embed_dim)  # (H'*W', D)
                return torch.cat([table.new_zeros(self.num_pos_prefix, self.embed_dim), table])[None].to(dtype)
            return resample_pos_embed_traced(self.pos_embed, grid, self.native_grid, self.num_pos_prefix)
        if cfg.pos_embed == "sincos":
            # Fixed: computed exactly for any grid; the class/distillation tokens get a zero position.
            key = ("sincos", grid, dtype, device)
            table = self._cache_get(key)
            if table is None:
                table = sincos_2d(grid, self.embed_dim)  # (H'*W', D)
                table = torch.cat([table.new_zeros(self.num_pos_prefix, self.embed_dim), table])[None]
                table = self._cache_put(key, table.to(device=device, dtype=dtype))
            return table
        if grid == self.native_grid:
            return self.pos_embed
        # Resampling is differentiable: cache it only when no gradient can flow. A cached table is served only
        # while the learned table still equals the copy it was made from: `pos_embed.data.copy_(...)`, optimiser
        # steps, `load_state_dict` and reassignment all change the values (writes through `.data` do not even bump
        # the version counter), and one equality check of a (1, N, D) table costs far less than a resample.
        cacheable = not (torch.is_grad_enabled() and self.pos_embed.requires_grad)
        if not cacheable:
            return resample_pos_embed(self.pos_embed, grid, self.native_grid, self.num_pos_prefix)
        src = self.pos_embed.detach()
        if self._pos_src is None or self._pos_src.shape != src.shape or self._pos_src.dtype != src.dtype:
            fresh = False
        else:
            fresh = self._pos_src.device == src.device and torch.equal(self._pos_src, src)
        if not fresh:
            self._pos_cache = OrderedDict((k, v) for k, v in self._pos_cache.items() if k[0] != "learn")
            self._pos_src = src.clone()
        key = ("learn", grid, dtype, device)
        table = self._cache_get(key)
        if table is None:
            table = self._cache_put(key, resample_pos_embed(src, grid, self.native_grid, self.num_pos_prefix))
        return table

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> tokens (B, prefix + H'*W', D) with positions added."""
        height, width = x.shape[-2:]
        x = self.patch_embed(x)  # (B, H'*W', D); raises for a bad shape, size or channel count
        grid = self.patch_grid(height, width)
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]  # (B, 1, D) each
        x = torch.cat([*prefix, x], dim=1)  # (B, pos_prefix + H'*W', D)
        pos = self._pos_embed_for(grid, x.dtype, x.device)
        if pos is not None:
            x = x + pos
        if self.reg_token is not None:
            p = self.num_pos_prefix
            x = torch.cat([x[:, :p], self.reg_token.expand(B, -1, -1), x[:, p:]], dim=1)  # (B, prefix + H'*W', D)
        return self.pos_drop(x)

    # --- transformer ----------------------------------------------------------------------------------------
    def _pos_block(self, i: int, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens entering block i, with CPVT's generator applied when it sits before that block."""
        if self.pos_block is None or i != self.pos_block_index:
            return x
        return self.pos_block(x, grid, self.num_prefix_tokens)

    def _run_block(self, i: int, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self._pos_block(i, x, grid)
        blk = self.blocks[i]
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            # The backward pass recomputes the block after any capture context has closed: hand the captures in,
            # so the recomputation takes the same (explicit) attention path as the forward did.
            captures = [m.capture for m in attention_layers(blk)]
            return checkpoint(run_with_captures, blk, captures, x, grid, use_reentrant=False)
        return blk(x, grid)

    def forward_features(
        self, x: torch.Tensor, return_attention: bool | int | Sequence[int] = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Image -> normalised tokens (B, N, D); with `return_attention`, also the requested attention maps. With
        token merging on (`set_tome`), N is the number of tokens left."""
        if return_attention is False or return_attention is None:
            return self._features(x)[0]
        with capture_attention(self, return_attention) as rec:  # only requested layers leave the fused kernel
            x = self._features(x)[0]
        return x, rec.maps

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised tokens (B, N, D) and, with token merging on, each token's size (B, N, 1): how many original
        tokens it stands for (None without merging)."""
        size = x.shape[-2:]
        x = self.embed(x)  # checks the input first: its errors name the shape or size
        grid = self.patch_grid(*size)
        if any(self.tome_r):  # token merging: (B, N - merged, D), the grid no longer holds
            x, sizes = run_tome_blocks(self.blocks, x, self.tome_r, self.num_prefix_tokens, self.grad_checkpointing)
            return self.norm(x), None if sizes is None else sizes[..., None]
        for i in range(len(self.blocks)):
            x = self._run_block(i, x, grid)
        return self.norm(x), None

    def pool(self, x: torch.Tensor, token_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, N, D) -> pooled features (B, D) (or the tokens unchanged for pool='none'). `token_sizes`
        (B, N, 1), from token merging, weights the average by how many patches each token holds (as ToMe's
        reference does), so a merged model averages over the same patches as the unmerged one."""
        if self.cfg.pool == "token":
            return x[:, 0]
        if self.cfg.pool == "avg":
            p = self.num_prefix_tokens
            if token_sizes is None:
                return x[:, p:].mean(dim=1)
            w = token_sizes[:, p:].to(x.dtype)  # (B, N - p, 1)
            return (x[:, p:] * w).sum(dim=1) / w.sum(dim=1)
        return x

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False, token_sizes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tokens (B, N, D) -> logits (B, classes), or the pooled features when `pre_logits`; `token_sizes` as in
        `pool`."""
        if self.head_dist is not None:
            # DeiT: the class token feeds `head`, the distillation token feeds `head_dist`; average at inference.
            x_cls, x_dist = self.fc_norm(x[:, 0]), self.fc_norm(x[:, 1])
            if pre_logits:
                return (x_cls + x_dist) / 2
            return (self.head(self.head_drop(x_cls)) + self.head_dist(self.head_drop(x_dist))) / 2
        x = self.head_drop(self.fc_norm(self.pool(x, token_sizes)))
        return x if pre_logits else self.head(x)

    def forward(
        self, x: torch.Tensor, return_attention: bool | int | Sequence[int] = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Image (B, C, H, W) -> logits (B, classes).

        Args:
            x: images whose sides are multiples of the patch size.
            return_attention: False; True for every layer; or layer indices (negatives count from the end).
                When set, returns `(logits, attentions)` with one (B, heads, N, N) tensor per requested layer,
                in layer order. Unrequested layers keep the fused attention kernel.
        """
        if return_attention is False or return_attention is None:
            if self._last_block_reads_prefix_only():
                size = x.shape[-2:]
                x = self.embed(x)
                grid = self.patch_grid(*size)
                for i in range(len(self.blocks) - 1):
                    x = self._run_block(i, x, grid)
                # The head reads the class (and distillation) token only: the last block computes just those rows.
                keep = 1 + int(self.head_dist is not None)
                x = self._pos_block(len(self.blocks) - 1, x, grid)
                return self.forward_head(self.norm(self.blocks[-1].forward_queries(x, keep)))
            return self._head(*self._features(x))
        with capture_attention(self, return_attention) as rec:  # only requested layers leave the fused kernel
            feats, sizes = self._features(x)
        return self._head(feats, sizes), rec.maps

    def _head(self, feats: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
        """`forward_head`, given the token sizes only when merging produced them (a subclass's `forward_head`
        written without `token_sizes` keeps working for unmerged models)."""
        return self.forward_head(feats) if sizes is None else self.forward_head(feats, token_sizes=sizes)

    def _last_block_reads_prefix_only(self) -> bool:
        """Whether `forward` may compute only the prefix rows of the last block: inference (eval, no autograd),
        class-token pooling, vitkit's own block and attention with no capture, and no hook anywhere that would see
        the last block's or the final norm's tokens (module hooks there, or global module hooks)."""
        if self.training or torch.is_grad_enabled() or self.cfg.pool != "token" or not self.cfg.class_token:
            return False
        if any(self.tome_r):  # the last block's keys are merged tokens with sizes: the full tome path handles them
            return False
        blk = self.blocks[-1]
        if type(blk) is not Block or type(blk.attn) is not Attention or blk.attn.capture is not None:
            return False
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in (*blk.modules(), self.norm))

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, as_maps: bool = False, norm: bool = False
    ) -> list[torch.Tensor]:
        """Outputs of chosen blocks.

        Args:
            x: images (B, C, H, W).
            indices: an int n for the last n blocks, or block indices (negatives from the end); None = all.
            as_maps: return patch tokens as (B, D, H', W') maps (prefix tokens dropped) instead of (B, N, D), the
                form every family gives (see `feature_info`).
            norm: apply the final norm to each output (a no-op for models that norm after pooling, pool='avg').
        """
        if any(self.tome_r):
            raise ValueError(
                "forward_intermediates needs the patch grid, which token merging removes; call set_tome(0) first"
            )
        depth = len(self.blocks)
        wanted = resolve_intermediates(indices, depth, "block")
        gh, gw = self.patch_grid(x.shape[-2], x.shape[-1])
        x = self.embed(x)
        outs = []
        for i in range(max(wanted) + 1):  # stop after the last wanted block
            x = self._run_block(i, x, (gh, gw))
            if i in wanted:
                y = self.norm(x) if norm else x
                if as_maps:
                    B, _, D = y.shape
                    y = y[:, self.num_prefix_tokens :].transpose(1, 2).reshape(B, D, gh, gw)  # (B, D, H', W')
                outs.append(y)
        return outs

    # --- fine-tuning helpers --------------------------------------------------------------------------------
    def reset_classifier(self, num_classes: int, pool: Pool | None = None) -> None:
        """Replace the head (randomly initialised) for `num_classes` outputs; 0 removes it."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no head), got {num_classes}")
        if pool is not None:
            check_literal("pool", pool, Pool)
            if pool == "token" and not self.cfg.class_token:
                raise ValueError("pool='token' needs a class token, and this model has none")
            if self.head_dist is not None and pool != "token":
                raise ValueError(f"a distilled model pools its two tokens; pool={pool!r} is not possible")
            # fc_norm=None means "follow pool"; pin it so the saved config still describes these modules.
            if self.cfg.fc_norm is None:
                self.cfg.fc_norm = isinstance(self.fc_norm, nn.LayerNorm)
            self.cfg.pool = pool
        self.cfg.num_classes = num_classes
        like = dict(device=self.patch_embed.proj.weight.device, dtype=self.patch_embed.proj.weight.dtype)
        self.head = nn.Linear(self.embed_dim, num_classes, **like) if num_classes > 0 else nn.Identity()
        if self.head_dist is not None:
            self.head_dist = nn.Linear(self.embed_dim, num_classes, **like) if num_classes > 0 else nn.Identity()
        for h in (self.head, self.head_dist):
            if isinstance(h, nn.Linear):
                nn.init.trunc_normal_(h.weight, std=0.02)
                nn.init.zeros_(h.bias)
        if self.preprocess.class_names is not None and len(self.preprocess.class_names) != num_classes:
            self.preprocess.class_names = None

    def set_tome(self, r: TomeSetting) -> None:
        """Token merging (ToMe, `vitkit.layers.tome`): merge `r` patch tokens in every block (or `r[i]` in block i,
        a list of one int per block); 0 turns it off. A runtime setting like `set_grad_checkpointing`: the same
        weights run with or without it, so it is not saved in config.json. Prefix tokens are never merged; captured
        attention maps are unmerged to the original tokens. With merging on, `forward_features` returns fewer
        tokens (B, prefix + remaining patches, D) and `forward_intermediates` refuses (no patch grid is left).

        Raises:
            TypeError: r is not an int or a list of ints.
            ValueError: a negative r, a list whose length is not the depth, or an attention other than "mha".
        """
        sched = tome_schedule(r, len(self.blocks))
        if any(sched):
            check_tome_blocks(self.blocks, type(self).__name__, self.cfg.attn_layer)
            # Positions added inside the block stack (a conditional position generator) need the patch grid that
            # merging removes; only the embedding-time positions run with merging.
            if self.cfg.pos_embed not in ("learn", "sincos", "none"):
                raise ValueError(
                    f"token merging needs positions added at the embedding (pos_embed 'learn', 'sincos' or 'none'); "
                    f"this model has pos_embed={self.cfg.pos_embed!r}"
                )
        self.tome_r = sched if any(sched) else []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (less memory)."""
        self.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameters that should not be weight-decayed (besides norms and biases): position embeddings and prefix
        tokens, and the relative-position tables of the attention variants (as Swin, BEiT and MViTv2 do)."""
        names = {n for n in ("pos_embed", "cls_token", "dist_token", "reg_token") if getattr(self, n) is not None}
        tables = ("relative_position_bias_table", "rel_pos_h", "rel_pos_w")
        return names | {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in tables}

    def get_classifier(self) -> nn.Module:
        return self.head

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per block, as timm: `num_chs` (channels), `reduction` (stride in pixels), `module` (name)."""
        return [
            {"num_chs": self.embed_dim, "reduction": self.patch_embed.patch_size[0], "module": f"blocks.{i}"}
            for i in range(len(self.blocks))
        ]

    @property
    def num_layer_ids(self) -> int:
        """Layer ids run 0 (embeddings) .. depth (last block), then depth + 1 for the final norm and head."""
        return len(self.blocks) + 2

    def layer_id(self, name: str) -> int:
        """Layer id of a parameter, for layer-wise LR decay and freezing: 0 = embeddings, i+1 = block i,
        depth+1 = final norm and head (BEiT's numbering)."""
        if name.startswith(("cls_token", "dist_token", "reg_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("pos_block."):
            return self.pos_block_index  # with the block it follows (the embeddings when it precedes block 0)
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def is_classifier(self, name: str) -> bool:
        """Whether a parameter belongs to a classifier head (`head`, DeiT's `head_dist`), for head LR settings."""
        return name.startswith(("head.", "head_dist."))

    def adapt_state_dict(self, state: dict[str, torch.Tensor], source_cfg: dict[str, Any], log=None) -> dict:
        """A state dict saved from this family at another input size, made to fit this model.

        The learned position table is resampled (bicubic, `vitkit.layers.resample_pos_embed`) from the source
        grid to this model's native grid; everything else must already match.
        """
        old = source_cfg["img_size"]
        old = (old, old) if isinstance(old, int) else tuple(old)
        stride = self._source_stride(source_cfg)
        old_grid = (old[0] // stride[0], old[1] // stride[1])
        if "pos_embed" in state and self.native_grid != old_grid:
            state = dict(state)
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], self.native_grid, old_grid, self.num_pos_prefix)
            if log is not None:
                log(
                    f"resampled pos_embed from a {old_grid[0]}x{old_grid[1]} to a "
                    f"{self.native_grid[0]}x{self.native_grid[1]} grid"
                )
        return state

    def _source_stride(self, source_cfg: dict[str, Any]) -> tuple[int, int]:
        """Pixels per token of the model a state dict came from (`adapt_state_dict`): its patch size."""
        patch = int(source_cfg["patch_size"])
        return (patch, patch)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._pos_cache.clear()
        self._pos_src = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


register_family("vit", ViTConfig, VisionTransformer)


# ----------------------------------------------------------------------------------------------------------------
# Variants: the name says width, patch and native size. Widths follow the ViT/DeiT papers.
# ----------------------------------------------------------------------------------------------------------------
WIDTHS = {  # name: (embed_dim, depth, num_heads)
    "nano": (128, 6, 4),  # not in the papers: a CPU-friendly size for small datasets (digits, CIFAR demos)
    "tiny": (192, 12, 3),  # DeiT-Ti
    "small": (384, 12, 6),  # DeiT-S
    "base": (768, 12, 12),  # ViT-B
    "large": (1024, 24, 16),  # ViT-L
    "huge": (1280, 32, 16),  # ViT-H
}


def _vit(width: str, patch: int, size: int, **overrides) -> VisionTransformer:
    dim, depth, heads = WIDTHS[width]
    cfg = dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, img_size=size)
    base = ViTConfig(**cfg)  # spellings such as mlp_dim are resolved against this variant's width
    return VisionTransformer(base, **overrides)


# Default preprocessing of the weights each name denotes (timm's pretrained_cfg): the original JAX/AugReg ViTs
# normalise to [-1, 1] with a 0.9 centre crop (1.0 at 384 px); DeiT and DINO use the ImageNet statistics.
JAX_PRE = {"mean": INCEPTION_MEAN, "std": INCEPTION_STD, "crop_fraction": 0.9}
JAX_PRE_384 = {**JAX_PRE, "crop_fraction": 1.0}
IMAGENET_PRE = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_fraction": 0.875}


def _register_vit(name: str, width: str, patch: int, size: int, doc: str, pre: dict | None = None, **arch) -> None:
    def builder(**overrides) -> VisionTransformer:
        return _vit(width, patch, size, **{**arch, **overrides})

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    register_model(name, family="vit", preprocess=IMAGENET_PRE if pre is None else pre)(builder)


# ImageNet-scale variants.
_register_vit("vit_tiny_patch16_224", "tiny", 16, 224, "ViT-Ti/16 (DeiT-Ti), 5.7M params.", pre=JAX_PRE)
_register_vit("vit_tiny_patch16_384", "tiny", 16, 384, "ViT-Ti/16 at 384 px.", pre=JAX_PRE_384)
_register_vit("vit_small_patch16_224", "small", 16, 224, "ViT-S/16 (DeiT-S), 22M params.", pre=JAX_PRE)
_register_vit("vit_small_patch16_384", "small", 16, 384, "ViT-S/16 at 384 px.", pre=JAX_PRE_384)
_register_vit("vit_small_patch32_224", "small", 32, 224, "ViT-S/32.", pre=JAX_PRE)
_register_vit("vit_small_patch8_224", "small", 8, 224, "ViT-S/8 (DINO), 784 patches.")
_register_vit("vit_small_patch14_224_reg4", "small", 14, 224, "ViT-S/14 with 4 registers.", reg_tokens=4)
_register_vit("vit_base_patch16_224", "base", 16, 224, "ViT-B/16, 86.6M params.", pre=JAX_PRE)
_register_vit("vit_base_patch16_384", "base", 16, 384, "ViT-B/16 at 384 px (576 patches).", pre=JAX_PRE_384)
_register_vit("vit_base_patch32_224", "base", 32, 224, "ViT-B/32.", pre=JAX_PRE)
_register_vit("vit_base_patch8_224", "base", 8, 224, "ViT-B/8.", pre=JAX_PRE)
_register_vit("vit_base_patch16_224_reg4", "base", 16, 224, "ViT-B/16 with 4 registers.", reg_tokens=4)
_register_vit("vit_large_patch16_224", "large", 16, 224, "ViT-L/16, 304M params.", pre=JAX_PRE)
_register_vit("vit_large_patch16_384", "large", 16, 384, "ViT-L/16 at 384 px.", pre=JAX_PRE_384)
_register_vit("vit_large_patch32_224", "large", 32, 224, "ViT-L/32.", pre=JAX_PRE)
_register_vit("vit_large_patch14_224", "large", 14, 224, "ViT-L/14.", pre=JAX_PRE)
_register_vit("vit_huge_patch14_224", "huge", 14, 224, "ViT-H/14, 631M params.", pre=JAX_PRE)
# Average-pooled, class-token-free variant (as in "Simple ViT" / MAE fine-tuning) with fixed sin-cos positions.
_register_vit(
    "vit_small_patch16_224_gap", "small", 16, 224, "ViT-S/16, no class token, mean-pooled, sin-cos positions.",
    class_token=False, pool="avg", pos_embed="sincos",
)  # fmt: skip
# CIFAR-scale: 32 px input, 4 px patches -> an 8 x 8 grid of 64 tokens.
_register_vit("vit_nano_patch4_32", "nano", 4, 32, "A 1.2M-param ViT for 32 px images; trains in minutes on CPU.")
_register_vit("vit_tiny_patch4_32", "tiny", 4, 32, "ViT-Ti width for 32 px images (CIFAR).")
_register_vit("vit_small_patch4_32", "small", 4, 32, "ViT-S width for 32 px images (CIFAR).")
_register_vit("vit_base_patch4_32", "base", 4, 32, "ViT-B width for 32 px images (CIFAR).")


# The builders from the user's tutorials, as thin aliases over the registry.
def _alias(fn_name: str, registered: str):
    def create(n_classes: int | None = None, **overrides) -> VisionTransformer:
        from vitkit.models.registry import create_model

        if n_classes is not None:
            if "num_classes" in overrides and overrides["num_classes"] != n_classes:
                raise TypeError(f"{fn_name}: n_classes={n_classes} and num_classes={overrides['num_classes']} disagree")
            overrides["num_classes"] = n_classes
        return create_model(registered, **overrides)

    create.__name__ = create.__qualname__ = fn_name
    create.__doc__ = (
        f"`{registered}` with `n_classes` (or `num_classes`) outputs; any other config field may be overridden."
    )
    return create


VIT_SIZES = {  # the sizes create_vit_model understands -> registered name
    "tiny": "vit_tiny_patch16_224",
    "small": "vit_small_patch16_224",
    "base": "vit_base_patch16_224",
    "large": "vit_large_patch16_224",
    "huge": "vit_huge_patch14_224",
}
create_vit_tiny = _alias("create_vit_tiny", VIT_SIZES["tiny"])
create_vit_small = _alias("create_vit_small", VIT_SIZES["small"])
create_vit_base = _alias("create_vit_base", VIT_SIZES["base"])
create_vit_large = _alias("create_vit_large", VIT_SIZES["large"])
create_vit_huge = _alias("create_vit_huge", VIT_SIZES["huge"])


def create_vit_model(size_or_name: str = "base", **overrides) -> nn.Module:
    """A ViT by size ("tiny", "small", "base", "large", "huge": patch 16 at 224 px, huge patch 14) or by any
    registered name (`vitkit.list_models()`), e.g. `create_vit_model("small", n_classes=10)`.

    Raises:
        ValueError: neither a size nor a registered name (the error lists the sizes and close names).
    """
    from vitkit.models.registry import create_model, list_models

    name = VIT_SIZES.get(size_or_name, size_or_name)
    if name not in list_models():
        raise ValueError(
            f"create_vit_model({size_or_name!r}): not a size ({', '.join(VIT_SIZES)}) nor a registered model; "
            + str(_unknown_hint(size_or_name))
        )
    n_classes = overrides.pop("n_classes", None)
    if n_classes is not None:
        if "num_classes" in overrides and overrides["num_classes"] != n_classes:
            raise TypeError(
                f"create_vit_model: n_classes={n_classes} and num_classes={overrides['num_classes']} disagree"
            )
        overrides["num_classes"] = n_classes
    return create_model(name, **overrides)


def _unknown_hint(name: str) -> str:
    import difflib

    from vitkit.models.registry import list_models

    close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.5)
    return f"closest: {', '.join(close)}" if close else "see vitkit.list_models()"
