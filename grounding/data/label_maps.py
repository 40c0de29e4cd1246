"""Label maps on disk: label PNGs of class indices, the class list that names their values, the split lists
that name their images, the class-name files with synonyms that prompt their classes, and the PASCAL VOC
palette they are drawn in.

A label map holds one class index per pixel; ``IGNORE_INDEX`` (255, ``grounding.constants``) marks pixels
that count in no class. The readers of region data (``region_readers``), of semantic segmentation
(``segmentation_readers``), the synthetic dataset's writers and the label-map PNG writer of the lightning
layer all read and draw label maps through this module. Nothing here needs torch: the synthetic generator
uses it too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from grounding.constants import IGNORE_INDEX

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
"""The image files a label PNG ``<stem>.png`` is matched to: ``<stem>`` with one of these suffixes."""

LABEL_PNG_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")
"""PIL modes of a PNG of class indices: palette, grey, 32-bit and 16-bit integers."""


# ------------------------------------------------------------------------------------- label PNGs
def read_label_png(path: str | Path) -> np.ndarray:
    """Label values (H, W) int64 of a palette / grey / 16-bit label PNG; an error naming the file otherwise."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode not in LABEL_PNG_MODES:
                raise ValueError(f"label PNG {path} has mode {mode!r}; expected a palette ('P') or grey ('L') PNG of class indices")
            return np.asarray(image).astype(np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(f"label PNG not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read label PNG {path}: {error}") from error


def label_png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a label PNG from its header; an error naming the file when it cannot be read."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise FileNotFoundError(f"label PNG not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read label PNG {path}: {error}") from error


def reduce_zero_label(labels: np.ndarray) -> np.ndarray:
    """ADE20K's convention: 0 ("other") -> IGNORE_INDEX, v -> v - 1; IGNORE_INDEX stays. labels: (H, W) int."""
    return np.where((labels == 0) | (labels == IGNORE_INDEX), IGNORE_INDEX, labels - 1)


COCO_STUFF_THINGS = 80
"""COCO-Stuff-164k's train ids 0..79 are COCO's thing classes; 80..170 its stuff classes."""


def coco_stuff_to_object(labels: np.ndarray) -> np.ndarray:
    """COCO-Stuff train ids -> COCO-Object, as the benchmark's converter does: things 0..79 -> 1..80, stuff
    80..170 -> 0 (background), IGNORE_INDEX stays. labels: (H, W) int. A value above 170 is kept as it is, so
    that the check against the 81 classes reports it."""
    things = labels < COCO_STUFF_THINGS
    stuff = (labels >= COCO_STUFF_THINGS) & (labels <= 170)
    return np.where(things, labels + 1, np.where(stuff, 0, labels))


LABEL_CONVERSIONS = {
    "reduce_zero_label": (reduce_zero_label, "0 -> 255, v -> v - 1"),
    "coco_stuff_to_object": (coco_stuff_to_object, "things 0..79 -> 1..80, stuff 80..170 -> 0"),
}
"""Conversions of a label PNG's values to label values: name -> (function on (H, W) labels, what it does)."""


def check_label_values(labels: np.ndarray, num_classes: int, where: str) -> None:
    """ValueError naming ``where`` when a label of ``labels`` (H, W) is neither in [0, num_classes) nor IGNORE_INDEX."""
    values = np.unique(labels)
    bad = values[(values != IGNORE_INDEX) & ((values < 0) | (values >= num_classes))]
    if bad.size:
        raise ValueError(
            f"{where} has label value {int(bad[0])} but the class list has {num_classes} classes"
            f" (values 0..{num_classes - 1}, {IGNORE_INDEX} = ignore)"
        )


# ------------------------------------------------------------------------------------- class and image lists
def _class_lines(path: Path, what: str, missing_hint: str = "") -> list[str]:
    """The lines of a one-class-per-line file (line index = label value), trailing blank lines dropped; errors
    name the ``what`` file: missing, no class, or an empty line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}{missing_hint}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{what} file {path} lists no class")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{what} file {path}: line {number} is empty (the line index is the label value)")
    return lines


def read_class_names(classes_file: str | Path) -> list[str]:
    """Class names of a ``classes.txt`` (one per line, line index = label value; trailing blank lines ignored)."""
    return [" ".join(line.lower().split()) for line in _class_lines(Path(classes_file), "classes")]


SYNONYMS_DIR = Path(__file__).with_name("class_names")
"""The built-in class-name files with synonyms (package data), ``<name>.txt``."""

BUILTIN_SYNONYMS = ("voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "cityscapes", "ade20k")
"""The built-in synonyms files: the class words of the training-free segmentation benchmarks as SCLIP, ClearCLIP
and NACLIP prompt them (e.g. VOC's "person" also as "person in shirt", ...; the background of VOC21 and
COCO-Object as "sky, wall, tree, ...")."""


def synonyms_path(path_or_builtin: str | Path) -> Path:
    """The file of a built-in name of ``BUILTIN_SYNONYMS`` (``"voc21"``), else ``path_or_builtin`` as a path."""
    if str(path_or_builtin) in BUILTIN_SYNONYMS:
        return SYNONYMS_DIR / f"{path_or_builtin}.txt"
    return Path(path_or_builtin)


def read_class_synonyms(path_or_builtin: str | Path) -> list[list[str]]:
    """The synonyms of each class of a class-name file: one line per label value, its words separated by ", "
    (``person, person in shirt, person in jeans``); trailing blank lines are ignored. ``path_or_builtin`` is a
    file or a name of ``BUILTIN_SYNONYMS``. Errors name the file: missing, no class, an empty line (the line
    index is the label value) or an empty synonym."""
    path = synonyms_path(path_or_builtin)
    lines = _class_lines(path, "synonyms", f" (built-in lists: {', '.join(BUILTIN_SYNONYMS)})")
    synonyms = []
    for number, line in enumerate(lines, 1):
        words = [" ".join(word.split()) for word in line.split(",")]
        if not all(words):
            raise ValueError(f"synonyms file {path}: line {number} has an empty synonym: {line!r}")
        synonyms.append(words)
    return synonyms


def read_image_list(path: str | Path) -> list[str]:
    """Image stems of a split list (VOC's ``ImageSets/Segmentation/val.txt``: one stem per line)."""
    path = Path(path)
    try:
        stems = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"image list not found: {path}") from None
    if not stems:
        raise ValueError(f"image list {path} names no image")
    return stems


def find_image(image_dir: str | Path, stem: str) -> Path | None:
    """The image file ``image_dir/<stem><suffix>`` for the first of ``IMAGE_SUFFIXES`` that exists, else None."""
    image_dir = Path(image_dir)
    return next((image_dir / f"{stem}{s}" for s in IMAGE_SUFFIXES if (image_dir / f"{stem}{s}").is_file()), None)


def label_folder_stems(image_dir: str | Path, label_dir: str | Path, image_list: str | Path | None = None) -> list[str]:
    """The image stems of a folder of images with a folder of label PNGs: those of ``image_list`` (VOC's
    ImageSets file) when given, else every image and every label PNG found (so that one without the other
    is reported by the caller, not silently ignored). Errors name a missing folder or an empty label folder."""
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    if not label_dir.is_dir():
        raise FileNotFoundError(f"label folder not found: {label_dir}")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    if image_list is not None:
        return read_image_list(image_list)
    labels = {p.stem for p in label_dir.glob("*.png")}
    if not labels:
        raise ValueError(f"label folder {label_dir} has no PNG")
    return sorted(labels | {p.stem for p in image_dir.iterdir() if p.suffix in IMAGE_SUFFIXES})


def files_by_key(folder: str | Path, suffix: str, nested: bool = False) -> dict[str, Path]:
    """The files ``folder/<key><suffix>`` (``nested``: ``folder/<subfolder>/<key><suffix>``, Cityscapes' city
    folders), by key: the file name without ``suffix``."""
    pattern = f"*/*{suffix}" if nested else f"*{suffix}"
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).glob(pattern)):
        key = path.name[: -len(suffix)]
        if key in found:  # two subfolders holding the same name: one image id would stand for two images
            raise ValueError(f"{folder}: two files named {path.name}: {found[key]} and {path}")
        found[key] = path
    return found


# ------------------------------------------------------------------------------------- palette
def voc_palette(size: int = 256) -> np.ndarray:
    """(size, 3) uint8 PASCAL VOC palette: bits 0, 1, 2 of the label feed red, green, blue from the top bit
    down, three bits of the label per step (label 1 is (128, 0, 0), 255, the ignore label, VOC's border colour
    (224, 224, 192)). ``voc_palette().ravel().tolist()`` is the 768 values ``PIL.Image.putpalette`` takes."""
    palette = np.zeros((size, 3), dtype=np.uint8)
    for label in range(size):
        value, rgb = label, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << bit
            value >>= 3
        palette[label] = rgb
    return palette
