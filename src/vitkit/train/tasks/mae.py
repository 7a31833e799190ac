"""Masked-autoencoder pretraining (He et al. 2022) on the trainer's task seam: labels are ignored, the loss is the
model's reconstruction error on the hidden patches, and reconstruction figures are drawn every few epochs.

Training masks are drawn from torch's global generator, so a checkpoint's saved RNG state carries them and a
resumed run masks exactly as the uninterrupted one. Evaluation masks are fixed (a private generator seeded with
the run's seed, the same for every batch and epoch): the validation loss of two epochs then compares the weights,
not two draws of masks, and evaluating never moves the training's random stream.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitkit.train.config import TrainConfig
from vitkit.train.tasks.base import Batch, Task, to_device

FIGURE_IMAGES = 6  # rows of a reconstruction figure


class MAETask(Task):
    """Pretrain a `vitkit.models.MaskedAutoencoderViT` on images, ignoring any labels.

    Batch fields: "image" (B, C, H, W) and, for evaluation, "noise" (B, L), the fixed masks. Columns: train_loss,
    val_loss / ema_loss (mean squared error on the hidden patches, in the model's input normalisation).

    Args:
        train_transform: module applied to uint8 train batches; default `TrainTransform` from the recipe (random
            resized crop and flip, as the paper; mixing is refused) and `model.preprocess`.
        eval_transform: module applied to uint8 eval batches; default `EvalTransform` from `model.preprocess`.
        figures_every: draw RUN_DIR/reconstructions/epoch_NNN.png every N epochs and after the last (0 = never);
            None = the recipe's `figures_every`.
    """

    metrics = ("loss",)
    monitor = "val_loss"
    train_sum_keys = ()
    eval_sum_keys = ("loss",)
    log_metrics = ("val_loss", "ema_loss")

    def __init__(
        self,
        train_transform: nn.Module | None = None,
        eval_transform: nn.Module | None = None,
        figures_every: int | None = None,
    ) -> None:
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.figures_every = figures_every
        self.epochs = 0
        self.seed = 0
        self.num_patches = 0
        self._figure_images: dict[str, Tensor] = {}  # "val" / "train": the first images seen, eval-preprocessed

    def check_model(self, model: nn.Module) -> None:
        if getattr(model, "family", None) != "mae":
            raise ValueError(
                f"MAE pretraining needs a masked autoencoder (vitkit.models.MaskedAutoencoderViT, e.g. "
                f"mae_from_vit('vit_small_patch16_224')), got {type(model).__name__}"
            )
        self.num_patches = int(model.num_patches)

    def setup(self, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        self.check_model(model)
        if config.mixup > 0 or config.cutmix > 0:
            raise ValueError(
                f"mixup={config.mixup} / cutmix={config.cutmix}: image mixing has no meaning for MAE pretraining "
                "(there are no labels to mix); set both to 0"
            )
        if self.figures_every is None:
            self.figures_every = config.figures_every
        if self.figures_every and config.parallel == "fsdp":
            raise ValueError("figures_every needs the whole model on one process; set figures_every=0 with fsdp")
        self.epochs, self.seed, self.device = config.epochs, config.seed, device
        from vitkit.data.inference import eval_transform
        from vitkit.data.transforms import TrainTransform

        pre = model.preprocess
        if self.train_transform is None:
            self.train_transform = TrainTransform(
                pre.input_size,
                pre.mean,
                pre.std,
                scale=config.scale,
                ratio=config.ratio,
                hflip=config.hflip,
                color_jitter=config.color_jitter,
                auto_augment=config.auto_augment,
                randaug_n=config.randaug_n,
                randaug_m=config.randaug_m,
                random_erasing=config.random_erasing,
                interpolation=pre.interpolation,
            )
        if self.eval_transform is None:
            self.eval_transform = eval_transform(model)
        self.train_transform = self.train_transform.to(device)
        self.eval_transform = self.eval_transform.to(device)

    # --- batches -----------------------------------------------------------------------------------------------
    def _images(self, raw: Any) -> Tensor:
        """The images of whatever a loader yields: (images, labels), {"image": ...} or images alone."""
        if isinstance(raw, Mapping):
            if "image" not in raw:
                raise ValueError(f"an MAE batch needs an 'image' field, got {sorted(raw)}")
            return raw["image"]
        if isinstance(raw, (tuple, list)) and raw:
            return raw[0]
        if isinstance(raw, Tensor):
            return raw
        raise TypeError(f"an MAE loader must yield images, (images, labels) or {{'image'}}, got {type(raw).__name__}")

    def _keep_for_figures(self, which: str, images: Tensor) -> None:
        if which not in self._figure_images:
            self._figure_images[which] = images[:FIGURE_IMAGES].detach().clone()

    def train_batch(self, raw: Any) -> Batch:
        x = to_device({"image": self._images(raw)}, self.device)["image"]
        if "val" not in self._figure_images and "train" not in self._figure_images and x.dtype == torch.uint8:
            with torch.no_grad():  # the eval preprocessing draws no random numbers
                self._keep_for_figures("train", self.eval_transform(x[:FIGURE_IMAGES]))
        if x.dtype == torch.uint8:
            x = self.train_transform(x)
        return {"image": x}

    def eval_noise(self, batch_size: int) -> Tensor:
        """The fixed evaluation masks' noise (batch_size, L): the same rows for every batch and epoch."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(batch_size, self.num_patches, generator=g).to(self.device)

    def eval_batch(self, raw: Any) -> Batch:
        x = to_device({"image": self._images(raw)}, self.device)["image"]
        if x.dtype == torch.uint8:
            x = self.eval_transform(x)
        self._keep_for_figures("val", x)
        return {"image": x, "noise": self.eval_noise(len(x))}

    def batch_size(self, batch: Batch) -> int:
        return len(batch["image"])

    # --- training ----------------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch) -> Any:
        return model(batch["image"], noise=batch.get("noise"))

    def loss(self, out: Any, batch: Batch) -> Tensor:
        return out.loss.float()

    # --- evaluation --------------------------------------------------------------------------------------------
    def eval_sums(self, out: Any, batch: Batch) -> dict[str, float]:
        # Every image hides the same number of patches, so the batch mean times B sums to the dataset mean.
        return {"loss": float(out.loss.float()) * len(batch["image"])}

    def eval_metrics(self, sums: Mapping[str, float]) -> dict[str, Any]:
        n = sums["n"]
        return {"loss": sums["loss"] / n if n else float("nan"), "n": int(n)}

    # --- figures -----------------------------------------------------------------------------------------------
    def end_epoch(self, model: nn.Module, epoch: int, run_dir: Path | None) -> None:
        """Draw the reconstruction figure of `epoch` (1-based) when it is due (every `figures_every` epochs and
        the last one). Uses the fixed evaluation masks and no global random numbers, so it cannot change the run."""
        every = self.figures_every or 0
        if run_dir is None or not every or not (epoch % every == 0 or epoch == self.epochs):
            return
        images = self._figure_images.get("val", self._figure_images.get("train"))
        if images is None:
            return
        write_reconstruction_figure(model, images, Path(run_dir) / "reconstructions" / f"epoch_{epoch:03d}.png",
                                    noise=self.eval_noise(len(images)), title=f"epoch {epoch}")  # fmt: skip


def write_reconstruction_figure(
    model: nn.Module, images: Tensor, path: str | os.PathLike, noise: Tensor | None = None, title: str = ""
) -> Path:
    """Rows of original | masked | reconstruction for `images` (B, C, H, W) in the model's input normalisation,
    written atomically to `path` (PNG). The model is run in eval mode without gradients and restored after."""
    was_training = model.training
    model.eval()
    try:
        masked, recon, _ = model.reconstruct(images, noise=noise)
    finally:
        model.train(was_training)
    pre = model.preprocess
    mean = torch.tensor(pre.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, device=images.device).view(1, -1, 1, 1)

    def show(x: Tensor) -> Tensor:  # model input -> 0..1 pixels (hidden patches of `masked` come out mid-grey)
        return (x.float() * std + mean).clamp(0, 1).cpu()

    from vitkit.train.plots import plot_image_rows

    plot_image_rows(
        [show(images), show(masked), show(recon)],
        ["original", f"masked ({model.cfg.mask_ratio:.0%})", "reconstruction"],
        path,
        title=title,
    )
    return Path(path)
