"""The regions a user gives MaskInversion: mask PNGs, tensors or boxes -> region ids and (R, H, W) bool masks.

Forms of one image's regions (``region_masks``):

- boxes (``boxes=True``): a list of ``[x0, y0, x1, y1]`` in the image's pixels (region ids "0", "1", ...) or a
  mapping ``{region id: [x0, y0, x1, y1]}``; a box covers the pixels whose centres lie inside it (clipped to
  the image);
- a PNG file: a label map; every distinct non-zero value is one region, its id the value ("1", "2", ...)
  (a black-and-white mask is one region);
- a folder: one PNG per region, non-zero = inside, its id the file stem;
- a tensor: (H, W) integers (a label map, as a PNG) or (R, H, W) booleans (ids "0", "1", ...);
- a mapping ``{region id: (H, W) tensor}``.

Masks must have the image's size and cover at least one pixel; anything else is an error naming the image and
the file or region. ``MaskSource`` finds the regions of each image of a folder run (``grounding-predict
--masks DIR`` with ``DIR/<image id>.png`` or ``DIR/<image id>/*.png``; ``--boxes FILE.json`` with
``{image id: boxes}``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image


def _box_mask(box: Any, height: int, width: int, where: str) -> torch.Tensor:
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        raise ValueError(f"{where}: a box is [x0, y0, x1, y1] in pixels, got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{where}: box {list(box)} is empty (x1 <= x0 or y1 <= y0)")
    columns = torch.arange(width, dtype=torch.float64) + 0.5
    rows = torch.arange(height, dtype=torch.float64) + 0.5
    return ((rows >= y0) & (rows <= y1))[:, None] & ((columns >= x0) & (columns <= x1))[None, :]


def _read_png(path: Path, where: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L") if image.mode not in ("L", "P", "I", "I;16", "1") else image)
    except OSError as error:
        raise ValueError(f"{where}: mask {path} cannot be read: {error}") from None
    return array.astype(np.int64)


def _label_regions(labels: np.ndarray | torch.Tensor, where: str) -> tuple[list[str], torch.Tensor]:
    labels = torch.as_tensor(np.asarray(labels)).long()
    values = [int(v) for v in torch.unique(labels).tolist() if v != 0]
    return [str(v) for v in values], torch.stack([labels == v for v in values]) if values else torch.zeros(0, *labels.shape, dtype=torch.bool)


def region_masks(entry: Any, height: int, width: int, image_id: str, boxes: bool = False) -> tuple[list[str], torch.Tensor]:
    """(region ids, (R, height, width) bool masks) of one image's ``entry`` (see the module docstring)."""
    where = f"image {image_id}"
    if boxes:
        items = entry.items() if isinstance(entry, dict) else enumerate(entry if isinstance(entry, (list, tuple)) else [None])
        ids, masks = [], []
        for region, box in items:
            ids.append(str(region))
            masks.append(_box_mask(box, height, width, f"{where}, region {region}"))
    elif isinstance(entry, (str, Path)):
        path = Path(entry)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
            if not files:
                raise ValueError(f"{where}: mask folder {path} holds no .png file")
            ids = [p.stem for p in files]
            masks = [torch.as_tensor(_read_png(p, where) != 0) for p in files]
        elif path.is_file():
            ids, stacked = _label_regions(_read_png(path, where), where)
            masks = list(stacked)
        else:
            raise ValueError(f"{where}: no such mask file or folder: {path}")
    elif isinstance(entry, dict):
        ids = [str(k) for k in entry]
        masks = [torch.as_tensor(v).bool() for v in entry.values()]
    elif isinstance(entry, (torch.Tensor, np.ndarray)):
        tensor = torch.as_tensor(entry)
        if tensor.ndim == 2:
            ids, stacked = _label_regions(tensor, where)
            masks = list(stacked)
        elif tensor.ndim == 3:
            ids, masks = [str(i) for i in range(tensor.shape[0])], list(tensor.bool())
        else:
            raise ValueError(f"{where}: masks must be (H, W) labels or (R, H, W) booleans, got shape {tuple(tensor.shape)}")
    else:
        raise TypeError(f"{where}: masks must be a PNG path, a folder, a tensor or a mapping, got {type(entry).__name__}")
    if not ids:
        raise ValueError(f"{where}: no region given (a mask of zeros only?)")
    for region, mask in zip(ids, masks):
        if tuple(mask.shape) != (height, width):
            raise ValueError(f"{where}, region {region}: the mask is {tuple(mask.shape)[::-1]} px (W, H), the image {width}x{height}")
        if not bool(mask.any()):
            raise ValueError(f"{where}, region {region}: the mask covers no pixel")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: region ids {ids} repeat")
    return ids, torch.stack(masks).bool()


def mask_box(mask: torch.Tensor) -> list[int]:
    """The pixel box [x0, y0, x1, y1] (x1, y1 exclusive) of a non-empty (H, W) mask."""
    rows = torch.nonzero(mask.any(1)).flatten()
    columns = torch.nonzero(mask.any(0)).flatten()
    return [int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1]


def read_boxes_file(path: str | Path) -> dict[str, Any]:
    """``{image id: boxes}`` of a JSON file (see the module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"boxes (--boxes): {path} cannot be read as JSON: {error}") from None
    if not isinstance(data, dict) or not all(isinstance(v, (list, dict)) for v in data.values()):
        raise ValueError(f"boxes (--boxes): {path} must hold {{image id: [[x0, y0, x1, y1], ...]}}")
    return {str(k): v for k, v in data.items()}


class MaskSource:
    """Where the regions of each image of a folder run come from: ``masks`` (a folder) or ``boxes`` (a JSON file)."""

    def __init__(self, masks: str | None = None, boxes: str | None = None) -> None:
        if masks is not None and boxes is not None:
            raise ValueError("give the regions as masks (--masks) or as boxes (--boxes), not both")
        self.folder = Path(masks) if masks is not None else None
        if self.folder is not None and not self.folder.is_dir():
            raise ValueError(f"masks (--masks): no such folder: {masks}")
        self.boxes = read_boxes_file(boxes) if boxes is not None else None

    def has(self, image_id: str) -> bool:
        if self.boxes is not None:
            return image_id in self.boxes
        return (self.folder / f"{image_id}.png").is_file() or (self.folder / image_id).is_dir()

    def regions(self, image_id: str, height: int, width: int) -> tuple[list[str], torch.Tensor]:
        if self.boxes is not None:
            return region_masks(self.boxes[image_id], height, width, image_id, boxes=True)
        file = self.folder / f"{image_id}.png"
        return region_masks(file if file.is_file() else self.folder / image_id, height, width, image_id)

    def missing(self, image_ids: Sequence[str]) -> list[str]:
        return [image_id for image_id in image_ids if not self.has(image_id)]
