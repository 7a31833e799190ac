"""int8 post-training quantization for CPU inference, with a calibration step on the user's data.

Two methods:

- ``"dynamic"``: `torch.ao.quantization.quantize_dynamic` on every linear layer. Weights are stored as int8 (per
  tensor); activations are quantized on the fly, batch by batch, from their own min/max. No calibration and no
  compilation: quantizing takes well under a second, and the model takes every input size the fp32 model takes.
  Convolutions (patch embedding, CNN stages) stay fp32, so the method refuses models whose linear layers hold less
  than half of the weights (a ResNet: 1%). It relies on `torch.ao.quantization`, which torch marks as deprecated.
- ``"pt2e"``: the static PT2E flow of torchao with the x86 inductor quantizer. `torch.export` traces the model at
  its input size, `prepare_pt2e` inserts observers, the calibration images run through it (the observers record
  activation ranges), `convert_pt2e` turns observers into quantize/dequantize pairs (int8 activations per tensor,
  int8 weights per channel, linear and convolution layers), and `torch.compile` with inductor's freezing lowers
  each dequantize -> linear/conv -> quantize pattern into oneDNN int8 kernels. Those kernels only exist after the
  lowering: the converted graph run eagerly computes in fp32 with simulated rounding (``compile=False``, used by
  the tests because compiling takes minutes on 2 cores). The graph takes exactly the calibrated (H, W) and any
  batch size.

  ``mixed_bf16=True`` (Intel's "int8-mixed-bf16" recipe for this flow): the graph is compiled and run under bf16
  autocast, so what stays unquantized (attention's scaled dot product, softmax, LayerNorm, GELU, the residual adds)
  runs in bf16 and the int8 kernels write bf16. Its attention is exported as three ops (q k^T, softmax, times v;
  `vitkit.layers.attention.explicit_attention`), which run as bf16 matmuls: PyTorch's fused CPU attention kernel
  is 1.7x-2.7x slower in bf16 at ViT sizes. On CPUs with native bf16 kernels (AVX-512-bf16, AMX) this is the
  fastest int8 setting measured (benchmarks/RESULTS.md), so ``mixed_bf16=None`` (the default) turns it on there
  (`has_native_bf16`); on other CPUs bf16 is emulated and slower than fp32, and the default leaves it off.

Which is the default: `DEFAULT_METHOD`, chosen by measurement (see its comment and docs/deploy.md).

Data flow: deploy sits above models, weights, data and train; it imports none of the CLI.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vitkit._validate import check_choice
from vitkit.cpu import has_native_bf16, has_vnni
from vitkit.deploy.export import quiet_exporters
from vitkit.layers.attention import explicit_attention

Int8Method = Literal["pt2e", "dynamic"]

# PT2E (compiled) is the default because it was the faster int8 path in the one measurement made so far: ViT-S/16 at
# 224 px, one thread on this project's 2-core AVX2 EPYC (no AVX-512, no VNNI), heavily shared with other jobs, so
# the numbers are rough (median of 3 calls, two passes). Batch 1: fp32 201-210 ms, dynamic 129-150 ms, PT2E
# 121-141 ms. Batch 16: fp32 9.2-11.2 s, dynamic 7.1-7.8 s, PT2E 6.0-7.3 s. (Measured with activations in 0..255;
# `has_vnni` now limits them to 0..127 on this CPU, which changes the scales, not the kernels.) PT2E quantizes
# every linear layer's input with a calibrated range, and inductor fuses the quantize steps into the int8 kernels
# and their epilogues. Dynamic quantization computes a min/max per layer and batch and requantizes around each
# layer. Dynamic stays the choice when compiling (minutes on 2 cores) or a fixed input size does not fit.
# `benchmarks/int8_cpu.py` measures both against fp32 and bf16.
DEFAULT_METHOD: Int8Method = "pt2e"

# Calibration images when the caller does not say how many: the observers' min/max settle after a few hundred
# images; more only costs time.
DEFAULT_CALIBRATION_IMAGES = 256

CalibrationData = str | os.PathLike | Iterable[Any]


def _check_mixed_bf16(method: str, mixed_bf16: bool) -> None:
    """mixed_bf16 runs a PT2E graph under bf16 autocast: refuse it with any other method."""
    if mixed_bf16 and method != "pt2e":
        raise ValueError(
            f"mixed_bf16=True applies to method='pt2e' only, got method={method!r} (it runs a PT2E graph under bf16 "
            "autocast): drop mixed_bf16, or use method='pt2e'"
        )


def _model_name(model: nn.Module) -> str:
    return getattr(model, "model_name", None) or type(model).__name__


class Int8Model(nn.Module):
    """An int8 model for CPU inference, made by `quantize`: normalised images (B, 3, H, W) -> logits (B, classes).

    It carries the fp32 model's `preprocess` and `num_classes`, so `vitkit.data.inference.eval_transform` and the
    evaluation code treat it like the model it came from.

    Attributes:
        method: "pt2e" or "dynamic".
        model_name: The name of the fp32 model (registry name, else its class name).
        calibration_images: How many images calibrated the activation ranges (0 for "dynamic", which has none).
        input_size: (H, W) the PT2E graph was exported and calibrated at; None for "dynamic" (any size the fp32
            model takes).
        compiled: Whether the PT2E graph was lowered by inductor to int8 kernels (False = the converted graph runs
            eagerly, computing in fp32 with int8 rounding simulated).
        mixed_bf16: Whether the PT2E graph runs under bf16 autocast (int8-mixed-bf16; see the module docstring).
        module: The quantized model ("dynamic") or the converted PT2E graph ("pt2e").
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        method: Int8Method,
        preprocess: Any,
        num_classes: int,
        model_name: str,
        calibration_images: int,
        input_size: tuple[int, int] | None,
        compiled: bool,
        mixed_bf16: bool = False,
    ) -> None:
        super().__init__()
        _check_mixed_bf16(method, mixed_bf16)
        self.method = method
        self.mixed_bf16 = bool(mixed_bf16)
        self.preprocess = preprocess
        self.num_classes = num_classes
        self.model_name = model_name
        self.calibration_images = calibration_images
        self.input_size = input_size
        self.compiled = compiled
        self.module = module
        # The compiled wrapper shares `module`'s tensors; kept out of the submodules so that state_dict and repr
        # list them once.
        self.__dict__["_run"] = torch.compile(module) if method == "pt2e" and compiled else module
        if method == "pt2e" and compiled:
            # Inductor's int8 lowering builds its zero points with torch.tensor(tensor), which warns at every
            # compilation: nothing a user of vitkit can act on. Narrow: that message from that module only.
            warnings.filterwarnings(
                "ignore", message="To copy construct from a tensor", category=UserWarning,
                module=r"torch\._inductor\.mkldnn_lowerings",
            )  # fmt: skip

    @property
    def graph(self) -> nn.Module | None:
        """The converted PT2E graph (a `torch.fx.GraphModule`); None for "dynamic"."""
        return self.module if self.method == "pt2e" else None

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W), normalised as `preprocess` says -> logits (B, classes) in fp32.

        Raises:
            ValueError: For "pt2e", an input whose (H, W) is not `input_size` (the exported graph holds that size).
        """
        if self.input_size is not None and tuple(x.shape[-2:]) != tuple(self.input_size):
            h, w = self.input_size
            raise ValueError(
                f"the int8 (pt2e) {self.model_name} was exported and calibrated at {h}x{w} and takes only that size, "
                f"got an input of {tuple(x.shape)}: resize the images to {h}x{w}, or use method='dynamic', "
                "which takes every size the fp32 model takes"
            )
        if x.device.type != "cpu":
            raise ValueError(f"int8 models run on the CPU; got an input on {x.device}")
        if self.method == "dynamic":
            # The contract path: ViT's class-token-only last block slices `qkv.weight`, which a quantized layer
            # does not have as a tensor.
            return self.module.forward_head(self.module.forward_features(x)).float()
        # Mixed bf16: the compiler traces (and recompiles) under the same autocast, so its int8 patterns see the
        # bf16 casts around each quantized layer.
        mixed = torch.autocast("cpu", dtype=torch.bfloat16) if self.mixed_bf16 else contextlib.nullcontext()
        with mixed:
            if self.compiled:
                # The int8 lowering patterns are freezing passes: a recompilation (a new batch size) needs them too.
                with torch._inductor.config.patch(freezing=True):
                    return self._run(x).float()
            return self._run(x).float()

    def train(self, mode: bool = True) -> Int8Model:
        """Int8 models are for inference only: `eval()` works, `train()` raises. (Exported graphs refuse the
        usual train/eval switch; they were exported in eval mode already.)"""
        if mode:
            raise ValueError(f"the int8 {self.model_name} is for inference only and cannot be put in training mode")
        self.training = False
        if self.method == "dynamic":
            self.module.eval()
        return self

    def extra_repr(self) -> str:
        return (
            f"model={self.model_name}, method={self.method}, calibration_images={self.calibration_images}, "
            f"input_size={self.input_size}, compiled={self.compiled}, mixed_bf16={self.mixed_bf16}"
        )


# --- calibration ----------------------------------------------------------------------------------------------
def calibration_batches(
    model: nn.Module,
    calibration: CalibrationData,
    num_images: int | None = None,
    *,
    batch_size: int = 32,
    seed: int = 0,
    load: dict[str, Any] | None = None,
) -> list[Tensor]:
    """Model inputs for calibration, preprocessed as `model.preprocess` says (vitkit's eval preprocessing).

    Args:
        model: The fp32 vitkit model (its `preprocess` gives the input size, normalisation and decode size).
        calibration: Either a data spec (`vitkit.data.load_data`: "digits", "shapes", a folder, a CSV ...; also a flat
            folder of images without class subfolders: labels are not used), whose
            *train* split is drawn from (so the held-out test split never calibrates); or an iterable of image
            batches: uint8 tensors (B, 3, H, W) are raw images and go through the model's eval transform (resize,
            centre crop, normalise); floating tensors are taken as model inputs, already normalised, at the model's
            input size. Items may be `(images, labels, ...)` tuples, as data loaders yield them; only the images
            are used.
        num_images: How many images to use; None = `DEFAULT_CALIBRATION_IMAGES` or all there are, if fewer.
        batch_size: Images per batch when drawing from a data spec.
        seed: Which images a data spec gives: the split seed and the seed of the random draw from its train split.
        load: More `load_data` arguments for a data spec (a run's `val_fraction`/`test_fraction`, so that its
            train split is the run's own and its held-out images stay out of calibration).

    Returns:
        float batches (b, 3, H, W) at the model's input size; together exactly the calibration images.

    Raises:
        ValueError: `num_images` not positive or more than the data holds, an empty iterable, or a batch of the wrong
            shape or size.
        TypeError: An item that is not a tensor (or a tuple starting with one).
    """
    from vitkit.data.inference import eval_transform

    if num_images is not None and (not isinstance(num_images, int) or isinstance(num_images, bool) or num_images <= 0):
        raise ValueError(f"the number of calibration images must be a positive integer or None, got {num_images!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    tf = eval_transform(model)
    size = tuple(model.preprocess.input_size)
    if isinstance(calibration, (str, os.PathLike)):
        from vitkit.data.unlabeled import load_unlabeled

        spec = os.fspath(calibration)
        # Labels are not used: a flat folder of images works as well as any `load_data` spec.
        splits = load_unlabeled(spec, seed=seed, load_size=model.preprocess.load_size, **(load or {}))
        pool = splits.train
        want = min(DEFAULT_CALIBRATION_IMAGES, len(pool)) if num_images is None else num_images
        if want > len(pool):
            raise ValueError(
                f"{want} calibration images asked for, but the train split of {spec!r} has only {len(pool)}: "
                f"ask for at most {len(pool)}"
            )
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:want]
        batches = []
        for i in range(0, want, batch_size):
            idx = order[i : i + batch_size]
            images = torch.stack([pool[int(j)][0] for j in idx])  # uint8 (b, 3, h, w)
            batches.append(tf(images))
        return batches
    if isinstance(calibration, Tensor):
        raise TypeError(
            "calibration must be a data spec or an iterable of image batches, got a single tensor: pass [tensor]"
        )
    try:
        items = iter(calibration)
    except TypeError:
        raise TypeError(
            f"calibration must be a data spec (str or path) or an iterable of image batches, "
            f"got {type(calibration).__name__}"
        ) from None
    batches, count = [], 0
    for item in items:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor):
            raise TypeError(f"a calibration batch must be a tensor (B, 3, H, W), got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"a calibration batch must have shape (B, 3, H, W), got {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = tf(x.to(torch.device("cpu")))
        elif x.is_floating_point():
            if tuple(x.shape[-2:]) != size:
                raise ValueError(
                    f"float calibration batches are taken as model inputs and must be {size[0]}x{size[1]} (the "
                    f"model's input size), got {tuple(x.shape)}: pass uint8 images to have them resized and "
                    "normalised, or resize them yourself"
                )
            x = x.float().cpu()
        else:
            raise TypeError(f"calibration images must be uint8 (raw) or floating (normalised), got {x.dtype}")
        if num_images is not None:
            x = x[: num_images - count]
        batches.append(x)
        count += len(x)
        if num_images is not None and count >= num_images:
            break
    if count == 0:
        raise ValueError("the calibration data gave no images")
    if num_images is not None and count < num_images:
        raise ValueError(f"{num_images} calibration images asked for, but the calibration data gave only {count}")
    return batches


# --- the two methods ------------------------------------------------------------------------------------------
def _plain_linears(model: nn.Module) -> nn.Module:
    """A copy of `model` whose linear layers are `nn.Linear` itself: quantize_dynamic matches exact types, and
    vitkit's `Linear` subclass (a CPU bf16 rule, the same parameters) would be skipped."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and type(child) is not nn.Linear:
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
    return model


def _linear_share(model: nn.Module) -> float:
    """Share of the weights (parameters of modules with a `weight`) held by linear layers."""
    total = linear = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor) and w.ndim >= 2:
            total += w.numel()
            if isinstance(m, nn.Linear):
                linear += w.numel()
    return linear / total if total else 0.0


def _dynamic(model: nn.Module) -> nn.Module:
    share = _linear_share(model)
    if share < 0.5:
        raise ValueError(
            f"method='dynamic' quantizes linear layers only, and in {_model_name(model)} they hold "
            f"{share:.0%} of the weights (the rest are convolutions): use method='pt2e', which quantizes "
            "convolutions too"
        )
    plain = _plain_linears(model)
    with warnings.catch_warnings():
        # torch's own deprecation notices of torch.ao.quantization: the method documents that it relies on it.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(plain, {nn.Linear}, dtype=torch.qint8, inplace=True)


@contextlib.contextmanager
def _quiet_torchao():
    """torchao logs a warning per optional CUDA extension it cannot load on a CPU machine when first imported, and
    torch a deprecation notice about how torchao registers an enum: noise for a user of vitkit."""
    logs = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def _pt2e_modules():
    try:
        with _quiet_torchao():
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:
        raise ImportError(
            f"method='pt2e' needs torchao ({e}): pip install 'vitkit[int8]', or use method='dynamic'"
        ) from None
    return prepare_pt2e, convert_pt2e, xiq


def resolve_mixed_bf16(method: str, mixed_bf16: bool | None) -> bool:
    """The mixed-bf16 setting to use: as given, or for None ("auto") True for "pt2e" on a CPU with native bf16.

    Raises:
        ValueError: mixed_bf16=True with a method other than "pt2e".
    """
    if mixed_bf16 is None:
        return method == "pt2e" and has_native_bf16()
    _check_mixed_bf16(method, mixed_bf16)
    if mixed_bf16 and not has_native_bf16():
        warnings.warn(
            "mixed_bf16=True on a CPU without native bf16 (no AVX-512-bf16 or AMX): its bf16 ops are emulated there "
            "and far slower than plain PT2E (benchmarks/RESULTS.md); mixed_bf16=False is faster on this CPU",
            stacklevel=3,
        )
    return bool(mixed_bf16)


class _ContractForward(nn.Module):
    """`forward_head(forward_features(x))`, the contract's forward, as the module to export. ViT's own `forward`
    computes only the class-token row of the last block by slicing the qkv weight, and a sliced weight is not a
    linear layer the quantizer can find: that block's qkv would stay fp32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(x))


def _export(model: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=4096)
    # Traced with autograd on (the model is in eval mode): inference-only shortcuts that cache on tensor data, such
    # as ResNet's folded conv+BatchNorm, cannot be traced; prepare_pt2e folds BatchNorm into the convolution itself.
    with torch.enable_grad():
        return torch.export.export(_ContractForward(model), (example,), dynamic_shapes={"x": {0: batch}})


def _pt2e(model: nn.Module, batches: list[Tensor], reduce_range: bool, explicit: bool = False) -> nn.Module:
    prepare_pt2e, convert_pt2e, xiq = _pt2e_modules()
    name = _model_name(model)
    example = torch.cat(batches)[:2]
    if len(example) < 2:  # a batch of 1 would specialise the exported graph to batch 1
        example = example.expand(2, -1, -1, -1).contiguous()
    # A copy with plain nn.Linear layers: the quantizer finds linear layers by their module type, and export may
    # leave traced tensors in a model's caches (relative-position tables), which must not reach the user's model.
    model = _plain_linears(model)
    try:
        # Mixed bf16: attention exported as its three ops, which run as bf16 matmuls under autocast; the fused
        # kernel is slower on CPU in bf16 (vitkit.layers.attention.explicit_attention).
        with explicit_attention() if explicit else contextlib.nullcontext():
            program = _export(model, example)
    except Exception as e:  # torch.export raises many types; all mean the same for the user
        raise ValueError(f"method='pt2e' cannot quantize {name}: torch.export failed: {type(e).__name__}: {e}") from e
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    prepared = prepare_pt2e(program.module(), quantizer)
    with torch.no_grad():
        for x in batches:
            prepared(x)  # the observers record each activation's min/max
    converted = convert_pt2e(prepared)
    converted.meta["vitkit_reduce_range"] = reduce_range
    return converted


def quantize(
    model: nn.Module,
    method: Int8Method = DEFAULT_METHOD,
    calibration: CalibrationData | None = None,
    *,
    num_images: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    compile: bool = True,
    mixed_bf16: bool | None = None,
) -> Int8Model:
    """An int8 copy of a vitkit model for CPU inference; the model itself is not changed.

    Args:
        model: A vitkit classifier on the CPU (any registry family; see docs/deploy.md for which quantize).
        method: "pt2e" (static: calibrated activation ranges, int8 kernels after `torch.compile`) or "dynamic"
            (linear layers only, activation ranges measured per batch; needs no calibration). See the module
            docstring and `DEFAULT_METHOD`.
        calibration: For "pt2e": a data spec or an iterable of image batches (see `calibration_batches`); images
            are preprocessed with the model's own eval preprocessing at its input size. "dynamic" takes none.
        num_images: Calibration images to use; None = `DEFAULT_CALIBRATION_IMAGES` (or all, if fewer).
        batch_size: Calibration batch size (for a data spec).
        seed: Which images a data spec gives.
        compile: For "pt2e": lower to int8 kernels with `torch.compile` (inductor, freezing). The first call then
            compiles (minutes on 2 cores for a ViT-S). False keeps the converted graph eager (fp32 arithmetic with
            int8 rounding simulated: same predictions up to float rounding, not faster).
        mixed_bf16: For "pt2e": run the graph under bf16 autocast (int8-mixed-bf16: the unquantized ops in bf16;
            see the module docstring). None (default) = on where the CPU has native bf16 (`has_native_bf16`: the
            fastest setting measured there) and for "pt2e" only; True/False force it. Calibration stays fp32.

    Returns:
        An `Int8Model` in eval mode; `calibration_images` records how many images calibrated it.

    Raises:
        ValueError: An unknown method, a model not on the CPU or in training mode, "pt2e" without calibration data
            or "dynamic" with it or with mixed_bf16, a model the method cannot quantize (named, with the reason), or bad calibration
            data (see `calibration_batches`).
        TypeError: `model` is not an nn.Module or calibration of the wrong type.
    """
    check_choice("method", method, Int8Method)
    mixed_bf16 = resolve_mixed_bf16(method, mixed_bf16)
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize needs a torch nn.Module, got {type(model).__name__}")
    name = _model_name(model)
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cpu":
        raise ValueError(f"int8 quantization targets the CPU, but {name} is on {param.device}: call model.cpu() first")
    if param is not None and param.dtype != torch.float32:
        raise ValueError(f"quantize takes an fp32 model, but {name} is {param.dtype}: call model.float() first")
    if any(getattr(model, "tome_r", None) or ()):
        raise ValueError(f"{name} has token merging on (set_tome): int8 quantization takes unmerged models only")
    meta = dict(
        preprocess=copy.deepcopy(model.preprocess), num_classes=model.num_classes, model_name=name, compiled=False
    )
    was_training = model.training
    model.eval()
    try:
        if method == "dynamic":
            if calibration is not None:
                raise ValueError(
                    "method='dynamic' measures activation ranges per batch at run time and takes no calibration "
                    "data: drop the calibration argument, or use method='pt2e'"
                )
            return Int8Model(_dynamic(model), method="dynamic", calibration_images=0, input_size=None, **meta).eval()
        if calibration is None:
            raise ValueError(
                "method='pt2e' needs calibration data to set activation ranges: pass calibration= a data spec "
                "(e.g. the training data) or an iterable of image batches"
            )
        batches = calibration_batches(model, calibration, num_images, batch_size=batch_size, seed=seed)
        graph = _pt2e(model, batches, reduce_range=not has_vnni(), explicit=mixed_bf16)
        meta["compiled"] = bool(compile)
        q = Int8Model(
            graph,
            method="pt2e",
            calibration_images=sum(len(b) for b in batches),
            input_size=tuple(model.preprocess.input_size),
            mixed_bf16=mixed_bf16,
            **meta,
        )
        return q.eval()
    finally:
        model.train(was_training)


# --- saving and loading (PT2E) --------------------------------------------------------------------------------
INT8_META = "vitkit_int8.json"  # the extra file inside a saved .pt2 that makes it a vitkit int8 model


def save_int8(q: Int8Model, path: str | os.PathLike) -> Path:
    """Save a PT2E int8 model as a `torch.export` program (`.pt2`), written atomically.

    The file holds the converted graph (int8 weights, calibrated activation scales, any batch size at the
    calibrated (H, W)) and, as the extra file `vitkit_int8.json`, the model name, method, calibration count and
    preprocessing. Inductor's int8 kernels are not saved: `load_int8` compiles again.

    Raises:
        ValueError: A "dynamic" model: quantizing the fp32 model again takes under a second and gives the same
            int8 weights, so save the fp32 model (`save_pretrained`) and quantize on load.
        TypeError: `q` is not an `Int8Model`.
    """
    import dataclasses
    import json

    from vitkit._io import atomic_path

    if not isinstance(q, Int8Model):
        raise TypeError(f"save_int8 takes an Int8Model from vitkit.deploy.quantize, got {type(q).__name__}")
    if q.method != "pt2e":
        raise ValueError(
            f"only method='pt2e' int8 models are saved, got method={q.method!r}: dynamic quantization of the saved "
            "fp32 model on load takes under a second and gives the same int8 weights"
        )
    _pt2e_modules()
    h, w = q.input_size
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(q.graph, (torch.zeros(2, 3, h, w),), dynamic_shapes={"x": {0: batch}})
    meta = {
        "format": 1,
        "model_name": q.model_name,
        "method": q.method,
        "calibration_images": q.calibration_images,
        "input_size": [h, w],
        "num_classes": q.num_classes,
        "preprocess": dataclasses.asdict(q.preprocess),
        # Activations in 0..127 (a CPU without VNNI quantized it); full-range files saturate on such CPUs.
        "reduce_range": bool(q.graph.meta.get("vitkit_reduce_range", True)),
        "mixed_bf16": q.mixed_bf16,
    }
    path = Path(path)
    with atomic_path(path) as tmp, quiet_exporters():
        torch.export.save(program, tmp, extra_files={INT8_META: json.dumps(meta)})
    return path


def load_int8(path: str | os.PathLike, *, compile: bool = True) -> Int8Model:
    """Load a model saved by `save_int8`; with `compile`, inductor lowers it to int8 kernels on its first call.

    Raises:
        FileNotFoundError: No such file.
        ValueError: A file that is not a vitkit int8 model.
    """
    import json

    from vitkit.models.base import Preprocess

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"int8 model file {str(path)!r} does not exist")
    _pt2e_modules()  # registers the quantize/dequantize ops the program calls, and inductor's int8 passes
    extra = {INT8_META: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as e:  # a zip that is not a program, or not a zip at all
        raise ValueError(f"{str(path)!r} is not a torch.export program ({type(e).__name__}: {e})") from None
    if not extra[INT8_META]:
        raise ValueError(f"{str(path)!r} is a torch.export program but not a vitkit int8 model (no {INT8_META})")
    meta = json.loads(extra[INT8_META])
    if not meta.get("reduce_range", True) and compile and not has_vnni():
        raise ValueError(
            f"{str(path)!r} was quantized on a CPU with VNNI, with activations in 0..255, and this CPU has no VNNI: "
            "its int8 kernels would saturate. Quantize the fp32 model again on this machine, or load with "
            "compile=False (the reference graph, not faster)"
        )
    graph = program.module()
    graph.meta["vitkit_reduce_range"] = bool(meta.get("reduce_range", True))
    q = Int8Model(
        graph,
        method=meta["method"],
        preprocess=Preprocess(**meta["preprocess"]),
        num_classes=int(meta["num_classes"]),
        model_name=meta["model_name"],
        calibration_images=int(meta["calibration_images"]),
        input_size=tuple(meta["input_size"]),
        compiled=compile,
        mixed_bf16=bool(meta.get("mixed_bf16", False)),
    )
    return q.eval()


# --- predict / evaluate with an int8 copy of a checkpoint -------------------------------------------------------
def _int8_variant(
    checkpoint: str | os.PathLike,
    method: Int8Method,
    calibration: CalibrationData | None,
    num_images: int | None,
    compile: bool,
    made: list[Int8Model],
    mixed_bf16: bool | None = None,
    tome: int = 0,
) -> Callable[[nn.Module], Int8Model]:
    """The function that turns the checkpoint's loaded fp32 model into its int8 copy (appended to `made`)."""
    from vitkit.runs import resolve_checkpoint, training_record

    check_choice("method", method, Int8Method)
    if method == "dynamic" and (calibration is not None or num_images is not None):
        raise ValueError("method='dynamic' takes no calibration data (calibration=, num_images=): use method='pt2e'")
    mixed_bf16 = resolve_mixed_bf16(method, mixed_bf16)  # refuses mixed_bf16=True with "dynamic" before any work
    if tome:
        raise ValueError(
            f"tome={tome}: int8 quantization takes unmerged models only (token merging's data-dependent matching "
            "cannot be exported and quantized); drop tome, or evaluate the fp32 model with it"
        )
    directory = resolve_checkpoint(checkpoint)
    record = training_record(directory) if directory.is_dir() else {}

    def make(model: nn.Module) -> Int8Model:
        calib, seed, load = calibration, 0, None
        if method == "pt2e" and calib is None:
            calib = record.get("data")
            if calib is None:
                raise ValueError(f"{checkpoint} does not record its training data: pass calibration= a data spec")
            # The run's own train split: its held-out val/test images never calibrate.
            seed = int(record.get("seed", 0))
            load = {k: record[k] for k in ("val_fraction", "test_fraction") if k in record}
        if method == "pt2e":
            batches = calibration_batches(model, calib, num_images, seed=seed, load=load)
            q = quantize(model, "pt2e", batches, compile=compile, mixed_bf16=mixed_bf16)
        else:
            q = quantize(model, "dynamic")
        made.append(q)
        return q

    return make


def _int8_record(q: Int8Model, calibration: CalibrationData | None, checkpoint: str | os.PathLike) -> dict[str, Any]:
    from vitkit.runs import resolve_checkpoint, training_record

    if q.method == "pt2e" and calibration is None:
        directory = resolve_checkpoint(checkpoint)
        calibration = training_record(directory).get("data") if directory.is_dir() else None
    source = calibration if isinstance(calibration, (str, os.PathLike)) or calibration is None else "batches"
    return {
        "method": q.method,
        "calibration": None if q.method == "dynamic" else os.fspath(source) if source is not None else None,
        "calibration_images": q.calibration_images,
        "compiled": q.compiled,
        "mixed_bf16": q.mixed_bf16,
    }


def evaluate_int8(
    checkpoint: str | os.PathLike,
    data: str | None = None,
    *,
    method: Int8Method = DEFAULT_METHOD,
    calibration: CalibrationData | None = None,
    num_images: int | None = None,
    compile: bool = True,
    mixed_bf16: bool | None = None,
    split: str = "test",
    batch_size: int = 256,
    out: str | os.PathLike | None = None,
    threads: Any = "auto",
    tome: int = 0,
) -> dict[str, Any]:
    """`vitkit.train.evaluate` of the int8 copy of a checkpoint, compared with the checkpoint's fp32 model.

    Args:
        checkpoint: A run directory (uses best/) or a model directory.
        data: A data spec; None = the data the checkpoint was trained on.
        method: "pt2e" or "dynamic" (see `quantize`).
        calibration: For "pt2e": a data spec or image batches; None = the checkpoint's training data, drawn from the
            run's own train split (never its held-out images).
        num_images: Calibration images; None = `DEFAULT_CALIBRATION_IMAGES` (or all, if fewer).
        compile: For "pt2e": lower to int8 kernels (see `quantize`).
        mixed_bf16: For "pt2e": the unquantized ops in bf16; None = where the CPU has native bf16 (see `quantize`).
        split, batch_size, out, threads, tome: As in `vitkit.train.evaluate` (int8 refuses tome != 0).

    Returns:
        `evaluate`'s result for the int8 model ("top1", "top5", "loss", "per_class", "confusion" ...) plus
        "agreement" (share of images whose int8 top-1 equals the fp32 top-1), "top1_reference" (the fp32 top-1)
        and "int8": {"method", "calibration", "calibration_images", "compiled", "mixed_bf16"}. With `out`, eval.json holds the
        same.
    """
    import json

    from vitkit._io import atomic_write_text
    from vitkit.train import evaluate

    made: list[Int8Model] = []
    make = _int8_variant(checkpoint, method, calibration, num_images, compile, made, mixed_bf16, tome)
    result = evaluate(
        checkpoint, data, split=split, batch_size=batch_size, device="cpu", out=out, threads=threads, tome=tome,
        variant=make,
    )  # fmt: skip
    result["int8"] = _int8_record(made[0], calibration, checkpoint)
    if out is not None:  # evaluate wrote eval.json before the int8 record existed
        saved = {k: v for k, v in result.items() if k != "files"}
        atomic_write_text(Path(out) / "eval.json", json.dumps(saved, indent=2) + "\n")
    return result


def predict_int8(
    checkpoint: str | os.PathLike,
    images: list[str | os.PathLike],
    *,
    method: Int8Method = DEFAULT_METHOD,
    calibration: CalibrationData | None = None,
    num_images: int | None = None,
    compile: bool = True,
    mixed_bf16: bool | None = None,
    topk: int = 5,
    threads: Any = "auto",
    tome: int = 0,
) -> list[dict[str, Any]]:
    """`vitkit.train.predict` with the int8 copy of a checkpoint (quantized on load, calibrated as in
    `evaluate_int8`). Returns one {"path", "top": [{"class", "index", "prob"}, ...]} per image."""
    from vitkit.train import predict

    made: list[Int8Model] = []
    make = _int8_variant(checkpoint, method, calibration, num_images, compile, made, mixed_bf16, tome)
    return predict(checkpoint, images, topk=topk, device="cpu", threads=threads, tome=tome, variant=make)
