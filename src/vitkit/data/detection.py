"""Object-detection data: the procedural "scenes", COCO JSON annotations, and augmentation that moves boxes with
the pixels.

    splits = load_detection_data("scenes:2000", seed=0, shapes_size=64)
    splits = load_detection_data("coco:data/instances.json", load_size=224)
    splits.train.images          # uint8 (N, 3, S, S)
    splits.train.targets[0]      # {"boxes": float32 (k, 4) xyxy in pixels of the S x S image, "labels": int64 (k,)}

Data specs:
    scenes | scenes:N     N images (default 2000) from `make_scenes(N, S, S, seed)` (S = shapes_size, seed = the
                          run's seed): the first 80% train, the next 10% validation, the last 10% test (the
                          val_fraction / test_fraction settings).
    coco:FILE.json        COCO instances JSON. Each image's `file_name` is resolved against the folder `images/`
                          next to the JSON when that folder exists, else against the JSON's own folder. Images are
                          decoded to load_size x load_size (stretched, so boxes scale by load_size / width and
                          load_size / height), and split at random by the seed into train / val / test fractions.
                          Boxes come from `bbox` (x, y, w, h in pixels), or when it is missing, from `segmentation`
                          (polygons or RLE, through pycocotools). Category ids are remapped to contiguous class
                          indices in id order; the ids and names are kept (`category_ids`, `class_names`) so results
                          can be written back with the original ids. Crowd annotations (`iscrowd: 1`) are left out
                          of training, as in DETR.

The COCO file is read by `parse_coco` (categories, images, annotations with their references checked), which
segmentation data shares (`vitkit.data.segmentation`, `coco:FILE.json` as semantic masks); `read_coco` makes boxes.

Bad entries (an image file that is missing or unreadable, a box outside its image or with no area, an unknown
category or image id) are skipped and listed in `DetectionSplits.skipped` as (where, reason), "where" naming the
file and the entry (e.g. `ann.json: annotations[12] (id 40)`), and reported in one warning, as bad image files are
for classification; with `strict=True` the first one raises a ValueError instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.data.boxes import clip_boxes, xywh_to_xyxy
from vitkit.data.dataset import channel_stats, check_fractions
from vitkit.data.files import report_skipped
from vitkit.data.images import decode_image
from vitkit.data.shapes import SHAPE_CLASSES, make_scenes

DEFAULT_SCENES = 2000
DEFAULT_COCO_LOAD_SIZE = 224
BOX_TOLERANCE = 1.0  # pixels a COCO box may stick out of its image (rounding in annotation tools) before it is bad
SPEC_FORMS = """accepted detection data specs:
  scenes | scenes:N     procedural scenes of 1-5 shapes (N images, default 2000; 80/10/10 split)
  coco:FILE.json        a COCO instances JSON; images in images/ next to it (or next to the JSON)"""

Target = dict[str, Tensor]  # {"boxes": float32 (k, 4) xyxy pixels, "labels": int64 (k,)}


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DetectionDataset:
    """Images of one size with their boxes.

    Attributes:
        images: uint8 (N, 3, H, W).
        targets: per image {"boxes": float32 (k, 4) xyxy in pixels of these images, "labels": int64 (k,)}.
        class_names: name of each class index.
        image_ids: per image its id in the source (the COCO image id; the scene index for scenes).
        orig_sizes: per image its (H, W) in the source file (boxes are scaled to `images`' size).
        paths: per image its file, or None for generated images.
    """

    images: Tensor
    targets: list[Target]
    class_names: list[str]
    image_ids: list[int] = field(default_factory=list)
    orig_sizes: list[tuple[int, int]] = field(default_factory=list)
    paths: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.images)
        if len(self.targets) != n:
            raise ValueError(f"{n} images but {len(self.targets)} targets")
        h, w = self.images.shape[-2:]
        self.image_ids = list(self.image_ids) or list(range(n))
        self.orig_sizes = list(self.orig_sizes) or [(int(h), int(w))] * n
        self.paths = list(self.paths) or [None] * n

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_boxes(self) -> int:
        return sum(len(t["labels"]) for t in self.targets)

    def subset(self, indices: Sequence[int] | np.ndarray | Tensor) -> DetectionDataset:
        idx = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        return DetectionDataset(
            images=self.images[idx] if idx else self.images[:0],
            targets=[self.targets[i] for i in idx],
            class_names=self.class_names,
            image_ids=[self.image_ids[i] for i in idx],
            orig_sizes=[self.orig_sizes[i] for i in idx],
            paths=[self.paths[i] for i in idx],
        )

    def batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, list[Target]]:
        """(uint8 images (b, 3, H, W), their targets) for some indices: what a detection loader yields."""
        idx = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        return self.images[idx], [self.targets[i] for i in idx]


@dataclass
class DetectionSplits:
    """train / val / test `DetectionDataset`s with what describes them (as `DataSplits` does for classification).

    Attributes:
        class_names: name of each class index 0..K-1.
        category_ids: the source's category id of each class (COCO ids; 1..K for scenes).
        skipped: (where, reason) for every bad entry left out.
        source: the data spec.
        mean, std: per-channel statistics of the training images (0..1 scale).
    """

    train: DetectionDataset
    val: DetectionDataset
    test: DetectionDataset
    class_names: list[str]
    category_ids: list[int]
    skipped: list[tuple[str, str]]
    source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def collate_detection(samples: Sequence[tuple[Tensor, Target]]) -> tuple[Tensor, list[Target]]:
    """[(image (3, H, W), target)] -> (images (B, 3, H, W), [target]): targets keep their own lengths."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    images, targets = zip(*samples, strict=True)
    return torch.stack(list(images)), list(targets)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def is_detection_spec(spec: str) -> bool:
    """Whether `spec` names detection data (scenes or COCO JSON)."""
    return spec == "scenes" or spec.startswith(("scenes:", "coco:"))


def load_detection_data(
    spec: str | os.PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    strict: bool = False,
    load_size: int | None = None,
    shapes_size: int = 64,
) -> DetectionSplits:
    """Load detection data and split it (see the module docstring for the specs and rules).

    Args:
        spec: "scenes", "scenes:N" or "coco:FILE.json".
        seed: fixes the scenes and the COCO split.
        val_fraction: share of the images held out for validation (scenes: the images after the training ones).
        test_fraction: share held out for the final test (scenes: the last images).
        strict: raise on the first bad entry instead of skipping and reporting it.
        load_size: COCO: side of the square images are decoded to (default 224). Not for scenes.
        shapes_size: side of the scene images.

    Raises:
        ValueError: an unknown spec, a missing or malformed file, too few images, or (strict) a bad entry.
    """
    spec = os.fspath(spec).strip()
    if spec == "scenes" or spec.startswith("scenes:"):
        if load_size is not None:
            raise ValueError(f"load_size={load_size} does not apply to scenes: use shapes_size")
        arg = spec.partition(":")[2]
        if arg and (not arg.isdigit() or int(arg) < 10):
            raise ValueError(f"scenes:N needs an integer N >= 10 (80/10/10 split), got {spec!r}")
        check_fractions(val_fraction, test_fraction)
        count = int(arg) if arg else DEFAULT_SCENES
        return scenes_splits(count, shapes_size, seed, spec, val_fraction=val_fraction, test_fraction=test_fraction)
    if spec.startswith("coco:"):
        path = os.path.expanduser(spec.partition(":")[2])
        if not path:
            raise ValueError(f"data spec {spec!r} is missing the JSON path after 'coco:'\n{SPEC_FORMS}")
        check_fractions(val_fraction, test_fraction)
        size = DEFAULT_COCO_LOAD_SIZE if load_size is None else load_size
        return coco_splits(path, size, seed, val_fraction, test_fraction, strict, spec)
    raise ValueError(f"{spec!r} is not detection data\n{SPEC_FORMS}")


def scenes_splits(
    count: int, size: int, seed: int, spec: str = "scenes", *, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> DetectionSplits:
    """`make_scenes(count, size, size, seed)`: the first 1 - val_fraction - test_fraction train, the next
    val_fraction validate, the last test_fraction test (80/10/10 by default).

    Raises:
        ValueError: the fractions leave no training image.
    """
    # int(0.8 N), int(0.9 N) with the default fractions, as the 80/10/10 cut always was (the epsilon keeps float
    # error such as 0.7 * 40 = 27.999... from losing an image)
    a = int(count * (1 - val_fraction - test_fraction) + 1e-9)
    b = int(count * (1 - test_fraction) + 1e-9)
    if a < 1:
        raise ValueError(
            f"scenes:{count} leaves no training image with val/test fractions {val_fraction}/{test_fraction}"
        )
    images, _, scene_targets = make_scenes(count, size, size, seed)
    targets = [{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in scene_targets]
    full = DetectionDataset(images, targets, list(SHAPE_CLASSES))
    train, val, test = full.subset(range(a)), full.subset(range(a, b)), full.subset(range(b, count))
    mean, std = channel_stats(train.images)
    ids = list(range(1, len(SHAPE_CLASSES) + 1))
    return DetectionSplits(train, val, test, list(SHAPE_CLASSES), ids, [], spec, mean, std)


def _bad(where: str, reason: str, strict: bool, skipped: list[tuple[str, str]]) -> None:
    if strict:
        raise ValueError(f"{where}: {reason} (pass strict=False to skip bad entries)")
    skipped.append((where, reason))


def _image_root(json_path: Path) -> Path:
    images = json_path.parent / "images"
    return images if images.is_dir() else json_path.parent


def segmentation_rle(seg: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO `segmentation` (polygons or RLE, compressed or not) as one compressed RLE of the image's size.

    Raises:
        ValueError: malformed polygons, an RLE whose size is not the image's, or neither form.
    """
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons: [[x0, y0, x1, y1, ...], ...]
        if not seg or any(not isinstance(p, list) or len(p) < 6 or len(p) % 2 for p in seg):
            raise ValueError("polygons must be lists of at least 3 x, y pairs")
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        rle = mask_utils.frPyObjects(seg, *seg["size"]) if isinstance(seg["counts"], list) else seg
        if list(rle["size"]) != [height, width]:
            raise ValueError(f"RLE size {list(rle['size'])} differs from the image's {[height, width]}")
        if isinstance(rle["counts"], str):  # compressed RLE as read from JSON: pycocotools wants bytes
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        return rle
    raise ValueError("segmentation must be polygons (a list) or an RLE ({counts, size})")


def _segmentation_box(seg: Any, height: int, width: int) -> list[float]:
    """The xywh box of a COCO segmentation (polygons or RLE) through pycocotools."""
    from pycocotools import mask as mask_utils

    return [float(v) for v in mask_utils.toBbox(segmentation_rle(seg, height, width))]


@dataclass
class CocoFile:
    """A COCO instances JSON read and checked entry by entry (`parse_coco`), before boxes or masks are made.

    Attributes:
        path: the JSON file.
        category_ids: the category ids in increasing order (class k of the detector is category_ids[k]).
        category_names: the name of each, in the same order.
        images: good images by id: {"file": path, "array": decoded uint8 (h, w, 3), "h", "w"}.
        skipped: (where, reason) of every bad entry, in file order.
    """

    path: Path
    category_ids: list[int]
    category_names: list[str]
    images: dict[int, dict[str, Any]]
    skipped: list[tuple[str, str]]


def parse_coco(
    json_path: str | os.PathLike,
    on_annotation: Callable[[dict[str, Any], dict[str, Any]], None],
    strict: bool = False,
) -> CocoFile:
    """Read a COCO instances JSON: its categories, its images (decoded, resolved as in the module docstring), and
    each annotation that points at a known category and a good image handed to `on_annotation(annotation, image)`
    in file order (crowd ones included). Shared by detection (`read_coco`: boxes) and segmentation
    (`vitkit.data.segmentation.load_coco_masks`: masks).

    Args:
        json_path: the JSON file.
        on_annotation: reads one annotation into the caller's targets; a ValueError it raises makes the annotation
            a bad entry (reported with the ValueError's text, or raised under `strict`).
        strict: raise on the first bad entry instead of skipping and listing it.

    Raises:
        ValueError: a file that is not a COCO instances JSON (naming what is missing), no categories, or (strict)
            the first bad entry, naming the file and the entry.
    """
    path = Path(json_path)
    if not path.is_file():
        raise ValueError(f"COCO annotation file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in ("images", "categories")):
        raise ValueError(f"{path} is not a COCO instances file: it needs lists 'images', 'annotations', 'categories'")
    annotations = data.get("annotations") or []
    if not isinstance(annotations, list):
        raise ValueError(f"{path}: 'annotations' must be a list")
    name = path.name
    skipped: list[tuple[str, str]] = []

    cats = data["categories"]
    ids: list[int] = []
    names: dict[int, str] = {}
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise ValueError(f"{path}: categories[{i}] needs an integer 'id', got {c!r}")
        if c["id"] in names:
            raise ValueError(f"{path}: categories[{i}] repeats category id {c['id']}")
        names[c["id"]] = str(c.get("name", c["id"]))
        ids.append(c["id"])
    if not ids:
        raise ValueError(f"{path} lists no categories")
    ids.sort()

    root = _image_root(path)
    images: dict[int, dict[str, Any]] = {}
    for i, im in enumerate(data["images"]):
        where = f"{name}: images[{i}]" + (f" (id {im.get('id')})" if isinstance(im, dict) else "")
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            _bad(where, "an image entry needs an integer 'id' and a 'file_name'", strict, skipped)
            continue
        if im["id"] in images:
            _bad(where, f"repeats image id {im['id']}", strict, skipped)
            continue
        file = root / im["file_name"]
        try:
            array = decode_image(file)
        except Exception as e:  # every decoder failure is a bad entry to report
            _bad(f"{where} {file}", f"{type(e).__name__}: {e}", strict, skipped)
            continue
        h, w = array.shape[:2]
        if (im.get("height"), im.get("width")) not in ((None, None), (h, w)):
            _bad(where, f"says {im.get('height')}x{im.get('width')} but {file} is {h}x{w}", strict, skipped)
            continue
        images[im["id"]] = {"id": im["id"], "file": str(file), "array": array, "h": h, "w": w}

    for i, a in enumerate(annotations):
        where = f"{name}: annotations[{i}]" + (f" (id {a.get('id')})" if isinstance(a, dict) else "")
        if not isinstance(a, dict):
            _bad(where, "an annotation must be an object", strict, skipped)
            continue
        if a.get("category_id") not in names:
            _bad(where, f"unknown category_id {a.get('category_id')!r} (known: {ids})", strict, skipped)
            continue
        if a.get("image_id") not in images:
            _bad(where, f"image_id {a.get('image_id')!r} is not a (good) image of the file", strict, skipped)
            continue
        try:
            on_annotation(a, images[a["image_id"]])
        except ValueError as e:
            _bad(where, str(e), strict, skipped)
    return CocoFile(path, ids, [names[c] for c in ids], images, skipped)


def read_coco(
    json_path: str | os.PathLike, load_size: int, strict: bool = False
) -> tuple[DetectionDataset, list[int], list[tuple[str, str]]]:
    """Read a COCO instances JSON (`parse_coco`) and decode its images to load_size x load_size with their boxes.

    Returns:
        (the dataset of good images with their good boxes, the category id of each class index, skipped entries).

    Raises:
        ValueError: a file that is not a COCO instances JSON (naming what is missing), no categories, no usable
            image, or (strict) the first bad entry, naming the file and the entry.
    """
    boxes_of: dict[int, list[list[float]]] = {}
    labels_of: dict[int, list[int]] = {}

    def read_box(a: dict[str, Any], img: dict[str, Any]) -> None:
        if a.get("iscrowd", 0):
            return  # crowd regions are not objects to find one by one (DETR drops them too)
        box = a.get("bbox")
        if box is None:
            if "segmentation" not in a:
                raise ValueError("has neither 'bbox' nor 'segmentation'")
            box = _segmentation_box(a["segmentation"], img["h"], img["w"])
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise ValueError(f"bbox must be [x, y, width, height] numbers, got {box!r}")
        x, y, bw, bh = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x, y, bw, bh)) or bw <= 0 or bh <= 0:
            raise ValueError(f"box [x, y, w, h] = {box} has no area")
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + bw > img["w"] + t or y + bh > img["h"] + t:
            raise ValueError(f"box [x, y, w, h] = {box} lies outside the {img['w']}x{img['h']} image")
        boxes_of.setdefault(img["id"], []).append([x, y, bw, bh])
        labels_of.setdefault(img["id"], []).append(a["category_id"])

    coco = parse_coco(json_path, read_box, strict)
    path, ids, skipped, images = coco.path, coco.category_ids, coco.skipped, coco.images
    index = {cid: k for k, cid in enumerate(ids)}  # COCO id -> contiguous class index, in id order

    if not images:
        raise ValueError(f"{path}: no usable image ({len(skipped)} bad entries, e.g. {skipped[:1]})")
    report_skipped(skipped, str(path))
    order = sorted(images)
    pixels = torch.empty((len(order), 3, load_size, load_size), dtype=torch.uint8)
    targets, sizes, files = [], [], []
    for k, image_id in enumerate(order):
        img = images.pop(image_id)
        t = torch.from_numpy(img["array"]).permute(2, 0, 1)[None].float()  # (1, 3, h, w)
        resized = F.interpolate(t, size=(load_size, load_size), mode="bilinear", antialias=True, align_corners=False)
        pixels[k] = resized[0].round().clamp(0, 255).to(torch.uint8)
        boxes = xywh_to_xyxy(torch.tensor(boxes_of.get(image_id, []), dtype=torch.float32).reshape(-1, 4))
        scale = torch.tensor([load_size / img["w"], load_size / img["h"]] * 2)
        boxes = clip_boxes(boxes * scale, (load_size, load_size))
        labels = [index[c] for c in labels_of.get(image_id, [])]
        targets.append({"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64)})
        sizes.append((img["h"], img["w"]))
        files.append(img["file"])
    dataset = DetectionDataset(pixels, targets, list(coco.category_names), order, sizes, files)
    return dataset, ids, skipped


def coco_splits(
    json_path: str, load_size: int, seed: int, val_fraction: float, test_fraction: float, strict: bool, spec: str
) -> DetectionSplits:
    """`read_coco`, then a random split of the images (seeded) into train / val / test fractions."""
    full, ids, skipped = read_coco(json_path, load_size, strict)
    n = len(full)
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise ValueError(f"{json_path}: {n} usable images leave none for training after the val/test fractions")
    val, test, train = perm[:n_val], perm[n_val : n_val + n_test], perm[n_val + n_test :]
    train_ds = full.subset(np.sort(train))
    mean, std = channel_stats(train_ds.images)
    return DetectionSplits(
        train_ds, full.subset(np.sort(val)), full.subset(np.sort(test)), full.class_names, ids, skipped, spec, mean, std
    )


# ----------------------------------------------------------------------------------------------------------------
# Transforms: images and boxes together, on whole batches on the training device
# ----------------------------------------------------------------------------------------------------------------
class DetectionTransform(nn.Module):
    """uint8 images + xyxy pixel boxes -> normalised float images at `size` + boxes in that image's pixels.

    Training (`train=True`): a random zoom in [1 / max_zoom, max_zoom] with a random offset (zooming in crops a
    window inside the image; zooming out shows the whole image smaller, padded with the mean colour), then a
    horizontal flip with probability `hflip`. The boxes follow the same affine map exactly; a box whose visible
    part is less than `min_visible` of its area (it left the image) is dropped, the rest are clipped to the image.
    Evaluation: a plain resize to `size`, boxes scaled with it. Randomness comes from torch's global CPU generator
    (seeded and checkpointed by the Trainer), so runs and resumes are reproducible on any device.

    Args:
        size: output (H, W).
        mean, std: per-channel normalisation (0..1 scale).
        train: augment (see above) or only resize.
        max_zoom: largest zoom factor (1 = no zoom jitter).
        hflip: horizontal flip probability.
        min_visible: smallest fraction of a box's area that must stay inside the image for it to be kept.
    """

    def __init__(
        self,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool = False,
        max_zoom: float = 1.25,
        hflip: float = 0.5,
        min_visible: float = 0.5,
    ) -> None:
        super().__init__()
        if max_zoom < 1:
            raise ValueError(f"max_zoom must be >= 1, got {max_zoom}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        if not 0 < min_visible <= 1:
            raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
        self.size = (int(size[0]), int(size[1]))
        self.train_mode, self.max_zoom, self.hflip, self.min_visible = train, max_zoom, hflip, min_visible
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, targets: Sequence[Target]) -> tuple[Tensor, list[Target]]:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        B, _, H, W = images.shape
        Ho, Wo = self.size
        x = (images.float() / 255 - self.mean) / self.std  # (B, 3, H, W); padding with 0 = the mean colour
        # Input pixel (edge) coordinate = a * output coordinate + t, per axis; a = the plain resize's scale / zoom.
        ax = torch.full((B,), W / Wo, dtype=torch.float64)
        ay = torch.full((B,), H / Ho, dtype=torch.float64)
        tx, ty = torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
        flip = torch.zeros(B, dtype=torch.bool)
        if self.train_mode:
            log_zoom = (torch.rand(B, dtype=torch.float64) * 2 - 1) * math.log(self.max_zoom)
            zoom = log_zoom.exp()
            ax, ay = ax / zoom, ay / zoom
            # The window [t, t + a * size] stays inside the image when zooming in; the image inside the window when
            # zooming out.
            span_x, span_y = W - ax * Wo, H - ay * Ho
            tx = (
                torch.minimum(span_x, torch.zeros(B, dtype=torch.float64))
                + torch.rand(B, dtype=torch.float64) * span_x.abs()
            )
            ty = (
                torch.minimum(span_y, torch.zeros(B, dtype=torch.float64))
                + torch.rand(B, dtype=torch.float64) * span_y.abs()
            )
            flip = torch.rand(B) < self.hflip
        identity = not self.train_mode and (H, W) == (Ho, Wo)
        if identity:
            out = x
        elif not self.train_mode:
            out = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        else:
            # affine_grid maps output to input coordinates in [-1, 1] (pixel edges with align_corners=False).
            theta = torch.zeros(B, 2, 3, dtype=torch.float64)
            theta[:, 0, 0] = ax * Wo / W
            theta[:, 0, 2] = (ax * Wo + 2 * tx) / W - 1
            theta[:, 1, 1] = ay * Ho / H
            theta[:, 1, 2] = (ay * Ho + 2 * ty) / H - 1
            grid = F.affine_grid(theta.float().to(x.device), [B, 3, Ho, Wo], align_corners=False)
            out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out = torch.where(flip.to(x.device).view(B, 1, 1, 1), out.flip(-1), out)
        new_targets = []
        for b, t in enumerate(targets):
            boxes = t["boxes"].to(torch.float64)
            scale = torch.tensor([ax[b], ay[b], ax[b], ay[b]], dtype=torch.float64, device=boxes.device)
            shift = torch.tensor([tx[b], ty[b], tx[b], ty[b]], dtype=torch.float64, device=boxes.device)
            moved = (boxes - shift) / scale  # (k, 4) in output pixels
            if flip[b]:
                moved = torch.stack([Wo - moved[:, 2], moved[:, 1], Wo - moved[:, 0], moved[:, 3]], dim=-1)
            clipped = clip_boxes(moved, self.size)
            keep = torch.ones(len(moved), dtype=torch.bool, device=boxes.device)
            if self.train_mode and len(moved):
                area = (moved[:, 2:] - moved[:, :2]).prod(-1)
                visible = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0).prod(-1)
                keep = visible >= self.min_visible * area.clamp(min=1e-9)
            new_targets.append({**t, "boxes": clipped[keep].float(), "labels": t["labels"][keep]})
        return out, new_targets
