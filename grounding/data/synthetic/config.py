"""Settings of the synthetic dataset: :class:`SyntheticConfig` and its validation, the colour,
shape and referring-word tables, the category list and the paths of the on-disk layout."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

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
    image_format: Literal["jpg", "png"] = "jpg"
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


def vocabulary_words() -> tuple[str, ...]:
    """Return every word the dataset can write, whatever colours and shapes a config picks: the known colour
    names, the known shape names, then the other referring-expression words (category names are
    ``"<colour> <shape>"``). The offline CLIP tokenizer (``grounding.models.clip_tokenizer.SYNTHETIC_WORDS``)
    makes each of them one token."""
    return tuple(dict.fromkeys((*COLOUR_RGB, *SHAPE_NAMES, *REFERRING_WORDS)))


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
