"""Knowledge distillation as in DeiT (Touvron et al. 2021): the student learns from the labels and from a teacher.

    cfg = TrainConfig(teacher="runs/cnn", distillation="hard", distill_alpha=0.5)
    Trainer(student, config=cfg)                      # builds DistillationTask.from_config(cfg) itself
    Trainer(student, config=cfg.replace(teacher=None), task=DistillationTask(teacher_module))   # a module in hand

Per training batch the teacher (frozen, eval mode, no gradients, not in the optimiser, DDP or the saved weights)
sees the same augmented and mixed images as the student, under the loop's autocast, and the loss is, as in the
reference implementation (facebookresearch/deit, losses.py `DistillationLoss`):

    loss = (1 - alpha) * base(class_logits, target) + alpha * distill(dist_logits, teacher_logits)
    hard:  distill = CE(dist_logits, argmax(teacher_logits))
    soft:  distill = tau^2 / (B * K) * sum KL(softmax(teacher / tau) || softmax(dist / tau))

`base` is the classification loss (label smoothing, or the Mixup/CutMix soft targets). The soft term is summed and
divided by the number of logits B * K (not by B), exactly as the reference does ("the legacy PyTorch behaviour"),
so alpha and tau mean what they mean in DeiT's recipes. A student with a distillation token and head (the
`deit_*_distilled_*` models) uses its class head for `base` and its distillation head for `distill`; any other
classifier distils through its one head (classic knowledge distillation, Hinton et al. 2015). At evaluation the
student's prediction is what its forward returns in eval mode: for a distilled DeiT the mean of the two heads,
as in the reference.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.data.transforms import _resize  # the one resize of vitkit's preprocessing (filter, antialias, clamp)
from vitkit.train.config import TrainConfig
from vitkit.train.losses import classification_loss
from vitkit.train.metrics import topk_correct
from vitkit.train.tasks.base import Batch
from vitkit.train.tasks.classification import ClassificationTask

LogFn = Callable[[str], None]


# ----------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------
def distillation_loss(student: Tensor, teacher: Tensor, kind: str, tau: float = 1.0) -> Tensor:
    """The distillation term of DeiT's loss, in float32.

    Args:
        student: (B, K) the student's distillation logits (its distillation head, or its only head).
        teacher: (B, K) the teacher's logits on the same images.
        kind: "hard" (cross-entropy against the teacher's argmax) or "soft" (KL divergence at temperature tau).
        tau: temperature of the soft term (> 0); unused by "hard".

    Returns:
        A float32 scalar: hard = mean over the batch of CE(student, argmax teacher); soft =
        tau^2 * sum over batch and classes of KL(softmax(teacher / tau) || softmax(student / tau)) / (B * K).

    Raises:
        ValueError: shapes differ, or `kind` / `tau` are not allowed.
    """
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} must both be (B, K)"
        )
    student, teacher = student.float(), teacher.float()
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    if kind == "soft":
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        kl = F.kl_div(
            F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1), reduction="sum", log_target=True
        )
        return kl * (tau * tau) / student.numel()
    raise ValueError(f"kind={kind!r} is not allowed; choose one of 'hard', 'soft'")


class DistillOutput(NamedTuple):
    """What `DistillationTask.forward` returns, all (B, K)."""

    logits: Tensor  # the class head: the base loss; the prediction in eval mode (the two heads' mean for a DeiT)
    dist_logits: Tensor  # the distillation head (the same tensor as `logits` for a student with one head)
    teacher_logits: Tensor  # the teacher's, computed without gradients

    @property
    def prediction(self) -> Tensor:
        """The student's prediction as its eval-mode forward makes it: the mean of its heads."""
        return self.logits if self.dist_logits is self.logits else (self.logits + self.dist_logits) / 2


# ----------------------------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------------------------
def load_teacher(source: str | os.PathLike, *, model_name: str | None = None, log: LogFn | None = None) -> nn.Module:
    """Load a teacher with `vitkit.weights.load_model`: a run or model directory, a timm/torchvision file (with
    `model_name` where the file's layout does not say the architecture, e.g. a CNN), a transformers directory.

    Raises:
        FileNotFoundError: nothing at `source` (a resumed run reloads the teacher its config.yaml names).
        ValueError: the checkpoint cannot be read, or the teacher has no classifier head.
    """
    from vitkit.weights import load_model

    if not os.path.exists(source):
        raise FileNotFoundError(
            f"teacher {str(source)!r} does not exist (a resumed run reloads the teacher named in its config.yaml: "
            "put the same checkpoint back at that path)"
        )
    try:
        teacher = load_model(source, model_name=model_name, log=log)
    except ValueError as e:
        if model_name is not None:
            raise
        # load_model's advice names its own flag (--model); for a teacher it is --teacher-model.
        raise ValueError(
            f"teacher {str(source)!r}: {e} (for a teacher: --teacher-model NAME, teacher_model in a recipe)"
        ) from None
    if not getattr(teacher, "num_classes", 0):
        raise ValueError(f"teacher {str(source)!r} has no classifier head (num_classes=0): it cannot give logits")
    return teacher


def teacher_fingerprint(teacher: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the teacher's state dict: names, dtypes, shapes and bytes.

    Recorded with a run so that resuming with other weights at the same path is refused, not silently inexact.
    """
    h = hashlib.sha256()
    for name, t in teacher.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class TeacherInput(nn.Module):
    """The student's (normalised) batch -> the teacher's input: re-normalised, and resized when the sizes differ.

    Same size: x * std_s / std_t + (mean_s - mean_t) / std_t. Another size: back to 0..1 images, resized with the
    teacher's filter exactly as vitkit's eval preprocessing resizes (antialiased; bicubic clamped to 0..1), then
    normalised for the teacher.
    """

    def __init__(
        self,
        student_mean: tuple[float, ...],
        student_std: tuple[float, ...],
        teacher_mean: tuple[float, ...],
        teacher_std: tuple[float, ...],
        size: tuple[int, int] | None,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        s_mean, s_std = torch.tensor(student_mean), torch.tensor(student_std)
        t_mean, t_std = torch.tensor(teacher_mean), torch.tensor(teacher_std)
        self.renormalise = not (torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std))
        for name, v in (("s_mean", s_mean), ("s_std", s_std), ("t_mean", t_mean), ("t_std", t_std)):
            self.register_buffer(name, v.view(1, -1, 1, 1), persistent=False)  # (1, C, 1, 1)
        self.size = tuple(size) if size is not None else None
        self.interpolation = interpolation

    def forward(self, x: Tensor) -> Tensor:
        if self.size is None or tuple(x.shape[-2:]) == self.size:
            if not self.renormalise:
                return x
            return (x * self.s_std + self.s_mean - self.t_mean) / self.t_std
        x = _resize(x * self.s_std + self.s_mean, self.size, self.interpolation)  # (B, C, h, w) on 0..1
        return (x - self.t_mean) / self.t_std


# ----------------------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------------------
class DistillationTask(ClassificationTask):
    """Classification with a teacher: batches, augmentation, Mixup/CutMix and label smoothing as
    `ClassificationTask`, plus the DeiT distillation term (see the module docstring). The kind, alpha and tau come
    from the recipe (`distillation`, `distill_alpha`, `distill_tau`), as label smoothing does.

    Columns: train_loss (the combined loss), train_acc, train_distill_loss (the distillation term), train_agree;
    evaluation: loss, acc, top5 of the student as its eval forward predicts, agree (share of images where the
    student's and the teacher's top-1 classes agree) and teacher_acc.

    Args:
        teacher: a classifier with the student's classes. It is moved to the training device in float32, put in
            eval mode and frozen; it stays out of the optimiser, DDP, EMA and the checkpoints.
        source: where the teacher came from (recorded with the run; `from_config` sets it).
        train_transform, eval_transform: as for `ClassificationTask`.
        log: receives the notes on how the teacher's input is adapted (default: stderr).
    """

    metrics = ("loss", "acc", "top5", "agree", "teacher_acc")
    train_sum_keys = ("correct", "distill", "agree")
    eval_sum_keys = ("loss", "top1", "top5", "agree", "teacher_top1")
    log_metrics = ("train_acc", "train_distill_loss", "val_loss", "val_acc", "val_agree", "ema_acc")

    def __init__(
        self,
        teacher: nn.Module,
        *,
        source: str | None = None,
        train_transform: nn.Module | None = None,
        eval_transform: nn.Module | None = None,
        log: LogFn | None = None,
    ) -> None:
        super().__init__(train_transform, eval_transform)
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module (load a checkpoint with load_teacher), got {type(teacher)}")
        self.teacher = teacher
        self.source = source
        self.kind, self.alpha, self.tau = "hard", 0.5, 1.0
        self.adaptations: list[str] = []
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self._said = False
        self.fingerprint = teacher_fingerprint(teacher)

    @classmethod
    def from_config(
        cls,
        config: TrainConfig,
        *,
        train_transform: nn.Module | None = None,
        eval_transform: nn.Module | None = None,
        log: LogFn | None = None,
    ) -> DistillationTask:
        """The task a recipe asks for: its `teacher` loaded with `load_teacher`.

        Raises:
            ValueError: the recipe has no teacher or no distillation kind.
        """
        if config.teacher is None or config.distillation == "none":
            raise ValueError(
                f"distillation needs both a teacher and distillation: hard|soft (got teacher={config.teacher!r}, "
                f"distillation={config.distillation!r})"
            )
        say = log or (lambda m: print(m, file=sys.stderr, flush=True))
        teacher = load_teacher(config.teacher, model_name=config.teacher_model, log=lambda m: say(f"teacher: {m}"))
        return cls(
            teacher, source=config.teacher, train_transform=train_transform, eval_transform=eval_transform, log=say
        )

    def describe(self) -> dict[str, Any]:
        """The teacher as a run records it: source, architecture, fingerprint, input size, adaptations."""
        pre = getattr(self.teacher, "preprocess", None)
        return {
            "source": self.source,
            "model": getattr(self.teacher, "model_name", None) or type(self.teacher).__name__,
            "family": getattr(self.teacher, "family", None),
            "num_classes": int(getattr(self.teacher, "num_classes", 0)),
            "input_size": list(pre.input_size) if pre is not None else None,
            "fingerprint": self.fingerprint,
            "adapted": list(self.adaptations),
        }

    # --- wiring ------------------------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        name = self.source or type(self.teacher).__name__
        k_teacher = int(getattr(self.teacher, "num_classes", 0))
        if k_teacher != self.num_classes:
            raise ValueError(
                f"teacher {name!r} has {k_teacher} classes but the student has {self.num_classes}: a teacher must "
                "be trained on the same classes (fine-tune it on this data first, e.g. vitkit train --pretrained)"
            )
        s_pre, t_pre = getattr(model, "preprocess", None), getattr(self.teacher, "preprocess", None)
        s_names = getattr(s_pre, "class_names", None)
        t_names = getattr(t_pre, "class_names", None)
        if s_names and t_names and list(s_names) != list(t_names):
            raise ValueError(
                f"teacher {name!r} has the classes {_short(t_names)} but the student {_short(s_names)}: the logits "
                "would be compared class by class in another order"
            )
        self.adaptations = self._adaptations(s_pre, t_pre)
        if not self._said:
            for note in self.adaptations:
                self._log(f"teacher {name}: {note}")
            self._said = True

    def _adaptations(self, s_pre: Any, t_pre: Any) -> list[str]:
        if s_pre is None or t_pre is None:
            who = "student" if s_pre is None else "teacher"
            return [f"the {who} has no preprocess: the teacher gets the student's batches unchanged"]
        notes = []
        if tuple(s_pre.mean) != tuple(t_pre.mean) or tuple(s_pre.std) != tuple(t_pre.std):
            notes.append(
                f"re-normalising the student's batches from mean {_fmt(s_pre.mean)} std {_fmt(s_pre.std)} to the "
                f"teacher's mean {_fmt(t_pre.mean)} std {_fmt(t_pre.std)}"
            )
        if tuple(s_pre.input_size) != tuple(t_pre.input_size):
            s_size, t_size = "x".join(map(str, s_pre.input_size)), "x".join(map(str, t_pre.input_size))
            notes.append(f"resizing the student's {s_size} batches to the teacher's {t_size} ({t_pre.interpolation})")
        return notes

    def setup(self, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        super().setup(model, config, device)
        if config.distillation == "none":
            raise ValueError("DistillationTask needs distillation: 'hard' or 'soft' in the TrainConfig, got 'none'")
        self.kind, self.alpha, self.tau = config.distillation, config.distill_alpha, config.distill_tau
        # float32 like the student's master weights: autocast then gives both the same compute precision.
        self.teacher = self.teacher.to(device=device, dtype=torch.float32).eval()
        self.teacher.requires_grad_(False)
        s_pre, t_pre = getattr(model, "preprocess", None), getattr(self.teacher, "preprocess", None)
        if s_pre is None or t_pre is None:
            self.teacher_input = nn.Identity()
        else:
            size = tuple(t_pre.input_size) if tuple(t_pre.input_size) != tuple(s_pre.input_size) else None
            self.teacher_input = TeacherInput(s_pre.mean, s_pre.std, t_pre.mean, t_pre.std, size, t_pre.interpolation)
        self.teacher_input = self.teacher_input.to(device)
        # A student with a distillation head returns (class, distillation) logits in training mode from now on;
        # its eval forward (the mean of the two) is unchanged.
        if getattr(model, "head_dist", None) is not None and hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)

    # --- training ----------------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch) -> DistillOutput:
        x = batch["image"]
        out = model(x)
        logits, dist = out if isinstance(out, tuple) else (out, out)
        with torch.no_grad():
            teacher_logits = self.teacher(self.teacher_input(x))
        return DistillOutput(logits, dist, teacher_logits.float())

    def _terms(self, out: DistillOutput, batch: Batch) -> tuple[Tensor, Tensor]:
        base = classification_loss(out.logits, batch["target"], self.label_smoothing)
        return base, distillation_loss(out.dist_logits, out.teacher_logits, self.kind, self.tau)

    def loss(self, out: DistillOutput, batch: Batch) -> Tensor:
        base, distill = self._terms(out, batch)
        return (1 - self.alpha) * base + self.alpha * distill

    def train_sums(self, out: DistillOutput, batch: Batch) -> dict[str, float]:
        pred = out.prediction.argmax(dim=-1)
        distill = distillation_loss(out.dist_logits, out.teacher_logits, self.kind, self.tau)
        return {
            "correct": int((pred == batch["label"]).sum()),  # against the true label even under Mixup, as DeiT
            "distill": float(distill) * len(pred),
            "agree": int((pred == out.teacher_logits.argmax(dim=-1)).sum()),
        }

    def train_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        seen = max(sums["seen"], 1)
        return {"acc": sums["correct"] / seen, "distill_loss": sums["distill"] / seen, "agree": sums["agree"] / seen}

    def progress(self, sums: Mapping[str, float]) -> dict[str, str]:
        seen = max(sums["seen"], 1)
        return {"acc": f"{sums['correct'] / seen:.3f}", "kd": f"{sums['distill'] / seen:.3f}"}

    # --- evaluation --------------------------------------------------------------------------------------------
    def eval_sums(self, out: DistillOutput, batch: Batch) -> dict[str, float]:
        sums = super().eval_sums(out.prediction, batch)
        pred, teacher = out.prediction.argmax(dim=-1), out.teacher_logits.argmax(dim=-1)
        sums["agree"] = int((pred == teacher).sum())
        sums["teacher_top1"] = topk_correct(out.teacher_logits, batch["label"], (1,))[0]
        return sums

    def eval_metrics(self, sums: Mapping[str, float]) -> dict[str, Any]:
        metrics = super().eval_metrics(sums)
        n = sums["n"]
        metrics["agree"] = sums["agree"] / n if n else float("nan")
        metrics["teacher_acc"] = sums["teacher_top1"] / n if n else float("nan")
        return metrics


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def _short(names: list[str], n: int = 6) -> str:
    return "[" + ", ".join(names[:n]) + (", ..." if len(names) > n else "") + "]"
