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
from vitkit.deploy.quantize import DEFAULT_CALIBRATION_IMAGES, DEFAULT_METHOD, Int8Method
from vitkit.explain.evaluate import EVAL_METHODS
from vitkit.explain.maps import HeadFusion, Method
from vitkit.train.config import Amp, AutoAugment, Distillation, Monitor, Parallel, SegHeadName, TaskName, TrainConfig
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
_EXPLAIN_METHODS = [*choices(Method), "cross-attention"]  # cross-attention: DETR detectors (vitkit.explain.dense)


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain", help="saliency overlays (attention, rollout, relevance; segmentation and DETR models too) and the "
        "HTML explorer",
    )  # fmt: skip
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="run dir (RUN/best, else RUN/last) or model dir")
    p.add_argument(
        "--method", default=None, choices=_EXPLAIN_METHODS, help="saliency method (default: rollout for classifiers, "
        "gradcam of the class region for segmentation, cross-attention for detectors; docs/explain.md)",
    )  # fmt: skip
    p.add_argument(
        "--layer", type=int, default=None, help="block for --method attention (default -1, the last); stage for "
        "gradcam; decoder layer for cross-attention",
    )  # fmt: skip
    p.add_argument(
        "--head",
        type=int,
        default=None,
        help="head for --method attention or cross-attention (default: fuse all heads)",
    )
    p.add_argument("--head-fusion", default="mean", choices=choices(HeadFusion), help="how heads are fused")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="rollouts: drop this share of each row, in [0, 1)")
    p.add_argument(
        "--target", default=None, help="class index or name to explain, for grad-rollout, relevance and gradcam (default: the "
        "predicted class; segmentation: each image's most frequent object class); attention and rollout show the same "
        "map for every class and refuse it",
    )  # fmt: skip
    p.add_argument("--threshold", type=float, default=None, metavar="P", help="detectors: lowest score drawn (0.5)")
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
    from vitkit.explain.dense import dense_kind
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
    kind = dense_kind(model)
    if kind is not None:
        return _explain_dense(args, model, kind)
    if args.threshold is not None:
        raise ValueError(f"--threshold applies to detectors; {args.checkpoint} is a classifier")
    if args.method == "cross-attention":
        raise ValueError(f"--method cross-attention is for DETR detectors; {args.checkpoint} is a classifier")
    method = args.method or "rollout"
    apply_tome(model, args.tome)
    target = parse_target(args.target, model.preprocess.class_names, model.num_classes)
    common = dict(head_fusion=args.head_fusion, discard_ratio=args.discard_ratio)
    if args.out is not None:
        written = save_explanations(
            model, args.images, args.out, method=method, layer=args.layer, head=args.head, target=target, **common
        )
        for _, line in written:
            print(line)
    if args.html is not None:
        path = write_explorer(args.html, model, args.images, layers=args.html_layers, flow=args.html_flow, **common)
        print(f"wrote {path} ({human_size(path.stat().st_size)}, self-contained)")
    return 0


def _explain_dense(args: argparse.Namespace, model, kind: str) -> int:
    """`vitkit explain` on a segmentation model or a detector (vitkit.explain.dense)."""
    from vitkit.explain.dense import DEFAULT_DENSE_METHOD, check_dense_method
    from vitkit.viz import write_explorer
    from vitkit.viz.detection import save_detection_explanations
    from vitkit.viz.outputs import parse_target
    from vitkit.viz.segmentation import save_segmentation_explanations

    if args.tome:
        raise ValueError(
            f"--tome is for classifiers; {args.checkpoint} is a {kind} model, whose heads need every patch"
        )
    method = args.method or DEFAULT_DENSE_METHOD[kind]
    check_dense_method(model, method)
    common = dict(layer=args.layer, head=args.head, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio)
    if kind == "segmentation":
        if args.threshold is not None:
            raise ValueError(f"--threshold applies to detectors; {args.checkpoint} is a segmentation model")
        target = parse_target(args.target, model.preprocess.class_names, model.num_classes)
        if args.out is not None:
            written = save_segmentation_explanations(model, args.images, args.out, method, target=target, **common)
            for _, line in written:
                print(line)
    else:
        if args.target is not None:
            raise ValueError(
                f"--target applies to classifiers and segmentation models; a detector's figure shows each detected "
                f"query with its own class (use --threshold to choose which), got --target {args.target}"
            )
        threshold = 0.5 if args.threshold is None else args.threshold
        if args.out is not None:
            written = save_detection_explanations(model, args.images, args.out, method, threshold=threshold, **common)
            for _, line in written:
                print(line)
    if args.html is not None:
        path = write_explorer(args.html, model, args.images, layers=args.html_layers, flow=args.html_flow,
                              head_fusion=args.head_fusion, discard_ratio=args.discard_ratio)  # fmt: skip
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
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(EVAL_METHODS),
        help=f"methods to compare (default: {' '.join(EVAL_METHODS)})",
    )
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
    "parallel": "parallel",
    "teacher": "teacher", "teacher_model": "teacher_model", "distillation": "distillation",
    "distill_alpha": "distill_alpha", "distill_tau": "distill_tau",
    "task": "task", "seg_head": "seg_head",
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
    g.add_argument(
        "--task", choices=choices(TaskName), help="what is learned: classify (default), segment, detect (docs/dense.md)"
    )
    g.add_argument("--data", help="digits, shapes[:N], FOLDER, csv:FILE, cifar10:DIR, mnist:DIR, scenes[:N] ...")
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
    g.add_argument("--num-queries", type=int, metavar="N", help="--task detect: object queries (default 20)")
    g.add_argument("--img-size", type=int, help="training resolution (default: the model's)")
    g.add_argument("--batch-size", type=int, help="global batch size")
    g.add_argument("--workers", type=int, help="data loader processes for lazily decoded folders")
    g.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None, help="fail on unreadable images")
    g.add_argument("--seg-head", choices=choices(SegHeadName), help="--task segment: head on the --model backbone")
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
    g = p.add_argument_group("knowledge distillation (DeiT, docs/train.md)")
    g.add_argument("--teacher", metavar="SRC", help="teacher: a run or model dir, a timm/HF checkpoint")
    g.add_argument("--teacher-model", metavar="NAME", help="registered name for a teacher file (e.g. resnet18 .pth)")
    g.add_argument("--distillation", choices=choices(Distillation), help="hard (teacher argmax) or soft (KL)")
    g.add_argument("--distill-alpha", type=float, metavar="A", help="weight of the distillation loss (default 0.5)")
    g.add_argument("--distill-tau", type=float, metavar="T", help="soft distillation temperature (default 1.0)")
    g = p.add_argument_group("speed and memory")
    g.add_argument("--threads", type=_threads_arg, metavar="N|auto", help=_THREADS_HELP)
    g.add_argument("--amp", choices=choices(Amp), help="autocast dtype (fp16 needs CUDA)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--tome", type=int, metavar="R", help=_TOME_HELP)
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="EMA of the weights")
    g.add_argument("--ema-decay", type=float)
    # One or the other: `--fsdp --parallel ddp` would otherwise let the last flag win silently.
    par = g.add_mutually_exclusive_group()
    par.add_argument(
        "--parallel", choices=choices(Parallel), help="under torchrun: ddp (replicas, default) or fsdp (sharded)"
    )
    par.add_argument(
        "--fsdp", dest="parallel", action="store_const", const="fsdp", help="same as --parallel fsdp (FSDP2)"
    )
    p.set_defaults(func=_cmd_train)


_MODEL_ARG_FLAGS = ("attn_layer", "attn_args", "embed_layer", "embed_args", "num_queries")


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
    if summary.get("task") == "segment":
        from vitkit.train.seg_run import summary_lines

        print("\n".join(summary_lines(summary)))
        return 0
    run = summary["run_dir"]
    if summary.get("task") == "detect":
        from vitkit.train.detection_run import describe_summary

        print(describe_summary(summary))
        return 0
    best = summary["best_val_acc"]
    print(f"test accuracy {summary['test_acc']:.4f}" if summary["test_acc"] is not None else "no test split")
    if best is not None:
        print(f"best val accuracy {best:.4f} (epoch {summary['best_epoch']})")
    print(f"{summary['epochs_run']} epochs in {summary['wall_time_s']:.0f} s ({summary['images_per_s']:.0f} img/s)")
    print(f"outputs in {run}/: best/ last/ (checkpoints), metrics.jsonl, metrics.csv, curves.png, summary.json")
    print(f"next: vitkit eval --checkpoint {run}    vitkit predict --checkpoint {run} IMAGE")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# vitkit pretrain --method mae --data SRC   (self-supervised pretraining; docs/train.md "MAE pretraining")
# ----------------------------------------------------------------------------------------------------------------
_PRETRAIN_FLAGS = ("data", "model", "img_size", "epochs", "batch_size", "lr", "min_lr", "weight_decay",
                   "warmup_epochs", "seed", "out", "pretrained", "amp", "ema", "device", "ckpt_every_steps",
                   "progress", "threads", "figures_every", "accum_steps", "clip_grad", "patience")  # fmt: skip
_MAE_ARG_FLAGS = ("mask_ratio", "norm_pix_loss", "decoder_depth", "decoder_embed_dim", "decoder_num_heads",
                  "patch_size", "embed_dim", "depth", "num_heads")  # fmt: skip


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pretraining without labels: masked autoencoder (MAE)",
        description="Pretrain a ViT encoder on unlabeled images (a folder of images, or any data spec with its "
        "labels ignored). Writes a run directory like `vitkit train`; fine-tune it with "
        "`vitkit train --pretrained RUN`. See docs/train.md.",
    )
    p.add_argument("--method", choices=["mae"], default="mae", help="the objective (default mae)")
    p.add_argument("--config", metavar="RECIPE.yaml", help="recipe file (flags override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a pretraining run exactly")
    p.add_argument("--data", help="FOLDER of images (no class folders needed), shapes[:N], digits, cifar10:DIR ...")
    p.add_argument("--model", help="the encoder: a registered ViT name (default vit_nano_patch4_32)")
    p.add_argument("--pretrained", metavar="CKPT", help="continue from an MAE run/dir or a transformers ViTMAE dir")
    p.add_argument("--img-size", type=int, help="pretraining resolution (default: the encoder's)")
    p.add_argument("--patch-size", type=int, help="encoder patch size (default: the encoder's)")
    p.add_argument("--embed-dim", type=int, help="encoder width (default: the encoder's)")
    p.add_argument("--depth", type=int, help="encoder blocks (default: the encoder's)")
    p.add_argument("--num-heads", type=int, help="encoder heads (default: the encoder's)")
    p.add_argument("--mask-ratio", type=float, help="share of patches hidden from the encoder (default 0.75)")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="per-patch normalised pixel targets (the paper's better features; default off)")  # fmt: skip
    p.add_argument("--decoder-depth", type=int, help="decoder blocks (default 8)")
    p.add_argument("--decoder-embed-dim", type=int, help="decoder width (default 512)")
    p.add_argument("--decoder-num-heads", type=int, help="decoder heads (default 16)")
    p.add_argument("--figures-every", type=int, metavar="N", help="reconstruction figures every N epochs (0 = none)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr", type=float, help="cosine floor")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--accum-steps", type=int, help="gradient accumulation micro-batches per step")
    p.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm")
    p.add_argument("--patience", type=int, metavar="EPOCHS", help="early stopping patience on val_loss (0 = off)")
    p.add_argument("--seed", type=int, help="seed for split, init, masks, data order, augmentation (default 0)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/<data>-<model>-<timestamp>)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=choices(Amp), help="autocast dtype (fp16 needs CUDA)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="EMA of the weights")
    p.add_argument("--ckpt-every-steps", type=int, metavar="N", help="also checkpoint every N optimiser steps")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")
    p.add_argument("--threads", type=_threads_arg, metavar="N|auto", help=_THREADS_HELP)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other TrainConfig setting")
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    import os

    from vitkit.train import NonFiniteLossError, TrainingInterrupted
    from vitkit.train.pretrain import pretrain

    overrides = {k: getattr(args, k) for k in _PRETRAIN_FLAGS}
    overrides.update(_parse_sets(args.set))
    arch = {k: getattr(args, k) for k in _MAE_ARG_FLAGS if getattr(args, k) is not None}
    if arch:
        given = overrides.get("model_args") or {}
        if not isinstance(given, dict):
            raise ValueError(f"--set model_args must be a mapping, e.g. '{{decoder_depth: 2}}', got {given!r}")
        overrides["model_args"] = {**given, **arch}
    if args.resume and (args.config or arch):
        raise ValueError("--resume uses the run's own config.yaml; do not combine it with --config or model flags")
    try:
        summary = pretrain(args.config, method=args.method, resume=args.resume, overrides=overrides,
                           log=_printer("pretrain", sys.stderr))  # fmt: skip
    except TrainingInterrupted as e:
        print(f"vitkit pretrain: {e}", file=sys.stderr)
        return e.exit_code
    except NonFiniteLossError as e:
        print(f"vitkit pretrain: error: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    run = summary["run_dir"]
    if summary.get("test_loss") is not None:
        print(f"test reconstruction loss {summary['test_loss']:.4f} (masked patches, mean squared error)")
    if summary.get("best_val_loss") is not None:
        print(f"best val reconstruction loss {summary['best_val_loss']:.4f} (epoch {summary['best_epoch']})")
    print(f"{summary['epochs_run']} epochs in {summary['wall_time_s']:.0f} s ({summary['images_per_s']:.0f} img/s)")
    print(f"outputs in {run}/: best/ last/, reconstructions/, metrics.jsonl, metrics.csv, curves.png, summary.json")
    print(f"next: vitkit train --pretrained {run} --data DATA    vitkit probe --checkpoint {run}")
    return 0


def _add_int8_flags(p: argparse.ArgumentParser) -> None:
    """--int8 and its options, shared by eval and predict (vitkit.deploy.quantize; docs/deploy.md)."""
    p.add_argument("--int8", action="store_true", help="run an int8 copy of the model, quantized on load (CPU)")
    p.add_argument(
        "--int8-method", choices=choices(Int8Method), default=None,
        help=f"pt2e: calibrated, compiled int8 kernels (default: {DEFAULT_METHOD}); dynamic: linear layers, no "
        "calibration, no compilation",
    )  # fmt: skip
    p.add_argument(
        "--int8-mixed-bf16", action=argparse.BooleanOptionalAction, default=None,
        help="pt2e: run what stays unquantized (attention, softmax, norms) in bf16 (default: on where the CPU has "
        "native bf16, AVX-512-bf16 or AMX, where it is the fastest int8; --no-int8-mixed-bf16 turns it off)",
    )  # fmt: skip
    p.add_argument("--calib", metavar="DATA", help="pt2e calibration data (default: the checkpoint's training data)")
    p.add_argument(
        "--calib-images", type=int, metavar="N",
        help=f"calibration images (default: {DEFAULT_CALIBRATION_IMAGES}, or all if fewer)",
    )  # fmt: skip


def _int8_requested(args: argparse.Namespace) -> bool:
    """Whether --int8 is on; its options without it are an error, not ignored."""
    if not args.int8:
        given = [f for f, v in (("--int8-method", args.int8_method), ("--calib", args.calib),
                                ("--calib-images", args.calib_images),
                                ("--int8-mixed-bf16" if args.int8_mixed_bf16 else "--no-int8-mixed-bf16",
                                 args.int8_mixed_bf16)) if v is not None]  # fmt: skip
        if given:
            raise ValueError(f"{given[0]} needs --int8")
    elif args.device not in ("auto", "cpu"):
        raise ValueError(f"--int8 runs on the CPU; got --device {args.device} (use auto or cpu)")
    return bool(args.int8)


def _int8_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        method=args.int8_method or DEFAULT_METHOD, calibration=args.calib, num_images=args.calib_images,
        mixed_bf16=args.int8_mixed_bf16,
    )  # fmt: skip


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
    p.add_argument("--knn", action="store_true", help="weighted k-NN on frozen features (DINO; docs/features.md)")
    p.add_argument("--knn-k", type=int, metavar="K", help="--knn: neighbours that vote (default 20)")
    p.add_argument("--knn-temperature", type=float, metavar="T", help="--knn: vote temperature (default 0.07)")
    _add_int8_flags(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval_knn(args: argparse.Namespace) -> int:
    import json

    from vitkit.features import knn_evaluate
    from vitkit.features.knn import DEFAULT_K, DEFAULT_TEMPERATURE

    if args.out or args.tome:
        raise ValueError("--knn prints accuracies only: drop --out and --tome")
    if _int8_requested(args):
        raise ValueError("--knn runs the fp32 model: drop --int8 (int8 evaluates the classifier head)")
    k = DEFAULT_K if args.knn_k is None else args.knn_k
    temperature = DEFAULT_TEMPERATURE if args.knn_temperature is None else args.knn_temperature
    r = knn_evaluate(args.checkpoint, args.data, k=k, temperature=temperature, split=args.split,
                     batch_size=args.batch_size, device=args.device)  # fmt: skip
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    top5 = f"  top-5 {r['top5']:.4f}" if r["top5"] is not None else ""
    print(f"{r['data']} ({r['split']}, {r['n']} images): k-NN top-1 {r['top1']:.4f}{top5}  "
          f"(k={r['k']}, T={r['temperature']:g}, {r['n_train']} train features of {r['dim']} dims)")  # fmt: skip
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from vitkit.train import evaluate

    _set_threads(args.threads)
    from vitkit.train.detection_run import is_detector

    if is_detector(args.checkpoint):  # a ViTDETR: COCO mAP (vitkit.train.detection_run)
        return _cmd_eval_detection(args)
    from vitkit.train.seg_run import is_segmentation_checkpoint

    if is_segmentation_checkpoint(args.checkpoint):
        return _cmd_eval_segment(args)
    if args.knn:
        return _cmd_eval_knn(args)
    if args.knn_k is not None or args.knn_temperature is not None:
        raise ValueError("--knn-k and --knn-temperature set the k-NN evaluation: add --knn (or drop them)")
    if _int8_requested(args):  # int8: vitkit.deploy.evaluate_int8 (CPU), compared with the fp32 model
        from vitkit.deploy import evaluate_int8

        r = evaluate_int8(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size, out=args.out,
                          threads=None, tome=args.tome, **_int8_kwargs(args))  # fmt: skip
    else:
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
    if "int8" in r:
        q = r["int8"]
        calib = f", {q['calibration_images']} calibration images from {q['calibration']}" if q["calibration"] else ""
        mixed = " + bf16" if q.get("mixed_bf16") else ""
        print(f"int8 ({q['method']}{mixed}{calib}): agreement with fp32 {r['agreement']:.4f}, "
              f"fp32 top-1 {r['top1_reference']:.4f}")  # fmt: skip
    if "files" in r:
        print(f"wrote {r['files']['json']} and {r['files']['confusion_png']}")
    return 0


def _cmd_eval_detection(args: argparse.Namespace) -> int:
    import json

    from vitkit.train.detection_run import evaluate_detection

    if args.knn or args.tome or _int8_requested(args):
        raise ValueError("a detector is evaluated by COCO mAP only: drop --knn, --tome and --int8")
    r = evaluate_detection(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size,
                           device=args.device, out=args.out, threads=None)  # fmt: skip
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    num = {k: "-" if r[k] is None else f"{r[k]:.4f}" for k in ("map50", "map", "map75", "loss")}  # None: undefined
    print(f"{r['data']} ({r['split']}, {r['n']} images, {r['n_boxes']} boxes): mAP@0.5 {num['map50']}  "
          f"mAP@[.5:.95] {num['map']}  mAP@0.75 {num['map75']}  loss {num['loss']}")  # fmt: skip
    if "files" in r:
        print(f"wrote {r['files']['json']}")
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
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON: one object per image (classifiers, segmentation); detectors: a list of COCO results",
    )
    p.add_argument("--tome", type=int, default=0, metavar="R", help=_TOME_HELP)
    p.add_argument(
        "--out",
        metavar="DIR",
        help="segmentation: folder for mask overlays (default ./predictions); detectors: for the PNGs with boxes "
        "(default detections/). With --json and no --out nothing is written: the JSON is the output",
    )
    p.add_argument("--threshold", type=float, metavar="P", help="detectors: lowest score shown (default 0.5)")
    _add_int8_flags(p)
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    from vitkit.train import predict

    _set_threads(args.threads)
    from vitkit.train.detection_run import is_detector
    from vitkit.train.seg_run import is_segmentation_checkpoint

    if is_detector(args.checkpoint):  # a ViTDETR: boxes drawn on the images (vitkit.viz.detection)
        return _cmd_predict_detection(args)
    if is_segmentation_checkpoint(args.checkpoint):
        if args.threshold is not None:
            raise ValueError("--threshold applies to detectors; this checkpoint is a segmentation model")
        return _cmd_predict_segment(args)
    if args.out is not None or args.threshold is not None:
        from vitkit.runs import resolve_checkpoint

        resolve_checkpoint(args.checkpoint)  # a missing checkpoint is named as such before --out is judged
        raise ValueError(
            "--out applies to segmentation models (mask overlays) and detectors (boxes), --threshold to detectors; "
            "this checkpoint is a classifier, which prints its classes"
        )
    if _int8_requested(args):  # int8: vitkit.deploy.predict_int8 (CPU)
        from vitkit.deploy import predict_int8

        results = predict_int8(args.checkpoint, args.images, topk=args.topk, threads=None, tome=args.tome,
                               **_int8_kwargs(args))  # fmt: skip
    else:
        results = predict(args.checkpoint, args.images, topk=args.topk, device=args.device, threads=None,
                          tome=args.tome)  # fmt: skip
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    if args.int8:
        q = _int8_kwargs(args)
        print(f"int8 ({q['method']}{' + bf16' if q['mixed_bf16'] else ''}): probabilities of the int8 model")
    for r in results:
        print(r["path"])
        for t in r["top"]:
            print(f"  {t['prob']:.4f}  {t['class']}")
    return 0


def _refuse_for_segmentation(args: argparse.Namespace, command: str) -> None:
    given = [f for f, on in (("--knn", getattr(args, "knn", False)), ("--tome", args.tome), ("--int8", args.int8))
             if on]  # fmt: skip
    if given:
        raise ValueError(f"{given[0]} is for classifiers; {args.checkpoint} is a segmentation model ({command})")


def _cmd_eval_segment(args: argparse.Namespace) -> int:
    import json

    from vitkit.train.seg_run import evaluate_segmentation

    _refuse_for_segmentation(args, "vitkit eval reports mIoU, Dice and per-class IoU")
    r = evaluate_segmentation(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size,
                              device=args.device, out=args.out, threads=None)  # fmt: skip
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    if r["miou"] is None:  # every mask pixel of the split is 255: nothing to score
        print(f"{r['data']} ({r['split']}, {r['n']} images): no labelled pixel (every mask pixel is 255), no metric")
        return 0
    print(f"{r['data']} ({r['split']}, {r['n']} images): mIoU {r['miou']:.4f}  Dice {r['dice']:.4f}  "
          f"foreground IoU {r['fg_iou']:.4f}  pixel accuracy {r['pixel_acc']:.4f}")  # fmt: skip
    width = max(len(c) for c in r["per_class"])
    for name, pc in r["per_class"].items():
        iou = "-" if pc["iou"] is None else f"{pc['iou']:.4f}"
        dice = "-" if pc["dice"] is None else f"{pc['dice']:.4f}"
        print(f"  {name:<{width}}  IoU {iou}  Dice {dice}  ({pc['pixels']} pixels)")
    if "files" in r:
        print(f"wrote {r['files']['json']}")
    return 0


def _cmd_predict_segment(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from vitkit.train.seg_run import mask_segments, predict_masks
    from vitkit.viz.segmentation import output_stems, save_mask, save_overlay

    _refuse_for_segmentation(args, "vitkit predict writes mask overlays")
    # --json without --out: the JSON (with the masks as COCO RLE) is the output, and no file is written.
    write = args.out is not None or not args.json
    out = Path(args.out or "predictions")
    results = []
    predictions = predict_masks(args.checkpoint, args.images, device=args.device, threads=None)
    for r, stem in zip(predictions, output_stems([r["path"] for r in predictions])):
        entry = {"path": r["path"], "shares": r["shares"]}
        if write:
            overlay = save_overlay(r["image"], r["mask"], r["class_names"], out / f"{stem}.overlay.png", r["shares"])
            mask = save_mask(r["mask"], r["class_names"], out / f"{stem}.mask.png")
            entry.update(overlay=str(overlay), mask=str(mask))
        if args.json:
            entry["segments"] = mask_segments(r["mask"], r["class_names"])
        results.append(entry)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(f"{r['path']} -> {r['overlay']}")
        for name, share in sorted(r["shares"].items(), key=lambda kv: -kv[1]):
            if share > 0:
                print(f"  {100 * share:5.1f}%  {name}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# vitkit embed DATA --checkpoint SRC --out FEATS / search IMAGE --index FEATS / probe --checkpoint SRC (features)
# ----------------------------------------------------------------------------------------------------------------
def _cmd_predict_detection(args: argparse.Namespace) -> int:
    import json

    from vitkit.train.detection_run import coco_results, predict_detection
    from vitkit.viz.detection import save_detection_images

    if args.tome or _int8_requested(args) or args.topk != 5:
        raise ValueError("a detector predicts boxes: drop --topk, --tome and --int8 (use --threshold)")
    threshold = 0.5 if args.threshold is None else args.threshold
    results = predict_detection(args.checkpoint, args.images, score_threshold=threshold, device=args.device,
                                threads=None)  # fmt: skip
    if args.json:  # COCO results format (image ids are the positions of the images); files only with --out
        if args.out is not None:
            save_detection_images(results, args.out)
        print(json.dumps(coco_results(results), indent=2))
        return 0
    pngs = save_detection_images(results, args.out or "detections")
    for r, png in zip(results, pngs, strict=True):
        print(f"{r['path']}: {len(r['detections'])} object(s) (score >= {threshold:g}) -> {png}")
        for d in r["detections"]:
            x0, y0, x1, y1 = d["box"]
            print(f"  {d['score']:.3f}  {d['class']:<12} [{x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}]")
    return 0


def _add_embed(sub: argparse._SubParsersAction) -> None:
    from vitkit.features.extract import DataSplit

    p = sub.add_parser("embed", help="frozen features of images (any family) -> FEATS.safetensors + FEATS.json")
    p.add_argument(
        "data", metavar="DATA", help="a folder (class subfolders give labels), a file list (.txt, one path per line), "
        "a CSV of path,label rows, or a dataset spec such as digits or shapes:N",
    )  # fmt: skip
    p.add_argument("--checkpoint", required=True, metavar="SRC", help="run dir (RUN/best, else RUN/last) or model dir")
    p.add_argument("--out", required=True, metavar="FEATS", help="writes FEATS.safetensors and FEATS.json")
    p.add_argument("--split", choices=choices(DataSplit), help="a dataset spec's split (default train)")
    p.add_argument("--seed", type=int, help="a dataset spec's split seed (default 0, as vitkit train)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--threads", type=_threads_arg, default="auto", metavar="N|auto", help=_THREADS_HELP)
    p.set_defaults(func=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:
    from vitkit.features import embed

    _set_threads(args.threads)
    feats, st_path, json_path = embed(
        args.data, args.checkpoint, args.out, batch_size=args.batch_size, split=args.split, seed=args.seed,
        device=args.device,
    )  # fmt: skip
    labels = f", {len(feats.class_names)} classes" if feats.labels is not None else ", no labels"
    print(f"embedded {len(feats)} images into {feats.dim}-dimensional unit-norm features{labels}")
    print(f"wrote {st_path} and {json_path}")
    return 0


def _add_search(sub: argparse._SubParsersAction) -> None:
    from vitkit.features.retrieval import Backend

    p = sub.add_parser("search", help="nearest images of a feature index by cosine similarity, with a contact sheet")
    p.add_argument("query", metavar="QUERY_IMAGE", help="the query image file (a folder: each image in it)")
    p.add_argument("--index", required=True, metavar="FEATS", help="a feature index written by vitkit embed")
    p.add_argument("-k", type=int, default=8, help="neighbours to return (default 8)")
    p.add_argument("--checkpoint", default=None, metavar="SRC", help="model for the query (default: the index's)")
    p.add_argument("--out", default=None, metavar="SHEET.png", help="write a contact sheet (first query + neighbours)")
    p.add_argument(
        "--backend", default="auto", choices=choices(Backend),
        help="exact search in torch or FAISS's IndexFlatIP (pip install 'vitkit[faiss]'); auto: torch (docs/features.md)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--threads", type=_threads_arg, default="auto", metavar="N|auto", help=_THREADS_HELP)
    p.set_defaults(func=_cmd_search)


def _cmd_search(args: argparse.Namespace) -> int:
    import json

    from vitkit.features import search

    _set_threads(args.threads)
    r = search(args.query, args.index, args.k, checkpoint=args.checkpoint, backend=args.backend, device=args.device,
               sheet=args.out)  # fmt: skip
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    for q in r["queries"]:  # a folder as QUERY_IMAGE queries with each of its images
        print(f"{q['query']}: {args.k} nearest of {args.index} (cosine, {r['backend']})")
        for nb in q["neighbours"]:
            label = f"  [{nb['label']}]" if nb["label"] is not None else ""
            print(f"  {nb['rank']:>3}  {nb['score']:.4f}  {nb['item']}{label}")
    print(f"wrote {r['sheet']}" if r["sheet"] else "add --out SHEET.png for a contact sheet")
    return 0


def _add_probe(sub: argparse._SubParsersAction) -> None:
    from vitkit.features.probe import WEIGHT_DECAYS

    p = sub.add_parser("probe", help="linear probe: logistic regression on a checkpoint's frozen features")
    p.add_argument("--checkpoint", required=True, metavar="SRC", help="run dir (RUN/best, else RUN/last) or model dir")
    p.add_argument("--data", default=None, help="data spec (default: the data the checkpoint was trained on)")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="save the backbone + probe head as a model dir (vitkit predict/eval "
        "--checkpoint DIR use it)",
    )  # fmt: skip
    p.add_argument(
        "--weight-decays", type=float, nargs="+", default=list(WEIGHT_DECAYS), metavar="WD",
        help=f"L2 grid chosen from on the val split (default {' '.join(map(str, WEIGHT_DECAYS))})",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--threads", type=_threads_arg, default="auto", metavar="N|auto", help=_THREADS_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_probe)


def _cmd_probe(args: argparse.Namespace) -> int:
    import json

    from vitkit.features import probe

    _set_threads(args.threads)
    r = probe(args.checkpoint, args.data, out=args.out, weight_decays=args.weight_decays, batch_size=args.batch_size,
              device=args.device, seed=args.seed)  # fmt: skip
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"linear probe on {r['dim']}-dimensional frozen features of {r['data']} "
          f"({r['n_train']} train, {r['n_val']} val, {r['n_test']} test images)")  # fmt: skip
    for row in r["grid"]:
        mark = "  <- chosen" if row["weight_decay"] == r["weight_decay"] else ""
        print(f"  weight decay {row['weight_decay']:g}: val accuracy {row['val_acc']:.4f}{mark}")
    print(f"val accuracy {r['val_acc']:.4f}  test accuracy {r['test_acc']:.4f}")
    if r["out"]:
        print(f"wrote {r['out']} (vitkit predict --checkpoint {r['out']} IMAGE)")


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
    p.add_argument("--static", action="store_true", help="fixed height and width (the example size)")
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
    top = f" to {meta['max_size']}" if meta.get("max_size") else ""
    sizes = (
        f"{h}x{w} only" if args.static else f"sides multiples of {meta['patch_multiple']} from {meta['min_size']}{top}"
    )
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
# ----------------------------------------------------------------------------------------------------------------
# vitkit compare --models A,B --data digits --out DIR   /   vitkit sweep --model M --vary depth=2,4 --out DIR
# ----------------------------------------------------------------------------------------------------------------
def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train and probe several models on the same data; one HTML/markdown report (docs/compare.md)",
        description="Train every model on fractions of the same data with the same recipe, then measure cost, "
        "receptive fields, attention distances, shift/occlusion/rotation robustness and saliency. Resumable: run "
        "the same command again to continue. See docs/compare.md.",
    )
    p.add_argument("--models", required=True, metavar="A,B,C", help="registered model names, comma-separated")
    p.add_argument(
        "--model-args",
        action="append",
        default=[],
        metavar="NAME=MAPPING",
        help="architecture overrides of one model as YAML, e.g. 'resnet18={widths: [32, 64, 128, 256]}' (repeatable)",
    )
    p.add_argument("--data", default="digits", help="digits (default), shapes[:N], FOLDER, csv:FILE ...")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (re-run to resume)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int, help="epochs of every training run (default 10)")
    g.add_argument("--budget-minutes", type=float, metavar="M", help="choose the epochs so the estimate fits M minutes")
    p.add_argument("--fractions", default="0.1,0.25,0.5,1.0", help="training-data fractions (default 0.1,0.25,0.5,1.0)")
    p.add_argument("--img-size", type=int, help="resolution (default: the recipe's, 16 px on digits)")
    p.add_argument("--batch-size", type=int, help="training batch (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--probe-images", type=int, default=200, metavar="N", help="held-out images for the probes")
    p.add_argument("--explain-images", type=int, default=6, metavar="N", help="images explained by every model")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig setting, e.g. --set lr=5e-4"
    )
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from vitkit.compare import ModelSpec, compare
    from vitkit.train import TrainingInterrupted

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    overrides: dict[str, dict] = {}
    for item in args.model_args:
        name, eq, text = item.partition("=")
        if not eq or name.strip() not in names:
            raise ValueError(f"--model-args expects NAME=MAPPING with NAME one of --models {names}, got {item!r}")
        try:
            overrides[name.strip()] = _mapping_arg(text)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--model-args {item!r}: {e}") from None
    try:
        fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    except ValueError:
        raise ValueError(f"--fractions expects numbers such as 0.1,0.5,1.0, got {args.fractions!r}") from None
    try:
        results = compare(
            [ModelSpec(n, overrides.get(n, {})) for n in names],
            data=args.data,
            out=args.out,
            epochs=args.epochs,
            budget_minutes=args.budget_minutes,
            fractions=fractions,
            img_size=args.img_size,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            probe_images=args.probe_images,
            explain_images=args.explain_images,
            train_overrides=_parse_sets(args.set),
            log=_printer("compare", sys.stderr),
        )
    except TrainingInterrupted as e:
        print(f"vitkit compare: {e}; run the same compare command again to continue", file=sys.stderr)
        return e.exit_code
    for line in results["recommendations"]:
        print(line)
    print(f"report: {args.out}/report.html  {args.out}/report.md  (numbers: {args.out}/results.json)")
    return 0


def _vary_arg(text: str) -> tuple[str, list]:
    """argparse type for one --vary item: KEY=V1,V2,... with each value read as YAML (numbers stay numbers)."""
    import yaml

    key, eq, values = text.partition("=")
    if not eq or not key.strip() or not values.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2,... (e.g. depth=2,4,6), got {text!r}")
    return key.strip().replace("-", "_"), [yaml.safe_load(v) for v in values.split(",") if v.strip()]


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="train one model at several settings (image size, pooling, depth ...): time and accuracy per point",
        description="Vary settings of one model, one at a time from the base point (each key's first value) by "
        "default, or the full grid with --grid. Resumable: run the same command again. See docs/compare.md.",
    )
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument(
        "--vary",
        nargs="+",
        required=True,
        type=_vary_arg,
        metavar="KEY=V1,V2",
        help="settings and their values, e.g. img_size=16,24,32 pool=token,avg depth=2,4,6",
    )
    p.add_argument("--grid", action="store_true", help="every combination instead of one setting at a time")
    p.add_argument("--data", default="digits", help="digits (default), shapes[:N], FOLDER, csv:FILE ...")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (re-run to resume)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int, help="epochs per point (default 10)")
    g.add_argument("--budget-minutes", type=float, metavar="M", help="choose the epochs so the estimate fits M minutes")
    p.add_argument(
        "--model-args",
        type=_mapping_arg,
        default=None,
        metavar="MAPPING",
        help="architecture settings fixed at every point, as YAML, e.g. '{embed_dim: 64, num_heads: 2}'",
    )
    p.add_argument("--img-size", type=int, help="resolution when img_size is not varied (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="training batch (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig setting, e.g. --set lr=5e-4"
    )
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from vitkit.compare.sweep import sweep
    from vitkit.train import TrainingInterrupted

    vary: dict[str, list] = {}
    for key, values in args.vary:
        if key in vary:
            raise ValueError(f"--vary names {key!r} twice; give all its values once, e.g. {key}=a,b,c")
        vary[key] = values
    try:
        results = sweep(
            args.model,
            vary,
            data=args.data,
            out=args.out,
            grid=args.grid,
            epochs=args.epochs,
            budget_minutes=args.budget_minutes,
            img_size=args.img_size,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            train_overrides=_parse_sets(args.set),
            model_args=args.model_args,
            log=_printer("sweep", sys.stderr),
        )
    except TrainingInterrupted as e:
        print(f"vitkit sweep: {e}; run the same sweep command again to continue", file=sys.stderr)
        return e.exit_code
    print(results["summary"])
    print(f"report: {args.out}/report.html  {args.out}/report.md  (numbers: {args.out}/results.json)")
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models,
    _add_convert,
    _add_train,
    _add_pretrain,
    _add_eval,
    _add_predict,
    _add_explain,
    _add_visualize,
    _add_explain_eval,
    _add_embed,
    _add_search,
    _add_probe,
    _add_compare,
    _add_sweep,
    _add_export,
]


# ----------------------------------------------------------------------------------------------------------------
# Messages: library errors and logs name Python arguments; on the command line they name the flags.
# ----------------------------------------------------------------------------------------------------------------
# Per command: library argument -> the flag that sets it.
_INT8_FLAGS = {
    "method": "--int8-method", "calibration": "--calib", "num_images": "--calib-images", "mixed_bf16": "--int8-mixed-bf16",
}  # fmt: skip
_ARG_FLAGS: dict[str, dict[str, str]] = {
    "convert": {"model_name": "--model", "img_size": "--img-size", "num_classes": "--num-classes", "to": "--to"},
    # Every TrainConfig field: its own flag where it has one (_TRAIN_FLAGS), else --set FIELD.
    "train": {
        "model_name": "--model",
        **{f.name: f"--set {f.name}" for f in dataclasses.fields(TrainConfig)},
        **{field: "--" + flag.replace("_", "-") for flag, field in _TRAIN_FLAGS.items()},
        **{name: "--" + name.replace("_", "-") for name in _MODEL_ARG_FLAGS},
    },
    "pretrain": {
        **{f.name: f"--set {f.name}" for f in dataclasses.fields(TrainConfig)},
        **{name: "--" + name.replace("_", "-") for name in (*_PRETRAIN_FLAGS, *_MAE_ARG_FLAGS)},
    },
    "eval": {
        "data": "--data", "split": "--split", "batch_size": "--batch-size", "device": "--device", "k": "--knn-k",
        "temperature": "--knn-temperature", "tome": "--tome", **_INT8_FLAGS,
    },
    "embed": {
        "batch_size": "--batch-size", "split": "--split", "seed": "--seed", "device": "--device",
        "checkpoint": "--checkpoint",
    },
    "search": {"k": "-k", "backend": "--backend", "checkpoint": "--checkpoint", "device": "--device"},
    "probe": {
        "data": "--data", "weight_decays": "--weight-decays", "batch_size": "--batch-size", "device": "--device",
        "out": "--out",
    },
    "predict": {
        "topk": "--topk", "device": "--device", "score_threshold": "--threshold", "tome": "--tome", **_INT8_FLAGS,
    },
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
    `16 16`, a quoted string loses its quotes), and `strict=False` style booleans become `--no-strict`. A Python
    call the text spells out (`vitkit.load_model(path, model_name='x')`) stays Python: a flag inside it is wrong.
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

    # Translate only outside `vitkit.name(...)` calls (one level of nested parentheses inside them).
    parts = re.split(r"(\bvitkit\.[\w.]+\((?:[^()]|\([^()]*\))*\))", text)
    return "".join(part if i % 2 else re.sub(pattern, flag, part) for i, part in enumerate(parts))


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


def entry(argv: Sequence[str] | None = None) -> int:
    """The `vitkit` command (console script and `python -m vitkit`): `main` in a process whose C allocator keeps
    freed memory (`vitkit.allocator.apply_env`; ``VITKIT_MALLOC=system`` leaves glibc's defaults). `main` itself
    leaves the allocator alone, so tests and programs that call it in-process are not changed."""
    from vitkit.allocator import apply_env

    try:
        apply_env()
    except ValueError as e:
        print(f"vitkit: error: {e}", file=sys.stderr)
        return 2
    return main(argv)


if __name__ == "__main__":
    sys.exit(entry())
