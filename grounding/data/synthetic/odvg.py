"""The synthetic dataset in ODVG form (``grounding.data.odvg``): per split, a detection file of its boxes with
a label map, and a grounding file of its referring expressions, derived from the COCO instances file
(``annotations/instances_<split>.json``) and the refs (``refs_<split>.json``) by the converters of
``grounding.data.odvg_convert``::

    DIR/odvg/label_map.json                   labels 0..C-1 = category ids 1..C, the category names
    DIR/odvg/detection_<split>.jsonl          one line per image, every box (COCO xywh as xyxy)
    DIR/odvg/grounding_<split>.jsonl          one line per expression, one region over the whole caption

``filename`` is relative to ``images/<split>`` (``image_root``). Written once, atomically (a concurrent
writer writes the same bytes); an existing split is used as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import images_dir, instances_path, refs_json_path


@dataclass(frozen=True)
class SyntheticOdvgFiles:
    """A split's ODVG files and the folder their ``filename``s are relative to."""

    detection: Path
    grounding: Path
    label_map: Path
    image_root: Path


def odvg_dir(root: str | Path) -> Path:
    """Return ``root/odvg``."""
    return Path(root) / "odvg"


def synthetic_odvg_files(root: str | Path, split: str) -> SyntheticOdvgFiles:
    """Where the ODVG files of ``split`` are (written or not)."""
    folder = odvg_dir(root)
    return SyntheticOdvgFiles(folder / f"detection_{split}.jsonl", folder / f"grounding_{split}.jsonl",
                              folder / "label_map.json", images_dir(root, split))


def write_synthetic_odvg(root: str | Path, split: str) -> SyntheticOdvgFiles:
    """Write the ODVG files of ``split`` of the synthetic dataset at ``root`` unless they exist; return their paths."""
    # the converters read COCO files through a reader that needs torch; this package does not, so import late
    from grounding.data.odvg_convert import coco_to_odvg, refcoco_to_odvg

    root = Path(root)
    files = synthetic_odvg_files(root, split)
    if files.detection.is_file() and files.grounding.is_file() and files.label_map.is_file():
        return files
    instances = instances_path(root, split)
    if not instances.is_file():
        raise FileNotFoundError(f"no COCO file {instances} (split {split!r} of the synthetic dataset at {root})")
    refs = refs_json_path(root, split)
    if not files.label_map.is_file() or not files.detection.is_file():
        coco_to_odvg(instances, files.detection, files.label_map)
    if not files.grounding.is_file():
        refcoco_to_odvg(refs, instances, files.grounding, split=split, per="expression")
    return files
