"""Image files on disk: a folder of class subfolders (optionally already split), or a CSV of `path,label` rows."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from vitkit.data.dataset import IMAGENET_MEAN, IMAGENET_STD, DataSplits, ImageDataset, stratified_split
from vitkit.data.files import check_classes_present, decode_files, fits_in_memory, report_skipped
from vitkit.data.images import IMAGE_EXTENSIONS, is_image_file

SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def _visible(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _list_class_folder(root: Path) -> tuple[list[str], list[str], list[int], list[tuple[str, str]]]:
    """Files of a class-per-subfolder tree: (class_names, paths, labels, non-image files)."""
    with os.scandir(root) as it:
        class_dirs = [e for e in _visible(list(it)) if e.is_dir()]
    if not class_dirs:
        raise ValueError(f"empty dataset: folder {root} has no class subfolders (expected {root}/<class>/<image>)")
    class_names = [e.name for e in class_dirs]
    paths: list[str] = []
    labels: list[int] = []
    not_images: list[tuple[str, str]] = []
    for label, entry in enumerate(class_dirs):
        found = 0
        for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(f for f in filenames if not f.startswith(".")):
                path = os.path.join(dirpath, name)
                if is_image_file(name):
                    paths.append(path)
                    labels.append(label)
                    found += 1
                else:
                    reason = f"not an image file (supported extensions: {', '.join(IMAGE_EXTENSIONS)})"
                    not_images.append((path, reason))
        if found == 0:
            raise ValueError(f"class folder {entry.path} has no images (supported: {', '.join(IMAGE_EXTENSIONS)})")
    return class_names, paths, labels, not_images


def _split_layout(root: Path) -> dict[str, Path] | None:
    """{split: folder} if `root` holds train/ (and val/valid/test) folders only, else None."""
    with os.scandir(root) as it:
        dirs = {e.name: Path(e.path) for e in _visible(list(it)) if e.is_dir()}
    known = {alias: split for split, aliases in SPLIT_DIRS.items() for alias in aliases}
    if not dirs or not set(dirs) <= set(known):
        return None
    if "train" not in dirs:
        # Only split folders (e.g. val/ and test/): read as classes they would make a "val" vs "test" classifier.
        raise ValueError(
            f"{root} holds split folders {sorted(dirs)} but no train/: add train/ with one subfolder per class, "
            "or point at a folder of class subfolders"
        )
    layout: dict[str, Path] = {}
    for name, path in dirs.items():
        if known[name] in layout:
            raise ValueError(f"{root} has two folders for the {known[name]} split: {layout[known[name]].name}, {name}")
        layout[known[name]] = path
    return layout


def _check_at_least_two(class_names: list[str], where: object) -> None:
    if len(class_names) < 2:
        raise ValueError(f"need at least 2 classes, found {len(class_names)} ({class_names}) in {where}")


def _decode(
    paths: list[str],
    labels: list[int],
    class_names: list[str],
    load_size: int,
    strict: bool,
    in_memory: bool,
    not_images: list[tuple[str, str]],
) -> tuple[ImageDataset, list[tuple[str, str]]]:
    if strict and not_images:
        path, reason = not_images[0]
        raise ValueError(f"cannot decode image {path}: {reason} (pass strict=False to skip bad files)")
    dataset, skipped = decode_files(paths, labels, class_names, load_size, strict=strict, in_memory=in_memory)
    return dataset, not_images + skipped


def _decode_and_split(
    source: Path,
    paths: list[str],
    labels: list[int],
    class_names: list[str],
    not_images: list[tuple[str, str]],
    *,
    load_size: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    strict: bool,
) -> DataSplits:
    """Decode a flat list of labelled files, report bad ones, and split them per class by `seed`."""
    in_memory = fits_in_memory(len(paths), load_size)
    dataset, skipped = _decode(paths, labels, class_names, load_size, strict, in_memory, not_images)
    report_skipped(skipped, str(source))
    check_classes_present(dataset, skipped, str(source))
    train_idx, val_idx, test_idx = stratified_split(dataset.labels, (val_fraction, test_fraction), seed)
    train, val, test = dataset.subset(train_idx), dataset.subset(val_idx), dataset.subset(test_idx)
    return DataSplits(train, val, test, class_names, skipped, str(source), IMAGENET_MEAN, IMAGENET_STD)


def load_folder(
    root: str | os.PathLike, *, load_size: int, seed: int, val_fraction: float, test_fraction: float, strict: bool
) -> DataSplits:
    """Load a folder of class subfolders, or of train/ val/ test/ folders that each hold class subfolders.

    Without split folders the images are split per class by `seed`. With them, a missing val/ or test/ split is
    carved from train/ the same way. See `vitkit.data.load_data` for the arguments.
    """
    root = Path(root)
    layout = _split_layout(root)
    if layout is None:
        class_names, paths, labels, not_images = _list_class_folder(root)
        _check_at_least_two(class_names, root)
        return _decode_and_split(
            root, paths, labels, class_names, not_images,
            load_size=load_size, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, strict=strict,
        )  # fmt: skip
    listed = {split: _list_class_folder(path) for split, path in layout.items()}
    class_names = listed["train"][0]
    _check_at_least_two(class_names, layout["train"])
    for split, (names, *_rest) in listed.items():
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise ValueError(f"{layout[split]} has class folders {unknown} that are not in {layout['train']}")
    total = sum(len(paths) for _names, paths, _labels, _ni in listed.values())
    in_memory = fits_in_memory(total, load_size)
    datasets: dict[str, ImageDataset] = {}
    skipped = []
    for split, (names, paths, labels, not_images) in listed.items():
        labels = [class_names.index(names[label]) for label in labels]  # a split may lack some classes
        datasets[split], bad = _decode(paths, labels, class_names, load_size, strict, in_memory, not_images)
        skipped += bad
    report_skipped(skipped, str(root))
    check_classes_present(datasets["train"], skipped, str(layout["train"]))
    train = datasets["train"]
    missing = [s for s in ("val", "test") if s not in datasets]
    if missing:
        fractions = [val_fraction if s == "val" else test_fraction for s in missing]
        train_idx, *carved = stratified_split(train.labels, fractions, seed)
        for split, idx in zip(missing, carved):
            datasets[split] = train.subset(idx)
        train = train.subset(train_idx)
    val, test = datasets["val"], datasets["test"]
    return DataSplits(train, val, test, class_names, skipped, str(root), IMAGENET_MEAN, IMAGENET_STD)


def _read_csv_rows(csv_path: Path) -> list[tuple[str, str, int]]:
    """(path column, label column, line number) of each data row; a header row is detected and dropped."""
    rows: list[tuple[str, str, int]] = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) < 2:
                raise ValueError(f"{csv_path} line {line_no}: expected 'path,label', got {row!r}")
            rows.append((row[0].strip(), row[1].strip(), line_no))  # further columns are ignored
    if rows:
        first = _resolve(rows[0][0], csv_path)
        if not os.path.isfile(first) and not is_image_file(first):  # a header row names columns, not image files
            rows = rows[1:]
    return rows


def _resolve(path: str, csv_path: Path) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(csv_path.parent, path)


def _sort_labels(labels: set[str]) -> list[str]:
    # Integer labels sort as numbers, so "10" comes after "9" and label "3" is class 3.
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def load_csv(
    csv_path: str | os.PathLike, *, load_size: int, seed: int, val_fraction: float, test_fraction: float, strict: bool
) -> DataSplits:
    """Load images listed in a CSV of `path,label` rows (relative paths are resolved against the CSV's folder).

    Classes are the sorted unique labels (numerically when all are integers); images are split per class by seed.
    A listed file that is missing is a bad file, reported and skipped like a corrupt one.
    """
    csv_path = Path(csv_path)
    rows = _read_csv_rows(csv_path)
    if not rows:
        raise ValueError(f"empty dataset: {csv_path} has no 'path,label' rows")
    empty_labels = [line for _p, label, line in rows if not label]
    if empty_labels:
        raise ValueError(f"{csv_path} line {empty_labels[0]}: empty label")
    class_names = _sort_labels({label for _p, label, _line in rows})
    _check_at_least_two(class_names, csv_path)
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels, not_images = [], [], []
    for path, label, _line in rows:
        path = _resolve(path, csv_path)
        if not os.path.isfile(path):
            not_images.append((path, "file not found"))
        elif not is_image_file(path):
            not_images.append((path, f"not an image file (supported extensions: {', '.join(IMAGE_EXTENSIONS)})"))
        else:
            paths.append(path)
            labels.append(index[label])
    return _decode_and_split(
        csv_path, paths, labels, class_names, not_images,
        load_size=load_size, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, strict=strict,
    )  # fmt: skip
