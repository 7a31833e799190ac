"""FlexiViT on shapes: accuracy against patch size for a small ViT trained at one patch size (issue 9).

A small ViT is trained briefly on the procedural shapes dataset (4 classes) at one patch size, then evaluated on
held-out shapes at every patch size that divides the image, with the patch kernel resized two ways:
- PI-resize (`model.set_patch_size(p)`, FlexiViT's pseudo-inverse resize, Beyer et al. 2023), and
- plain bilinear resize of the kernel (antialiased when shrinking), the naive baseline the paper compares with.
Both resample the learned position table to the new grid the same way (bicubic, `resample_pos_embed`), so the
two columns differ only in the kernel.

Usage:
    python benchmarks/flexivit_patch_sizes.py                          # ~2 min on 2 CPU cores
    python benchmarks/flexivit_patch_sizes.py --train-seconds 10 --n-train 256 --n-test 128   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.data.shapes import SHAPE_CLASSES, make_shapes
from vitkit.models import create_model


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0  # uint8 -> [-1, 1]


def bilinear_kernel_model(model: nn.Module, patch: int) -> nn.Module:
    """A copy of `model` running at `patch` with the trained kernel bilinearly resized (no pseudo-inverse)."""
    out = copy.deepcopy(model)
    pe = out.patch_embed
    w = pe.proj.weight.detach()  # (D, C, p0, p0)
    resized = F.interpolate(w, size=(patch, patch), mode="bilinear", align_corners=False, antialias=True)
    proj = nn.Conv2d(pe.in_chans, pe.embed_dim, patch, stride=patch, bias=pe.proj.bias is not None)
    with torch.no_grad():
        proj.weight.copy_(resized)
        if pe.proj.bias is not None:
            proj.bias.copy_(pe.proj.bias)
    pe.proj = proj  # its kernel is now the "trained" size, so the layer runs it as it is
    pe.patch_size = (patch, patch)
    return out


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(_normalise(images[i : i + batch]))
        correct += int((logits.argmax(1) == labels[i : i + batch]).sum())
    return correct / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=48, help="48 px: patch sizes 4, 6, 8, 12, 16, 24 all divide it")
    ap.add_argument("--patch", type=int, default=8, help="patch size the model is trained at")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--train-seconds", type=float, default=100.0, help="training time budget (wall clock)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    size = args.img_size
    x_train, y_train, _, _ = make_shapes(args.n_train, size, size, seed=args.seed)
    x_test, y_test, _, _ = make_shapes(args.n_test, size, size, seed=args.seed + 1)
    model = create_model(
        "vit_tiny_patch16_224",
        img_size=size,
        patch_size=args.patch,
        embed_dim=96,
        depth=4,
        num_heads=3,
        num_classes=len(SHAPE_CLASSES),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)

    # Train for a wall-clock budget with a cosine schedule over it (random flips as the only augmentation).
    start, step, epochs_seen = time.perf_counter(), 0, 0.0
    model.train()
    while (elapsed := time.perf_counter() - start) < args.train_seconds:
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * elapsed / args.train_seconds))
        idx = torch.randint(0, args.n_train, (args.batch,))
        x = _normalise(x_train[idx])
        x = torch.where(torch.rand(args.batch, 1, 1, 1) < 0.5, x.flip(-1), x)
        loss = F.cross_entropy(model(x), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        epochs_seen = step * args.batch / args.n_train
    train_time = time.perf_counter() - start

    print(
        f"trained ViT (D=96, depth 4, 3 heads) at patch {args.patch}, {size} px: {step} steps "
        f"({epochs_seen:.1f} epochs of {args.n_train}) in {train_time:.0f} s; test on {args.n_test} images"
    )
    print()
    print("| patch | tokens | PI-resize acc | bilinear-resize acc |")
    print("|---|---|---|---|")
    t0 = time.perf_counter()
    for p in [p for p in range(2, size + 1) if size % p == 0 and 4 <= p <= size // 2]:
        model.set_patch_size(p)
        pi = accuracy(model, x_test, y_test)
        model.set_patch_size(args.patch)
        plain = accuracy(bilinear_kernel_model(model, p), x_test, y_test)
        mark = " (trained)" if p == args.patch else ""
        print(f"| {p}{mark} | {(size // p) ** 2} | {pi:.3f} | {plain:.3f} |")
    print(f"\nevaluation took {time.perf_counter() - t0:.0f} s; chance is {1 / len(SHAPE_CLASSES):.2f}")


if __name__ == "__main__":
    main()
