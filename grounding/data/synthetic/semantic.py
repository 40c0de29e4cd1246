"""Semantic label maps: the ignore band around boundaries and the per-image label map written as
``semantic/<split>/{image_id:06d}.png`` (in the VOC palette of ``grounding.data.label_maps``)."""

from __future__ import annotations

import numpy as np

from grounding.constants import IGNORE_INDEX

from .scene import SceneObject


def label_boundary_band(labels: np.ndarray, radius: int) -> np.ndarray:
    """Return bool (H, W): pixels within ``radius`` (chessboard) of a pixel with a different label."""
    band = np.zeros(labels.shape, dtype=bool)
    if radius <= 0:
        return band
    height, width = labels.shape
    padded = np.pad(labels, radius, mode="edge")
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = padded[radius + dy:radius + dy + height, radius + dx:radius + dx + width]
            band |= shifted != labels
    return band


def semantic_label_map(scene: list[SceneObject], image_size: int, border_px: int) -> np.ndarray:
    """Return the uint8 (S, S) VOC-style label map: 0 background, category id of the visible
    object, IGNORE_INDEX (255) on the ``border_px`` band around every object boundary."""
    labels = np.zeros((image_size, image_size), dtype=np.uint8)
    for obj in scene:
        labels[obj.visible] = obj.category_id
    labels[label_boundary_band(labels, border_px)] = IGNORE_INDEX
    return labels
