"""Per-image category lists read from a JSON file: the classes a captioner or classifier predicted in each image,
which a test-time segmentation method then prompts (the lists DiffSegmenter and iSeg publish for PASCAL VOC,
Pascal Context and COCO-Object, docs/invseg.md).

A file maps each image to its classes, ``{"2007_000033.jpg": ["plane"], ...}``, or holds several such maps as
sections, ``{"synonym_matching": {...}, "image_similarity": {...}, "text_similarity": {...}}``, of which the chosen
ones are joined (DiffSegmenter's and iSeg's evaluations join ``image_similarity`` and ``text_similarity``).

- An image is named by its id, its file name or its file path (folders and an image extension are left out).
  An image whose id is a number (COCO) is also named by a file name ending in that number with leading zeros
  (``COCO_val2014_000000182611.jpg`` names image 182611).
- A class is a class name of the dataset, a name that ``aliases`` maps to one (the published files say "plane",
  "people", "buses"), or a label value (an int: the class's index in the dataset's class names).

``CategoryLists`` reads and checks the whole file once; ``CategoryLists.find`` gives an image's label values.
Every error names the file and, where there is one, the image and the class.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from grounding.data.images import IMAGE_SUFFIXES

#: the sections of DiffSegmenter's and iSeg's published files that their evaluations join
PUBLISHED_SECTIONS = ("image_similarity", "text_similarity")


@dataclass
class CategoryFile:
    """The per-image classes of a JSON file (module docstring).

    Args:
        path: the JSON file.
        sections: for a file of sections, those whose lists are joined (a file of one map ignores it).
        aliases: names the file uses -> class names of the dataset, e.g. ``{"plane": "aeroplane"}``.
    """

    path: str
    sections: list[str] = field(default_factory=lambda: list(PUBLISHED_SECTIONS))
    aliases: dict[str, str] = field(default_factory=dict)


def image_key(name: str) -> str:
    """How a file names an image: ``name`` without folders and image extension
    (``/data/JPEGImages/2007_000033.jpg`` -> ``2007_000033``)."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, suffix = os.path.splitext(name)
    return stem if suffix.lower() in IMAGE_SUFFIXES else name


class CategoryLists:
    """The label values ``spec``'s file lists for each image, checked against ``class_names`` (index = label
    value): a class neither of the dataset nor of ``spec.aliases``, a label value out of range, a missing section
    or two keys naming one image is a ValueError naming the file."""

    def __init__(self, spec: CategoryFile, class_names: Sequence[str]):
        self.path = str(spec.path)
        where = f"category file {self.path}"
        lookup = class_lookup(class_names, spec.aliases)
        self.by_image: dict[str, list[int]] = {}
        keys: dict[str, str] = {}  # image -> the file's key that named it
        for key, entries in joined_sections(read_json(self.path), spec.sections, where).items():
            image = image_key(key)
            if image in keys:
                raise ValueError(f"{where}: {keys[image]!r} and {key!r} name the same image {image!r}")
            keys[image] = key
            self.by_image[image] = sorted({label_value(entry, lookup, class_names, f"{where}: image {key!r}")
                                           for entry in entries})
        self.by_number: dict[int, list[str]] = {}  # images whose name ends in a number (COCO's file names)
        for image in self.by_image:
            digits = re.search(r"\d+$", image)
            if digits:
                self.by_number.setdefault(int(digits.group()), []).append(image)

    def find(self, image_id: Any, path: str | Path | None = None) -> list[int] | None:
        """The label values listed for an image (sorted, each once), found by its id, its file's name, or, for a
        numeric id, the one name ending in that number; None when the file does not list the image."""
        image_id = str(image_id)
        for key in (image_id, image_key(str(path)) if path else None):
            if key in self.by_image:
                return self.by_image[key]
        named = self.by_number.get(int(image_id), []) if image_id.isdigit() else []
        if len(named) > 1:
            raise ValueError(f"category file {self.path}: image {image_id} is named by {len(named)} keys ending in "
                             f"its number ({', '.join(named[:3])}); name it by its id or file name")
        return self.by_image[named[0]] if named else None


# ------------------------------------------------------------------------------------- reading and checks
def read_json(path: str) -> Any:
    """The file's JSON value; an error naming the file when it is absent or not JSON."""
    if not Path(path).is_file():
        raise ValueError(f"category file {path} does not exist")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"category file {path} is not JSON: {error}") from None


def joined_sections(data: Any, sections: Sequence[str], where: str) -> dict[str, list]:
    """``{image: [class, ...]}`` of a file of one map, or the lists of ``sections`` joined image by image."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object mapping images to lists of classes (or sections of such "
                         f"objects), got a JSON {type(data).__name__}")
    if not data:
        raise ValueError(f"{where} lists no image")
    if all(isinstance(value, list) for value in data.values()):
        return data
    if not all(isinstance(value, dict) for value in data.values()):
        raise ValueError(f"{where}: its values must all be lists of classes (one map of images) or all objects "
                         "(sections of such maps)")
    if not sections:
        raise ValueError(f"{where} holds sections ({', '.join(data)}); the sections setting chooses none to join")
    missing = [name for name in sections if name not in data]
    if missing:
        raise ValueError(f"{where} has no section {', '.join(map(repr, missing))}; its sections: {', '.join(data)}")
    joined: dict[str, list] = {}
    for name in sections:
        for key, entries in data[name].items():
            if not isinstance(entries, list):
                raise ValueError(f"{where}: section {name!r}, image {key!r}: expected a list of classes, "
                                 f"got {entries!r}")
            joined.setdefault(key, []).extend(entries)
    return joined


def class_lookup(class_names: Sequence[str], aliases: dict[str, str]) -> dict[str, int]:
    """Name -> label value of every class name and alias; an alias of no class is an error."""
    lookup: dict[str, int] = {}
    for value, name in enumerate(class_names):
        lookup.setdefault(name, value)
    for alias, name in aliases.items():
        if name not in lookup or alias in class_names and alias != name:
            why = "an alias must not rename a class" if name in lookup else "not a class of the dataset"
            raise ValueError(f"aliases maps {alias!r} to {name!r}: {why}; classes: {', '.join(class_names)}")
    return {**lookup, **{alias: lookup[name] for alias, name in aliases.items()}}


def label_value(entry: Any, lookup: dict[str, int], class_names: Sequence[str], where: str) -> int:
    """The label value a file's entry names: a class name, an alias or a label value itself."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        if not 0 <= entry < len(class_names):
            raise ValueError(f"{where}: label value {entry} is not one of the dataset's 0..{len(class_names) - 1}")
        return entry
    if not isinstance(entry, str):
        raise ValueError(f"{where}: {entry!r} is neither a class name nor a label value")
    if entry not in lookup:
        raise ValueError(f"{where}: {entry!r} is neither a class of the dataset nor an alias (aliases); "
                         f"classes: {', '.join(class_names)}")
    return lookup[entry]
