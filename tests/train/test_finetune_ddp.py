"""Fine-tuning a Hugging Face checkpoint, and DDP (2 gloo processes) against one process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

import vitkit
from tests.train.conftest import SUBPROCESS_ENV, TINY, weights
from vitkit.train import train


def test_finetune_hugging_face_checkpoint_new_classes_and_size(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=3,
    )
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    summary = train(
        {
            "data": "digits",
            "pretrained": str(tmp_path / "hf"),
            "img_size": 8,
            "epochs": 1,
            "batch_size": 32,
            "lr": 1e-3,
            "freeze_layers": 1,
            "layer_decay": 0.75,
            "head_lr_mult": 10.0,
            "crop_fraction": 1.0,
            "hflip": 0.0,
            "progress": False,
            "out": str(tmp_path / "run"),
        }
    )
    model = vitkit.load_model(str(tmp_path / "run" / "last"))
    assert model.num_classes == 10 and model.cfg.img_size == (8, 8)  # 3 -> 10 classes, 16 -> 8 px
    assert tuple(model.pos_embed.shape) == (1, 1 + 2 * 2, 32)  # resampled to the 2x2 grid
    assert model.preprocess.mean == (0.5, 0.5, 0.5)  # fine-tuning keeps the checkpoint's normalisation
    assert model.preprocess.class_names == [str(i) for i in range(10)]
    hf_layers = dict(hf.named_parameters())
    # The frozen first block is still exactly the Hugging Face one; the trained second block has moved.
    q0 = hf_layers["vit.layers.0.attention.q_proj.weight"]
    q1 = hf_layers["vit.layers.1.attention.q_proj.weight"]
    assert torch.equal(model.blocks[0].attn.qkv.weight[:32], q0)
    assert not torch.equal(model.blocks[1].attn.qkv.weight[:32], q1)
    assert summary["status"] == "finished" and 0.0 <= summary["test_acc"] <= 1.0


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    # No randomness in the step (full-image crops, no flips, no mixup, no dropout), so the only difference between
    # 1 and 2 processes is the order of floating-point sums in the gradient all-reduce. No qkv bias: the key bias
    # has an exactly-zero true gradient (softmax ignores it), so Adam would turn rounding noise into lr-sized steps.
    cfg = {
        **TINY,
        "model_args": {**TINY["model_args"], "qkv_bias": False},
        "epochs": 1,
        "batch_size": 32,
        "scale": [1.0, 1.0],
        "ratio": [1.0, 1.0],
        "hflip": 0.0,
    }
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "vitkit",
        "train",
        "--config",
        str(recipe),
        "--out",
        str(tmp_path / "ddp"),
        "--device",
        "cpu",
    ]
    r = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("run directory:") == 1  # only rank 0 logs
    single = train({**cfg, "out": str(tmp_path / "one")})
    two, one = weights(tmp_path / "ddp" / "last"), weights(tmp_path / "one" / "last")
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    import json

    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2 and ddp_summary["steps"] == single["steps"] == 1439 // 32
    assert ddp_summary["test_images"] == single["test_images"]  # the sharded test set is counted once
    assert ddp_summary["test_acc"] == pytest.approx(single["test_acc"], abs=1 / single["test_images"])
