"""Image edits that make CLIP look at one region: the views of MaskInversion's baselines.

MaskInversion is compared with baselines that embed a region with an unchanged CLIP by editing the image
first: cropping to the region (``crop_view``), cropping and blanking everything outside the mask
(``masked_crop_view``) or drawing a red circle around the region in the full image (``red_circle_view``,
after Shtedritski et al., "What does CLIP know about a red circle?").

Every function takes an image tensor ``(3, H, W)``, ``uint8`` in [0, 255] or floating point in [0, 1], and a
mask ``(H, W)`` (bool; other dtypes count as True where non-zero), and returns a new tensor of the image's
dtype and device (never a view of the input). Resizing to CLIP's input size and normalisation are left to
the caller. An empty mask has no region and raises ``ValueError("empty mask: no region to crop")``.

Coordinates: pixel ``(row y, column x)`` covers the unit square ``[x, x + 1) × [y, y + 1)``, so a box
``(x0, y0, x1, y1)`` with exclusive ends spans ``[x0, x1) × [y0, y1)`` of the continuous plane and
``image[:, y0:y1, x0:x1]`` is its crop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from grounding.constants import CLIP_MEAN  # a pixel of this colour becomes 0 after CLIP normalisation

RED: tuple[int, int, int] = (255, 0, 0)

EMPTY_MASK_MESSAGE = "empty mask: no region to crop"

Box = tuple[int, int, int, int]


def _as_mask(mask) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dim() != 2:
        raise ValueError(f"mask must be (H, W), got shape {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _check(image: torch.Tensor, mask) -> torch.Tensor:
    """Validate ``image`` (3, H, W) uint8/float against ``mask`` (H, W); return the mask as bool."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) tensor, got {shape}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise TypeError(f"image must be uint8 or floating point, got {image.dtype}")
    mask = _as_mask(mask).to(image.device)
    if tuple(mask.shape) != tuple(image.shape[1:]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match image size {tuple(image.shape[1:])}")
    return mask


def _colour(image: torch.Tensor, values: Sequence[float], scale: float, name: str) -> torch.Tensor:
    """A (3, 1, 1) colour in the image's dtype; ``values / scale`` for float images, ``values`` for uint8."""
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {len(values)}")
    colour = torch.tensor(values, dtype=torch.float64, device=image.device)
    if image.dtype == torch.uint8:
        colour = colour.round().clamp(0, 255)
    else:
        colour = colour / scale
    return colour.to(image.dtype).view(3, 1, 1)


def mask_box(mask) -> Box:
    """Integer box ``(x0, y0, x1, y1)`` of the mask's True pixels, ends exclusive.

    ``mask[y0:y1, x0:x1]`` is the smallest slice holding every True pixel. Raises ``ValueError`` for an
    empty mask.
    """
    mask = _as_mask(mask)
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError(EMPTY_MASK_MESSAGE)
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def crop_box(mask, margin: float = 0.0) -> Box:
    """The mask's box enlarged by ``margin`` × its size on each side, clipped to the image.

    The box grows by ``round(margin × width)`` pixels on the left and on the right and by
    ``round(margin × height)`` on top and at the bottom (halves round up), then is clipped to ``[0, W)`` ×
    ``[0, H)``. ``margin`` must be ≥ 0.
    """
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    mask = _as_mask(mask)
    height, width = mask.shape
    x0, y0, x1, y1 = mask_box(mask)
    pad_x, pad_y = _round_half_up(margin * (x1 - x0)), _round_half_up(margin * (y1 - y0))
    return max(0, x0 - pad_x), max(0, y0 - pad_y), min(width, x1 + pad_x), min(height, y1 + pad_y)


def crop_view(image: torch.Tensor, mask, margin: float = 0.0) -> torch.Tensor:
    """Crop of ``image`` to the mask's box enlarged by ``margin`` (see :func:`crop_box`).

    Returns a new ``(3, h, w)`` tensor of the image's dtype.
    """
    mask = _check(image, mask)
    x0, y0, x1, y1 = crop_box(mask, margin)
    return image[:, y0:y1, x0:x1].clone()


def masked_crop_view(
    image: torch.Tensor, mask, margin: float = 0.0, fill: Sequence[float] = CLIP_MEAN
) -> torch.Tensor:
    """:func:`crop_view` with every pixel outside the mask set to ``fill``.

    ``fill`` is an RGB colour in [0, 1]; for uint8 images it is scaled by 255 and rounded. The default is
    CLIP's normalisation mean, so the blanked pixels become 0 after CLIP normalisation. Pixels inside the mask
    keep their exact values.
    """
    mask = _check(image, mask)
    x0, y0, x1, y1 = crop_box(mask, margin)
    fill_values = [float(v) for v in fill]
    if image.dtype == torch.uint8:
        fill_values = [v * 255.0 for v in fill_values]
    colour = _colour(image, fill_values, 1.0, "fill")
    crop = image[:, y0:y1, x0:x1]
    return torch.where(mask[y0:y1, x0:x1].unsqueeze(0), crop, colour.expand_as(crop))


def default_thickness(height: int, width: int) -> int:
    """Outline thickness in pixels used when none is given: ``max(1, round(0.01 × max(H, W)))``."""
    return max(1, round(0.01 * max(height, width)))


def ellipse_distance(height: int, width: int, box: Box, device=None) -> torch.Tensor:
    """Approximate signed distance (pixels) from every pixel centre to the ellipse circumscribing ``box``.

    The ellipse has the box centre ``(cx, cy)`` as centre and semi-axes ``a = √2 (x1 − x0) / 2``,
    ``b = √2 (y1 − y0) / 2``, so it passes through the four box corners. With the normalised radius
    ``r = √(((x − cx) / a)² + ((y − cy) / b)²)`` (1 on the ellipse) at pixel centres ``(x + 0.5, y + 0.5)``,
    the distance is the first-order one, ``(r − 1) / |∇r|``: exact for a circle, and accurate near the
    curve for any ellipse, so a band ``|d| ≤ t / 2`` has the same thickness ``t`` all around.
    Returns an ``(H, W)`` float64 tensor, negative inside the ellipse.
    """
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    a, b = math.sqrt(2.0) * (x1 - x0) / 2.0, math.sqrt(2.0) * (y1 - y0) / 2.0
    ys = torch.arange(height, dtype=torch.float64, device=device).view(-1, 1) + 0.5 - cy
    xs = torch.arange(width, dtype=torch.float64, device=device).view(1, -1) + 0.5 - cx
    radius = torch.sqrt((xs / a) ** 2 + (ys / b) ** 2)
    # |∇r| = |(x / a², y / b²)| / r; at the centre (r = 0) the pixel is far inside anyway
    gradient = torch.sqrt((xs / a**2) ** 2 + (ys / b**2) ** 2) / radius.clamp_min(1e-12)
    distance = (radius - 1.0) / gradient.clamp_min(1e-12)
    return torch.where(radius > 0, distance, torch.full_like(distance, -min(a, b)))


def red_circle_view(
    image: torch.Tensor, mask, thickness: int | None = None, colour: Sequence[float] = RED
) -> torch.Tensor:
    """The whole image with an ellipse outline drawn around the mask's box.

    The ellipse circumscribes the box (centre = box centre, semi-axes = half the box size × √2, through the
    box corners); pixels whose centre lies within ``thickness / 2`` of it (see :func:`ellipse_distance`) are
    set to ``colour``; the parts outside the image are simply not drawn. ``thickness`` defaults to
    :func:`default_thickness`. ``colour`` is RGB in [0, 255] (divided by 255 for float images).
    """
    mask = _check(image, mask)
    height, width = mask.shape
    if thickness is None:
        thickness = default_thickness(height, width)
    if not thickness > 0:
        raise ValueError(f"thickness must be > 0, got {thickness}")
    box = mask_box(mask)
    outline = ellipse_distance(height, width, box, device=image.device).abs() <= thickness / 2.0
    paint = _colour(image, colour, 255.0, "colour")
    return torch.where(outline.unsqueeze(0), paint.expand_as(image), image)
