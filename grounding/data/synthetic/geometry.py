"""Shape geometry and rasterisation: outlines, rotation, pycocotools-exact polygon masks,
anti-aliased coverage, and mask boxes / uncompressed RLE."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .config import SHAPE_NAMES

SUPERSAMPLE = 4
"""Anti-aliasing factor of the drawn shapes (coverage is computed at this factor)."""
_PIL_OFFSET = 0.5
"""Offset (super-sampled pixels) that aligns PIL's polygon fill with pycocotools' rasterisation."""
_CIRCLE_VERTICES = 32


def shape_outline(shape: str, size: float) -> np.ndarray:
    """Return the unrotated outline of ``shape`` centred at the origin, float64 (V, 2) (x, y).

    ``size`` is the side of the (unrotated) bounding box; y points down, triangles point up.
    """
    half = size / 2.0
    if shape == "circle":
        angles = np.linspace(0.0, 2.0 * np.pi, _CIRCLE_VERTICES, endpoint=False)
        return np.stack([half * np.cos(angles), half * np.sin(angles)], axis=1)
    if shape == "square":
        return np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    if shape == "triangle":
        return np.array([[0.0, -half], [half, half], [-half, half]])
    if shape == "diamond":
        return np.array([[0.0, -half], [0.7 * half, 0.0], [0.0, half], [-0.7 * half, 0.0]])
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, half, 0.42 * half)
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        return points - (points.max(axis=0) + points.min(axis=0)) / 2.0
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPE_NAMES)}")


def rotate_points(points: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate (V, 2) points about the origin by ``angle_deg`` (clockwise on screen); returns (V, 2)."""
    theta = math.radians(angle_deg)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return points @ rotation.T


def rasterize_polygon(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rasterise a (V, 2) polygon exactly as pycocotools does; returns a bool (height, width) mask.

    Pixel (row r, column c) covers [c, c+1) × [r, r+1) in polygon coordinates.
    """
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects([points.reshape(-1).tolist()], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def polygon_coverage(points: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Return the anti-aliased coverage in [0, 1] of a (V, 2) polygon over the pixel box.

    ``box`` = (x0, y0, x1, y1), integer pixel bounds (x1, y1 exclusive); the result is float32
    (y1 - y0, x1 - x0), computed by filling at SUPERSAMPLE× resolution and box-averaging.
    """
    x0, y0, x1, y1 = box
    canvas = Image.new("L", ((x1 - x0) * SUPERSAMPLE, (y1 - y0) * SUPERSAMPLE), 0)
    shifted = (points - np.array([x0, y0])) * SUPERSAMPLE + _PIL_OFFSET
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in shifted.tolist()], fill=255)
    small = canvas.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def mask_bbox(mask: np.ndarray) -> list[float]:
    """Return the tight COCO box [x, y, w, h] (float pixels) of a non-empty bool (H, W) mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a bool (H, W) mask as COCO uncompressed RLE ``{"size": [H, W], "counts": [...]}``.

    Counts are run lengths over the column-major (Fortran) flattening, starting with a run of 0s.
    """
    flat = mask.astype(np.uint8).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}
