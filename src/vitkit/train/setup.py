"""What every kind of training run shares (classification, distillation, MAE, segmentation, detection): the run
directory (a new one, or the state to resume it from), the batch fitted to a small split, the saved config.yaml,
the checkpoint's training record, the model a config asks for, and summary.json. `vitkit.train.run` and the
task-specific run bodies (`pretrain`, `seg_run`, `detection_run`) build on these.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from torch import nn

from vitkit._io import atomic_write_text
from vitkit.train.checkpoint import has_checkpoint, read_training_state
from vitkit.train.config import DEFAULT_MODEL, TrainConfig
from vitkit.train.distributed import DistInfo, barrier, broadcast_object

LOCK_FILE = ".vitkit-run.lock"  # in the run directory: held (flock) by the process training into it
_held_locks: dict[str, tuple[int, Path]] = {}  # resolved run directory -> (open lock file, its path) held here


def make_training_record(cfg: TrainConfig, run_dir: str | os.PathLike, threads: int) -> dict:
    """The `training` record a checkpoint carries (read back by `vitkit.runs.training_record`): eval / predict /
    explain rebuild the run's data and its split from it."""
    return {
        "data": cfg.data,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "load_size": cfg.load_size,
        "shapes_size": cfg.shapes_size,
        "run_dir": str(run_dir),
        "threads": threads,
    }


def _data_name(spec: str) -> str:
    kind, _, rest = spec.partition(":")
    if kind in ("cifar10", "cifar100", "mnist", "fashion-mnist", "shapes"):
        return kind
    name = Path(rest if kind in ("folder", "csv") else spec).name or "data"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.removesuffix(".csv"))


def default_run_dir(cfg: TrainConfig, root: str | os.PathLike = "runs") -> Path:
    """runs/<data>-<model>-<YYYYmmdd-HHMMSS>, with a numeric suffix if that already exists."""
    model = cfg.model or (Path(cfg.pretrained).stem if cfg.pretrained else DEFAULT_MODEL)
    base = Path(root) / f"{_data_name(cfg.data)}-{model}-{datetime.now():%Y%m%d-%H%M%S}"
    path, i = base, 2
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def build_model(cfg: TrainConfig, num_classes: int, log: Callable[[str], None]) -> nn.Module:
    """The model a config asks for: a registered architecture from scratch, or a checkpoint to fine-tune."""
    from vitkit.layers.tome import apply_tome
    from vitkit.models import create_model

    if cfg.pretrained:
        if cfg.model_args:
            raise ValueError(f"model_args {cfg.model_args} cannot change the architecture of a pretrained model")
        from vitkit.weights import load_model

        model = load_model(
            cfg.pretrained, model_name=cfg.model, num_classes=num_classes, img_size=cfg.img_size, log=log
        )
        if getattr(model, "num_classes", num_classes) != num_classes:
            raise ValueError(f"loading {cfg.pretrained} gave {model.num_classes} classes, expected {num_classes}")
        apply_tome(model, cfg.tome)
        return model
    from vitkit.models.registry import get_family, model_family

    name = cfg.model or DEFAULT_MODEL
    overrides = dict(cfg.model_args)
    # Token models build their position table for the size; size-agnostic families (CNNs) only record it.
    sized = "img_size" in get_family(model_family(name))[0].__dataclass_fields__
    if cfg.img_size is not None and sized:
        overrides["img_size"] = cfg.img_size
    model = create_model(name, num_classes=num_classes, **overrides)
    if cfg.img_size is not None and not sized:
        model.preprocess.input_size = (cfg.img_size, cfg.img_size)
    apply_tome(model, cfg.tome)  # a runtime setting: the saved model runs unmerged unless asked again
    return model


def resume_state(cfg: TrainConfig, dist: DistInfo, run_dir: Path, say) -> Any:
    """The training state to continue `run_dir` from (None: start it over from its config.yaml), said in the log."""
    last = run_dir / "last"
    if has_checkpoint(last):
        state = read_training_state(last)
        done = int(state["epoch"])
        if state.get("finished") or (done >= cfg.epochs and not state.get("batches_done")):
            why = "stopped early" if (state.get("best") or {}).get("stopped_early") else "all epochs done"
            say(
                f"{run_dir} is already finished ({done} of {cfg.epochs} epochs, {why}): nothing left to train; "
                "re-testing best/ and rewriting summary.json (to train longer, start a new run, e.g. "
                f"--pretrained {run_dir / 'best'})"
            )
        else:
            say(f"resuming {run_dir} from epoch {done + 1}, step {state['step']} ({cfg.epochs} epochs in all)")
        return state
    say(f"{run_dir} has no checkpoint yet: starting it over from its config.yaml")
    if dist.is_main and (run_dir / "tensorboard").exists():
        shutil.rmtree(run_dir / "tensorboard")
    return None


def new_run_dir(cfg: TrainConfig, dist: DistInfo) -> Path:
    """The directory a new run will write (not created yet), refused when it already holds a run."""
    if not cfg.pretrained:
        from vitkit.models.registry import model_family

        model_family(cfg.model or DEFAULT_MODEL)  # an unknown name fails here, before a run directory exists
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    run_dir = Path(broadcast_object(str(run_dir), dist))  # one timestamp for every process
    if has_checkpoint(run_dir / "last") or (run_dir / "config.yaml").exists():
        raise held_elsewhere(run_dir) or _holds_run_error(run_dir)
    return run_dir


def _holds_run_error(run_dir: Path) -> ValueError:
    return ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")


def _lock_error(run_dir: Path, fd: int) -> ValueError:
    """The refusal naming the holder: the PID it wrote into the lock file open as `fd`."""
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    return ValueError(
        f"{run_dir} is in use by another running vitkit process (pid {holder}): wait for it to end or stop it; "
        "to train something else, choose another --out"
    )


def held_elsewhere(run_dir: Path) -> ValueError | None:
    """The refusal naming another process that holds `run_dir`'s lock now (its PID), else None."""
    try:
        import fcntl
    except ImportError:
        return None
    if str(run_dir.resolve()) in _held_locks:
        return None
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _lock_error(run_dir, fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # drops the shared lock if it was taken
    return None


def lock_run_dir(run_dir: Path) -> None:
    """Hold an exclusive lock on RUN_DIR/.vitkit-run.lock until `release_run_dirs` (the end of `vitkit.train.train`)
    or the end of the process, so that a second live process cannot train into the same run directory: two resumes
    of one run, or two new runs given the same --out, would overwrite each other's checkpoints.

    The lock is an advisory `flock`, which the OS drops when the process dies, so a killed run does not leave its
    directory locked. Forked children (DataLoader workers) close their copy at fork, so they do not keep the lock
    alive after their parent. The file keeps the holder's PID for the message and is removed on release; a file
    left by a killed process is simply locked again. Not locked: where `fcntl` is missing (Windows), and on file
    systems without flock support (some NFS/Lustre/FUSE mounts; a warning says so).

    Raises:
        ValueError: Another process holds the lock (its PID named).
    """
    try:
        import fcntl
    except ImportError:
        return
    path = run_dir.resolve() / LOCK_FILE
    key = str(path.parent)
    if key in _held_locks:
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _lock_error(run_dir, fd)
            os.close(fd)
            raise error from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: the file system cannot lock
            os.close(fd)
            warnings.warn(
                f"{run_dir} cannot be locked on this file system ({e}); training without the lock", stacklevel=2
            )
            return
        try:  # the holder before us may have removed the file on release: then ours is a dead inode, retry
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[key] = (fd, path)


def _close_locks_in_child() -> None:
    """After fork, in the child: close its copies of the lock files, so the lock lives as long as the holder only
    (closing a copy does not release the parent's flock; removing the file would)."""
    for fd, _ in _held_locks.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


def release_run_dirs() -> None:
    """Release every run-directory lock this process holds: remove the lock file, then close it (which drops the
    flock)."""
    while _held_locks:
        fd, path = _held_locks.popitem()[1]
        path.unlink(missing_ok=True)
        os.close(fd)


def _agree(dist: DistInfo, step: Callable[[], None]) -> None:
    """Run `step` on rank 0 and raise its ValueError on every process (so no rank waits for a failed rank 0)."""
    if not dist.enabled:
        step()
        return
    error = None
    if dist.is_main:
        try:
            step()
        except ValueError as e:
            error = str(e)
    error = broadcast_object(error, dist)
    if error is not None:
        raise ValueError(error)


def create_run_dir(run_dir: Path, cfg: TrainConfig, dist: DistInfo, notes: Sequence[str] = ()) -> None:
    """A new run's directory: rank 0 creates and locks it and writes config.yaml; every process waits for that.

    Raises:
        ValueError (on every process): Another process holds the directory, or wrote a run into it since
            `new_run_dir` checked.
    """

    def create() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir)
        if (run_dir / "config.yaml").exists():  # another process started a run here in the meantime
            raise _holds_run_error(run_dir)
        atomic_write_text(run_dir / "config.yaml", config_yaml(cfg, notes))

    _agree(dist, create)
    barrier(dist)


def fit_batch_size(cfg: TrainConfig, train_images: int, dist: DistInfo, say) -> tuple[TrainConfig, str | None]:
    """Lower the batch size to the training split when the split is smaller than one batch.

    Training drops the last incomplete batch, so a split smaller than `batch_size` would give no step at all. The
    largest batch that still gives one full batch per epoch is the split itself (rounded down to a multiple of the
    number of processes). Returns the config to train with and the note saying so (None when unchanged).
    """
    if train_images >= cfg.batch_size:
        return cfg, None
    fitted = train_images - train_images % dist.world_size
    if fitted == 0:
        raise ValueError(
            f"the training split has {train_images} image(s), fewer than the {dist.world_size} processes: "
            "add images or lower val_fraction/test_fraction"
        )
    note = (
        f"batch_size lowered from {cfg.batch_size} to {fitted}: the training split has only {train_images} images "
        "(one optimiser step per epoch; set --batch-size to choose a smaller one)"
    )
    say(note)
    return cfg.replace(batch_size=fitted), note


def describe_split_gaps(splits: Any, say) -> None:
    """Say when validation or test is empty, or lacks classes that have too few images to hold one out."""
    for name, ds in (("validation", splits.val), ("test", splits.test)):
        if len(ds) == 0:
            consequence = (
                "no validation metric, so best/ holds the final weights"
                if name == "validation"
                else "no test accuracy will be measured"
            )
            say(
                f"the {name} split is empty (its fraction is 0 or every class is too small to spare one): {consequence}"
            )
            continue
        present = set(ds.labels.unique().tolist())
        missing = [c for i, c in enumerate(splits.class_names) if i not in present]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            say(f"the {name} split has no images of {len(missing)} class(es) with too few images to spare one: {shown}")


def config_yaml(cfg: TrainConfig, notes: Sequence[str] = ()) -> str:
    from vitkit._version import __version__

    return (
        f"# resolved vitkit {__version__} training config; resume with: vitkit train --resume {cfg.out}\n"
        + "".join(f"# {note}\n" for note in notes)
        + cfg.to_yaml()
    )


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    import json

    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")


def fit_and_test(trainer: Any, train_loader: Any, val_loader: Any, test_loader: Any, state: Any, run_dir: Path,
                 summary: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Train (continuing `state`), then evaluate the best checkpoint on `test_loader`; the test metrics ({} without
    a test split).

    An interrupted or failed training writes `summary` with status "interrupted" / "failed", the error, epochs run
    and steps, then re-raises. A run without a validation metric saves its final weights as best/.
    """
    from vitkit._io import resolve_dir
    from vitkit.train.checkpoint import load_weights_into
    from vitkit.train.distributed import barrier
    from vitkit.train.trainer import NonFiniteLossError, TrainingInterrupted, unwrap

    dist = trainer.dist
    try:
        trainer.train(train_loader, val_loader, resume_state=state)
    except (TrainingInterrupted, NonFiniteLossError) as e:
        summary.update(
            status="interrupted" if isinstance(e, TrainingInterrupted) else "failed",
            error=str(e),
            epochs_run=len(trainer.history),
            steps=trainer.step,
        )
        if dist.is_main:
            write_summary(run_dir, summary)
        raise
    if trainer.best.get("epoch") is None:  # no validation metric: the final weights are the best we know
        trainer.save("best")
    barrier(dist)  # multi-node runs need RUN_DIR on a shared filesystem: every process reads best/ here
    load_weights_into(unwrap(trainer.model), resolve_dir(run_dir / "best"), map_location=dist.device)
    return trainer.evaluate(test_loader) if test_loader is not None else {}


def keep_finished_timing(summary: dict[str, Any], state: Any, run_dir: Path) -> None:
    """Resuming a finished run only re-tests best/: keep the timing and batch of the training its summary.json
    describes instead of the re-test's."""
    import json

    if state is None or not state.get("finished") or not (run_dir / "summary.json").is_file():
        return
    before = json.loads((run_dir / "summary.json").read_text())
    for key in ("wall_time_s", "train_time_s", "images_per_s", "batch_size_requested", "batch_size"):
        if key in before:
            summary[key] = before[key]


def start_run(cfg: TrainConfig, dist: DistInfo, resume: Any, say: Callable[[str], None]) -> tuple[Path, Any, Any]:
    """The run directory and the state to continue from (None for a new run, whose directory `cfg.out` then
    names), the intra-op threads (a resumed run keeps the count it recorded: float reductions depend on it), and
    the global seed set for the model's initialisation. Returns (run_dir, state, threads)."""
    from vitkit.runs import training_record
    from vitkit.threads import set_threads
    from vitkit.train.trainer import seed_everything

    if resume is not None:
        run_dir = Path(resume)
        _agree(dist, lambda: lock_run_dir(run_dir))
        state = resume_state(cfg, dist, run_dir, say)
    else:
        run_dir, state = new_run_dir(cfg, dist), None
        cfg.out = str(run_dir)
    recorded = training_record(run_dir / "last").get("threads") if state is not None else None
    threads = set_threads(cfg.threads, recorded=recorded, log=say)
    seed_everything(cfg.seed)  # the model init (split and data order have their own seeded generators)
    return run_dir, state, threads
