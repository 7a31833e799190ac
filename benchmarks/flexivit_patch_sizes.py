"""FlexiViT on shapes: accuracy against patch size for a small ViT trained at one patch size (issue 9).

A small ViT is trained briefly on the procedural shapes dataset (4 classes) at one patch size, then evaluated on
held-out shapes at every patch size that divides the image, with the patch kernel resized two ways:
- PI-resize (`model.set_patch_size(p)`, FlexiViT's pseudo-inverse resize, Beyer et al. 2023), and
- plain bilinear resize of the kernel (antialiased when shrinking), the naive baseline the paper compares with.
Both resample the learned position table to the new grid the same way (bicubic, `resample_pos_embed`), so the
two columns differ only in the kernel.

Training is a fixed number of steps (not a time budget), so the table does not depend on the machine's speed. A
ViT needs far more than the default 300 steps to learn shapes well (recipes/shapes.yaml: 40 epochs, ~25 min on one
CPU core, 94% test accuracy): `--checkpoint` evaluates an already trained model (a vitkit or run directory with
embed_layer="patch", trained on shapes with the class order circle, square, triangle, star) instead of training.

Usage:
    python benchmarks/flexivit_patch_sizes.py                        # ~5 min on 2 busy CPU cores
    python benchmarks/flexivit_patch_sizes.py --device cuda --steps 3000 --batch 64 --dim 96 --depth 4 --heads 3
    python benchmarks/flexivit_patch_sizes.py --steps 5 --n-train 256 --n-test 128   # smoke test, seconds
    vitkit train --config recipes/shapes.yaml --out runs/shapes                 # 64 px, patch 8, then:
    python benchmarks/flexivit_patch_sizes.py --checkpoint runs/shapes          # sizes 4, 8, 16, 32 in seconds
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
from vitkit.weights import load_model

MEAN = STD = (0.5, 0.5, 0.5)  # uint8 -> [-1, 1] for the model trained here; a checkpoint brings its own


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def bilinear_kernel_model(model: nn.Module, patch: int) -> nn.Module:
    """A copy of `model` running at `patch` with the trained kernel bilinearly resized (no pseudo-inverse)."""
    out = copy.deepcopy(model)
    pe = out.patch_embed
    w = pe.proj.weight.detach()  # (D, C, p0, p0)
    resized = F.interpolate(w, size=(patch, patch), mode="bilinear", align_corners=False, antialias=True)
    proj = nn.Conv2d(pe.in_chans, pe.embed_dim, patch, stride=patch, bias=pe.proj.bias is not None).to(w.device)
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
        logits = model(_normalise(images[i : i + batch].to(labels.device)))
        correct += int((logits.argmax(1) == labels[i : i + batch]).sum())
    return correct / len(images)


def train(args: argparse.Namespace, dev: torch.device) -> tuple[nn.Module, str]:
    """A small ViT trained on shapes at `args.patch` for `args.steps` steps; returns it and a line describing it."""
    size = args.img_size
    x_train, y_train, _, _ = make_shapes(args.n_train, size, size, seed=args.seed)
    x_train, y_train = x_train.to(dev), y_train.to(dev)
    model = create_model(
        "vit_tiny_patch16_224",
        img_size=size,
        patch_size=args.patch,
        embed_dim=args.dim,
        depth=args.depth,
        num_heads=args.heads,
        num_classes=len(SHAPE_CLASSES),
    ).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)

    # Cosine schedule with a 5% warm-up; random horizontal flips are the only augmentation.
    start = time.perf_counter()
    model.train()
    warm = max(1, args.steps // 20)
    for step in range(args.steps):
        cosine = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))
        for group in opt.param_groups:
            group["lr"] = args.lr * ((step + 1) / warm if step < warm else cosine)
        idx = torch.randint(0, args.n_train, (args.batch,), device=dev)
        x = _normalise(x_train[idx])
        x = torch.where(torch.rand(args.batch, 1, 1, 1, device=dev) < 0.5, x.flip(-1), x)
        loss = F.cross_entropy(model(x), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_time = time.perf_counter() - start
    described = (
        f"trained ViT (D={args.dim}, depth {args.depth}, {args.heads} heads) at patch {args.patch}, {size} px on "
        f"{args.device}: {args.steps} steps of {args.batch} ({args.steps * args.batch / args.n_train:.1f} epochs of "
        f"{args.n_train}) in {train_time:.0f} s, last loss {loss.item():.3f}"
    )
    return model, described


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=48, help="48 px: patch sizes 4, 6, 8, 12, 16, 24 all divide it")
    ap.add_argument("--patch", type=int, default=8, help="patch size the model is trained at")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--steps", type=int, default=300, help="training steps (AdamW, cosine schedule)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", help="evaluate this trained shapes ViT (vitkit or run directory); no training")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dim", type=int, default=64, help="token width")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    global MEAN, STD
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if args.checkpoint:
        model = load_model(args.checkpoint).to(dev).eval()
        names = model.preprocess.class_names
        if names is not None and list(names) != SHAPE_CLASSES:
            raise ValueError(f"{args.checkpoint} was trained on classes {names}, not the shapes {SHAPE_CLASSES}")
        MEAN, STD = tuple(model.preprocess.mean), tuple(model.preprocess.std)
        size, args.patch = model.cfg.img_size[0], model.cfg.patch_size
        if model.cfg.img_size[0] != model.cfg.img_size[1]:
            raise ValueError(f"{args.checkpoint}: a square model is needed, got img_size {model.cfg.img_size}")
        described = f"{args.checkpoint}: trained at patch {args.patch}, {size} px"
    else:
        size = args.img_size
        model, described = train(args, dev)
    x_test, y_test, _, _ = make_shapes(args.n_test, size, size, seed=args.seed + 1)
    x_test, y_test = x_test.to(dev), y_test.to(dev)
    print(f"{described}; test on {args.n_test} held-out images")
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
