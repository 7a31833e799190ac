"""Export a vitkit model to ONNX or `torch.export` with truly dynamic batch, height and width, and check the file.

    export_model(model, "vit.onnx", format="onnx", example_size=(224, 224))
    check_export("vit.onnx", model)     # {(H, W): max |exported - eager|} at 4 sizes; raises when a size fails

What ends up in the file is one plain-tensor forward, images (B, C, H, W) -> logits (B, classes): the model is
wrapped so that no attention-return flag, capture slot or cache keyed by the input size is traced, and the model
code takes its branch-free path while `torch.compiler.is_exporting()` (learned position tables are resampled
inside the graph, so every grid gets the table eager would use). After tracing, the program is run once at a
second size and compared with eager before anything is written, so model code that freezes the size is refused
rather than exported. The size rule (`size_rule`: multiples of the patch, of the network stride for CNNs; for Swin
also a largest side, so that every stage takes the example's window branch) and the preprocessing are written into
the file as metadata (`read_metadata`); the runner (`load_runner`) refuses a size outside the recorded rule.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vitkit._io import atomic_path
from vitkit._validate import check_choice
from vitkit._version import __version__

Format = Literal["onnx", "torch-export"]
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
METADATA_FILE = "vitkit.json"  # the name of the metadata entry in a torch.export archive (`extra_files`)
MIN_OPSET = 18  # Resize with antialias (the position-table resample when shrinking) needs opset 18
ONNX_LIMIT_BYTES = 2**31 - 2**26  # protobuf's 2 GiB file limit, less room for the graph itself
TOLERANCE = 1e-4  # fp32 max |exported - eager| that check_export accepts


class ExportCheckError(RuntimeError):
    """An exported file failed to run, or disagreed with eager beyond the tolerance, at one or more sizes.

    Attributes:
        results: per (H, W), the max |delta| (float) or the error message (str) of the sizes that failed to run.
    """

    def __init__(self, message: str, results: dict[tuple[int, int], float | str]):
        super().__init__(message)
        self.results = results


# ----------------------------------------------------------------------------------------------------------------
# What a model accepts
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SizeRule:
    """The input sides an exported program takes: multiples of `multiple`, at least `min_multiples` of them and at
    most `max_multiples` (None = no largest side)."""

    multiple: int  # pixels
    min_multiples: int
    reason: str  # why, for error messages and docs
    max_multiples: int | None = None

    @property
    def min_size(self) -> int:
        return self.multiple * self.min_multiples

    @property
    def max_size(self) -> int | None:
        return None if self.max_multiples is None else self.multiple * self.max_multiples

    def describe(self) -> str:
        """`multiples of 4 from 116 to 224 (...)`: the rule in words, for messages."""
        to = "" if self.max_size is None else f" to {self.max_size}"
        return f"multiples of {self.multiple} from {self.min_size}{to} ({self.reason})"

    def as_dict(self) -> dict[str, Any]:
        """The rule as JSON-ready values (the `size_rule` metadata entry)."""
        return {"multiple": self.multiple, "min": self.min_size, "max": self.max_size, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SizeRule:
        """The rule back from `as_dict`'s values (an exported file's `size_rule` metadata)."""
        m, hi = d["multiple"], d["max"]
        return cls(m, d["min"] // m, d["reason"], None if hi is None else hi // m)


def size_rule(model: nn.Module, dynamic: bool = True, example_size: int | Sequence[int] | None = None) -> SizeRule:
    """The sides (pixels) every exported input must have, and why. With `dynamic=False` (a one-size file) any size
    the eager model takes at its patch or stride granularity: multiples of the patch (Swin: of its patch), one or
    more. With `dynamic=True`:

    - ViT family (DeiT, hybrids): multiples of the patch (of the backbone stride x patch for hybrids), at least 2
      patches per side: torch.export treats a size of 1 as a constant (its 0/1 specialisation).
    - Local attention in window mode: multiples of patch x window (whole windows, no padding branch); in
      neighbourhood mode at least `window` patches per side (the neighbourhood is never clamped).
    - Swin: multiples of the patch, within the range where every stage takes the window branch it takes at
      `example_size` (None = the native size); see `swin_size_rule`.
    - CNNs: multiples of the network stride (no strided layer floors a size), at least two.

    Raises:
        ValueError: not a vitkit model (no `feature_info`).
    """
    family = getattr(model, "family", None)
    if family == "swin":
        p = model.cfg.patch_size
        return swin_size_rule(model, example_size) if dynamic else SizeRule(p, 1, f"patch size {p}")
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} is not a vitkit model (no feature_info); export takes vitkit models")
    base = int(max(f["reduction"] for f in info))
    if not dynamic:
        return SizeRule(
            base, 1, f"{'network stride' if family in ('resnet', 'resnetv2', 'convnext') else 'patch'} {base}"
        )
    if family in ("resnet", "resnetv2", "convnext"):
        return SizeRule(base, 2, f"network stride {base}")
    from vitkit.layers import LocalAttention

    local = next((m for m in model.modules() if isinstance(m, LocalAttention)), None)
    if local is not None and local.mode == "window":
        m = base * local.window
        return SizeRule(m, 2, f"patch x local window = {base} x {local.window}: whole windows, at least two per side")
    if local is not None:
        n = max(2, local.window)
        return SizeRule(base, n, f"patch size {base}, and {n} patches per side for the {local.window}-neighbourhood")
    return SizeRule(base, 2, f"patch size {base}, at least two patches per side")


def swin_size_rule(model: nn.Module, example_size: int | Sequence[int] | None = None) -> SizeRule:
    """Swin's dynamic-size rule for a program traced at `example_size` (None = the native size).

    A stage whose map has a side at most the window runs as windows of that side without the shift, otherwise
    as shifted `window` x `window` windows (`vitkit.models.swin.window_and_shift`); one graph holds one of the two
    per stage. Stage i's side is ceil(S / (patch * 2^i)) for an input side S, so with k the first stage on the
    one-window branch at the example (k = the stage count when none is), the sides that keep every stage on the
    example's branch are patch * 2^(k-1) * window < S <= patch * 2^k * window (no lower bound when k = 0, no upper
    bound when k = stages), in multiples of the patch and at least two of them. Swin-T at 224 px (window 7, last
    stage 7 x 7 = one window): 116 to 224; window 12 at 384 px: 196 to 384. A non-square example whose sides
    straddle a bound is outside its own rule (`check_export_size` names the side).
    """
    cfg = model.cfg
    p, w, n = cfg.patch_size, cfg.window_size, len(cfg.depths)
    if example_size is None:
        example_size = tuple(model.preprocess.input_size)
    if isinstance(example_size, int) and not isinstance(example_size, bool):
        example_size = (example_size, example_size)
    sides = [-(-int(s) // p) for s in example_size]  # stage 0's map
    k = n
    for i in range(n):
        if min(sides) <= w:
            k = i
            break
        sides = [-(-s // 2) for s in sides]  # patch merging: ceil(side / 2)
    lo = max(2, 2 ** (k - 1) * w + 1) if k > 0 else 2
    hi = 2**k * w if k < n else None
    if k == n:
        why = f"every stage more than window {w} per side: shifted windows"
    else:
        why = f"stage {k}'s side at most window {w}: one window, no shift"
        if k > 0:
            why += f"; stage {k - 1}'s more than {w}: shifted windows"
    return SizeRule(p, lo, f"patch size {p}; {why}", hi)


def size_multiple(model: nn.Module) -> int:
    """`size_rule(model).multiple`: the side multiple (pixels) of every exported input."""
    return size_rule(model).multiple


def check_export_size(model: nn.Module, size: int | Sequence[int], dynamic: bool = True) -> tuple[int, int]:
    """(H, W) if the exported model can take it, else a ValueError naming the side, the value and what is allowed.
    The rule is the one for `size` as the example (it matters for Swin only).

    Raises:
        TypeError: not an int or two ints.
        ValueError: a side that is not a multiple of the model's `size_rule`, below its minimum or above its maximum.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) for s in size):
        raise TypeError(f"size must be an int or (H, W) ints, got {size!r}")
    rule = size_rule(model, dynamic, example_size=size)
    check_size_rule(rule, size, f"cannot be exported for {_name(model)}")
    return int(size[0]), int(size[1])


def check_size_rule(rule: SizeRule, size: Sequence[int], what: str) -> None:
    """Raise a ValueError naming the side of `size` (H, W) that `rule` does not allow, its value and the rule;
    `what` says what cannot happen (`cannot be exported for vit_small_patch16_224`)."""
    m, lo, hi = rule.multiple, rule.min_size, rule.max_size
    for name, side in zip(("height", "width"), size):
        if side < lo or side % m or (hi is not None and side > hi):
            below = (side // m) * m
            if hi is not None and side > hi:
                hint = f"{hi}"
            elif below >= lo and (hi is None or below + m <= hi):
                hint = f"{below} or {below + m}"
            else:
                hint = f"{below}" if below >= lo else f"{lo}"
            raise ValueError(f"image {name} {side} {what}: sides must be {rule.describe()}; try {hint}")


def _name(model: nn.Module) -> str:
    return getattr(model, "model_name", None) or type(model).__name__


def refusal(model: nn.Module, format: str, dynamic: bool) -> str | None:
    """Why `model` cannot be exported with dynamic sizes in `format` (None when it can). Found by the four-size
    parity tests; each is a limit of torch.export or of the ONNX exporter with symbolic sizes, not of the model."""
    if not dynamic:
        return None
    from vitkit.layers import DecomposedRelPosAttention, LocalAttention, SparseAttention

    mods = list(model.modules())
    if any(isinstance(m, DecomposedRelPosAttention) for m in mods):
        return (
            "attn_layer='relpos_decomposed': the einsum of the grid-shaped queries with the per-axis tables leaves a "
            "guard on batch x grid that torch.export freezes at the example size"
        )
    if format == "onnx" and any(isinstance(m, LocalAttention) and m.mode == "neighborhood" for m in mods):
        return (
            "attn_layer='local' with mode='neighborhood' in ONNX: the exporter builds the neighbourhood mask of a "
            "symbolic grid with wrong shapes (onnxruntime fails in its And/Expand at every size); torch-export works"
        )
    if format == "onnx" and any(isinstance(m, SparseAttention) and m.stride is None for m in mods):
        return (
            "attn_layer='sparse' with stride=None (the grid width) in ONNX: the exporter cannot translate a remainder "
            "by a symbolic size; give attn_args stride=N, or use torch-export"
        )
    return None


def check_exportable(model: nn.Module, dynamic: bool = True, format: str = "onnx") -> None:
    """Refuse what cannot become a dynamic-size program before tracing it: token merging (data-dependent matching,
    a token count that changes per block) and the cases of `refusal`, each named with the reason. Model code that
    freezes the size is caught after tracing (`export_model` runs the program at a second size).

    Raises:
        ValueError: naming the model, the setting and why.
    """
    why = refusal(model, format, dynamic)
    if why is not None:
        kind = getattr(model.cfg, "attn_layer", "")
        raise ValueError(
            f"{_name(model)} ({kind}) cannot be exported to {format} with dynamic height and width: {why}. Export "
            "with dynamic=False (--static on the command line): a file for the example size, any batch"
        )
    if any(getattr(model, "tome_r", []) or []):
        raise ValueError(
            f"{_name(model)} has token merging on (set_tome); its matching is data-dependent (argsort of "
            "similarities) and the token count changes per block: call set_tome(0) before exporting"
        )


def load_export_source(src: str | os.PathLike, log: Callable[[str], None] | None = None) -> nn.Module:
    """The model to export: a registered name (`vitkit.list_models()`, randomly initialised, with the name's
    preprocessing) when `src` is one and no such path exists, else anything `vitkit.weights.load_model` reads (a
    run directory, a checkpoint directory, a foreign checkpoint file)."""
    from vitkit.models.registry import create_model, list_models
    from vitkit.weights import load_model

    if str(src) in list_models() and not Path(src).exists():
        if log is not None:
            log(f"{src} is a registered name: exporting it with random weights (give a checkpoint for trained ones)")
        return create_model(str(src)).eval()
    return load_model(src, log=log).eval()


# ----------------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------------
def export_metadata(
    model: nn.Module, fmt: str, example_size: tuple[int, int], batch: int | None, dynamic: bool
) -> dict[str, Any]:
    """What a runtime needs besides the graph: the preprocessing, the size rule, names. Every value is JSON."""
    pre = model.preprocess
    rule = size_rule(model, dynamic, example_size=example_size)
    return {
        "model_name": _name(model),
        "family": getattr(model, "family", None),
        "vitkit_version": __version__,
        "format": fmt,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "layout": "NCHW float32, normalised: (pixels / 255 - mean) / std",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "img_size": list(pre.input_size),
        "interpolation": pre.interpolation,
        "crop_fraction": pre.crop_fraction,
        "load_size": pre.load_size,
        "class_names": pre.class_names,
        "num_classes": int(model.num_classes),
        "example_size": list(example_size),
        "patch_multiple": rule.multiple,
        "min_size": rule.min_size if dynamic else None,
        "max_size": rule.max_size if dynamic else None,
        "size_rule": rule.as_dict() if dynamic else None,
        "dynamic_size": dynamic,
        "batch": batch,
    }


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata `export_model` wrote into an .onnx file (`metadata_props`) or a torch.export archive
    (`extra_files`), decoded from JSON.

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: a file that is neither, or one without vitkit metadata.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no exported model at {path}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == METADATA_FILE]
            if not names:
                raise ValueError(f"{path} is a torch.export archive without vitkit metadata ({METADATA_FILE})")
            return json.loads(z.read(names[0]).decode("utf-8"))
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises several types for a file that is not a model
        raise ValueError(f"{path} is neither an ONNX model nor a torch.export archive ({e})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if "vitkit_version" not in props:
        raise ValueError(f"{path} is an ONNX model without vitkit metadata")
    return {k: json.loads(v) for k, v in props.items()}


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------
class ExportForward(nn.Module):
    """The model as exporters should see it: images -> logits, nothing else. `forward(x)` calls the model's plain
    forward (no `return_attention` argument is ever traced), so the graph has one tensor input and one output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


@dataclass
class ExportResult:
    """What `export_model` wrote: the path, the metadata and the seconds the export took."""

    path: Path
    metadata: dict[str, Any]
    seconds: float


def export_model(
    model: nn.Module,
    out: str | os.PathLike,
    format: Format = "onnx",
    example_size: int | Sequence[int] | None = None,
    batch: int | None = None,
    opset: int | None = None,
    dynamic: bool = True,
) -> ExportResult:
    """Export `model` (eval mode, fp32, CPU) to an ONNX file or a torch.export archive (`.pt2`).

    Args:
        model: a vitkit model; it is put in eval mode.
        out: the file to write, atomically: a failed export leaves no partial file and keeps an existing one.
        format: "onnx" (run with onnxruntime) or "torch-export" (`torch.export.load(out).module()`).
        example_size: (H, W) or a side, the size traced; None = the model's native size. Must follow
            `size_rule(model, dynamic)`.
        batch: None = any batch size (dynamic); an int fixes the batch.
        opset: ONNX opset (>= 18); None = the exporter's default. Only for format="onnx".
        dynamic: True = any height and width of the size rule; False = the example size only (a one-size file,
            for runtimes that want static shapes).

    Returns:
        The path written, its metadata (also stored in the file, see `read_metadata`) and the export seconds.

    Raises:
        ValueError: an unknown format, a size the model cannot take, an opset below 18, a batch < 1, an opset for
            torch-export, a model that cannot be exported with dynamic sizes (token merging on, or a traced program
            that does not run or agree with eager at a second size: named, with the reason), or an ONNX model over
            protobuf's 2 GiB. Nothing is written then.
        TypeError: sizes, batch or opset that are not ints.
    """
    check_choice("format", format, Format)
    check_exportable(model, dynamic, format)
    if example_size is None:
        example_size = tuple(model.preprocess.input_size)
    size = check_export_size(model, example_size, dynamic)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch={batch!r} is not allowed: give a positive int, or None for any batch size")
    if opset is not None:
        if format != "onnx":
            raise ValueError(f"opset={opset!r} applies to format='onnx' only, not {format!r}")
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
            raise ValueError(f"opset={opset!r} is not allowed: give an int >= {MIN_OPSET} (antialiased Resize)")
    model = model.eval()
    params = next(model.parameters(), None)
    if params is not None and (params.dtype != torch.float32 or params.device.type != "cpu"):
        raise ValueError(
            f"export takes an fp32 model on the CPU, got {params.dtype} on {params.device}: call model.float().cpu()"
        )
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if format == "onnx" and nbytes > ONNX_LIMIT_BYTES:
        raise ValueError(
            f"{_name(model)} has {nbytes / 2**30:.2f} GiB of weights, over the 2 GiB an .onnx file holds; "
            "use format='torch-export'"
        )
    meta = export_metadata(model, format, size, batch, dynamic)
    start = time.perf_counter()
    program = trace(model, size, batch=batch, dynamic=dynamic)
    if dynamic:
        _check_generalises(program, model, size, batch)
    save_program(program, out, format, meta, opset)
    return ExportResult(Path(out), meta, time.perf_counter() - start)


def _check_generalises(
    program: torch.export.ExportedProgram, model: nn.Module, size: tuple[int, int], batch: int | None
) -> None:
    """Run the traced program once at another size (and batch) of the rule before anything is written: model code
    that branches on the input size in Python gets frozen at the example by the tracer, and such a program must not
    become a file that claims dynamic sizes.

    Raises:
        ValueError: the program fails at the other size or disagrees with eager there, naming the model and its
            attention layer.
    """
    try:
        other = default_check_sizes(model, size)[3]  # a non-square size of the rule, not the example
    except ValueError:  # a rule of fewer than four sizes (a narrow Swin range): its smallest and largest sides
        rule = size_rule(model, example_size=size)
        other = (rule.min_size, rule.max_size or rule.min_size)
        if other == tuple(size):
            return  # the example is the only size there is
    x = torch.randn(1 if batch is None else batch, _in_chans(model), *other)
    cfg = getattr(model, "cfg", None)
    layers = [f"attn_layer={getattr(cfg, 'attn_layer', None)!r}"] if getattr(cfg, "attn_layer", None) else []
    if getattr(cfg, "embed_layer", "patch") != "patch":  # e.g. local + overlap: each exports alone, not together
        layers.append(f"embed_layer={cfg.embed_layer!r}")
    what = f"{_name(model)}" + (f" ({', '.join(layers)})" if layers else "")
    try:
        with torch.no_grad():
            got, want = program.module()(x), model(x)
    except Exception as e:  # noqa: BLE001 - whatever the frozen program raises is the finding
        raise ValueError(
            f"{what} cannot be exported with dynamic sizes: the traced program fails at {other[0]}x{other[1]} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); its code branches on the input size in Python. "
            "Export with dynamic=False (--static on the command line) for a file of the example size only"
        ) from None
    delta = (got - want).abs().max().item()
    if not delta <= TOLERANCE:
        raise ValueError(
            f"{what} cannot be exported with dynamic sizes: the traced program is off by {delta:.3g} at "
            f"{other[0]}x{other[1]}; its code branches on the input size in Python. Export with dynamic=False "
            "(--static on the command line) for a file of the example size only"
        )


def trace(
    model: nn.Module, example_size: Sequence[int], batch: int | None = None, dynamic: bool = True
) -> torch.export.ExportedProgram:
    """The model's plain forward as a `torch.export` program with symbolic batch (when `batch` is None) and
    symbolic height and width (when `dynamic`); `export_model` writes it. No checks: `export_model` does them."""
    # The traced batch is 2 when it is dynamic: torch.export would make a batch of 1 a constant.
    x = torch.randn(2 if batch is None else batch, _in_chans(model), *example_size)
    with torch.no_grad():
        return torch.export.export(
            ExportForward(model.eval()), (x,), dynamic_shapes=_dynamic_shapes(model, batch, dynamic, example_size)
        )


def save_program(
    program: torch.export.ExportedProgram, out: str | os.PathLike, format: Format, meta: dict, opset: int | None = None
) -> None:
    """Write a traced program atomically as an ONNX file or a torch.export archive, with `meta` inside."""
    check_choice("format", format, Format)
    meta = {**meta, "format": format}
    with atomic_path(out) as tmp, quiet_exporters():
        if format == "onnx":
            _save_onnx(program, opset, meta, tmp)
        else:
            torch.export.save(program, tmp, extra_files={METADATA_FILE: json.dumps(meta)})


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_EXPORTER_LOGS = ("torch.onnx._internal.exporter._registration", "torch.export.pt2_archive._package")


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence what torch's exporters print that a vitkit user cannot act on, for the block: the ONNX exporter logs one
    warning per torchvision operator it skips when torchvision is not installed (vitkit does not use it), and
    torch.export.save warns that the temporary's name does not end in .pt2 (the final name is the user's). Errors
    still show. Each call adds and removes its own logging filter, so nested or concurrent exports leave the loggers
    as they were. Also installs (once, process-wide) a filter for one pytree deprecation that torch's ONNX exporter
    triggers through copyreg (`isinstance(treespec, LeafSpec)`, a FutureWarning)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    drop = _DropRecords()
    logs = [logging.getLogger(name) for name in _EXPORTER_LOGS]
    for log in logs:
        log.addFilter(drop)
    try:
        yield
    finally:
        for log in logs:
            log.removeFilter(drop)


def _in_chans(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    return int(getattr(cfg, "in_chans", 3))


def _dynamic_shapes(
    model: nn.Module, batch: int | None, dynamic: bool, example_size: Sequence[int] | None = None
) -> dict[str, dict[int, Any]] | None:
    from torch.export import Dim

    axes: dict[int, Any] = {}
    if batch is None:
        axes[0] = Dim("batch", min=1)
    if dynamic:
        rule = size_rule(model, example_size=example_size)
        # Sides as multiple * symbol: the exporter then knows every side divides by the patch (no guard on H % p);
        # the range settles size branches (Swin's window branch per stage) for every size of the rule.
        top = {} if rule.max_multiples is None else {"max": rule.max_multiples}
        axes[2] = rule.multiple * Dim("h_multiples", min=rule.min_multiples, **top)
        axes[3] = rule.multiple * Dim("w_multiples", min=rule.min_multiples, **top)
    return {"images": axes} if axes else None


def _save_onnx(program: torch.export.ExportedProgram, opset: int | None, meta: dict, tmp: Path) -> None:
    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        external_data=False,
        verbose=False,
    )
    for key, value in meta.items():
        onnx_program.model.metadata_props[key] = json.dumps(value)
    onnx_program.save(str(tmp), external_data=False)


# ----------------------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------------------
def default_check_sizes(model: nn.Module, example_size: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """The example size and three others of the size rule: larger, smaller (or larger again when the example is
    the smallest allowed), and a non-square one. Where the rule has a largest side (Swin), sizes above it are
    replaced by smaller ones.

    Raises:
        ValueError: the rule leaves fewer than four sizes around the example.
    """
    h, w = (int(s) for s in (example_size or model.preprocess.input_size))  # a one-size file's may be off the rule
    rule = size_rule(model, example_size=(h, w))
    m, lo, hi = rule.multiple, rule.min_size, rule.max_size

    def fits(s: tuple[int, int]) -> bool:
        return all(v % m == 0 and lo <= v and (hi is None or v <= hi) for v in s)

    small = (max(lo, h - m), max(lo, w - m))
    choices = (  # per size, in order of preference
        [(h + 2 * m, w + 2 * m), (h - 2 * m, w - 2 * m), (h + m, w + m), (h - 3 * m, w - 3 * m)],
        [small, (h + m, w + m), (h - m, w - m), (h - 2 * m, w - 2 * m), (h + 3 * m, w + 3 * m)],
        [(h + m, w + 3 * m), (h + m, w + 4 * m), (h - m, w - 3 * m), (h - 3 * m, w - m), (h, w - m), (h - m, w)],
    )
    sizes = [(h, w)]
    for i, options in enumerate(choices):
        found = [s for s in options if s not in sizes and fits(s) and (i < 2 or s[0] != s[1])]
        if not found:
            raise ValueError(f"{_name(model)}: too few sizes around {h}x{w} to check (sides must be {rule.describe()})")
        sizes.append(found[0])
    return sizes


def load_runner(path: str | os.PathLike, threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function images -> logits that runs an exported file: onnxruntime for .onnx (with `threads` intra-op
    threads; None = onnxruntime's default), the torch.export module for an archive. Raises ValueError for a file
    that is neither."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no exported model at {path}")
    check = _runner_size_check(path)
    if zipfile.is_zipfile(path):
        module = torch.export.load(str(path)).module()

        def run_program(x: torch.Tensor) -> torch.Tensor:
            check(x)
            with torch.no_grad():
                return module(x)

        return run_program
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # no warnings on stderr for every dynamic shape
    if threads is not None:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for an unreadable file
        raise ValueError(f"{path} is neither an ONNX model nor a torch.export archive ({e})") from None
    name = session.get_inputs()[0].name

    def run_onnx(x: torch.Tensor) -> torch.Tensor:
        check(x)
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run_onnx


def _runner_size_check(path: Path) -> Callable[[torch.Tensor], None]:
    """A check of the input's (H, W) against the `size_rule` recorded in the file: the graph itself cannot tell a
    size outside it (a Swin stage on the other window branch runs and gives wrong numbers). Files without the
    entry (one-size files, older exports) are not checked here."""
    try:
        rule = read_metadata(path).get("size_rule")
    except ValueError:
        rule = None
    if not rule:
        return lambda x: None
    parsed = SizeRule.from_dict(rule)

    def check(x: torch.Tensor) -> None:
        check_size_rule(parsed, tuple(int(s) for s in x.shape[-2:]), f"is outside what {path.name} takes")

    return check


def check_export(
    path: str | os.PathLike,
    model: nn.Module,
    sizes: Sequence[Sequence[int]] | None = None,
    batches: Sequence[int] = (1, 3),
    tol: float = TOLERANCE,
    seed: int = 0,
) -> dict[tuple[int, int], float]:
    """Run an exported file against the eager model at several sizes and batch sizes.

    Args:
        path: an .onnx file or a torch.export archive.
        model: the eager model the file was exported from (put in eval mode).
        sizes: (H, W) sizes; None = `default_check_sizes` (the file's example size and three others, one
            non-square).
        batches: batch sizes run at each size.
        tol: the largest max |exported - eager| accepted (fp32 logits).
        seed: for the random images (standard normal, i.e. already normalised).

    Returns:
        (H, W) -> the max |delta| over the batches, in the order of `sizes`.

    Raises:
        ExportCheckError: some size failed to run or exceeded `tol`; the message has the whole table, and
            `.results` the per-size values (the failures as messages).
    """
    run = load_runner(path)
    model = model.eval()
    if sizes is None:
        try:
            example = read_metadata(path).get("example_size")
        except ValueError:
            example = None
        sizes = default_check_sizes(model, example)
    gen = torch.Generator().manual_seed(seed)
    results: dict[tuple[int, int], float | str] = {}
    for h, w in sizes:
        worst = 0.0
        for b in batches:
            x = torch.randn(b, _in_chans(model), h, w, generator=gen)
            with torch.no_grad():
                want = model(x)
            try:
                got = run(x)
            except Exception as e:  # noqa: BLE001 - any runtime error at this size is the finding
                results[(h, w)] = f"failed to run at batch {b}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                break
            if got.shape != want.shape:
                results[(h, w)] = f"output shape {tuple(got.shape)} at batch {b}, eager gives {tuple(want.shape)}"
                break
            worst = max(worst, (got.float() - want.float()).abs().max().item())
        else:
            results[(h, w)] = worst
    bad = {s: r for s, r in results.items() if isinstance(r, str) or not r <= tol}
    if bad:
        raise ExportCheckError(
            f"{path} disagrees with eager {_name(model)} (tolerance {tol:g}):\n" + format_check(results), results
        )
    return results  # type: ignore[return-value]


def format_check(results: dict[tuple[int, int], float | str]) -> str:
    """The parity table: one line per size, `H x W  max|delta|` or the failure."""
    lines = [f"{'size':>11}  max |exported - eager|"]
    for (h, w), r in results.items():
        lines.append(f"{h:>5} x {w:<4}  {r if isinstance(r, str) else f'{r:.3g}'}")
    return "\n".join(lines)
