"""`pretrain(method="mae", ...)`: a whole masked-autoencoder pretraining run, as `vitkit pretrain` runs it.

The run is an ordinary vitkit run with `task: mae` in its config.yaml (so `vitkit train --resume RUN` and
`vitkit pretrain --resume RUN` both continue it exactly): `model` names the ViT encoder (any registered ViT),
`model_args` change the encoder and set the decoder and masking (decoder_embed_dim, decoder_depth,
decoder_num_heads, mask_ratio, norm_pix_loss ...). The run directory holds what `vitkit train` writes (config.yaml,
best/ and last/, metrics, curves.png, summary.json with the test reconstruction loss) plus
reconstructions/epoch_NNN.png. Fine-tune it with `vitkit train --pretrained RUN`: the encoder becomes the ViT.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

from vitkit._validate import check_choice
from vitkit.train.config import DEFAULT_MODEL, TrainConfig

Method = Literal["mae"]
# The paper's pretraining augmentation (random resized crop of 20-100% of the image, flips), without the
# classification recipe's label smoothing; the rest of the defaults are TrainConfig's.
MAE_DEFAULTS: dict[str, Any] = {"task": "mae", "scale": [0.2, 1.0], "label_smoothing": 0.0, "monitor": "val_loss"}


def pretrain(
    config: TrainConfig | dict[str, Any] | str | os.PathLike | None = None,
    *,
    method: Method = "mae",
    resume: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Pretrain a ViT encoder without labels and return the run's summary (also RUN_DIR/summary.json).

    Args:
        config: a dict of settings, a recipe YAML path, or None: `MAE_DEFAULTS` fill in what it leaves out (task
            mae, the paper's crops, monitor val_loss); or a TrainConfig, taken as it is (it must have task="mae").
        method: the self-supervised objective; "mae" (masked autoencoder, He et al. 2022).
        resume: a run directory to continue exactly (its config.yaml is used; `config` must be None).
        overrides: settings on top of `config` (None values ignored), e.g. parsed flags.
        log: message sink (rank 0); stderr by default.

    Returns:
        The summary: status, run_dir, best_val_loss, best_epoch, test_loss, wall_time_s, images_per_s, ...

    Raises:
        ValueError: an unknown method, settings that contradict it (task other than mae, mixing, a teacher), bad
            paths or data, each named.
        TrainingInterrupted / NonFiniteLossError: as `vitkit.train.train`.
    """
    from vitkit.train.run import train

    check_choice("method", method, Method)
    if resume is not None:
        return train(None, resume=resume, overrides=overrides, log=log)
    if isinstance(config, TrainConfig):
        base = config.to_dict()
    elif isinstance(config, dict) or config is None:
        base = dict(config or {})
    else:
        from vitkit.train.config import load_recipe

        base = load_recipe(config)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    task = given.get("task", base.get("task", "mae"))
    if task != "mae":
        raise ValueError(f"method={method!r} pretrains with task='mae', but the settings ask for task={task!r}")
    settings = {**MAE_DEFAULTS, **base}
    if "model" not in settings and "model" not in given:
        settings["model"] = DEFAULT_MODEL
    return train(settings, overrides=given, log=log)


__all__ = ["MAE_DEFAULTS", "Method", "pretrain"]
