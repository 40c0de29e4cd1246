"""ODVG grounding data: every validator error, the writer, and each converter against an independent reading
of its source (pycocotools for COCO, the refs and sentence files themselves for RefCOCO and Flickr30k)."""

import json
import math
import os
import pickle
import subprocess
import sys

import pytest
from pycocotools.coco import COCO

from grounding.data import synthetic as syn
from grounding.data.odvg import OdvgError, OdvgRecord, check_record, iter_odvg, read_label_map, read_odvg, write_odvg
from grounding.data.odvg_convert import (
    coco_to_odvg,
    default_label_map_path,
    flickr30k_to_odvg,
    main,
    parse_flickr_sentence,
    read_refs,
    refcoco_to_odvg,
)
from grounding.data.synthetic.odvg import write_synthetic_odvg

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

LABELS = {"0": "dog", "1": "Red Car"}
DETECTION = {"filename": "a.jpg", "height": 50, "width": 100,
             "detection": {"instances": [{"bbox": [1, 2, 30, 40], "label": 0, "category": "dog"}]}}
GROUNDING = {"filename": "a.jpg", "height": 50, "width": 100,
             "grounding": {"caption": "a dog near a red car",
                           "regions": [{"bbox": [1, 2, 30, 40], "phrase": "a dog", "tokens_positive": [[0, 5]]}]}}


def with_changes(base, path, value):
    """A deep copy of ``base`` with the field at ``path`` (keys / indices) set to ``value`` (``...`` deletes it)."""
    entry = json.loads(json.dumps(base))
    target = entry
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return entry


def odvg_file(tmp_path, *lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def label_map_file(tmp_path, labels=LABELS, name="labels.json"):
    path = tmp_path / name
    path.write_text(json.dumps(labels))
    return path


# ----------------------------------------------------------------------------------------- validator
DI = ("detection", "instances", 0)
GR = ("grounding", "regions", 0)
LINE_ERRORS = [
    # (line 3 of the file: a good line, a blank line, then this one), expected message after "<path>:3: "
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    (with_changes(DETECTION, ("filename",), ...), "missing key 'filename'"),
    (with_changes(DETECTION, ("height",), ...), "missing key 'height'"),
    (with_changes(DETECTION, ("width",), ...), "missing key 'width'"),
    (with_changes(DETECTION, ("filename",), " "), "filename is not a non-empty string"),
    (with_changes(DETECTION, ("height",), 0), "height is 0; expected a positive integer"),
    (with_changes(DETECTION, ("width",), 10.5), "width is 10.5; expected a positive integer"),
    (with_changes(DETECTION, ("width",), True), "width is True; expected a positive integer"),
    (with_changes(DETECTION, ("image_id",), [1]), "image_id is [1]; expected an integer or a string"),
    (with_changes(DETECTION, ("detection",), ...), "missing key 'detection' or 'grounding'"),
    ({**DETECTION, "grounding": GROUNDING["grounding"]}, "has both 'detection' and 'grounding'"),
    (with_changes(DETECTION, ("detection",), []), "detection is not an object"),
    (with_changes(DETECTION, ("detection", "instances"), ...), "detection: missing key 'instances'"),
    (with_changes(DETECTION, ("detection", "instances"), {}), "detection.instances is not a list"),
    (with_changes(DETECTION, DI, 3), "detection.instances[0] is not an object"),
    (with_changes(DETECTION, DI + ("bbox",), ...), "detection.instances[0]: missing key 'bbox'"),
    (with_changes(DETECTION, DI + ("label",), ...), "detection.instances[0]: missing key 'label'"),
    (with_changes(DETECTION, DI + ("bbox",), [1, 2, 3]), "detection.instances[0].bbox is not 4 finite numbers"),
    (with_changes(DETECTION, DI + ("bbox",), [1, 2, "3", 4]), "detection.instances[0].bbox is not 4 finite numbers"),
    (with_changes(DETECTION, DI + ("bbox",), [1, 2, True, 4]), "detection.instances[0].bbox is not 4 finite numbers"),
    (json.dumps(with_changes(DETECTION, DI + ("bbox",), [1, 2, math.nan, 4])),
     "detection.instances[0].bbox is not 4 finite numbers"),
    (json.dumps(with_changes(DETECTION, DI + ("bbox",), [1, 2, math.inf, 4])),
     "detection.instances[0].bbox is not 4 finite numbers"),
    (with_changes(DETECTION, DI + ("bbox",), [5, 2, 5, 4]), "detection.instances[0].bbox has x1 <= x0: [5, 2, 5, 4]"),
    (with_changes(DETECTION, DI + ("bbox",), [1, 9, 5, 4]), "detection.instances[0].bbox has y1 <= y0: [1, 9, 5, 4]"),
    (with_changes(DETECTION, DI + ("bbox",), [-1.5, 0, 5, 4]),
     "detection.instances[0].bbox [-1.5, 0, 5, 4] lies outside the 100x50 image by more than 1 px"),
    (with_changes(DETECTION, DI + ("bbox",), [0, 0, 5, 51.5]),
     "detection.instances[0].bbox [0, 0, 5, 51.5] lies outside the 100x50 image by more than 1 px"),
    (with_changes(DETECTION, DI + ("label",), "0"), "detection.instances[0].label is '0'; expected an integer"),
    (with_changes(DETECTION, DI + ("label",), False), "detection.instances[0].label is False; expected an integer"),
    (with_changes(DETECTION, DI + ("label",), 2), "detection.instances[0].label 2 is not in the label map"),
    (with_changes(DETECTION, DI + ("category",), "cat"),
     "detection.instances[0].category 'cat' differs from label 0's name 'dog' in the label map"),
    (with_changes(DETECTION, DI + ("category",), ""), "detection.instances[0].category is not a non-empty string"),
    (GROUNDING, "a grounding record, but line 1 was detection; one file holds one kind"),
]


@pytest.mark.parametrize("line, message", LINE_ERRORS)
def test_every_line_error_names_file_line_and_field(tmp_path, line, message):
    path = odvg_file(tmp_path, DETECTION, "", line)
    with pytest.raises(OdvgError) as caught:
        read_odvg(path, label_map_file(tmp_path))
    assert f"ODVG file {path}:3: {message}" in str(caught.value)


GROUNDING_ERRORS = [
    (with_changes(GROUNDING, ("grounding",), "text"), "grounding is not an object"),
    (with_changes(GROUNDING, ("grounding", "caption"), ...), "grounding: missing key 'caption'"),
    (with_changes(GROUNDING, ("grounding", "regions"), ...), "grounding: missing key 'regions'"),
    (with_changes(GROUNDING, ("grounding", "caption"), "  "), "grounding.caption is not a non-empty string"),
    (with_changes(GROUNDING, ("grounding", "regions"), {}), "grounding.regions is not a list"),
    (with_changes(GROUNDING, GR, "a dog"), "grounding.regions[0] is not an object"),
    (with_changes(GROUNDING, GR + ("bbox",), ...), "grounding.regions[0]: missing key 'bbox'"),
    (with_changes(GROUNDING, GR + ("bbox",), [0, 0, 1]), "grounding.regions[0].bbox is not 4 finite numbers"),
    (with_changes(GROUNDING, GR + ("bbox",), [0, 0, 101.5, 3]),
     "grounding.regions[0].bbox [0, 0, 101.5, 3] lies outside the 100x50 image by more than 1 px"),
    (with_changes(GROUNDING, GR + ("phrase",), ""), "grounding.regions[0].phrase is not a non-empty string"),
    (with_changes(with_changes(GROUNDING, GR + ("phrase",), ...), GR + ("tokens_positive",), ...),
     "grounding.regions[0]: missing key 'tokens_positive' (or a 'phrase' to find in the caption)"),
    (with_changes(with_changes(GROUNDING, GR + ("phrase",), "a cat"), GR + ("tokens_positive",), ...),
     "grounding.regions[0].phrase 'a cat' does not occur in the caption"),
    (with_changes(GROUNDING, GR + ("tokens_positive",), []),
     "grounding.regions[0].tokens_positive is not a non-empty list of [start, end] pairs"),
    (with_changes(GROUNDING, GR + ("tokens_positive",), [0, 5]),
     "grounding.regions[0].tokens_positive holds 0, not a [start, end] pair of integers"),
    (with_changes(GROUNDING, GR + ("tokens_positive",), [[0.0, 5]]),
     "grounding.regions[0].tokens_positive holds [0.0, 5], not a [start, end] pair of integers"),
    (with_changes(GROUNDING, GR + ("tokens_positive",), [[5, 5]]),
     "grounding.regions[0].tokens_positive span [5, 5] is empty (end <= start)"),
    (with_changes(GROUNDING, GR + ("tokens_positive",), [[-1, 5]]),
     "grounding.regions[0].tokens_positive span [-1, 5] lies outside the caption (length 20)"),
    (with_changes(GROUNDING, GR + ("tokens_positive",), [[12, 21]]),
     "grounding.regions[0].tokens_positive span [12, 21] lies outside the caption (length 20)"),
    (with_changes(GROUNDING, GR + ("tokens_positive",), [[0, 7]]),
     "grounding.regions[0].tokens_positive [[0, 7]] covers 'a dog n', not the phrase 'a dog'"),
    (with_changes(GROUNDING, GR + ("tokens_positive",), [[2, 5], [13, 16]]),
     "grounding.regions[0].tokens_positive [[2, 5], [13, 16]] covers 'dog red', not the phrase 'a dog'"),
    (DETECTION, "a detection record, but line 1 was grounding; one file holds one kind"),
]


@pytest.mark.parametrize("line, message", GROUNDING_ERRORS)
def test_every_grounding_error_names_file_line_and_field(tmp_path, line, message):
    path = odvg_file(tmp_path, GROUNDING, "", line)
    with pytest.raises(OdvgError) as caught:
        read_odvg(path)
    assert f"ODVG file {path}:3: {message}" in str(caught.value)


def test_detection_without_a_label_map_needs_consistent_categories(tmp_path):
    missing = with_changes(DETECTION, DI + ("category",), ...)
    negative = with_changes(DETECTION, DI + ("label",), -1)
    other = with_changes(DETECTION, DI + ("category",), "cat")
    for line, message in ((missing, "detection.instances[0]: missing key 'category' (required without a label map)"),
                          (negative, "detection.instances[0].label is -1; labels start at 0"),
                          (other, "detection.instances[0].category 'cat' differs from 'dog', the category of label 0 on line 1")):
        path = odvg_file(tmp_path, DETECTION, line)
        with pytest.raises(OdvgError) as caught:
            read_odvg(path)
        assert f"ODVG file {path}:2: {message}" in str(caught.value)
    same = with_changes(DETECTION, DI + ("category",), " DOG ")  # case and whitespace do not count
    read = read_odvg(odvg_file(tmp_path, DETECTION, same))
    assert read.label_map == {0: "dog"} and read.records[1].categories == ["dog"]  # the label's first name


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ODVG file not found: .*absent.jsonl"):
        read_odvg(tmp_path / "absent.jsonl")
    with pytest.raises(OdvgError, match=r"ODVG file .*empty.jsonl holds no record"):
        read_odvg(odvg_file(tmp_path, "", "  ", name="empty.jsonl"))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(json.dumps(DETECTION).encode() + b"\n\xff\xfe\n")
    with pytest.raises(OdvgError, match=r"ODVG file .*binary.jsonl:2: not UTF-8 text"):
        read_odvg(binary)


@pytest.mark.parametrize("content, message", [
    ("{", "is not valid JSON"),
    ("[]", ": not a JSON object mapping labels"),
    ('{"a": "dog"}', ": key 'a' is not a label"),
    ('{"-1": "dog"}', ": key '-1' is not a label"),
    ('{"0": ""}', ": label 0 has no name"),
    ('{"0": "Dog", "1": "dog "}', ": labels 0 and 1 have the same name 'dog'; a prompt cannot tell them apart"),
    ('{"0": "dog", "2": "cat"}', ": labels must run from 0 to 1 without gaps; label 1 is missing"),
])
def test_label_map_errors(tmp_path, content, message):
    path = tmp_path / "labels.json"
    path.write_text(content)
    with pytest.raises(OdvgError) as caught:
        read_label_map(path)
    assert f"label map {path}" in str(caught.value) and message in str(caught.value)
    with pytest.raises(FileNotFoundError, match="label map not found"):
        read_label_map(tmp_path / "none.json")


def test_what_the_reader_accepts(tmp_path):
    caption = "A  Dog near a red car"
    regions = [
        {"bbox": [-1, -1, 101, 51], "phrase": "a dog", "tokens_positive": [[0, 6]]},  # case, inner spaces; 1 px over
        {"bbox": [1, 1, 5, 5], "phrase": "red car"},  # Open-GroundingDino style: the span is found in the caption
        {"bbox": [1, 1, 5, 5], "tokens_positive": [[14, 17], [18, 21]]},  # no phrase: the text under the spans
    ]
    lines = [
        {"filename": "b.jpg", "height": 50.0, "width": 100, "image_id": "b", "extra": 1,
         "grounding": {"caption": caption, "regions": regions}},
        {"filename": "c.jpg", "height": 50, "width": 100, "grounding": {"caption": "nothing to see", "regions": []}},
    ]
    path = odvg_file(tmp_path, "", *lines, "")
    records = list(iter_odvg(path))
    first, second = records
    assert (first.line, second.line) == (2, 3) and first.kind == "grounding" and first.image_id == "b"
    assert first.height == 50 and isinstance(first.height, int)
    assert first.boxes == [[-1.0, -1.0, 101.0, 51.0], [1.0, 1.0, 5.0, 5.0], [1.0, 1.0, 5.0, 5.0]]
    assert first.phrases == ["a dog", "red car", "red car"]
    assert first.tokens_positive == [[[0, 6]], [[14, 21]], [[14, 17], [18, 21]]]
    assert second.boxes == [] and second.phrases == [] and second.caption == "nothing to see"
    assert first.boxes_tensor().shape == (3, 4) and second.boxes_tensor().shape == (0, 4)
    assert read_odvg(path).label_map is None

    detection = with_changes(DETECTION, DI + ("category",), "RED  car")
    detection["detection"]["instances"][0]["label"] = 1
    read = read_odvg(odvg_file(tmp_path, detection, with_changes(DETECTION, DI + ("category",), ...), name="d.jsonl"),
                     label_map={0: "dog", 1: "Red Car"})
    assert read.kind == "detection" and [r.categories for r in read.records] == [["Red Car"], ["dog"]]
    assert read.label_map == {0: "dog", 1: "Red Car"}
    loose = with_changes(DETECTION, DI + ("bbox",), [-1.5, 0, 5, 4])
    assert read_odvg(odvg_file(tmp_path, loose, name="e.jsonl"), box_tolerance=2).records[0].boxes == [[-1.5, 0, 5, 4]]


def test_write_round_trip_and_refusals(tmp_path):
    source = odvg_file(tmp_path, GROUNDING, with_changes(GROUNDING, GR + ("tokens_positive",), ...))
    read = read_odvg(source)
    out = tmp_path / "out" / "copy.jsonl"
    assert write_odvg(out, read.records) == 2
    again = read_odvg(out)
    strip = lambda r: {**r.__dict__, "line": 0}  # noqa: E731
    assert [strip(r) for r in again.records] == [strip(r) for r in read.records]
    assert json.loads(out.read_text().splitlines()[1])["grounding"]["regions"][0]["tokens_positive"] == [[0, 5]]

    detection = [OdvgRecord("x.jpg", 10, 20, "detection", boxes=[[0, 0, 5, 5], [1, 1, 2, 2]], labels=[1, 0],
                            categories=["cat", "dog"], image_id=7)]
    labels_path = tmp_path / "det_labels.json"
    write_odvg(tmp_path / "det.jsonl", detection, label_map_path=labels_path)
    assert json.loads(labels_path.read_text()) == {"0": "dog", "1": "cat"}
    assert read_odvg(tmp_path / "det.jsonl", labels_path).records[0].boxes == [[0, 0, 5, 5], [1, 1, 2, 2]]

    # a bad record: an error naming its index, and nothing written (an existing file stays as it was)
    before = out.read_text()
    bad = [read.records[0], with_changes(GROUNDING, GR + ("bbox",), [5, 0, 1, 1])]
    with pytest.raises(OdvgError, match=r"ODVG record 1 \(for .*copy.jsonl\): grounding.regions\[0\].bbox has x1 <= x0"):
        write_odvg(out, bad)
    assert out.read_text() == before and [p.name for p in out.parent.iterdir()] == ["copy.jsonl"]
    with pytest.raises(OdvgError, match="label 5 is not in the label map"):
        write_odvg(tmp_path / "new.jsonl", [with_changes(DETECTION, DI + ("label",), 5)], label_map={0: "dog"})
    short = OdvgRecord("x.jpg", 10, 20, "detection", boxes=[[0, 0, 5, 5]], labels=[], categories=[])
    with pytest.raises(OdvgError, match=r"ODVG record 0 \(for .*new.jsonl\): record of x.jpg: 1 boxes but 0 labels"):
        write_odvg(tmp_path / "new.jsonl", [short])
    with pytest.raises(OdvgError, match="no record to write"):
        write_odvg(tmp_path / "new.jsonl", [])
    with pytest.raises(OdvgError, match="a label map .* belongs to detection records"):
        write_odvg(tmp_path / "new.jsonl", [GROUNDING], label_map_path=tmp_path / "l.json")
    assert not (tmp_path / "new.jsonl").exists() and not (tmp_path / "l.json").exists()
    assert check_record(DETECTION).categories == ["dog"]


# ----------------------------------------------------------------------------------------- COCO
def coco_boxes_and_names(path):
    """image file name -> [(xyxy clipped to the image, category name)] of the non-crowd boxes, via pycocotools."""
    coco = COCO(str(path))
    found = {}
    for image in coco.loadImgs(coco.getImgIds()):
        width, height = image["width"], image["height"]
        entries = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"], iscrowd=False)):
            x, y, w, h = ann["bbox"]
            box = [max(0, x), max(0, y), min(width, x + w), min(height, y + h)]
            if box[2] > box[0] and box[3] > box[1]:
                entries.append((box, " ".join(coco.loadCats(ann["category_id"])[0]["name"].lower().split())))
        found[image["file_name"]] = entries
    return found


def odvg_boxes_and_names(path, label_map):
    return {r.filename: list(zip(r.boxes, r.categories)) for r in read_odvg(path, label_map).records}


def test_coco_to_odvg_matches_pycocotools(tmp_path, capsys):
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({
        "images": [{"id": 5, "file_name": "a.jpg", "width": 60, "height": 40},
                   {"id": 9, "file_name": "b.jpg", "width": 30, "height": 30}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 11, "bbox": [10, 5, 20.5, 10], "iscrowd": 0, "area": 1},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [50, 30, 20, 20], "iscrowd": 0, "area": 1},  # clipped
            {"id": 3, "image_id": 5, "category_id": 3, "bbox": [0, 0, 60, 40], "iscrowd": 1, "area": 1},  # crowd
            {"id": 4, "image_id": 5, "category_id": 7, "bbox": [70, 0, 5, 5], "iscrowd": 0, "area": 1},  # outside
            {"id": 5, "image_id": 5, "category_id": 7, "bbox": [1, 1, 0, 5], "iscrowd": 0, "area": 1},  # empty
        ],
        "categories": [{"id": 11, "name": "Traffic  Light"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}],
    }))
    out = tmp_path / "coco.jsonl"
    assert main(["coco", "--instances", str(instances), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {
        "command": "coco", "source": str(instances), "out": str(out), "label_map": str(default_label_map_path(out)),
        "records": 2, "boxes": 2, "categories": 3, "clipped": 1, "images_without_boxes": 1,
        "skipped": {"crowd": 1, "empty box": 2},
    }
    labels = read_label_map(summary["label_map"])
    assert labels == {0: "dog", 1: "cat", 2: "traffic light"}  # category ids 3, 7, 11 in id order
    assert odvg_boxes_and_names(out, labels) == coco_boxes_and_names(instances)
    assert [r.labels for r in read_odvg(out, labels).records] == [[2, 0], []]
    assert [r.image_id for r in read_odvg(out, labels).records] == [5, 9]


def test_coco_to_odvg_on_the_synthetic_set(synthetic_root, tmp_path):
    instances = syn.instances_path(synthetic_root, "train")
    summary = coco_to_odvg(instances, tmp_path / "train.jsonl", tmp_path / "labels.json")
    labels = read_label_map(tmp_path / "labels.json")
    assert list(labels.values()) == syn.category_names(syn.SyntheticConfig())
    assert summary["clipped"] == 0 and summary["skipped"] == {}
    assert odvg_boxes_and_names(tmp_path / "train.jsonl", labels) == coco_boxes_and_names(instances)


# ----------------------------------------------------------------------------------------- RefCOCO
def refcoco_files(tmp_path):
    """A tiny RefCOCO in its real layout: refs(unc).p (a list of ref dicts) and a COCO instances.json."""
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({
        "images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "width": 640, "height": 427},
                   {"id": 12, "file_name": "COCO_train2014_000000000012.jpg", "width": 100, "height": 80}],
        "annotations": [
            {"id": 1719310, "image_id": 581857, "category_id": 1, "bbox": [103.93, 199.99, 134.22, 177.95], "area": 1, "iscrowd": 0},
            {"id": 1719311, "image_id": 581857, "category_id": 1, "bbox": [600, 10, 50, 20], "area": 1, "iscrowd": 0},
            {"id": 40, "image_id": 12, "category_id": 2, "bbox": [1, 2, 3, 4], "area": 1, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}],
    }))

    def ref(ref_id, ann_id, image_id, split, *sents):
        sentences = [{"tokens": s.split(), "raw": s.upper(), "sent_id": ref_id * 10 + i, "sent": s} for i, s in enumerate(sents)]
        return {"sent_ids": [s["sent_id"] for s in sentences], "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "ann_id": ann_id, "ref_id": ref_id, "image_id": image_id, "split": split, "sentences": sentences,
                "category_id": 1}

    refs = [ref(0, 1719310, 581857, "val", "lady with back to us", "woman  on the left"),
            ref(1, 1719311, 581857, "val", "man on the right"),
            ref(2, 40, 12, "train", "blue car"),
            ref(3, 40, 12, "val")]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(refs, protocol=2))
    return path, instances


def test_refcoco_per_expression_and_per_image(tmp_path, capsys):
    refs, instances = refcoco_files(tmp_path)
    out = tmp_path / "val.jsonl"
    assert main(["refcoco", "--refs", str(refs), "--instances", str(instances), "--out", str(out), "--split", "val"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["records"], summary["refs"], summary["expressions"], summary["images"]) == (3, 3, 3, 1)
    assert summary["skipped"] == {"ref without sentences": 1}
    records = read_odvg(out).records
    lady = [103.93, 199.99, 103.93 + 134.22, 199.99 + 177.95]
    right = [600.0, 10.0, 640.0, 30.0]  # clipped to the 640 px wide image
    assert [(r.caption, r.boxes, r.tokens_positive, r.phrases) for r in records] == [
        ("lady with back to us", [lady], [[[0, 20]]], ["lady with back to us"]),
        ("woman on the left", [lady], [[[0, 17]]], ["woman on the left"]),
        ("man on the right", [right], [[[0, 16]]], ["man on the right"]),
    ]
    assert {(r.filename, r.width, r.height, r.image_id) for r in records} == {("COCO_train2014_000000581857.jpg", 640, 427, 581857)}

    per_image = refcoco_to_odvg(refs, instances, tmp_path / "image.jsonl", split="val", per="image")
    (record,) = read_odvg(tmp_path / "image.jsonl").records
    assert per_image["records"] == 1 and record.caption == "lady with back to us . woman on the left . man on the right ."
    assert [[record.caption[s:e] for s, e in spans] for spans in record.tokens_positive] == [
        ["lady with back to us"], ["woman on the left"], ["man on the right"]]
    assert record.boxes == [lady, lady, right]
    everything = refcoco_to_odvg(refs, instances, tmp_path / "all.jsonl")
    assert everything["split"] is None and everything["records"] == 4


def test_refcoco_errors_and_a_safe_unpickler(tmp_path):
    refs, instances = refcoco_files(tmp_path)
    with pytest.raises(ValueError, match=r"refs file .*refs\(unc\).p has no ref of split 'testB' \(splits: train, val\)"):
        refcoco_to_odvg(refs, instances, tmp_path / "o.jsonl", split="testB")
    good = pickle.loads(refs.read_bytes())
    cases = [
        ({**good[0], "ann_id": 99}, r"ref id 0 refers to annotation id 99 missing from .*instances.json"),
        ({**good[0], "image_id": 98}, r"ref id 0 refers to image id 98 missing from .*instances.json"),
        ({**good[0], "image_id": 12}, r"ref id 0 has image id 12 but its annotation 1719310 belongs to image id 581857"),
        ({**good[0], "sentences": [{"raw": "x"}]}, r"ref id 0: sentences\[0\] has no 'sent' string"),
        ({k: v for k, v in good[0].items() if k != "ann_id"}, r"ref 0 lacks ann_id"),
    ]
    for bad, message in cases:
        (tmp_path / "bad.p").write_bytes(pickle.dumps([bad]))
        with pytest.raises(ValueError, match=r"refs file .*bad.p: " + message):
            refcoco_to_odvg(tmp_path / "bad.p", instances, tmp_path / "o.jsonl")
    (tmp_path / "bad.p").write_bytes(pickle.dumps([good[0], good[0]]))
    with pytest.raises(ValueError, match=r"refs file .*bad.p: duplicate ref id 0"):
        refcoco_to_odvg(tmp_path / "bad.p", instances, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()

    # a pickle that would build any object is refused before anything is created
    (tmp_path / "object.p").write_bytes(pickle.dumps([{"ref_id": 1, "when": __import__("datetime").date(2020, 1, 1)}]))
    with pytest.raises(ValueError, match=r"refs file .*object.p is not a pickle of plain lists and dicts: it refers to datetime.date"):
        read_refs(tmp_path / "object.p")
    (tmp_path / "broken.p").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match=r"refs file .*broken.p is not a pickle of plain lists and dicts"):
        read_refs(tmp_path / "broken.p")
    (tmp_path / "dict.p").write_bytes(pickle.dumps({"refs": []}))
    with pytest.raises(ValueError, match=r"refs file .*dict.p is not a list of refs"):
        read_refs(tmp_path / "dict.p")
    with pytest.raises(FileNotFoundError, match=r"refs file not found: .*none.p"):
        read_refs(tmp_path / "none.p")
    # a Python 2 pickle (protocol 2, byte strings): [{'sent': 'caf\xc3\xa9'}] with UTF-8 bytes
    python2 = b"\x80\x02]q\x00}q\x01U\x04sentq\x02U\x05caf\xc3\xa9q\x03sa."
    (tmp_path / "py2.p").write_bytes(python2)
    assert read_refs(tmp_path / "py2.p") == [{"sent": "café"}]


# ----------------------------------------------------------------------------------------- Flickr30k Entities
FLICKR_SENTENCES = (
    "[/EN#100/people Two young guys] with [/EN#101/bodyparts shaggy hair] look at [/EN#102/bodyparts their hands]"
    " while hanging out in [/EN#103/scene the yard] .\n"
    "[/EN#0/notvisual Nobody] sees [/EN#104/other a ghost] .\n"
    "[/EN#101/bodyparts Hair] and [/EN#105/clothing a hat] .\n"
)
FLICKR_XML = """<annotation>
  <filename>1000092795.jpg</filename>
  <size>
    <width>333</width>
    <height>500</height>
    <depth>3</depth>
  </size>
  <object><name>100</name><bndbox><xmin>1</xmin><ymin>21</ymin><xmax>150</xmax><ymax>400</ymax></bndbox></object>
  <object><name>100</name><bndbox><xmin>160</xmin><ymin>30</ymin><xmax>333</xmax><ymax>500</ymax></bndbox></object>
  <object><name>101</name><name>105</name><bndbox><xmin>40</xmin><ymin>10</ymin><xmax>80</xmax><ymax>60</ymax></bndbox></object>
  <object><name>102</name><nobndbox>1</nobndbox><scene>0</scene></object>
  <object><name>103</name><nobndbox>0</nobndbox><scene>1</scene></object>
  <object><name>999</name><bndbox><xmin>300</xmin><ymin>400</ymin><xmax>340</xmax><ymax>520</ymax></bndbox></object>
</annotation>
"""


def flickr_root(tmp_path):
    root = tmp_path / "flickr30k_entities"
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "Sentences" / "1000092795.txt").write_text(FLICKR_SENTENCES)
    (root / "Annotations" / "1000092795.xml").write_text(FLICKR_XML)
    return root


def test_flickr30k_to_odvg(tmp_path, capsys):
    root = flickr_root(tmp_path)
    out = tmp_path / "flickr.jsonl"
    assert main(["flickr30k", "--root", str(root), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["records"], summary["regions"], summary["images"], summary["sentences"]) == (2, 5, 1, 3)
    assert summary["skipped"] == {"nobox phrase": 1, "notvisual phrase": 1, "phrase without annotation": 1,
                                  "scene phrase": 1, "sentence without boxes": 1}
    first, second = read_odvg(out).records
    caption = "Two young guys with shaggy hair look at their hands while hanging out in the yard ."
    assert first.caption == caption and (first.filename, first.width, first.height, first.image_id) == ("1000092795.jpg", 333, 500, 1000092795)
    # the phrase with two boxes gives two regions over the same span; nobox and scene phrases give none
    assert first.phrases == ["Two young guys", "Two young guys", "shaggy hair"]
    assert first.tokens_positive == [[[0, 14]], [[0, 14]], [[20, 31]]]
    assert [[caption[s:e] for s, e in spans] for spans in first.tokens_positive] == [["Two young guys"]] * 2 + [["shaggy hair"]]
    assert first.boxes == [[0, 20, 150, 400], [159, 29, 333, 500], [39, 9, 80, 60]]  # 1-based inclusive -> xyxy
    # an object named by two chains belongs to both
    assert second.caption == "Hair and a hat ." and second.phrases == ["Hair", "a hat"]
    assert second.tokens_positive == [[[0, 4]], [[9, 14]]] and second.boxes == [[39, 9, 80, 60]] * 2

    (tmp_path / "ids.txt").write_text("1000092795\n\n")
    assert flickr30k_to_odvg(root, tmp_path / "ids.jsonl", ids=tmp_path / "ids.txt")["records"] == 2


def test_flickr30k_sentences_and_errors(tmp_path):
    caption, phrases = parse_flickr_sentence("A [/EN#7/people/other man] sits [/EN#8/scene outside]", "x")
    assert caption == "A man sits outside"
    assert [(p["chain"], p["types"], p["text"], p["span"]) for p in phrases] == [
        ("7", ["people", "other"], "man", [2, 5]), ("8", ["scene"], "outside", [11, 18])]
    with pytest.raises(ValueError, match="where: phrase of chain 7 is not closed with '\\]'"):
        parse_flickr_sentence("A [/EN#7/people man sits", "where")
    with pytest.raises(ValueError, match="where: phrase markup '\\[/EN#7/people\\]' has no chain id or no words"):
        parse_flickr_sentence("A [/EN#7/people] sits", "where")

    root = flickr_root(tmp_path)
    (root / "Sentences" / "2.txt").write_text("[/EN#1/people A man] .\n[/EN#2/people a woman\n")
    (root / "Annotations" / "2.xml").write_text(FLICKR_XML)
    with pytest.raises(ValueError, match=r"Flickr30k sentence file .*2.txt:2: phrase of chain 2 is not closed"):
        flickr30k_to_odvg(root, tmp_path / "o.jsonl", ids=["2"])
    (root / "Sentences" / "3.txt").write_text("[/EN#1/people A man] .\n")
    with pytest.raises(FileNotFoundError, match=r"Flickr30k annotation file not found: .*3.xml"):
        flickr30k_to_odvg(root, tmp_path / "o.jsonl", ids=["3"])
    (root / "Annotations" / "3.xml").write_text(FLICKR_XML.replace("<width>333</width>", ""))
    with pytest.raises(ValueError, match=r"Flickr30k annotation file .*3.xml: size/width is None; expected a positive integer"):
        flickr30k_to_odvg(root, tmp_path / "o.jsonl", ids=["3"])
    (root / "Annotations" / "3.xml").write_text(FLICKR_XML.replace("<xmin>40</xmin>", "<xmin>x</xmin>"))
    with pytest.raises(ValueError, match=r"3.xml: object 2 \(chain 101, 105\) has a bndbox without numeric"):
        flickr30k_to_odvg(root, tmp_path / "o.jsonl", ids=["3"])
    (root / "Annotations" / "3.xml").write_text("<annotation>")
    with pytest.raises(ValueError, match=r"Flickr30k annotation file .*3.xml is not valid XML"):
        flickr30k_to_odvg(root, tmp_path / "o.jsonl", ids=["3"])
    with pytest.raises(FileNotFoundError, match=r"Flickr30k sentence file not found: .*4.txt"):
        flickr30k_to_odvg(root, tmp_path / "o.jsonl", ids=["4"])
    with pytest.raises(FileNotFoundError, match=r"Flickr30k Entities folder not found: .*nowhere.Sentences"):
        flickr30k_to_odvg(tmp_path / "nowhere", tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------------------------------------- the command line
def test_convert_command_exits_2_with_one_error_line(tmp_path, capsys):
    refs, instances = refcoco_files(tmp_path)
    assert main(["refcoco", "--refs", str(refs), "--instances", str(instances), "--out", str(tmp_path / "o.jsonl"),
                 "--split", "testA"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("grounding-convert: error: refs file ") and "has no ref of split 'testA'" in captured.err
    assert main(["coco", "--instances", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "annotation file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["refcoco", "--refs", str(refs)])
    assert caught.value.code == 2

    # the installed form: a process of its own, one error line on stderr, exit status 2
    (tmp_path / "bad.json").write_text("{")
    result = subprocess.run(
        [sys.executable, "-m", "grounding.data.odvg_convert", "coco", "--instances", str(tmp_path / "bad.json"),
         "--out", str(tmp_path / "o.jsonl")],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "is not valid JSON" in result.stderr


# ----------------------------------------------------------------------------------------- the synthetic set
def test_synthetic_odvg_holds_the_synthetic_boxes_and_refs(synthetic_root):
    files = write_synthetic_odvg(synthetic_root, "val")
    assert files.image_root == syn.images_dir(synthetic_root, "val")
    coco = json.loads(syn.instances_path(synthetic_root, "val").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    labels = read_label_map(files.label_map)
    assert labels == {category_id - 1: name for category_id, name in names.items()}

    detection = read_odvg(files.detection, files.label_map)
    expected = {}
    for image in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        expected[image["file_name"]] = [([x, y, x + w, y + h], a["category_id"] - 1, names[a["category_id"]])
                                        for a in anns for x, y, w, h in [a["bbox"]]]
    assert {r.filename: list(zip(r.boxes, r.labels, r.categories)) for r in detection.records} == expected
    assert all((files.image_root / r.filename).is_file() for r in detection.records)

    refs = json.loads(syn.refs_json_path(synthetic_root, "val").read_text())
    boxes = {a["id"]: a["bbox"] for a in coco["annotations"]}
    files_of = {i["id"]: i["file_name"] for i in coco["images"]}
    expected_refs = [(files_of[r["image_id"]], s["sent"], [[boxes[r["ann_id"]][0], boxes[r["ann_id"]][1],
                      boxes[r["ann_id"]][0] + boxes[r["ann_id"]][2], boxes[r["ann_id"]][1] + boxes[r["ann_id"]][3]]])
                     for r in refs for s in r["sentences"]]
    grounding = read_odvg(files.grounding).records
    assert sorted((g.filename, g.caption, g.boxes) for g in grounding) == sorted(expected_refs)
    assert all(g.tokens_positive == [[[0, len(g.caption)]]] and g.phrases == [g.caption] for g in grounding)

    # written once: a second call leaves the files as they are
    stamps = [os.stat(p).st_mtime_ns for p in (files.detection, files.grounding, files.label_map)]
    assert write_synthetic_odvg(synthetic_root, "val") == files
    assert [os.stat(p).st_mtime_ns for p in (files.detection, files.grounding, files.label_map)] == stamps
    with pytest.raises(FileNotFoundError, match="split 'nosuch' of the synthetic dataset"):
        write_synthetic_odvg(synthetic_root, "nosuch")
