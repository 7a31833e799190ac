import pytest

from vitkit.compare import ModelSpec

# Two tiny models of different families: a 2-block ViT of width 16 and a ResNet-18 layout of widths 4..32.
TINY_VIT = ModelSpec("vit_nano_patch4_32", {"embed_dim": 16, "depth": 2, "num_heads": 2})
TINY_CNN = ModelSpec("resnet18", {"widths": [4, 8, 16, 32], "stem_width": 4})
SETTINGS = dict(
    data="digits",
    epochs=1,
    fractions=(0.25, 1.0),
    img_size=16,
    probe_images=24,
    explain_images=2,
    max_shift=1,
    cost_sizes=(16, 32),
)


@pytest.fixture(scope="package", autouse=True)
def _no_training_curves():
    """Each training unit's curves.png costs about a second of matplotlib and is not what these tests check.
    Package scope: the patch is undone after the last test here (session scope left every later run of the suite
    without curves.png)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("vitkit.train.plots.plot_curves", lambda *args, **kwargs: None)
        yield


class Killed(RuntimeError):
    """Stands for a kill: raised after the first training unit is written."""


@pytest.fixture(scope="package")
def compared(tmp_path_factory):
    """A comparison killed after its first training unit, then re-run to the end.

    Returns (out dir, results, units written by the first run, units written by the re-run, mtimes after run 1).
    """
    from vitkit.compare import compare

    out = tmp_path_factory.mktemp("compare")
    first: list[str] = []

    def kill_after_first_training(unit: str) -> None:
        first.append(unit)
        if unit.startswith("train-"):
            raise Killed(unit)

    with pytest.raises(Killed):
        compare([TINY_VIT, TINY_CNN], out=out, log=lambda m: None, on_unit=kill_after_first_training, **SETTINGS)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "units").iterdir()}
    second: list[str] = []
    results = compare([TINY_VIT, TINY_CNN], out=out, log=lambda m: None, on_unit=second.append, **SETTINGS)
    return out, results, first, second, mtimes
