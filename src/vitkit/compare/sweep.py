"""`sweep(model, vary, data, out)`: train one model at several settings and measure time and accuracy at each.

    sweep("vit_nano_patch4_32", {"img_size": [16, 24, 32], "pool": ["token", "avg"], "depth": [2, 4, 6]})

A varied key is a training setting when it names a `TrainConfig` field (img_size, lr, batch_size, ...), else an
architecture setting passed to the model (pool, depth, num_heads, embed_dim, patch_size, ...).

Points: one at a time by default (the base point takes the first value of every key; then each other value of
one key with the others at their base value: 1 + sum(n_k - 1) points), or the full grid with `grid=True`
(prod(n_k) points). Each point is a resumable unit: its cost (measured first, for the estimate) and its training.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitkit._io import atomic_write_text
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
    load_splits,
    run_training,
    training_seconds,
)
from vitkit.train.config import TrainConfig

BUDGET_RESERVE = 0.1  # share of a time budget kept for the cost measurements and the report
# Training settings that would make points incomparable or that the sweep itself owns.
NOT_VARIED = ("data", "model", "model_args", "pretrained", "out", "seed", "epochs", "progress", "device", "threads")


def sweep_points(vary: Mapping[str, Sequence[Any]], grid: bool = False) -> list[dict[str, Any]]:
    """The settings of each point: one at a time from the base point (first values), or the full grid.

    Raises:
        ValueError: no keys, a key without values, or a value given twice for one key.
    """
    if not vary:
        raise ValueError("give at least one setting to vary, e.g. depth=2,4,6")
    for k, values in vary.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"setting {k!r} needs a list of values, got {values!r}")
        if len({json.dumps(v) for v in values}) != len(values):
            raise ValueError(f"setting {k!r} has a value given twice: {list(values)}")
    keys = list(vary)
    if grid:
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(vary[k] for k in keys))]
    base = {k: vary[k][0] for k in keys}
    points = [dict(base)]
    for k in keys:
        for v in vary[k][1:]:
            points.append({**base, k: v})
    return points


def _point_name(point: dict[str, Any], base: dict[str, Any] | None) -> str:
    if base is not None:
        changed = {k: v for k, v in point.items() if base[k] != v}
        if not changed:
            return "base"
        point = changed
    return ",".join(f"{k}={v}" for k, v in point.items())


def _split_settings(point: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train = {k: v for k, v in point.items() if k in fields}
    arch = {k: v for k, v in point.items() if k not in fields}
    return train, arch


def sweep(
    model: str,
    vary: Mapping[str, Sequence[Any]],
    data: str = "digits",
    out: str | Path = "sweep",
    *,
    grid: bool = False,
    epochs: int | None = None,
    budget_minutes: float | None = None,
    img_size: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str = "auto",
    train_overrides: dict[str, Any] | None = None,
    model_args: Mapping[str, Any] | None = None,
    log: Log | None = None,
    on_unit: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train `model` at every point of the sweep on the whole training split; write the report.

    Args:
        model: a registered model name.
        vary: setting -> values, e.g. {"img_size": [16, 32], "pool": ["token", "avg"], "depth": [2, 4, 6]}.
        data: any `vitkit.data.load_data` spec.
        out: output directory (report.html, report.md, results.json, figures/, units/, runs/).
        grid: every combination instead of one setting at a time.
        epochs: epochs of every point (default 10, or what `budget_minutes` allows); not both.
        budget_minutes: choose the epochs so the estimated total fits, keeping 10% for the rest.
        img_size, seed, batch_size, device, train_overrides: the recipe shared by every point (see `compare`).
        model_args: architecture settings fixed at every point (e.g. {"embed_dim": 64}), joining any in
            `train_overrides`; a key may not also be varied.
        log: progress messages; stderr by default.
        on_unit: called with a unit's name after it is written.

    Returns:
        The results dict written to OUT/results.json.

    Raises:
        ValueError: a bad setting (named with its point), both epochs and a budget, or an OUT with other settings.
    """
    from vitkit.compare.compare import measure_cost
    from vitkit.threads import set_threads

    say = log or default_log
    (spec,) = check_models([model])
    check_budget(epochs, budget_minutes)
    vary = {str(k): list(v) if isinstance(v, (list, tuple)) else v for k, v in vary.items()}
    bad = [k for k in vary if k in NOT_VARIED]
    if bad:
        raise ValueError(f"{', '.join(bad)} cannot be varied by a sweep (it fixes {', '.join(NOT_VARIED)})")
    fixed = {**((train_overrides or {}).get("model_args") or {}), **(model_args or {})}
    both = sorted(set(fixed) & set(vary))
    if both:
        raise ValueError(f"{', '.join(both)} is both fixed (model_args) and varied; give it in one place")
    points = sweep_points(vary, grid)
    base_point = None if grid else points[0]
    cfg = base_config(
        data,
        {"img_size": img_size, "seed": seed, "batch_size": batch_size, "device": device, **(train_overrides or {})},
    )
    splits = load_splits(cfg)
    cfg = default_img_size(cfg, splits, say)
    # Every point's recipe and model are checked before anything is trained, so a typo fails in seconds.
    configs = []
    for p in points:
        train_set, arch = _split_settings(p)
        try:
            pcfg = cfg.replace(**train_set)
        except (ValueError, TypeError) as e:
            raise ValueError(f"sweep point {_point_name(p, None)}: {e}") from None
        configs.append((pcfg, ModelSpec(spec.name, {**fixed, **arch})))
    store = UnitStore(out)
    t_start = time.perf_counter()
    threads = set_threads(cfg.threads, log=say)
    n_val = len(splits.val)
    for p, (pcfg, pspec) in zip(points, configs, strict=True):
        try:
            build(pspec, pcfg, splits, lambda m: None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"sweep point {_point_name(p, None)} cannot build {spec.name}: {e}") from None
    plan = {
        "kind": "sweep",
        "model": spec.name,
        "vary": vary,
        "model_args": fixed,
        "grid": grid,
        "data": data,
        "recipe": {k: v for k, v in cfg.to_dict().items() if k not in ("epochs", "progress", "threads", "device")},
        "epochs": epochs,
    }
    plan = store.check_plan(plan, keep=("epochs",) if epochs is None else ())
    names = [_point_name(p, base_point) for p in points]
    slugs = [re.sub(r"[^A-Za-z0-9_.=,-]+", "_", n) for n in names]

    costs = []
    for name, slug, (pcfg, pspec) in zip(names, slugs, configs, strict=True):
        unit = f"cost-{slug}"
        if not store.done(unit):
            say(f"[cost] {name}")
            store.write(unit, measure_cost(pspec, pcfg, splits, None, say))
            if on_unit:
                on_unit(unit)
        costs.append(store.read(unit))

    def train_s(i: int, n_epochs: int) -> float:
        c, pcfg = costs[i], configs[i][0]
        n = len(splits.train)
        return training_seconds(c["train_step_s"], c["infer_img_s"], n, n_val, fitted_batch_size(pcfg, n), n_epochs)

    if plan.get("epochs") is None:
        if budget_minutes is not None:
            budget_s = budget_minutes * 60 - (time.perf_counter() - t_start)  # loading and costs are spent
            fixed = sum(train_s(i, 0) for i in range(len(points)))
            per_epoch = sum(train_s(i, 1) for i in range(len(points))) - fixed
            chosen = epochs_for_budget(budget_s, per_epoch, BUDGET_RESERVE * budget_minutes * 60 + fixed)
            say(f"budget {budget_minutes:g} min: {chosen} epochs per point fit it")
        else:
            chosen = 10
        plan["epochs"] = chosen
        store.write_plan(plan)
    n_epochs = int(plan["epochs"])
    est = [train_s(i, n_epochs) for i in range(len(points))]
    say(
        f"estimate: {len(points)} points ({'grid' if grid else 'one setting at a time'}), {n_epochs} epochs each: "
        f"about {format_minutes(sum(est))} (from one measured training step per point)"
    )

    rows = []
    for i, (name, slug, (pcfg, pspec)) in enumerate(zip(names, slugs, configs, strict=True), start=1):
        unit = f"train-{slug}"
        if store.done(unit):
            say(f"[{i}/{len(points)}] {name}: done before, skipped")
        else:
            say(f"[{i}/{len(points)}] {name}: {n_epochs} epochs (estimate {format_minutes(est[i - 1])})")
            _, result = run_training(pspec, pcfg.replace(epochs=n_epochs), splits, splits.train, store.runs / unit, say)
            store.write(unit, result)
            say(f"  test accuracy {result['test_acc']:.4f} after {result['train_time_s']:.0f} s")
            if on_unit:
                on_unit(unit)
        rows.append({"name": name, "settings": points[i - 1], "cost": costs[i - 1], "train": store.read(unit)})

    results = {
        "kind": "sweep",
        "model": spec.name,
        "data": data,
        "vary": vary,
        "grid": grid,
        "epochs": n_epochs,
        "recipe": plan["recipe"],
        "threads": threads.count,
        "split_sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "estimate_s": sum(est),
        "points": rows,
        "wall_s_this_run": time.perf_counter() - t_start,
    }
    write_sweep_report(results, store.out)
    say(f"report: {store.out / 'report.html'}")
    return results


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def _groups(results: dict[str, Any], key: str) -> tuple[list[Any], list[float], list[float]]:
    """For one varied key: its values, and the mean test accuracy and step time of the points having each value
    (one at a time: the base point and the points that vary this key; grid: all points)."""
    vary, rows = results["vary"], results["points"]
    if not results["grid"]:
        base = rows[0]["settings"]
        rows = [r for r in rows if all(r["settings"][k] == base[k] for k in vary if k != key)]
    values = list(vary[key])
    acc, step = [], []
    for v in values:
        sel = [r for r in rows if r["settings"][key] == v]
        acc.append(float(np.mean([r["train"]["test_acc"] or 0.0 for r in sel])) if sel else float("nan"))
        step.append(float(np.mean([r["cost"]["train_step_s"] for r in sel])) if sel else float("nan"))
    return values, acc, step


def write_sweep_report(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Figures (accuracy and step time against each varied setting), report.md, report.html, results.json."""
    from vitkit.compare.report import _html_table, _img_tag, _md_table, _save, write_html

    out = Path(out)
    keys = list(results["vary"])
    from vitkit.viz._common import new_figure

    fig = new_figure(4.2 * len(keys), 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    for ax, key in zip(axes, keys, strict=True):
        values, acc, step = _groups(results, key)
        xs = np.arange(len(values))
        ax.plot(xs, [100 * a for a in acc], "o-", color="C0", label="test accuracy")
        ax.set_xticks(xs, [str(v) for v in values])
        ax.set_xlabel(key)
        ax.set_ylabel("test accuracy (%)", color="C0")
        tw = ax.twinx()
        tw.plot(xs, [1000 * s for s in step], "s--", color="C1", label="training step")
        tw.set_ylabel(f"training step (ms, batch {results['points'][0]['cost']['batch_size']})", color="C1")
        ax.grid(alpha=0.3)
        lines = ax.get_lines() + tw.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7)
    fig.suptitle(
        f"{results['model']} on {results['data']}: "
        + ("mean over the grid per value" if results["grid"] else "one setting varied at a time from the base point")
    )
    fig_path = _save(fig, out / "figures" / "sweep.png")

    header = [*keys, "params", "MMACs/img", "inference img/s", "train step ms", "train time s", "test acc"]
    rows = [
        [str(r["settings"][k]) for k in keys]
        + [
            f"{r['cost']['params'] / 1e6:.2f}M",
            f"{1000 * r['cost']['gmacs']:.1f}",
            f"{r['cost']['infer_img_s']:.0f}",
            f"{1000 * r['cost']['train_step_s']:.0f}",
            f"{r['train']['train_time_s']:.0f}",
            f"{100 * (r['train']['test_acc'] or 0):.1f}%",
        ]
        for r in results["points"]
    ]
    best = max(results["points"], key=lambda r: r["train"]["test_acc"] or 0)
    fastest = min(results["points"], key=lambda r: r["cost"]["train_step_s"])
    summary = (
        f"Most accurate point: {best['name']} ({100 * (best['train']['test_acc'] or 0):.1f}%); cheapest training "
        f"step: {fastest['name']} ({1000 * fastest['cost']['train_step_s']:.0f} ms)."
    )
    results["summary"] = summary
    results["figures"] = {"sweep": str(fig_path.relative_to(out))}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    method = (
        "Each point trains the same recipe for the same epochs on the whole training split; test accuracy of the "
        "checkpoint with the best validation accuracy. Training step: forward + backward + AdamW step at the "
        "training batch, median of 3 after a warm-up; inference img/s likewise under no_grad. Time is measured on "
        "this machine while nothing else of this run is running."
    )
    intro = (
        f"{results['model']} on {results['data']}, {len(rows)} points "
        f"({'full grid' if results['grid'] else 'one setting at a time'}), {results['epochs']} epochs each, "
        f"{results['threads']} CPU threads."
    )
    md = [
        f"# Sweep of {results['model']} on {results['data']}",
        "",
        intro,
        "",
        "## Summary",
        "",
        summary,
        "",
        "## Points",
        "",
        _md_table(header, rows),
        "",
        f"![sweep]({fig_path.relative_to(out)})",
        "",
        "## Method",
        "",
        method,
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(md))
    blocks = [
        ("summary", "Summary", f"<p>{html.escape(summary)}</p>"),
        ("points", "Points", _html_table(header, rows) + _img_tag(fig_path, "sweep")),
        ("methods", "Method", f"<p>{html.escape(method)}</p>"),
    ]
    write_html(out / "report.html", f"Sweep of {results['model']} on {results['data']}", intro, blocks)
    return {"html": out / "report.html", "md": out / "report.md", "json": out / "results.json"}
