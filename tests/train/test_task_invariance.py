"""Moving classification into a Task changed no number: a fixed classification run (every source of randomness on:
random crops and flips, Mixup/CutMix, label smoothing, EMA, accumulation, clipping, warmup) reproduces the history
and the final weights that the loop gave before the refactoring, bit for bit (evaluation losses to 1e-6: see the
test).

tests/train/expected/classification_reference.json was written by the pre-Task trainer (commit c7e1b4f "tests/train:
record the classification reference", its test file given today's `cpu_model`) with
`python -m tests.train.test_task_invariance --write`, on an Intel Xeon with AMX. The float ops are the same in the same
order, so with that torch version on a CPU of the same model and vector extensions the check is exact; elsewhere other
kernels round differently, and then the history is compared to 1e-3 and the weights by their sums. (It was first
written on an "AMD EPYC"; a CI machine of another EPYC generation, same name, took the exact branch and differed in
the 8th digit of a loss, so the CPU is now told by family, model and extensions as well.)
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from tests.train.conftest import tiny_model, toy_dataset
from vitkit.train import BatchLoader, TrainConfig, Trainer

EXPECTED = Path(__file__).parent / "expected" / "classification_reference.json"
TIME_KEYS = ("epoch_time_s", "images_per_s", "elapsed_s")
CONFIG = dict(
    epochs=2,
    lr=3e-3,
    min_lr=1e-5,
    warmup_epochs=0.5,
    weight_decay=0.05,
    label_smoothing=0.1,
    mixup=0.8,
    cutmix=1.0,
    mixup_prob=0.9,
    ema=True,
    ema_decay=0.9,
    accum_steps=2,
    clip_grad=1.0,
    scale=(0.5, 1.0),
    hflip=0.5,
    crop_fraction=1.0,
    progress=False,
    seed=0,
)


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_reference() -> dict:
    """The fixed run: 10 classes (so top-5 is meaningful), 2 epochs of 7 micro-batches (accumulated in pairs, the
    last pair short), on one thread."""
    from vitkit.models.base import Preprocess

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = toy_dataset(112, num_classes=10)
        torch.manual_seed(0)
        model = tiny_model(num_classes=10)
        model.preprocess = Preprocess(
            mean=(0.3,) * 3, std=(0.3,) * 3, input_size=(8, 8), crop_fraction=1.0, class_names=ds.class_names
        )
        trainer = Trainer(model, "cpu", TrainConfig(**CONFIG))
        history = trainer.train(BatchLoader(ds, 16, shuffle=True, drop_last=True), BatchLoader(ds, 48))
        test = trainer.evaluate(BatchLoader(ds, 48))
    finally:
        torch.set_num_threads(threads)
    rows = [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in history.epochs]
    return {
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "history": rows,
        "evaluate": test,
        "weights_sha256": _digest(model.state_dict()),
        "ema_sha256": _digest(trainer.ema.module.state_dict()),
        "weight_sums": {k: float(v.double().sum()) for k, v in model.state_dict().items()},
    }


def cpu_model() -> str:
    """The CPU's model name, family/model numbers and vector extensions: float kernels (AVX2, AVX-512, AMX) and so
    rounding differ between CPUs, and one model name covers several generations ("AMD EPYC" on Zen 3 without
    AVX-512 and on Zen 4 with it), so the name alone cannot tell that two machines run the same kernels."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                key, value = (part.strip() for part in line.split(":", 1))
                fields.setdefault(key, value)
    except OSError:
        pass
    if "model name" not in fields:
        import platform

        return platform.processor() or platform.machine()
    isa = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx", "amx", "fma")))
    return f"{fields['model name']} (family {fields.get('cpu family')} model {fields.get('model')}; {' '.join(isa)})"


def test_classification_numbers_are_unchanged_by_the_task_refactoring():
    expected = json.loads(EXPECTED.read_text())
    got = run_reference()
    assert [list(r) for r in got["history"]] == [list(r) for r in expected["history"]]  # same columns, same order
    assert set(got["evaluate"]) == {"loss", "acc", "top5", "n"}
    if got["torch"] == expected["torch"] and got["cpu"] == expected.get("cpu"):
        # Training is bit-exact. Evaluation losses may differ in the last bits since inference computes only the
        # class-token rows of a ViT's last block (VisionTransformer._last_block_reads_prefix_only): other float
        # summation order, same predictions.
        for g, e in zip(got["history"] + [got["evaluate"]], expected["history"] + [expected["evaluate"]], strict=True):
            for k in e:
                if k.endswith("loss") and not k.startswith("train"):
                    assert abs(g[k] - e[k]) <= 1e-6 * max(1.0, abs(e[k])), (k, g[k], e[k])
                else:
                    assert g[k] == e[k], (k, g[k], e[k])
        assert got["weights_sha256"] == expected["weights_sha256"]
        assert got["ema_sha256"] == expected["ema_sha256"]
    else:  # other kernels (torch version or CPU model): the same numbers up to float rounding, grown over 8 steps
        for g, e in zip(got["history"], expected["history"], strict=True):
            for k in e:
                if isinstance(e[k], int):
                    assert g[k] == e[k], k
                elif k.endswith(("acc", "top5")):  # a rounding difference may flip one or two of 112 predictions
                    assert abs(g[k] - e[k]) <= 2 / 112 + 1e-9, (k, g[k], e[k])
                else:
                    assert abs(g[k] - e[k]) < 1e-3 * max(1.0, abs(e[k])), (k, g[k], e[k])
        for k, v in expected["weight_sums"].items():
            assert abs(got["weight_sums"][k] - v) < 1e-3 * max(1.0, abs(v)), k


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    EXPECTED.parent.mkdir(exist_ok=True)
    EXPECTED.write_text(json.dumps(run_reference(), indent=1) + "\n")
    print(f"wrote {EXPECTED}")
