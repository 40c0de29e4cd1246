"""Semantic label maps: the VOC palette, the ignore band around boundaries and the per-image
label map written as ``semantic/<split>/{image_id:06d}.png``."""

from __future__ import annotations

import numpy as np

from .scene import SceneObject


def voc_palette() -> list[int]:
    """Return the 768-entry PASCAL VOC colour map (index bits spread over the RGB high bits)."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        code = index
        for bit in range(8):
            red |= ((code >> 0) & 1) << (7 - bit)
            green |= ((code >> 1) & 1) << (7 - bit)
            blue |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette.extend([red, green, blue])
    return palette


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
    object, 255 on the ``border_px`` band around every object boundary."""
    labels = np.zeros((image_size, image_size), dtype=np.uint8)
    for obj in scene:
        labels[obj.visible] = obj.category_id
    labels[label_boundary_band(labels, border_px)] = 255
    return labels
