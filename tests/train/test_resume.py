"""Exact resume: a run killed with SIGKILL and later stopped with SIGTERM, each time resumed, ends with the same
weights, bit for bit, as the run that was never interrupted. Real processes, really killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.train.conftest import SUBPROCESS_ENV, TINY, assert_same_bits, run_vitkit, vitkit_cmd, weights
from vitkit.train.checkpoint import read_training_state

# Every source of randomness on: random crops and flips, Mixup/CutMix, EMA, accumulation, checkpoints mid-epoch.
# 1439 train digits / 16 = 89 micro-batches = 45 optimiser steps per epoch (the last one a single micro-batch).
STRESS = dict(
    epochs=2,
    batch_size=16,
    accum_steps=2,
    ckpt_every_steps=7,
    ema=True,
    ema_decay=0.99,
    mixup=0.2,
    cutmix=0.5,
    hflip=0.5,
    scale=[0.5, 1.0],
    label_smoothing=0.1,
    warmup_epochs=0.3,
)
TOTAL_STEPS = 2 * 45


def _popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        vitkit_cmd(*args), env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _signal_at_next_checkpoint(proc: subprocess.Popen, last: Path, signum: int) -> None:
    """Send `signum` as soon as a new RUN_DIR/last checkpoint has been renamed into place."""
    state = last / "training_state.pt"
    before = state.stat().st_ino if state.exists() else None
    deadline = time.monotonic() + 180
    while not state.exists() or state.stat().st_ino == before:
        assert proc.poll() is None, f"the run ended before a new checkpoint: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "no new checkpoint after 180 s"
        time.sleep(0.002)
    proc.send_signal(signum)


@pytest.mark.slow
def test_kill_9_then_sigterm_then_resume_is_bit_exact(tmp_path):
    recipe = tmp_path / "stress.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, **STRESS}))
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = _popen("train", "--config", str(recipe), "--out", str(ref))  # in parallel: one core each

    # 1. SIGKILL right after the first step checkpoint: no chance to clean up.
    victim = _popen("train", "--config", str(recipe), "--out", str(run))
    _signal_at_next_checkpoint(victim, run / "last", signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    killed = read_training_state(run / "last")
    assert 0 < killed["step"] < TOTAL_STEPS and killed["batches_done"] > 0  # mid-epoch, mid-run
    assert not (run / "summary.json").exists()

    # 2. Resume, then SIGTERM at its next checkpoint: it finishes the step, writes last/ and exits 143.
    resumed = _popen("train", "--resume", str(run))
    _signal_at_next_checkpoint(resumed, run / "last", signal.SIGTERM)
    _, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 143, err
    assert f"resuming {run} from epoch {killed['epoch'] + 1}, step {killed['step']}" in err
    stopped = read_training_state(run / "last")
    assert stopped["step"] > killed["step"]
    assert f"stopped by SIGTERM after step {stopped['step']}; saved the run to {run / 'last'}" in err
    assert f"vitkit train --resume {run}" in err
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"

    # 3. Resume to the end and compare with the run that was never interrupted.
    r = run_vitkit("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    _, ref_err = reference.communicate(timeout=240)
    assert reference.returncode == 0, ref_err
    assert_same_bits(weights(ref / "last"), weights(run / "last"))
    assert_same_bits(weights(ref / "best"), weights(run / "best"))
    ref_state, state = read_training_state(ref / "last"), read_training_state(run / "last")
    assert_same_bits(ref_state["ema"], state["ema"])
    keys = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "ema_acc")
    assert [{k: e[k] for k in keys} for e in ref_state["history"]] == [
        {k: e[k] for k in keys} for e in state["history"]
    ]
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    assert summary["test_acc"] == ref_summary["test_acc"] and summary["steps"] == TOTAL_STEPS
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not os.listdir(run / "last") == []  # a complete directory, no temp leftovers next to it
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
