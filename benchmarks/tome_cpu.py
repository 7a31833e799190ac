"""Token merging (ToMe) on the CPU: throughput against the unmerged model, and agreement of predictions.

1. Throughput: ViT-S/16 and ViT-B/16 at 224 px, r in --rs (tokens merged per block; 0 = unmerged), fp32 and bf16
   (weights and input cast to bf16), batch 1 and 16, eager, `model(x)` under `torch.inference_mode()`. The rows are
   interleaved: each round times every configuration once, and a row's number is the median over rounds, so a
   drift of the machine (other processes, clocks) hits every row alike. Speed-up = img/s over the r=0 row of the
   same model, precision, mode and batch. Random weights: merging's cost depends on the token count, not on the
   values. `--modes eager compiled` adds `torch.compile` rows (one graph per model, precision and r, compiled with
   merging set; the speed-up is over the compiled unmerged model). The dense 2048^2 matmul rates (fp32, bf16) are
   measured in the same run, before and after the rows.
2. Agreement: a small ViT (64 px shapes, patch 8: 64 patch tokens, 6 blocks) is trained here for --train-seconds
   on procedural shapes, then its predictions with each r are compared with its own unmerged predictions on
   --heldout held-out images (agreement = share of images with the same top-1 class), with both accuracies.
   ViT-S/B: no weights trained on data we have exist here, and fine-tuning them at 224 px on 2 CPU cores takes
   hours; agreement of randomly initialised ViT-S/B would measure noise (near-tied logits), so it is not reported.
   `--checkpoint DIR` (a vitkit model dir trained on `shapes`, e.g. a ViT-S/16 fine-tuned on a GPU) measures the
   agreement of that model instead, on shapes drawn at its input size with a seed the training never saw;
   with `--checkpoint-data held-out`, on the held-out (val + test) images of the data it was trained on (its run's
   own seed and split fractions), preprocessed as `vitkit eval` does.

Usage:
    python benchmarks/tome_cpu.py                   # the full run (~15-25 min on 2 cores)
    python benchmarks/tome_cpu.py --quick           # seconds: a tiny model, to check the script
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vitkit import allocator  # noqa: E402
from vitkit._io import atomic_write_text  # noqa: E402
from vitkit.data.shapes import SHAPE_CLASSES, make_shapes  # noqa: E402
from vitkit.models import create_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import cpu_matmul_rates, matmul_line  # noqa: E402  (benchmarks/models.py, beside this script)


def throughput(args) -> list[dict]:
    # Every compiled copy shares ViT's `forward` code object, and dynamo keeps 8 graphs per code object by default:
    # past that it would silently run the later rows eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    configs = []
    for name in args.models:
        for prec in args.precisions:
            dtype = torch.bfloat16 if prec == "bf16" else torch.float32
            torch.manual_seed(0)
            model = create_model(name, img_size=args.img_size, **args.model_overrides).to(dtype).eval()
            for mode in args.modes:
                for r in args.rs:
                    # Compiled: one copy per r with its merging set before compiling (a graph per token schedule;
                    # the batch sizes share it unless inductor specialises on them).
                    fn = model
                    if mode == "compiled":
                        fn = copy.deepcopy(model)
                        fn.set_tome(r)
                        fn = torch.compile(fn)
                    for batch in args.batches:
                        x = torch.randn(batch, 3, args.img_size, args.img_size, dtype=dtype)
                        configs.append({
                            "model": name, "precision": prec, "mode": mode, "batch": batch, "r": r,
                            "_m": model, "_f": fn, "_x": x,
                        })  # fmt: skip
    times: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    with torch.inference_mode():
        for c in configs:  # warm-up (allocator, oneDNN primitives; compilation for the compiled rows) once per row
            c["_m"].set_tome(c["r"])
            t = time.perf_counter()
            c["_f"](c["_x"])
            c["first_call_s"] = time.perf_counter() - t
            if c["mode"] == "compiled":
                print(f"compiled {c['model']} {c['precision']} r={c['r']} b{c['batch']}: {c['first_call_s']:.0f} s")
        for rnd in range(args.rounds):
            for i, c in enumerate(configs):
                c["_m"].set_tome(c["r"])
                iters = max(1, args.images_per_row // c["batch"])
                t = time.perf_counter()
                for _ in range(iters):
                    c["_f"](c["_x"])
                times[i].append((time.perf_counter() - t) / iters)
            print(f"round {rnd + 1}/{args.rounds} done", flush=True)
    rows = []
    for i, c in enumerate(configs):
        s = statistics.median(times[i])
        row = {k: v for k, v in c.items() if not k.startswith("_")}
        row.update(img_s=c["batch"] / s, ms_per_batch=s * 1e3, all_ms=[t * 1e3 for t in times[i]])
        rows.append(row)
    key = ("model", "precision", "mode", "batch")
    for row in rows:
        base = next(b for b in rows if b["r"] == 0 and all(b[k] == row[k] for k in key))
        row["speedup"] = row["img_s"] / base["img_s"]  # over the unmerged model of the same mode
        same = ("model", "precision", "batch")
        eager = [b for b in rows if b["mode"] == "eager" and b["r"] == 0 and all(b[k] == row[k] for k in same)]
        row["vs_eager_r0"] = row["img_s"] / eager[0]["img_s"] if eager else None  # None without eager rows
    return rows


def shapes_tensors(n: int, side: int, seed: int, mean=(0.5,) * 3, std=(0.5,) * 3) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, _, _ = make_shapes(n, side, side, seed=seed)
    x = images.float() / 255.0
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x, labels


def predictions(model, x: torch.Tensor, r, batch: int = 64) -> torch.Tensor:
    model.set_tome(r)
    with torch.inference_mode():
        return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def agreement_rows(model, x: torch.Tensor, y: torch.Tensor, rs: list[int], label: str) -> list[dict]:
    ref = predictions(model, x, 0)
    rows = []
    for r in rs:
        pred = ref if r == 0 else predictions(model, x, r)
        rows.append({
            "model": label, "r": r, "n": len(y), "agreement": (pred == ref).float().mean().item(),
            "accuracy": (pred == y).float().mean().item(), "accuracy_unmerged": (ref == y).float().mean().item(),
        })  # fmt: skip
    model.set_tome(0)
    return rows


def held_out_of_run(checkpoint: str, model: torch.nn.Module, calibration: int = 0) -> tuple[Any, ...]:
    """The val + test images of the data a run trained on (its seed and fractions: images training never saw),
    through the model's eval preprocessing; a label naming the data; and the first `calibration` of its training
    images (same preprocessing), None for 0."""
    from vitkit.data import load_data
    from vitkit.data.inference import eval_transform
    from vitkit.runs import resolve_checkpoint, training_record

    record = training_record(resolve_checkpoint(checkpoint))
    if "data" not in record:
        raise SystemExit(f"{checkpoint} does not record its training data: use --checkpoint-data shapes")
    splits = load_data(
        record["data"], seed=int(record.get("seed", 0)), val_fraction=record.get("val_fraction", 0.1),
        test_fraction=record.get("test_fraction", 0.1), shapes_size=record.get("shapes_size") or 64,
        load_size=record.get("load_size"),
    )  # fmt: skip
    tf = eval_transform(model)
    x = torch.cat([tf(splits.val.images), tf(splits.test.images)])
    y = torch.cat([splits.val.labels, splits.test.labels])
    calib = tf(splits.train.images[:calibration]) if calibration else None  # int8 calibration on the run's data
    return x, y, f"{record['data']} val+test", calib


def train_small(args) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    side = args.small_side
    x, y = shapes_tensors(args.train_images, side, seed=1)
    model = create_model(
        "vit_tiny_patch16_224", num_classes=len(SHAPE_CLASSES), img_size=side, patch_size=8, **args.small_overrides
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model.train()
    t0, steps, epochs = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < args.train_seconds:
        order = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            b = order[i : i + 64]
            xb = torch.where(torch.rand(len(b), 1, 1, 1) < 0.5, x[b].flip(-1), x[b])  # horizontal flips
            loss = F.cross_entropy(model(xb), y[b], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if time.perf_counter() - t0 > args.train_seconds:
                break
        epochs += 1
    model.eval()
    return model, {"train_s": time.perf_counter() - t0, "steps": steps, "epochs_started": epochs}


def malloc_label(args: dict) -> str:
    """The allocator setting of a run, as its report header says it: keep, system, or keep not applied."""
    setting = args.get("malloc", "system")
    return "keep (not applied: no glibc)" if setting == "keep" and not args.get("malloc_applied") else setting


def markdown(res: dict) -> str:
    lines = [
        f"# ToMe on CPU ({res['meta']['started']}, torch {res['meta']['torch']}, {res['meta']['threads']} threads, "
        f"malloc {malloc_label(res['meta']['args'])})"
    ]
    if "matmul" in res:
        lines.append("\n" + matmul_line(res["matmul"]))
    lines += [
        "",
        "| model | precision | mode | batch | r | img/s | speed-up vs r=0 (same mode) | vs eager r=0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["throughput"]:
        vs = "-" if r.get("vs_eager_r0") is None else f"{r['vs_eager_r0']:.2f}x"
        lines.append(
            f"| {r['model']} | {r['precision']} | {r.get('mode', 'eager')} | {r['batch']} | {r['r']} | "
            f"{r['img_s']:.1f} | {r['speedup']:.2f}x | {vs} |"
        )
    lines += [
        "",
        "| model | r | held-out n | agreement with r=0 | accuracy | accuracy r=0 |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["agreement"]:
        lines.append(
            f"| {r['model']} | {r['r']} | {r['n']} | {r['agreement']:.2%} | {r['accuracy']:.2%} | "
            f"{r['accuracy_unmerged']:.2%} |"
        )
    if "small_training" in res:
        t = res["small_training"]
        lines.append(f"\nsmall ViT trained {t['train_s']:.0f} s ({t['steps']} steps) on shapes in this run")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and a few seconds of training")
    p.add_argument("--out", default="benchmarks/out/tome_cpu", help="folder for results.json and results.md")
    p.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    p.add_argument("--rs", type=int, nargs="+", default=[0, 8, 13, 16], help="r values (0 is always added)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images-per-row", type=int, default=16, help="images timed per row per round")
    p.add_argument("--train-seconds", type=float, default=240.0, help="training time of the small shapes ViT")
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--heldout", type=int, default=1000)
    p.add_argument("--small-rs", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    p.add_argument("--checkpoint", default=None, help="a vitkit model dir trained on shapes: its agreement too")
    p.add_argument("--checkpoint-rs", type=int, nargs="+", default=[8, 13, 16])
    p.add_argument(
        "--checkpoint-data", choices=["shapes", "held-out"], default="shapes",
        help="shapes: fresh shapes (a model trained on shapes); held-out: the val + test splits of its own data",
    )  # fmt: skip
    p.add_argument("--skip-throughput", action="store_true", help="agreement rows only")
    p.add_argument("--skip-small", action="store_true", help="no small shapes ViT (its --train-seconds of training)")
    p.add_argument(
        "--modes", nargs="+", default=["eager"], choices=["eager", "compiled"],
        help="eager and/or torch.compile rows (compiled: one graph per model, precision and r; ~1 min each)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--matmul-n", type=int, default=2048, help="side of the square matmuls timed for the rates")
    p.add_argument(
        "--malloc", default="keep", choices=["keep", "system"],
        help="glibc allocator: keep freed memory in the process (what the vitkit command does) or glibc's defaults",
    )  # fmt: skip
    args = p.parse_args()
    if args.malloc == "keep":
        args.malloc_applied = allocator.keep_freed_memory()  # before any model runs; see vitkit.allocator
    args.model_overrides, args.small_overrides, args.small_side = {}, dict(embed_dim=96, depth=6, num_heads=3), 64
    if args.quick:
        args.models, args.rs, args.precisions, args.batches = ["vit_tiny_patch16_224"], [0, 2], ["fp32"], [1, 2]
        args.img_size, args.rounds, args.images_per_row, args.model_overrides = 64, 1, 2, {"depth": 2}
        args.train_seconds, args.train_images, args.heldout, args.small_rs = 3.0, 200, 100, [1, 2]
        args.small_overrides, args.matmul_n = dict(embed_dim=32, depth=2, num_heads=2), 256
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rs = sorted({0, *args.rs})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "args": {k: v for k, v in vars(args).items()},
        },
        "throughput": [],
        "agreement": [],
    }

    def flush():
        atomic_write_text(out / "results.json", json.dumps(res, indent=2))
        atomic_write_text(out / "results.md", markdown(res))

    if not args.skip_small:
        model, info = train_small(args)
        res["small_training"] = info
        hx, hy = shapes_tensors(args.heldout, args.small_side, seed=2)  # seed 1 trained it
        res["agreement"] += agreement_rows(model, hx, hy, [0, *args.small_rs], "small ViT (64 px shapes, 64 patches)")
        flush()
    if args.checkpoint:
        from vitkit.weights import load_model

        ck = load_model(args.checkpoint).eval()
        if args.checkpoint_data == "held-out":
            cx, cy, label, _ = held_out_of_run(args.checkpoint, ck)
        else:
            side = ck.preprocess.input_size[0]
            cx, cy = shapes_tensors(args.heldout, side, seed=12345, mean=ck.preprocess.mean, std=ck.preprocess.std)
            label = "shapes"
        res["agreement"] += agreement_rows(ck, cx, cy, [0, *args.checkpoint_rs], f"{args.checkpoint} ({label})")
        flush()
    if not args.skip_throughput:
        n = args.matmul_n
        res["matmul"] = {"n": n, **cpu_matmul_rates(n, "_before")}
        res["throughput"] = throughput(args)
        res["matmul"].update(cpu_matmul_rates(n, "_after"))
    flush()
    print(markdown(res))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
