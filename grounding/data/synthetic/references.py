"""MIMIC's reference images of the synthetic concepts: crops of each category's annotated objects, written
once per split under ``<root>/mimic_references/<split>/<category>/`` (``grounding.data.concepts`` reads them
as the references of its synthetic targets)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from PIL import Image

from .config import images_dir, instances_path


def references_dir(root: str | Path, split: str) -> Path:
    """Return ``root/mimic_references/<split>`` (one folder per category, see :func:`category_folder`)."""
    return Path(root) / "mimic_references" / split


def category_folder(name: str) -> str:
    """Return the folder (and target id) of a category name: its words joined by "_" ("red_circle")."""
    return "_".join(name.split())


def write_synthetic_references(root: str | Path, split: str, per_category: int, size: int) -> Path:
    """Crops (``size`` px squares, box with a 10 % margin) of up to ``per_category`` annotated objects per category
    of the synthetic ``split``, under ``<root>/mimic_references/<split>/<category>/``. An existing folder is
    kept as it is; a new one is written beside it and renamed into place (a concurrent writer's is kept)."""
    from grounding.data.coco_file import read_coco  # the validated reader (it imports torch: only when writing)

    out = references_dir(root, split)
    if out.is_dir():
        return out
    coco = read_coco(instances_path(Path(root), split))
    image_dir = images_dir(Path(root), split)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    counts: dict[int, int] = {}
    try:
        for annotation in coco.annotations:
            category = annotation["category_id"]
            if counts.get(category, 0) >= per_category or annotation.get("iscrowd", 0):
                continue
            entry = coco.images[annotation["image_id"]]
            x, y, w, h = annotation["bbox"]
            margin = 0.1 * max(w, h)
            box = (max(0, x - margin), max(0, y - margin), min(entry["width"], x + w + margin), min(entry["height"], y + h + margin))
            with Image.open(image_dir / entry["file_name"]) as image:
                crop = image.convert("RGB").crop(tuple(int(round(v)) for v in box)).resize((size, size), Image.BICUBIC)
            folder = staging / category_folder(coco.categories[category])
            folder.mkdir(parents=True, exist_ok=True)
            crop.save(folder / f"{annotation['id']:06d}.png")
            counts[category] = counts.get(category, 0) + 1
        for name in coco.categories.values():
            (staging / category_folder(name)).mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, out)
        except OSError:
            if not out.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
