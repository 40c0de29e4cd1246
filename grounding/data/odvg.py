"""ODVG grounding data: the JSON-lines format of Open-GroundingDino, read and validated line by line.

An ODVG file holds one JSON object per line, each describing one image:

- ``filename`` (the image path relative to an image folder), ``height`` and ``width`` (positive integers);
- either ``detection: {"instances": [{"bbox": [x0, y0, x1, y1], "label": int, "category": str}, ...]}``,
  with a label map file (``{"0": "person", "1": "bicycle", ...}``) naming every label,
- or ``grounding: {"caption": str, "regions": [{"bbox": [x0, y0, x1, y1], "phrase": str,
  "tokens_positive": [[start, end], ...]}, ...]}``, where ``tokens_positive`` are character spans of the
  caption (``caption[start:end]``) that mention the region.

Optional ``image_id`` (an integer or a string) is kept: the converters write the source's image id there.
Other keys are ignored. All checks live in ``check_record``, which reading and writing share; a broken
line fails with an ``OdvgError`` naming the file, the line and the field. What is accepted:

- blank lines are skipped (they still count for line numbers); every other line must be a JSON object;
- a line holds exactly one of ``detection`` and ``grounding``, and one file holds one kind;
- a box is 4 finite numbers with x1 > x0 and y1 > y0, inside ``[0, width] x [0, height]`` up to
  ``box_tolerance`` pixels (default 1); boxes are returned as written (not clipped);
- detection: ``label`` is an integer; with a label map it must be one of its labels and ``category``, when
  given, must be that label's name; without one, ``category`` is required and a label must keep the same
  category over the whole file (the label map is then taken from the file: each label's first category).
  Names are compared after lower-casing and collapsing whitespace; the record's categories are the label
  map's names;
- grounding: ``caption`` is a non-empty string; ``regions`` may be empty (an image with a caption and no
  box). ``tokens_positive`` is a non-empty list of ``[start, end]`` integer pairs with
  ``0 <= start < end <= len(caption)``. When the region also has a ``phrase``, the caption text under its
  spans (joined with one space) must equal the phrase up to case and whitespace (both lower-cased, runs of
  whitespace made one space, ends stripped). Without ``tokens_positive`` (Open-GroundingDino's own files),
  the span is the first exact occurrence of ``phrase`` in the caption, an error when it does not occur.
  Without ``phrase`` the region's phrase is the text under its spans.

A label map is a JSON object mapping ``"0"``, ``"1"``, ... ``"N-1"`` (every label from 0, none missing) to
distinct non-empty names.

``iter_odvg`` streams records (one line in memory at a time), ``read_odvg`` collects them into an
``OdvgFile``; ``write_odvg`` checks every record as the reader would and writes the file (and the label map)
atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, Mapping

from grounding.utils import write_atomic, write_json_atomic

KINDS = ("detection", "grounding")
_NUMBERS = (int, float)
_LOW, _HIGH = -math.inf, math.inf
DEFAULT_BOX_TOLERANCE = 1.0


class OdvgError(ValueError):
    """A broken ODVG line or label map; the message names the file, the line and the field."""


@dataclass
class OdvgRecord:
    """One image of an ODVG file.

    boxes: (N, 4) boxes [x0, y0, x1, y1] in pixels of the ``width`` x ``height`` image, as written.
    Detection (``kind == "detection"``): ``labels`` (N label-map indices) and ``categories`` (N names).
    Grounding (``kind == "grounding"``): ``caption``; per region (box) ``phrases`` (N strings) and
    ``tokens_positive`` (N lists of ``[start, end]`` character spans of the caption).
    line: the line of the file it was read from (0 for records not read from a file).
    """

    filename: str
    height: int
    width: int
    kind: Literal["detection", "grounding"]
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] | None = None
    categories: list[str] | None = None
    caption: str | None = None
    phrases: list[str] | None = None
    tokens_positive: list[list[list[int]]] | None = None
    image_id: int | str | None = None
    line: int = 0

    def boxes_tensor(self):
        """The boxes as a float32 tensor (N, 4) xyxy in pixels."""
        import torch

        return torch.tensor(self.boxes, dtype=torch.float32).reshape(-1, 4)

    def to_json(self) -> dict:
        """The record as one ODVG line's object (an ``OdvgError`` when its lists differ in length)."""
        per_box = ("labels", "categories") if self.kind == "detection" else ("phrases", "tokens_positive")
        for name in per_box:
            values = getattr(self, name)
            if values is not None and len(values) != len(self.boxes):
                raise OdvgError(f"record of {self.filename}: {len(self.boxes)} boxes but {len(values)} {name}")
        entry: dict = {"filename": self.filename, "height": self.height, "width": self.width}
        if self.image_id is not None:
            entry["image_id"] = self.image_id
        if self.kind == "detection":
            labels = self.labels or []
            categories = self.categories or [None] * len(labels)
            instances = []
            for box, label, category in zip(self.boxes, labels, categories):
                instance = {"bbox": list(box), "label": label}
                if category is not None:
                    instance["category"] = category
                instances.append(instance)
            entry["detection"] = {"instances": instances}
        else:
            regions = []
            phrases = self.phrases or [None] * len(self.boxes)
            spans = self.tokens_positive or [None] * len(self.boxes)
            for box, phrase, span in zip(self.boxes, phrases, spans):
                region: dict = {"bbox": list(box)}
                if phrase is not None:
                    region["phrase"] = phrase
                if span is not None:
                    region["tokens_positive"] = [list(s) for s in span]
                regions.append(region)
            entry["grounding"] = {"caption": self.caption, "regions": regions}
        return entry


@dataclass
class OdvgFile:
    """A validated ODVG file: its kind, its records in file order, and (detection) its label map."""

    path: Path
    kind: Literal["detection", "grounding"]
    records: list[OdvgRecord]
    label_map: dict[int, str] | None = None


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


# ----------------------------------------------------------------------------------------- label map
def check_label_map(raw: object, where: str) -> dict[int, str]:
    """A label map object (``{"0": name, ...}``, or int keys) as ``{label: name}``; ``where`` names it in errors."""
    if not isinstance(raw, dict) or not raw:
        raise OdvgError(f"{where}: not a JSON object mapping labels \"0\", \"1\", ... to names")
    labels: dict[int, str] = {}
    by_name: dict[str, int] = {}
    for key, name in raw.items():
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.isdigit() and key.isascii())):
            raise OdvgError(f"{where}: key {key!r} is not a label (a non-negative integer such as \"0\")")
        label = int(key)
        if label in labels:
            raise OdvgError(f"{where}: label {label} appears twice")
        if not isinstance(name, str) or not name.strip():
            raise OdvgError(f"{where}: label {label} has no name ({name!r})")
        clean = _normalized(name)
        if clean in by_name:
            raise OdvgError(
                f"{where}: labels {by_name[clean]} and {label} have the same name {clean!r}; a prompt cannot tell them apart"
            )
        by_name[clean] = label
        labels[label] = name
    missing = sorted(set(range(len(labels))) - set(labels))
    if missing:
        raise OdvgError(f"{where}: labels must run from 0 to {len(labels) - 1} without gaps; label {missing[0]} is missing")
    return dict(sorted(labels.items()))


def read_label_map(path: str | Path) -> dict[int, str]:
    """The label map file at ``path`` as ``{label: name}`` (labels 0..N-1)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"label map not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OdvgError(f"label map {path} is not valid JSON: {error}") from None
    return check_label_map(raw, f"label map {path}")


# ----------------------------------------------------------------------------------------- records
class _Checker:
    """The checks of one file (or one batch of records to write); keeps what spans lines: the kind, labels."""

    def __init__(self, label_map: Mapping[int, str] | None, label_map_name: str, box_tolerance: float):
        self.label_map = dict(label_map) if label_map is not None else None
        self.label_names = {k: _normalized(v) for k, v in self.label_map.items()} if self.label_map is not None else None
        self.label_map_name = label_map_name
        self.tolerance = float(box_tolerance)
        self.kind: str | None = None
        self.kind_line = 0
        self.file_labels: dict[int, tuple[str, int]] = {}  # label -> (category, first line) when no label map
        self._names: dict[str, str] = {}  # category as written -> normalized

    def box(self, value: object, owner: str, index: int, width: int, height: int, where: str) -> list[float]:
        """``value`` checked as the bbox of ``<owner>[<index>]`` (the field named only when it is wrong)."""
        if type(value) in (list, tuple) and len(value) == 4:
            x0, y0, x1, y1 = value
            # NaN fails every comparison; bool is no number here
            fine = (type(x0) in _NUMBERS and type(y0) in _NUMBERS and type(x1) in _NUMBERS and type(y1) in _NUMBERS
                    and _LOW < x0 < _HIGH and _LOW < y0 < _HIGH and _LOW < x1 < _HIGH and _LOW < y1 < _HIGH)
            if not fine:  # numbers of other types (a numpy float handed to the writer)
                fine = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        else:
            fine = False
        if not fine:
            raise OdvgError(f"{where}: {owner}[{index}].bbox is not 4 finite numbers [x0, y0, x1, y1]: {value!r:.100}")
        if x1 <= x0 or y1 <= y0:
            axis = "x1 <= x0" if x1 <= x0 else "y1 <= y0"
            raise OdvgError(f"{where}: {owner}[{index}].bbox has {axis}: {value!r}")
        tol = self.tolerance
        if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
            raise OdvgError(
                f"{where}: {owner}[{index}].bbox {value!r} lies outside the {width}x{height} image by more than {tol:g} px"
            )
        return [float(x0), float(y0), float(x1), float(y1)]

    def normalized(self, name: str) -> str:
        clean = self._names.get(name)
        if clean is None:
            clean = self._names[name] = _normalized(name)
        return clean

    def record(self, entry: object, where: str, line: int = 0) -> OdvgRecord:
        if not isinstance(entry, dict):
            raise OdvgError(f"{where}: not a JSON object")
        for key in ("filename", "height", "width"):
            if key not in entry:
                raise OdvgError(f"{where}: missing key {key!r}")
        filename = entry["filename"]
        if not isinstance(filename, str) or not filename.strip():
            raise OdvgError(f"{where}: filename is not a non-empty string: {filename!r:.100}")
        size = {}
        for key in ("height", "width"):
            value = entry[key]
            if type(value) is int and value > 0:
                size[key] = value
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 or int(value) != value:
                raise OdvgError(f"{where}: {key} is {value!r}; expected a positive integer")
            size[key] = int(value)
        image_id = entry.get("image_id")
        if image_id is not None and (isinstance(image_id, bool) or not isinstance(image_id, (int, str))):
            raise OdvgError(f"{where}: image_id is {image_id!r}; expected an integer or a string")
        present = [k for k in KINDS if k in entry]
        if not present:
            raise OdvgError(f"{where}: missing key 'detection' or 'grounding' (a line holds one of them)")
        if len(present) == 2:
            raise OdvgError(f"{where}: has both 'detection' and 'grounding'; a line holds one of them")
        kind = present[0]
        if self.kind is None:
            self.kind, self.kind_line = kind, line
        elif kind != self.kind:
            first = f"line {self.kind_line}" if self.kind_line else "the first record"
            raise OdvgError(f"{where}: a {kind} record, but {first} was {self.kind}; one file holds one kind")
        record = OdvgRecord(filename, size["height"], size["width"], kind, image_id=image_id, line=line)
        if kind == "detection":
            self._detection(entry["detection"], record, where)
        else:
            self._grounding(entry["grounding"], record, where)
        return record

    def _detection(self, value: object, record: OdvgRecord, where: str) -> None:
        if not isinstance(value, dict):
            raise OdvgError(f"{where}: detection is not an object")
        if "instances" not in value:
            raise OdvgError(f"{where}: detection: missing key 'instances'")
        instances = value["instances"]
        if not isinstance(instances, list):
            raise OdvgError(f"{where}: detection.instances is not a list")
        record.labels, record.categories = [], []
        label_map, label_names, file_labels = self.label_map, self.label_names, self.file_labels
        boxes, labels, categories = record.boxes, record.labels, record.categories
        for index, instance in enumerate(instances):
            if type(instance) is not dict or "bbox" not in instance or "label" not in instance:
                name = f"detection.instances[{index}]"
                if not isinstance(instance, dict):
                    raise OdvgError(f"{where}: {name} is not an object")
                key = "bbox" if "bbox" not in instance else "label"
                raise OdvgError(f"{where}: {name}: missing key {key!r}")
            box = self.box(instance["bbox"], "detection.instances", index, record.width, record.height, where)
            label = instance["label"]
            category = instance.get("category")
            if type(label) is not int or (category is not None and (type(category) is not str or not category.strip())):
                name = f"detection.instances[{index}]"
                if isinstance(label, bool) or not isinstance(label, int):
                    raise OdvgError(f"{where}: {name}.label is {label!r}; expected an integer")
                if not isinstance(category, str) or not category.strip():
                    raise OdvgError(f"{where}: {name}.category is not a non-empty string: {category!r:.100}")
            if label_map is not None:
                known = label_map.get(label)
                if known is None:
                    raise OdvgError(
                        f"{where}: detection.instances[{index}].label {label} is not in the {self.label_map_name}"
                        f" (labels 0..{len(label_map) - 1})"
                    )
                if category is not None and category != known and self.normalized(category) != label_names[label]:
                    raise OdvgError(
                        f"{where}: detection.instances[{index}].category {category!r} differs from label {label}'s name"
                        f" {known!r} in the {self.label_map_name}"
                    )
                category = known
            else:
                if category is None:
                    raise OdvgError(
                        f"{where}: detection.instances[{index}]: missing key 'category' (required without a label map)"
                    )
                if label < 0:
                    raise OdvgError(f"{where}: detection.instances[{index}].label is {label}; labels start at 0")
                seen = file_labels.get(label)
                if seen is None:
                    file_labels[label] = (category, record.line)
                elif seen[0] != category and self.normalized(seen[0]) != self.normalized(category):
                    raise OdvgError(
                        f"{where}: detection.instances[{index}].category {category!r} differs from {seen[0]!r},"
                        f" the category of label {label} on line {seen[1]}"
                    )
                else:
                    category = seen[0]
            boxes.append(box)
            labels.append(label)
            categories.append(category)

    def _grounding(self, value: object, record: OdvgRecord, where: str) -> None:
        if not isinstance(value, dict):
            raise OdvgError(f"{where}: grounding is not an object")
        for key in ("caption", "regions"):
            if key not in value:
                raise OdvgError(f"{where}: grounding: missing key {key!r}")
        caption, regions = value["caption"], value["regions"]
        if not isinstance(caption, str) or not caption.strip():
            raise OdvgError(f"{where}: grounding.caption is not a non-empty string: {caption!r:.100}")
        if not isinstance(regions, list):
            raise OdvgError(f"{where}: grounding.regions is not a list")
        record.caption, record.phrases, record.tokens_positive = caption, [], []
        for index, region in enumerate(regions):
            if type(region) is not dict or "bbox" not in region:
                name = f"grounding.regions[{index}]"
                if not isinstance(region, dict):
                    raise OdvgError(f"{where}: {name} is not an object")
                raise OdvgError(f"{where}: {name}: missing key 'bbox'")
            box = self.box(region["bbox"], "grounding.regions", index, record.width, record.height, where)
            phrase = region.get("phrase")
            if phrase is not None and (type(phrase) is not str or not phrase.strip()):
                raise OdvgError(f"{where}: grounding.regions[{index}].phrase is not a non-empty string: {phrase!r:.100}")
            spans = region.get("tokens_positive")
            if spans is None:
                if phrase is None:
                    raise OdvgError(
                        f"{where}: grounding.regions[{index}]: missing key 'tokens_positive' (or a 'phrase' to find in"
                        " the caption)"
                    )
                start = caption.find(phrase)
                if start < 0:
                    raise OdvgError(
                        f"{where}: grounding.regions[{index}].phrase {phrase!r} does not occur in the caption {caption!r:.200}"
                    )
                spans = [[start, start + len(phrase)]]
            else:
                name = f"grounding.regions[{index}].tokens_positive"
                spans = self._spans(spans, name, caption, where)
                covered = " ".join([caption[s:e] for s, e in spans])
                if phrase is None:
                    phrase = " ".join(covered.split())
                elif covered != phrase and _normalized(covered) != _normalized(phrase):
                    raise OdvgError(f"{where}: {name} {spans!r} covers {covered!r}, not the phrase {phrase!r}")
            record.boxes.append(box)
            record.phrases.append(phrase)
            record.tokens_positive.append(spans)

    @staticmethod
    def _spans(value: object, name: str, caption: str, where: str) -> list[list[int]]:
        if not isinstance(value, list) or not value:
            raise OdvgError(f"{where}: {name} is not a non-empty list of [start, end] pairs: {value!r:.100}")
        spans = []
        for span in value:
            if (
                type(span) not in (list, tuple) or len(span) != 2 or type(span[0]) is not int or type(span[1]) is not int
            ):
                raise OdvgError(f"{where}: {name} holds {span!r:.100}, not a [start, end] pair of integers")
            start, end = span
            if end <= start:
                raise OdvgError(f"{where}: {name} span [{start}, {end}] is empty (end <= start)")
            if start < 0 or end > len(caption):
                raise OdvgError(f"{where}: {name} span [{start}, {end}] lies outside the caption (length {len(caption)})")
            spans.append([start, end])
        return spans


def check_record(entry: object, where: str = "ODVG record", label_map: Mapping[int, str] | None = None,
                 box_tolerance: float = DEFAULT_BOX_TOLERANCE) -> OdvgRecord:
    """One ODVG line's object, checked (module docstring) and returned as an ``OdvgRecord``."""
    return _Checker(label_map, "label map", box_tolerance).record(entry, where)


def _resolve_label_map(label_map: str | Path | Mapping[int, str] | None) -> tuple[dict[int, str] | None, str]:
    if label_map is None:
        return None, "label map"
    if isinstance(label_map, Mapping):
        return check_label_map(dict(label_map), "label map"), "label map"
    return read_label_map(label_map), f"label map {label_map}"


def _records(path: Path, labels: dict[int, str] | None, label_map_name: str, box_tolerance: float) -> Iterator[OdvgRecord]:
    checker = _Checker(labels, label_map_name, box_tolerance)
    try:
        handle = open(path, "rb")  # decoded line by line, so that an undecodable line is named by its number
    except FileNotFoundError:
        raise FileNotFoundError(f"ODVG file not found: {path}") from None
    count = 0
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise OdvgError(f"ODVG file {path}:{number}: not UTF-8 text: {error}") from None
            if number == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if not text.strip():
                continue
            where = f"ODVG file {path}:{number}"
            try:
                entry = json.loads(text)
            except json.JSONDecodeError as error:
                raise OdvgError(f"{where}: not valid JSON: {error}") from None
            yield checker.record(entry, where, number)
            count += 1
    if not count:
        raise OdvgError(f"ODVG file {path} holds no record")


def iter_odvg(path: str | Path, label_map: str | Path | Mapping[int, str] | None = None,
              box_tolerance: float = DEFAULT_BOX_TOLERANCE) -> Iterator[OdvgRecord]:
    """The records of an ODVG file, one line at a time (module docstring for what is checked).

    label_map: a label map file or ``{label: name}``; checks and names the labels of detection records.
    A file without any record is an error once it has been read to the end.
    """
    labels, label_map_name = _resolve_label_map(label_map)
    return _records(Path(path), labels, label_map_name, box_tolerance)


def read_odvg(path: str | Path, label_map: str | Path | Mapping[int, str] | None = None,
              box_tolerance: float = DEFAULT_BOX_TOLERANCE) -> OdvgFile:
    """All records of an ODVG file, validated (see ``iter_odvg``).

    ``label_map`` of the result: the given one, or for a detection file without one, the labels and
    categories the file uses (sorted by label); None for grounding files.
    """
    path = Path(path)
    labels, label_map_name = _resolve_label_map(label_map)
    records = list(_records(path, labels, label_map_name, box_tolerance))
    kind = records[0].kind
    if kind == "detection" and labels is None:
        found: dict[int, str] = {}
        for record in records:
            for label, category in zip(record.labels, record.categories):
                found.setdefault(label, category)
        labels = dict(sorted(found.items()))
    return OdvgFile(path, kind, records, labels if kind == "detection" else None)


# ----------------------------------------------------------------------------------------- writing
def write_odvg(path: str | Path, records: Iterable[OdvgRecord | dict], label_map_path: str | Path | None = None,
               label_map: Mapping[int, str] | None = None, box_tolerance: float = DEFAULT_BOX_TOLERANCE) -> int:
    """Write ``records`` (``OdvgRecord``s or ODVG line objects) as an ODVG file, atomically; returns their count.

    Every record is checked as ``read_odvg`` checks it (an ``OdvgError`` names the record's index) and written
    in its complete form (phrases and ``tokens_positive`` filled in, categories named), so a written file
    always reads back; records are streamed, never all held in memory. ``label_map`` ({label: name}) checks
    the detection labels; with ``label_map_path`` the map is also written there (atomically, after the
    records), built from the records' labels and categories when ``label_map`` is not given.
    """
    path = Path(path)
    labels = check_label_map(dict(label_map), "label map") if label_map is not None else None
    checker = _Checker(labels, "label map", box_tolerance)
    count = 0

    def write(temporary: str) -> None:
        nonlocal count
        with open(temporary, "w", encoding="utf-8") as stream:
            for index, record in enumerate(records):
                where = f"ODVG record {index} (for {path})"
                try:
                    entry = record.to_json() if isinstance(record, OdvgRecord) else record
                except OdvgError as error:
                    raise OdvgError(f"{where}: {error}") from None
                checked = checker.record(entry, where)
                stream.write(json.dumps(checked.to_json(), ensure_ascii=False, separators=(",", ":")))
                stream.write("\n")
                count += 1
        if not count:
            raise OdvgError(f"no record to write to {path}")
        if label_map_path is not None and checker.kind != "detection":
            raise OdvgError(f"a label map ({label_map_path}) belongs to detection records; {path} gets {checker.kind} records")

    write_atomic(path, write)
    if label_map_path is not None:
        written = labels
        if written is None:
            written = check_label_map({label: name for label, (name, _) in sorted(checker.file_labels.items())},
                                      f"label map built from the records for {path}")
        write_json_atomic(label_map_path, {str(k): v for k, v in written.items()})
    return count
