"""The one validated reader of COCO instances files, shared by detection, region and metric code.

``read_coco(path)`` parses a file once per process (cached by path, size and modification time) and
checks everything that would otherwise fail late or silently: JSON that is not a COCO instances file;
ids that are missing, not integers (COCO ids are integers; a string id trains and then breaks the
evaluation) or duplicated; images without a file name or with a non-positive size; annotations that
point at unknown images or categories; categories with an empty name, or two categories with the same
name (a prompt would hold the name twice and the model could not tell them apart). Every error names
the file and the offending id.

LVIS v1 files are COCO instances files with more keys, read by the same function. Their images have no
``file_name`` but a ``coco_url`` ("http://images.cocodataset.org/val2017/000000397133.jpg"; LVIS val holds
COCO train2017 and val2017 images): the image's path is then the last two components of that URL
("val2017/000000397133.jpg"), relative to the folder holding train2017/ and val2017/, as mmdetection's
``LVISV1Dataset`` resolves it; a ``file_name``, where a file has one (MDETR's minival), is used as it is.
A file whose categories carry ``frequency`` is an LVIS file: its names are written with underscores
("aerosol_can", "bow_(weapon)") and are read with spaces instead ("aerosol can", "bow (weapon)"), the words
the prompt should hold. LVIS annotations have no ``iscrowd`` (0). ``lvis_ground_truth(coco_file,
annotation_ids, image_ids)`` checks the keys LVIS's federated evaluation needs and gives its ground truth.

What is done with the boxes and masks (skipped, clipped, decoded) is the business of the readers built
on top: ``grounding.data.coco`` (detection) and ``grounding.data.region_readers`` (regions).
``ground_truth(coco_file, annotation_ids, image_ids)`` gives pycocotools the ground truth a loader kept.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from grounding.data.prompts import clean_category_name

_CACHE: OrderedDict[tuple, "CocoFile"] = OrderedDict()
_CACHE_SIZE = 8


@dataclass(frozen=True)
class CocoFile:
    """A validated COCO instances file.

    images: id -> image entry (``file_name``, ``width``, ``height``, ...), in file order; an LVIS image
        without ``file_name`` gets the one its ``coco_url`` gives (a copy of the entry: the file's is kept).
    annotations: the annotation entries, in file order (ids, image and category ids validated).
    categories: id -> cleaned name (lower case, single spaces), in file order.
    category_entries: the category entries as in the file (for pycocotools).
    """

    path: Path
    images: dict[int, dict]
    annotations: list[dict]
    categories: dict[int, str]
    category_entries: list[dict]
    lvis: bool = False  # the categories carry LVIS's ``frequency``

    def annotations_by_image(self) -> dict[int, list[dict]]:
        """image id -> its annotations (every image present, possibly with an empty list)."""
        grouped: dict[int, list[dict]] = {image_id: [] for image_id in self.images}
        for annotation in self.annotations:
            grouped[annotation["image_id"]].append(annotation)
        return grouped


def _integer_id(value: object, what: str, path: Path, context: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"annotation file {path}: {what} id {value!r}{context} is not an integer (COCO ids are integers;"
            f" renumber the {what}s)"
        )
    return value


def _unique_ids(entries: list, what: str, path: Path) -> list[int]:
    seen: set[int] = set()
    ids = []
    for entry in entries:
        if not isinstance(entry, dict) or "id" not in entry:
            raise ValueError(f"annotation file {path}: a {what} entry has no id: {entry!r:.200}")
        entry_id = _integer_id(entry["id"], what, path)
        if entry_id in seen:
            raise ValueError(f"annotation file {path}: duplicate {what} id {entry_id}")
        seen.add(entry_id)
        ids.append(entry_id)
    return ids


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"annotation file {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise ValueError(f"annotation file {path} is not a COCO instances file (needs lists images, annotations, categories)")
    return data


def _image_file_name(image: dict, where: str) -> str:
    """The image's path under the image folder: its ``file_name``, or the last two components of LVIS's
    ``coco_url`` (".../val2017/000000397133.jpg" -> "val2017/000000397133.jpg")."""
    file_name = image.get("file_name")
    if isinstance(file_name, str) and file_name:
        return file_name
    url = image.get("coco_url")
    if file_name is None and url is None:
        raise ValueError(f"{where} has no file_name (nor an LVIS coco_url to take the path from)")
    if file_name is not None or not isinstance(url, str):
        raise ValueError(f"{where} has no usable file name (file_name {file_name!r}, coco_url {url!r})")
    parts = [part for part in url.split("?")[0].split("/") if part]
    if len(parts) < 2 or "." not in parts[-1] or parts[-2].endswith(":"):
        raise ValueError(f"{where} has coco_url {url!r}, which does not end in <folder>/<image file>")
    return f"{parts[-2]}/{parts[-1]}"


def _validate(data: dict, path: Path) -> CocoFile:
    _unique_ids(data["categories"], "category", path)
    lvis = bool(data["categories"]) and all(isinstance(entry, dict) and "frequency" in entry for entry in data["categories"])
    categories: dict[int, str] = {}
    by_name: dict[str, int] = {}
    for entry in data["categories"]:
        raw = entry.get("name")
        if lvis and isinstance(raw, str):
            raw = raw.replace("_", " ")  # LVIS writes "aerosol_can": the prompt should read "aerosol can"
        try:
            name = clean_category_name(entry["id"], raw)
        except ValueError as error:
            raise ValueError(f"annotation file {path}: {error}") from None
        if name in by_name:
            raise ValueError(
                f"annotation file {path}: category ids {by_name[name]} and {entry['id']} have the same name {name!r};"
                " a prompt cannot tell them apart (merge or rename them)"
            )
        by_name[name] = entry["id"]
        categories[entry["id"]] = name

    _unique_ids(data["images"], "image", path)
    images: dict[int, dict] = {}
    for image in data["images"]:
        where = f"annotation file {path}: image id {image['id']}"
        file_name = _image_file_name(image, where)
        for key in ("width", "height"):
            value = image.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or int(value) != value:
                raise ValueError(f"{where} has {key} {value!r}; expected a positive integer")
        images[image["id"]] = image if image.get("file_name") == file_name else {**image, "file_name": file_name}

    _unique_ids(data["annotations"], "annotation", path)
    for annotation in data["annotations"]:
        annotation_id = annotation["id"]
        if annotation.get("category_id") not in categories:
            raise ValueError(
                f"annotation file {path}: annotation id {annotation_id} has unknown category id"
                f" {annotation.get('category_id')!r} (known: {sorted(categories)})"
            )
        if annotation.get("image_id") not in images:
            raise ValueError(
                f"annotation file {path}: annotation id {annotation_id} refers to unknown image id {annotation.get('image_id')!r}"
            )
    return CocoFile(path, images, list(data["annotations"]), categories, list(data["categories"]), lvis)


def read_coco(path: str | Path) -> CocoFile:
    """The validated file (see the module docstring); parsed once per process while it is unchanged."""
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    key = (str(path.resolve()), status.st_size, status.st_mtime_ns)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    parsed = _validate(_load_json(path), path)
    _CACHE[key] = parsed
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return parsed


def read_categories(path: str | Path) -> dict[int, str]:
    """Category id -> cleaned name of an instances file, in file order."""
    return dict(read_coco(path).categories)


def ground_truth(coco_file: CocoFile, annotation_ids: set[int], image_ids: list[int]):
    """A pycocotools ``COCO`` holding exactly ``image_ids`` and the annotations ``annotation_ids`` of the file.

    This is what COCOeval should see: the images and boxes a loader kept, not the ones it reported as
    skipped (a NaN box left in the ground truth changes AP). An annotation without ``area`` gets its
    box area, without ``iscrowd`` 0 (COCOeval needs both).
    """
    from pycocotools.coco import COCO

    chosen = set(image_ids)
    annotations = []
    for annotation in coco_file.annotations:
        if annotation["id"] in annotation_ids and annotation["image_id"] in chosen:
            entry = dict(annotation)
            if "area" not in entry:
                entry["area"] = float(entry["bbox"][2] * entry["bbox"][3])
            entry.setdefault("iscrowd", 0)
            annotations.append(entry)
    coco = COCO()
    coco.dataset = {
        "images": [coco_file.images[i] for i in image_ids],
        "annotations": annotations,
        "categories": coco_file.category_entries,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


#: LVIS's category frequency groups: rare (1-10 training images), common (11-100), frequent (> 100)
LVIS_FREQUENCIES = ("r", "c", "f")


def lvis_ground_truth(coco_file: CocoFile, annotation_ids: set[int], image_ids: list[int]) -> dict:
    """The LVIS-format ground truth of exactly ``image_ids`` and the annotations ``annotation_ids`` of the file
    (what ``lvis.LVIS`` indexes and ``grounding.metrics.lvis_eval`` takes), after checking what LVIS's
    federated evaluation reads: every image's ``neg_category_ids`` and ``not_exhaustive_category_ids``
    (lists of category ids), every category's ``frequency`` (r, c or f). An error names the file and the id.

    Annotations keep ``id``, ``image_id``, ``category_id``, ``bbox`` and ``area`` (the box's when absent):
    box evaluation reads nothing else, and the segmentations of a whole LVIS split are large.
    """
    path = coco_file.path
    for entry in coco_file.category_entries:
        if entry.get("frequency") not in LVIS_FREQUENCIES:
            raise ValueError(
                f"annotation file {path}: category id {entry['id']} has frequency {entry.get('frequency')!r}; LVIS"
                f" evaluation needs one of {LVIS_FREQUENCIES} for every category (is this an LVIS file? data.evaluator=coco"
                " evaluates a COCO one)"
            )
    chosen = set(image_ids)
    images = []
    for image_id in image_ids:
        image = coco_file.images[image_id]
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            value = image.get(key)
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(
                    f"annotation file {path}: image id {image_id} has {key} {value!r:.80}; LVIS evaluation needs a list of"
                    " category ids (is this an LVIS file? data.evaluator=coco evaluates a COCO one)"
                )
        images.append(image)
    annotations = []
    for annotation in coco_file.annotations:
        if annotation["id"] in annotation_ids and annotation["image_id"] in chosen:
            x, y, w, h = annotation["bbox"]
            area = annotation.get("area", float(w * h))
            annotations.append({key: annotation[key] for key in ("id", "image_id", "category_id", "bbox")} | {"area": area})
    return {"images": images, "annotations": annotations, "categories": coco_file.category_entries}
