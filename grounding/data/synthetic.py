"""Synthetic "coloured shapes" grounding dataset: generator and command-line tool.

The dataset is the embedded default for every method of the project (detection, referring
expressions, semantic segmentation, mask-region retrieval). It is small, deterministic and
learnable by a tiny randomly initialised detector on CPU.

Each image (RGB, ``image_size`` square) shows a muted, textured background (smooth noise,
gradient, stripes or checker) and 1..N saturated shapes. A category is a (colour, shape) pair,
named ``"<colour> <shape>"`` (e.g. ``"red circle"``); category ids are 1..C in colour-major order.
Objects may overlap; every object keeps at least ``min_visible_frac`` of its area visible and the
VISIBLE masks are what gets annotated.

On-disk layout written by :func:`generate`::

    DIR/
      images/{train,val,test}/{image_id:06d}.jpg           (or .png, see image_format)
      annotations/instances_{train,val,test}.json          COCO instances; file_name = "000001.jpg"
      semantic/{train,val,test}/{image_id:06d}.png         mode "P", VOC palette: 0 background,
                                                           c = category id, 255 = ignore band
      semantic/classes.txt                                 "background" then category names
      refcoco/instances.json                               COCO instances of all splits together;
                                                           file_name = "<split>/000001.jpg"
                                                           (relative to DIR/images)
      refcoco/refs(synthetic).p                            RefCOCO-style refs, list of dicts
      refs_{train,val,test}.json                           the refs of one split as JSON
      phrasecut/refer_{train,val,test}.json                PhraseCut-style tasks (see
                                                           :func:`phrasecut_tasks`); images are
                                                           images/<split>/{image_id:06d}.jpg
      phrasecut/image_data_{train,val,test}.json           [{"image_id", "width", "height"}, ...]
      meta.json                                            settings, version, counts (written last)

Image ids run 1..N over train, then val, then test; annotation, ref and sentence ids are unique
across all splits too. Each image is drawn from its own random generator seeded by
(seed, split name, index in split), so changing the size of one split changes no other split and
a smaller split is a prefix of a larger one (up to the ids).

Segmentations are COCO polygons (derived from the shape geometry) for objects that nothing
covers, and uncompressed COCO RLE (``{"size": [h, w], "counts": [...]}``, column-major) for
objects that are partly occluded. Instance masks are defined as the pycocotools rasterisation of
the (rounded) polygon, so a polygon decodes exactly to the annotated mask.

Referring expressions use the category words plus the fixed vocabulary :data:`REFERRING_WORDS`;
the rules that make each word true are documented in :func:`describe_object`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import shutil
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
"""Bumped whenever the generated content changes for the same settings."""

SPLITS: tuple[str, ...] = ("train", "val", "test")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "blue": (35, 65, 205),
    "green": (35, 160, 55),
    "yellow": (220, 195, 35),
    "purple": (135, 45, 175),
}
"""Base RGB of each known colour; each object jitters its shade around it."""

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
"""Known shape names."""

REFERRING_WORDS: tuple[str, ...] = (
    "the", "on", "at", "in", "of", "from", "image",
    "left", "right", "top", "bottom", "middle",
    "small", "large", "big", "smallest", "largest", "biggest",
    "second", "third",
)
"""Every word of a referring expression that is not a colour or shape name."""

ORDINAL_WORDS: dict[int, str] = {1: "second", 2: "third"}
"""0-based rank from one end → ordinal word (rank 0 is said as "left"/"top"/... instead)."""

POSITION_MARGIN_FRAC = 0.08
"""Relative position words need this gap (fraction of the image side) between box centres."""
SIZE_RATIO = 1.4
""""largest" needs area ≥ SIZE_RATIO × every other same-category area ("smallest" likewise)."""
SMALL_SIDE_FRAC = 0.2
"""Absolute "small": the longer side of the visible box ≤ SMALL_SIDE_FRAC × image side."""
LARGE_SIDE_FRAC = 0.33
"""Absolute "large"/"big": the longer side of the visible box ≥ LARGE_SIDE_FRAC × image side."""

SUPERSAMPLE = 4
"""Anti-aliasing factor of the drawn shapes (coverage is computed at this factor)."""
_PIL_OFFSET = 0.5
"""Offset (super-sampled pixels) that aligns PIL's polygon fill with pycocotools' rasterisation."""
_CIRCLE_VERTICES = 32
_MAX_PLACEMENT_TRIES = 60
_MAX_IMAGE_ATTEMPTS = 20
_SEPARATION_GAP_PX = 2.0

DEFAULT_OUT_DIR = Path(__file__).resolve().parents[2] / "data" / "synthetic"
"""Where the project keeps its embedded default dataset (git-ignored)."""


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


def _as_name_tuple(value: str | Sequence[str]) -> tuple[str, ...]:
    """Turn ``"red, blue"`` or ``["Red", "blue"]`` into ``("red", "blue")``."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(item).strip().lower() for item in items if str(item).strip())


@dataclass(frozen=True)
class SyntheticConfig:
    """All settings of the synthetic dataset (every field is also a CLI flag).

    image_size: side of the square images in pixels.
    num_train / num_val / num_test: images per split.
    min_objects / max_objects: objects per image, drawn uniformly in [min, max].
    colours / shapes: category = colour × shape, ids in colour-major order.
    min_size_frac / max_size_frac: object box side (before rotation) as a fraction of the image
        side, drawn uniformly.
    occlusion_prob: probability that an image with at least two objects is laid out with
        overlapping objects (other images keep objects apart when they can). Objects of the
        same colour never overlap.
    min_visible_frac: every object keeps at least this fraction of its own mask visible.
    max_rotation_deg: shapes are rotated uniformly in ±max_rotation_deg.
    max_sentences: referring expressions per object are drawn uniformly in [1, max_sentences].
    image_format: "jpg" (JPEG with jpeg_quality, 4:4:4) or "png".
    semantic_border_px: radius of the 255 ignore band around object boundaries in the semantic
        PNGs (0 disables it).
    seed: master seed; each split and image derive their own sub-seed from it.
    """

    image_size: int = 160
    num_train: int = 600
    num_val: int = 100
    num_test: int = 100
    min_objects: int = 1
    max_objects: int = 6
    colours: tuple[str, ...] = ("red", "blue")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    min_size_frac: float = 0.12
    max_size_frac: float = 0.45
    occlusion_prob: float = 0.3
    min_visible_frac: float = 0.5
    max_rotation_deg: float = 15.0
    max_sentences: int = 3
    image_format: str = "jpg"
    jpeg_quality: int = 95
    semantic_border_px: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "colours", _as_name_tuple(self.colours))
        object.__setattr__(self, "shapes", _as_name_tuple(self.shapes))
        object.__setattr__(self, "image_format", str(self.image_format).lower().lstrip("."))
        validate_config(self)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-compatible dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def split_size(self, split: str) -> int:
        """Return the number of images of ``split`` ("train", "val" or "test")."""
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]


def validate_config(config: SyntheticConfig) -> None:
    """Raise ValueError naming the first invalid setting of ``config``."""
    checks: list[tuple[bool, str]] = [
        (isinstance(config.image_size, int) and config.image_size >= 32,
         f"image_size must be an integer >= 32, got {config.image_size!r}"),
        *[
            (isinstance(getattr(config, name), int) and getattr(config, name) >= 0,
             f"{name} must be an integer >= 0, got {getattr(config, name)!r}")
            for name in ("num_train", "num_val", "num_test")
        ],
        (isinstance(config.min_objects, int) and config.min_objects >= 1,
         f"min_objects must be an integer >= 1, got {config.min_objects!r}"),
        (isinstance(config.max_objects, int) and config.max_objects <= 30,
         f"max_objects must be an integer <= 30, got {config.max_objects!r}"),
        (config.min_objects <= config.max_objects,
         f"min_objects ({config.min_objects}) must be <= max_objects ({config.max_objects})"),
        (len(config.colours) >= 1, "colours must name at least one colour (fewer than 1 category)"),
        (len(config.shapes) >= 1, "shapes must name at least one shape (fewer than 1 category)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    for colour in config.colours:
        if colour not in COLOUR_RGB:
            raise ValueError(f"unknown colour {colour!r} in colours; known: {', '.join(COLOUR_RGB)}")
    for shape in config.shapes:
        if shape not in SHAPE_NAMES:
            raise ValueError(f"unknown shape {shape!r} in shapes; known: {', '.join(SHAPE_NAMES)}")
    for name in ("colours", "shapes"):
        values = getattr(config, name)
        if len(set(values)) != len(values):
            raise ValueError(f"{name} contains duplicates: {', '.join(values)}")
    checks = [
        (0.0 < config.min_size_frac <= 0.9,
         f"min_size_frac must be in (0, 0.9], got {config.min_size_frac!r}"),
        (0.0 < config.max_size_frac <= 0.9,
         f"max_size_frac must be in (0, 0.9], got {config.max_size_frac!r}"),
        (config.min_size_frac <= config.max_size_frac,
         f"min_size_frac ({config.min_size_frac}) must be <= max_size_frac ({config.max_size_frac})"),
        (config.min_size_frac * config.image_size >= 4.0,
         f"min_size_frac * image_size must be at least 4 pixels, got "
         f"{config.min_size_frac * config.image_size:.2f}"),
        (0.0 <= config.occlusion_prob <= 1.0,
         f"occlusion_prob must be in [0, 1], got {config.occlusion_prob!r}"),
        (0.0 < config.min_visible_frac <= 1.0,
         f"min_visible_frac must be in (0, 1], got {config.min_visible_frac!r}"),
        (0.0 <= config.max_rotation_deg <= 45.0,
         f"max_rotation_deg must be in [0, 45], got {config.max_rotation_deg!r}"),
        (isinstance(config.max_sentences, int) and config.max_sentences >= 1,
         f"max_sentences must be an integer >= 1, got {config.max_sentences!r}"),
        (config.image_format in ("jpg", "png"),
         f"image_format must be 'jpg' or 'png', got {config.image_format!r}"),
        (isinstance(config.jpeg_quality, int) and 1 <= config.jpeg_quality <= 100,
         f"jpeg_quality must be an integer in [1, 100], got {config.jpeg_quality!r}"),
        (isinstance(config.semantic_border_px, int) and config.semantic_border_px >= 0,
         f"semantic_border_px must be an integer >= 0, got {config.semantic_border_px!r}"),
        (isinstance(config.seed, int) and config.seed >= 0,
         f"seed must be an integer >= 0, got {config.seed!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def category_names(config: SyntheticConfig) -> list[str]:
    """Return the C category names ("red circle", ...) in id order (id = index + 1, colour-major)."""
    return [f"{colour} {shape}" for colour in config.colours for shape in config.shapes]


def coco_categories(config: SyntheticConfig) -> list[dict[str, Any]]:
    """Return the COCO ``categories`` list: ids 1..C, lower-case names, supercategory = shape."""
    return [
        {"id": index + 1, "name": name, "supercategory": name.split(" ")[1]}
        for index, name in enumerate(category_names(config))
    ]


def referring_vocabulary(config: SyntheticConfig) -> list[str]:
    """Return every word that can occur in a referring expression of ``config``, sorted."""
    return sorted(set(REFERRING_WORDS) | set(config.colours) | set(config.shapes))


# --------------------------------------------------------------------------------------------
# paths of the layout
# --------------------------------------------------------------------------------------------


def image_file_name(image_id: int, image_format: str = "jpg") -> str:
    """Return the file name of an image inside ``images/<split>/`` (e.g. ``"000001.jpg"``)."""
    return f"{image_id:06d}.{image_format}"


def instances_path(root: str | Path, split: str) -> Path:
    """Return ``root/annotations/instances_<split>.json``."""
    return Path(root) / "annotations" / f"instances_{split}.json"


def images_dir(root: str | Path, split: str) -> Path:
    """Return ``root/images/<split>``."""
    return Path(root) / "images" / split


def semantic_dir(root: str | Path, split: str) -> Path:
    """Return ``root/semantic/<split>`` (label PNGs named ``{image_id:06d}.png``)."""
    return Path(root) / "semantic" / split


def refs_json_path(root: str | Path, split: str) -> Path:
    """Return ``root/refs_<split>.json``."""
    return Path(root) / f"refs_{split}.json"


def refcoco_dir(root: str | Path) -> Path:
    """Return ``root/refcoco`` (``instances.json`` and ``refs(synthetic).p``; images under root/images)."""
    return Path(root) / "refcoco"


def phrasecut_dir(root: str | Path) -> Path:
    """Return ``root/phrasecut`` (``refer_<split>.json``, ``image_data_<split>.json``; images under
    root/images/<split>, named ``{image_id:06d}.<image_format>``)."""
    return Path(root) / "phrasecut"


# --------------------------------------------------------------------------------------------
# geometry and rasterisation
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# semantic labels
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# referring expressions
# --------------------------------------------------------------------------------------------


def box_centre(bbox: Sequence[float]) -> tuple[float, float]:
    """Return the centre (cx, cy) of a COCO box [x, y, w, h]."""
    return bbox[0] + bbox[2] / 2.0, bbox[1] + bbox[3] / 2.0


def absolute_phrase(cx: float, cy: float, image_size: int) -> str:
    """Return where a point lies in the image by thirds: "on the left", "at the top right",
    "in the middle", ... (left: cx < S/3, right: cx > 2S/3, top: cy < S/3, bottom: cy > 2S/3)."""
    third = image_size / 3.0
    horizontal = "left" if cx < third else "right" if cx > 2 * third else "middle"
    vertical = "top" if cy < third else "bottom" if cy > 2 * third else "middle"
    if horizontal == "middle" and vertical == "middle":
        return "in the middle"
    if vertical == "middle":
        return f"on the {horizontal}"
    if horizontal == "middle":
        return f"at the {vertical}"
    return f"at the {vertical} {horizontal}"


def clear_rank(values: Sequence[float], index: int, margin: float) -> int | None:
    """Return the 0-based rank of ``values[index]`` if every other value is at least ``margin``
    below or above it (the rank is then unambiguous), else None."""
    own = values[index]
    others = [v for i, v in enumerate(values) if i != index]
    if any(abs(v - own) < margin for v in others):
        return None
    return sum(v < own for v in others)


def _relative_sentences(
    name: str, index: int, centres: list[tuple[float, float]], areas: list[float], image_size: int
) -> list[str]:
    """Return the disambiguating sentences of object ``index`` among ≥ 2 same-category objects."""
    margin = POSITION_MARGIN_FRAC * image_size
    count = len(centres)
    sentences: list[str] = []
    axes = (("left", "right", "on the {}", [c[0] for c in centres]),
            ("top", "bottom", "at the {}", [c[1] for c in centres]))
    for first, last, preposition, values in axes:
        rank = clear_rank(values, index, margin)
        if rank is None:
            continue
        for side, rank_from_side in ((first, rank), (last, count - 1 - rank)):
            if rank_from_side == 0:
                sentences += [f"the {name} {preposition.format(side)}", f"the {side} {name}"]
            elif rank_from_side in ORDINAL_WORDS and 0 < rank < count - 1:
                sentences.append(f"the {ORDINAL_WORDS[rank_from_side]} {name} from the {side}")
    own_area = areas[index]
    other_areas = [a for i, a in enumerate(areas) if i != index]
    if own_area >= SIZE_RATIO * max(other_areas):
        sentences += [f"the largest {name}", f"the biggest {name}"]
    if own_area * SIZE_RATIO <= min(other_areas):
        sentences.append(f"the smallest {name}")
    return sentences


def _lone_sentences(name: str, bbox: Sequence[float], image_size: int) -> list[str]:
    """Return the sentences of an object that is the only one of its category in the image."""
    phrase = absolute_phrase(*box_centre(bbox), image_size)
    sentences = [f"the {name}", name, f"the {name} {phrase}", f"{name} {phrase}"]
    longer_side = max(bbox[2], bbox[3])
    if longer_side <= SMALL_SIDE_FRAC * image_size:
        sentences.append(f"the small {name}")
    if longer_side >= LARGE_SIDE_FRAC * image_size:
        sentences += [f"the large {name}", f"the big {name}"]
    return sentences


def describe_object(
    index: int,
    bboxes: Sequence[Sequence[float]],
    areas: Sequence[float],
    category_ids: Sequence[int],
    names: Sequence[str],
    image_size: int,
) -> list[str]:
    """Return all candidate referring expressions (lower-case) of object ``index`` of one image.

    bboxes: COCO [x, y, w, h] visible boxes; areas: visible pixel counts; names[c - 1] is the
    name of category c. The rules (each makes its words true):
    - only object of its category: "the red circle", "red circle", the thirds phrase of
      :func:`absolute_phrase` ("the red circle on the left"), "the small red circle" when the
      longer box side ≤ SMALL_SIDE_FRAC·S, "the large/big red circle" when ≥ LARGE_SIDE_FRAC·S.
    - ≥ 2 objects of its category (box centres cx, cy; margin m = POSITION_MARGIN_FRAC·S):
      "left"/"right"/"top"/"bottom" ("the red circle on the left", "the left red circle", "at the
      top", ...) when it is the extreme one on that side by at least m from every other;
      "the second/third red circle from the left/right/top/bottom" when its rank from that side is
      1/2, it is not the extreme one on either side, and every other centre is at least m away
      along that axis; "the largest/biggest" when
      its area ≥ SIZE_RATIO × every other area, "the smallest" when every other ≥ SIZE_RATIO ×
      its area. When none applies: "the red circle <thirds phrase> of the image" (true, absolute).
    """
    own_category = category_ids[index]
    group = [i for i, c in enumerate(category_ids) if c == own_category]
    name = names[own_category - 1]
    if len(group) == 1:
        return _lone_sentences(name, bboxes[index], image_size)
    sentences = _relative_sentences(
        name, group.index(index), [box_centre(bboxes[i]) for i in group], [areas[i] for i in group],
        image_size,
    )
    if not sentences:
        phrase = absolute_phrase(*box_centre(bboxes[index]), image_size)
        sentences = [f"the {name} {phrase} of the image"]
    return sentences


def choose_sentences(rng: np.random.Generator, candidates: list[str], max_sentences: int) -> list[str]:
    """Pick 1..max_sentences distinct sentences from ``candidates`` (order randomised)."""
    unique = list(dict.fromkeys(candidates))
    count = min(int(rng.integers(1, max_sentences + 1)), len(unique))
    order = rng.permutation(len(unique))[:count]
    return [unique[i] for i in order]


# --------------------------------------------------------------------------------------------
# one split
# --------------------------------------------------------------------------------------------


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Return the generator of image ``index`` of ``split``: independent of every other split
    and of the split sizes (sub-seed from seed, crc32 of the split name and the index)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(zlib.crc32(split.encode()), index)))


def _annotation(ann_id: int, image_id: int, obj: SceneObject) -> dict[str, Any]:
    """Return the COCO annotation of one object (visible box/area; polygon unless occluded)."""
    occluded = bool((obj.mask & ~obj.visible).any())
    segmentation: Any
    if occluded:
        segmentation = mask_to_uncompressed_rle(obj.visible)
    else:
        segmentation = [[float(v) for v in obj.polygon.reshape(-1).tolist()]]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj.category_id,
        "bbox": mask_bbox(obj.visible),
        "area": float(np.count_nonzero(obj.visible)),
        "iscrowd": 0,
        "segmentation": segmentation,
    }


@dataclass
class _Counters:
    """Next free ids, shared over the splits so that ids are unique across them."""

    image_id: int = 1
    ann_id: int = 1
    ref_id: int = 1
    sent_id: int = 1


def _write_split(
    root: Path, split: str, config: SyntheticConfig, counters: _Counters
) -> tuple[list[dict], list[dict], list[dict]]:
    """Render and write the images and label PNGs of one split.

    Returns (COCO images, COCO annotations, refs) of the split and advances ``counters``.
    """
    names = category_names(config)
    images_dir(root, split).mkdir(parents=True, exist_ok=True)
    semantic_dir(root, split).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    images, annotations, refs = [], [], []
    for index in range(config.split_size(split)):
        rng = image_rng(config.seed, split, index)
        scene = sample_scene(rng, config)
        pixels = render_image(rng, scene, config.image_size)
        image_id = counters.image_id
        counters.image_id += 1
        file_name = image_file_name(image_id, config.image_format)
        picture = Image.fromarray(pixels)
        if config.image_format == "jpg":
            picture.save(images_dir(root, split) / file_name, quality=config.jpeg_quality, subsampling=0)
        else:
            picture.save(images_dir(root, split) / file_name)
        label_png = Image.fromarray(semantic_label_map(scene, config.image_size, config.semantic_border_px))
        label_png.putpalette(palette)
        label_png.save(semantic_dir(root, split) / f"{image_id:06d}.png")
        images.append({"id": image_id, "file_name": file_name,
                       "width": config.image_size, "height": config.image_size})
        image_anns = []
        for obj in scene:
            image_anns.append(_annotation(counters.ann_id, image_id, obj))
            counters.ann_id += 1
        annotations += image_anns
        bboxes = [a["bbox"] for a in image_anns]
        areas = [a["area"] for a in image_anns]
        category_ids = [a["category_id"] for a in image_anns]
        for obj_index, ann in enumerate(image_anns):
            candidates = describe_object(obj_index, bboxes, areas, category_ids, names, config.image_size)
            sentences = []
            for sent in choose_sentences(rng, candidates, config.max_sentences):
                sentences.append({"sent_id": counters.sent_id, "sent": sent,
                                  "raw": sent[0].upper() + sent[1:], "tokens": sent.split(" ")})
                counters.sent_id += 1
            refs.append({
                "ref_id": counters.ref_id, "ann_id": ann["id"], "image_id": image_id,
                "category_id": ann["category_id"], "split": split,
                "file_name": f"{split}/{file_name}",
                "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
            })
            counters.ref_id += 1
    return images, annotations, refs


def phrasecut_tasks(annotations: list[dict], refs: list[dict]) -> list[dict]:
    """Return the PhraseCut-style tasks of one split: one per ref whose object is unoccluded.

    Each task is ``{"task_id": "<image_id>__<ann_id>", "image_id", "phrase": the ref's first
    sentence, "instance_boxes": [[x, y, w, h]], "Polygons": [[[[x, y], ...]]]}`` (one instance,
    its polygon as points). Occluded objects (RLE segmentation, no polygon) get no task.
    """
    by_id = {ann["id"]: ann for ann in annotations}
    tasks = []
    for ref in refs:
        ann = by_id[ref["ann_id"]]
        if not isinstance(ann["segmentation"], list):
            continue
        polygons = [[[flat[i], flat[i + 1]] for i in range(0, len(flat), 2)] for flat in ann["segmentation"]]
        tasks.append({
            "task_id": f"{ref['image_id']}__{ann['id']}",
            "image_id": ref["image_id"],
            "phrase": ref["sentences"][0]["sent"],
            "instance_boxes": [list(ann["bbox"])],
            "Polygons": [polygons],
        })
    return tasks


def _coco_document(config: SyntheticConfig, images: list, annotations: list, description: str) -> dict:
    """Return a COCO instances document (fixed info, no timestamps, so files are reproducible)."""
    return {
        "info": {"description": description, "version": str(GENERATOR_VERSION),
                 "contributor": "grounding.data.synthetic", "year": 2024,
                 "date_created": "synthetic", "seed": config.seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(config),
    }


def _write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as compact, key-order-preserving JSON (byte-reproducible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, separators=(",", ":")) + "\n", encoding="utf-8")


def _write_dataset(root: Path, config: SyntheticConfig) -> dict[str, Any]:
    """Write the whole dataset into ``root`` (meta.json last); returns the meta dict."""
    counters = _Counters()
    all_images, all_annotations, all_refs = [], [], []
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        images, annotations, refs = _write_split(root, split, config, counters)
        _write_json(instances_path(root, split),
                    _coco_document(config, images, annotations, f"synthetic shapes, {split} split"))
        _write_json(refs_json_path(root, split), refs)
        _write_json(phrasecut_dir(root) / f"refer_{split}.json", phrasecut_tasks(annotations, refs))
        _write_json(phrasecut_dir(root) / f"image_data_{split}.json",
                    [{"image_id": i["id"], "width": i["width"], "height": i["height"]} for i in images])
        all_images += [{**image, "file_name": f"{split}/{image['file_name']}"} for image in images]
        all_annotations += annotations
        all_refs += refs
        counts[split] = {"images": len(images), "annotations": len(annotations), "refs": len(refs),
                         "sentences": sum(len(r["sentences"]) for r in refs)}
    _write_json(refcoco_dir(root) / "instances.json",
                _coco_document(config, all_images, all_annotations, "synthetic shapes, all splits"))
    with open(refcoco_dir(root) / "refs(synthetic).p", "wb") as handle:
        pickle.dump(all_refs, handle, protocol=4)
    classes = ["background", *category_names(config)]
    (root / "semantic" / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    meta = {
        "generator": "grounding.data.synthetic",
        "version": GENERATOR_VERSION,
        "config": config.to_dict(),
        "categories": category_names(config),
        "vocabulary": referring_vocabulary(config),
        "counts": counts,
    }
    _write_json(root / "meta.json", meta)
    return meta


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------


def generate(out_dir: str | Path, config: SyntheticConfig | None = None, *, overwrite: bool = False) -> Path:
    """Generate the dataset into ``out_dir`` and return it as a Path.

    The data is written into a temporary sibling folder that is renamed to ``out_dir`` at the end,
    so an interrupted run never leaves a folder that looks complete. An existing non-empty
    ``out_dir`` raises ValueError unless ``overwrite`` (then it is deleted first).
    """
    config = config or SyntheticConfig()
    target = Path(out_dir).resolve()
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise ValueError(f"{target} already exists and is not empty; pass overwrite=True (--force) to replace it")
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        _write_dataset(staging, config)
        if target.exists():
            target.rmdir()  # empty, checked above (a non-empty one means a concurrent writer won)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_meta(out_dir: str | Path) -> dict[str, Any]:
    """Return the parsed ``meta.json`` of a generated dataset."""
    return json.loads((Path(out_dir) / "meta.json").read_text(encoding="utf-8"))


def check_meta(out_dir: str | Path, config: SyntheticConfig) -> None:
    """Raise ValueError naming the folder and the first setting where the dataset at ``out_dir``
    differs from ``config`` (or when it was written by another generator version)."""
    folder = Path(out_dir)
    meta = load_meta(folder)
    if meta.get("version") != GENERATOR_VERSION:
        raise ValueError(
            f"synthetic dataset at {folder} has generator version {meta.get('version')!r}, "
            f"expected {GENERATOR_VERSION}; regenerate it (--force) or use another folder"
        )
    stored = meta.get("config", {})
    for key, wanted in config.to_dict().items():
        if stored.get(key) != wanted:
            raise ValueError(
                f"synthetic dataset at {folder} was generated with {key}={stored.get(key)!r} but "
                f"{key}={wanted!r} was requested; use another folder or regenerate it (--force)"
            )


def ensure_synthetic(out_dir: str | Path, config: SyntheticConfig | None = None) -> Path:
    """Return ``out_dir``, generating the dataset first if its ``meta.json`` is absent.

    An existing dataset is never overwritten: differing settings raise ValueError (see
    :func:`check_meta`), and a non-empty folder without ``meta.json`` raises ValueError too.
    """
    config = config or SyntheticConfig()
    folder = Path(out_dir).resolve()
    if (folder / "meta.json").exists():
        check_meta(folder, config)
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(
            f"{folder} exists but has no meta.json (an incomplete or foreign folder); "
            f"delete it or choose another folder"
        )
    try:
        return generate(folder, config)
    except (OSError, ValueError):
        # another process may have finished the same dataset first
        if (folder / "meta.json").exists():
            check_meta(folder, config)
            return folder
        raise


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def prepare_synthetic(out_dir: str | Path, settings: dict[str, Any] | None = None) -> None:
    """What the DataModules do before loading: an existing dataset is used as it is when no generator
    ``settings`` were asked for (nothing could differ); otherwise ``ensure_synthetic`` with those settings."""
    if settings is None and (Path(out_dir) / "meta.json").exists():
        return
    ensure_synthetic(out_dir, SyntheticConfig(**(settings or {})))


def build_arg_parser() -> argparse.ArgumentParser:
    """Return the CLI parser: ``--out`` plus one flag per SyntheticConfig field and ``--force``."""
    parser = argparse.ArgumentParser(
        prog="python -m grounding.data.synthetic",
        description="Generate the synthetic coloured-shapes grounding dataset.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--force", action="store_true", help="delete an existing dataset and regenerate")
    defaults = SyntheticConfig()
    for config_field in dataclasses.fields(SyntheticConfig):
        flag = "--" + config_field.name.replace("_", "-")
        default = getattr(defaults, config_field.name)
        aliases = ["--colors"] if config_field.name == "colours" else []
        if isinstance(default, tuple):
            parser.add_argument(flag, *aliases, dest=config_field.name, type=str, default=",".join(default),
                                help=f"comma-separated (default: {','.join(default)})")
        else:
            parser.add_argument(flag, dest=config_field.name, type=type(default), default=default,
                                help=f"(default: {default})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (2 on invalid settings or a mismatch)."""
    args = build_arg_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)}
    try:
        config = SyntheticConfig(**values)
        start = time.perf_counter()
        if args.force:
            root = generate(args.out, config, overwrite=True)
        else:
            already = (Path(args.out) / "meta.json").exists()
            root = ensure_synthetic(args.out, config)
            if already:
                print(f"dataset already present at {root} (same settings); nothing to do")
                return 0
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    meta = load_meta(root)
    summary = ", ".join(f"{split}: {c['images']} images / {c['annotations']} objects / {c['sentences']} sentences"
                        for split, c in meta["counts"].items())
    print(f"wrote {root} in {time.perf_counter() - start:.1f}s ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
