"""Scene sampling and rendering: textured backgrounds, object colours, :class:`SceneObject`,
object placement with controlled occlusion, :func:`sample_scene` and :func:`render_image`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .config import COLOUR_RGB, SyntheticConfig
from .geometry import polygon_coverage, rasterize_polygon, rotate_points, shape_outline

_MAX_PLACEMENT_TRIES = 60
_MAX_IMAGE_ATTEMPTS = 20
_SEPARATION_GAP_PX = 2.0


# --------------------------------------------------------------------------------------------
# backgrounds and colours
# --------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Return smooth noise, float32 (size, size, channels), about unit std, by bicubic upsampling."""
    grid = rng.standard_normal((cells, cells, channels)).astype(np.float32)
    layers = [
        np.asarray(Image.fromarray(grid[:, :, c]).resize((size, size), Image.Resampling.BICUBIC))
        for c in range(channels)
    ]
    return np.stack(layers, axis=2)


def render_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Return a muted textured background, float32 (size, size, 3) in [0, 255].

    A low-saturation base colour plus one pattern (smooth noise, linear gradient, sinusoidal
    stripes or a low-contrast checker) plus faint smooth colour noise.
    """
    grey = rng.uniform(95.0, 185.0)
    tint = rng.standard_normal(3)
    tint = (tint - tint.mean()) / (np.linalg.norm(tint - tint.mean()) + 1e-9) * rng.uniform(0.0, 18.0)
    base = (grey + tint).astype(np.float32)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0.0, np.pi)
    along = (xs * math.cos(theta) + ys * math.sin(theta)) / size
    kind = rng.choice(["noise", "gradient", "stripes", "checker"])
    if kind == "noise":
        pattern = _smooth_noise(rng, size, int(rng.integers(3, 9)), 1)[:, :, 0] * rng.uniform(10.0, 22.0)
    elif kind == "gradient":
        pattern = (along - along.mean()) * rng.uniform(30.0, 70.0)
    elif kind == "stripes":
        period = rng.uniform(0.05, 0.15)
        pattern = np.sin(2.0 * np.pi * along / period + rng.uniform(0, 2 * np.pi)) * rng.uniform(5.0, 12.0)
    else:
        cell = rng.uniform(0.06, 0.15) * size
        phase = rng.uniform(0.0, cell, size=2)
        parity = (np.floor((xs + phase[0]) / cell) + np.floor((ys + phase[1]) / cell)) % 2
        pattern = (parity * 2.0 - 1.0) * rng.uniform(4.0, 10.0)
    image = base[None, None, :] + pattern[:, :, None].astype(np.float32)
    image += _smooth_noise(rng, size, int(rng.integers(4, 12)), 3) * 4.0
    return np.clip(image, 0.0, 255.0).astype(np.float32)


def jitter_colour(rng: np.random.Generator, colour: str) -> np.ndarray:
    """Return the RGB (3,) float32 of one object: the colour's base shade, brightness/channel jitter."""
    base = np.array(COLOUR_RGB[colour], dtype=np.float32)
    shade = base * rng.uniform(0.85, 1.1) + rng.normal(0.0, 8.0, size=3)
    return np.clip(shade, 0.0, 255.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# scene layout
# --------------------------------------------------------------------------------------------


@dataclass
class SceneObject:
    """One drawn object.

    polygon: float64 (V, 2) outline in pixel coordinates (rounded to 2 decimals, as stored).
    mask: bool (S, S) full mask (pycocotools rasterisation of ``polygon``).
    visible: bool (S, S) part of ``mask`` not covered by later-drawn objects.
    rgb: float32 (3,) base colour of the object.
    """

    category_id: int
    colour: str
    shape: str
    size: float
    polygon: np.ndarray
    mask: np.ndarray
    rgb: np.ndarray
    visible: np.ndarray = field(default=None)  # type: ignore[assignment]
    box: tuple[float, float, float, float] = field(init=False)

    def __post_init__(self) -> None:
        self.box = _polygon_box(self.polygon)


def _polygon_box(polygon: np.ndarray) -> tuple[float, float, float, float]:
    """Return the extent (x0, y0, x1, y1) of a (V, 2) polygon as Python floats."""
    x0, y0 = polygon.min(axis=0).tolist()
    x1, y1 = polygon.max(axis=0).tolist()
    return x0, y0, x1, y1


def _boxes_intersect(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    """True when boxes (x0, y0, x1, y1) a and b, a grown by ``gap`` pixels, intersect."""
    return a[0] - gap < b[2] and b[0] < a[2] + gap and a[1] - gap < b[3] and b[1] < a[3] + gap


def _centre_range(outline: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (low, high) (2,) bounds of centres that keep the (V, 2) outline inside the image."""
    return -outline.min(axis=0), image_size - outline.max(axis=0)


def _try_place(
    rng: np.random.Generator,
    outline: np.ndarray,
    colour: str,
    placed: list[SceneObject],
    mode: str,
    config: SyntheticConfig,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Find a centre for ``outline`` (V, 2); return (rounded polygon (V, 2), bool mask (S, S)) or None.

    mode "overlap": near an existing object of another colour and overlapping it; "separate":
    boxes kept apart; "any": anywhere. Every mode keeps each existing object's visible fraction
    ≥ min_visible_frac and keeps the boxes of same-colour objects apart (a same-colour overlap
    would have no visible boundary).
    """
    size = config.image_size
    low, high = _centre_range(outline, size)
    if np.any(high < low):
        return None
    anchors = [obj for obj in placed if obj.colour != colour]
    if mode == "overlap" and not anchors:
        return None
    union = np.zeros((size, size), dtype=bool)
    for obj in placed:
        union |= obj.mask
    for _ in range(_MAX_PLACEMENT_TRIES):
        if mode == "overlap":
            anchor = anchors[int(rng.integers(len(anchors)))]
            ax0, ay0, ax1, ay1 = anchor.box
            reach = 0.45 * ((ax1 - ax0) + (outline[:, 0].max() - outline[:, 0].min()))
            centre = np.array([(ax0 + ax1) / 2, (ay0 + ay1) / 2]) + rng.uniform(-reach, reach, size=2)
            centre = np.clip(centre, low, high)
        else:
            centre = rng.uniform(low, high)
        polygon = np.round(outline + centre, 2)
        polygon = np.clip(polygon, 0.0, float(size))
        box = _polygon_box(polygon)
        if any(
            _boxes_intersect(box, obj.box, _SEPARATION_GAP_PX)
            for obj in placed
            if mode == "separate" or obj.colour == colour
        ):
            continue
        mask = rasterize_polygon(polygon, size, size)
        if not mask.any():
            continue
        if mode == "overlap" and not (mask & union).any():
            continue
        if all(
            np.count_nonzero(obj.visible & ~mask) >= config.min_visible_frac * np.count_nonzero(obj.mask)
            for obj in placed
        ):
            return polygon, mask
    return None


def _placement_modes(want_overlap: bool, is_first: bool) -> list[str]:
    """Return the placement strategies to try in order for one object."""
    if is_first:
        return ["any"]
    return ["overlap", "separate", "any"] if want_overlap else ["separate", "any"]


def _sample_scene_once(rng: np.random.Generator, config: SyntheticConfig) -> list[SceneObject] | None:
    """Draw one layout (objects in drawing order, visible masks set) or None if placement failed."""
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    want_overlap = [False] * count
    if count >= 2 and rng.random() < config.occlusion_prob:
        want_overlap = [i > 0 and rng.random() < 0.5 for i in range(count)]
        want_overlap[int(rng.integers(1, count))] = True
    num_shapes = len(config.shapes)
    placed: list[SceneObject] = []
    for index in range(count):
        category_index = int(rng.integers(len(config.colours) * num_shapes))
        colour = config.colours[category_index // num_shapes]
        shape = config.shapes[category_index % num_shapes]
        rgb = jitter_colour(rng, colour)
        size_frac = rng.uniform(config.min_size_frac, config.max_size_frac)
        angle = 0.0 if shape == "circle" else rng.uniform(-config.max_rotation_deg, config.max_rotation_deg)
        result = None
        for frac in (size_frac, config.min_size_frac):
            outline = rotate_points(shape_outline(shape, frac * config.image_size), angle)
            for mode in _placement_modes(want_overlap[index], index == 0):
                result = _try_place(rng, outline, colour, placed, mode, config)
                if result is not None:
                    break
            if result is not None:
                size_frac = frac
                break
        if result is None:
            return None
        polygon, mask = result
        for obj in placed:
            obj.visible = obj.visible & ~mask
        placed.append(
            SceneObject(
                category_id=category_index + 1, colour=colour, shape=shape,
                size=size_frac * config.image_size, polygon=polygon, mask=mask, rgb=rgb,
                visible=mask.copy(),
            )
        )
    return placed


def sample_scene(rng: np.random.Generator, config: SyntheticConfig) -> list[SceneObject]:
    """Draw the objects of one image in drawing order (later objects on top).

    Each object's ``visible`` mask keeps ≥ min_visible_frac of its ``mask``. Raises RuntimeError
    if no layout fits after several attempts (too many / too large objects for the image).
    """
    for _ in range(_MAX_IMAGE_ATTEMPTS):
        scene = _sample_scene_once(rng, config)
        if scene is not None:
            return scene
    raise RuntimeError(
        f"could not place {config.max_objects} objects in a {config.image_size}px image keeping "
        f"{config.min_visible_frac} of each visible; lower max_objects or the size fractions"
    )


def render_image(rng: np.random.Generator, scene: list[SceneObject], image_size: int) -> np.ndarray:
    """Paint the scene over a textured background; returns uint8 (S, S, 3).

    Shapes are anti-aliased (SUPERSAMPLE× coverage) and slightly shaded; faint pixel noise is added.
    """
    image = render_background(rng, image_size)
    for obj in scene:
        x0, y0, x1, y1 = obj.box
        box = (max(int(math.floor(x0)) - 1, 0), max(int(math.floor(y0)) - 1, 0),
               min(int(math.ceil(x1)) + 1, image_size), min(int(math.ceil(y1)) + 1, image_size))
        alpha = polygon_coverage(obj.polygon, box)[:, :, None]
        ys, xs = np.mgrid[box[1]:box[3], box[0]:box[2]].astype(np.float32)
        direction = rng.uniform(0.0, 2.0 * np.pi)
        ramp = ((xs - (x0 + x1) / 2) * math.cos(direction) + (ys - (y0 + y1) / 2) * math.sin(direction))
        shading = 1.0 + 0.08 * np.clip(ramp / max(obj.size / 2.0, 1.0), -1.0, 1.0)
        paint = np.clip(obj.rgb[None, None, :] * shading[:, :, None], 0.0, 255.0)
        region = image[box[1]:box[3], box[0]:box[2]]
        image[box[1]:box[3], box[0]:box[2]] = region * (1.0 - alpha) + paint * alpha
    image += rng.normal(0.0, 2.5, size=image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
