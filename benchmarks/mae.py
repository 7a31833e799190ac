"""MAE pretraining on shapes (64 px): fine-tuning from the MAE encoder vs from scratch, and frozen features.

Runs, one at a time (each `--threads 1` by default), the commands of docs/train.md's "Measured: MAE on shapes":
  1. `vitkit pretrain`: 40 epochs of MAE on shapes (labels ignored), vit_nano encoder at 64 px with 8 px patches,
     a 2 x 64 decoder, per-patch normalised targets;
  2. linear probe and k-NN (k = 20, T = 0.07) of the MAE features, and of the same architecture at the
     initialisation the pretraining started from (seed 0);
  3. 15 epochs of `vitkit train --pretrained MAE_RUN` and 15 epochs of the same ViT from scratch;
then prints the tables and writes --out as JSON.

Usage:
    python benchmarks/mae.py --out mae.json                 # about 40 min on one busy core
    python benchmarks/mae.py --smoke                        # 1 epoch each on 200 images: checks the script only
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vitkit.cli import entry as vitkit  # the `vitkit` command: its allocator setting too (vitkit.allocator)

PRETRAIN = ["--img-size", "64", "--patch-size", "8", "--decoder-depth", "2", "--decoder-embed-dim", "64",
            "--decoder-num-heads", "4", "--norm-pix-loss", "--batch-size", "128", "--lr", "1.5e-3",
            "--warmup-epochs", "5", "--figures-every", "10"]  # fmt: skip
FINETUNE = ["--img-size", "64", "--batch-size", "128", "--lr", "1e-3", "--warmup-epochs", "2",
            "--set", "scale=[0.35,1.0]"]  # fmt: skip


def run(*args: str) -> float:
    t0 = time.perf_counter()
    if vitkit(list(args)) != 0:
        raise SystemExit(f"vitkit {' '.join(args)} failed")
    return time.perf_counter() - t0


def random_init_features(mae_run: Path, data: str) -> dict:
    """Probe and k-NN of the MAE architecture at its seed-0 initialisation (where the pretraining started)."""
    from vitkit.data.inference import load_eval_model
    from vitkit.features import knn_evaluate, probe
    from vitkit.models.serialization import model_from_config
    from vitkit.runs import model_config, resolve_checkpoint

    directory = resolve_checkpoint(mae_run)
    torch.manual_seed(0)
    model = model_from_config(model_config(directory))
    model.preprocess = load_eval_model(directory)[0].preprocess
    lin = probe(model.eval(), data, seed=0, device="cpu")
    knn = knn_evaluate(model, data, seed=0, device="cpu")
    return {"probe_val": lin["val_acc"], "probe_test": lin["test_acc"], "probe_wd": lin["weight_decay"],
            "knn_top1": knn["top1"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--threads", default="1", help="CPU threads of every run (default 1)")
    parser.add_argument("--smoke", action="store_true", help="1 epoch each on 200 images: checks the script only")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    data = "shapes:200" if args.smoke else "shapes"
    pre_epochs, ft_epochs = ("1", "1") if args.smoke else ("40", "15")
    common = ["--data", data, "--threads", args.threads, "--no-progress"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        mae, ft, scratch = root / "mae", root / "ft_mae", root / "scratch"
        times = {"pretrain": run("pretrain", *common, *PRETRAIN, "--epochs", pre_epochs, "--out", str(mae))}
        from vitkit.features import knn_evaluate, probe

        lin = probe(str(mae), data, seed=0, device="cpu")
        knn = knn_evaluate(str(mae), data, seed=0, device="cpu")
        features = {
            "mae": {
                "probe_val": lin["val_acc"],
                "probe_test": lin["test_acc"],
                "probe_wd": lin["weight_decay"],
                "knn_top1": knn["top1"],
            },  # fmt: skip
            "random init": random_init_features(mae, data),
        }
        ft_args = [*common, *FINETUNE, "--epochs", ft_epochs]
        times["finetune"] = run("train", "--pretrained", str(mae), *ft_args, "--out", str(ft))
        times["scratch"] = run("train", "--model", "vit_nano_patch4_32", "--set", "model_args={patch_size: 8}",
                               *ft_args, "--out", str(scratch))  # fmt: skip
        runs = {name: json.loads((d / "summary.json").read_text()) for name, d in (("mae", mae), ("ft_mae", ft),
                                                                                  ("scratch", scratch))}  # fmt: skip
    print("\n| fine-tuned from | best val acc (epoch) | test acc | training time |\n|---|---:|---:|---:|")
    for name, key in (("random init (scratch)", "scratch"), ("MAE encoder", "ft_mae")):
        s = runs[key]
        print(
            f"| {name} | {s['best_val_acc']:.3f} ({s['best_epoch']}) | {s['test_acc']:.3f} | {s['train_time_s']:.0f} s |"
        )
    print("\n| frozen features | probe val | probe test | probe wd | k-NN top-1 |\n|---|---:|---:|---:|---:|")
    for name, f in features.items():
        print(f"| {name} | {f['probe_val']:.3f} | {f['probe_test']:.3f} | {f['probe_wd']:g} | {f['knn_top1']:.3f} |")
    print(f"\npretraining: test loss {runs['mae']['test_loss']:.4f} in {runs['mae']['train_time_s']:.0f} s")
    if args.out:
        from vitkit._io import atomic_write_text

        record = {"runs": runs, "features": features, "times_s": times, "smoke": args.smoke,
                  "torch": torch.__version__}  # fmt: skip
        atomic_write_text(args.out, json.dumps(record, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
