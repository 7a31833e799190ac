"""Semantic segmentation data: images with one class index per pixel, and their joint augmentation.

Sources (`load_segmentation_data(spec)`):

- "scenes" / "scenes:N": N procedural scenes (`vitkit.data.shapes.make_scenes`, default 2000, side `shapes_size`,
  seeded by the run's seed), 0 = background and 1-4 the shape classes. The split is by position: the first
  1 - val_fraction - test_fraction of the images train, the next val_fraction validate, the last test_fraction test
  (80/10/10 with the default fractions).
- a folder (PATH or "folder:PATH") holding `images/` and `masks/` with the same file stems (a.jpg + a.png) and a
  `classes.txt` (one class name per line, line i = mask value i; background first by convention). Masks are
  single-channel PNGs: palette PNGs (their palette indices are the classes, as VOC's) or 8-bit index PNGs. 255 marks
  pixels that count for nothing (`IGNORE_INDEX`). Images and masks are decoded to `load_size` squares (shorter side
  resized, centre crop; masks with nearest-neighbour) and split at random by `seed`.
- "coco:FILE.json": a COCO instances JSON, read as for detection (`vitkit.data.detection.parse_coco`: images in
  `images/` next to the JSON when that folder exists, else next to the JSON). Each image's semantic mask is made
  from its instance masks (polygons or RLE, rasterised by pycocotools as `COCO.annToMask` does): 0 = background,
  class k = the k-th category in id order ("background" + the category names). Where instances overlap, the smaller
  one is on top (larger instances are painted first; equal areas: the later annotation on top), so a small object
  in front of a large one is not lost; crowd regions (`iscrowd: 1`) are `IGNORE_INDEX` where no instance covers
  them. Decoded to `load_size` squares and split as a folder.

Bad pairs are reported and counted like unreadable images of classification folders: an image without a mask, a
mask without an image, an unreadable file, a mask whose size differs from its image's, a colour (RGB) mask, a mask
value that is not a class of classes.txt (nor 255). COCO entries are reported as the detection loader reports them
(a missing or unreadable image, an unknown category or image id), plus an annotation without a `segmentation`, with
malformed polygons, an RLE of another size than its image, or a mask of no pixel. `strict=True` refuses the first
one, naming the file (and the entry).

Augmentation runs on whole batches on the training device (`SegTrainTransform`): kornia's
`AugmentationSequential` with data_keys ["input", "mask"] crops and flips image and mask together, the mask with
nearest-neighbour sampling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from vitkit.data.dataset import DataSplits, channel_stats, check_fractions
from vitkit.data.files import report_skipped
from vitkit.data.images import IMAGE_EXTENSIONS, decode_image, resize_center_crop
from vitkit.data.shapes import SCENE_CLASSES, make_scenes
from vitkit.data.transforms import check_range

IGNORE_INDEX = 255  # mask value of pixels that count for nothing (VOC's borders); vitkit.train.seg_metrics agrees
DEFAULT_SCENES = 2000
DEFAULT_SEG_LOAD_SIZE = 224  # decode size of folder images and masks, as classification folders
SEG_SPEC_FORMS = """accepted segmentation data specs:
  scenes | scenes:N          procedural scenes of 1-5 shapes, background + 4 classes (N images, default 2000)
  PATH | folder:PATH         a folder with images/, masks/ (same file stems, palette or index PNGs) and classes.txt
  coco:FILE.json             COCO instances (polygons or RLE) as semantic masks; images in images/ next to it"""


@dataclass(eq=False)
class SegmentationDataset(torch.utils.data.Dataset):
    """Images with a class index per pixel, in memory.

    `dataset[i]` is `(uint8 image (3, H, W), uint8 mask (H, W))`.

    Attributes:
        images: uint8 (N, 3, H, W).
        masks: uint8 (N, H, W): class indices 0..K-1, or `IGNORE_INDEX`.
        class_names: Name of each class index (index 0 = background by convention).
        paths: Source image file of each item, or None for generated data.
    """

    images: Tensor
    masks: Tensor
    class_names: list[str]
    paths: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise TypeError(f"images must be a uint8 tensor (N, 3, H, W), got {_describe(self.images)}")
        if not isinstance(self.masks, Tensor) or self.masks.ndim != 3:
            raise TypeError(f"masks must be a tensor (N, H, W), got {_describe(self.masks)}")
        if self.masks.shape != (self.images.shape[0], *self.images.shape[2:]):
            raise ValueError(
                f"masks {tuple(self.masks.shape)} do not match images {tuple(self.images.shape)} (N, H, W)"
            )
        self.class_names = [str(c) for c in self.class_names]
        k = len(self.class_names)
        if k > IGNORE_INDEX:
            raise ValueError(f"at most {IGNORE_INDEX} classes fit uint8 masks with {IGNORE_INDEX} = ignore, got {k}")
        bad = (self.masks >= k) & (self.masks != IGNORE_INDEX) | (self.masks < 0)
        if bool(bad.any()):
            raise ValueError(f"mask value {int(self.masks[bad][0])} is outside 0..{k - 1} (or {IGNORE_INDEX})")
        self.masks = self.masks.to(torch.uint8)
        if self.paths is not None and len(self.paths) != len(self.images):
            raise ValueError(f"{len(self.paths)} paths but {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.masks[index]

    @property
    def labels(self) -> Tensor:
        """The masks: what `vitkit.train.loader.BatchLoader` batches next to the images."""
        return self.masks

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, indices: Sequence[int] | np.ndarray | Tensor) -> SegmentationDataset:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
        paths = None if self.paths is None else [self.paths[i] for i in idx.tolist()]
        return SegmentationDataset(self.images[idx], self.masks[idx], list(self.class_names), paths)

    def __repr__(self) -> str:
        h, w = self.image_size
        return f"SegmentationDataset({len(self)} images {h}x{w}, {self.num_classes} classes)"


def _describe(v: object) -> str:
    return f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------
def is_segmentation_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder with `images/` and `masks/` subfolders."""
    p = Path(path)
    return (p / "images").is_dir() and (p / "masks").is_dir()


# vitkit.data.load's classification sources: named as such when given where masks are needed
_CLASSIFICATION_SOURCES = ("digits", "shapes", "csv", "cifar10", "cifar100", "mnist", "fashion-mnist")


def _parse_seg_spec(spec: str) -> tuple[str, str | None]:
    if spec == "scenes" or spec.startswith("scenes:"):
        return "scenes", spec.partition(":")[2] or None
    if spec.startswith("coco:"):
        path = os.path.expanduser(spec.partition(":")[2])
        if not path:
            raise ValueError(f"data spec {spec!r} is missing the JSON path after 'coco:'\n{SEG_SPEC_FORMS}")
        return "coco", path
    if spec.partition(":")[0] in _CLASSIFICATION_SOURCES and not os.path.isdir(os.path.expanduser(spec)):
        raise ValueError(
            f"data spec {spec!r} is classification data (one label per image), not segmentation data (a class per "
            f"pixel)\n{SEG_SPEC_FORMS}"
        )
    path = os.path.expanduser(spec.removeprefix("folder:"))
    if os.path.isdir(path):
        if not is_segmentation_folder(path):
            raise ValueError(
                f"{path!r} (from data spec {spec!r}) is not a segmentation folder: it needs images/ and masks/ "
                f"subfolders and a classes.txt\n{SEG_SPEC_FORMS}"
            )
        return "folder", path
    raise ValueError(
        f"unknown segmentation data spec {spec!r}: not a known source and no such folder\n{SEG_SPEC_FORMS}"
    )


def load_segmentation_data(
    spec: str | os.PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    strict: bool = False,
    load_size: int | None = None,
    shapes_size: int = 64,
) -> DataSplits:
    """Load segmentation data and split it into train/val/test `SegmentationDataset`s.

    Args:
        spec: "scenes", "scenes:N", a folder PATH / "folder:PATH", or "coco:FILE.json" (see the module docstring).
        seed: Fixes the scenes and the folder split.
        val_fraction: Share of the images held out for validation.
        test_fraction: Share held out for the final test.
        strict: Raise ValueError on the first bad image or mask instead of skipping and listing it.
        load_size: Side of the square folder / COCO images and masks are decoded to (default 224); not for scenes.
        shapes_size: Side of the scene images.

    Returns:
        DataSplits whose datasets are `SegmentationDataset`s; `skipped` lists (path, reason) of every bad file.

    Raises:
        ValueError: an unknown spec, a folder without classes.txt or without any good pair, bad fractions, and with
            `strict` the first bad file (named, with the reason).
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"data spec must be a string or path, got {type(spec).__name__}\n{SEG_SPEC_FORMS}")
    spec = os.fspath(spec).strip()
    check_fractions(val_fraction, test_fraction)
    kind, arg = _parse_seg_spec(spec)
    if kind == "scenes":
        if load_size is not None:
            raise ValueError(f"load_size={load_size} does not apply to scenes: use shapes_size")
        count = DEFAULT_SCENES
        if arg is not None:
            if not arg.isdigit() or int(arg) <= 0:
                raise ValueError(f"scenes:N needs a positive integer N, got {spec!r}")
            count = int(arg)
        images, masks, _ = make_scenes(count, shapes_size, shapes_size, seed)
        full = SegmentationDataset(images, masks.to(torch.uint8), list(SCENE_CLASSES))
        n_val, n_test = round(count * val_fraction), round(count * test_fraction)
        n_train = count - n_val - n_test
        if n_train < 1:
            raise ValueError(
                f"scenes:{count} leaves no training image with val/test fractions {val_fraction}/{test_fraction}"
            )
        idx = np.arange(count)
        parts = (idx[:n_train], idx[n_train : n_train + n_val], idx[n_train + n_val :])
        skipped: list[tuple[str, str]] = []
    else:
        load = load_coco_masks if kind == "coco" else load_mask_folder
        full, skipped = load(arg, load_size or DEFAULT_SEG_LOAD_SIZE, strict=strict)
        order = np.random.default_rng(seed).permutation(len(full))
        n_val, n_test = round(len(full) * val_fraction), round(len(full) * test_fraction)
        n_train = len(full) - n_val - n_test
        if n_train < 1:
            raise ValueError(f"{arg}: {len(full)} good image/mask pair(s) leave no training image")
        parts = tuple(np.sort(p) for p in (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]))
    train, val, test = (full.subset(p) for p in parts)
    mean, std = channel_stats(train.images)
    return DataSplits(train, val, test, list(full.class_names), skipped, spec, mean, std)


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class names of a classes.txt: one per non-empty line, line i = mask value i.

    Raises:
        ValueError: the file is missing, empty, names a class twice, or lists more than 255 classes.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing: a segmentation folder needs a classes.txt (one class name per line)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} lists no classes (one class name per line, background first)")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path} names class(es) {dup} more than once")
    if len(names) > IGNORE_INDEX:
        raise ValueError(f"{path} lists {len(names)} classes; at most {IGNORE_INDEX} fit 8-bit masks")
    return names


def read_mask(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """A single-channel mask PNG as uint8 (H, W) class indices.

    Raises:
        ValueError: the file cannot be decoded, is a colour mask, or holds a value that is not a class (nor 255).
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("RGB", "RGBA"):
                raise ValueError(
                    f"is a colour ({mode}) mask: save masks as palette ('P') or 8-bit index ('L') PNGs whose values "
                    "are class indices"
                )
            if mode not in ("P", "L", "I;16", "I", "1"):
                raise ValueError(f"has mode {mode!r}: masks must be palette ('P') or index ('L') PNGs")
            mask = np.asarray(img)  # palette images give their indices, not colours
    except ValueError:
        raise
    except Exception as e:  # any decoder failure is a bad file
        raise ValueError(f"cannot be decoded ({type(e).__name__}: {e})") from None
    if mask.ndim != 2:
        raise ValueError(f"is not a single-channel mask (shape {mask.shape})")
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        values = sorted({int(v) for v in np.unique(mask[bad])})[:5]
        raise ValueError(
            f"holds value(s) {values} that are not classes of classes.txt (0..{num_classes - 1}) nor {IGNORE_INDEX}"
        )
    return mask.astype(np.uint8)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """The decode-size step of `resize_center_crop` for a mask: same geometry, nearest-neighbour values."""
    h, w = mask.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = np.array(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))  # a writable copy
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))  # resize_center_crop's rounding, exactly
    return resized[top : top + size, left : left + size]


def load_mask_folder(
    root: str | os.PathLike, size: int, *, strict: bool = False
) -> tuple[SegmentationDataset, list[tuple[str, str]]]:
    """Every good image/mask pair of a segmentation folder, decoded to `size` squares.

    Returns:
        (the dataset, (path, reason) of every bad or unpaired file), the bad files also reported in one warning.

    Raises:
        ValueError: no classes.txt, no good pair at all, or with `strict` the first bad file.
    """
    root = Path(root)
    class_names = read_class_list(root / "classes.txt")
    skipped: list[tuple[str, str]] = []

    def bad(path: Path, reason: str) -> None:
        if strict:
            raise ValueError(f"{path}: {reason} (pass strict=False to skip bad files)")
        skipped.append((str(path), reason))

    def by_stem(folder: Path) -> tuple[dict[str, Path], set[str]]:
        """(stem -> file, the stems several images share); files that are not images and the files of a shared
        stem (a.jpg + a.png: which one pairs is ambiguous) are reported, not paired."""
        files: dict[str, list[Path]] = {}
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                bad(p, f"not an image file (supported extensions: {', '.join(IMAGE_EXTENSIONS)})")
                continue
            files.setdefault(p.stem, []).append(p)
        shared = [stem for stem, same in files.items() if len(same) > 1]  # in file order: strict names the first
        for stem in shared:
            for p in files[stem]:
                others = ", ".join(q.name for q in files[stem] if q != p)
                bad(p, f"shares the stem {stem!r} with {others} in {folder.name}/: rename one (pairs go by stem)")
        return {stem: same[0] for stem, same in files.items() if len(same) == 1}, set(shared)

    (images, shared_images), (masks, shared_masks) = by_stem(root / "images"), by_stem(root / "masks")
    ambiguous = shared_images | shared_masks
    pairs = []
    for stem, img_path in images.items():
        if stem in ambiguous:  # its mask (or image) is one of several: reported above
            continue
        if stem not in masks:
            bad(img_path, f"has no mask: expected {root / 'masks' / (stem + '.png')}")
        else:
            pairs.append((img_path, masks[stem]))
    for stem, mask_path in masks.items():
        if stem not in images and stem not in ambiguous:
            bad(mask_path, f"has no image: expected images/{stem}.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS)}>")
    out_images, out_masks, paths = [], [], []
    for img_path, mask_path in pairs:
        try:
            image = decode_image(img_path)
        except Exception as e:  # any decoder failure is a bad file
            bad(img_path, f"cannot decode image ({type(e).__name__}: {e})")
            continue
        try:
            mask = read_mask(mask_path, len(class_names))
        except ValueError as e:
            bad(mask_path, f"mask {e}")
            continue
        if mask.shape != image.shape[:2]:
            bad(mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image {img_path.name} is "
                           f"{image.shape[1]}x{image.shape[0]} (W x H); masks must match their images")  # fmt: skip
            continue
        out_images.append(torch.from_numpy(resize_center_crop(image, size)).permute(2, 0, 1))
        out_masks.append(torch.from_numpy(_resize_mask(mask, size)))
        paths.append(str(img_path))
    report_skipped(skipped, str(root))
    if not out_images:
        raise ValueError(f"{root} has no readable image/mask pair ({len(skipped)} bad file(s): see the warning)")
    dataset = SegmentationDataset(torch.stack(out_images), torch.stack(out_masks), class_names, paths)
    return dataset, skipped


def _decode_rle(rle: dict) -> np.ndarray:
    """A compressed RLE as a boolean (H, W) mask (pycocotools' decode, without its numpy-2 DeprecationWarning about
    `np.array(copy=False)`, which pycocotools 2.0 raises on every call and which is not ours to fix)."""
    import warnings

    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def load_coco_masks(
    json_path: str | os.PathLike, size: int, *, strict: bool = False
) -> tuple[SegmentationDataset, list[tuple[str, str]]]:
    """Every good image of a COCO instances JSON with its semantic mask (see the module docstring for the rules),
    decoded to `size` squares as a mask folder is.

    Returns:
        (the dataset, (where, reason) of every bad entry), the bad entries also reported in one warning.

    Raises:
        ValueError: not a COCO instances file, no categories, more classes than 8-bit masks hold, no good image, or
            with `strict` the first bad entry (naming the file and the entry).
    """
    from pycocotools import mask as mask_utils

    from vitkit.data.detection import parse_coco, segmentation_rle

    layers: dict[int, list[tuple[int, int, int, dict]]] = {}  # image id -> (crowd?, -area, order, class) + RLE
    labels: dict[int, int] = {}

    def read_mask(a: dict, img: dict) -> None:
        if "segmentation" not in a:
            raise ValueError("has no 'segmentation' (polygons or RLE): a semantic mask needs the instance's pixels")
        rle = segmentation_rle(a["segmentation"], img["h"], img["w"])
        area = int(mask_utils.area(rle))
        if area == 0:
            raise ValueError("its segmentation covers no pixel")
        crowd = bool(a.get("iscrowd", 0))
        entry = (0 if crowd else 1, -area, len(labels), rle)  # painted in this order: crowd, then large to small
        labels[len(labels)] = IGNORE_INDEX if crowd else a["category_id"]
        layers.setdefault(img["id"], []).append(entry)

    coco = parse_coco(json_path, read_mask, strict)
    class_names = ["background", *coco.category_names]
    if len(class_names) > IGNORE_INDEX:
        raise ValueError(f"{coco.path}: {len(class_names)} classes (background included) do not fit 8-bit masks")
    if not coco.images:
        raise ValueError(f"{coco.path}: no usable image ({len(coco.skipped)} bad entries, e.g. {coco.skipped[:1]})")
    index = {cid: k + 1 for k, cid in enumerate(coco.category_ids)}  # COCO id -> class index (0 = background)
    report_skipped(coco.skipped, str(coco.path))
    images, masks, paths = [], [], []
    for image_id in sorted(coco.images):
        img = coco.images.pop(image_id)
        semantic = np.zeros((img["h"], img["w"]), dtype=np.uint8)
        for _, _, order, rle in sorted(layers.get(image_id, []), key=lambda e: e[:3]):
            label = labels[order]
            semantic[_decode_rle(rle)] = label if label == IGNORE_INDEX else index[label]
        images.append(torch.from_numpy(resize_center_crop(img["array"], size)).permute(2, 0, 1))
        masks.append(torch.from_numpy(_resize_mask(semantic, size)))
        paths.append(img["file"])
    dataset = SegmentationDataset(torch.stack(images), torch.stack(masks), class_names, paths)
    return dataset, list(coco.skipped)


# ----------------------------------------------------------------------------------------------------------------
# Transforms (whole batches, on the device)
# ----------------------------------------------------------------------------------------------------------------
def _normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x.float() / 255.0 - mean) / std


class SegTrainTransform(nn.Module):
    """uint8 images (B, 3, H, W) + masks (B, H, W) -> normalised float images (B, 3, h, w) + long masks (B, h, w).

    A random resized crop to `size` (area `scale`, aspect `ratio`) and a horizontal flip with probability `hflip`,
    drawn once per image and applied to image (bilinear) and mask (nearest) alike by kornia.
    """

    def __init__(
        self,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (0.75, 4 / 3),
        hflip: float = 0.5,
    ) -> None:
        super().__init__()
        import kornia.augmentation as K

        self.size = tuple(int(s) for s in size)
        scale, ratio = check_range("scale", scale, upper=1.0), check_range("ratio", ratio)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        augs = [K.RandomResizedCrop(self.size, scale=tuple(scale), ratio=tuple(ratio))]
        if hflip > 0:
            augs.append(K.RandomHorizontalFlip(p=hflip))
        # Masks go through the same sampled parameters, resampled with nearest (kornia's default for "mask").
        self.aug = K.AugmentationSequential(*augs, data_keys=["input", "mask"])

    def forward(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        x = images.float() / 255.0
        m = masks[:, None].float()  # (B, 1, H, W): kornia transforms masks as images
        x, m = self.aug(x, m)
        return (x - self.mean) / self.std, m[:, 0].round().long()  # (B, 3, h, w), (B, h, w)


class SegEvalTransform(nn.Module):
    """uint8 images (B, 3, H, W) -> normalised float images resized to `size` (bilinear) when they differ from it.

    Masks are not touched: predictions are resized to the masks' size before they are scored.
    """

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.size = tuple(int(s) for s in size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std
