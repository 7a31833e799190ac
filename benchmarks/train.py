"""Training speed and accuracy: vitkit's Trainer against a bare PyTorch loop and against transformers' Trainer.

Three tables, printed as markdown:
1. Throughput (training images/s) and peak memory for ViT-Ti/16 at 224 px and a CIFAR-scale ViT-Ti/4 at 32 px,
   fp32 and bf16 autocast: a bare PyTorch loop (index a uint8 tensor, normalise, forward, cross-entropy,
   backward, AdamW step) against `vitkit.train.Trainer` on the same model, data and normalisation. The
   difference is the Trainer's overhead (goal: <= 5%): schedule, NaN and signal checks, metrics, progress bar.
   Both run two epochs over the same synthetic images; the second (warm) epoch is timed.
2. The digits default (recipes/digits.yaml) trained by vitkit, against transformers' `Trainer` with the same
   architecture as a `ViTForImageClassification`, the same splits, augmentation, optimiser, schedule and epochs:
   test accuracy and wall time.
3. Time to 97% validation accuracy on digits for both.

Peak memory on CPU: PyTorch keeps no CPU allocator statistics, so a sampler thread reads the process RSS every
millisecond during the timed epoch and reports the peak above the RSS just before it (the working memory of
training beyond what was already resident). On CUDA: torch.cuda.max_memory_allocated.

transformers' Trainer needs the `accelerate` package; without it that row says so and is skipped.

Usage:
    python benchmarks/train.py                      # everything, ~10 min on 2 CPU cores
    python benchmarks/train.py --skip-digits        # only the throughput table (~3 min)
    python benchmarks/train.py --device cuda --batch-224 128 --batch-32 512
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

# Freed activations must go back to the OS for the RSS peak to mean "this epoch's working memory": pin glibc's mmap
# threshold (as benchmarks/models.py does) by re-executing once with it set.
if "MALLOC_MMAP_THRESHOLD_" not in os.environ and sys.platform.startswith("linux"):
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import vitkit  # noqa: E402
from vitkit.data.transforms import Normalize, to_unit_float  # noqa: E402
from vitkit.train import BatchLoader, TrainConfig, Trainer  # noqa: E402
from vitkit.train.config import DIGITS_RECIPE  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or on CPU the RSS peak above the starting RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base, self._peak, self._stop = self._rss(), 0, False

        def sample() -> None:
            while not self._stop:
                self._peak = max(self._peak, self._rss())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self._stop = True
        self._thread.join()
        self.peak_mb = max(0, self._peak - self._base) / 2**20


# ----------------------------------------------------------------------------------------------------------------
# 1. Throughput: bare loop vs Trainer
# ----------------------------------------------------------------------------------------------------------------
def synthetic(n: int, size: int, classes: int = 10, seed: int = 0):
    from vitkit.data.dataset import ImageDataset

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageDataset(labels=torch.arange(n) % classes, class_names=[str(i) for i in range(classes)], images=images)


class NormalizeOnly(nn.Module):
    """The same input pipeline for both loops: uint8 -> float -> normalise (no augmentation cost in the race)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = Normalize((0.5,) * 3, (0.25,) * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(to_unit_float(x))


def bare_loop(model: nn.Module, ds, batch: int, device: torch.device, amp: bool) -> tuple[float, float]:
    """Two epochs of the simplest correct loop; returns (images/s, peak MB) of the second."""
    tf = NormalizeOnly().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    model.train()
    result = (0.0, 0.0)
    for epoch in range(2):
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(epoch))
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            seen = 0
            for i in range(len(ds) // batch):
                idx = perm[i * batch : (i + 1) * batch]
                x, y = tf(ds.images[idx].to(device)), ds.labels[idx].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss.item()  # one host sync per step, as any loop that logs its loss has
                seen += len(y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
        result = (seen / dt, mem.peak_mb)
    return result


def trainer_loop(model: nn.Module, ds, batch: int, device: torch.device, amp: bool) -> tuple[float, float]:
    """The same two epochs through vitkit.train.Trainer; returns (images/s, peak MB) of the second."""
    cfg = TrainConfig(
        epochs=2,
        batch_size=batch,
        lr=1e-4,
        min_lr=0.0,
        warmup_epochs=0,
        label_smoothing=0.0,
        amp="bf16" if amp else "none",
        progress=False,
        device=str(device),
    )
    trainer = Trainer(
        model, config=cfg, train_transform=NormalizeOnly(), eval_transform=NormalizeOnly(), log=lambda m: None
    )
    peaks = []

    class Probe(BatchLoader):  # measure memory around each epoch's iteration
        def iter_from(self, start=0):
            with PeakMemory(device) as mem:
                yield from super().iter_from(start)
            peaks.append(mem.peak_mb)

    history = trainer.train(Probe(ds, batch, shuffle=True, drop_last=True), None)
    return history.epochs[1]["images_per_s"], peaks[1]


def throughput_table(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    cases = [
        ("vit_tiny_patch16_224", 224, args.batch_224, args.steps_224),
        ("vit_tiny_patch4_32", 32, args.batch_32, args.steps_32),
    ]
    for name, size, batch, steps in cases:
        ds = synthetic(batch * steps, size)
        for amp in (False, True):
            row = {"model": name, "img": size, "batch": batch, "precision": "bf16 autocast" if amp else "fp32"}
            for label, fn in (("bare", bare_loop), ("vitkit", trainer_loop)):
                torch.manual_seed(0)
                model = vitkit.create_model(name, num_classes=10).to(device)
                row[f"{label}_img_s"], row[f"{label}_peak_mb"] = fn(model, ds, batch, device, amp)
                print(f"  {name} {row['precision']} {label}: {row[f'{label}_img_s']:.1f} img/s", file=sys.stderr)
            row["overhead_pct"] = 100.0 * (row["bare_img_s"] / row["vitkit_img_s"] - 1.0)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 2-3. Digits: vitkit vs transformers' Trainer
# ----------------------------------------------------------------------------------------------------------------
def first_epoch_at(history: list[dict], key: str, target: float) -> dict | None:
    return next((row for row in history if (row.get(key) or 0) >= target), None)


def vitkit_digits(device: torch.device, epochs: int | None) -> dict:
    from vitkit.train import train

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"out": f"{tmp}/run", "progress": False, "device": str(device)}
        if epochs:
            overrides["epochs"] = epochs
        summary = train(dict(DIGITS_RECIPE), overrides=overrides, log=lambda m: None)
        history = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    hit = first_epoch_at(history, "val_acc", 0.97)
    return {
        "who": "vitkit Trainer",
        "test_acc": summary["test_acc"],
        "wall_s": summary["train_time_s"],  # the loop with per-epoch validation, as HF's trainer.train() below
        "epochs": summary["epochs_run"],
        "t97_s": hit["elapsed_s"] if hit else None,
        "epoch97": hit["epoch"] if hit else None,
    }


def hf_digits(device: torch.device, epochs: int | None) -> dict:
    """transformers' Trainer on the same splits, augmentation, optimiser, schedule and architecture."""
    row = {"who": "transformers Trainer + ViTForImageClassification"}
    try:
        import accelerate  # noqa: F401  (transformers.Trainer requires it)
        import transformers
    except ImportError as e:
        row["note"] = f"skipped: {e.name} is not installed (pip install accelerate)"
        return row
    from vitkit.data import EvalTransform, TrainTransform, load_data

    cfg = TrainConfig.from_dict(DIGITS_RECIPE)
    n_epochs = epochs or cfg.epochs
    splits = load_data("digits", seed=cfg.seed)
    size = cfg.img_size
    train_tf = TrainTransform(
        size,
        splits.mean,
        splits.std,
        scale=cfg.scale,
        ratio=cfg.ratio,
        hflip=cfg.hflip,
        interpolation=cfg.interpolation,
    )
    eval_tf = EvalTransform(size, splits.mean, splits.std, cfg.crop_fraction, cfg.interpolation)

    class Split(torch.utils.data.Dataset):
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return {"image": self.ds.images[i], "labels": int(self.ds.labels[i])}

    def collate(train: bool):
        def fn(items):
            x = torch.stack([it["image"] for it in items])
            return {
                "pixel_values": (train_tf if train else eval_tf)(x),
                "labels": torch.tensor([it["labels"] for it in items]),
            }

        return fn

    w, d, h = 128, 6, 4  # vit_nano_patch4_32's width, depth, heads
    model = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            hidden_size=w,
            num_hidden_layers=d,
            num_attention_heads=h,
            intermediate_size=4 * w,
            image_size=size,
            patch_size=4,
            num_labels=10,
            layer_norm_eps=1e-6,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    steps_per_epoch = len(splits.train) // cfg.batch_size
    times: list[tuple[int, float, float]] = []
    clock = {"t0": time.perf_counter()}

    class Clock(transformers.TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            times.append(
                (round(state.epoch or 0), metrics.get("eval_accuracy", 0.0), time.perf_counter() - clock["t0"])
            )

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    with tempfile.TemporaryDirectory() as tmp:
        targs = transformers.TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=256,
            num_train_epochs=n_epochs,
            learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
            lr_scheduler_type="cosine",
            label_smoothing_factor=cfg.label_smoothing,
            eval_strategy="epoch",
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            dataloader_drop_last=True,
            remove_unused_columns=False,
            use_cpu=device.type == "cpu",
            seed=cfg.seed,
            disable_tqdm=True,
        )

        class HFTrainer(transformers.Trainer):
            def get_train_dataloader(self):
                return torch.utils.data.DataLoader(
                    Split(splits.train),
                    batch_size=cfg.batch_size,
                    shuffle=True,
                    drop_last=True,
                    collate_fn=collate(True),
                )

            def get_eval_dataloader(self, eval_dataset=None):
                return torch.utils.data.DataLoader(
                    Split(eval_dataset if eval_dataset is not None else splits.val),
                    batch_size=256,
                    collate_fn=collate(False),
                )

        trainer = HFTrainer(
            model=model, args=targs, eval_dataset=splits.val, compute_metrics=accuracy, callbacks=[Clock()]
        )
        clock["t0"] = time.perf_counter()  # training only (with its per-epoch evaluation)
        trainer.train()
        wall = time.perf_counter() - clock["t0"]
        test = trainer.evaluate(eval_dataset=splits.test)
    hit = next((t for t in times if t[1] >= 0.97), None)
    row.update(
        test_acc=test["eval_accuracy"],
        wall_s=wall,
        epochs=n_epochs,
        t97_s=hit[2] if hit else None,
        epoch97=hit[0] if hit else None,
    )
    return row


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def print_tables(throughput: list[dict], digits: list[dict], device: torch.device) -> None:
    print(
        f"\n## Training benchmarks ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"device {device}, torch {torch.__version__}, vitkit {vitkit.__version__})\n"
    )
    if throughput:
        print(
            "| model | img | batch | precision | bare loop img/s | vitkit img/s | overhead | bare peak MB | vitkit peak MB |"
        )
        print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
        for r in throughput:
            print(
                f"| {r['model']} | {r['img']} | {r['batch']} | {r['precision']} | {r['bare_img_s']:.1f} | "
                f"{r['vitkit_img_s']:.1f} | {r['overhead_pct']:+.1f}% | {r['bare_peak_mb']:.0f} | "
                f"{r['vitkit_peak_mb']:.0f} |"
            )
    if digits:
        print("\n| digits (recipes/digits.yaml) | epochs | test acc | training time | time to 97% val | epoch |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in digits:
            if "note" in r:
                print(f"| {r['who']} | - | - | - | - | {r['note']} |")
                continue
            t97 = f"{r['t97_s']:.0f} s" if r.get("t97_s") is not None else "not reached"
            print(
                f"| {r['who']} | {r['epochs']} | {r['test_acc']:.4f} | {r['wall_s']:.0f} s | {t97} | "
                f"{r.get('epoch97') or '-'} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-224", type=int, default=16, help="batch for ViT-Ti/16 at 224 px")
    p.add_argument("--steps-224", type=int, default=6, help="steps per epoch at 224 px")
    p.add_argument("--batch-32", type=int, default=64, help="batch for ViT-Ti/4 at 32 px")
    p.add_argument("--steps-32", type=int, default=12, help="steps per epoch at 32 px")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--digits-epochs", type=int, default=None, help="override the recipe's 30 epochs")
    p.add_argument("--json", metavar="FILE", help="also write the raw rows as JSON")
    args = p.parse_args()
    device = torch.device(args.device)
    throughput = [] if args.skip_throughput else throughput_table(args, device)
    digits = (
        [] if args.skip_digits else [vitkit_digits(device, args.digits_epochs), hf_digits(device, args.digits_epochs)]
    )
    print_tables(throughput, digits, device)
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": throughput, "digits": digits}, indent=2, default=str))
    assert all(math.isfinite(r["overhead_pct"]) for r in throughput)


if __name__ == "__main__":
    main()
