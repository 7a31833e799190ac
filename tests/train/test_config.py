"""TrainConfig: validation, recipe precedence, and the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vitkit.train import DIGITS_RECIPE, TrainConfig, resolve_config
from vitkit.train.config import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "epochs must be a positive integer, got 0"),
        ({"amp": "fp8"}, "amp='fp8' is not allowed"),
        ({"batch_size": -4}, "batch_size must be a positive integer, got -4"),
        ({"monitor": "ema_acc"}, "monitor='ema_acc' needs ema: true"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
        ({"device": "tpu"}, "device='tpu' is not allowed"),
        ({"scale": 0.5}, r"scale must be a \(low, high\) pair with 0 < low <= high <= 1.0, got 0.5"),
        ({"task": "segment", "scale": [0.5]}, r"scale must be a \(low, high\) pair .*, got \(0.5,\)"),
        ({"task": "segment", "scale": [0, 1]}, r"scale must be a \(low, high\) pair .*, got \(0.0, 1.0\)"),
        (
            {"task": "detect", "ratio": [2, 1]},
            r"ratio must be a \(low, high\) pair with 0 < low <= high, got \(2.0, 1.0\)",
        ),
    ],
)
def test_bad_values_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "detect", "seg_head": "unetr"}, r"seg_head='unetr' is for task='segment', not task='detect'"),
        ({"task": "classify", "seg_args": {"decoder_depth": 1}}, r"seg_args=\{'decoder_depth': 1\} is for task='segm"),
        ({"task": "detect", "dice_weight": 0.5}, r"dice_weight=0.5 is for task='segment', not task='detect'"),
        (
            {"task": "segment", "model_args": {"num_queries": 5}},
            r"num_queries=5 \(in model_args\) is for task='detect'",
        ),
    ],
)
def test_settings_of_another_task_are_refused_not_ignored(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_unknown_setting_suggests_close_name():
    with pytest.raises(ValueError, match=r"unknown training setting 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="did you mean epochs"):
        TrainConfig.from_dict({"epoch": 3})


def test_precedence_defaults_recipe_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: shapes\nepochs: 7\nlr: 0.01\n")
    cfg = resolve_config(recipe, {"lr": 0.5, "epochs": None})
    assert (cfg.data, cfg.epochs, cfg.lr, cfg.weight_decay) == ("shapes", 7, 0.5, TrainConfig().weight_decay)


def test_no_recipe_means_digits_recipe_only_for_the_default_run():
    assert resolve_config(None, {}).img_size == 16  # the digits default
    assert (
        resolve_config(None, {"epochs": 3}).to_dict() == TrainConfig.from_dict({**DIGITS_RECIPE, "epochs": 3}).to_dict()
    )
    other = resolve_config(None, {"data": "shapes", "model": "vit_tiny_patch16_224"})
    assert other.img_size is None and other.hflip == TrainConfig().hflip  # generic defaults, not digits'


def test_yaml_round_trip():
    cfg = TrainConfig(scale=(0.5, 1.0), model_args={"depth": 3})
    again = TrainConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and again.scale == (0.5, 1.0)


def test_digits_recipe_file_matches_the_builtin_default():
    assert load_recipe(RECIPES / "digits.yaml") == DIGITS_RECIPE


@pytest.mark.parametrize("name", ["digits.yaml", "cifar10_vit_tiny.yaml", "finetune.yaml", "shapes.yaml"])
def test_recipes_are_valid_and_documented(name):
    text = (RECIPES / name).read_text()
    assert text.startswith("#") and "vitkit train" in text and "accuracy" in text.lower()
    TrainConfig.from_dict(load_recipe(RECIPES / name))
