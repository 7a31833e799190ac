"""Grad-CAM (Selvaraju et al. 2017) for any model of the contract: CNNs, ViTs, hierarchical transformers.

    cam = grad_cam(model, images, target=None, layer=None)      # (B, H', W') on the chosen stage's grid

The feature map A of one stage (a `feature_info` entry, read by a forward hook on the module it names) is weighted
per channel by the spatial mean of d(target logit)/dA, summed over channels and clipped at zero:

    cam = relu( sum_c  mean_xy(dy/dA_c)  *  A_c )

The stage output may come as NCHW maps (CNNs), NHWC maps (Swin-style stages) or tokens (B, N, C) with prefix tokens
(ViTs): it is brought to (B, C, H', W') by its `num_chs`. For a ViT whose head reads the class token the default
stage is the second to last block: after the last block only the class token reaches the head, so the patch tokens
of the last block have no gradient (the usual choice, as in pytorch-grad-cam's ViT recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.explain._common import Target, _check_images, _upsample, eval_mode, resolve_targets
from vitkit.models.base import has_class_token, model_label


def default_gradcam_layer(model: nn.Module) -> int:
    """-2 for class-token models with more than one block (see the module docstring), else -1 (the last stage)."""
    info = _feature_info(model)
    return -2 if has_class_token(model) and len(info) > 1 else -1


def _feature_info(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if not info:
        raise TypeError(
            f"Grad-CAM needs feature_info (the model contract) to find a stage; {model_label(model)} has none"
        )
    return list(info)


def _as_maps(a: Tensor, channels: int, model: nn.Module, image_hw: tuple[int, int]) -> Tensor:
    """A stage output as (B, C, H', W'): NCHW kept, NHWC permuted, tokens stripped of prefix tokens and gridded."""
    if a.ndim == 4 and a.shape[1] == channels:
        return a
    if a.ndim == 4 and a.shape[-1] == channels:
        return a.permute(0, 3, 1, 2)  # (B, C, H', W')
    if a.ndim == 3 and a.shape[-1] == channels and hasattr(model, "patch_grid"):
        gh, gw = model.patch_grid(*image_hw)
        P = int(getattr(model, "num_prefix_tokens", 0))
        return a[:, P:].transpose(1, 2).reshape(a.shape[0], channels, gh, gw)  # (B, C, H', W')
    raise ValueError(
        f"Grad-CAM cannot read a {tuple(a.shape)} stage output of {model_label(model)} as {channels}-channel maps"
    )


def _stage_output_chain(module: nn.Module) -> list[nn.Module]:
    """`module`, its last child, that child's last child ... : where a stage's output can be read.

    A model may run a stage part by part instead of calling it (Swin and ConvNeXt call each block of a stage
    themselves, for per-block gradient checkpointing), so the stage module's own hook never fires; its output is
    then its last block's. Grad-CAM reads the first module of this chain that ran.
    """
    chain = [module]
    while list(chain[-1].children()):
        chain.append(list(chain[-1].children())[-1])
    return chain


def grad_cam(
    model: nn.Module,
    images: Tensor,
    target: Target = None,
    layer: int | None = None,
    upsample_to: tuple[int, int] | None = None,
) -> Tensor:
    """Grad-CAM maps of a batch.

    Args:
        model: any classifier with `feature_info` (stage channels, strides and module names).
        images: normalised float batch (B, C, H, W) on the model's device.
        target: class per image (int, one per image, or None for the predicted class).
        layer: index into `feature_info` (negatives from the end); None = `default_gradcam_layer(model)`.
        upsample_to: (H, W) to resize the maps to (bilinear), or None for the stage's grid.

    Returns:
        (B, H', W') non-negative maps (or (B, H, W) with `upsample_to`), detached.

    Raises:
        TypeError: the model has no feature_info.
        ValueError: a layer index out of range, naming the allowed range.
    """
    _check_images(images)
    layer = default_gradcam_layer(model) if layer is None else layer

    def score(logits: Tensor) -> Tensor:
        targets = resolve_targets(target, logits)
        return logits.gather(1, targets[:, None]).sum()  # images are independent in eval mode

    return stage_grad_cam(model, images, score, layer, upsample_to=upsample_to)


def stage_grad_cam(
    model: nn.Module,
    images: Tensor,
    score: Callable[[Any], Tensor],
    layer: int,
    grid_model: nn.Module | None = None,
    upsample_to: tuple[int, int] | None = None,
) -> Tensor:
    """Grad-CAM of any scalar `score(model(images))` at one `feature_info` stage: the core of `grad_cam`, shared
    with the dense models (`vitkit.explain.dense`: the summed logit of a class over its predicted region).

    Args:
        model: a model with `feature_info` whose `module` names are modules of `model`.
        images: normalised float batch (B, C, H, W).
        score: the model's output -> a scalar, the sum over the batch of each image's own score (images are
            independent in eval mode, so one backward gives each image its own gradient).
        layer: index into `feature_info` (negatives from the end).
        grid_model: the token model whose `patch_grid` and `num_prefix_tokens` grid a token stage output (the
            backbone of a dense model); None = `model`.
        upsample_to: (H, W) to resize the maps to (bilinear), or None for the stage's grid.

    Returns:
        (B, H', W') non-negative maps (or (B, H, W) with `upsample_to`), detached.
    """
    _check_images(images)
    grid_model = model if grid_model is None else grid_model
    if any(getattr(grid_model, "tome_r", ())):
        # Token merging leaves fewer tokens than patches: a block's output is no longer a patch grid to weight.
        raise ValueError("gradcam needs the patch grid, which token merging removes; call model.set_tome(0) first")
    info = _feature_info(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -len(info) <= layer < len(info):
        raise ValueError(f"layer={layer!r} is out of range for {len(info)} stages (use -{len(info)}..{len(info) - 1})")
    stage = info[layer]
    module = dict(model.named_modules()).get(stage["module"])
    if module is None:
        raise ValueError(f"feature_info names module {stage['module']!r}, which {model_label(model)} does not have")
    chain = _stage_output_chain(module)
    seen: dict[int, Tensor] = {}

    def keep(i: int):
        return lambda m, inputs, out: seen.__setitem__(i, out if isinstance(out, Tensor) else out[0])

    hooks = [m.register_forward_hook(keep(i)) for i, m in enumerate(chain)]
    try:
        with eval_mode(model), torch.enable_grad():
            output = model(images.detach())
            if not seen:
                raise ValueError(
                    f"Grad-CAM saw no output of module {stage['module']!r} of {model_label(model)} in the forward pass"
                )
            activation = seen[min(seen)]  # the outermost module of the chain that ran
            (grad,) = torch.autograd.grad(score(output), activation, allow_unused=True)
    finally:
        for hook in hooks:
            hook.remove()
    if grad is None:  # the score does not depend on this stage (e.g. an empty region): no evidence anywhere
        grad = torch.zeros_like(activation)
    hw = (images.shape[-2], images.shape[-1])
    a = _as_maps(activation.detach().float(), stage["num_chs"], grid_model, hw)  # (B, C, H', W')
    g = _as_maps(grad.float(), stage["num_chs"], grid_model, hw)
    weights = g.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = F.relu((weights * a).sum(dim=1))  # (B, H', W')
    return _upsample(cam, upsample_to)
