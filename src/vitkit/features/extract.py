"""Frozen features: the pooled pre-logits embedding of any family, for every image of a folder, list or dataset.

The embedding is the model contract's `forward_head(forward_features(x), pre_logits=True)`: the class token (or
the token average) after the final norm for ViT/DeiT/hybrids, the pooled (and, for ConvNeXt, normalised) last
stage for Swin, ConvNeXt and ResNets. Images are prepared exactly as `vitkit eval` / `predict` prepare them
(`vitkit.data.inference`), so a checkpoint's features are those of the images its evaluation saw.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit._validate import check_choice
from vitkit.data.dataset import DataSplits, ImageDataset
from vitkit.data.images import IMAGE_EXTENSIONS, is_image_file, list_image_files
from vitkit.data.inference import decode_for_model, eval_transform
from vitkit.models.base import config_to_dict, model_label

DataSplit = Literal["train", "val", "test", "all"]
LIST_SUFFIXES = (".txt", ".lst")  # a file list: one image path per line


@dataclass(eq=False)
class FeatureSet:
    """Features of a set of images, with where each image came from.

    Attributes:
        features: float32 (N, D); rows have unit L2 norm when `normalised`.
        labels: class index of each image, long (N,), or None when the images have no labels.
        class_names: name of each class index (None without labels).
        paths: source file of each image, or None for images that have no file (digits, shapes).
        indices: position of each image in its dataset split when `paths` is None (see `source`), else None.
        normalised: whether the rows were L2-normalised.
        source: how the images were found: {"kind": "folder" | "csv" | "list" | "files" | "dataset", ...}; a
            dataset records its spec, split and split settings so its images can be loaded again.
        model: what made the features: {"checkpoint", "name", "family", "num_features"} (checkpoint may be None).
        preprocess: the model's preprocessing (`vitkit.models.base.Preprocess` as a dict).
    """

    features: Tensor
    labels: Tensor | None = None
    class_names: list[str] | None = None
    paths: list[str] | None = None
    indices: list[int] | None = None
    normalised: bool = True
    source: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(self.features.shape)}")
        n = len(self.features)
        for name in ("labels", "paths", "indices"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{len(value)} {name} for {n} feature rows")

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def describe(self, i: int) -> str:
        """Where row `i` came from: its path, else `spec[split][index]`."""
        if self.paths is not None:
            return self.paths[i]
        assert self.indices is not None  # every FeatureSet built here has paths or indices
        return f"{self.source.get('spec')}[{self.source.get('split')}][{self.indices[i]}]"

    def label_name(self, i: int) -> str | None:
        """The class name of row `i`, or None without labels."""
        if self.labels is None:
            return None
        label = int(self.labels[i])
        return self.class_names[label] if self.class_names else str(label)


def pooled_features(model: nn.Module, x: Tensor) -> Tensor:
    """The pooled pre-logits embedding (B, num_features) of normalised inputs (B, 3, H, W), through the contract.

    Raises:
        ValueError: the model does not pool to one vector per image (a ViT with pool='none').
    """
    f = model.forward_head(model.forward_features(x), pre_logits=True)
    if f.ndim != 2:
        raise ValueError(
            f"{model_label(model)} gives pre-logits features of shape {tuple(f.shape)}, not (B, num_features): a "
            "ViT with pool='none' has no single embedding per image; use pool='token' or pool='avg'"
        )
    return f


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def _embed_batches(model: nn.Module, batches, normalize: bool) -> Tensor:
    out = []
    for x in batches:  # x: normalised float (b, 3, h, w) on the model's device
        f = pooled_features(model, x).float()
        out.append((F.normalize(f, dim=1) if normalize else f).cpu())
    if not out:
        raise ValueError("no images to embed")
    return torch.cat(out)


def _dataset_batches(model: nn.Module, dataset: ImageDataset, batch_size: int):
    from vitkit.train.loader import BatchLoader

    tf = eval_transform(model)
    for x, _y in BatchLoader(dataset, batch_size):
        yield tf(x.to(_device(model)))


def _decode(path: str, model: nn.Module) -> Tensor:
    try:
        return decode_for_model(path, model)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path!r} does not exist") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from None


def _file_batches(model: nn.Module, paths: Sequence[str], batch_size: int):
    tf = eval_transform(model)
    dev = _device(model)
    # PIL releases the GIL while decoding, so threads decode a batch's files in parallel (as `decode_files` does).
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), batch_size):
            images = pool.map(lambda p: _decode(p, model), paths[start : start + batch_size])
            # Files differ in size: resize and crop each one, then stack the equal-sized crops.
            units = [tf.resize_crop(image[None].to(dev)) for image in images]  # (1, 3, h, w) each, on 0..1
            yield tf.normalize(torch.cat(units))


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def model_record(model: nn.Module, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """What `FeatureSet.model` records about the model that made the features."""
    return {
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        "name": model_label(model),
        "family": getattr(model, "family", None),
        "num_features": int(model.num_features),
    }


def extract_features(
    model: nn.Module,
    data: ImageDataset | Sequence[str | os.PathLike] | str | os.PathLike,
    batch_size: int = 64,
    *,
    normalize: bool = True,
    split: DataSplit | None = None,
    seed: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    split_settings: Mapping[str, Any] | None = None,
) -> FeatureSet:
    """Embed images with a model's pooled pre-logits features.

    Args:
        model: any vitkit model (the contract's `forward_features` / `forward_head(pre_logits=True)`), with its
            `preprocess` (and `preprocess.load_size` for models trained on image files; `load_eval_model` sets it).
            It is put in eval mode; it stays on its device.
        data: an `ImageDataset` (e.g. `load_data("digits").train`, already decoded), a list of image files, or a
            string: a folder (with class subfolders: labels are the subfolder names; without: no labels), a file
            list (.txt/.lst, one path per line, relative to the list's folder), a CSV of `path,label` rows, or a
            `vitkit.data.load_data` spec such as "digits" or "shapes:200" (images without files: rows record
            their index in `split`).
        batch_size: images per forward pass.
        normalize: L2-normalise each row (cosine similarity is then a dot product). False keeps the raw pooled
            features, as the linear probe uses them.
        split: for a dataset spec, which split to embed: "train" (None), "val", "test" or "all" (train, val, test in
            turn). Only a dataset spec has splits: given with other data, it is refused.
        seed: for a dataset spec, the split seed (None = 0; the same seed gives the same splits as `vitkit train`);
            refused with other data, like `split`.
        checkpoint: where the model came from, recorded in the result.
        split_settings: for a dataset spec, how `vitkit train` split it: any of val_fraction, test_fraction (0.1
            each by default) and shapes_size (64); `run_split_settings` reads them from a run. Refused with other
            data, like `split`.

    Returns:
        A `FeatureSet` of float32 (N, num_features) features in the order of the images.

    Raises:
        ValueError: an empty image set, an unreadable image, a bad batch size or split, a split or seed for data
            that is not a dataset spec, or a model without a pooled embedding, each named.
        FileNotFoundError: a listed image or path that does not exist.
    """
    _check_batch_size(batch_size)
    if split is not None:
        check_choice("split", split, DataSplit)
    is_spec = isinstance(data, (str, os.PathLike)) and not _is_path_source(os.fspath(data))
    settings = dict(split_settings or {})
    unknown = sorted(set(settings) - set(SPLIT_SETTINGS))
    if unknown:
        raise ValueError(f"unknown split setting(s) {unknown}; allowed: {list(SPLIT_SETTINGS)}")
    if not is_spec and (split is not None or seed is not None or settings):
        # Silently embedding every image would put, e.g., a folder's train/ and test/ images into one index.
        pairs = (("split", split), ("seed", seed), *settings.items())
        given = ", ".join(f"{k}={v!r}" for k, v in pairs if v is not None)
        raise ValueError(
            f"{given} applies to a dataset spec such as 'digits'; {_data_label(data)} has no splits to choose from "
            "(embed the folder or list that holds the images you want)"
        )
    split = "train" if split is None else split
    seed = 0 if seed is None else seed
    model.eval()
    pre = model.preprocess
    common = dict(normalised=normalize, model=model_record(model, checkpoint), preprocess=config_to_dict(pre))
    if isinstance(data, ImageDataset):
        feats = _embed_batches(model, _dataset_batches(model, data, batch_size), normalize)
        return FeatureSet(
            feats, labels=data.labels.clone(), class_names=list(data.class_names), paths=data.paths,
            indices=None if data.paths is not None else list(range(len(data))),
            source={"kind": "dataset", "spec": None, "split": None}, **common,
        )  # fmt: skip
    if is_spec:
        spec = os.fspath(data)
        settings = {**SPLIT_SETTINGS, **settings}
        splits = load_splits(spec, seed=seed, load_size=pre.load_size, **settings)
        dataset = split_dataset(splits, split)
        feats = _embed_batches(model, _dataset_batches(model, dataset, batch_size), normalize)
        return FeatureSet(
            feats, labels=dataset.labels.clone(), class_names=list(splits.class_names), paths=dataset.paths,
            indices=None if dataset.paths is not None else list(range(len(dataset))),
            source={
                "kind": "dataset", "spec": spec, "split": split, "seed": seed, "load_size": pre.load_size, **settings
            },
            **common,
        )  # fmt: skip
    paths, labels, class_names, source = list_images(data)
    feats = _embed_batches(model, _file_batches(model, paths, batch_size), normalize)
    return FeatureSet(
        feats, labels=None if labels is None else torch.tensor(labels, dtype=torch.long), class_names=class_names,
        paths=paths, source=source, **common,
    )  # fmt: skip


def _data_label(data: Any) -> str:
    if isinstance(data, ImageDataset):
        return "a loaded ImageDataset"
    if isinstance(data, (str, os.PathLike)):
        return f"data {os.fspath(data)!r}"
    return "a list of image files"


def _is_path_source(text: str) -> bool:
    """Whether a DATA string names files (a folder, a file list, a CSV) rather than a `load_data` spec."""
    path = os.path.expanduser(text)
    return os.path.isdir(path) or (
        os.path.isfile(path) and (path.lower().endswith((*LIST_SUFFIXES, ".csv")) or is_image_file(path))
    )


# ----------------------------------------------------------------------------------------------------------------
# Which images: folders, lists, CSVs, datasets
# ----------------------------------------------------------------------------------------------------------------
def list_images(
    data: Sequence[str | os.PathLike] | str | os.PathLike,
) -> tuple[list[str], list[int] | None, list[str] | None, dict[str, Any]]:
    """The image files named by `data` and their labels where the layout gives them.

    Args:
        data: a folder, a file list (.txt/.lst), a CSV of `path,label` rows, or a list of image files/folders.

    Returns:
        (paths, labels or None, class names or None, source record).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: no images, a list line or CSV row naming a missing file, or a CSV without labels.
    """
    if not isinstance(data, (str, os.PathLike)):
        paths = list_image_files([os.fspath(p) for p in data])
        return paths, None, None, {"kind": "files"}
    path = Path(os.path.expanduser(os.fspath(data)))
    if not path.exists():
        raise FileNotFoundError(f"data {str(path)!r} does not exist")
    if path.is_dir():
        return _list_folder(path)
    if path.suffix.lower() in LIST_SUFFIXES:
        return _list_file(path)
    if path.suffix.lower() == ".csv":
        return _list_csv(path)
    if is_image_file(path):
        return [str(path)], None, None, {"kind": "files"}
    raise ValueError(
        f"data {str(path)!r} is a file but not an image, a file list ({', '.join(LIST_SUFFIXES)}) or a .csv"
    )


def _list_folder(root: Path) -> tuple[list[str], list[int] | None, list[str] | None, dict[str, Any]]:
    """A folder of class subfolders (labels = subfolder names; train/val/test folders above them are allowed), or
    a folder with images directly in it (no labels; images in subfolders are included too)."""
    from vitkit.data.folders import SPLIT_DIRS

    paths = list_image_files(str(root))
    direct = [p for p in paths if Path(p).parent == root]
    if direct:
        return paths, None, None, {"kind": "folder", "path": str(root.resolve()), "labelled": False}
    split_names = {alias for aliases in SPLIT_DIRS.values() for alias in aliases}
    top = {Path(p).relative_to(root).parts[0] for p in paths}
    depth = 1 if top <= split_names and "train" in top else 0  # <root>/train/<class>/... : the class is level 1
    names = []
    for p in paths:
        parts = Path(p).relative_to(root).parts
        if len(parts) <= depth + 1:
            raise ValueError(f"{p} lies directly in {root / parts[0]}, which holds class folders; move it into one")
        names.append(parts[depth])
    class_names = sorted(set(names))
    index = {c: i for i, c in enumerate(class_names)}
    source = {"kind": "folder", "path": str(root.resolve()), "labelled": True}
    return paths, [index[n] for n in names], class_names, source


def _list_file(list_path: Path) -> tuple[list[str], None, None, dict[str, Any]]:
    paths = []
    for line_no, line in enumerate(list_path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = os.path.expanduser(line)
        p = p if os.path.isabs(p) else str(list_path.parent / p)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{list_path} line {line_no}: image {p!r} does not exist")
        paths.append(p)
    if not paths:
        raise ValueError(f"file list {list_path} names no images (one path per line; '#' starts a comment)")
    return paths, None, None, {"kind": "list", "path": str(list_path.resolve())}


def _list_csv(csv_path: Path) -> tuple[list[str], list[int], list[str], dict[str, Any]]:
    from vitkit.data.folders import _read_csv_rows, _resolve, _sort_labels

    rows = _read_csv_rows(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no 'path,label' rows")
    class_names = _sort_labels({label for _p, label, _line in rows if label})
    index = {c: i for i, c in enumerate(class_names)}
    paths, labels = [], []
    for p, label, line_no in rows:
        p = _resolve(p, csv_path)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{csv_path} line {line_no}: image {p!r} does not exist")
        if not label:
            raise ValueError(f"{csv_path} line {line_no}: empty label")
        paths.append(p)
        labels.append(index[label])
    return paths, labels, class_names, {"kind": "csv", "path": str(csv_path.resolve())}


SPLIT_SETTINGS = {"val_fraction": 0.1, "test_fraction": 0.1, "shapes_size": 64}  # load_data's defaults


def run_split_settings(record: Mapping[str, Any], spec: str) -> dict[str, Any]:
    """How the run behind a training `record` split `spec`: its seed and `SPLIT_SETTINGS` when it trained on that
    spec, else {} (the defaults)."""
    if spec != record.get("data"):
        return {}
    out = {k: record[k] for k in SPLIT_SETTINGS if record.get(k) is not None}
    if record.get("seed") is not None:
        out["seed"] = int(record["seed"])
    return out


def load_splits(
    spec: str,
    *,
    seed: int = 0,
    load_size: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    shapes_size: int = 64,
) -> DataSplits:
    """`vitkit.data.load_data` with the decode size a model was trained with (files default to 224 there)."""
    from vitkit.data import load_data
    from vitkit.data.load import _parse_spec

    kind, _ = _parse_spec(spec)
    kwargs: dict[str, Any] = dict(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    if kind == "shapes":
        kwargs["shapes_size"] = shapes_size  # shapes are drawn at a size, never decoded
    else:
        kwargs["load_size"] = load_size
    return load_data(spec, **kwargs)


def split_dataset(splits: DataSplits, split: DataSplit) -> ImageDataset:
    """One split of `splits`, or "all" of them concatenated in train, val, test order."""
    check_choice("split", split, DataSplit)
    if split != "all":
        dataset = getattr(splits, split)
    else:
        parts = [splits.train, splits.val, splits.test]
        labels = torch.cat([p.labels for p in parts])
        if all(p.images is not None for p in parts):
            paths = sum((p.paths for p in parts), []) if all(p.paths is not None for p in parts) else None
            images = torch.cat([p.images for p in parts])
            dataset = ImageDataset(labels, splits.class_names, images=images, paths=paths)
        else:
            paths = sum((p.paths for p in parts), [])
            dataset = ImageDataset(labels, splits.class_names, paths=paths, load_size=splits.train.load_size)
    if len(dataset) == 0:
        raise ValueError(f"the {split} split of {splits.source!r} is empty")
    return dataset


SUPPORTED_DATA = (
    "a folder (class subfolders give labels), a file list (" + ", ".join(LIST_SUFFIXES) + ", one image path per "
    "line), a CSV of path,label rows, image files, or a dataset spec such as digits or shapes:N "
    f"(image extensions: {', '.join(IMAGE_EXTENSIONS)})"
)


def model_and_splits(
    checkpoint: str | os.PathLike | nn.Module,
    data: str | None = None,
    *,
    seed: int | None = None,
    device: str | torch.device | None = "auto",
) -> tuple[nn.Module, DataSplits, dict[str, Any]]:
    """A model for frozen features and the splits of the data to evaluate it on, as `vitkit eval` makes them.

    Args:
        checkpoint: a run directory, model directory or checkpoint file; or a model (then `data` is required).
        data: a `load_data` spec; None = the data the checkpoint was trained on.
        seed: the split seed; None = the checkpoint's training seed (else 0). On the checkpoint's own data with its
            seed, the test split is the run's held-out test split.
        device: where the model runs.

    Returns:
        (the model in eval mode, the splits, {"checkpoint", "data", "seed", "load_size", "val_fraction",
        "test_fraction", "shapes_size"}: what re-creates the splits).
    """
    from vitkit.data.inference import load_eval_model
    from vitkit.train.distributed import resolve_device

    dev = resolve_device(device)
    if isinstance(checkpoint, nn.Module):
        model, record, ckpt = checkpoint.to(dev).eval(), {}, None
    else:
        model, record = load_eval_model(checkpoint, dev)
        ckpt = str(checkpoint)
    spec = data or record.get("data")
    if spec is None:
        where = "the model" if ckpt is None else repr(ckpt)
        raise ValueError(f"{where} does not record its training data: pass data=... (e.g. 'digits')")
    same = spec == record.get("data")
    run = run_split_settings(record, spec)
    seed = seed if seed is not None else run.pop("seed", 0)
    run.pop("seed", None)
    settings = dict(
        load_size=model.preprocess.load_size or (record.get("load_size") if same else None), **{**SPLIT_SETTINGS, **run}
    )
    splits = load_splits(spec, seed=seed, **settings)
    return model, splits, {"checkpoint": ckpt, "data": spec, "seed": seed, **settings}
