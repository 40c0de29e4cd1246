"""COCO segmentations (polygons, RLE, uncompressed RLE) to binary masks, through ``pycocotools.mask`` only.

One path for every reader: ``segmentation_rle`` turns any COCO segmentation into a compressed RLE
(pycocotools computes areas on it without decoding), ``decode_mask`` decodes the union of several
segmentations (a part without segmentation is its box). Errors name ``where`` (file and annotation id).
"""

from __future__ import annotations

import math

import numpy as np


def segmentation_rle(segmentation: object, height: int, width: int, where: str) -> dict | None:
    """Compressed RLE of one COCO segmentation; None when it holds no polygon with an area.

    Polygons with fewer than 3 points are dropped first (they enclose nothing, and pycocotools would take
    a 4-number polygon for a box). An RLE whose size is not (height, width) is an error naming ``where``.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not all(isinstance(p, (list, tuple)) and all(isinstance(v, (int, float)) for v in p) for p in segmentation):
            raise ValueError(f"{where}: segmentation is not a list of polygons (lists of numbers): {segmentation!r:.120}")
        polygons = [[float(v) for v in p] for p in segmentation if len(p) >= 6]
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"{where}: RLE mask is {size[1]}x{size[0]} (w x h) but its image is {width}x{height}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(segmentation, height, width)
        return {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
    raise ValueError(f"{where}: segmentation is neither polygons nor RLE: {segmentation!r:.120}")


def box_pixels(box_xywh: object, height: int, width: int, where: str) -> tuple[int, int, int, int]:
    """Pixel bounds (x0, y0, x1, y1), clipped to the image, of a COCO [x, y, w, h] box (outward rounding)."""
    if not isinstance(box_xywh, (list, tuple)) or len(box_xywh) != 4 or not all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in box_xywh
    ):
        raise ValueError(f"{where}: no segmentation and no valid bbox to use instead (bbox {box_xywh!r})")
    x, y, w, h = (float(v) for v in box_xywh)
    x0, y0 = min(max(int(x), 0), width), min(max(int(y), 0), height)
    x1, y1 = min(max(math.ceil(x + w), 0), width), min(max(math.ceil(y + h), 0), height)
    return x0, y0, max(x1, x0), max(y1, y0)


def mask_area(parts: tuple, height: int, width: int, where: str) -> int:
    """Sum of the areas of ``(segmentation or None, bbox)`` parts: 0 exactly when their union is empty."""
    from pycocotools import mask as mask_utils

    total = 0
    for segmentation, box in parts:
        if not segmentation:
            x0, y0, x1, y1 = box_pixels(box, height, width, where)
            total += (x1 - x0) * (y1 - y0)
        else:
            rle = segmentation_rle(segmentation, height, width, where)
            total += 0 if rle is None else int(mask_utils.area(rle))
    return total


def decode_mask(parts: tuple, height: int, width: int, where: str) -> np.ndarray:
    """Bool (height, width) union of ``(segmentation or None, bbox)`` parts."""
    from pycocotools import mask as mask_utils

    mask = np.zeros((height, width), dtype=bool)
    for segmentation, box in parts:
        if not segmentation:
            x0, y0, x1, y1 = box_pixels(box, height, width, where)
            mask[y0:y1, x0:x1] = True
        else:
            rle = segmentation_rle(segmentation, height, width, where)
            if rle is not None:
                mask |= mask_utils.decode(rle).astype(bool)
    return mask
