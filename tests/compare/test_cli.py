"""The compare and sweep commands: argument errors are one clear line (the runs themselves: test_compare.py)."""

import pytest

from vitkit.cli import main


def test_model_args_must_name_a_compared_model(tmp_path, capsys):
    code = main(
        ["compare", "--models", "vit_nano_patch4_32", "--model-args", "resnet18={depth: 2}", "--out", str(tmp_path)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--model-args expects NAME=MAPPING with NAME one of --models ['vit_nano_patch4_32']" in err


def test_bad_fractions_and_unknown_models_are_named(tmp_path, capsys):
    assert main(["compare", "--models", "vit_nano_patch4_32", "--fractions", "half", "--out", str(tmp_path)]) == 2
    assert "--fractions expects numbers" in capsys.readouterr().err
    assert main(["compare", "--models", "vit_nano_patch4_3", "--out", str(tmp_path)]) == 2
    assert "vit_nano_patch4_32" in capsys.readouterr().err  # the close name is offered


def test_epochs_and_budget_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--models", "vit_nano_patch4_32", "--epochs", "2", "--budget-minutes", "3", "--out", "x"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_sweep_vary_items_are_parsed_and_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--model", "vit_nano_patch4_32", "--vary", "depth", "--out", str(tmp_path)])
    assert "expected KEY=V1,V2" in capsys.readouterr().err
    args = ["sweep", "--model", "vit_nano_patch4_32", "--vary", "depth=2,4", "depth=6", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "--vary names 'depth' twice" in capsys.readouterr().err
