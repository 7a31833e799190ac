"""The `vitkit` command line. Thin: it parses arguments, calls library functions and prints.

Each command is a pair: `_add_<name>(subparsers)` declares its arguments and `_cmd_<name>(args)` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import warnings
from collections.abc import Callable, Sequence

# Choices come from the Literals of the library's configs, so the CLI and the library never disagree.
from vitkit._validate import choices
from vitkit.explain.maps import HeadFusion, Method
from vitkit.train.config import Amp, AutoAugment, Monitor, TrainConfig
from vitkit.train.evaluate import Split
from vitkit.viz.outputs import VISUALIZATIONS
from vitkit.weights.convert import TargetFormat


def _threads_arg(text: str):
    """argparse type for --threads: "auto" or a positive integer (vitkit.threads)."""
    from vitkit.threads import parse_threads

    try:
        return parse_threads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _set_threads(setting) -> None:
    """Choose the CPU thread count at a command's entry and say which on stderr (stdout may be JSON)."""
    from vitkit.threads import set_threads

    set_threads(setting, log=lambda m: print(m, file=sys.stderr))


_THREADS_HELP = "CPU threads: N, or auto (default): the CPUs idle at the start (see docs/train.md)"
_TOME_HELP = "token merging (ToMe): merge R tokens per block, ViTs with plain attention only (0 = off, docs/deploy.md)"


# ----------------------------------------------------------------------------------------------------------------
# vitkit models [PATTERN]
# ----------------------------------------------------------------------------------------------------------------
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models with params, GMACs, patch grid and tokens")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'vit_*_patch16_*'")
    p.add_argument("--no-flops", action="store_true", help="skip the GMAC count (faster)")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from vitkit.models.summary import format_table, model_table

    rows = model_table(args.pattern, flops=not args.no_flops)
    if not rows:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    print(format_table(rows))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# vitkit convert SRC DST [--to vitkit|hf|timm]
# ----------------------------------------------------------------------------------------------------------------
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (timm / Hugging Face / JAX / vitkit / run) to vitkit, transformers or timm",
    )
    p.add_argument("src", help="checkpoint file (.pth .bin .safetensors .npz), model directory or training run")
    p.add_argument("dst", help="output: a directory (--to vitkit, hf) or a .safetensors/.pth/.pt/.bin file (--to timm)")
    p.add_argument(
        "--to", default="vitkit", choices=choices(TargetFormat),
        help="vitkit: config.json + model.safetensors (default); hf: a transformers directory (from_pretrained "
        "gives the same logits); timm: a timm-layout state dict file",
    )  # fmt: skip
    p.add_argument("--model", default=None, help="registered model name, for what shapes cannot decide (heads)")
    p.add_argument("--img-size", type=int, nargs="+", default=None, help="resample positions for this size (H [W])")
    p.add_argument("--num-classes", type=int, default=None, help="replace the head with a new one of this size")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from vitkit.weights import convert_checkpoint

    img_size = None
    if args.img_size:
        if len(args.img_size) > 2:
            raise ValueError(f"--img-size takes one or two numbers (H or H W), got {args.img_size}")
        img_size = tuple(args.img_size) if len(args.img_size) == 2 else (args.img_size[0],) * 2
    model = convert_checkpoint(
        args.src, args.dst, model_name=args.model, log=_printer("convert"), num_classes=args.num_classes,
        img_size=img_size, to=args.to,
    )  # fmt: skip
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst} ({n:,} parameters)")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# vitkit explain IMAGE... --checkpoint RUN [--method M] [--layer L] [--head H] [--target C] --out DIR [--html FILE]
# ----------------------------------------------------------------------------------------------------------------
_EXPLAIN_METHODS = list(choices(Method))


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="saliency overlays (attention, rollout, relevance) and the HTML explorer")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="run dir (RUN/best, else RUN/last) or model dir")
    p.add_argument("--method", default="rollout", choices=_EXPLAIN_METHODS, help="saliency method (default rollout)")
    p.add_argument(
        "--layer", type=int, default=None, help="block for --method attention (default -1, the last); stage for gradcam"
    )
    p.add_argument("--head", type=int, default=None, help="head for --method attention (default: fuse all heads)")
    p.add_argument("--head-fusion", default="mean", choices=choices(HeadFusion), help="how heads are fused")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="rollouts: drop this share of each row, in [0, 1)")
    p.add_argument(
        "--target", default=None, help="class index or name to explain, for grad-rollout, relevance and gradcam (default: the "
        "predicted class); attention and rollout show the same map for every class and refuse it",
    )  # fmt: skip
    p.add_argument("--out", default=None, metavar="DIR", help="write <image>_<method>.png overlays here")
    p.add_argument("--html", default=None, metavar="FILE", help="write the interactive explorer (one HTML file)")
    p.add_argument("--html-layers", type=int, nargs="+", default=None, help="layers embedded in the explorer (all)")
    p.add_argument("--html-flow", action="store_true", help="add attention flow to the explorer (seconds per image)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=_threads_arg, default="auto", metavar="N|auto", help=_THREADS_HELP)
    p.add_argument("--tome", type=int, default=0, metavar="R", help=_TOME_HELP + "; maps are unmerged to the grid")
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    from vitkit.explain import load_checkpoint
    from vitkit.layers.tome import apply_tome
    from vitkit.viz import write_explorer
    from vitkit.viz.outputs import parse_target, save_explanations

    if args.out is None and args.html is None:
        raise ValueError("nothing to write: give --out DIR for overlay images and/or --html FILE for the explorer")
    if args.target is not None and args.out is None:
        raise ValueError(
            f"--target {args.target} applies to the --out overlays; the --html explorer explains every top-5 class "
            "(click one), so give --out DIR or drop --target"
        )
    _set_threads(args.threads)
    model = load_checkpoint(args.checkpoint, device=args.device)
    apply_tome(model, args.tome)
    target = parse_target(args.target, model.preprocess.class_names, model.num_classes)
    common = dict(head_fusion=args.head_fusion, discard_ratio=args.discard_ratio)
    if args.out is not None:
        written = save_explanations(
            model, args.images, args.out, method=args.method, layer=args.layer, head=args.head, target=target, **common
        )
        for _, line in written:
            print(line)
    if args.html is not None:
        path = write_explorer(args.html, model, args.images, layers=args.html_layers, flow=args.html_flow, **common)
        print(f"wrote {path} ({human_size(path.stat().st_size)}, self-contained)")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# vitkit visualize KIND [IMAGE] --checkpoint RUN --out DIR
# ----------------------------------------------------------------------------------------------------------------
_VISUALIZATIONS = list(VISUALIZATIONS)


def _add_visualize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("visualize", help="figures: patch grid, filters, position embedding, augmentations ...")
    p.add_argument("kind", choices=_VISUALIZATIONS, help="which figure")
    p.add_argument("image", nargs="?", default=None, metavar="IMAGE", help="image for patches/augment/attention-grid")
    p.add_argument("--checkpoint", default=None, metavar="RUN", help="run or model dir (all but receptive-fields)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (writes DIR/<kind>.png)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.set_defaults(func=_cmd_visualize)


def _cmd_visualize(args: argparse.Namespace) -> int:
    from vitkit.explain import load_checkpoint, resolve_checkpoint
    from vitkit.viz.outputs import save_visualization

    if args.checkpoint is None and args.kind != "receptive-fields":
        raise ValueError(f"visualize {args.kind} needs --checkpoint RUN (a training run or a model directory)")
    model = load_checkpoint(args.checkpoint, device=args.device) if args.checkpoint else None
    ckpt = resolve_checkpoint(args.checkpoint) if args.checkpoint else None
    path = save_visualization(args.kind, model, args.out, image=args.image, checkpoint=ckpt)
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# vitkit explain-eval --checkpoint RUN --data shapes --methods ... --out DIR
# ----------------------------------------------------------------------------------------------------------------
def _add_explain_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain-eval", help="compare saliency methods: pointing game, deletion/insertion AUC")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="run dir (RUN/best, else RUN/last) or model dir")
    p.add_argument("--data", default="shapes", help="shapes or shapes:N (default: the run's own shapes data)")
    p.add_argument("--methods", nargs="+", default=[*_EXPLAIN_METHODS, "random"], help="methods to compare")
    p.add_argument("--count", type=int, default=200, help="test images to use (default 200)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--max-steps", type=int, default=64, help="deletion/insertion steps per curve")
    p.add_argument("--seed", type=int, default=None, help="data seed (default: the run's)")
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="block for the attention method (default -1, the last); stage for gradcam",
    )
    p.add_argument("--head-fusion", default="mean", choices=choices(HeadFusion), help="head fusion")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="rollouts' discard ratio, in [0, 1)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/results.json and DIR/results.md")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.set_defaults(func=_cmd_explain_eval)


def _cmd_explain_eval(args: argparse.Namespace) -> int:
    from vitkit.explain import evaluate_checkpoint, format_table, save_results

    if args.count < 1:
        raise ValueError(f"--count must be a positive number of images, got {args.count}")
    kwargs = dict(layer=args.layer, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio)
    results = evaluate_checkpoint(
        args.checkpoint, data=args.data, count=args.count, methods=args.methods, batch_size=args.batch_size,
        max_steps=args.max_steps, seed=args.seed, device=args.device, method_kwargs=kwargs, log=print,
    )  # fmt: skip
    json_path, md_path = save_results(results, args.out)
    acc = results["accuracy"]
    print(f"\n{results['count']} test images of {results['data']}" + (f", model accuracy {acc:.1%}" if acc else ""))
    print(format_table(results))
    print(f"wrote {json_path} and {md_path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# vitkit train / eval / predict
# ----------------------------------------------------------------------------------------------------------------
# Flag -> TrainConfig field. Every flag defaults to None, so only the flags given override the recipe.
_TRAIN_FLAGS = {
    "data": "data", "model": "model", "img_size": "img_size", "epochs": "epochs", "batch_size": "batch_size",
    "lr": "lr", "min_lr": "min_lr", "weight_decay": "weight_decay", "warmup_epochs": "warmup_epochs", "seed": "seed",
    "out": "out", "pretrained": "pretrained", "amp": "amp", "compile": "compile",
    "grad_checkpointing": "grad_checkpointing", "ema": "ema", "ema_decay": "ema_decay", "mixup": "mixup",
    "cutmix": "cutmix", "label_smoothing": "label_smoothing", "auto_augment": "auto_augment",
    "layer_decay": "layer_decay", "head_lr_mult": "head_lr_mult", "freeze_layers": "freeze_layers",
    "accum_steps": "accum_steps", "clip_grad": "clip_grad", "patience": "patience", "monitor": "monitor",
    "strict": "strict", "tensorboard": "tensorboard", "workers": "workers", "device": "device",
    "ckpt_every_steps": "ckpt_every_steps", "progress": "progress", "threads": "threads", "tome": "tome",
}  # fmt: skip


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a ViT (no arguments: the digits default, ~2.5 min on 2 CPU cores)",
        description="Train a ViT. Precedence: built-in defaults < --config recipe < flags < --set. "
        "Without --config, training the default model on digits uses recipes/digits.yaml's settings. "
        "Runs under torchrun for DDP. See docs/train.md.",
    )
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="RECIPE.yaml", help="recipe file (flags override it)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run exactly from RUN_DIR/last (or restart it)")
    g.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/<data>-<model>-<timestamp>)")
    g.add_argument("--seed", type=int, help="seed for split, init, data order, augmentation (default 0)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--ckpt-every-steps", type=int, metavar="N", help="also checkpoint every N optimiser steps")
    g.add_argument("--patience", type=int, metavar="EPOCHS", help="early stopping patience (0 = off)")
    g.add_argument("--monitor", choices=choices(Monitor), help="best/early-stop metric")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None, help="TensorBoard events")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other TrainConfig setting, e.g. --set hflip=0 --set model_args='{depth: 4}'",
    )
    g = p.add_argument_group("data and model")
    g.add_argument("--data", help="digits, shapes[:N], FOLDER, csv:FILE, cifar10:DIR, mnist:DIR ...")
    g.add_argument("--model", help="registered model name (see `vitkit models`)")
    g.add_argument("--pretrained", metavar="CKPT", help="fine-tune from a vitkit dir, timm/HF checkpoint or .npz")
    g.add_argument("--attn-layer", metavar="NAME", help="attention variant of a ViT (see docs/models.md), e.g. local")
    g.add_argument(
        "--attn-args", type=_mapping_arg, metavar="MAPPING", help="its options as YAML/JSON, e.g. '{window: 7}'"
    )
    g.add_argument("--embed-layer", metavar="NAME", help="patch-embedding variant of a ViT, e.g. overlap")
    g.add_argument(
        "--embed-args", type=_mapping_arg, metavar="MAPPING", help="its options as YAML/JSON, e.g. '{kernel_size: 7}'"
    )
    g.add_argument("--img-size", type=int, help="training resolution (default: the model's)")
    g.add_argument("--batch-size", type=int, help="global batch size")
    g.add_argument("--workers", type=int, help="data loader processes for lazily decoded folders")
    g.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None, help="fail on unreadable images")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--min-lr", type=float, help="cosine floor")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--layer-decay", type=float, help="layer-wise LR decay (fine-tuning, e.g. 0.75)")
    g.add_argument("--head-lr-mult", type=float, help="LR multiplier for the classifier head")
    g.add_argument("--freeze-layers", type=int, metavar="N", help="freeze embeddings + first N blocks")
    g.add_argument("--accum-steps", type=int, help="gradient accumulation micro-batches per step")
    g.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--mixup", type=float, metavar="ALPHA", help="Mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, metavar="ALPHA", help="CutMix alpha (0 = off)")
    g.add_argument("--auto-augment", choices=choices(AutoAugment))
    g = p.add_argument_group("speed and memory")
    g.add_argument("--threads", type=_threads_arg, metavar="N|auto", help=_THREADS_HELP)
    g.add_argument("--amp", choices=choices(Amp), help="autocast dtype (fp16 needs CUDA)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--tome", type=int, metavar="R", help=_TOME_HELP)
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="EMA of the weights")
    g.add_argument("--ema-decay", type=float)
    p.set_defaults(func=_cmd_train)


_MODEL_ARG_FLAGS = ("attn_layer", "attn_args", "embed_layer", "embed_args")


def _mapping_arg(text: str) -> dict:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not YAML/JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{window: 7}}', got {text!r}")
    return value


def _parse_sets(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from vitkit.train import NonFiniteLossError, TrainingInterrupted, train

    overrides = {field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items()}
    overrides.update(_parse_sets(args.set))
    # Architecture flags are model_args keys: they join (and win over) any --set model_args and the recipe's.
    arch = {k: getattr(args, k) for k in _MODEL_ARG_FLAGS if getattr(args, k) is not None}
    if arch:
        given = overrides.get("model_args") or {}
        if not isinstance(given, dict):
            raise ValueError(f"--set model_args must be a mapping, e.g. '{{depth: 4}}', got {given!r}")
        overrides["model_args"] = {**given, **arch}
    if args.resume and args.config:
        raise ValueError("--resume uses the run's own config.yaml; do not combine it with --config")
    try:
        summary = train(args.config, resume=args.resume, overrides=overrides, log=_printer("train", sys.stderr))
    except TrainingInterrupted as e:
        print(f"vitkit train: {e}", file=sys.stderr)
        return e.exit_code
    except NonFiniteLossError as e:
        print(f"vitkit train: error: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    run = summary["run_dir"]
    best = summary["best_val_acc"]
    print(f"test accuracy {summary['test_acc']:.4f}" if summary["test_acc"] is not None else "no test split")
    if best is not None:
        print(f"best val accuracy {best:.4f} (epoch {summary['best_epoch']})")
    print(f"{summary['epochs_run']} epochs in {summary['wall_time_s']:.0f} s ({summary['images_per_s']:.0f} img/s)")
    print(f"outputs in {run}/: best/ last/ (checkpoints), metrics.jsonl, metrics.csv, curves.png, summary.json")
    print(f"next: vitkit eval --checkpoint {run}    vitkit predict --checkpoint {run} IMAGE")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5/per-class accuracy and a confusion matrix of a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR|MODEL_DIR", help="a run (uses best/) or model dir")
    p.add_argument("--data", help="data spec (default: the data the checkpoint was trained on)")
    p.add_argument("--split", default="test", choices=choices(Split))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=_threads_arg, default="auto", metavar="N|auto", help=_THREADS_HELP)
    p.add_argument("--out", metavar="DIR", help="write eval.json and confusion.png here")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--tome", type=int, default=0, metavar="R", help=_TOME_HELP)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from vitkit.train import evaluate

    _set_threads(args.threads)
    r = evaluate(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size, device=args.device,
                 out=args.out, threads=None, tome=args.tome)  # fmt: skip
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    head = f"{r['data']} ({r['split']}, {r['n']} images)"
    top5 = f"  top-5 {r['top5']:.4f}" if r["top5"] is not None else ""  # None with 5 classes or fewer
    print(f"{head}: top-1 {r['top1']:.4f}{top5}  loss {r['loss']:.4f}")
    width = max(len(c) for c in r["per_class"])
    for name, pc in r["per_class"].items():
        acc = "-" if pc["acc"] is None else f"{pc['acc']:.4f}"
        print(f"  {name:<{width}}  {acc}  ({pc['n']} images)")
    if "files" in r:
        print(f"wrote {r['files']['json']} and {r['files']['confusion_png']}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k classes with probabilities for image files")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR|MODEL_DIR")
    p.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files or folders (every image under a folder, recursively, "
        "sorted by path; non-image files are skipped)",
    )  # fmt: skip
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=_threads_arg, default="auto", metavar="N|auto", help=_THREADS_HELP)
    p.add_argument("--json", action="store_true", help="print JSON (one object per image)")
    p.add_argument("--tome", type=int, default=0, metavar="R", help=_TOME_HELP)
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    from vitkit.train import predict

    _set_threads(args.threads)
    results = predict(args.checkpoint, args.images, topk=args.topk, device=args.device, threads=None, tome=args.tome)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["path"])
        for t in r["top"]:
            print(f"  {t['prob']:.4f}  {t['class']}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# vitkit export SRC --format onnx|torch-export --out FILE [--img-size H [W]] [--batch B] [--opset N] [--check]
# ----------------------------------------------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    from vitkit.deploy.export import Format

    p = sub.add_parser(
        "export", help="export to ONNX or torch.export with dynamic batch, height and width (docs/deploy.md)"
    )
    p.add_argument("src", help="run directory, checkpoint directory, foreign checkpoint file, or registered model name")
    p.add_argument("--format", required=True, choices=choices(Format), help="onnx (onnxruntime) or torch-export (.pt2)")
    p.add_argument("--out", required=True, help="file to write (atomically)")
    p.add_argument(
        "--img-size", type=int, nargs="+", default=None, help="example size traced, H [W] (default: the model's)"
    )
    p.add_argument("--batch", type=int, default=None, help="fix the batch size (default: any batch)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (>= 18; default: the exporter's)")
    p.add_argument("--static", action="store_true", help="fixed height and width (the example size); Swin needs it")
    p.add_argument("--check", action="store_true", help="run the file against eager at four sizes and print the table")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from vitkit.deploy.export import ExportCheckError, check_export, export_model, format_check, load_export_source

    size = None
    if args.img_size:
        if len(args.img_size) > 2:
            raise ValueError(f"--img-size takes one or two numbers (H or H W), got {args.img_size}")
        size = tuple(args.img_size) if len(args.img_size) == 2 else (args.img_size[0],) * 2
    model = load_export_source(args.src, log=_printer("export"))
    result = export_model(
        model, args.out, format=args.format, example_size=size, batch=args.batch, opset=args.opset,
        dynamic=not args.static,
    )  # fmt: skip
    meta = result.metadata
    h, w = meta["example_size"]
    sizes = f"{h}x{w} only" if args.static else f"sides multiples of {meta['patch_multiple']} from {meta['min_size']}"
    batch = "any" if meta["batch"] is None else meta["batch"]
    print(f"wrote {result.path} ({human_size(result.path.stat().st_size)}, {result.seconds:.1f} s): "
          f"{meta['model_name']}, {sizes}, batch {batch}")  # fmt: skip
    if args.check:
        batches = (1, 3) if args.batch is None else (args.batch,)
        try:
            sizes = [(h, w)] if args.static else None  # a one-size file runs at its size only
            print(format_check(check_export(result.path, model, sizes, batches=batches)))
        except ExportCheckError as e:
            print(f"vitkit export: parity check failed: {e}", file=sys.stderr)
            return 1
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Command table. Add a command by writing its _add_/_cmd_ pair above and listing _add_<name> here.
# ----------------------------------------------------------------------------------------------------------------
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models,
    _add_convert,
    _add_train,
    _add_eval,
    _add_predict,
    _add_explain,
    _add_visualize,
    _add_explain_eval,
    _add_export,
]


# ----------------------------------------------------------------------------------------------------------------
# Messages: library errors and logs name Python arguments; on the command line they name the flags.
# ----------------------------------------------------------------------------------------------------------------
# Per command: library argument -> the flag that sets it.
_ARG_FLAGS: dict[str, dict[str, str]] = {
    "convert": {"model_name": "--model", "img_size": "--img-size", "num_classes": "--num-classes", "to": "--to"},
    # Every TrainConfig field: its own flag where it has one (_TRAIN_FLAGS), else --set FIELD.
    "train": {
        "model_name": "--model",
        **{f.name: f"--set {f.name}" for f in dataclasses.fields(TrainConfig)},
        **{field: "--" + flag.replace("_", "-") for flag, field in _TRAIN_FLAGS.items()},
        **{name: "--" + name.replace("_", "-") for name in _MODEL_ARG_FLAGS},
    },
    "eval": {"data": "--data", "split": "--split", "batch_size": "--batch-size", "device": "--device"},
    "predict": {"topk": "--topk", "device": "--device"},
    "explain": {
        "target": "--target", "method": "--method", "layer": "--layer", "head": "--head",
        "head_fusion": "--head-fusion", "discard_ratio": "--discard-ratio", "layers": "--html-layers",
    },
    "visualize": {"kind": "KIND", "image": "IMAGE"},
    "export": {"format": "--format", "example_size": "--img-size", "batch": "--batch", "opset": "--opset"},
    "explain-eval": {
        "data": "--data", "count": "--count", "methods": "--methods", "batch_size": "--batch-size",
        "max_steps": "--max-steps", "layer": "--layer", "head_fusion": "--head-fusion",
        "discard_ratio": "--discard-ratio",
    },
}  # fmt: skip
_PYTHON_NAMES = {"vitkit.list_models()": "`vitkit models`"}


def cli_message(text: str, command: str) -> str:
    """`text` with the library arguments of `command` written as its flags: `pass model_name=` -> `pass --model`.

    `arg=` and `arg=...` become the bare flag, `arg=value` becomes `flag value` (a tuple `(16, 16)` becomes
    `16 16`, a quoted string loses its quotes), and `strict=False` style booleans become `--no-strict`.
    """
    for name, cli in _PYTHON_NAMES.items():
        text = text.replace(name, cli)
    flags = _ARG_FLAGS.get(command)
    if not flags:
        return text
    pattern = r"(?<![\w.-])(" + "|".join(map(re.escape, flags)) + r")=(\([^)]*\)|'[^']*'|\.\.\.|[^\s,;)]*)"

    def flag(m: re.Match) -> str:
        name, value = flags[m.group(1)], m.group(2)
        if name.startswith("--set "):  # a TrainConfig field without a flag of its own: --set KEY=VALUE
            return f"{name}={value if value not in ('', '...') else 'VALUE'}"
        if value in ("", "..."):
            return name
        if value in ("True", "False") and name.startswith("--") and " " not in name:
            return name if value == "True" else "--no-" + name[2:]
        if value.startswith("("):
            value = " ".join(v.strip() for v in value[1:-1].split(",") if v.strip())
        return f"{name} {value.strip(chr(39))}"

    return re.sub(pattern, flag, text)


def _printer(command: str, file=None) -> Callable[[str], None]:
    """A log sink that prints library messages with flags in place of argument names."""
    return lambda message: print(cli_message(str(message), command), file=file or sys.stdout, flush=True)


def human_size(num_bytes: int) -> str:
    """A file size for people: '812 B', '39 KB', '4.2 MB', '1.3 GB' (decimal units)."""
    if num_bytes < 1000:
        return f"{num_bytes} B"
    for unit, scale in (("KB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if num_bytes < 1000 * scale or unit == "GB":
            value = num_bytes / scale
            return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _show_warning(command: str, default: Callable) -> Callable:
    """warnings.showwarning for the CLI: vitkit's bad-image warnings as one clean line, others unchanged."""
    from vitkit.data.images import BadImageWarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, BadImageWarning):
            print(f"vitkit {command}: warning: {cli_message(str(message), command)}", file=sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def build_parser() -> argparse.ArgumentParser:
    from vitkit._version import __version__

    parser = argparse.ArgumentParser(prog="vitkit", description="Vision Transformers: train, inspect, convert.")
    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():  # restores warnings.showwarning on the way out
            warnings.showwarning = _show_warning(args.command, warnings.showwarning)
            return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        # User errors: one clear line, no traceback. Set VITKIT_DEBUG=1 for the traceback.
        import os

        if os.environ.get("VITKIT_DEBUG"):
            raise
        print(f"vitkit {args.command}: error: {cli_message(str(e), args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
