"""DeiT distillation on small data (issue 10): a CNN teacher trained first, then the same DeiT student with and
without it, same epochs and seeds.

For each dataset and seed:
1. the teacher: a small ResNet (vitkit's resnet18 narrowed to 3 stages of 1 basic block) trained on the run's
   training split. The split depends on the seed, so every seed trains its own teacher: one teacher for all seeds
   would have seen other seeds' test images.
2. the student, with identical settings and seed, on the labels only (`ClassificationTask`) and once per
   distillation kind with `--teacher <the teacher run>`: hard (DeiT's best on ImageNet) and soft (tau 4), alpha
   0.5. The student is a distilled DeiT (class and distillation tokens, two heads) in every run, so only the
   objective differs; on labels only, its prediction (the mean of the two heads) is what cross-entropy trains.
   Students train without Mixup/CutMix by default (--mixup/--cutmix for DeiT's 0.8/1.0). Measured on one seed
   while choosing these settings (digits, seed 0, test accuracy): no mixing: labels 0.936, hard 0.924, soft tau 4
   0.944; DeiT's Mixup 0.8 + CutMix 1.0: labels 0.922, hard 0.916.

Data (a small fraction of each set is used for training; most of the rest is the test set, so the accuracies are
measured on many images):
- digits: scikit-learn's 1,797 8x8 digits; 10% validation, 65% test, 25% (~450 images) training. The student
  runs at 16 px (4 px patches, 16 tokens); the teacher at 32 px (the student's batches are resized for it).
- shapes: 4,000 procedural 32 px shape images (4 classes); 10% validation, 50% test, 40% (1,600) training. Student
  and teacher at 32 px (the student with 8 px patches: 16 tokens). With 1,000 training images the teacher overfit
  (seed 0: 0.41 validation accuracy); with 1,600 it reaches 0.90 test accuracy (seed 0, 60 epochs).

Each run is `python -m vitkit train --config OUT/recipes/<run>.yaml` in its own process with one thread, `--jobs`
at a time (default 2, one per core). A finished run (its summary.json says so, with the same recipe) is reused, so
an interrupted sweep continues where it stopped. Output in --out: the run directories, results.json and
results.md: per dataset and kind the teacher's test accuracy, the student's without and with distillation (mean +-
sample std over the seeds, each seed's value) and the difference in points (mean of the per-seed differences +- std).

Usage:
    python benchmarks/distillation.py                 # both datasets, 3 seeds, hard and soft (~20-25 min, 2 cores)
    python benchmarks/distillation.py --smoke         # seconds: 1-2 epochs on a few images, checks the script only
    python benchmarks/distillation.py --datasets digits --seeds 0 1 2 3 4 --kinds soft --tau 2 --mixup 0.8
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from vitkit._io import atomic_write_text  # noqa: E402

# Augmentation shared by teacher and student: mild crops that keep the digit / shape in view.
AUG = {"scale": [0.8, 1.0], "ratio": [0.9, 1.1], "crop_fraction": 1.0, "interpolation": "bilinear",
       "label_smoothing": 0.1, "weight_decay": 0.05, "batch_size": 64, "progress": False, "threads": 1}  # fmt: skip
DATA = {
    "digits": {"data": "digits", "val_fraction": 0.1, "test_fraction": 0.65, "hflip": 0.0},
    "shapes": {"data": "shapes:4000", "shapes_size": 32, "val_fraction": 0.1, "test_fraction": 0.5, "hflip": 0.5},
}
TEACHER = {
    "digits": {"model": "resnet18", "model_args": {"depths": [1, 1, 1], "widths": [32, 64, 128], "stem_width": 32},
               "img_size": 32, "epochs": 60, "lr": 2.0e-3, "warmup_epochs": 3},
    "shapes": {"model": "resnet18", "model_args": {"depths": [1, 1, 1], "widths": [32, 64, 128], "stem_width": 32},
               "img_size": 32, "epochs": 60, "lr": 2.0e-3, "warmup_epochs": 3},
}  # fmt: skip
STUDENT_MODEL = "deit_tiny_distilled_patch16_224"
KINDS = ("hard", "soft")
STUDENT = {
    "digits": {"model": STUDENT_MODEL, "model_args": {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4},
               "img_size": 16, "epochs": 100, "lr": 1.0e-3, "warmup_epochs": 5},
    "shapes": {"model": STUDENT_MODEL, "model_args": {"patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4},
               "img_size": 32, "epochs": 50, "lr": 1.0e-3, "warmup_epochs": 5},
}  # fmt: skip
# --smoke: a few seconds per run, only to check the script end to end (the accuracies mean nothing).
SMOKE = {"digits": {"epochs": 1, "test_fraction": 0.8}, "shapes": {"epochs": 1, "data": "shapes:200"}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", choices=sorted(DATA), default=["digits", "shapes"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (at least 3 for a spread)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="distillation kinds to measure")
    p.add_argument("--alpha", type=float, default=0.5, help="distill_alpha")
    p.add_argument("--tau", type=float, default=4.0, help="distill_tau of the soft kind")
    p.add_argument("--mixup", type=float, default=0.0, help="students' Mixup alpha (DeiT: 0.8; default off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="students' CutMix alpha (DeiT: 1.0; default off)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each (default 2: one per core)")
    p.add_argument("--out", default="runs/distillation", help="folder for the runs, results.json, results.md")
    p.add_argument("--smoke", action="store_true", help="1 epoch on a few images, seeds 0 and 1: checks the script")
    args = p.parse_args()
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.smoke:
        args.seeds = args.seeds[:2]
    return args


def recipe(args: argparse.Namespace, dataset: str, role: str, seed: int) -> dict:
    """The complete settings of one run: role is teacher, baseline (student on labels), hard or soft."""
    model = TEACHER[dataset] if role == "teacher" else STUDENT[dataset]
    settings = {**AUG, **DATA[dataset], **model, "seed": seed, "patience": 0}
    if role != "teacher":  # the students train as DeiT's do, with Mixup/CutMix; the teacher is a plain CNN run
        settings.update(mixup=args.mixup, cutmix=args.cutmix)
    if args.smoke:
        settings.update(SMOKE[dataset])
    if role in KINDS:
        settings.update(
            teacher=str(run_dir(args, dataset, "teacher", seed)),
            distillation=role,
            distill_alpha=args.alpha,
            distill_tau=args.tau if role == "soft" else 1.0,
        )
    return settings


def run_dir(args: argparse.Namespace, dataset: str, role: str, seed: int) -> Path:
    name = role if role not in KINDS else f"{role}-a{args.alpha:g}" + (f"-t{args.tau:g}" if role == "soft" else "")
    return Path(args.out) / dataset / f"seed{seed}" / name


def run(args: argparse.Namespace, dataset: str, role: str, seed: int, reuse: bool = True) -> dict | None:
    """Train one run in its own process (or reuse it when finished with the same recipe); its summary or None."""
    out, settings = run_dir(args, dataset, role, seed), recipe(args, dataset, role, seed)
    path = Path(args.out) / "recipes" / f"{dataset}-seed{seed}-{out.name}.yaml"
    summary_file = out / "summary.json"
    if reuse and summary_file.is_file() and path.is_file() and yaml.safe_load(path.read_text()) == settings:
        summary = json.loads(summary_file.read_text())
        if summary.get("status") == "finished":
            print(f"[{dataset} seed {seed} {role}] reusing {out}", flush=True)
            return {**summary, "reused": True}
    if out.exists():
        import shutil

        shutil.rmtree(out)  # an unfinished or different run: start it over
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(settings, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "vitkit", "train", "--config", str(path), "--out", str(out)]
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print(f"[{dataset} seed {seed} {role}] FAILED (exit {rc}), see {out.parent / f'{out.name}.log'}", flush=True)
        return None
    summary = json.loads(summary_file.read_text())
    print(
        f"[{dataset} seed {seed} {role}] test acc {summary['test_acc']:.4f} in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return summary


def sweep(args: argparse.Namespace) -> dict[tuple[str, int, str], dict]:
    """Every run, `args.jobs` at a time: teachers first, then the label-only students, then the distilled ones
    (each waits for its own teacher)."""
    done: dict[tuple[str, int, str], dict] = {}

    def distilled(d: str, s: int, kind: str, teacher: concurrent.futures.Future) -> dict | None:
        summary = teacher.result()
        if summary is None:
            print(f"[{d} seed {s} {kind}] skipped: its teacher failed", flush=True)
            return None
        # A student distilled from an older teacher is not reused once that teacher has been trained again.
        return run(args, d, kind, s, reuse=bool(summary.get("reused")))

    pairs = [(d, s) for d in args.datasets for s in args.seeds]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {(d, s, r): pool.submit(run, args, d, r, s) for r in ("teacher", "baseline") for d, s in pairs}
        for kind in args.kinds:
            for d, s in pairs:
                futures[(d, s, kind)] = pool.submit(distilled, d, s, kind, futures[(d, s, "teacher")])
        for job, future in futures.items():
            if (summary := future.result()) is not None:
                done[job] = summary
    return done


def _mean_std(values: list[float]) -> str:
    std = f"{statistics.stdev(values):.4f}" if len(values) > 1 else "-"
    return f"{statistics.fmean(values):.4f} +- {std}"


def table(args: argparse.Namespace, done: dict[tuple[str, int, str], dict]) -> tuple[list[str], list[dict]]:
    lines = [
        "| data | train images | kind | seeds | teacher (CNN) | student, labels only | student, distilled | "
        "difference (points) | per seed: labels -> distilled (agreement with teacher) | time per run (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for d in args.datasets:
        for kind in args.kinds:
            roles = ("teacher", "baseline", kind)
            seeds = [s for s in args.seeds if all((d, s, r) in done for r in roles)]
            if not seeds:
                continue
            acc = {r: [done[(d, s, r)]["test_acc"] for s in seeds] for r in roles}
            diff = [100 * (b - a) for a, b in zip(acc["baseline"], acc[kind], strict=True)]
            agree = [done[(d, s, kind)]["teacher"]["test_agree"] for s in seeds]
            per_seed = ", ".join(
                f"{a:.4f} -> {b:.4f} ({g:.2f})" for a, b, g in zip(acc["baseline"], acc[kind], agree, strict=True)
            )
            times = {r: statistics.fmean(done[(d, s, r)]["wall_time_s"] for s in seeds) for r in roles}
            spread = f"{statistics.stdev(diff):.1f}" if len(diff) > 1 else "-"
            name = f"{kind}, alpha {args.alpha:g}" + (f", tau {args.tau:g}" if kind == "soft" else "")
            lines.append(
                f"| {d} | {done[(d, seeds[0], 'baseline')]['split_sizes']['train']} | {name} | {len(seeds)} | "
                f"{_mean_std(acc['teacher'])} | {_mean_std(acc['baseline'])} | {_mean_std(acc[kind])} | "
                f"{statistics.fmean(diff):+.1f} +- {spread} | {per_seed} | "
                f"{times['teacher']:.0f} / {times['baseline']:.0f} / {times[kind]:.0f} |"
            )
            rows.append({"dataset": d, "kind": kind, "alpha": args.alpha, "tau": args.tau if kind == "soft" else None,
                         "seeds": seeds, **{f"test_acc_{r}": v for r, v in acc.items()},
                         "difference_points": diff, "test_agree": agree, "mean_wall_time_s": times})  # fmt: skip
    return lines, rows


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    done = sweep(args)
    lines, rows = table(args, done)
    head = [
        f"## DeiT distillation from a CNN teacher on small data (`benchmarks/distillation.py"
        f"{' --smoke' if args.smoke else ''}`; test accuracy, mean +- sample std over seeds; students' Mixup "
        f"{args.mixup:g}, CutMix {args.cutmix:g})",
        "",
    ]
    text = "\n".join(head + lines) + "\n" + "\nTime per run: teacher / labels only / distilled.\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(out / "results.md", text)
    print("\n" + text + f"wrote {out / 'results.md'} and {out / 'results.json'} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
