"""The training loop.

    trainer = Trainer(model, device="cpu", config=TrainConfig(epochs=10), run_dir="runs/demo")
    history = trainer.train(train_loader, val_loader)
    history["val_acc"]          # one metric over the epochs
    history.epochs[-1]          # everything measured in the last epoch

The loop knows nothing of labels or accuracy: a `Task` (vitkit.train.tasks) turns what the loaders yield into
batch fields and owns the loss, the metrics and evaluation. The default, `ClassificationTask`, takes loaders of
`(images, labels)`: uint8 image batches are augmented (train) or resized and normalised (eval) on the training
device; float batches are taken as ready model inputs. With a `run_dir`, the trainer writes resumable checkpoints
(`last/`, `best/`), metrics.jsonl/csv, curves.png and (optionally) TensorBoard events.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitkit.cpu import has_native_bf16, is_x86
from vitkit.train.checkpoint import SHARDED_METADATA, get_rng_state, has_checkpoint, set_rng_state, write_checkpoint
from vitkit.train.config import TrainConfig
from vitkit.train.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    broadcast_buffers,
    broadcast_object,
    device_mesh,
    full_state_dict,
    gather_objects,
    is_sharded,
    local_tensor,
    no_grad_sync,
    resolve_device,
    shard_model,
)
from vitkit.train.metrics import History, TensorBoardLogger, write_metric_files
from vitkit.train.optim import (
    WarmupCosine,
    check_freeze_layers,
    freeze_backbone,
    require_layer_ids,
    setup_optimizer_groups,
)
from vitkit.train.tasks import Task, task_from_config

PLOT_EVERY_S = 30.0  # minimum seconds between redraws of RUN_DIR/curves.png


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the weights were not updated with it."""

    def __init__(self, message: str, step: int, epoch: int) -> None:
        super().__init__(message)
        self.step = step
        self.epoch = epoch


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the current step was finished and RUN_DIR/last written."""

    def __init__(self, message: str, signum: int, step: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.step = step

    @property
    def exit_code(self) -> int:
        """128 + signal number, the shell convention: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


# ----------------------------------------------------------------------------------------------------------------
# EMA of the weights
# ----------------------------------------------------------------------------------------------------------------
class ModelEma:
    """Exponential moving average of a model's parameters and buffers, kept in float32 on the training device.

    The decay is warmed up as min(decay, (1 + step) / (10 + step)) so the average is useful in short runs instead
    of being dominated by the random initialisation for the first ~1/(1 - decay) steps.

    Under FSDP the copy is sharded like the model and each process averages its own shards: the average is
    element-wise, so every element is bit for bit what averaging the whole tensors would give, at 1/world_size
    of the memory.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        ema = {k: local_tensor(v) for k, v in self.module.state_dict().items()}
        src = {k: local_tensor(v) for k, v in model.state_dict().items()}
        floats = [k for k, v in ema.items() if v.is_floating_point()]
        torch._foreach_lerp_([ema[k] for k in floats], [src[k].detach() for k in floats], 1.0 - d)
        for k, v in ema.items():
            if not v.is_floating_point():
                v.copy_(src[k])

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(amp: str, device: torch.device, warn: bool = True) -> torch.dtype | None:
    """The autocast dtype for an `amp` setting on `device`, with a clear error where it cannot work (and, with
    `warn`, a warning for bf16 on an x86 CPU without native bf16, where it is slower than fp32)."""
    if amp == "none":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError(
                f"amp='fp16' needs a CUDA device (it relies on a GradScaler); on {device.type} use amp='bf16'"
            )
        return torch.float16
    if amp == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"amp='bf16' is not supported by {torch.cuda.get_device_name(device)}; use amp='fp16'")
        if warn and device.type == "cpu" and is_x86() and not has_native_bf16():
            warnings.warn(
                "amp='bf16' on a CPU without native bf16 (no AVX-512-bf16 or AMX): PyTorch emulates bf16 matmuls "
                "there, measured 2.6x slower than fp32 for a ViT-Ti layer and 300x for a 2048^2 matmul on an AVX2 "
                "AMD EPYC; amp='none' (fp32) is faster on this CPU",
                stacklevel=2,
            )
        return torch.bfloat16
    raise ValueError(f"amp={amp!r} is not allowed; choose one of 'none', 'bf16', 'fp16'")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile and DDP wrappers (an FSDP2 module is its own plain module)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------
class Trainer:
    """Train a model on a task (classification by default) with the recipe in `config`.

    Args:
        model: a vitkit model (the task may ask more, e.g. `num_classes`; layer decay and freezing need a ViT;
            checkpoints need `save_pretrained`).
        device: 'cpu', 'cuda', 'cuda:1', 'auto' ...; None = config.device. Under DDP, `dist.device` wins.
        config: the recipe (optimiser, schedule, augmentation, AMP, EMA, checkpoints ...); TrainConfig() if None.
        run_dir: where checkpoints, metrics and plots go; None keeps everything in memory.
        train_transform: for the default classification task: module applied to uint8 train batches (default
            `TrainTransform` from config + preprocess). Give a custom task its transforms directly.
        eval_transform: likewise for uint8 eval batches (default `EvalTransform` from preprocess).
        dist: process-group info when running under torchrun (see `init_distributed`). With
            config.parallel='fsdp', `model` is sharded in place (FSDP2) when training starts.
        log: where messages go (rank 0 only); print to stderr by default.
        checkpoint_extra: extra JSON fields for the checkpoints' config.json (e.g. a `training` record).
        task: what is learned: batch fields, loss, metrics, evaluation (see `vitkit.train.tasks`); None =
            `ClassificationTask(train_transform, eval_transform)`, or a `DistillationTask` loading
            `config.teacher` when the recipe sets distillation.

    Raises:
        TypeError: transforms given together with a task.
        ValueError: parallel='fsdp' in a single process.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device | None = None,
        config: TrainConfig | None = None,
        *,
        run_dir: str | Path | None = None,
        train_transform: nn.Module | None = None,
        eval_transform: nn.Module | None = None,
        dist: DistInfo | None = None,
        log: Callable[[str], None] | None = None,
        checkpoint_extra: dict[str, Any] | None = None,
        task: Task | None = None,
    ) -> None:
        if task is not None and (train_transform is not None or eval_transform is not None):
            raise TypeError(
                f"train_transform/eval_transform configure the default classification task; with "
                f"task={type(task).__name__}(...) give the task its transforms"
            )
        self.cfg = config or TrainConfig()
        self.dist = dist or DistInfo(device=resolve_device(device if device is not None else self.cfg.device))
        self.device = self.dist.device
        self.model = model  # the plain module; `self.train_model` is what the loop calls (maybe compiled / DDP)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        # The recipe's task: classification, or distillation when it names a teacher.
        self.task = task if task is not None else task_from_config(self.cfg, train_transform, eval_transform, self.log)
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.task.check_model(model)
        self._check_model_settings()
        self.amp_dtype = amp_dtype(self.cfg.amp, self.device)
        self.sharded = self.cfg.parallel == "fsdp"
        if self.sharded and not self.dist.enabled:
            # Refused rather than ignored: one process has nothing to shard over, so the memory the setting asks
            # for would silently not be saved, and the run's checkpoints would take another layout than asked.
            raise ValueError(
                "parallel='fsdp' shards the model over the processes of a torchrun launch, but this is a single "
                "process (WORLD_SIZE=1): start it with `torchrun --nproc_per_node=N -m vitkit train ...` (N >= 2), "
                "or use parallel='ddp' (the default), which trains a single process as a plain model"
            )
        self._task_ready = False
        self.history = History()
        self.step = 0
        self._stop_signal: int | None = None

    def _check_model_settings(self) -> None:
        """Settings that depend on the model, checked when the Trainer is built (before a run directory exists,
        and not after an epoch): freezing, layer decay, checkpointing, and a model its checkpoints can describe."""
        cfg, model = self.cfg, self.model
        if cfg.freeze_layers:
            check_freeze_layers(model, cfg.freeze_layers)
        if cfg.layer_decay is not None:
            require_layer_ids(model, "layer_decay")
        if cfg.grad_checkpointing and not hasattr(model, "set_grad_checkpointing"):
            raise TypeError(f"grad_checkpointing needs set_grad_checkpointing(); {type(model).__name__} has none")
        if self.run_dir is not None and hasattr(model, "describe"):
            model.describe()  # a head config.json cannot describe fails now, not at the first checkpoint

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr) if self.cfg.progress else self._log(msg)

    # --- setup ------------------------------------------------------------------------------------------------
    def _setup_model(self) -> None:
        cfg, model = self.cfg, self.model
        if cfg.freeze_layers:
            freeze_backbone(model, cfg.freeze_layers)
        if cfg.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise TypeError(f"grad_checkpointing needs set_grad_checkpointing(); {type(model).__name__} has none")
            model.set_grad_checkpointing(True)
        model.to(self.device)
        self.task.setup(model, cfg, self.device)
        self._task_ready = True
        # EMA copies the plain module before any wrapper, so it never sees DDP/compile internals.
        self.ema = ModelEma(model, cfg.ema_decay) if cfg.ema else None
        train_model: nn.Module = model
        if self.sharded:
            # In place: `model` (and so `self.model`) becomes the sharded module; the EMA copy is sharded alike so
            # its shards line up with the model's.
            mesh = device_mesh(self.dist)
            units = shard_model(model, mesh, self.amp_dtype)
            if self.ema is not None:
                shard_model(self.ema.module, mesh, self.amp_dtype)
            self.log(
                f"FSDP: {units} blocks/stages sharded as units of their own, the rest at the root, over "
                f"{self.dist.world_size} processes"
                if units
                else f"FSDP: {type(model).__name__} lists no blocks (no feature_info): sharded at the root only, so "
                "the whole model is gathered for each forward and backward"
            )
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=ids)
        if cfg.compile:
            train_model = torch.compile(train_model)
        self.train_model = train_model
        self.optimizer = setup_optimizer_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay, cfg.head_lr_mult)
        # GradScaler only for fp16: bf16 has fp32's exponent range, so its gradients do not underflow.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # --- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that continuing this run exactly needs (see checkpoint.py)."""
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "step": self.step,
            "seed": self.cfg.seed,
            "epoch_perm_seed": self.cfg.seed * 1000 + self.epoch,
            "task": type(self.task).__name__,
            "epoch_accum": dict(self.accum),
            # Sharded runs keep the optimiser and EMA state in the checkpoint's shard files (see `save`).
            "optimizer": None if self.sharded else self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None and not self.sharded else None,
            "sharded": {"world_size": self.dist.world_size, "ema": self.ema is not None} if self.sharded else None,
            # Every process draws its own augmentation randomness, so each one's RNG is saved.
            "rng": gather_objects(get_rng_state(), self.dist),
            "world_size": self.dist.world_size,
            "history": self.history.to_list(),
            "best": dict(self.best),
            "finished": self.finished,
            "elapsed_s": self.elapsed(),
            "images_seen": self.images_seen,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` (the weights are loaded separately, into `self.model`).

        Raises:
            ValueError: the state was written by a run of another task (states from before tasks are classification),
                with another `parallel` setting, or without the EMA weights this run needs.
            FileNotFoundError: a sharded (FSDP) state whose shard files are missing.
        """
        task = state.get("task", "ClassificationTask")
        if task != type(self.task).__name__:
            raise ValueError(f"the checkpoint is of a {task} run; this trainer's task is {type(self.task).__name__}")
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self.step = int(state["step"])
        self.accum = dict(state["epoch_accum"])
        sharded = state.get("sharded")
        if bool(sharded) != self.sharded:
            written = "fsdp" if sharded else "ddp"
            raise ValueError(
                f"the checkpoint was written with parallel={written!r}, this run has parallel={self.cfg.parallel!r}: "
                f"resume it with parallel={written!r}"
            )
        if self.ema is not None and not (sharded["ema"] if sharded else state.get("ema") is not None):
            raise ValueError("the checkpoint has no EMA weights but this run has ema: true")
        if sharded:
            self._load_sharded(state)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if len(rng) != self.dist.world_size:
            self.log(
                f"note: the checkpoint was written by {len(rng)} process(es), this run has "
                f"{self.dist.world_size}: data order is unchanged but augmentation randomness will differ"
            )
        set_rng_state(rng[self.dist.rank % len(rng)])
        self.history = History(state["history"])
        self.best = dict(state["best"])
        self.finished = bool(state.get("finished", False))
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        self.images_seen = int(state.get("images_seen", 0))

    def elapsed(self) -> float:
        """Seconds since the run started (over resumes): training, validation, checkpoints and hooks alike."""
        return self._elapsed_before + (time.perf_counter() - self._t_start)

    def train_images_per_s(self) -> float | None:
        """Training throughput of the run so far: images through the training loop (all processes) per second
        spent in it, i.e. the sum of the epochs' `epoch_time_s`. Validation, checkpoint writes and end-of-epoch hooks
        (MAE's reconstruction figures) are not counted. None before the first epoch ends."""
        loop_s = sum(row.get("epoch_time_s") or 0.0 for row in self.history.epochs)
        return self.images_seen / loop_s if loop_s > 0 else None

    # --- checkpoints ------------------------------------------------------------------------------------------
    def _checkpoint_extra(self) -> dict[str, Any]:
        training = {**self.checkpoint_extra.get("training", {}), "epoch": self.epoch, "step": self.step}
        return {**self.checkpoint_extra, "training": training}

    def save(self, name: str = "last", weights: nn.Module | None = None) -> Path | None:
        """Write RUN_DIR/<name> (weights + training state). Every process must call it (RNG states are gathered)."""
        weights = weights or self.model
        if self.sharded:  # the buffers saved (rank 0's) are then every process's
            for module in [self.model] + ([self.ema.module] if self.ema is not None else []):
                broadcast_buffers(module, self.dist)
        # A finite loss can still leave inf/NaN weights behind (e.g. an absurd LR); never let them replace a good
        # checkpoint. Sharded: each process checks its shards and all agree.
        finite = all(bool(torch.isfinite(local_tensor(p)).all()) for p in weights.parameters())
        if self.sharded:
            finite = not all_reduce_max([0.0 if finite else 1.0], self.dist)[0]
        if not finite:
            raise NonFiniteLossError(
                f"the weights became NaN/inf by step {self.step} (epoch {self.epoch + 1}); not saving them over "
                f"RUN_DIR/{name}. Try a lower lr (now {self.cfg.lr:g}), warmup_epochs or clip_grad",
                step=self.step,
                epoch=self.epoch + 1,
            )
        state = self.state_dict()
        if self.sharded:
            return self._save_sharded(name, weights, state)
        if self.run_dir is None or not self.dist.is_main:
            return None
        return write_checkpoint(self.run_dir / name, weights, state, **self._checkpoint_extra())

    def _sharded_state(self) -> dict[str, Any]:
        """Model and optimiser (+ EMA) state as DTensors: each process holds, saves and loads only its shards."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer)
        shards = {"model": model, "optimizer": optimizer}
        if self.ema is not None:
            shards["ema"] = get_model_state_dict(self.ema.module)
        return shards

    def _save_sharded(self, name: str, weights: nn.Module, state: dict[str, Any]) -> Path | None:
        """RUN_DIR/<name> for FSDP: the whole model gathered on rank 0 (a plain model directory that
        `vitkit.load_model` opens) plus the shard files of model, optimiser and EMA that each process writes."""
        import torch.distributed.checkpoint as dcp

        if self.run_dir is None:
            return None
        full = full_state_dict(weights)  # every process sends its shards; rank 0 receives them on the CPU
        staging = None
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=f".{name}.shards.", suffix=".tmp", dir=self.run_dir)
        # The shards are written aside first; rank 0 then moves them into the directory that is swapped in whole,
        # so a kill at any moment still leaves the previous checkpoint or the new one, never a mix of shards.
        staging = Path(broadcast_object(staging, self.dist))
        dcp.save(self._sharded_state(), checkpoint_id=staging)  # returns once every process's shards are written
        if not self.dist.is_main:
            return None
        try:
            return write_checkpoint(
                self.run_dir / name,
                weights,
                state,
                weights_state=full,
                sharded_dir=staging,
                **self._checkpoint_extra(),
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _load_sharded(self, state: dict[str, Any]) -> None:
        """Model, optimiser and EMA shards from the checkpoint `state` was read from (any number of processes)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        directory = state.get("directory")
        if directory is None or not (Path(directory) / SHARDED_METADATA).is_file():
            raise FileNotFoundError(
                f"the FSDP training state has no shard files next to it ({directory}/{SHARDED_METADATA}); read it "
                "with read_training_state(RUN_DIR/'last') from a complete checkpoint"
            )
        shards = self._sharded_state()
        dcp.load(shards, checkpoint_id=directory)  # in place, each process its own shards
        set_state_dict(
            self.model, self.optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"]
        )
        if self.ema is not None:
            set_model_state_dict(self.ema.module, shards["ema"])

    # --- signals ----------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C: stop waiting for the step to finish
            raise KeyboardInterrupt
        self._stop_signal = signum
        self.log(
            f"\nreceived {signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
            "(send it again to abort immediately)"
        )

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # --- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader: Iterable, model: nn.Module | None = None) -> dict[str, Any]:
        """The task's metrics over a loader, summed across processes: for classification
        {"loss" (plain cross-entropy), "acc", "top5" (None with 5 classes or fewer), "n"}.

        Args:
            loader: yields what the task's `eval_batch` takes (classification: (images, labels)).
            model: the model to evaluate (e.g. the EMA copy); default the trained one.
        """
        model = unwrap(model or self.model).to(self.device)
        if is_sharded(model):
            broadcast_buffers(model, self.dist)  # every process evaluates with the statistics that are saved
        was_training = model.training
        model.eval()
        if not self._task_ready:
            self.task.setup(self.model, self.cfg, self.device)
            self._task_ready = True
        # Fixed keys in a fixed order: every process all-reduces the same list, even one whose shard was empty.
        keys = (*self.task.eval_sum_keys, "n")
        sums = dict.fromkeys(keys, 0.0)
        collected: list[Any] = []
        for raw in loader:
            batch = self.task.eval_batch(raw)
            with self._autocast():
                out = self.task.forward(model, batch)
            for k, v in self.task.eval_sums(out, batch).items():
                sums[k] += v
            sums["n"] += self.task.batch_size(batch)
            if self.task.collects:
                collected.extend(self.task.eval_collect(out, batch))
        model.train(was_training)
        totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], self.dist), strict=True))
        if not self.task.collects:
            return self.task.eval_metrics(totals)
        # Metrics that are not sums (mAP): every process gets every process's results, so all compute the same
        # numbers and agree on the best checkpoint and early stopping.
        everything = [r for part in gather_objects(collected, self.dist) for r in part]
        return self.task.eval_metrics(totals, everything)

    # --- training ---------------------------------------------------------------------------------------------
    def _batches(self, loader: Iterable, epoch: int, start: int) -> Iterator[Any]:
        """The loader's batches for `epoch`, from batch `start` on."""
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if hasattr(loader, "iter_from"):
            yield from loader.iter_from(start)
            return
        # A plain loader: replay and discard the consumed batches. Exact only if the loader's order depends on the
        # epoch alone (e.g. a DataLoader with a seeded generator that is re-seeded per epoch).
        for i, batch in enumerate(loader):
            if i >= start:
                yield batch

    def train(
        self,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        n_epochs: int | None = None,
        learning_rate: float | None = None,
        *,
        resume_state: dict[str, Any] | None = None,
    ) -> History:
        """Train for `n_epochs` (default config.epochs) at peak LR `learning_rate` (default config.lr).

        Args:
            train_loader: yields what the task takes (classification: (images, labels)); a loader with set_epoch
                and iter_from (e.g. `BatchLoader`) makes resume exact.
            val_loader: evaluated after every epoch: val_<metric> for each of the task's metrics (classification:
                val_loss, val_acc, val_top5), ema_* too with EMA. Drives the best checkpoint and early stopping;
                without it, best = the final weights.
            n_epochs: overrides config.epochs.
            learning_rate: overrides config.lr.
            resume_state: a training state from `read_training_state(RUN_DIR/'last')`, whose weights the caller has
                already loaded into the model: training continues exactly where it stopped.

        Returns:
            The History (per-epoch dicts in `.epochs`; per-metric lists via `history['val_acc']`).

        Raises:
            ValueError: config.monitor is not one of the task's metrics (checked when there is a val_loader).
            NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
            TrainingInterrupted: SIGINT/SIGTERM; the current step finished and RUN_DIR/last was written.
        """
        changes = {}
        if n_epochs is not None:
            changes["epochs"] = n_epochs
        if learning_rate is not None:
            changes["lr"] = learning_rate
            changes["min_lr"] = min(self.cfg.min_lr, learning_rate)
        if changes:
            self.cfg = self.cfg.replace(**changes)
        cfg = self.cfg
        if val_loader is not None:
            self._check_monitor()
        self._setup_model()

        n_batches = len(train_loader)
        if n_batches == 0:
            raise ValueError("the training loader yields no batches (is the dataset smaller than one batch?)")
        steps_per_epoch = math.ceil(n_batches / cfg.accum_steps)
        self.schedule = WarmupCosine(
            cfg.lr, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr
        )
        self.steps_per_epoch = steps_per_epoch

        # Fresh start or continue: either way the counters below fully describe where we are.
        self.epoch, self.batches_done, self.step = 0, 0, 0
        self.accum = self._zero_accum()
        self.best = {"value": None, "epoch": None, "bad_epochs": 0, "stopped_early": False}
        self.finished = False
        self._elapsed_before, self._t_start, self.images_seen = 0.0, time.perf_counter(), 0
        if resume_state is not None:
            self.load_state_dict(resume_state)
        else:
            seed_everything(cfg.seed + self.dist.rank)  # each process its own augmentation stream
        tb = None
        if cfg.tensorboard and self.run_dir is not None and self.dist.is_main:
            tb = TensorBoardLogger(self.run_dir / "tensorboard", purge_step=self.step if resume_state else None)

        self._stop_signal, self._stop_agreed = None, False
        self._last_plot = -float("inf")
        try:
            with self._signal_handlers():
                self._train_loop(train_loader, val_loader, n_batches, tb)
        finally:
            if tb is not None:
                tb.close()
        return self.history

    def _zero_accum(self) -> dict[str, float]:
        """The epoch's running sums: the loop's (loss, samples, time) and the task's (e.g. correct)."""
        return {"loss_sum": 0.0, **dict.fromkeys(self.task.train_sum_keys, 0.0), "seen": 0.0, "time_s": 0.0}

    def _check_monitor(self) -> None:
        metric = self.cfg.monitor.partition("_")[2]  # val_acc -> acc
        if metric not in self.task.metrics:
            allowed = [f"{p}_{m}" for p in ("val", "ema") for m in self.task.metrics]
            raise ValueError(
                f"monitor={self.cfg.monitor!r} is not a metric of {type(self.task).__name__}, which reports "
                f"{allowed}; set monitor (e.g. to {self.task.monitor!r})"
            )

    def _train_loop(self, train_loader: Iterable, val_loader: Iterable | None, n_batches: int, tb) -> None:
        cfg, model, task = self.cfg, self.train_model, self.task
        model.train()
        self.schedule.apply(self.optimizer, self.step)
        while self.epoch < cfg.epochs and not self.finished:
            epoch = self.epoch
            t_epoch = time.perf_counter()
            bar = self._progress_bar(epoch, n_batches)
            for raw in self._batches(train_loader, epoch, self.batches_done):
                # Micro-batches are grouped into optimiser steps of accum_steps; the last group of an epoch may be
                # shorter, so each loss is divided by its own group's size to keep the gradient a mean.
                in_group = self.batches_done % cfg.accum_steps
                group_size = min(cfg.accum_steps, n_batches - (self.batches_done - in_group))
                last_in_group = in_group == group_size - 1

                batch = task.train_batch(raw)  # fields on the device, augmented and mixed
                # DDP all-reduces gradients in backward; skip that on all but the last micro-batch of a group.
                sync = contextlib.nullcontext() if (last_in_group or not self.dist.enabled) else no_grad_sync(model)
                with sync:
                    with self._autocast():
                        out = task.forward(model, batch)
                    loss = task.loss(out, batch)
                    # Check before backward: a NaN must never reach the weights, and all processes must agree to
                    # stop together (a lone process skipping backward would hang DDP's all-reduce).
                    loss_value = float(loss.detach())
                    flags = [0.0 if math.isfinite(loss_value) else 1.0, 1.0 if self._stop_signal else 0.0]
                    if self.dist.enabled:
                        flags = all_reduce_max(flags, self.dist)
                    if flags[0]:
                        self._non_finite(loss_value, epoch, n_batches)
                    # Act only on the agreed flag: a signal landing after the all-reduce waits for the next one.
                    self._stop_agreed = self._stop_agreed or bool(flags[1])
                    self.scaler.scale(loss / group_size).backward()

                self.batches_done += 1
                n = task.batch_size(batch)
                with torch.no_grad():
                    sums = task.train_sums(out, batch)
                self.accum["loss_sum"] += loss_value * n
                for k in task.train_sum_keys:
                    self.accum[k] += sums[k]
                self.accum["seen"] += n
                self.images_seen += n * self.dist.world_size

                if last_in_group:
                    self._optimizer_step()
                    if self._stop_agreed:
                        self._interrupt(bar, t_epoch)
                    if cfg.ckpt_every_steps and self.step % cfg.ckpt_every_steps == 0:
                        self.accum["time_s"] += time.perf_counter() - t_epoch
                        t_epoch = time.perf_counter()
                        self.save("last")
                    if tb is not None:
                        tb.scalars({"train/loss": loss_value, "train/lr": self.schedule(self.step - 1)}, self.step)
                self._update_bar(bar, t_epoch)
            bar.close()
            self.accum["time_s"] += time.perf_counter() - t_epoch
            self._end_epoch(val_loader, tb)  # writes RUN_DIR/last
            stop = [1.0 if self._stop_signal else 0.0]
            if all_reduce_max(stop, self.dist)[0] and not self.finished:
                self._interrupt(None, None, save=False)
        self.finished = True

    def _optimizer_step(self) -> None:
        cfg = self.cfg
        if cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.schedule.apply(self.optimizer, self.step)  # the LR for the next step: a pure function of the step
        if self.ema is not None:
            self.ema.update(self.model, self.step)

    def _non_finite(self, value: float, epoch: int, n_batches: int) -> None:
        where = f"step {self.step + 1} (epoch {epoch + 1}, batch {self.batches_done + 1} of {n_batches})"
        last = self.run_dir / "last" if self.run_dir is not None else None
        kept = f"the last good checkpoint is {last}" if last and has_checkpoint(last) else "no checkpoint was written"
        raise NonFiniteLossError(
            f"loss is {value} at {where}; stopped before updating the weights ({kept}). "
            f"Try a lower lr (now {self.cfg.lr:g}), warmup_epochs, clip_grad, or amp='none'",
            step=self.step + 1,
            epoch=epoch + 1,
        )

    def _interrupt(self, bar, t_epoch: float | None, save: bool = True) -> None:
        if bar is not None:
            bar.close()
        if t_epoch is not None:
            self.accum["time_s"] += time.perf_counter() - t_epoch
        if save:
            self.save("last")
        signum = self._stop_signal or signal.SIGTERM  # SIGTERM when only another process was signalled
        path = self.run_dir / "last" if self.run_dir is not None else None
        where = f" to {path}" if path else ""
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} after step {self.step}; saved the run{where}. "
            f"Continue it with: vitkit train --resume {self.run_dir}",
            signum=signum,
            step=self.step,
        )

    def _end_epoch(self, val_loader: Iterable | None, tb) -> None:
        cfg, epoch = self.cfg, self.epoch
        time_s = self.accum["time_s"]
        keys = ("loss_sum", *self.task.train_sum_keys, "seen")
        sums = dict(zip(keys, all_reduce_sum([self.accum[k] for k in keys], self.dist), strict=True))
        seen_all = sums["seen"]
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": self.schedule(max(self.step - 1, 0)),
            "train_loss": sums["loss_sum"] / max(seen_all, 1),
            **{f"train_{k}": v for k, v in self.task.train_metrics(sums).items()},
        }
        if val_loader is not None:
            # A metric that does not apply (None, e.g. top-5 of 3 classes) is left out of the row altogether.
            val = self.evaluate(val_loader, self.model)
            row.update({f"val_{k}": v for k, v in val.items() if k != "n" and v is not None})
            if self.ema is not None:
                ema = self.evaluate(val_loader, self.ema.module)
                row.update({f"ema_{k}": v for k, v in ema.items() if k != "n" and v is not None})
        row["epoch_time_s"] = time_s
        row["images_per_s"] = seen_all / time_s if time_s > 0 else None
        row["elapsed_s"] = self.elapsed()
        self.history.append(row)

        # Best checkpoint and early stopping on the monitored metric.
        improved = False
        value = row.get(cfg.monitor)
        if value is not None:
            higher = self.task.higher_is_better(cfg.monitor.partition("_")[2])
            better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
            if self.best["value"] is None or better(value, self.best["value"]):
                self.best.update(value=value, epoch=epoch + 1, bad_epochs=0)
                improved = True
            else:
                self.best["bad_epochs"] += 1
        stop_early = bool(cfg.patience) and self.best["bad_epochs"] >= cfg.patience
        self.best["stopped_early"] = stop_early

        # The state saved describes the start of the next epoch.
        self.epoch, self.batches_done = epoch + 1, 0
        self.accum = self._zero_accum()
        self.finished = stop_early or self.epoch >= cfg.epochs
        if improved:
            self.save("best", self.ema.module if cfg.monitor.startswith("ema_") else self.model)
        self.save("last")
        if self.dist.is_main:
            self._report(row, improved, tb)
            self.task.end_epoch(self.model, epoch + 1, self.run_dir)  # e.g. MAE's reconstruction figures
        if stop_early:
            self.log(
                f"early stopping: {cfg.monitor} has not improved for {cfg.patience} epochs "
                f"(best {self.best['value']:.4f} at epoch {self.best['epoch']})"
            )

    def _report(self, row: dict[str, Any], improved: bool, tb) -> None:
        parts = [f"epoch {row['epoch']}/{self.cfg.epochs}", f"train_loss {row['train_loss']:.4f}"]
        for k in self.task.log_metrics:
            if row.get(k) is not None:
                parts.append(f"{k} {row[k]:.4f}")
        parts.append(f"{row['epoch_time_s']:.1f}s")
        self.log("  ".join(parts) + ("  *best*" if improved else ""))
        if self.run_dir is not None:
            write_metric_files(self.run_dir, self.history)
            # Drawing the figure costs ~1 s on a small CPU, more than a whole epoch of the digits recipe: redraw it
            # at most every PLOT_EVERY_S seconds, and always after the last epoch.
            if self.finished or time.perf_counter() - self._last_plot >= PLOT_EVERY_S:
                from vitkit.train.plots import plot_curves

                plot_curves(self.history, self.run_dir / "curves.png", self.schedule.values(), self.steps_per_epoch)
                self._last_plot = time.perf_counter()
        if tb is not None:
            tb.scalars({f"epoch/{k}": v for k, v in row.items() if k != "epoch"}, self.step)

    # --- progress ---------------------------------------------------------------------------------------------
    def _progress_bar(self, epoch: int, n_batches: int):
        from tqdm import tqdm

        return tqdm(
            total=n_batches,
            initial=self.batches_done,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            unit="batch",
            disable=not (self.cfg.progress and self.dist.is_main),
            dynamic_ncols=True,
            leave=False,
            file=sys.stderr,
            # In a log file (CI, `make run | tee`) every redraw is a new chunk of text: redraw every 10 s there.
            mininterval=0.1 if sys.stderr.isatty() else 10.0,
        )

    def _update_bar(self, bar, t_epoch: float) -> None:
        if bar.disable:
            return
        bar.update(1)
        seen = max(self.accum["seen"], 1)
        dt = self.accum["time_s"] + time.perf_counter() - t_epoch
        bar.set_postfix(
            loss=f"{self.accum['loss_sum'] / seen:.3f}",
            **self.task.progress(self.accum),
            lr=f"{self.schedule(self.step):.2e}",
            img_s=f"{seen * self.dist.world_size / max(dt, 1e-9):.0f}",
            refresh=False,
        )
