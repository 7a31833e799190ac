"""The interactive attention explorer: one self-contained HTML file per call, no network needed to open it.

    from vitkit.viz import write_explorer
    write_explorer("explorer.html", model, ["cat.jpg"])

The page shows the image under its patch grid. Hovering a patch shows that patch's attention over the image for
the chosen layer and head (or the mean of the heads); a switch shows the class token's rollout, attention flow
(with `flow=True`), gradient-weighted rollout and relevance maps instead, and the top-5 predictions pick the class those two explain.

A segmentation model or a detector (on a ViT backbone) gets the same page for its backbone, read from the mean
patch query, with its prediction (mask, or boxes) beside the image; its list holds the predicted classes, each with
its Seg-Grad-CAM map, or the best queries, each with its decoder cross-attention (`vitkit.explain.dense`).

Everything the page shows is computed here with one forward and one backward pass per image, and embedded:
the full attention tensors as uint8 (each query row scaled to its own maximum, which is how the page displays
it), the class maps as rounded floats, the image as a base64 PNG.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn

from vitkit._io import atomic_write_text
from vitkit._validate import check_choice
from vitkit.data.images import ImageLike
from vitkit.explain.maps import (
    HEAD_FUSIONS,
    check_attention_model,
    check_discard_ratio,
    check_layer,
    flow_from_attentions,
    forward_with_attention,
    grad_rollout_from_attentions,
    relevance_from_attentions,
    rollout_from_attentions,
)
from vitkit.layers import attention_layers
from vitkit.models.base import has_class_token, model_label, token_patch_size
from vitkit.viz._common import model_input
from vitkit.viz.explorer_template import PAGE, SCRIPT

DEFAULT_MAX_BYTES = 64 * 2**20  # embedded attention per page; beyond this, ask for fewer layers


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return _b64(buf.getvalue())


def _quantise_rows(a: torch.Tensor) -> np.ndarray:
    """Scale each row (last axis) to its own maximum and round to uint8."""
    peak = a.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a / peak * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def _unit_list(m: torch.Tensor) -> list[float]:
    """A map scaled to max 1 (negatives clipped) as a short JSON list."""
    m = m.float().clamp(min=0).flatten()
    m = m / m.max().clamp_min(1e-12)
    return [round(float(v), 4) for v in m]


def _colormap_lut(name: str = "turbo") -> str:
    lut = (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    return _b64(lut.tobytes())


def _describe(model: nn.Module) -> tuple[str, str]:
    layers = attention_layers(model)
    name = model_label(model)
    parts = [f"{len(layers)} blocks x {layers[0].num_heads} heads", f"patch {token_patch_size(model)}"]
    prefix = []
    if has_class_token(model):
        prefix.append("class")
    if getattr(model, "dist_token", None) is not None:
        prefix.append("distillation")
    registers = getattr(model, "reg_token", None)
    if registers is not None:
        prefix.append(f"{registers.shape[1]} registers")
    parts.append("prefix tokens: " + (", ".join(prefix) if prefix else "none (mean-pooled)"))
    query = "class token" if has_class_token(model) else "mean of the patch queries"
    return f"{name}: " + "; ".join(parts), query


def _attention_rows(attns: Sequence[torch.Tensor], layers: Sequence[int], P: int, cls: bool) -> np.ndarray:
    """Raw attention of every kept layer of the first image: heads plus their mean, queries = [the class query (or
    the mean patch query), patches], keys = patches -> uint8 (layers, heads + 1, 1 + patches, patches)."""
    rows = []
    for i in layers:
        a = attns[i][0]  # (heads, N, N)
        a = torch.cat([a, a.mean(dim=0, keepdim=True)])  # (heads + 1, N, N)
        patch_rows = a[:, P:, P:]  # (heads + 1, patches, patches)
        cls_row = a[:, :1, P:] if cls else patch_rows.mean(dim=1, keepdim=True)  # (heads + 1, 1, patches)
        rows.append(torch.cat([cls_row, patch_rows], dim=1))  # (heads + 1, 1 + patches, patches)
    return _quantise_rows(torch.stack(rows))


def image_entry(
    model: nn.Module,
    image: ImageLike | torch.Tensor,
    name: str,
    layers: Sequence[int],
    top_k: int = 5,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    flow: bool = False,
) -> dict[str, Any]:
    """Everything the page shows for one image (see the module docstring for the encoding)."""
    img, x = model_input(model, image)
    with torch.no_grad():
        logits = model(x)
    probs = logits.softmax(dim=-1)[0]
    k = min(top_k, probs.numel())
    top = probs.topk(k)
    # One forward + one backward: the image repeated once per explained class, each copy with its own target.
    batch = x.expand(k, -1, -1, -1)
    _, attns, grads, _ = forward_with_attention(model, batch, layers=True, target=top.indices, need_grads=True)
    grid = tuple(model.patch_grid(*x.shape[-2:]))
    P, cls = model.num_prefix_tokens, has_class_token(model)
    relevance = relevance_from_attentions(attns, grads, grid, P, cls)
    grad_roll = grad_rollout_from_attentions(
        attns, grads, grid, P, cls, head_fusion=head_fusion, discard_ratio=discard_ratio
    )
    rollout = rollout_from_attentions([a[:1] for a in attns], grid, P, cls, head_fusion, discard_ratio)[0]
    quantised = _attention_rows(attns, layers, P, cls)

    names = model.preprocess.class_names
    targets = []
    for j, (p, c) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
        targets.append(
            {
                "index": int(c),
                "name": names[c] if names is not None and c < len(names) else f"class {c}",
                "prob": round(float(p), 5),
                "relevance": _unit_list(relevance[j]),
                "grad_rollout": _unit_list(grad_roll[j]),
            }
        )
    entry = {
        "name": str(name),
        "width": int(img.shape[1]),
        "height": int(img.shape[0]),
        "png": _png(img),
        "attention": _b64(quantised.tobytes()),
        "rollout": _unit_list(rollout),
        "targets": targets,
    }
    if flow:
        entry["flow"] = _unit_list(
            flow_from_attentions([a[:1] for a in attns], grid, P, cls, head_fusion, discard_ratio)[0]
        )
    return entry


def dense_image_entry(
    model: nn.Module,
    image: ImageLike | torch.Tensor,
    name: str,
    layers: Sequence[int],
    top_k: int = 5,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    flow: bool = False,
) -> dict[str, Any]:
    """Everything the page shows for one image of a segmentation model or detector.

    The backbone's attention, rollout and flow are read from the mean patch query (`vitkit.explain.dense`). The
    listed "targets" are a segmentation model's predicted classes by pixel share, each with its Seg-Grad-CAM map
    ("gradcam"), or a detector's `top_k` queries by score, each with its decoder cross-attention
    ("cross_attention"). "prediction" is the predicted mask over the image, or the listed queries' boxes drawn on it.
    """
    from vitkit.explain._common import eval_mode
    from vitkit.explain.cross_attention import detr_cross_attention, query_detections
    from vitkit.explain.dense import dense_kind, prepare_dense_images, segmentation_cam
    from vitkit.viz._common import unnormalize
    from vitkit.viz.detection import draw_detections
    from vitkit.viz.segmentation import overlay_mask

    pre = model.preprocess
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        img, x = model_input(model, image)
    else:
        x = prepare_dense_images([image], model)[1]  # stretched to the input size, as `vitkit predict`
        img = unnormalize(x[0], pre.mean, pre.std)
    backbone = model.backbone
    _, attns, _, _ = forward_with_attention(backbone, x, layers=True)
    grid = tuple(backbone.patch_grid(*x.shape[-2:]))
    P = int(backbone.num_prefix_tokens)
    names = pre.class_names or [f"class {k}" for k in range(model.num_classes)]
    targets = []
    if dense_kind(model) == "segmentation":
        with eval_mode(model), torch.no_grad():
            mask = model(x).argmax(dim=1)[0]  # (h, w)
        counts = torch.bincount(mask.flatten(), minlength=model.num_classes)
        classes = [c for c in counts.argsort(descending=True).tolist() if counts[c] > 0][:top_k]
        cam = segmentation_cam(model, x.expand(len(classes), -1, -1, -1), target=torch.tensor(classes))
        for j, c in enumerate(classes):
            share = round(float(counts[c]) / mask.numel(), 5)
            targets.append({"index": c, "name": names[c], "prob": share, "gradcam": _unit_list(cam.maps[j])})
        prediction = overlay_mask(img, mask.to(torch.uint8).cpu().numpy(), model.num_classes)
    else:
        cross = detr_cross_attention(model, x)
        shown = query_detections(cross, [img.shape[:2]], threshold=0.0, max_queries=top_k)[0]
        for d in shown:
            label = names[d["label"]]
            targets.append({"index": d["label"], "name": f"{label} (query {d['query']})", "prob": d["score"],
                            "cross_attention": _unit_list(cross.maps[0, d["query"]])})  # fmt: skip
        drawn = [{**d, "class": names[d["label"]]} for d in shown]
        prediction = np.asarray(draw_detections(img, drawn))  # upscaled before drawing, so labels stay legible
    entry = {
        "name": str(name),
        "width": int(img.shape[1]),
        "height": int(img.shape[0]),
        "png": _png(img),
        "prediction": _png(prediction),
        "attention": _b64(_attention_rows(attns, layers, P, cls=False).tobytes()),
        "rollout": _unit_list(rollout_from_attentions(attns, grid, P, False, head_fusion, discard_ratio)[0]),
        "targets": targets,
    }
    if flow:
        entry["flow"] = _unit_list(flow_from_attentions(attns, grid, P, False, head_fusion, discard_ratio)[0])
    return entry


# Per kind of model: the maps the page offers, the one a click on a listed target shows, and that list's title.
_PAGE_MODES = {
    None: (("attention", "rollout", "flow", "grad_rollout", "relevance"), "relevance",
           "top predictions (click: explain that class)"),
    "segmentation": (("attention", "rollout", "flow", "gradcam"), "gradcam",
                     "predicted classes by share of the pixels (click: why that region is that class)"),
    "detection": (("attention", "rollout", "flow", "cross_attention"), "cross_attention",
                  "top queries by score (click: where that query looks)"),
}  # fmt: skip


def explorer_data(
    model: nn.Module,
    images: Sequence[ImageLike | torch.Tensor],
    names: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    top_k: int = 5,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    flow: bool = False,
) -> dict[str, Any]:
    """The JSON-ready data behind an explorer page (`render_explorer` turns it into HTML).

    Args:
        model: a ViT-style classifier (run in eval mode), or a segmentation model or detector on a ViT backbone
            (see `dense_image_entry`: the page then lists its predicted classes or detected queries and shows
            the predicted mask or boxes beside the image).
        images: images in any form `prepare_image` takes, or normalised (1, 3, H, W) tensors.
        names: label of each image on the page (defaults: file names, else "image i").
        layers: blocks whose raw attention is embedded (rollout and relevance always use every block); None = all.
        top_k: predictions listed, each with its relevance and gradient-rollout map.
        head_fusion: head fusion of the rollouts.
        discard_ratio: discard ratio of the rollouts.
        max_bytes: refuse to embed more attention than this (bytes, before base64) for all images together.
        flow: also embed the attention flow map (`vitkit.explain.flow_from_attentions`, same head fusion and discard
            ratio); it costs a max-flow per patch, about 10 s per image for ViT-S/16 at 224 px on one CPU core.
    """
    from vitkit.explain.dense import dense_kind

    kind = dense_kind(model)
    source = model.backbone if kind is not None else model  # a dense model's attention is its backbone's
    check_attention_model(source, "the explorer's attention maps" + (f" of a {kind} model" if kind else ""))
    if not images:
        raise ValueError("the explorer needs at least one image")
    check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
    check_discard_ratio(discard_ratio)
    attn_layers = attention_layers(source)
    depth, heads = len(attn_layers), attn_layers[0].num_heads
    layers = list(range(depth)) if layers is None else sorted({check_layer(i, depth) for i in layers})
    if names is None:
        names = [Path(im).name if isinstance(im, (str, os.PathLike)) else f"image {i}" for i, im in enumerate(images)]
    if len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    # Size check before any work: (layers, heads + 1, 1 + patches, patches) bytes per image.
    gh, gw = source.patch_grid(*model.preprocess.input_size)
    n = gh * gw
    need = len(images) * len(layers) * (heads + 1) * (n + 1) * n
    if need > max_bytes:
        raise ValueError(
            f"the attention of {len(images)} image(s) x {len(layers)} layers x {heads + 1} heads x {n + 1}x{n} tokens "
            f"is {need / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB limit; choose fewer layers "
            f"(e.g. layers=[-1]) or fewer images, or raise max_bytes"
        )
    description, query = _describe(source)
    if kind is not None:
        description = f"{type(model).__name__} ({kind}) on {description}"
        query = "mean of the patch queries"
    entry_fn = image_entry if kind is None else dense_image_entry
    entries = [
        entry_fn(model, im, nm, layers, top_k, head_fusion, discard_ratio, flow)
        for im, nm in zip(images, names, strict=True)
    ]
    patch = token_patch_size(source)
    grids = {(e["height"] // patch, e["width"] // patch) for e in entries}
    if len(grids) != 1:
        raise ValueError(f"all images on one page must share a patch grid, got grids {sorted(grids)}")
    return {
        "version": 1,
        "model": {
            "description": description,
            "query_name": query,
            "layers": layers,
            "heads": heads,
            "grid": list(grids.pop()),
            "patch": patch,
            "prefix_tokens": int(source.num_prefix_tokens),
            "kind": kind or "classification",
        },
        "settings": {
            "head_fusion": head_fusion,
            "discard_ratio": discard_ratio,
            "flow": bool(flow),
            "modes": list(_PAGE_MODES[kind][0]),
            "class_mode": _PAGE_MODES[kind][1],
            "targets_legend": _PAGE_MODES[kind][2],
        },
        "colormap": _colormap_lut(),
        "images": entries,
    }


def json_for_script(data: Any) -> str:
    """JSON that is safe inside a <script> element: no `<`, `>` or `&` (so no `</script>` or `<!--`)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def render_explorer(data: dict[str, Any], title: str = "vitkit attention explorer") -> str:
    """The self-contained HTML page for `explorer_data` output."""
    script_hash = "sha256-" + _b64(hashlib.sha256(SCRIPT.encode("utf-8")).digest())
    values = {
        "TITLE": html.escape(title, quote=True),
        "SCRIPT_HASH": script_hash,
        "SCRIPT": SCRIPT,
        "DATA": json_for_script(data),
    }
    # One pass, so text inside a substituted value is never itself treated as a placeholder.
    return re.sub(r"\{\{(TITLE|SCRIPT_HASH|SCRIPT|DATA)\}\}", lambda m: values[m.group(1)], PAGE)


def write_explorer(
    path: str | os.PathLike,
    model: nn.Module,
    images: Sequence[ImageLike | torch.Tensor],
    names: Sequence[str] | None = None,
    title: str | None = None,
    **kwargs: Any,
) -> Path:
    """Write the explorer for `images` to `path` (atomically) and return the path. See `explorer_data`."""
    data = explorer_data(model, images, names=names, **kwargs)
    if title is None:
        title = "vitkit explorer: " + ", ".join(e["name"] for e in data["images"])
    atomic_write_text(path, render_explorer(data, title=title))
    return Path(path)
