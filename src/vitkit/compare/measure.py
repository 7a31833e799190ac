"""The measurements of a comparison: each a small function with its method in the docstring.

Size and cost: `count_params`, `count_gmacs` (torch's flop counter, attention included), `inference_throughput`,
`train_step_time`, `PeakMemory`, `loglog_slope`. Receptive fields: `effective_receptive_field` (Luo et al. 2016),
`erf_radius`, `model_erf`, `mean_attention_distance` (ViT paper Fig. 7). Inductive-bias probes: `shift_images`,
`shift_consistency`, `occlusion_accuracy`, `rotation_accuracy`.

Images given to the probes are normalised model inputs (B, C, H, W). What fills pixels that a shift, a rotation or
an occlusion uncovers is `fill`: per-channel values in the same normalised space (`black_fill(model)` is the value
of a black pixel, the background of digits and shapes).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit._validate import check_choice
from vitkit.allocator import M_MMAP_THRESHOLD, MMAP_THRESHOLD, glibc

ShiftMode = Literal["pad", "circular"]
SHIFT_MODES = ("pad", "circular")


# ----------------------------------------------------------------------------------------------------------------
# Size and cost
# ----------------------------------------------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def model_gmacs(model: nn.Module, img_size: int | tuple[int, int]) -> float:
    """GMACs (billions of multiply-accumulates) of one forward pass of one image at `img_size`.

    Method: torch's `FlopCounterMode` on a meta-device copy, so nothing is computed, with attention captured so the
    q k^T and attn @ v matmuls are counted (as `vitkit.models.summary.count_gmacs`). The copy runs in train mode on
    a batch of 2 and the count is halved: eval mode under no_grad takes the folded-BatchNorm inference path, which
    cannot run on meta tensors, and BatchNorm in train mode refuses one image on a 1x1 map (tiny inputs).
    """
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from vitkit.layers import attention_layers, capture_attention

    size = _pair(img_size)
    meta = copy.deepcopy(model).to("meta").train()
    x = torch.empty(2, _in_chans(model), *size, device="meta")
    capture = capture_attention(meta, True) if attention_layers(meta) else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter, torch.no_grad(), capture:
        meta(x)
    return counter.get_total_flops() / 2 / 2 / 1e9  # FLOPs -> MACs, then per image


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _in_chans(model: nn.Module) -> int:
    return int(getattr(getattr(model, "cfg", None), "in_chans", 3))


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def inference_throughput(
    model: nn.Module, batch_size: int, img_size: int | tuple[int, int], repeats: int = 5, warmup: int = 1
) -> float:
    """Images per second of `model` in eval mode under `torch.no_grad()`.

    Method: random normal inputs (B, C, H, W) on the model's device; `warmup` untimed passes, then the median
    wall time of `repeats` timed passes (CUDA synchronised); throughput = batch_size / median time.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("repeats", repeats)
    device = _device(model)
    x = torch.randn(batch_size, _in_chans(model), *_pair(img_size), device=device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            t = _median_time(lambda: model(x), device, repeats, warmup)
    finally:
        model.train(was)
    return batch_size / t


def train_step_time(
    model: nn.Module,
    batch_size: int,
    img_size: int | tuple[int, int],
    num_classes: int | None = None,
    repeats: int = 3,
    warmup: int = 1,
) -> float:
    """Seconds per training step: forward, cross-entropy, backward and one AdamW step, in train mode.

    Method: random inputs and labels; the step runs on a copy of the model (with its own AdamW), so `model` is left
    untouched; `warmup` untimed steps (AdamW allocates its state in the first), then the median of `repeats`.
    """
    import copy

    _check_positive("batch_size", batch_size)
    _check_positive("repeats", repeats)
    device = _device(model)
    net = copy.deepcopy(model).train()
    n = num_classes or int(getattr(net, "num_classes", 0) or 10)
    x = torch.randn(batch_size, _in_chans(model), *_pair(img_size), device=device)
    y = torch.randint(0, n, (batch_size,), device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> None:
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _median_time(step, device, repeats, warmup)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_MEASURE_MMAP_THRESHOLD = 64 * 1024  # as benchmarks/models.py: every tensor block gets its own mapping


class PeakMemory:
    """Peak memory above the level at entry while the block runs, in MiB (`.peak_mib`).

    Method: on CUDA, the caching allocator's peak (`torch.cuda.max_memory_allocated`, reset at entry) minus the
    allocation at entry. On CPU, the process's resident set size (/proc/self/statm) sampled every millisecond by a
    thread (as benchmarks/models.py does), minus the RSS at entry; on systems without /proc it is None. With glibc,
    freed heap memory is returned first (malloc_trim) and blocks over 64 KiB are given their own mappings while the
    block runs (mallopt M_MMAP_THRESHOLD, as benchmarks/models.py sets MALLOC_MMAP_THRESHOLD_), so memory freed by
    earlier work is not silently reused and the delta is the block's own; afterwards the threshold is set to
    glibc's 32 MiB ceiling (where long runs settle, and what `vitkit.allocator.keep_freed_memory` sets, which the
    command-line tool applies). RSS counts whole pages, so the CPU number is an upper bound of the block's need.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._proc = os.path.exists("/proc/self/statm")
        if not self._proc:
            return self
        self._libc = glibc()
        if self._libc is not None:
            self._libc.malloc_trim(0)
            self._libc.mallopt(M_MMAP_THRESHOLD, _MEASURE_MMAP_THRESHOLD)
        self._base = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        if not self._proc:
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_mib = (self._peak - self._base) / 2**20
        if self._libc is not None:
            self._libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x): the exponent k of y ~ x^k.

    With x the image side in pixels, a cost linear in the pixel count has k = 2, and attention over all
    patch pairs (quadratic in the pixel count) pushes k towards 4.

    Raises:
        ValueError: fewer than two points, different lengths, or a value that is not positive.
    """
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys need the same length, got {len(xs)} and {len(ys)}")
    if len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError(f"a slope needs at least two distinct x values, got {list(xs)}")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError(f"log-log fit needs positive values, got xs={list(xs)} ys={list(ys)}")
    lx, ly = np.log(np.asarray(xs, dtype=float)), np.log(np.asarray(ys, dtype=float))
    return float(np.polyfit(lx, ly, 1)[0])


# ----------------------------------------------------------------------------------------------------------------
# Receptive fields
# ----------------------------------------------------------------------------------------------------------------
def effective_receptive_field(features: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """Effective receptive field (Luo et al. 2016) of the centre unit of a feature map, (H, W) over input pixels.

    Method: y = features(images) is a (B, C, h, w) map; the gradient of sum_c y[:, c, h // 2, w // 2] (the centre
    unit, all its channels) with respect to the input is taken, its absolute value summed over input channels and
    averaged over the images. Pixels outside the receptive field get exactly 0. Not normalised: see `erf_radius`.

    Args:
        features: maps a (B, C_in, H, W) batch to (B, C, h, w) features (e.g. one stage of a network).
        images: (B, C_in, H, W) float inputs (normalised images, or random ones as in the paper).
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float (B, C, H, W) batch, got {tuple(images.shape)} {images.dtype}")
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = features(x)
        if y.ndim != 4:
            raise ValueError(f"features must return (B, C, h, w) maps, got shape {tuple(y.shape)}")
        h, w = y.shape[-2:]
        (g,) = torch.autograd.grad(y[:, :, h // 2, w // 2].sum(), x)
    return g.abs().sum(dim=1).mean(dim=0).detach()  # (H, W)


def erf_radius(erf: Tensor | np.ndarray, mass: float = 0.5) -> float:
    """Radius in pixels of the disc around the ERF's centre of mass that holds `mass` of its total weight.

    Method: pixel weights w = |gradient| (the ERF map); centre c = the w-weighted mean pixel position; each pixel's
    Euclidean distance d to c; the radius is the smallest d among the pixels such that the pixels with distance
    <= d hold at least `mass` of sum(w). A single nonzero pixel gives 0; a 3x3 uniform field about its centre
    gives 1.0 for mass 0.5 (5 of 9 pixels within distance 1) and sqrt(2) for mass 0.9.

    Raises:
        ValueError: mass outside (0, 1], a map that is not 2-D, or one with no positive weight.
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    w = np.abs(np.asarray(erf.detach().cpu() if isinstance(erf, Tensor) else erf, dtype=np.float64))
    if w.ndim != 2:
        raise ValueError(f"an ERF map must be 2-D (H, W), got shape {w.shape}")
    total = w.sum()
    if not total > 0:
        raise ValueError("the ERF map has no positive weight (the output does not depend on the input)")
    rows, cols = np.indices(w.shape)
    cy, cx = (w * rows).sum() / total, (w * cols).sum() / total
    d = np.hypot(rows - cy, cols - cx).ravel()
    order = np.argsort(d, kind="stable")
    cum = np.cumsum(w.ravel()[order]) / total
    # A small tolerance so a mass fraction that is reached exactly (e.g. 5/9 >= 0.5) is not lost to rounding.
    k = int(np.searchsorted(cum, mass - 1e-12))
    return float(d[order][min(k, len(d) - 1)])


def model_erf(model: nn.Module, images: Tensor, index: int) -> Tensor:
    """ERF (see `effective_receptive_field`) of the centre unit of stage/block `index` of a model of the contract.

    The feature map is `model.forward_intermediates(x, indices=[index], as_maps=True)` (a ViT's patch tokens laid
    out on the patch grid, prefix tokens dropped), so CNN stages and transformer blocks are measured alike.
    """
    was = model.training
    model.eval()
    try:
        return effective_receptive_field(
            lambda x: model.forward_intermediates(x, indices=[index], as_maps=True)[0], images
        )
    finally:
        model.train(was)


def mean_attention_distance(model: nn.Module, images: Tensor) -> Tensor:
    """Mean attention distance in pixels, (layers, heads), for a model with global self-attention.

    Method (ViT paper, Fig. 7): for each query patch, the attention-weighted mean of the distances between its
    centre and every key patch's centre; prefix tokens (class, registers) are excluded as queries and keys and each
    query's patch weights are renormalised to sum to 1; averaged over queries and images. Uses
    `vitkit.explain.mean_attention_distance` (attention captured with `capture_attention`).
    """
    from vitkit.explain import mean_attention_distance as _mad

    return _mad(model, images)


def attention_distance_from_maps(
    attns: Sequence[Tensor], grid: tuple[int, int], patch_size: int, num_prefix_tokens: int
) -> Tensor:
    """`mean_attention_distance` on attention maps you already have: [(B, heads, N, N)] per layer -> (layers, heads).

    Token layout: `num_prefix_tokens` prefix tokens, then the grid's patches row by row, each `patch_size` pixels.
    """
    from vitkit.explain import mean_attention_distance_from_attentions

    return mean_attention_distance_from_attentions(attns, grid, patch_size, num_prefix_tokens, renormalize=True)


def has_global_attention(model: nn.Module) -> bool:
    """Whether the model has capturable N x N self-attention (ViTs, hybrids), i.e. attention distances exist."""
    from vitkit.layers import attention_layers

    return bool(attention_layers(model))


# ----------------------------------------------------------------------------------------------------------------
# Inductive-bias probes
# ----------------------------------------------------------------------------------------------------------------
def black_fill(model: nn.Module) -> Tensor:
    """The normalised value of a black pixel for `model`, (C,): what uncovered pixels become in the probes."""
    pre = model.preprocess
    return -torch.tensor(pre.mean) / torch.tensor(pre.std)


def _fill(fill: Tensor | float | None, channels: int, like: Tensor) -> Tensor:
    if fill is None:
        fill = 0.0
    f = torch.as_tensor(fill, dtype=like.dtype, device=like.device).flatten()
    if f.numel() == 1:
        f = f.expand(channels)
    if f.numel() != channels:
        raise ValueError(f"fill needs 1 or {channels} values (one per channel), got {f.numel()}")
    return f.view(1, channels, 1, 1)


def shift_images(
    images: Tensor, dy: int, dx: int, mode: ShiftMode = "pad", fill: Tensor | float | None = None
) -> Tensor:
    """Translate a (B, C, H, W) batch by (dy, dx) pixels (positive = down/right).

    "pad": pixels shifted out are lost and uncovered ones become `fill`; "circular": they wrap around (torch.roll).
    """
    check_choice("mode", mode, SHIFT_MODES)
    if mode == "circular":
        return torch.roll(images, shifts=(dy, dx), dims=(-2, -1))
    B, C, H, W = images.shape
    out = _fill(fill, C, images).expand(B, C, H, W).clone()
    ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
    xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
    if abs(dy) < H and abs(dx) < W:
        out[:, :, yd, xd] = images[:, :, ys, xs]
    return out


def _predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(c).argmax(dim=-1) for c in x.split(batch_size)])


def shift_consistency(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None = None,
    max_shift: int = 4,
    mode: ShiftMode = "pad",
    fill: Tensor | float | None = None,
) -> dict[str, list[float]]:
    """Prediction agreement (and accuracy) under small translations, per shift size 1..max_shift pixels.

    Method: for each size s, the 8 shifts (dy, dx) in {-s, 0, s}^2 minus (0, 0) are applied (`shift_images`); the
    consistency at s is the fraction of (image, shift) pairs whose predicted class equals the prediction on the
    unshifted image; with labels, the accuracy over the same shifted images too. A model whose prediction cannot
    change under the shifts (e.g. global pooling of a circular convolution with mode="circular") scores 1.0.

    Returns:
        {"shift_px": [1..max_shift], "consistency": [...], "accuracy": [...] (only with labels)}.
    """
    _check_positive("max_shift", max_shift)
    was = model.training
    model.eval()
    try:
        base = _predict(model, images)
        consistency, accuracy = [], []
        for s in range(1, max_shift + 1):
            agree = correct = total = 0
            for dy in (-s, 0, s):
                for dx in (-s, 0, s):
                    if dy == 0 and dx == 0:
                        continue
                    pred = _predict(model, shift_images(images, dy, dx, mode, fill))
                    agree += int((pred == base).sum())
                    if labels is not None:
                        correct += int((pred == labels.to(pred.device)).sum())
                    total += len(pred)
            consistency.append(agree / total)
            accuracy.append(correct / total)
    finally:
        model.train(was)
    out = {"shift_px": list(range(1, max_shift + 1)), "consistency": consistency}
    if labels is not None:
        out["accuracy"] = accuracy
    return out


def occlude_images(
    images: Tensor, k: int, grid: int = 4, fill: Tensor | float | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Cover k random cells of a grid x grid tiling of each image with `fill` (cells drawn per image).

    Cells are ceil(H / grid) x ceil(W / grid) pixels (the last row/column may be smaller).
    """
    B, C, H, W = images.shape
    if not 0 <= k <= grid * grid:
        raise ValueError(f"k={k} cells cannot be occluded on a {grid}x{grid} grid (use 0..{grid * grid})")
    ch, cw = math.ceil(H / grid), math.ceil(W / grid)
    scores = torch.rand(B, grid * grid, generator=generator)
    chosen = scores.argsort(dim=1)[:, :k]  # (B, k)
    mask = torch.zeros(B, grid * grid, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    mask = mask.view(B, 1, grid, grid).repeat_interleave(ch, 2).repeat_interleave(cw, 3)[:, :, :H, :W]
    mask = mask.to(images.device)
    return torch.where(mask, _fill(fill, C, images), images)


def occlusion_accuracy(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (0, 1, 2, 4),
    grid: int = 4,
    fill: Tensor | float | None = None,
    seed: int = 0,
) -> dict[str, list]:
    """Accuracy with k random cells of a grid x grid tiling masked, for each k in `ks`.

    Method: each image is cut into grid x grid cells; k distinct cells per image are drawn at random (seeded) and
    set to `fill` (`occlude_images`); accuracy over the images. k = 0 is the clean accuracy.

    Returns:
        {"k": [...], "fraction": [k / grid^2 ...], "accuracy": [...]}.
    """
    was = model.training
    model.eval()
    try:
        accs = []
        for k in ks:
            gen = torch.Generator().manual_seed(seed + int(k))
            pred = _predict(model, occlude_images(images, int(k), grid, fill, gen))
            accs.append(float((pred == labels.to(pred.device)).float().mean()))
    finally:
        model.train(was)
    return {"k": [int(k) for k in ks], "fraction": [int(k) / grid**2 for k in ks], "accuracy": accs}


def rotate_images(images: Tensor, degrees: float, fill: Tensor | float | None = None) -> Tensor:
    """Rotate a (B, C, H, W) batch by `degrees` counter-clockwise about its centre.

    Multiples of 90 are exact (torch.rot90, square images); other angles resample bilinearly and uncovered corners
    become `fill`.
    """
    B, C, H, W = images.shape
    quarter = degrees / 90
    if float(quarter).is_integer() and H == W:
        return torch.rot90(images, k=int(quarter) % 4, dims=(-2, -1))
    f = _fill(fill, C, images)
    t = math.radians(degrees)
    theta = torch.tensor(
        [[math.cos(t), -math.sin(t) * H / W, 0.0], [math.sin(t) * W / H, math.cos(t), 0.0]],
        dtype=images.dtype,
        device=images.device,
    )
    grid = F.affine_grid(theta.expand(B, 2, 3), list(images.shape), align_corners=False)
    # grid_sample pads with zeros: rotate (x - fill) so the padding comes out as `fill`.
    return F.grid_sample(images - f, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + f


def rotation_accuracy(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    angles: Sequence[float] = (0, 15, 30, 90, 180, 270),
    fill: Tensor | float | None = None,
) -> dict[str, list]:
    """Accuracy on the images rotated by each angle in degrees (`rotate_images`); angle 0 is the clean accuracy.

    Returns:
        {"angle_deg": [...], "accuracy": [...]}.
    """
    was = model.training
    model.eval()
    try:
        accs = []
        for a in angles:
            pred = _predict(model, rotate_images(images, float(a), fill))
            accs.append(float((pred == labels.to(pred.device)).float().mean()))
    finally:
        model.train(was)
    return {"angle_deg": [float(a) for a in angles], "accuracy": accs}


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
