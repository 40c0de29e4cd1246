"""Referring expressions: the rules that describe an object truthfully and unambiguously
(:func:`describe_object`), sentence choice, and the PhraseCut-style tasks derived from the refs."""

from __future__ import annotations

from typing import Sequence

import numpy as np

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
# PhraseCut tasks
# --------------------------------------------------------------------------------------------


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
