"""Converters of public annotation formats to ODVG files (``grounding.data.odvg``), and ``grounding-convert``.

- ``coco_to_odvg``: a COCO instances file to detection records and a label map. Category ids, sorted, become
  labels 0..C-1 named as the project's COCO reader names them (lower case, single spaces); crowd
  annotations are left out; ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]`` clipped to the image; a box
  empty after clipping is left out and counted. Every image gets a line, also one without boxes.
- ``refcoco_to_odvg``: RefCOCO / RefCOCO+ / RefCOCOg refs (``refs(unc).p``, ``refs(umd).p``,
  ``refs(google).p``, or the same list as JSON) with their COCO ``instances.json`` to grounding records:
  one per expression (caption = the expression, one region over all of it) or one per image (caption =
  the image's expressions as ``"e1 . e2 ."``, one region per expression). The pickle is read without
  creating any Python object but lists, dicts, strings and numbers.
- ``flickr30k_to_odvg``: Flickr30k Entities ``Sentences/<id>.txt`` and ``Annotations/<id>.xml`` to one
  grounding record per sentence: caption = the sentence without its bracket markup (words joined by one
  space), one region per box of each phrase, ``tokens_positive`` = the phrase's character span. The XML's
  1-based inclusive pixel corners become ``[xmin - 1, ymin - 1, xmax, ymax]``, clipped to the image.
  Phrases without a box (``nobndbox``, ``scene``, ``notvisual`` chain 0, or a chain the XML does not
  list) are left out and counted, as are sentences left without any region.

Each converter writes atomically (``write_odvg``) and returns a summary dict; ``grounding-convert``
(``main``) prints it as one JSON line, or one error line naming the file and the item and exits with 2.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pickle
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from grounding.data.coco_file import read_coco
from grounding.data.odvg import OdvgError, OdvgRecord, write_odvg


def default_label_map_path(out: str | Path) -> Path:
    """Where a detection file's label map goes unless told: ``<out stem>_label_map.json`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}_label_map.json")


def _xywh_to_clipped_xyxy(bbox: object, width: int, height: int, where: str) -> tuple[list[float] | None, bool]:
    """COCO ``[x, y, w, h]`` as ``[x0, y0, x1, y1]`` clipped to the image; (None, _) when empty after clipping."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox
    ):
        raise ValueError(f"{where} has bbox {bbox!r:.100}; expected 4 finite numbers [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    return _clip([x, y, x + w, y + h], width, height)


def _clip(box: list[float], width: int, height: int) -> tuple[list[float] | None, bool]:
    clipped = [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
               min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, True
    return clipped, clipped != box


# ----------------------------------------------------------------------------------------- COCO
def coco_to_odvg(instances: str | Path, out: str | Path, label_map_path: str | Path | None = None) -> dict:
    """A COCO instances file as ODVG detection records at ``out`` and its label map (module docstring)."""
    instances, out = Path(instances), Path(out)
    label_map_path = Path(label_map_path) if label_map_path is not None else default_label_map_path(out)
    coco = read_coco(instances)
    label_of = {category_id: label for label, category_id in enumerate(sorted(coco.categories))}
    label_map = {label: coco.categories[category_id] for category_id, label in label_of.items()}
    skipped: Counter = Counter()
    totals = Counter()

    def records() -> Iterator[OdvgRecord]:
        for image_id, image_annotations in coco.annotations_by_image().items():
            image = coco.images[image_id]
            width, height = int(image["width"]), int(image["height"])
            record = OdvgRecord(image["file_name"], height, width, "detection", labels=[], categories=[], image_id=image_id)
            for annotation in image_annotations:
                if annotation.get("iscrowd"):
                    skipped["crowd"] += 1
                    continue
                box, changed = _xywh_to_clipped_xyxy(
                    annotation.get("bbox"), width, height, f"annotation file {instances}: annotation id {annotation['id']}"
                )
                if box is None:
                    skipped["empty box"] += 1
                    continue
                totals["clipped"] += changed
                label = label_of[annotation["category_id"]]
                record.boxes.append(box)
                record.labels.append(label)
                record.categories.append(label_map[label])
            totals["boxes"] += len(record.boxes)
            totals["images without boxes"] += not record.boxes
            yield record

    count = write_odvg(out, records(), label_map_path=label_map_path, label_map=label_map)
    return {
        "command": "coco", "source": str(instances), "out": str(out), "label_map": str(label_map_path),
        "records": count, "boxes": totals["boxes"], "categories": len(label_map), "clipped": totals["clipped"],
        "images_without_boxes": totals["images without boxes"], "skipped": dict(sorted(skipped.items())),
    }


# ----------------------------------------------------------------------------------------- RefCOCO
class _PlainUnpickler(pickle.Unpickler):
    """Builds lists, dicts, tuples, strings and numbers only: any class or function in the pickle is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; only lists, dicts, strings and numbers are read")


def read_refs(path: str | Path) -> list[dict]:
    """The refs of a RefCOCO-style ``refs(<who>).p`` pickle (Python 2 pickles too) or of a JSON list.

    Nothing but plain data is unpickled: a pickle naming any class or function is refused.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"refs file not found: {path}") from None
    if path.suffix == ".json":
        try:
            refs = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"refs file {path} is not valid JSON: {error}") from None
    else:
        refs = None
        for encoding in ("utf-8", "latin1"):  # how Python 2 byte strings are decoded
            try:
                refs = _PlainUnpickler(io.BytesIO(raw), encoding=encoding).load()
                break
            except UnicodeDecodeError:
                continue
            except Exception as error:  # noqa: BLE001 - every unpickling failure means a file we will not read
                raise ValueError(f"refs file {path} is not a pickle of plain lists and dicts: {error}") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"refs file {path} is not a list of refs (dicts with ref_id, ann_id, image_id, split, sentences)")
    return refs


def _expressions(ref: dict, where: str) -> list[str]:
    sentences = ref["sentences"]
    if not isinstance(sentences, list):
        raise ValueError(f"{where}: sentences is not a list")
    found = []
    for index, sentence in enumerate(sentences):
        text = sentence.get("sent") if isinstance(sentence, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{where}: sentences[{index}] has no 'sent' string")
        found.append(" ".join(text.split()))
    return found


def refcoco_to_odvg(refs: str | Path, instances: str | Path, out: str | Path, split: str | None = None,
                    per: str = "expression") -> dict:
    """RefCOCO-style refs of ``split`` (every ref when None) as ODVG grounding records (module docstring).

    per: ``"expression"`` (one record per expression) or ``"image"`` (one record per image).
    """
    if per not in ("expression", "image"):
        raise ValueError(f"per must be 'expression' or 'image', got {per!r}")
    refs_path, instances, out = Path(refs), Path(instances), Path(out)
    all_refs = read_refs(refs_path)
    coco = read_coco(instances)
    annotation_of = {annotation["id"]: annotation for annotation in coco.annotations}
    chosen = all_refs if split is None else [r for r in all_refs if r.get("split") == split]
    if not chosen:
        splits = sorted({str(r.get("split")) for r in all_refs})
        raise ValueError(f"refs file {refs_path} has no ref of split {split!r} (splits: {', '.join(splits) or 'none'})")

    skipped: Counter = Counter()
    seen: set = set()
    # image id -> [(expression, box)], in the order the refs come
    by_image: dict[int, list[tuple[str, list[float]]]] = {}
    expressions = 0
    for ref in chosen:
        missing = [k for k in ("ref_id", "ann_id", "image_id", "sentences") if k not in ref]
        if missing:
            raise ValueError(f"refs file {refs_path}: ref {ref.get('ref_id', '?')} lacks {', '.join(missing)}")
        ref_id = ref["ref_id"]
        where = f"refs file {refs_path}: ref id {ref_id}"
        if ref_id in seen:
            raise ValueError(f"refs file {refs_path}: duplicate ref id {ref_id}")
        seen.add(ref_id)
        annotation = annotation_of.get(ref["ann_id"])
        if annotation is None:
            raise ValueError(f"{where} refers to annotation id {ref['ann_id']} missing from {instances}")
        image = coco.images.get(ref["image_id"])
        if image is None:
            raise ValueError(f"{where} refers to image id {ref['image_id']} missing from {instances}")
        if annotation["image_id"] != ref["image_id"]:
            raise ValueError(
                f"{where} has image id {ref['image_id']} but its annotation {ref['ann_id']} belongs to image id"
                f" {annotation['image_id']} in {instances}"
            )
        texts = _expressions(ref, where)
        if not texts:
            skipped["ref without sentences"] += 1
            continue
        box, _ = _xywh_to_clipped_xyxy(
            annotation.get("bbox"), int(image["width"]), int(image["height"]),
            f"annotation file {instances}: annotation id {annotation['id']} (ref id {ref_id})",
        )
        if box is None:
            skipped["ref with an empty box"] += 1
            continue
        entries = by_image.setdefault(image["id"], [])
        for text in texts:
            if not text:
                skipped["empty expression"] += 1
                continue
            entries.append((text, box))
            expressions += 1

    def records() -> Iterator[OdvgRecord]:
        for image_id, entries in by_image.items():
            image = coco.images[image_id]
            common = dict(filename=image["file_name"], height=int(image["height"]), width=int(image["width"]),
                          kind="grounding", image_id=image_id)
            if per == "expression":
                for text, box in entries:
                    yield OdvgRecord(**common, boxes=[list(box)], caption=text, phrases=[text],
                                     tokens_positive=[[[0, len(text)]]])
            elif entries:
                caption, spans = "", []
                for text, _ in entries:
                    spans.append([[len(caption), len(caption) + len(text)]])
                    caption += f"{text} . "
                yield OdvgRecord(**common, boxes=[list(b) for _, b in entries], caption=caption.rstrip(),
                                 phrases=[t for t, _ in entries], tokens_positive=spans)

    count = write_odvg(out, records()) if expressions else 0
    if not count:
        which = "in any split" if split is None else f"in split {split!r}"
        raise ValueError(f"refs file {refs_path}: no usable expression {which}; skipped: {dict(skipped)}")
    return {
        "command": "refcoco", "source": str(refs_path), "instances": str(instances), "out": str(out),
        "split": split, "per": per, "records": count, "refs": len(seen), "expressions": expressions,
        "images": sum(1 for entries in by_image.values() if entries), "skipped": dict(sorted(skipped.items())),
    }


# ----------------------------------------------------------------------------------------- Flickr30k Entities
def parse_flickr_sentence(line: str, where: str) -> tuple[str, list[dict]]:
    """One line of a Flickr30k Entities Sentences file: the caption and its phrases.

    A phrase is written ``[/EN#<chain id>/<type>/.../<type> <word> ... <word>]``. Returns the caption (the
    words, markup removed, joined by one space) and per phrase ``{"chain": str, "types": [...], "text": str,
    "span": [start, end]}`` (character span of the caption).
    """
    words: list[str] = []
    phrases: list[dict] = []
    length = 0  # characters of the caption so far
    current: dict | None = None

    def add(word: str) -> int:
        nonlocal length
        start = length + (1 if words else 0)
        words.append(word)
        length = start + len(word)
        return start

    for token in line.split():
        if current is None and token.startswith("[/EN#"):
            header = token[len("[/EN#"):]
            closed = header.endswith("]")
            parts = header.rstrip("]").split("/")
            if not parts[0] or closed:
                raise ValueError(f"{where}: phrase markup {token!r} has no chain id or no words")
            current = {"chain": parts[0], "types": parts[1:], "start": None}
            continue
        if current is None:
            add(token)
            continue
        closes = token.endswith("]")
        word = token[:-1] if closes else token
        if word:
            start = add(word)
            if current["start"] is None:
                current["start"] = start
        if closes:
            if current["start"] is None:
                raise ValueError(f"{where}: phrase of chain {current['chain']} has no words")
            span = [current["start"], length]
            phrases.append({"chain": current["chain"], "types": current["types"], "span": span})
            current = None
    if current is not None:
        raise ValueError(f"{where}: phrase of chain {current['chain']} is not closed with ']'")
    caption = " ".join(words)
    for phrase in phrases:
        phrase["text"] = caption[phrase["span"][0]:phrase["span"][1]]
    return caption, phrases


def read_flickr_annotations(path: Path) -> tuple[int, int, dict[str, list[list[float]]], set[str], set[str]]:
    """A Flickr30k Entities ``Annotations/<id>.xml``: (width, height, chain id -> boxes, nobox ids, scene ids).

    Boxes are ``[xmin - 1, ymin - 1, xmax, ymax]`` of the XML's 1-based inclusive corners (not clipped).
    """
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise FileNotFoundError(f"Flickr30k annotation file not found: {path}") from None
    except ET.ParseError as error:
        raise ValueError(f"Flickr30k annotation file {path} is not valid XML: {error}") from None
    size = {}
    for key in ("width", "height"):
        text = root.findtext(f"size/{key}")
        try:
            size[key] = int(text)
        except (TypeError, ValueError):
            size[key] = 0
        if size[key] <= 0:
            raise ValueError(f"Flickr30k annotation file {path}: size/{key} is {text!r}; expected a positive integer")
    boxes: dict[str, list[list[float]]] = {}
    nobox: set[str] = set()
    scene: set[str] = set()
    for index, element in enumerate(root.findall("object")):
        names = [(n.text or "").strip() for n in element.findall("name")]
        if not names or not all(names):
            raise ValueError(f"Flickr30k annotation file {path}: object {index} has no chain id (<name>)")
        box = element.find("bndbox")
        if box is not None:
            try:
                xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise ValueError(
                    f"Flickr30k annotation file {path}: object {index} (chain {', '.join(names)}) has a bndbox without"
                    " numeric xmin, ymin, xmax, ymax"
                ) from None
            for name in names:
                boxes.setdefault(name, []).append([xmin - 1, ymin - 1, xmax, ymax])
            continue
        for flag, target in (("nobndbox", nobox), ("scene", scene)):
            text = (element.findtext(flag) or "0").strip()
            if text not in ("0", ""):
                target.update(names)
    return size["width"], size["height"], boxes, nobox, scene


def _read_ids(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"image id list not found: {path}") from None
    return [line.strip() for line in lines if line.strip()]


def flickr30k_to_odvg(root: str | Path, out: str | Path, ids: str | Path | Sequence[str] | None = None,
                      image_suffix: str = ".jpg") -> dict:
    """Flickr30k Entities (``root/Sentences``, ``root/Annotations``) as ODVG grounding records (module docstring).

    ids: the image ids to convert (a list, or a file with one per line such as the dataset's ``train.txt``);
    every ``Sentences/*.txt`` when None. Image file names are ``<id><image_suffix>``.
    """
    root, out = Path(root), Path(out)
    sentences_dir, annotations_dir = root / "Sentences", root / "Annotations"
    for folder in (sentences_dir, annotations_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"Flickr30k Entities folder not found: {folder}")
    if ids is None:
        image_ids = sorted(p.stem for p in sentences_dir.glob("*.txt"))
        if not image_ids:
            raise FileNotFoundError(f"no Sentences file (*.txt) in {sentences_dir}")
    elif isinstance(ids, (str, Path)):
        image_ids = _read_ids(Path(ids))
    else:
        image_ids = [str(i) for i in ids]
    skipped: Counter = Counter()
    totals: Counter = Counter()

    def records() -> Iterator[OdvgRecord]:
        for image_id in image_ids:
            sentence_file = sentences_dir / f"{image_id}.txt"
            try:
                lines = sentence_file.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                raise FileNotFoundError(f"Flickr30k sentence file not found: {sentence_file}") from None
            width, height, boxes, nobox, scene = read_flickr_annotations(annotations_dir / f"{image_id}.xml")
            totals["images"] += 1
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                totals["sentences"] += 1
                caption, phrases = parse_flickr_sentence(line, f"Flickr30k sentence file {sentence_file}:{number}")
                record = OdvgRecord(f"{image_id}{image_suffix}", height, width, "grounding", caption=caption,
                                    phrases=[], tokens_positive=[],
                                    image_id=int(image_id) if image_id.isdigit() else image_id)
                for phrase in phrases:
                    chain = phrase["chain"]
                    if chain in boxes:
                        for box in boxes[chain]:
                            clipped, changed = _clip(list(box), width, height)
                            if clipped is None:
                                skipped["box empty after clipping"] += 1
                                continue
                            totals["clipped"] += changed
                            record.boxes.append(clipped)
                            record.phrases.append(phrase["text"])
                            record.tokens_positive.append([list(phrase["span"])])
                    elif chain == "0" or "notvisual" in phrase["types"]:
                        skipped["notvisual phrase"] += 1
                    elif chain in nobox:
                        skipped["nobox phrase"] += 1
                    elif chain in scene:
                        skipped["scene phrase"] += 1
                    else:
                        skipped["phrase without annotation"] += 1
                if not record.boxes:
                    skipped["sentence without boxes"] += 1
                    continue
                totals["regions"] += len(record.boxes)
                yield record

    count = write_odvg(out, records())
    return {
        "command": "flickr30k", "source": str(root), "out": str(out), "records": count, "regions": totals["regions"],
        "images": totals["images"], "sentences": totals["sentences"], "clipped": totals["clipped"],
        "skipped": dict(sorted(skipped.items())),
    }


# ----------------------------------------------------------------------------------------- command line
def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grounding-convert",
        description="Convert annotations to ODVG JSON lines (one JSON summary line on stdout).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    coco = commands.add_parser("coco", help="COCO instances JSON -> ODVG detection records + label map")
    coco.add_argument("--instances", required=True, help="COCO instances JSON")
    coco.add_argument("--out", required=True, help="ODVG file to write (.jsonl)")
    coco.add_argument("--label-map", default=None, help="label map to write (default: <out stem>_label_map.json)")

    refcoco = commands.add_parser("refcoco", help="RefCOCO/+/g refs + instances.json -> ODVG grounding records")
    refcoco.add_argument("--refs", required=True, help="refs(unc|umd|google).p (or a JSON list of refs)")
    refcoco.add_argument("--instances", required=True, help="the dataset's instances.json")
    refcoco.add_argument("--out", required=True, help="ODVG file to write (.jsonl)")
    refcoco.add_argument("--split", default=None, help="the refs' split (train, val, testA, ...); every ref when absent")
    refcoco.add_argument("--per", choices=("expression", "image"), default="expression",
                         help="one record per expression (default) or per image")

    flickr = commands.add_parser("flickr30k", help="Flickr30k Entities Sentences + Annotations -> ODVG grounding records")
    flickr.add_argument("--root", required=True, help="folder holding Sentences/ and Annotations/")
    flickr.add_argument("--out", required=True, help="ODVG file to write (.jsonl)")
    flickr.add_argument("--ids", default=None, help="file of image ids, one per line (e.g. train.txt); all when absent")
    flickr.add_argument("--image-suffix", default=".jpg", help="image file name = <id><suffix> (default .jpg)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``grounding-convert coco|refcoco|flickr30k ...``: prints one JSON summary line; bad input exits with 2."""
    args = build_arg_parser().parse_args(argv)
    try:
        if args.command == "coco":
            summary = coco_to_odvg(args.instances, args.out, args.label_map)
        elif args.command == "refcoco":
            summary = refcoco_to_odvg(args.refs, args.instances, args.out, args.split, args.per)
        else:
            summary = flickr30k_to_odvg(args.root, args.out, args.ids, args.image_suffix)
    except (OdvgError, ValueError, OSError) as error:
        message = " ".join(str(error).split())
        print(f"grounding-convert: error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
