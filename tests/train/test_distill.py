"""DeiT distillation: the loss formulas on hand-computed values, which head gets which term, a frozen teacher in
eval mode that runs in the student's precision, input adaptation, the CLI end to end with a CNN teacher trained
first, an exact resume after SIGKILL (the teacher reloaded from the run's config), and the errors."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn

import vitkit
from tests.train.conftest import SUBPROCESS_ENV, assert_same_bits, toy_dataset, vitkit_cmd, weights
from vitkit.cli import main
from vitkit.models.base import Preprocess
from vitkit.train import BatchLoader, TrainConfig, Trainer
from vitkit.train.checkpoint import read_training_state
from vitkit.train.tasks import DistillationTask, distillation_loss
from vitkit.train.tasks.distillation import DistillOutput, TeacherInput

TINY_DEIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 4}
TINY_CNN = {"depths": [1, 1], "widths": [8, 16], "stem_width": 8}


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


# ----------------------------------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------------------------------
S = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]  # student logits, B=2, K=3
T = [[0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]  # teacher logits: argmax 1 and 2


def test_hard_distillation_is_cross_entropy_against_the_teacher_argmax():
    # -log softmax(s)[argmax t] per row: log(e^2 + 2) - 0 and log(e + 2) - 0, then the mean.
    want = (math.log(math.exp(2) + 2) + math.log(math.e + 2)) / 2
    got = distillation_loss(torch.tensor(S), torch.tensor(T), "hard")
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=1e-6)
    # The teacher's confidence does not matter, only its argmax; tau is unused.
    assert distillation_loss(torch.tensor(S), torch.tensor(T) * 10, "hard", tau=5.0).item() == pytest.approx(want)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_soft_distillation_is_kl_at_tau_times_tau_squared_over_all_logits(tau):
    kl = 0.0
    for s, t in zip(S, T, strict=True):
        ps, pt = _softmax([v / tau for v in s]), _softmax([v / tau for v in t])
        kl += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt, strict=True))
    want = kl * tau**2 / 6  # the reference divides the summed KL by B * K = 6 (not by B = 2)
    got = distillation_loss(torch.tensor(S), torch.tensor(T), "soft", tau=tau)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert distillation_loss(torch.tensor(T), torch.tensor(T), "soft", tau=tau).item() == pytest.approx(0, abs=1e-7)


def test_formula_errors():
    with pytest.raises(ValueError, match=r"kind='medium' is not allowed; choose one of 'hard', 'soft'"):
        distillation_loss(torch.tensor(S), torch.tensor(T), "medium")
    with pytest.raises(ValueError, match=r"student logits \(2, 3\) and teacher logits \(2, 4\)"):
        distillation_loss(torch.tensor(S), torch.zeros(2, 4), "hard")


class LinearTeacher(nn.Module):
    """A stand-in teacher: linear on the mean colour, with a BatchNorm to show it stays in eval mode."""

    def __init__(self, num_classes: int = 4, size: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.bn = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3, num_classes)
        self.preprocess = Preprocess(mean=(0.3,) * 3, std=(0.3,) * 3, input_size=(size, size), crop_fraction=1.0)
        self.seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.dtype, tuple(x.shape)))
        return self.fc(self.bn(x.mean(dim=(2, 3))))


def _student(distilled: bool = True, num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    model = vitkit.create_model(name, num_classes=num_classes, img_size=8, **TINY_DEIT)
    model.preprocess = Preprocess(mean=(0.3,) * 3, std=(0.3,) * 3, input_size=(8, 8), crop_fraction=1.0)
    return model


def _ready_task(model: nn.Module, **cfg) -> DistillationTask:
    torch.manual_seed(1)
    task = DistillationTask(LinearTeacher(model.num_classes), log=lambda m: None)
    task.setup(model, TrainConfig(progress=False, label_smoothing=0.0, **cfg), torch.device("cpu"))
    return task


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_dist_token_student_base_on_class_head_distillation_on_dist_head(alpha):
    model = _student(distilled=True).train()
    task = _ready_task(model, distillation="hard", distill_alpha=alpha)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    out = task.forward(model, {"image": x, "label": y, "target": y})
    assert isinstance(out, DistillOutput) and not torch.equal(out.logits, out.dist_logits)
    cls, dist = model(x)  # the two heads, as the model returns them in distilled training
    assert torch.equal(out.logits, cls) and torch.equal(out.dist_logits, dist)
    teacher_argmax = task.teacher(x).argmax(1)  # same normalisation and size: the teacher sees x as it is
    want = (1 - alpha) * F.cross_entropy(cls, y) + alpha * F.cross_entropy(dist, teacher_argmax)
    loss = task.loss(out, {"image": x, "label": y, "target": y})
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    # Each term reaches only its own head: alpha = 0 leaves head_dist without gradient, alpha = 1 leaves head.
    loss.backward()
    grad = {n: p.grad for n, p in model.named_parameters() if n.startswith(("head.", "head_dist."))}
    head_moved = grad["head.weight"] is not None and grad["head.weight"].abs().sum() > 0
    dist_moved = grad["head_dist.weight"] is not None and grad["head_dist.weight"].abs().sum() > 0
    assert (head_moved, dist_moved) == (alpha < 1, alpha > 0)
    # In eval mode the student's prediction is its forward: the mean of the two heads, as in DeiT.
    model.eval()
    with torch.no_grad():
        ev = task.forward(model, {"image": x, "label": y})
        assert torch.allclose(ev.prediction, (cls + dist).detach() / 2, atol=1e-6)


def test_student_without_dist_token_distils_through_its_class_head():
    model = _student(distilled=False).train()
    task = _ready_task(model, distillation="soft", distill_alpha=0.25, distill_tau=3.0)
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 3])
    out = task.forward(model, {"image": x, "label": y, "target": y})
    assert out.dist_logits is out.logits  # classic knowledge distillation: one head
    logits, t = model(x), task.teacher(x)
    kl = F.kl_div(F.log_softmax(logits / 3, 1), F.log_softmax(t / 3, 1), reduction="sum", log_target=True)
    want = 0.75 * F.cross_entropy(logits, y) + 0.25 * kl * 9 / logits.numel()
    assert task.loss(out, {"target": y}).item() == pytest.approx(want.item(), rel=1e-5)


def test_teacher_input_renormalises_and_resizes_like_preparing_the_image_for_the_teacher():
    u = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8).float() / 255
    s_mean, s_std, t_mean, t_std = (0.1, 0.2, 0.3), (0.5, 0.4, 0.3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    student_batch = (u - torch.tensor(s_mean).view(1, 3, 1, 1)) / torch.tensor(s_std).view(1, 3, 1, 1)
    adapt = TeacherInput(s_mean, s_std, t_mean, t_std, (16, 16), "bilinear")
    resized = F.interpolate(u, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    want = (resized - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    assert torch.allclose(adapt(student_batch), want, atol=1e-5)
    same = TeacherInput(s_mean, s_std, s_mean, s_std, None)
    assert torch.equal(same(student_batch), student_batch)


# ----------------------------------------------------------------------------------------------------------------
# The teacher in the loop
# ----------------------------------------------------------------------------------------------------------------
def test_teacher_stays_frozen_in_eval_out_of_optimizer_and_checkpoint_and_runs_in_student_precision(tmp_path):
    ds = toy_dataset(48, num_classes=4)
    model = _student(distilled=True)
    torch.manual_seed(1)
    teacher = LinearTeacher(4, size=16).train()  # given in train mode and at another size: the task fixes both
    teacher.preprocess.mean = (0.5, 0.5, 0.5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    notes: list[str] = []
    task = DistillationTask(teacher, source="toy", log=notes.append)
    cfg = TrainConfig(
        epochs=2, lr=1e-3, amp="bf16", ema=True, distillation="soft", progress=False, scale=(1.0, 1.0), hflip=0.0
    )
    trainer = Trainer(model, "cpu", cfg, run_dir=tmp_path, task=task)
    history = trainer.train(BatchLoader(ds, 16, shuffle=True, drop_last=True), BatchLoader(ds, 48))

    assert notes == [
        "teacher toy: re-normalising the student's batches from mean (0.300, 0.300, 0.300) std (0.300, 0.300, "
        "0.300) to the teacher's mean (0.500, 0.500, 0.500) std (0.300, 0.300, 0.300)",
        "teacher toy: resizing the student's 8x8 batches to the teacher's 16x16 (bicubic)",
    ]
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert_same_bits(before, teacher.state_dict())  # BatchNorm running stats too: never in train mode
    # Resized to 16x16 for training (16 per batch) and evaluation (48, for the model and for the EMA).
    assert {s for _, s in teacher.seen} == {(16, 3, 16, 16), (48, 3, 16, 16)}
    assert not any(p is q for g in trainer.optimizer.param_groups for p in g["params"] for q in teacher.parameters())
    assert weights(tmp_path / "last").keys() == model.state_dict().keys()  # no teacher.* in the checkpoint
    assert set(history.keys()) >= {"train_distill_loss", "train_agree", "val_agree", "val_teacher_acc", "ema_agree"}
    assert all(0 <= v <= 1 for v in history["val_agree"]) and history["train_distill_loss"][0] > 0


def test_teacher_logits_are_computed_in_the_autocast_dtype():
    model = _student(distilled=True).train()
    task = _ready_task(model, distillation="hard", amp="bf16")
    dtypes = []
    task.teacher.fc.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task.forward(model, {"image": torch.randn(2, 3, 8, 8)})
    assert dtypes == [torch.bfloat16] and out.teacher_logits.dtype == torch.float32  # the loss is in float32


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------
def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"teacher 'toy' has 3 classes but the student has 4"):
        Trainer(
            _student(), "cpu", TrainConfig(distillation="hard"), task=DistillationTask(LinearTeacher(3), source="toy")
        )
    teacher, student = LinearTeacher(4), _student()
    teacher.preprocess.class_names, student.preprocess.class_names = ["a", "b", "c", "d"], ["b", "a", "c", "d"]
    with pytest.raises(ValueError, match=r"classes \[a, b, c, d\] but the student \[b, a, c, d\]"):
        Trainer(student, "cpu", TrainConfig(distillation="hard"), task=DistillationTask(teacher))
    with pytest.raises(ValueError, match=r"teacher='runs/x' needs distillation: 'hard' \(DeiT's best\) or 'soft'"):
        TrainConfig(teacher="runs/x")
    with pytest.raises(ValueError, match=r"distillation='soft' needs a teacher"):
        Trainer(_student(), "cpu", TrainConfig(distillation="soft"))
    with pytest.raises(ValueError, match=r"distill_alpha must be in \[0, 1\], got 1.5"):
        TrainConfig(distill_alpha=1.5)
    with pytest.raises(ValueError, match=r"distill_tau must be > 0, got 0"):
        TrainConfig(distill_tau=0)
    with pytest.raises(ValueError, match=r"distillation='warm' is not allowed"):
        TrainConfig(distillation="warm")
    with pytest.raises(FileNotFoundError, match=r"teacher '.*nowhere' does not exist"):
        Trainer(_student(), "cpu", TrainConfig(teacher=str(tmp_path / "nowhere"), distillation="hard"))


def test_a_registry_architecture_with_local_weights_as_teacher(tmp_path):
    """A timm/torchvision-layout ResNet file says no architecture: teacher_model names it; the input is adapted."""
    torch.manual_seed(0)
    torch.save(vitkit.create_model("resnet18", num_classes=4).state_dict(), tmp_path / "r18.pth")
    cfg = TrainConfig(teacher=str(tmp_path / "r18.pth"), distillation="hard", progress=False)
    with pytest.raises(ValueError, match=r"pass model_name=.*\(for a teacher: --teacher-model NAME"):
        Trainer(_student(), "cpu", cfg)
    notes: list[str] = []
    trainer = Trainer(_student(), "cpu", cfg.replace(teacher_model="resnet18"), log=notes.append)
    assert type(trainer.task).__name__ == "DistillationTask" and trainer.task.teacher.family == "resnet"
    assert notes[-2:] == [
        f"teacher {tmp_path / 'r18.pth'}: re-normalising the student's batches from mean (0.300, 0.300, 0.300) std "
        "(0.300, 0.300, 0.300) to the teacher's mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)",
        f"teacher {tmp_path / 'r18.pth'}: resizing the student's 8x8 batches to the teacher's 224x224 (bilinear)",
    ]


# ----------------------------------------------------------------------------------------------------------------
# End to end from the CLI, and exact resume
# ----------------------------------------------------------------------------------------------------------------
COMMON = ["--data", "digits", "--threads", "1", "--no-progress", "--set", "hflip=0", "--set", "crop_fraction=1.0"]
COMMON += ["--set", "val_fraction=0.1", "--set", "test_fraction=0.7", "--batch-size", "32"]  # 359 train images


@pytest.fixture(scope="module")
def cnn_teacher(tmp_path_factory):
    """A tiny ResNet (6k parameters) trained for a few steps at 16 px on digits: the DeiT setting's CNN teacher."""
    out = tmp_path_factory.mktemp("teacher") / "cnn"
    args = ["train", *COMMON, "--model", "resnet18", "--set", f"model_args={json.dumps(TINY_CNN)}"]
    args += ["--img-size", "16", "--epochs", "1", "--lr", "3e-3", "--warmup-epochs", "0", "--out", str(out)]
    assert main(args) == 0
    return out


def _student_args(teacher, out, *extra: str) -> list[str]:
    return [
        "train", *COMMON, "--model", "deit_tiny_distilled_patch16_224", "--set", f"model_args={json.dumps(TINY_DEIT)}",
        "--img-size", "8", "--epochs", "2", "--lr", "2e-3", "--warmup-epochs", "0.5", "--out", str(out),
        "--teacher", str(teacher), *extra,
    ]  # fmt: skip


def test_cli_end_to_end_with_a_cnn_teacher(cnn_teacher, tmp_path, capsys):
    run = tmp_path / "student"
    assert main(_student_args(cnn_teacher, run, "--distillation", "hard", "--mixup", "0.2")) == 0
    err = capsys.readouterr().err
    assert f"teacher {cnn_teacher}: resizing the student's 8x8 batches to the teacher's 16x16 (bicubic)" in err
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["teacher"], config["distillation"], config["distill_alpha"]) == (str(cnn_teacher), "hard", 0.5)
    summary = json.loads((run / "summary.json").read_text())
    teacher = summary["teacher"]
    assert teacher["family"] == "resnet" and teacher["input_size"] == [16, 16] and len(teacher["fingerprint"]) == 16
    assert teacher["adapted"] == ["resizing the student's 8x8 batches to the teacher's 16x16 (bicubic)"]
    assert 0 <= teacher["test_agree"] <= 1 and 0 <= teacher["test_teacher_acc"] <= 1
    # The teacher's test accuracy on the same test split is the teacher run's own.
    own = json.loads((cnn_teacher / "summary.json").read_text())["test_acc"]
    assert teacher["test_teacher_acc"] == pytest.approx(own, abs=3 / 1258)  # float rounding may flip an image
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["train_distill_loss"] > 0 for r in rows)
    saved = json.loads((run / "best" / "config.json").read_text())
    assert saved["training"]["teacher"]["fingerprint"] == teacher["fingerprint"]
    assert not any(k.startswith(("teacher", "stem", "layer")) for k in weights(run / "best"))  # the student only
    # The saved student is a plain DeiT: loaded elsewhere, its forward is the mean of its two heads.
    student = vitkit.load_model(run / "best").eval()
    assert student.head_dist is not None and not student.distilled_training


def _wait_for_step_checkpoint(proc: subprocess.Popen, state_file, deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while not state_file.exists():
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.002)


def test_resume_after_sigkill_reloads_the_teacher_and_is_bit_exact(cnn_teacher, tmp_path, capsys):
    args = ["--distillation", "soft", "--distill-tau", "2", "--ckpt-every-steps", "5", "--ema", "--mixup", "0.2"]
    run, ref = tmp_path / "run", tmp_path / "ref"
    teacher = tmp_path / "cnn"  # a copy: this test moves and changes it
    shutil.copytree(cnn_teacher, teacher)
    victim = subprocess.Popen(
        vitkit_cmd(*_student_args(teacher, run, *args)),
        env=SUBPROCESS_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_step_checkpoint(victim, run / "last" / "training_state.pt")
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    killed = read_training_state(run / "last")
    assert 0 < killed["step"] < 22 and killed["task"] == "DistillationTask"  # 11 steps per epoch, 2 epochs

    assert main(_student_args(teacher, ref, *args)) == 0
    assert main(["train", "--resume", str(run), "--threads", "1"]) == 0
    assert f"resuming {run} from epoch {killed['epoch'] + 1}, step {killed['step']}" in capsys.readouterr().err
    assert_same_bits(weights(ref / "last"), weights(run / "last"))
    assert_same_bits(weights(ref / "best"), weights(run / "best"))
    assert_same_bits(read_training_state(ref / "last")["ema"], read_training_state(run / "last")["ema"])
    keys = ("train_loss", "train_distill_loss", "val_acc", "val_agree", "ema_acc")
    a, b = (read_training_state(d / "last")["history"] for d in (ref, run))
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]

    # Resume needs the teacher: a missing one is named, one with other weights at the same path is refused.
    teacher.rename(teacher.with_name("moved"))
    try:
        assert main(["train", "--resume", str(run), "--threads", "1"]) == 2
        assert f"teacher '{teacher}' does not exist (a resumed run reloads the teacher" in capsys.readouterr().err
    finally:
        teacher.with_name("moved").rename(teacher)
    changed = {k: v + 1e-3 if v.is_floating_point() else v for k, v in weights(teacher / "best").items()}
    save_file(changed, str(teacher / "best" / "model.safetensors"))
    assert main(["train", "--resume", str(run), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert f"the teacher at {teacher} is not the one {run} was trained with (weights fingerprint" in err
