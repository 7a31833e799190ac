"""`compare(models, data, out)`: train and probe several models on the same data, and write one report.

Units of work (each resumable, see `vitkit.compare.units`):
    cost-<model>            params, GMACs, inference img/s and training step time at the training batch, peak
                            memory of a training step, and GMACs / inference time at several image sizes
    train-<model>-f<frac>   the recipe trained on that fraction of the training split; test accuracy of best/
    probe-<model>           on the model trained on the largest fraction: ERF per depth, mean attention distance,
                            shift consistency, occlusion, rotation, and saliency maps by its best method

The cost units run first: their step times give the up-front estimate (and the epochs of a `budget_minutes` run).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitkit.compare import measure as M
from vitkit.compare.units import (
    Log,
    ModelSpec,
    UnitStore,
    base_config,
    build,
    check_budget,
    check_models,
    default_img_size,
    default_log,
    epochs_for_budget,
    fitted_batch_size,
    format_minutes,
    held_out,
    load_splits,
    load_trained,
    run_training,
    train_subset,
    training_seconds,
)

DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
DEFAULT_COST_SIZES = (32, 48, 64, 96, 128)
BUDGET_RESERVE = 0.15  # share of a time budget kept for evaluation, probes and the report


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    fr = tuple(sorted({float(f) for f in fractions}))
    if not fr:
        raise ValueError("give at least one training fraction, e.g. 0.1,0.25,0.5,1.0")
    bad = [f for f in fr if not 0 < f <= 1]
    if bad:
        raise ValueError(f"training fractions must be in (0, 1], got {bad}")
    return fr


def _frac_tag(f: float) -> str:
    return f"f{f:.3f}".rstrip("0").rstrip(".")


def compare(
    models: Sequence[str | ModelSpec],
    data: str = "digits",
    out: str | Path = "compare",
    *,
    epochs: int | None = None,
    budget_minutes: float | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    img_size: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str = "auto",
    probe_images: int = 200,
    explain_images: int = 6,
    max_shift: int = 4,
    cost_sizes: Sequence[int] = DEFAULT_COST_SIZES,
    train_overrides: dict[str, Any] | None = None,
    log: Log | None = None,
    on_unit: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train every model on every fraction of the same data with the same recipe, probe them, write the report.

    Args:
        models: registered names or `ModelSpec`s (name + architecture overrides).
        data: any `vitkit.data.load_data` spec (digits, shapes, a folder ...).
        out: output directory: report.html, report.md, results.json, figures/*.png, units/, runs/.
        epochs: epochs of every training unit (the same at every fraction, so a smaller fraction also means fewer
            steps). Default: 10, or what `budget_minutes` allows.
        budget_minutes: choose the epochs so the estimated total (measured step times x steps, plus validation)
            fits this many minutes, keeping 15% for probes and the report. Give epochs or a budget, not both.
        fractions: shares of the training split (class-stratified, fixed by `seed`) to train on.
        img_size: training and probe resolution; None = the recipe's (16 px on digits) else each model's own.
        seed: fixes the split, the subsets, the initialisation and the probe images.
        batch_size: training batch (also the batch of the throughput and step-time measurements); None = recipe's.
        device: "auto", "cpu", "cuda" ...
        probe_images: held-out images used by the probes (shift, occlusion, rotation, ERF on the first 16).
        explain_images: held-out images shown explained by every model.
        max_shift: largest translation of the shift probe, in pixels.
        cost_sizes: image sides (px) at which GMACs and inference time are measured for the cost slope.
        train_overrides: any other TrainConfig settings for every unit (e.g. {"lr": 5e-4}).
        log: progress messages; stderr by default.
        on_unit: called with a unit's name after it is written (progress, tests).

    Returns:
        The results dict also written to OUT/results.json.

    Raises:
        ValueError / TypeError: bad models, fractions, settings, or an OUT that holds a run with other settings.
    """
    from vitkit.threads import set_threads

    say = log or default_log
    specs = check_models(models, min_count=1)
    fr = _check_fractions(fractions)
    check_budget(epochs, budget_minutes)
    for name, v in (("probe_images", probe_images), ("explain_images", explain_images), ("max_shift", max_shift)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    sizes = sorted({int(s) for s in cost_sizes})
    if len(sizes) < 2 or sizes[0] < 1:
        raise ValueError(f"cost_sizes needs at least two positive image sides, got {list(cost_sizes)}")
    cfg = base_config(
        data,
        {"img_size": img_size, "seed": seed, "batch_size": batch_size, "device": device, **(train_overrides or {})},
    )
    store = UnitStore(out)
    t_start = time.perf_counter()
    threads = set_threads(cfg.threads, log=say)
    splits = load_splits(cfg)
    say(
        f"data {data}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images, "
        f"{splits.num_classes} classes"
    )
    cfg = default_img_size(cfg, splits, say)
    # Every model is built at the chosen size before anything is written, so a model that cannot take it fails now
    # and the command can be fixed and re-run (a written plan.json would refuse other settings).
    for spec in specs:
        try:
            build(spec, cfg, splits, lambda m: None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"model {spec.label} at img_size {cfg.img_size}: {e}") from None
    plan = {
        "kind": "compare",
        "models": [s.to_dict() for s in specs],
        "data": data,
        "fractions": list(fr),
        "recipe": {k: v for k, v in cfg.to_dict().items() if k not in ("epochs", "progress", "threads", "device")},
        "probe_images": probe_images,
        "explain_images": explain_images,
        "max_shift": max_shift,
        "cost_sizes": sizes,
        "epochs": epochs,
    }
    # A budget run records the epochs it chose; a re-run continues with them (the budget is not re-applied).
    plan = store.check_plan(plan, keep=("epochs",) if epochs is None else ())

    # --- cost units: also the step times of the estimate ------------------------------------------------------
    costs = {}
    for spec in specs:
        unit = f"cost-{spec.slug}"
        if not store.done(unit):
            say(f"[cost] measuring {spec.label}")
            store.write(unit, measure_cost(spec, cfg, splits, sizes, say))
            _notify(on_unit, unit)
        costs[spec.label] = store.read(unit)

    # --- epochs and the up-front estimate ----------------------------------------------------------------------
    n_val = len(splits.val)
    subsets = {f: train_subset(splits.train, f, cfg.seed) for f in fr}

    def train_s(spec: ModelSpec, n_epochs: int) -> float:
        c = costs[spec.label]
        return sum(
            training_seconds(
                c["train_step_s"], c["infer_img_s"], len(ds), n_val, fitted_batch_size(cfg, len(ds)), n_epochs
            )
            for ds in subsets.values()
        )

    probe_s = {s.label: _probe_seconds(costs[s.label], probe_images, max_shift) for s in specs}
    if plan.get("epochs") is None:
        if budget_minutes is not None:
            # What this run has spent already (loading, cost measurements) comes out of the budget.
            budget_s = budget_minutes * 60 - (time.perf_counter() - t_start)
            reserve = max(BUDGET_RESERVE * budget_minutes * 60, sum(probe_s.values()))
            fixed = sum(train_s(s, 0) for s in specs)
            per_epoch = sum(train_s(s, 1) for s in specs) - fixed
            chosen = epochs_for_budget(budget_s, per_epoch, reserve + fixed)
            say(f"budget {budget_minutes:g} min: {chosen} epochs per training unit fit it")
        else:
            chosen = 10
        plan["epochs"] = chosen
        store.write_plan(plan)
    n_epochs = int(plan["epochs"])
    cfg = cfg.replace(epochs=n_epochs)
    est = {s.label: train_s(s, n_epochs) + probe_s[s.label] for s in specs}
    say(
        f"estimate: {len(specs)} models x {len(fr)} fractions, {n_epochs} epoch(s) each: about "
        f"{format_minutes(sum(est.values()))} in all ("
        + ", ".join(f"{k} {format_minutes(v)}" for k, v in est.items())
        + "); from one measured training step per model"
    )

    # --- training units ------------------------------------------------------------------------------------------
    total = len(specs) * len(fr)
    k = 0
    for spec in specs:
        t_model = time.perf_counter()
        for f in fr:
            k += 1
            unit = f"train-{spec.slug}-{_frac_tag(f)}"
            if store.done(unit):
                say(f"[{k}/{total}] {spec.label} on {f:.0%} of the data: done before, skipped")
                continue
            ds = subsets[f]
            say(f"[{k}/{total}] {spec.label} on {f:.0%} of the data ({len(ds)} images), {n_epochs} epoch(s)")
            _, result = run_training(spec, cfg, splits, ds, store.runs / unit, say)
            result["fraction"] = f
            store.write(unit, result)
            say(f"  test accuracy {result['test_acc']:.4f} after {result['train_time_s']:.0f} s")
            _notify(on_unit, unit)
        say(f"{spec.label}: training units done ({time.perf_counter() - t_model:.0f} s this run)")

    # --- probe units -----------------------------------------------------------------------------------------------
    top = fr[-1]
    images_u8, labels, idx = held_out(splits, probe_images, cfg.seed)
    for spec in specs:
        unit = f"probe-{spec.slug}"
        if store.done(unit):
            continue
        say(f"[probe] {spec.label} (trained on {top:.0%} of the data)")
        model = load_trained(spec, cfg, splits, store.runs / f"train-{spec.slug}-{_frac_tag(top)}", say)
        store.write(unit, probe_model(model, images_u8, labels, explain_images, max_shift))
        _notify(on_unit, unit)

    # --- results and report ----------------------------------------------------------------------------------
    results = {
        "kind": "compare",
        "data": data,
        "split_sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "class_names": list(splits.class_names),
        "fractions": list(fr),
        "subset_sizes": {str(f): len(ds) for f, ds in subsets.items()},
        "epochs": n_epochs,
        "recipe": plan["recipe"],
        "threads": threads.count,
        "device": next(iter(costs.values()))["device"],  # resolved ("cpu", "cuda:0"), not "auto"
        "probe_image_indices": idx.tolist(),
        "estimate_s": est,
        "models": {},
    }
    for spec in specs:
        results["models"][spec.label] = {
            "spec": spec.to_dict(),
            "cost": costs[spec.label],
            "train": {str(f): store.read(f"train-{spec.slug}-{_frac_tag(f)}") for f in fr},
            "probe": store.read(f"probe-{spec.slug}"),
        }
    results["wall_s_this_run"] = time.perf_counter() - t_start
    from vitkit.compare.report import write_compare_report

    write_compare_report(results, store.out, images_u8[:explain_images])
    say(
        f"report: {store.out / 'report.html'} ({format_minutes(time.perf_counter() - t_start)} this run; the "
        f"estimate for training and probes was {format_minutes(sum(est.values()))})"
    )
    return results


def _notify(on_unit: Callable[[str], None] | None, unit: str) -> None:
    if on_unit is not None:
        on_unit(unit)


def _probe_seconds(cost: dict[str, Any], n: int, max_shift: int) -> float:
    """Forward passes of the probes (8 shifts per size, 4 occlusions, 6 rotations) at the measured throughput,
    tripled for the gradient passes (ERF, saliency) that are not counted one by one."""
    passes = 8 * max_shift + 4 + 6 + 1
    return 3 * passes * n / max(cost["infer_img_s"], 1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Cost
# ----------------------------------------------------------------------------------------------------------------
def measure_cost(
    spec: ModelSpec, cfg: Any, splits: Any, sizes: Sequence[int] | None, log: Log, repeats: int = 3
) -> dict[str, Any]:
    """Size and cost of a model as trained (untrained weights: cost does not depend on them).

    Inference img/s, training step time and peak memory at the training batch and resolution; GMACs and inference
    time per image at each side in `sizes` (None: the training side and twice it; sides the model cannot take are
    skipped and listed), and the log-log slopes of both against the side.
    """
    from vitkit.train.distributed import resolve_device

    torch.manual_seed(cfg.seed)
    model = build(spec, cfg, splits, log)
    device = resolve_device(cfg.device)
    model = model.to(device)
    size = tuple(model.preprocess.input_size)
    batch = fitted_batch_size(cfg, len(splits.train))
    step_s = M.train_step_time(model, batch, size, splits.num_classes, repeats=repeats)
    # Memory on a second, single step: the first steps of a process also pay one-time allocations (thread pools,
    # kernel caches) that would be charged to whichever model is measured first.
    with M.PeakMemory(device) as mem:
        M.train_step_time(model, batch, size, splits.num_classes, repeats=1, warmup=0)
    infer = M.inference_throughput(model, batch, size, repeats=repeats)
    if sizes is None:
        sizes = (size[0], 2 * size[0])
    per_size: dict[str, list] = {"side_px": [], "gmacs": [], "infer_ms_per_img": []}
    skipped = []
    small_batch = max(1, min(batch, 8))  # large sides cost much more per image; 8 keeps the largest ones short
    for s in sizes:
        try:
            g = M.model_gmacs(model, s)
            t = small_batch / M.inference_throughput(model, small_batch, s, repeats=repeats)
        except ValueError as e:  # a side the architecture refuses (e.g. not a multiple of the patch size)
            skipped.append({"side_px": s, "reason": str(e).splitlines()[0]})
            continue
        per_size["side_px"].append(s)
        per_size["gmacs"].append(g)
        per_size["infer_ms_per_img"].append(1000 * t / small_batch)
    ok = len(per_size["side_px"]) >= 2
    return {
        "label": spec.label,
        "family": getattr(model, "family", None),
        "params": M.count_params(model),
        "img_size": list(size),
        "gmacs": M.model_gmacs(model, size),
        "batch_size": batch,
        "infer_img_s": infer,
        "train_step_s": step_s,
        "train_img_s": batch / step_s,
        "peak_mem_mib": mem.peak_mib,
        "device": str(device),
        "cost_vs_size": per_size,
        "cost_sizes_skipped": skipped,
        "gmacs_slope": M.loglog_slope(per_size["side_px"], per_size["gmacs"]) if ok else None,
        "time_slope": M.loglog_slope(per_size["side_px"], per_size["infer_ms_per_img"]) if ok else None,
        "attention": M.has_global_attention(model),
    }


# ----------------------------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------------------------
ERF_IMAGES = 16  # gradients per depth are costly on CPU; 16 images give smooth maps on digits and shapes
EXPLAIN_CANDIDATES = ("relevance", "grad-rollout", "rollout")  # for global-attention models; CNNs get Grad-CAM


def probe_model(
    model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, explain_images: int, max_shift: int
) -> dict[str, Any]:
    """Every probe of one trained model on the same held-out images (uint8 (B, 3, H, W) and labels)."""
    from vitkit.data.inference import eval_transform

    device = next(model.parameters()).device
    with torch.no_grad():
        x = eval_transform(model)(images_u8.to(device))
    labels = labels.to(device)
    fill = M.black_fill(model).to(device)
    out: dict[str, Any] = {}
    with torch.no_grad():
        pred = torch.cat([model(c).argmax(-1) for c in x.split(256)])
    out["clean_acc"] = float((pred == labels).float().mean())
    out["n_images"] = len(x)

    # Effective receptive field per depth (every feature_info entry).
    erf_x = x[:ERF_IMAGES]
    depths = []
    for i, info in enumerate(model.feature_info):
        m = M.model_erf(model, erf_x, i)
        peak = float(m.max())
        depths.append(
            {
                "index": i,
                "module": info.get("module"),
                "reduction": int(info.get("reduction", 0)),
                "r50_px": M.erf_radius(m, 0.5) if peak > 0 else None,
                "r90_px": M.erf_radius(m, 0.9) if peak > 0 else None,
                "map": np.round((m / max(peak, 1e-12)).cpu().numpy(), 4).tolist(),
            }
        )
    out["erf"] = depths

    if M.has_global_attention(model):
        from vitkit.models.base import token_patch_size
        from vitkit.viz.attention import uniform_attention_distance

        d = M.mean_attention_distance(model, x[:64])
        out["attention_distance_px"] = np.round(d.cpu().numpy(), 4).tolist()  # (layers, heads)
        # What a head attending uniformly to every patch would score: the reference that says "global".
        grid = tuple(model.patch_grid(*x.shape[-2:]))
        out["attention_distance_uniform_px"] = uniform_attention_distance(grid, token_patch_size(model))
    else:
        out["attention_distance_px"] = out["attention_distance_uniform_px"] = None

    out["shift"] = M.shift_consistency(model, x, labels, max_shift=max_shift, mode="pad", fill=fill)
    out["occlusion"] = M.occlusion_accuracy(model, x, labels, ks=(0, 1, 2, 4), grid=4, fill=fill)
    out["rotation"] = M.rotation_accuracy(model, x, labels, angles=(0, 15, 30, 90, 180, 270), fill=fill)
    out["explain"] = explain_best(model, x[:explain_images])
    return out


def explain_best(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Saliency maps of `x` by the model's best method, chosen by measurement.

    Method: for a model with global self-attention and a patch grid, each candidate (relevance, grad-rollout,
    rollout) is scored by the deletion AUC (`vitkit.explain.deletion_auc`: target-class probability as the most
    salient patches are removed first; lower = more faithful) on these images, and the lowest wins. Other models
    (CNNs) use Grad-CAM, the one method that applies to them, on the deepest stage whose map is still at least
    4x4 (on small images the last stage is 1x1, where Grad-CAM is one constant). Maps are upsampled to the image
    size and scaled to [0, 1] per image (a constant map becomes all zeros).
    """
    from vitkit.explain import deletion_auc, explain

    scores: dict[str, float] = {}
    if M.has_global_attention(model) and hasattr(model, "patch_grid"):
        maps_by = {}
        for method in EXPLAIN_CANDIDATES:
            maps_by[method] = explain(model, x, method=method)
            scores[method] = float(deletion_auc(model, x, maps_by[method]).mean())
        method = min(scores, key=scores.get)
        maps = maps_by[method]
    else:
        method = "gradcam"
        side = min(x.shape[-2:])
        stages = [i for i, f in enumerate(model.feature_info) if side // int(f["reduction"]) >= 4]
        maps = explain(model, x, method=method, layer=stages[-1] if stages else 0)
    maps = maps.detach().float().cpu()
    lo = maps.flatten(1).min(1).values[:, None, None]
    hi = maps.flatten(1).max(1).values[:, None, None]
    span = hi - lo
    flat = span <= 1e-6 * torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-12)
    maps = torch.where(flat, torch.zeros_like(maps), (maps - lo) / span.clamp_min(1e-12))
    return {"method": method, "deletion_auc": scores or None, "maps": np.round(maps.numpy(), 3).tolist()}
