"""The synthetic COCO split as an LVIS v1 annotation file, for the LVIS evaluation path (data.evaluator=lvis).

``write_synthetic_lvis(root, split)`` writes ``<root>/lvis/lvis_v1_<split>.json`` from
``<root>/annotations/instances_<split>.json``, with what LVIS v1 has and COCO has not, and without what LVIS
v1 lacks:

- images have no ``file_name`` but a ``coco_url`` ``http://images.synthetic.invalid/<split>/<file>``: its
  last two components, ``<split>/<file>``, are the path under ``<root>/images``, as ``val2017/<file>`` is
  under a COCO root. The image folder to give with this file is therefore ``<root>/images``
  (``--data.val_images <root>/images``).
- every category gets a ``frequency`` in turn by id: 1 rare, 2 common, 3 frequent, 4 rare, ... (so each
  group has categories); its name is written with underscores, as LVIS writes them ("red_circle"), plus
  ``synonyms``, ``synset``, ``def``, ``image_count`` and ``instance_count`` (of this split).
- ``neg_category_ids`` of an image: the categories absent from it, verified absent, except one of them,
  left unverified (the ``k``-th absent one, by id, of the split's ``k``-th image, cyclically), so that
  LVIS's federated rule (a detection of a category neither present nor negative is not evaluated) is
  exercised. ``not_exhaustive_category_ids``: the smallest present category id on every second image
  (index 0, 2, ...), empty on the others.
- annotations have no ``iscrowd``; ``id``, ``image_id``, ``category_id``, ``bbox``, ``area`` and
  ``segmentation`` are the COCO file's.

The file is rewritten only when absent (written beside it and renamed into place).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from .config import instances_path

#: the host of the synthetic images' ``coco_url``; nothing is ever fetched from it (.invalid is reserved)
SYNTHETIC_URL = "http://images.synthetic.invalid"
#: LVIS frequency groups, given to the synthetic categories in turn by id
FREQUENCY_CYCLE = ("r", "c", "f")


def lvis_path(root: str | Path, split: str) -> Path:
    """Return ``root/lvis/lvis_v1_<split>.json``."""
    return Path(root) / "lvis" / f"lvis_v1_{split}.json"


def lvis_document(coco: dict, split: str) -> dict:
    """The LVIS v1 document of a synthetic COCO instances document (see the module docstring)."""
    category_ids = sorted(category["id"] for category in coco["categories"])
    present: dict[int, set[int]] = {image["id"]: set() for image in coco["images"]}
    instances: dict[int, int] = {category_id: 0 for category_id in category_ids}
    for annotation in coco["annotations"]:
        present[annotation["image_id"]].add(annotation["category_id"])
        instances[annotation["category_id"]] += 1

    images = []
    for index, image in enumerate(coco["images"]):
        absent = [category_id for category_id in category_ids if category_id not in present[image["id"]]]
        unverified = absent[index % len(absent)] if absent else None
        found = sorted(present[image["id"]])
        images.append({
            "id": image["id"],
            "width": image["width"],
            "height": image["height"],
            "coco_url": f"{SYNTHETIC_URL}/{split}/{image['file_name']}",
            "neg_category_ids": [category_id for category_id in absent if category_id != unverified],
            "not_exhaustive_category_ids": found[:1] if index % 2 == 0 else [],
        })

    categories = []
    for category in sorted(coco["categories"], key=lambda entry: entry["id"]):
        name = category["name"].replace(" ", "_")
        categories.append({
            "id": category["id"],
            "name": name,
            "synonyms": [name],
            "synset": f"{name}.n.01",
            "def": f"a {category['name']}",
            "frequency": FREQUENCY_CYCLE[(category["id"] - 1) % len(FREQUENCY_CYCLE)],
            "image_count": sum(category["id"] in found for found in present.values()),
            "instance_count": instances[category["id"]],
        })

    annotations = [
        {key: annotation[key] for key in ("id", "image_id", "category_id", "bbox", "area", "segmentation")}
        for annotation in coco["annotations"]
    ]
    return {"info": {"description": f"synthetic shapes, {split} split, LVIS v1 format"}, "images": images,
            "annotations": annotations, "categories": categories}


def write_synthetic_lvis(root: str | Path, split: str = "val") -> Path:
    """Write (when absent) and return ``<root>/lvis/lvis_v1_<split>.json``, the LVIS v1 file of the synthetic
    ``split``; its images lie under ``<root>/images`` (see the module docstring)."""
    out = lvis_path(root, split)
    if out.is_file():
        return out
    coco = json.loads(instances_path(root, split).read_text(encoding="utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.write_text(json.dumps(lvis_document(coco, split)), encoding="utf-8")
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    return out
