"""DETR-style object detection on any backbone of the zoo (Carion et al. 2020, "End-to-End Object Detection with
Transformers").

Read top-down: the config, the decoder, `ViTDETR`, then its registration as a family.

The backbone's last feature map (through the model contract: `forward_intermediates(as_maps=True)` and
`feature_info`) is projected by a 1x1 convolution to the decoder width and flattened into a memory of H'*W' tokens
with fixed 2-D sin-cos positions. `num_queries` learned query embeddings attend to each other and to that memory in
a transformer decoder (DETR's post-norm layers, the query embedding added to queries and keys at every layer, one
final norm shared by every layer's output). Every decoder layer's output goes through the same class head (K + 1
logits, the last one meaning "no object") and box head (a 3-layer MLP, sigmoid -> centre x, centre y, width,
height normalised by the image size), so each layer can be given its own (auxiliary) loss.

There is no transformer encoder between backbone and decoder as in DETR's ResNet version: a ViT backbone is
already one, and for a CNN the decoder's cross-attention is the only global mixing (as in YOLOS-style detectors,
this trades some accuracy for speed at small scale).

The model outputs boxes; converting them to pixels, scoring and matching them to targets live in
`vitkit.train.tasks.detection` (and the box formats in `vitkit.data.boxes`), which sit above models.

config.json stays plain JSON: the backbone is stored by registered name plus its config overrides (as the hybrid
ViTs do) and rebuilt from them on load; its trained weights come back with the detector's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.layers.pos_embed import sincos_2d
from vitkit.models.base import Preprocess, config_kwargs, config_to_dict, model_label
from vitkit.models.registry import create_model, list_models, model_family, register_family
from vitkit.models.serialization import save_pretrained


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DETRConfig:
    """A DETR head on a zoo backbone. Defaults are DETR's scaled down for small images and CPUs."""

    backbone: str | None = "vit_nano_patch4_32"  # registered zoo model; None only while a foreign module is attached
    backbone_args: dict[str, Any] = field(default_factory=dict)  # its config overrides (JSON), e.g. {"img_size": 64}
    num_classes: int = 4  # object classes K; the class head has K + 1 outputs, the last one "no object"
    num_queries: int = 20  # object slots per image: a few times the most objects expected (DETR: 100 for COCO)
    hidden_dim: int = 128  # decoder width (DETR: 256); the backbone map is projected to it
    dec_layers: int = 3  # decoder layers, each with its own auxiliary loss (DETR: 6)
    dec_heads: int = 4  # attention heads of the decoder (DETR: 8)
    dec_ffn_dim: int = 512  # feed-forward width of the decoder (DETR: 2048)
    dec_dropout: float = 0.1  # dropout in the decoder, as DETR
    feature_index: int = -1  # which `feature_info` entry of the backbone feeds the decoder (-1 = the last)
    # Each query owns a learned reference point (cx, cy), spread over the image at init: its position encoding is
    # the memory's sin-cos encoding at that point (so cross-attention starts looking there), its content starts as
    # the feature map sampled there (two-stage Deformable DETR's idea: a query knows what is at its point before the
    # first layer), and its box is predicted relative to it (Conditional / Anchor-DETR). Plain DETR (False, zero
    # content, learned positions) needs hundreds of epochs to learn where to look.
    ref_points: bool = True
    category_ids: list[int] | None = None  # COCO category id of each class, for result files; None = class + 1

    def __post_init__(self) -> None:
        if self.backbone is not None and self.backbone not in list_models():
            import difflib

            close = difflib.get_close_matches(str(self.backbone), list_models(), n=5, cutoff=0.5)
            raise ValueError(
                f"backbone={self.backbone!r} is not a registered model; "
                + (f"closest: {', '.join(close)}" if close else "see vitkit.list_models()")
            )
        if not isinstance(self.backbone_args, dict):
            raise TypeError(f"backbone_args must be a dict of config overrides, got {self.backbone_args!r}")
        self.backbone_args = dict(self.backbone_args)
        for name in ("num_classes", "num_queries", "hidden_dim", "dec_layers", "dec_heads", "dec_ffn_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_dim % self.dec_heads:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be divisible by dec_heads={self.dec_heads}")
        if self.hidden_dim % 4:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be divisible by 4 (2-D sin-cos positions)")
        if not 0 <= self.dec_dropout < 1:
            raise ValueError(f"dec_dropout must be in [0, 1), got {self.dec_dropout}")
        if isinstance(self.feature_index, bool) or not isinstance(self.feature_index, int):
            raise ValueError(f"feature_index must be an int (a feature_info index), got {self.feature_index!r}")
        if self.category_ids is not None:
            ids = [int(c) for c in self.category_ids]
            if len(ids) != self.num_classes or len(set(ids)) != len(ids):
                raise ValueError(
                    f"category_ids must give {self.num_classes} distinct ids (one per class), got {self.category_ids}"
                )
            self.category_ids = ids


# ----------------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    """DETR's decoder layer (post-norm): self-attention among queries, cross-attention to the image memory, MLP.

    The query embedding is added to the queries and keys of both attentions (not to the values), the memory's
    position encoding to the keys of the cross-attention, at every layer: positions are never mixed into content.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, query_pos: Tensor, memory_pos: Tensor) -> Tensor:
        """tgt, query_pos (B, Q, D); memory (B, N, D); memory_pos (1, N, D) -> (B, Q, D)."""
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.cross_attn(tgt + query_pos, memory + memory_pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.drop2(attn))
        return self.norm3(tgt + self.drop3(self.mlp(tgt)))


class Decoder(nn.Module):
    """A stack of `DecoderLayer`s returning every layer's output, each through one shared final norm (DETR)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(dim, heads, ffn_dim, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt: Tensor, memory: Tensor, query_pos: Tensor, memory_pos: Tensor) -> Tensor:
        """-> (L, B, Q, D), L = the number of layers."""
        outs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos, memory_pos)
            outs.append(self.norm(tgt))
        return torch.stack(outs)  # (L, B, Q, D)


class BoxMLP(nn.Module):
    """DETR's box head: Linear-ReLU-Linear-ReLU-Linear to 4 numbers (sigmoid applied by the model)."""

    def __init__(self, dim: int, out: int = 4, depth: int = 3) -> None:
        super().__init__()
        dims = [dim] * depth + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
def _backbone_from_module(module: nn.Module) -> tuple[str | None, dict[str, Any], str | None]:
    """(registered name, config overrides, None) for a zoo model; (None, {}, why) for a module config.json cannot
    describe (the reason is raised only when the detector is saved)."""
    name = getattr(module, "model_name", None)
    family = getattr(module, "family", None)
    if name is None or name not in list_models() or model_family(name) != family or not hasattr(module, "describe"):
        why = (
            f"its backbone is a {type(module).__name__} module that is not a registered vitkit model (config.json "
            "stores the backbone by registered name and config overrides, to rebuild it on load); build the backbone "
            "with vitkit.create_model(name, ...) or pass its name, or save this model's state_dict with torch.save"
        )
        return None, {}, why
    args = config_to_dict(module.describe())
    args["num_classes"] = 0
    return name, args, None


def sincos_at(points: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """`sincos_2d`'s encoding at fractional grid coordinates: points (..., 2) as (x, y) in grid cells -> (..., dim).

    At integer points it equals `sincos_2d`'s rows, so a query encoded at a point matches the memory tokens there.
    """
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=points.dtype, device=points.device) / (dim // 4))
    x = points[..., :1] * omega  # (..., dim/4)
    y = points[..., 1:] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=-1)  # (..., dim)


def _grid_points(n: int) -> Tensor:
    """n points (x, y) in (0, 1) covering the unit square row by row (a near-square grid, cell centres)."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    ys, xs = torch.meshgrid((torch.arange(rows) + 0.5) / rows, (torch.arange(cols) + 0.5) / cols, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)[:n]  # (n, 2)


class ViTDETR(nn.Module):
    """DETR on a zoo backbone: `ViTDETR(vit_model, num_classes=4, num_queries=20)`.

    Args:
        backbone: a registered model name ("vit_nano_patch4_32", "resnet18" ...) built with `backbone_args`, or a
            built model with the vitkit contract (`forward_intermediates`, `feature_info`), e.g. a pretrained
            classifier: its classifier is removed (`reset_classifier(0)`), its weights kept. A `DETRConfig` here is
            the whole config (as `vitkit.load_model` passes it).
        num_classes: object classes K (without "no object").
        cfg: a `DETRConfig` to start from.
        **overrides: DETRConfig fields (`num_queries`, `hidden_dim`, `dec_layers`, `category_ids` ...).

    Input: images (B, C, H, W) that the backbone accepts (a ViT: multiples of its patch size; any aspect ratio).
    Output: a dict with "pred_logits" (B, Q, K + 1), "pred_boxes" (B, Q, 4) as sigmoid cx, cy, w, h normalised by
    the image size, and "aux_outputs": a list of dec_layers - 1 dicts with the same two keys, from the earlier
    decoder layers (for the auxiliary losses).

    Raises:
        TypeError: a backbone that is neither a name nor a module with the contract.
        ValueError: bad config values, a feature_index the backbone does not have; at save time, a backbone
            module config.json cannot describe.
    """

    family = "detr"

    def __init__(
        self,
        backbone: str | nn.Module | DETRConfig | None = None,
        num_classes: int | None = None,
        cfg: DETRConfig | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if isinstance(backbone, DETRConfig):
            if cfg is not None:
                raise TypeError("ViTDETR: give the config once (as the first argument or as cfg=)")
            backbone, cfg = None, backbone
        if num_classes is not None:
            overrides["num_classes"] = num_classes
        module, self._unsavable = None, None
        if isinstance(backbone, str):
            overrides["backbone"] = backbone
        elif isinstance(backbone, nn.Module):
            if not (hasattr(backbone, "forward_intermediates") and hasattr(backbone, "feature_info")):
                raise TypeError(
                    f"ViTDETR: the backbone {model_label(backbone)} lacks forward_intermediates/feature_info (the "
                    "model contract); use a vitkit zoo model"
                )
            module = backbone
            if hasattr(module, "reset_classifier") and getattr(module, "num_classes", 0):
                module.reset_classifier(0)  # its classifier is unused; described without it
            name, args, self._unsavable = _backbone_from_module(module)
            overrides.update(backbone=name, backbone_args=args)
        elif backbone is not None:
            raise TypeError(
                f"ViTDETR: backbone must be a registered model name or an nn.Module, got {type(backbone).__name__}"
            )
        overrides = config_kwargs(DETRConfig, overrides)
        cfg = DETRConfig(**overrides) if cfg is None else dataclasses.replace(cfg, **overrides)
        if module is None:
            if cfg.backbone is None:
                raise ValueError("ViTDETR: backbone=None needs a backbone module; pass a registered name or a module")
            module = create_model(cfg.backbone, **{**cfg.backbone_args, "num_classes": 0})
        self.cfg = cfg
        self.backbone = module
        info = module.feature_info
        if not -len(info) <= cfg.feature_index < len(info):
            raise ValueError(
                f"feature_index={cfg.feature_index} is out of range: the backbone {model_label(module)} has "
                f"{len(info)} feature_info entries (use -{len(info)}..{len(info) - 1})"
            )
        self._feature = cfg.feature_index % len(info)
        D = cfg.hidden_dim
        self.input_proj = nn.Conv2d(int(info[self._feature]["num_chs"]), D, kernel_size=1)
        self.query_embed = nn.Embedding(cfg.num_queries, D)
        # Reference points in logit space (sigmoid -> image fraction); unused parameters are not created.
        self.ref_points = nn.Parameter(torch.logit(_grid_points(cfg.num_queries))) if cfg.ref_points else None
        self.decoder = Decoder(D, cfg.dec_heads, cfg.dec_ffn_dim, cfg.dec_dropout, cfg.dec_layers)
        self.class_embed = nn.Linear(D, cfg.num_classes + 1)
        self.bbox_embed = BoxMLP(D)
        self._pos_cache: dict[tuple[int, int], Tensor] = {}
        pre = getattr(module, "preprocess", None)
        # The detector runs at its backbone's input size and normalisation until training sets its own.
        self.preprocess = dataclasses.replace(pre) if pre is not None else Preprocess()
        self.preprocess.crop_fraction = 1.0  # boxes cover the whole image: eval resizes, never crops
        self.model_name = f"detr_{getattr(module, 'model_name', None) or type(module).__name__}"
        self._init_heads()

    def _init_heads(self) -> None:
        # The last box layer starts at zero: every query begins at a box half the image's size (sigmoid(0) = 0.5)
        # centred on its reference point (or the image centre), which the matcher can pair with any nearby object,
        # instead of at random extreme boxes.
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    # --- contract -------------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Object classes K (the class head has K + 1 outputs)."""
        return self.cfg.num_classes

    def describe(self) -> DETRConfig:
        """The config of the model as it is now, for saving.

        Raises:
            ValueError: the backbone was given as a module config.json cannot describe (naming why).
        """
        if self._unsavable is not None:
            raise ValueError(f"cannot save this ViTDETR: {self._unsavable}")
        args = config_to_dict(self.backbone.describe()) if hasattr(self.backbone, "describe") else {}
        args["num_classes"] = 0
        return dataclasses.replace(self.cfg, backbone_args=args)

    def save_pretrained(self, directory, **extra) -> None:
        """Write `config.json` + `model.safetensors` to `directory` (atomically); see `vitkit.load_model`."""
        save_pretrained(self, directory, **extra)

    def is_classifier(self, name: str) -> bool:
        """Everything but the backbone is the detection head (it gets `head_lr_mult`, e.g. a higher LR for a
        fresh decoder on a pretrained backbone)."""
        return not name.startswith("backbone.")

    def no_weight_decay(self) -> set[str]:
        inner = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{n}" for n in inner} | {"query_embed.weight", "ref_points"}

    @property
    def num_layer_ids(self) -> int:
        """The backbone's layer ids; the detection head shares the last one (with the backbone's own head)."""
        return int(getattr(self.backbone, "num_layer_ids", 1))

    def layer_id(self, name: str) -> int:
        """Layer id for layer-wise LR decay and freezing: the backbone's ids, the detection head the last."""
        if name.startswith("backbone.") and hasattr(self.backbone, "layer_id"):
            return self.backbone.layer_id(name.removeprefix("backbone."))
        return self.num_layer_ids - 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(enable)

    # --- forward --------------------------------------------------------------------------------------------------
    def _positions(self, grid: tuple[int, int], like: Tensor) -> Tensor:
        """Fixed 2-D sin-cos positions (1, H'*W', D) of a feature grid, cached per grid."""
        if grid not in self._pos_cache:
            self._pos_cache[grid] = sincos_2d(grid, self.cfg.hidden_dim)[None]  # (1, N, D)
        return self._pos_cache[grid].to(device=like.device, dtype=like.dtype)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> the backbone's chosen feature map projected to (B, D, H', W')."""
        feat = self.backbone.forward_intermediates(x, indices=[self._feature], as_maps=True, norm=True)[0]
        return self.input_proj(feat)  # (B, D, H', W')

    def forward(self, x: Tensor) -> dict[str, Any]:
        src = self.forward_features(x)
        B, D, h, w = src.shape
        memory = src.flatten(2).transpose(1, 2)  # (B, H'*W', D)
        pos = self._positions((h, w), memory)  # (1, H'*W', D)
        query_pos = self.query_embed.weight  # (Q, D)
        if self.ref_points is not None:
            # The memory token of cell (i, j) is encoded at (j, i); the point (x, y) of the image lies at cell
            # coordinates (x * w - 0.5, y * h - 0.5).
            ref = self.ref_points.sigmoid()  # (Q, 2) x, y in (0, 1)
            cells = ref * torch.tensor([w, h], dtype=ref.dtype, device=ref.device) - 0.5
            query_pos = query_pos + sincos_at(cells, D).to(memory.dtype)
        query_pos = query_pos.unsqueeze(0).expand(B, -1, -1)  # (B, Q, D)
        tgt = torch.zeros_like(query_pos)
        if self.ref_points is not None:
            grid = (ref * 2 - 1).view(1, 1, -1, 2).expand(B, -1, -1, -1).to(src.dtype)  # (B, 1, Q, 2) in [-1, 1]
            tgt = F.grid_sample(src, grid, align_corners=False).squeeze(2).transpose(1, 2)  # (B, Q, D)
        hs = self.decoder(tgt, memory, query_pos, pos)  # (L, B, Q, D)
        logits = self.class_embed(hs)  # (L, B, Q, K + 1)
        delta = self.bbox_embed(hs)  # (L, B, Q, 4)
        if self.ref_points is not None:  # the centre moves from the reference point, in logit space
            delta = torch.cat([delta[..., :2] + self.ref_points, delta[..., 2:]], dim=-1)
        boxes = delta.sigmoid()  # (L, B, Q, 4) cx, cy, w, h in [0, 1]
        aux = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)]
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "aux_outputs": aux}


register_family("detr", DETRConfig, ViTDETR)
