"""Every training setting reaches the numbers: each test fails when its setting is silently dropped.

Each test runs the real `Trainer.train` on fixed float batches (taken as ready model inputs, so no augmentation
randomness) and compares what the loop did (the loss it logged, the inputs the model saw, the gradients and LRs in
the optimiser at each step, the EMA weights) with a value computed here independently, by hand, from the initial
weights. The mutation each test was checked against is named in its docstring.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from tests.train.conftest import tiny_model
from vitkit.train import TrainConfig, Trainer

K = 10  # classes
BASE = dict(
    lr=1e-3,
    min_lr=0.0,
    warmup_epochs=0.0,
    weight_decay=0.0,
    label_smoothing=0.0,
    epochs=1,
    progress=False,
)


def _batches(n: int, size: int = 8, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """`n` float batches (ready model inputs) of `size` images with labels; a list is a valid loader."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, K, (size,), generator=g)) for _ in range(n)]


def _model(sharp: bool = False):
    """The tiny ViT; `sharp` scales its head so the initial logits are far from uniform, where a loss with and
    without smoothing or mixed targets would differ by less than a tolerance."""
    torch.manual_seed(0)
    model = tiny_model(num_classes=K)
    if sharp:
        with torch.no_grad():
            model.head.weight.mul_(30.0)
    return model


def _train(model, loader, **cfg):
    trainer = Trainer(model, "cpu", TrainConfig(**{**BASE, **cfg}))
    history = trainer.train(loader)
    return trainer, history


def _smoothed(y: Tensor, eps: float) -> Tensor:
    return torch.full((len(y), K), eps / K).scatter_(1, y[:, None], 1 - eps + eps / K)


def _soft_ce(logits: Tensor, target: Tensor) -> float:
    return float(-(target * logits.double().log_softmax(-1)).sum(-1).mean())


@pytest.fixture
def optimizer_steps():
    """Record, at every optimiser step of the test, each group's LR and each parameter's gradient (before the
    step) and the parameters (after it)."""
    seen = {"lrs": [], "grads": [], "params": []}

    def pre(opt, args, kwargs):
        seen["lrs"].append([(g["lr"], [id(p) for p in g["params"]]) for g in opt.param_groups])
        seen["grads"].append({id(p): p.grad.detach().clone() for g in opt.param_groups for p in g["params"]})

    def post(opt, args, kwargs):
        seen["params"].append({id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]})

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    yield seen
    for h in handles:
        h.remove()


def _inputs_seen(model) -> list[Tensor]:
    """What the model is called with during training (evaluation calls are in eval mode and not recorded)."""
    calls: list[Tensor] = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].detach().clone()) if m.training else None)
    return calls


# ------------------------------------------------------------------------------------------------------------
def test_label_smoothing_reaches_the_loss():
    """Mutation caught: ClassificationTask.loss calling classification_loss with smoothing 0 (or setup not
    copying config.label_smoothing)."""
    [(x, _)] = _batches(1)
    model = _model(sharp=True)
    m0 = copy.deepcopy(model)
    with torch.no_grad():
        logits = m0(x)
    y = logits.argmax(-1)  # labels the model already favours: smoothing them costs a lot of loss
    _, history = _train(model, [(x, y)], label_smoothing=0.3)
    expected = _soft_ce(logits, _smoothed(y, 0.3))
    assert history["train_loss"][0] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - _soft_ce(logits, _smoothed(y, 0.0))) > 1e-2  # smoothing changes this loss visibly


def test_mixup_mixes_inputs_and_smoothed_targets_with_one_lambda():
    """Mutations caught: mixup setting ignored (no Mixup built), targets left unmixed, label smoothing not passed
    to Mixup."""
    [(x, y)] = loader = _batches(1)
    model = _model(sharp=True)
    m0, seen = copy.deepcopy(model), _inputs_seen(model)
    _, history = _train(model, loader, mixup=0.8, cutmix=0.0, mixup_prob=1.0, label_smoothing=0.1)
    [xs] = seen
    # The lambda that mixes x with the flipped batch, recovered from what the model saw.
    d = x - x.flip(0)
    lam = float(((xs - x.flip(0)) * d).sum() / (d * d).sum())
    assert 0.01 < lam < 0.99, f"the model saw unmixed images (lambda {lam})"
    torch.testing.assert_close(xs, lam * x + (1 - lam) * x.flip(0), atol=1e-5, rtol=1e-5)
    t = _smoothed(y, 0.1)
    with torch.no_grad():
        logits = m0(xs)
    assert history["train_loss"][0] == pytest.approx(_soft_ce(logits, lam * t + (1 - lam) * t.flip(0)), rel=1e-5)
    assert abs(_soft_ce(logits, lam * t + (1 - lam) * t.flip(0)) - _soft_ce(logits, t)) > 1e-2
    u = _smoothed(y, 0.0)
    assert (
        abs(_soft_ce(logits, lam * t + (1 - lam) * t.flip(0)) - _soft_ce(logits, lam * u + (1 - lam) * u.flip(0)))
        > 1e-2
    )


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    """Mutation caught: cutmix setting ignored (Mixup built with cutmix_alpha 0, or not built when only cutmix
    is on), targets not weighted by the pasted area."""
    [(x, y)] = loader = _batches(1)
    model = _model(sharp=True)
    m0, seen = copy.deepcopy(model), _inputs_seen(model)
    _, history = _train(model, loader, mixup=0.0, cutmix=1.0, mixup_prob=1.0, label_smoothing=0.0)
    [xs] = seen
    box = (xs != x).any(0).any(0)  # (H, W) pixels that were replaced
    assert box.any(), "no box was pasted"
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    assert int(box.sum()) == len(rows) * len(cols)  # a rectangle
    torch.testing.assert_close(xs[..., box], x.flip(0)[..., box], atol=0, rtol=0)
    torch.testing.assert_close(xs[..., ~box], x[..., ~box], atol=0, rtol=0)
    lam = 1 - float(box.float().mean())
    t = _smoothed(y, 0.0)
    with torch.no_grad():
        logits = m0(xs)
    assert history["train_loss"][0] == pytest.approx(_soft_ce(logits, lam * t + (1 - lam) * t.flip(0)), rel=1e-5)
    assert abs(_soft_ce(logits, lam * t + (1 - lam) * t.flip(0)) - _soft_ce(logits, t)) > 1e-2


def test_gradient_is_clipped_to_the_clip_value_before_each_step(optimizer_steps):
    """Mutation caught: Trainer._optimizer_step skipping clip_grad_norm_."""
    loader = _batches(3)

    def norms() -> list[float]:
        return [float(torch.stack([g.norm() for g in grads.values()]).norm()) for grads in optimizer_steps["grads"]]

    _train(_model(), loader)
    unclipped = norms()
    assert len(unclipped) == 3 and min(unclipped) > 0.1  # so a clip at 0.05 has something to do
    optimizer_steps["grads"].clear()
    _train(_model(), loader, clip_grad=0.05)
    assert norms() == pytest.approx([0.05] * 3, rel=1e-4)


def test_accumulation_gives_the_big_batch_gradient(optimizer_steps):
    """Mutations caught: accum_steps ignored (a step per micro-batch), and the micro-batch loss not divided by
    the group size (twice the gradient)."""
    loader = _batches(2)
    model = _model()
    m0 = copy.deepcopy(model)
    _, history = _train(model, loader, accum_steps=2)
    assert history["step"] == [1] and len(optimizer_steps["grads"]) == 1
    x, y = torch.cat([b[0] for b in loader]), torch.cat([b[1] for b in loader])
    F.cross_entropy(m0(x), y).backward()  # one batch of 16, computed here
    big = {name: p.grad for name, p in m0.named_parameters()}
    got = {name: optimizer_steps["grads"][0][id(p)] for name, p in model.named_parameters()}
    for name in big:
        torch.testing.assert_close(got[name], big[name], atol=1e-6, rtol=1e-4, msg=name)
    m1 = copy.deepcopy(_model())
    F.cross_entropy(m1(loader[0][0]), loader[0][1]).backward()  # what a step on the first micro-batch would see
    assert (got["head.weight"] - m1.head.weight.grad).abs().max() > 1e-3


def test_ema_weights_follow_a_hand_computed_average(optimizer_steps):
    """Mutations caught: ModelEma.update not called after a step, and config.ema_decay ignored (ModelEma built
    with its default 0.999)."""
    model = _model()
    init = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer, _ = _train(model, _batches(5), lr=1e-2, ema=True, ema_decay=0.3)
    ema = {name: t.double() for name, t in init.items()}
    for step, after in enumerate(optimizer_steps["params"], start=1):
        d = min(0.3, (1 + step) / (10 + step))  # the warmed-up decay; 0.3 binds from step 3 on
        for name, p in model.named_parameters():
            ema[name] = d * ema[name] + (1 - d) * after[id(p)].double()
    assert len(optimizer_steps["params"]) == 5
    for name, p in trainer.ema.module.named_parameters():
        torch.testing.assert_close(p.double(), ema[name], atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.allclose(trainer.ema.module.head.weight, model.head.weight, atol=1e-4)


def _layer_id(name: str, depth: int) -> int:
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1  # final norm and head


def test_layer_decay_and_head_lr_mult_give_each_parameter_its_lr(optimizer_steps):
    """Mutations caught: layer_decay or head_lr_mult not passed to setup_optimizer_groups (every LR the same)."""
    model = _model()
    _train(model, _batches(3), lr=1e-3, layer_decay=0.5, head_lr_mult=3.0)
    assert len(optimizer_steps["lrs"]) == 3
    for step, groups in enumerate(optimizer_steps["lrs"]):
        lr_of = {pid: lr for lr, pids in groups for pid in pids}
        base = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / 3))  # cosine over 3 steps, no warmup
        for name, p in model.named_parameters():
            scale = 0.5 ** (2 + 1 - _layer_id(name, depth=2)) * (3.0 if name.startswith("head.") else 1.0)
            assert lr_of[id(p)] == pytest.approx(base * scale, rel=1e-9), (step, name)


def test_warmup_gives_the_linear_then_cosine_lr_in_the_optimiser(optimizer_steps):
    """Mutation caught: warmup_epochs ignored (WarmupCosine built with 0 warmup steps)."""
    _train(_model(), _batches(4), lr=2e-3, min_lr=1e-4, epochs=2, warmup_epochs=1.0)
    lrs = [groups[0][0] for groups in optimizer_steps["lrs"]]  # no layer decay: every group has the base LR
    warmup, total = 4, 8
    expected = [2e-3 * (s + 1) / warmup for s in range(warmup)]
    expected += [
        1e-4 + (2e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        for s in range(warmup, total)
    ]
    assert lrs == pytest.approx(expected, rel=1e-9)
