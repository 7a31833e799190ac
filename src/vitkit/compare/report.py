"""The report of a comparison or a sweep: figures as PNG, report.md, a self-contained report.html, results.json.

Every number comes from the results dict (`compare` / `sweep`); the "when to use which" paragraph is built from
those numbers by the rules in `recommendations`, each sentence only when its numbers support it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.ticker import NullLocator

from vitkit._io import atomic_path, atomic_write_text

# Differences smaller than this (in accuracy) are called ties by the rules: a few test images on digits.
TIE = 0.01

SECTIONS = (
    ("summary", "When to use which"),
    ("cost", "Size and cost"),
    ("cost-size", "Cost vs image size"),
    ("data-efficiency", "Data efficiency"),
    ("erf", "Effective receptive fields"),
    ("attention-distance", "Mean attention distance"),
    ("probes", "Inductive-bias probes"),
    ("explain", "Where each model looks"),
    ("methods", "How each number is measured"),
)

METHODS_TEXT = {
    "cost": "Parameters: all weights. GMACs: multiply-accumulates of one forward pass of one image, counted by "
    "torch's FlopCounterMode on a meta-device copy with attention on the explicit path. Inference: images/s in "
    "eval mode under no_grad at the training batch, median of 3 timed passes after 1 warm-up. Training step: "
    "forward + cross-entropy + backward + AdamW step at the same batch, median of 3 after 1 warm-up. Peak memory "
    "of the training step: CUDA allocator peak, or on CPU the resident set size sampled every millisecond, above "
    "the level before (an upper bound).",
    "cost-size": "GMACs and measured inference time per image at each image side; slope = least-squares slope of "
    "log(cost) against log(side). A cost linear in the pixel count has slope 2; attention over all patch pairs "
    "pushes it towards 4.",
    "data-efficiency": "Each model trained with the same recipe and the same number of epochs on a class-"
    "stratified fraction of the training split (fixed by the seed); test accuracy of the checkpoint with the best "
    "validation accuracy.",
    "erf": "Effective receptive field (Luo et al. 2016): gradient of the centre unit of a stage's / block's feature "
    "map (all channels summed) with respect to the input, |gradient| summed over colour channels and averaged over "
    "16 held-out images. r50 / r90: radius in pixels of the disc around the map's centre of mass holding 50% / 90% "
    "of its total weight.",
    "attention-distance": "Mean attention distance (ViT paper, Fig. 7): per query patch, the attention-weighted mean "
    "distance in pixels between its centre and every key patch's centre; prefix tokens excluded and each query's "
    "patch weights renormalised; averaged over queries and 64 held-out images; one dot per head. The dashed line is "
    "the distance of a head attending uniformly to every patch.",
    "probes": "Shift consistency: fraction of (image, shift) pairs whose prediction equals the one on the unshifted "
    "image, for the 8 shifts (dy, dx) in {-s, 0, s}^2 of each size s, uncovered pixels black. Occlusion: accuracy "
    "with k random cells of a 4x4 grid blacked out per image. Rotation: accuracy on images rotated by each angle "
    "(multiples of 90 exact, others bilinear with black corners). Same held-out images for every model.",
    "explain": "The same held-out images explained by each model's best method: for attention models the one of "
    "relevance, grad-rollout and rollout with the lowest deletion AUC on these images (most faithful); Grad-CAM for "
    "the others.",
}


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def _new(w: float, h: float):
    from vitkit.viz._common import new_figure

    return new_figure(w, h)


def figure_data_efficiency(results: dict[str, Any], path: Path) -> Path:
    """Test accuracy (%) against training images (log scale), one line per model."""
    fig = _new(6.5, 4.2)
    ax = fig.subplots()
    sizes = results["subset_sizes"]
    for label, r in results["models"].items():
        xs = [sizes[f] for f in r["train"]]
        ys = [100 * (r["train"][f]["test_acc"] or 0) for f in r["train"]]
        ax.plot(xs, ys, "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training images (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"data efficiency, {results['epochs']} epoch(s) per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def figure_cost_vs_size(results: dict[str, Any], path: Path) -> Path:
    """MMACs and measured inference ms per image against the image side (log-log), slopes in the legend."""
    fig = _new(10, 4)
    a1, a2 = fig.subplots(1, 2)
    for label, r in results["models"].items():
        c = r["cost"]["cost_vs_size"]
        if not c["side_px"]:
            continue
        gs = r["cost"]["gmacs_slope"]
        ts = r["cost"]["time_slope"]
        a1.plot(c["side_px"], [1000 * g for g in c["gmacs"]], "o-", label=f"{label} (slope {_num(gs, 2)})")
        a2.plot(c["side_px"], c["infer_ms_per_img"], "o-", label=f"{label} (slope {_num(ts, 2)})")
    sides = sorted({s for r in results["models"].values() for s in r["cost"]["cost_vs_size"]["side_px"]})
    for ax, what in ((a1, "MMACs per image"), (a2, "inference time (ms per image)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sides, [str(s) for s in sides])  # the measured sides, not decade labels
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("image side (px, log scale)")
        ax.set_ylabel(f"{what}, log scale")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    a1.set_title("counted compute vs image size")
    a2.set_title("measured inference time vs image size")
    return _save(fig, path)


def figure_erf(results: dict[str, Any], path: Path) -> Path:
    """ERF maps per model (rows) and depth (columns) on a log scale, and r50 (px) against relative depth."""
    models = results["models"]
    cols = max(len(r["probe"]["erf"]) for r in models.values())
    fig = _new(1.6 * cols + 3.8, 1.7 * len(models) + 0.6)
    grid = fig.add_gridspec(len(models), cols + 1, width_ratios=[1] * cols + [2.2])
    for row, (label, r) in enumerate(models.items()):
        for col, d in enumerate(r["probe"]["erf"]):
            ax = fig.add_subplot(grid[row, col])
            m = np.asarray(d["map"], dtype=np.float32)
            ax.imshow(np.log10(np.maximum(m, 1e-3)), cmap="magma", vmin=-3, vmax=0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{d['index']} (/{d['reduction']})", fontsize=7)
            if col == 0:
                ax.set_ylabel(textwrap.fill(label, 24), fontsize=6)  # long override labels wrap, not overlap
    ax = fig.add_subplot(grid[:, -1])
    for label, r in models.items():
        e = r["probe"]["erf"]
        depth = [(d["index"] + 1) / len(e) for d in e]
        ax.plot(depth, [d["r50_px"] for d in e], "o-", label=f"{label} r50")
    ax.set_xlabel("relative depth (stage or block / total)")
    ax.set_ylabel("ERF radius holding 50% of the mass (px)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12))  # below: curves fill the axes
    fig.suptitle("effective receptive field of the centre unit, log10 |d unit / d input| (title: index, stride)")
    return _save(fig, path)


def figure_attention_distance(results: dict[str, Any], path: Path) -> Path | None:
    """Mean attention distance (px) per head against block, with the uniform-attention line; None without
    attention models."""
    rows = {k: r["probe"]["attention_distance_px"] for k, r in results["models"].items()}
    rows = {k: v for k, v in rows.items() if v is not None}
    if not rows:
        return None
    fig = _new(6.5, 4.2)
    ax = fig.subplots()
    depth = 0
    for i, (label, d) in enumerate(rows.items()):
        d = np.asarray(d)
        L, H = d.shape
        depth = max(depth, L)
        offset = (i - (len(rows) - 1) / 2) * 0.12
        ax.scatter(np.repeat(np.arange(L), H) + offset, d.ravel(), s=14, color=f"C{i}", label=f"{label} ({H} heads)")
        ref = results["models"][label]["probe"].get("attention_distance_uniform_px")
        if ref is not None:
            ax.axhline(ref, color=f"C{i}", ls="--", lw=1, label=f"{label}: uniform attention")
    ax.set_xticks(range(depth))
    ax.set_xlabel("block (depth)")
    ax.set_ylabel("mean attention distance (px)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("mean attention distance per head and block")
    return _save(fig, path)


def figure_probes(results: dict[str, Any], path: Path) -> Path:
    """Shift consistency (%) against shift (px), accuracy (%) against occluded cells and against rotation (deg)."""
    fig = _new(13, 4)
    a1, a2, a3 = fig.subplots(1, 3)
    for label, r in results["models"].items():
        p = r["probe"]
        a1.plot(p["shift"]["shift_px"], [100 * v for v in p["shift"]["consistency"]], "o-", label=label)
        a2.plot(p["occlusion"]["k"], [100 * v for v in p["occlusion"]["accuracy"]], "o-", label=label)
        a3.plot(p["rotation"]["angle_deg"], [100 * v for v in p["rotation"]["accuracy"]], "o-", label=label)
    a1.set_xlabel("shift (px, each of 8 directions)")
    a1.set_ylabel("predictions unchanged (%)")
    a1.set_title("shift consistency")
    a2.set_xlabel("occluded cells of a 4x4 grid")
    a2.set_ylabel("test accuracy (%)")
    a2.set_title("occlusion")
    a3.set_xlabel("rotation (degrees)")
    a3.set_ylabel("test accuracy (%)")
    a3.set_title("rotation")
    for ax in (a1, a2, a3):
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def figure_explain(results: dict[str, Any], images_u8: torch.Tensor, path: Path) -> Path:
    """The images (top row) and each model's saliency over them (one row per model, method in the label)."""
    models = results["models"]
    n = len(images_u8)
    fig = _new(max(1.5 * n + 0.5, 6.0), 1.6 * (len(models) + 1))
    axes = np.asarray(fig.subplots(len(models) + 1, n, squeeze=False))
    first = np.asarray(next(iter(models.values()))["probe"]["explain"]["maps"][0])
    # The images at the maps' (the models' input) size, so image and map share the axes' extent.
    shown = torch.nn.functional.interpolate(images_u8.float(), size=first.shape, mode="nearest").to(torch.uint8)
    for j in range(n):
        img = shown[j].permute(1, 2, 0).numpy()
        axes[0, j].imshow(img)
        for i, (label, r) in enumerate(models.items(), start=1):
            e = r["probe"]["explain"]
            axes[i, j].imshow(img)
            axes[i, j].imshow(np.asarray(e["maps"][j]), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if j == 0:
                axes[i, j].set_ylabel(f"{textwrap.fill(label, 24)}\n{e['method']}", fontsize=6)
    axes[0, 0].set_ylabel("image", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("where each model looks (saliency 0..1 per image, jet colours over the image)", fontsize=9)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Rules: "when to use which"
# ----------------------------------------------------------------------------------------------------------------
def _acc(r: dict[str, Any], f: str) -> float:
    return float(r["train"][f]["test_acc"] or 0.0)


def recommendations(results: dict[str, Any]) -> list[str]:
    """Sentences derived from the measured numbers by fixed rules (a rule says nothing when its data is missing).

    Rules: (1) the most accurate model at the smallest and at the largest fraction, a tie when within 1 point;
    (2) when those winners differ, scarce vs plentiful data; (3) the cheapest model per image (GMACs) and the
    fastest at inference, and the winner's accuracy per GMAC against it; (4) the steepest cost-vs-size slope
    (prefer others for larger images when it exceeds 2.5); (5) the most shift-consistent (mean over the measured shifts) and the most
    rotation-robust models; (6) the model whose accuracy holds best under occlusion. Rules (5) and (6) compare only
    models with at least 50% test accuracy at the largest fraction (a constant predictor is perfectly
    "shift-consistent"); a caution comes first when no model reaches it.
    """
    models = results["models"]
    if not models:
        return []
    fr = [str(f) for f in results["fractions"]]
    sizes = results["subset_sizes"]
    out = []

    def best_at(f: str) -> tuple[str, float, list[str]]:
        accs = {k: _acc(r, f) for k, r in models.items()}
        top = max(accs.values())
        tied = [k for k, v in accs.items() if top - v < TIE]
        return max(accs, key=accs.get), top, tied

    lo_f, hi_f = fr[0], fr[-1]
    top_all = max(_acc(r, hi_f) for r in models.values())
    if top_all < 0.5:
        out.append(
            f"Caution: the best test accuracy is only {100 * top_all:.1f}%, so these models are undertrained and the "
            "robustness probes are not compared; train longer (more epochs or a larger budget) before drawing "
            "conclusions."
        )
    lo_name, lo_acc, lo_tied = best_at(lo_f)
    hi_name, hi_acc, hi_tied = best_at(hi_f)
    if len(models) > 1:
        ends = [(lo_f, lo_name, lo_acc, lo_tied)] + ([(hi_f, hi_name, hi_acc, hi_tied)] if hi_f != lo_f else [])
        for f, name, acc, tied in ends:  # one fraction: one sentence, not the same one twice
            worst = min(models, key=lambda k: _acc(models[k], f))
            if len(tied) > 1:
                out.append(
                    f"With {sizes[f]} training images ({float(f):.0%}), {', '.join(tied)} are within "
                    f"{100 * TIE:.0f} point of each other ({100 * acc:.1f}% best); {worst} is lowest at "
                    f"{100 * _acc(models[worst], f):.1f}%."
                )
            else:
                out.append(
                    f"With {sizes[f]} training images ({float(f):.0%}), {name} is the most accurate "
                    f"({100 * acc:.1f}%, vs {100 * _acc(models[worst], f):.1f}% for {worst})."
                )
        if lo_f != hi_f and lo_name != hi_name and len(lo_tied) == 1 and len(hi_tied) == 1:
            out.append(
                f"So on this data: {lo_name} when labelled data is scarce, {hi_name} when all of it is available."
            )
        elif lo_f != hi_f and lo_name == hi_name and len(lo_tied) == 1 and len(hi_tied) == 1:
            out.append(f"{lo_name} wins at both ends of the data range here.")
    cost = {k: r["cost"] for k, r in models.items()}
    cheap = min(cost, key=lambda k: cost[k]["gmacs"])
    fast = max(cost, key=lambda k: cost[k]["infer_img_s"])
    out.append(
        f"Cheapest per image: {cheap} ({1000 * cost[cheap]['gmacs']:.1f} MMACs); fastest measured inference: {fast} "
        f"({cost[fast]['infer_img_s']:.0f} img/s on {cost[fast]['device']})."
    )
    if len(models) > 1 and hi_name != cheap:
        gain = _acc(models[hi_name], hi_f) - _acc(models[cheap], hi_f)
        ratio = cost[hi_name]["gmacs"] / max(cost[cheap]["gmacs"], 1e-12)
        out.append(
            f"{hi_name} costs {ratio:.1f}x the compute of {cheap} for {100 * gain:+.1f} points of accuracy at "
            f"{float(hi_f):.0%} of the data."
        )
    slopes = {k: c["gmacs_slope"] for k, c in cost.items() if c.get("gmacs_slope") is not None}
    if slopes:
        steep = max(slopes, key=slopes.get)
        flat = min(slopes, key=slopes.get)
        s = f"Compute grows fastest with image size for {steep} (~side^{slopes[steep]:.2f})"
        s += f", slowest for {flat} (~side^{slopes[flat]:.2f})" if flat != steep else ""
        if slopes[steep] > 2.5 and flat != steep:
            s += f": for larger images prefer {flat} or shorten {steep}'s sequence (larger patches)"
        out.append(s + ".")
    # A model that predicts one class for everything is perfectly "shift-consistent": robustness is only compared
    # between models that learned something (at least 50% test accuracy at the largest fraction).
    learned = [k for k, r in models.items() if _acc(r, hi_f) >= 0.5]
    probes = {k: models[k]["probe"] for k in learned}
    left_out = [k for k in models if k not in learned]
    if len(learned) > 1 and left_out:
        out.append(
            f"Robustness below compares only the models above 50% test accuracy; {', '.join(left_out)} "
            f"{'is' if len(left_out) == 1 else 'are'} left out."
        )
    if len(learned) > 1:
        # The mean over every measured shift: the largest alone can equal a ViT's patch size, where a shift moves
        # whole tokens and the ViT looks consistent although it is the least consistent at every smaller shift.
        shift = {k: float(np.mean(p["shift"]["consistency"])) for k, p in probes.items()}
        pxs = probes[next(iter(probes))]["shift"]["shift_px"]
        span = f"{pxs[0]}-{pxs[-1]} px" if len(pxs) > 1 else f"{pxs[0]} px"
        top = max(shift, key=shift.get)
        low = min(shift, key=shift.get)
        if shift[top] - shift[low] >= TIE:
            out.append(
                f"Most shift-consistent over shifts of {span}: {top} ({100 * shift[top]:.1f}% of predictions "
                f"unchanged on average, vs {100 * shift[low]:.1f}% for {low}): choose it when objects are not centred."
            )
        rot = {k: float(np.mean(p["rotation"]["accuracy"][1:])) for k, p in probes.items()}
        top = max(rot, key=rot.get)
        out.append(
            f"Most robust to rotation (mean accuracy over the rotated copies): {top} ({100 * rot[top]:.1f}%)"
            + (" - but no model was trained with rotations, so expect all to drop." if rot[top] < 0.5 else ".")
        )
        occ = {k: p["occlusion"]["accuracy"][-1] for k, p in probes.items()}
        k_max = probes[next(iter(probes))]["occlusion"]["k"][-1]
        top = max(occ, key=occ.get)
        out.append(f"Under occlusion of {k_max} of 16 cells, {top} keeps the most accuracy ({100 * occ[top]:.1f}%).")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tables and documents
# ----------------------------------------------------------------------------------------------------------------
def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def compare_tables(results: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The report's tables as (header, rows of strings), shared by the markdown and the HTML."""
    models = results["models"]
    cost_rows = []
    for label, r in models.items():
        c = r["cost"]
        mem = c["peak_mem_mib"]
        cost_rows.append(
            [
                label,
                f"{c['params'] / 1e6:.2f}M",
                f"{1000 * c['gmacs']:.1f}",
                f"{c['infer_img_s']:.0f}",
                f"{1000 * c['train_step_s']:.0f}",
                "-" if mem is None else f"{mem:.0f}",
                _num(c["gmacs_slope"], 2),
                _num(c["time_slope"], 2),
            ]
        )
    any_c = next(iter(models.values()))["cost"]
    size = "x".join(map(str, any_c["img_size"]))
    cost = (
        [
            "model",
            "params",
            f"MMACs/img at {size}",
            f"inference img/s (batch {any_c['batch_size']})",
            "train step ms",
            "peak train-step memory (MiB)",
            "GMACs slope vs side",
            "time slope vs side",
        ],
        cost_rows,
    )
    fr = [str(f) for f in results["fractions"]]
    eff = (
        ["model"] + [f"{float(f):.0%} ({results['subset_sizes'][f]} img)" for f in fr],
        [[label] + [f"{100 * _acc(r, f):.1f}%" for f in fr] for label, r in models.items()],
    )
    erf_rows = []
    for label, r in models.items():
        e = r["probe"]["erf"]
        erf_rows.append(
            [
                label,
                str(len(e)),
                " / ".join(_num(d["r50_px"], 1) for d in e),
                " / ".join(_num(d["r90_px"], 1) for d in e),
            ]
        )
    erf = (["model", "depths", "r50 per depth (px)", "r90 per depth (px)"], erf_rows)
    mad_rows = []
    for label, r in models.items():
        d = r["probe"]["attention_distance_px"]
        if d is not None:
            d = np.asarray(d)
            ref = r["probe"].get("attention_distance_uniform_px")
            mad_rows.append(
                [label, " / ".join(f"{v:.1f}" for v in d.mean(1)), f"{d.min():.1f}-{d.max():.1f}", _num(ref, 1)]
            )
    mad = (
        ["model", "mean over heads, per block (px)", "range over heads and blocks (px)", "uniform attention (px)"],
        mad_rows,
    )
    probe_rows = []
    for label, r in models.items():
        p = r["probe"]
        probe_rows.append(
            [
                label,
                f"{100 * p['clean_acc']:.1f}%",
                " / ".join(f"{100 * v:.0f}" for v in p["shift"]["consistency"]),
                " / ".join(f"{100 * v:.0f}" for v in p["occlusion"]["accuracy"]),
                " / ".join(f"{100 * v:.0f}" for v in p["rotation"]["accuracy"]),
                p["explain"]["method"],
            ]
        )
    any_p = next(iter(models.values()))["probe"]
    probes = (
        [
            "model",
            f"accuracy ({any_p['n_images']} img)",
            "shift consistency % at " + "/".join(map(str, any_p["shift"]["shift_px"])) + " px",
            "occlusion acc % at k=" + "/".join(map(str, any_p["occlusion"]["k"])),
            "rotation acc % at " + "/".join(f"{a:g}" for a in any_p["rotation"]["angle_deg"]) + " deg",
            "best explanation",
        ],
        probe_rows,
    )
    return {"cost": cost, "data-efficiency": eff, "erf": erf, "attention-distance": mad, "probes": probes}


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;margin:1em 0}
.method{color:#555;font-size:14px}nav a{margin-right:1em}"""


def write_html(path: Path, title: str, intro: str, blocks: list[tuple[str, str, str]]) -> Path:
    """A self-contained HTML page: (section id, heading, inner HTML) blocks, images already inline."""
    nav = "".join(f'<a href="#{sid}">{html.escape(h)}</a>' for sid, h, _ in blocks)
    body = "".join(f'<section id="{sid}"><h2>{html.escape(h)}</h2>{inner}</section>' for sid, h, inner in blocks)
    page = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"
        f"<nav>{nav}</nav>{body}</body></html>"
    )
    atomic_write_text(path, page)
    return path


def write_compare_report(results: dict[str, Any], out: Path, explain_u8: torch.Tensor) -> dict[str, Path]:
    """Write OUT/figures/*.png, OUT/report.md, OUT/report.html and OUT/results.json; returns the paths."""
    out = Path(out)
    figs = out / "figures"
    paths: dict[str, Path | None] = {
        "data-efficiency": figure_data_efficiency(results, figs / "data_efficiency.png"),
        "cost-size": figure_cost_vs_size(results, figs / "cost_vs_size.png"),
        "erf": figure_erf(results, figs / "erf.png"),
        "attention-distance": figure_attention_distance(results, figs / "attention_distance.png"),
        "probes": figure_probes(results, figs / "probes.png"),
        "explain": figure_explain(results, explain_u8, figs / "explain.png"),
    }
    results["recommendations"] = recommendations(results)
    results["figures"] = {k: str(p.relative_to(out)) for k, p in paths.items() if p is not None}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    tables = compare_tables(results)
    intro = (
        f"{len(results['models'])} models on {results['data']} ({results['split_sizes']['train']} train / "
        f"{results['split_sizes']['val']} val / {results['split_sizes']['test']} test images), "
        f"{results['epochs']} epoch(s) per training run, {results['threads']} CPU thread(s), device {results['device']}. "
        "Every number below was measured by this run; results.json holds them all."
    )
    md = [f"# Model comparison on {results['data']}", "", intro, ""]
    blocks = []
    for sid, heading in SECTIONS:
        md_parts, html_parts = [], []
        if sid == "summary":
            md_parts.append("\n".join(f"- {line}" for line in results["recommendations"]))
            html_parts.append(
                "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in results["recommendations"]) + "</ul>"
            )
        elif sid == "methods":
            for k, text in METHODS_TEXT.items():
                md_parts.append(f"- **{k}**: {text}")
            html_parts.append(
                "<ul>" + "".join(f"<li><b>{k}</b>: {html.escape(t)}</li>" for k, t in METHODS_TEXT.items()) + "</ul>"
            )
        if sid in tables and tables[sid][1]:
            md_parts.append(_md_table(*tables[sid]))
            html_parts.append(_html_table(*tables[sid]))
        if sid == "attention-distance" and not tables[sid][1]:
            md_parts.append("No model with global self-attention in this comparison.")
            html_parts.append("<p>No model with global self-attention in this comparison.</p>")
        if sid == "explain":
            methods = [
                f"{k}: {r['probe']['explain']['method']}"
                + (
                    " (deletion AUC "
                    + ", ".join(f"{m} {v:.3f}" for m, v in r["probe"]["explain"]["deletion_auc"].items())
                    + ")"
                    if r["probe"]["explain"]["deletion_auc"]
                    else ""
                )
                for k, r in results["models"].items()
            ]
            md_parts.append("; ".join(methods) + ".")
            html_parts.append(f"<p>{html.escape('; '.join(methods))}.</p>")
        fig = paths.get(sid)
        if fig is not None:
            md_parts.append(f"![{heading}]({fig.relative_to(out)})")
            html_parts.append(_img_tag(fig, heading))
        if sid in METHODS_TEXT:
            md_parts.append(f"*Method:* {METHODS_TEXT[sid]}")
            html_parts.append(f'<p class="method">Method: {html.escape(METHODS_TEXT[sid])}</p>')
        md += [f"## {heading}", "", "\n\n".join(md_parts), ""]
        blocks.append((sid, heading, "".join(html_parts)))
    atomic_write_text(out / "report.md", "\n".join(md))
    write_html(out / "report.html", f"Model comparison on {results['data']}", intro, blocks)
    return {"html": out / "report.html", "md": out / "report.md", "json": out / "results.json"}
