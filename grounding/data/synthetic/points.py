"""The synthetic dataset's label maps as OpenImages V7 point labels (``grounding.data.openimages_points``
reads them): a few positive points inside each class an image shows, negative points outside it, written
under ``<root>/openimages_points/<split>/`` by the DataModule; deterministic for a seed."""

from __future__ import annotations

import csv
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from grounding.constants import IGNORE_INDEX
from grounding.data.label_maps import read_class_names, read_label_png
from grounding.utils import write_atomic

from .config import images_dir, semantic_dir


@dataclass(frozen=True)
class PointFiles:
    """Where a split's point labels are: the DataModule's ``points_csv``, ``classes_csv``, ``image_dir``."""

    points_csv: Path
    classes_csv: Path
    image_dir: Path


def points_dir(root: str | Path, split: str) -> Path:
    """Return ``root/openimages_points/<split>``, where the DataModule writes the split's point labels."""
    return Path(root) / "openimages_points" / split


def synthetic_label_name(class_index: int) -> str:
    """The OpenImages-like LabelName of synthetic class ``class_index`` (0-based): "/m/syn0001" for 0."""
    return f"/m/syn{class_index + 1:04d}"


def sample_label_points(
    labels: np.ndarray, value: int, positives: int, negatives: int, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized pixel-centre points (N, 2) (x, y) and their labels (N,) int (1 / 0) for class ``value`` of a
    label map ``labels`` (H, W): up to ``positives`` distinct pixels of that value and up to ``negatives``
    distinct pixels of another value (never ``IGNORE_INDEX``, the uncertain border band)."""
    height, width = labels.shape
    rows, cols, kinds = [], [], []
    for kind, where, count in ((1, labels == value, positives), (0, (labels != value) & (labels != IGNORE_INDEX), negatives)):
        flat = np.flatnonzero(where)
        chosen = rng.choice(flat, size=min(count, flat.size), replace=False) if flat.size else flat
        rows.append(chosen // width)
        cols.append(chosen % width)
        kinds.append(np.full(chosen.size, kind))
    row, col = np.concatenate(rows), np.concatenate(cols)
    # the pixel centre: X * W then lands inside pixel col, whatever the rounding used downstream
    xy = np.stack([(col + 0.5) / width, (row + 0.5) / height], axis=1)
    return xy, np.concatenate(kinds)


def _write_csv(path: Path, rows: Iterable[Sequence[object]]) -> None:
    # another process (DDP) may write the same file: each writes its own temporary file, then renames
    def write(temporary: str) -> None:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(rows)

    write_atomic(path, write)


def write_synthetic_points(
    synthetic_root: str | Path, out_dir: str | Path, split: str, positives: int = 3, negatives: int = 3, seed: int = 0,
) -> PointFiles:
    """The semantic label PNGs of a synthetic dataset's split as OpenImages V7 point labels.

    Writes ``out_dir/oidv7-class-descriptions.csv`` (the non-background classes of ``semantic/classes.txt``,
    LabelNames ``synthetic_label_name``) and ``out_dir/oidv7-<split>-annotations-point-labels.csv``: for
    each image (stem = ImageId) and each class in its label PNG, up to ``positives`` "yes" points on the
    class's pixels and ``negatives`` "no" points on other classes' or background pixels. Each image's points
    come from a generator seeded by (seed, stem), so they do not depend on the other images.
    """
    # the columns of the format its reader defines (imported here: that module needs torch, this package not)
    from grounding.data.openimages_points import CLASS_COLUMNS, POINT_COLUMNS

    root, out_dir = Path(synthetic_root), Path(out_dir)
    names = read_class_names(root / "semantic" / "classes.txt")
    if names[0] != "background":
        raise ValueError(f"{root / 'semantic' / 'classes.txt'}: the first class must be 'background'; got {names[0]!r}")
    label_dir = semantic_dir(root, split)
    pngs = sorted(label_dir.glob("*.png"))
    if not pngs:
        raise FileNotFoundError(f"no label PNG in {label_dir} (split {split!r} of the synthetic dataset at {root})")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Sequence[object]] = [POINT_COLUMNS]
    for png in pngs:
        labels = read_label_png(png)
        rng = np.random.default_rng([seed, zlib.crc32(png.stem.encode())])
        for value in np.unique(labels):
            if value in (0, IGNORE_INDEX):
                continue
            xy, kinds = sample_label_points(labels, int(value), positives, negatives, rng)
            label = synthetic_label_name(int(value) - 1)  # label value v is class v - 1: background is no class
            rows += [(png.stem, "synthetic", label, f"{x:.8f}", f"{y:.8f}", "yes" if k else "no") for (x, y), k in zip(xy, kinds)]
    files = PointFiles(out_dir / f"oidv7-{split}-annotations-point-labels.csv", out_dir / "oidv7-class-descriptions.csv", images_dir(root, split))
    _write_csv(files.classes_csv, [CLASS_COLUMNS] + [(synthetic_label_name(i), n) for i, n in enumerate(names[1:])])
    _write_csv(files.points_csv, rows)
    return files
