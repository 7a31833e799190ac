"""Patch embedding: image -> tokens. Non-overlapping patches (ViT, with FlexiViT's run-time patch size), overlapping
patches (PVTv2/CvT), a small conv stem, or a CNN's feature map."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def _nearest_multiples(size: int, patch: int) -> str:
    lower = (size // patch) * patch
    upper = lower + patch
    return f"{lower} or {upper}" if lower > 0 else f"{upper}"


def check_image_size(height: int, width: int, patch_size: tuple[int, int]) -> tuple[int, int]:
    """Return the patch grid (H', W') for an image, or raise a ValueError naming the bad side.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        patch_size: (patch height, patch width).
    """
    ph, pw = patch_size
    for name, size, p in (("height", height, ph), ("width", width, pw)):
        if size < p or size % p != 0:
            raise ValueError(
                f"image {name} {size} is not a multiple of patch size {p} (try {_nearest_multiples(size, p)})"
            )
    return height // ph, width // pw


class PatchEmbed(nn.Module):
    """Strided-convolution patch projection: (B, C, H, W) -> (B, H/p * W/p, D).

    A convolution whose kernel and stride both equal the patch size is exactly a linear layer applied to each
    flattened patch, and it is the layout every published ViT checkpoint uses (`patch_embed.proj`).

    `set_patch_size(p)` runs the layer at another patch size (FlexiViT, Beyer et al. 2023): the trained kernel
    `proj.weight` is never changed; each forward resizes it with the pseudo-inverse resize (`pi_resize_matrix`), so
    gradients reach the trained kernel and going back to the trained size is exact.

    Args:
        patch_size: side of a square patch, or (height, width).
        in_chans: number of input channels.
        embed_dim: token width D.
        bias: whether the projection has a bias.
    """

    def __init__(
        self, patch_size: int | tuple[int, int] = 16, in_chans: int = 3, embed_dim: int = 768, bias: bool = True
    ):
        super().__init__()
        self.patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    @property
    def trained_patch_size(self) -> tuple[int, int]:
        """The patch size of the stored kernel `proj.weight` (what the weights were trained at)."""
        return tuple(self.proj.kernel_size)

    def set_patch_size(self, patch_size: int) -> None:
        """Run at another square patch size; the kernel is PI-resized from the trained one at every forward.

        Raises:
            TypeError: a patch size that is not an int.
            ValueError: a patch size < 1.
        """
        if isinstance(patch_size, bool) or not isinstance(patch_size, int):
            raise TypeError(f"patch size must be an int, got {patch_size!r}")
        if patch_size < 1:
            raise ValueError(f"patch size must be >= 1, got {patch_size}")
        self.patch_size = (patch_size, patch_size)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (H', W') for an input of this size; raises ValueError for sizes that do not divide."""
        return check_image_size(height, width, self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
            )
        self.grid_size(x.shape[2], x.shape[3])
        if self.patch_size == self.trained_patch_size:
            x = self.proj(x)  # (B, D, H', W')
        else:
            weight = pi_resize_kernel(self.proj.weight, self.patch_size)  # (D, C, p, p)
            x = F.conv2d(x, weight, self.proj.bias, stride=self.patch_size)  # (B, D, H', W')
        return x.flatten(2).transpose(1, 2)  # (B, H'*W', D)


@functools.lru_cache(maxsize=32)
def _resize_matrix(old: tuple[int, int], new: tuple[int, int], pseudo_inverse: bool) -> torch.Tensor:
    # Column j of B is the bilinear resize of the j-th one-hot old x old patch; built in float64 so that pinv is
    # accurate. Antialiased like big_vision's jax.image.resize when shrinking (a no-op when growing).
    eye = torch.eye(old[0] * old[1], dtype=torch.float64).reshape(-1, 1, *old)  # (p0*p0, 1, p0, p0)
    cols = F.interpolate(eye, size=new, mode="bilinear", align_corners=False, antialias=True)  # (p0*p0, 1, p, p)
    B = cols.reshape(old[0] * old[1], new[0] * new[1]).T  # (p*p, p0*p0): x' = B x
    return torch.linalg.pinv(B.T) if pseudo_inverse else B  # (p*p, p0*p0) either way


def pi_resize_matrix(old: int | tuple[int, int], new: int | tuple[int, int]) -> torch.Tensor:
    """FlexiViT's pseudo-inverse resize as a matrix M (p*p, p0*p0), float64: a kernel w (flattened p0 x p0) becomes
    w' = M w with M = pinv(B^T), where B (p*p, p0*p0) bilinearly resizes a p0 x p0 patch to p x p.

    For p >= p0 this keeps every token: <B x, w'> = <x, w> for every patch x (B^T has full row rank, so B^T w' = w
    exactly, and pinv picks the smallest such w'). For p < p0 it is the least-squares best w' (Beyer et al. 2023,
    section 3.4).
    """
    old = (old, old) if isinstance(old, int) else tuple(old)
    new = (new, new) if isinstance(new, int) else tuple(new)
    return _resize_matrix(old, new, True).clone()  # a copy: the cached matrix must not be edited in place


def bilinear_resize_matrix(old: int | tuple[int, int], new: int | tuple[int, int]) -> torch.Tensor:
    """The matrix B (p*p, p0*p0) of the bilinear (antialiased when shrinking) resize of a p0 x p0 patch to p x p."""
    old = (old, old) if isinstance(old, int) else tuple(old)
    new = (new, new) if isinstance(new, int) else tuple(new)
    return _resize_matrix(old, new, False).clone()


def pi_resize_kernel(weight: torch.Tensor, new: int | tuple[int, int]) -> torch.Tensor:
    """A patch-embedding kernel (D, C, p0, p0) PI-resized to (D, C, p, p) (see `pi_resize_matrix`); differentiable.

    Args:
        weight: the trained kernel.
        new: the new patch size, an int or (height, width).
    """
    new = (new, new) if isinstance(new, int) else tuple(new)
    D, C, h, w = weight.shape
    if (h, w) == new:
        return weight
    M = _resize_matrix((h, w), new, True).to(device=weight.device, dtype=weight.dtype)  # (p*p, p0*p0)
    out = weight.reshape(D * C, h * w) @ M.T  # (D*C, p*p)
    return out.reshape(D, C, *new)  # (D, C, p, p)


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding (PVTv2, Wang et al. 2022; CvT, Wu et al. 2021): (B, C, H, W) -> (B, H/p * W/p, D).

    A convolution with stride p but a larger, zero-padded kernel k, then LayerNorm on the tokens. Neighbouring
    patches share k - p pixels of context, which keeps the local continuity a plain patchify cuts. Zero padding of
    k - p pixels per side, ceil((k - p) / 2) before and the rest after, centres each token's window on its own
    p x p patch (the odd pixel before; CvT's 7/4/2) and makes the grid exactly H/p x W/p, the plain ViT's, so
    positions, tables and explain work unchanged. (PVTv2 pads k // 2, which centres the window on the patch's
    top-left pixel.) The padding is explicit (`F.pad`, then an unpadded strided convolution) so that the output
    side is (H + k - p - k) / p + 1 = H / p also as a symbolic size in torch.export, the same expression as the
    model's grid; a symmetric convolution padding of ceil((k - p) / 2) gives the same numbers but the expression
    (H + 1 - p) // p + 1, which the exporter cannot prove equal to H // p, and the traced program then failed at
    any batch or size but the example's with attention that reshapes by the grid (`local`).
    Default k = p + p // 2 rounded up to odd: 7 at p=4 and 3 at p=2 (CvT's and PVTv2's stems), 25 at p=16 (2.4x the
    weights of a 16x16 patchify; 2p - 1 would be 3.8x).

    Args:
        patch_size: the stride p (square).
        in_chans: input channels.
        embed_dim: token width D.
        kernel_size: kernel side k >= p; None = p + p // 2 rounded up to odd. An `embed_args` option.

    Raises:
        ValueError: a kernel size that is not an int >= the patch size.
    """

    def __init__(
        self,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 768,
        kernel_size: int | None = None,
    ):
        super().__init__()
        p = _square("overlapping patch embedding", patch_size)
        default = p + p // 2 + 1 - (p + p // 2) % 2
        kernel_size = default if kernel_size is None else kernel_size
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < p:
            raise ValueError(
                f"kernel_size={kernel_size!r} is not allowed for overlapping patches of size {p}: it must be an int "
                f">= {p} (default {default})"
            )
        self.patch_size = (p, p)
        self.kernel_size = kernel_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        before = (kernel_size - p + 1) // 2
        self.padding = (before, kernel_size - p - before) * 2  # F.pad's (left, right, top, bottom)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride=p)  # on the padded image: (B, D, H/p, W/p)
        self.norm = nn.LayerNorm(embed_dim)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (H/p, W/p); raises ValueError for sides that are not multiples of p."""
        return check_image_size(height, width, self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.in_chans)
        self.grid_size(x.shape[2], x.shape[3])
        x = self.proj(F.pad(x, self.padding))  # (B, D, H/p, W/p)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, H/p * W/p, D)


_STEM_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU}


class ConvStemEmbed(nn.Module):
    """A small convolutional stem as the patch embedding (Xiao et al. 2021, "Early Convolutions Help Transformers
    See Better"): (B, C, H, W) -> (B, H/p * W/p, D).

    log2(p) 3x3 stride-2 convolutions (4 for p=16), each with BatchNorm and ReLU as in the paper, halve the map
    while doubling its width (D / 2**k at the k-th from the end), then a 1x1 convolution projects to the token
    width. The overlapping 3x3 kernels give the locality prior a plain ViT lacks, which is what small datasets
    need; the total stride is still `p`, so the token grid is that of a `p`-patch ViT and positions, feature
    strides and sizes work unchanged. (The paper's ViT_C-1GF/4GF stems end at width D, not D/2; vitkit's stem has
    kept its D/2 widths so that saved models load.)

    Args:
        patch_size: total stride, a power of two >= 2 (4 gives an 8x8 grid at 32 px).
        in_chans: input channels.
        embed_dim: token width D.
        act: "relu" (the paper) or "gelu" (what vitkit's stem used before it was named `conv_stem`: configs saved
            as "convstem" load with it). An `embed_args` option.

    Raises:
        ValueError: a patch size that is not a power of two >= 2 or not square, an unknown activation.
    """

    def __init__(
        self, patch_size: int | tuple[int, int] = 4, in_chans: int = 3, embed_dim: int = 384, act: str = "relu"
    ):
        super().__init__()
        p = _square("convolutional stem", patch_size)
        if p < 2 or p & (p - 1):
            raise ValueError(
                f"a convolutional stem's patch size must be a power of two >= 2 (2, 4, 8, 16), got {p}: it is "
                "built of stride-2 convolutions"
            )
        if act not in _STEM_ACTS:
            raise ValueError(
                f"act={act!r} is not a conv-stem activation; choose one of {', '.join(map(repr, _STEM_ACTS))}"
            )
        self.patch_size = (p, p)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        n = p.bit_length() - 1  # stride-2 convolutions
        layers: list[nn.Module] = []
        chs = in_chans
        for k in range(n):
            out = max(embed_dim // 2 ** (n - k), 8)
            layers += [nn.Conv2d(chs, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), _STEM_ACTS[act]()]
            chs = out
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(chs, embed_dim, 1)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (H/p, W/p); raises ValueError for sides that are not multiples of p."""
        return check_image_size(height, width, self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.in_chans)
        self.grid_size(x.shape[2], x.shape[3])
        x = self.proj(self.stem(x))  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, H/p * W/p, D)


class HybridEmbed(nn.Module):
    """A CNN's feature map as the patch embedding (the ViT paper's hybrid): (B, C, H, W) -> (B, H/s * W/s, D).

    The backbone is any model of the contract (`feature_info`, `forward_intermediates`): it runs up to `stage`, and
    a `patch_size` convolution (1 in the paper: one token per feature-map pixel) projects its map to tokens. The
    total stride s is the stage's reduction times `patch_size`.

    The backbone is truncated in place: the stages after `stage` and the parts after its last stage that hold
    weights (final norm, classifier) become `nn.Identity`, so every parameter left is used. This relies on the
    zoo's layout, in which a model registers stem -> stages -> norm/head in that order.

    Args:
        patch_size: side of the projection's square kernel and stride on the feature map.
        in_chans: input image channels (must match the backbone's).
        embed_dim: token width D.
        backbone: the CNN (an `nn.Module` with the vitkit contract), without a classifier (reset to 0 classes).
        stage: index into `backbone.feature_info` (negatives count from the end); None = the stage at stride 16.

    Raises:
        TypeError: a backbone without `feature_info` / `forward_intermediates`.
        ValueError: a stage that does not exist, or no stage at stride 16 when `stage` is None.
    """

    def __init__(
        self,
        patch_size: int | tuple[int, int] = 1,
        in_chans: int = 3,
        embed_dim: int = 768,
        *,
        backbone: nn.Module | None = None,
        stage: int | None = None,
    ):
        super().__init__()
        if backbone is None:
            raise TypeError(
                "embed_layer='hybrid' needs a CNN backbone module, which a plain ViT config cannot carry; use "
                "vitkit.HybridViT(backbone, ...) (e.g. HybridViT('resnet50', n_classes=10))"
            )
        missing = [a for a in ("feature_info", "forward_intermediates") if not hasattr(backbone, a)]
        if not isinstance(backbone, nn.Module) or missing:
            raise TypeError(
                f"a hybrid backbone must be an nn.Module with the vitkit model contract; {type(backbone).__name__} "
                f"lacks {', '.join(missing) or 'nn.Module'}. Use a zoo name (e.g. 'resnet50', 'convnext_tiny') or "
                "vitkit.create_model(name, num_classes=0)"
            )
        info = list(backbone.feature_info)
        strides = [int(fi["reduction"]) for fi in info]
        if stage is None:
            if 16 not in strides:
                raise ValueError(
                    f"backbone {type(backbone).__name__} has no stage at stride 16 (its stage strides are {strides}); "
                    f"pass stage=0..{len(info) - 1}"
                )
            stage = strides.index(16)
        if isinstance(stage, bool) or not isinstance(stage, int) or not -len(info) <= stage < len(info):
            raise ValueError(
                f"stage={stage!r} is not a stage of backbone {type(backbone).__name__}: it has {len(info)} stages "
                f"(0..{len(info) - 1}, or negatives from the end) at strides {strides}"
            )
        self.stage = stage % len(info)
        p = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.patch_size = p
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.feature_stride = strides[self.stage]
        self.stride = (self.feature_stride * p[0], self.feature_stride * p[1])  # pixels per token side
        self.num_features = int(info[self.stage]["num_chs"])
        truncate_backbone(backbone, info, self.stage)
        self.backbone = backbone
        self.proj = nn.Conv2d(self.num_features, embed_dim, kernel_size=p, stride=p)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (H/s, W/s) for total stride s; raises ValueError for sides that are not multiples of s."""
        return check_image_size(height, width, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.in_chans)
        self.grid_size(x.shape[2], x.shape[3])
        x = self.backbone.forward_intermediates(x, indices=[self.stage], as_maps=True)[0]  # (B, C, H/f, W/f)
        x = self.proj(x)  # (B, D, H/s, W/s)
        return x.flatten(2).transpose(1, 2)  # (B, H/s * W/s, D)


def truncate_backbone(backbone: nn.Module, info: list[dict], stage: int) -> None:
    """Replace, in place, the stages after `stage` and the weighted children after the last stage by Identity."""
    for fi in info[stage + 1 :]:
        _replace(backbone, fi["module"])
    last_root = info[-1]["module"].split(".")[0]
    children = [name for name, _ in backbone.named_children()]
    if last_root in children:
        for name in children[children.index(last_root) + 1 :]:
            child = getattr(backbone, name)
            if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                _replace(backbone, name)


def _replace(root: nn.Module, dotted: str) -> None:
    *path, last = dotted.split(".")
    parent = root.get_submodule(".".join(path)) if path else root
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and last.isdigit():
        parent[int(last)] = nn.Identity()
    else:
        setattr(parent, last, nn.Identity())


def _check_images(x: torch.Tensor, in_chans: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})")


def _square(what: str, patch_size: int | tuple[int, int]) -> int:
    if isinstance(patch_size, int):
        return patch_size
    if len(patch_size) != 2 or patch_size[0] != patch_size[1]:
        raise ValueError(f"a {what} needs a square patch size, got {patch_size}")
    return int(patch_size[0])
