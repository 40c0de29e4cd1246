"""Grounding data for the detector: training on ODVG detection and grounding files, REC evaluation.

``GroundingDataModule`` trains Grounding DINO on images that each carry their own text (docs/image.md
"Training on grounding data"):

- a **grounding record** (``grounding.data.odvg``: a caption, boxes tied to character spans of it) is trained
  with its caption as the text. Each distinct set of caption tokens that a region's ``tokens_positive`` spans
  cover is one row of the image's label map (``label_map_from_spans``: the tokenizer's offset mapping, a token
  belongs to a span when their characters overlap), and each box's ``class_label`` is its row. A phrase may
  cover several tokens and phrases need not be separated by ".": the label map says which tokens a box is
  trained against, not the delimiters.
- a **detection record** (boxes with labels of a label map) is trained with a prompt of the categories it
  contains plus up to ``max_negatives`` other categories of the label map, drawn and shuffled with a random
  generator seeded by (seed, epoch, sample) (``detection_prompt``), written ``"a . b . c ."`` and cut to the
  model's ``max_text_len`` by dropping whole categories, negatives first (a positive only when the positives
  alone do not fit; its boxes then go too). Rows of the label map = the prompt's categories in order.

Every sample is a function of (seed, epoch, index) alone (``EpochSampler`` yields (index, epoch)): its
negatives, their order, its augmentation and, with fractional source weights, which records an epoch holds.
So resumed and multi-process runs see what one uninterrupted process sees.

**Sources and weights.** ``train`` lists ODVG files, ``{"anno": FILE, "image_root": DIR, "label_map": FILE,
"weight": 1.0}`` (``label_map`` only for detection files; without one the file's own categories are used).
A source of n usable records with weight w contributes round(w·n) samples to every epoch: ⌊w⌋ full passes
over its records plus, for the fraction left, a subset drawn anew each epoch from (seed, epoch, source)
(repetition, not a weighted sampler: every record of a weight-1 source is seen exactly once per epoch). The
epoch is then shuffled as a whole. ``format: synthetic`` trains on the synthetic set's ODVG files of the
train split (``grounding.data.synthetic.odvg``), detection and grounding, with ``synthetic_weights``.

**Augmentation** (``image_size``, ``max_size``, ``train_scales``, ``flip_prob``, ``crop_prob``, ``crop_scale``
as in ``CocoDetectionDataModule``): detection records get all of it. Grounding records are never cropped (a
crop can cut the object an expression names, or make "the largest" or "at the top" false) and are flipped only
when their caption names no horizontal side (a word starting with "left" or "right") **(choice of this
project)**.

**Evaluation** (val, test): one sample per referring expression, ``ReferringExpressions``: the image, the
expression, its ground-truth boxes (x0, y0, x1, y1) in pixels, and an optional split name for per-split
accuracy. From an ODVG grounding file (``{"anno", "image_root", "name"}``), each record gives one expression per
distinct set of spans among its regions: the caption itself when the spans cover all of it (the RefCOCO
converter's records, the synthetic set's), else the text under the spans joined by one space; its boxes are the
regions with those spans. ``val_detection`` / ``test_detection`` (a COCO instances file and image folder, or
``detection_eval: true`` with the synthetic set) add a COCO detection loader for box AP, second among the
evaluation loaders. Each expression and image is read on exactly one process (``evaluation_sampler``).

The text is encoded with the model's tokenizer: ``GroundingModule`` hands it over in its ``setup``
(``use_tokenizer``); outside a Trainer, call ``use_tokenizer`` first.
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as F

from grounding.data.coco import CocoDetection, collate_detection, detection_transforms, sample_seed
from grounding.data.coco_file import ground_truth, read_categories, read_coco
from grounding.data.images import ImageReadError, check_image, read_rgb_image
from grounding.data.odvg import OdvgRecord, read_label_map, read_odvg
from grounding.data.sampling import EpochSampler, ResumableDataLoader, evaluation_sampler
from grounding.data.skips import SkipReport, UnreadableImage, UnreadableImages
from grounding.data.synthetic import prepare_synthetic
from grounding.data.synthetic.odvg import write_synthetic_odvg

log = logging.getLogger(__name__)

CHECK_IMAGES = ("none", "eval", "all")
FORMATS = ("odvg", "synthetic")
TRAIN_SOURCE_KEYS = ("anno", "image_root", "label_map", "weight", "name")
EVAL_SOURCE_KEYS = ("anno", "image_root", "name", "protocol")
#: evaluation protocols of a grounding file: referring expressions (one text per expression) or phrase grounding
#: (one caption per record, every phrase of it scored in that caption)
PROTOCOLS = ("rec", "phrase")
DETECTION_EVAL_KEYS = ("annotations", "images")

#: a caption naming a horizontal side is not flipped (the flip would make it false)
SIDE_WORDS = re.compile(r"\b(left|right)", re.IGNORECASE)

#: MM-Grounding-DINO's number of sampled negative categories per detection image (its ODVG pipeline)
DEFAULT_MAX_NEGATIVES = 85


# ------------------------------------------------------------------------------------------- text and label maps
def clean_name(name: str) -> str:
    """A category name as it goes into a prompt: lower case, runs of whitespace made one space."""
    return " ".join(str(name).lower().split())


def closed_text(text: str) -> str:
    """``text`` as the model reads it: with " ." appended when it does not end with "." (as mmdetection's
    Grounding DINO does). transformers (as the original model) lets the tokens of a phrase attend to each other,
    and numbers their positions, only in a run closed by a delimiter that is not the sequence's last token; an
    open caption's tokens would otherwise see only themselves when the caption is the longest of its batch, and
    each other when padding follows it. Closed, a text is encoded the same way whatever its batch."""
    stripped = text.rstrip()
    return stripped if stripped.endswith(".") else f"{stripped} ."


def encode_text(tokenizer, text: str, max_text_len: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids (with [CLS] and [SEP]) and character offsets of ``closed_text(text)`` (the offsets of ``text``'s
    own characters are unchanged), cut to ``max_text_len`` tokens."""
    encoded = tokenizer(closed_text(text), return_offsets_mapping=True, add_special_tokens=True, truncation=True,
                        max_length=max_text_len)
    return list(encoded["input_ids"]), [tuple(int(v) for v in o) for o in encoded["offset_mapping"]]


def span_tokens(offsets: list[tuple[int, int]], spans: list[list[int]] | list[tuple[int, int]]) -> tuple[int, ...]:
    """Indices of the tokens (not [CLS], [SEP], padding: those have empty offsets) whose characters overlap
    one of ``spans`` ([start, end) character ranges), in increasing order."""
    found = []
    for index, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        if any(start < span_end and end > span_start for span_start, span_end in spans):
            found.append(index)
    return tuple(found)


def label_map_from_spans(offsets: list[tuple[int, int]], box_spans: list[list[list[int]]], max_text_len: int,
                         max_rows: int | None = None) -> tuple[torch.Tensor, list[int | None]]:
    """The label map of a grounding record and each box's row.

    offsets: the caption's token offsets (``encode_text``); box_spans: per box its ``tokens_positive``.
    Each distinct set of tokens covered by a box's spans is one row (rows in order of first appearance), so
    two boxes of one phrase share a row. Returns (R, max_text_len) long 0/1 and, per box, its row, or None when
    its spans cover no token (cut off by ``max_text_len``) or the rows would exceed ``max_rows``.
    """
    rows: dict[tuple[int, ...], int] = {}
    box_rows: list[int | None] = []
    for spans in box_spans:
        tokens = span_tokens(offsets, spans)
        if not tokens:
            box_rows.append(None)
            continue
        if tokens not in rows:
            if max_rows is not None and len(rows) >= max_rows:
                box_rows.append(None)
                continue
            rows[tokens] = len(rows)
        box_rows.append(rows[tokens])
    label_map = torch.zeros(len(rows), max_text_len, dtype=torch.long)
    for tokens, row in rows.items():
        label_map[row, list(tokens)] = 1
    return label_map, box_rows


def prompt_text(names: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """``"a . b . c ."`` of ``names`` and the character span of each name in it."""
    spans, cursor = [], 0
    for name in names:
        spans.append((cursor, cursor + len(name)))
        cursor += len(name) + 3  # the name, " . "
    return " ".join(f"{name} ." for name in names), spans


def detection_prompt(positives: list[int], labels: list[int], costs: dict[int, int], max_negatives: int,
                     budget: int, rng: random.Random, shuffle: bool = True) -> list[int]:
    """The labels of one detection prompt, in prompt order.

    positives: the labels present in the image (each kept when possible); labels: every label of the label map;
    costs: tokens each label's phrase takes (its name's tokens + 1 for "."); budget: tokens available
    (``max_text_len`` - 2 for [CLS] and [SEP]). Up to ``max_negatives`` other labels are drawn without
    replacement, everything is shuffled (``shuffle``; else put in the order of ``labels``), then labels are dropped
    from the end of that order until the prompt fits: negatives first, positives only when the positives alone
    overflow.
    """
    positive_set = set(positives)
    pool = [label for label in labels if label not in positive_set]
    negatives = rng.sample(pool, min(max(max_negatives, 0), len(pool)))
    chosen = list(positives) + negatives
    if shuffle:
        rng.shuffle(chosen)
    else:  # the label map's order
        order = {label: position for position, label in enumerate(labels)}
        chosen.sort(key=order.__getitem__)
    used = sum(costs[label] for label in chosen)
    for wanted in (False, True):  # negatives first, then positives
        for label in reversed(list(chosen)):
            if used <= budget:
                break
            if (label in positive_set) == wanted:
                chosen.remove(label)
                used -= costs[label]
    return chosen


def token_mask_of(offsets: list[tuple[int, int]], max_text_len: int, text_length: int) -> torch.Tensor:
    """(max_text_len,) bool: True on the tokens of the text's first ``text_length`` characters (not [CLS], [SEP],
    padding, nor the "." that ``closed_text`` may have appended)."""
    mask = torch.zeros(max_text_len, dtype=torch.bool)
    for index, (start, end) in enumerate(offsets[:max_text_len]):
        mask[index] = end > start and start < text_length
    return mask


# ------------------------------------------------------------------------------------------- sources
@dataclass
class TrainSource:
    """One training ODVG file: its usable records, where their images are, its weight and (detection) names."""

    path: Path
    image_root: Path
    kind: str
    records: list[OdvgRecord]
    weight: float
    names: dict[int, str] | None = None  # detection: label -> clean name
    costs: dict[int, int] = field(default_factory=dict)  # detection: label -> tokens of "name ."

    @property
    def count(self) -> int:
        """Samples this source gives every epoch: round(weight · records), at least one when weight > 0."""
        if self.weight <= 0 or not self.records:
            return 0
        return max(1, round(self.weight * len(self.records)))


def _check_keys(source: object, allowed: tuple[str, ...], where: str) -> dict:
    if not isinstance(source, dict):
        raise ValueError(f"{where} must be a mapping with keys {allowed}; got {source!r}")
    unknown = sorted(set(source) - set(allowed))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; allowed: {list(allowed)}")
    for key in ("anno", "image_root"):
        if not source.get(key):
            raise ValueError(f"{where} needs {key!r} (the ODVG file and the folder its filenames are relative to)")
    return source


def clipped_box(box: list[float], width: int, height: int) -> list[float] | None:
    """``box`` (x0, y0, x1, y1) clipped to the image; None when nothing of it is left."""
    x0, y0, x1, y1 = (min(max(v, 0.0), limit) for v, limit in zip(box, (width, height, width, height)))
    return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None


def load_train_source(source: dict, index: int, check_images: bool) -> tuple[TrainSource, SkipReport]:
    """Read and filter one training source (``{"anno", "image_root", "label_map", "weight"}``)."""
    where = f"data.train[{index}]"
    _check_keys(source, TRAIN_SOURCE_KEYS, where)
    path, image_root = Path(source["anno"]), Path(source["image_root"])
    weight = source.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where} ({path}): weight must be a finite number >= 0, got {weight!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{where}: ODVG file not found: {path}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"{where} ({path}): image folder not found: {image_root}")
    label_map = read_label_map(source["label_map"]) if source.get("label_map") else None
    odvg = read_odvg(path, label_map)
    report = SkipReport(str(path))
    kept = []
    for record in odvg.records:
        image = image_root / record.filename
        if not image.is_file():
            report.add("missing image file", f"line {record.line}: {image}")
            continue
        if not record.boxes:
            report.add("record without boxes", f"line {record.line}")
            continue
        if check_images:
            check_image(image, (record.width, record.height), f"{path}:{record.line}")
        kept.append(record)
    names = None
    if odvg.kind == "detection":
        names = {label: clean_name(name) for label, name in (odvg.label_map or {}).items()}
    return TrainSource(path, image_root, odvg.kind, kept, float(weight), names), report


@dataclass
class Expression:
    """One referring expression of an evaluation split."""

    expression_id: int
    image: Path
    width: int
    height: int
    image_id: object
    text: str
    gt_boxes: list[list[float]]
    split: str | None
    where: str  # file:line


def boxes_by_spans(record: OdvgRecord) -> dict[tuple, list[list[float]]]:
    """A grounding record's regions grouped by their spans: each distinct set of ``tokens_positive`` spans (in
    order of first appearance) -> the boxes of its regions clipped to the image (a group whose boxes all fall
    outside is left out)."""
    groups: dict[tuple, list[list[float]]] = {}
    for box, spans in zip(record.boxes, record.tokens_positive or []):
        key = tuple(tuple(span) for span in spans)
        clipped = clipped_box(box, record.width, record.height)
        if clipped is not None:
            groups.setdefault(key, []).append(clipped)
    return groups


def expressions_of(record: OdvgRecord, start_id: int, image: Path, split: str | None, where: str) -> list[Expression]:
    """The expressions of one grounding record: one per distinct set of spans among its regions (module docstring)."""
    caption = record.caption or ""
    expressions = []
    for key, boxes in boxes_by_spans(record).items():
        covered = "".join(ch for i, ch in enumerate(caption) if not any(s <= i < e for s, e in key))
        text = caption.strip() if not covered.strip() else " ".join(caption[s:e] for s, e in key)
        image_id = record.image_id if record.image_id is not None else record.filename
        expressions.append(Expression(start_id + len(expressions), image, record.width, record.height, image_id,
                                      " ".join(text.split()), boxes, split, where))
    return expressions


@dataclass
class Sentence:
    """One caption of a phrase-grounding split (Flickr30k Entities) and its phrases."""

    sentence_id: int
    image: Path
    width: int
    height: int
    image_id: object
    caption: str
    phrases: list[Phrase]
    split: str | None
    where: str  # file:line


@dataclass
class Phrase:
    """One phrase of a ``Sentence``: its character spans in the caption and its ground-truth boxes."""

    phrase_id: int
    spans: list[list[int]]
    text: str
    gt_boxes: list[list[float]]


def phrases_of(record: OdvgRecord, start_id: int) -> list[Phrase]:
    """The phrases of one grounding record: one per distinct set of spans among its regions (its boxes: the
    regions with those spans, clipped to the image; a phrase whose boxes all fall outside is left out)."""
    caption = record.caption or ""
    return [Phrase(start_id + number, [list(span) for span in key], " ".join(caption[s:e] for s, e in key), boxes)
            for number, (key, boxes) in enumerate(boxes_by_spans(record).items())]


def _evaluation_records(source: dict, index: int, split: str, check_images: bool):
    """Check one evaluation source (``{"anno", "image_root", "name", "protocol"}``) and read its grounding file:
    (protocol, name, path, [(record, image path, "file:line")]). Every image must exist (an evaluation split
    scores every expression: a missing image is an error, not a skip)."""
    where = f"data.{split}[{index}]"
    _check_keys(source, EVAL_SOURCE_KEYS, where)
    path, image_root = Path(source["anno"]), Path(source["image_root"])
    if not path.is_file():
        raise FileNotFoundError(f"{where}: ODVG file not found: {path}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"{where} ({path}): image folder not found: {image_root}")
    name = source.get("name")
    if name is not None and (not isinstance(name, str) or not name or "/" in name):
        raise ValueError(f"{where} ({path}): name must be a non-empty string without '/', got {name!r}")
    protocol = source.get("protocol", "rec")
    if protocol not in PROTOCOLS:
        raise ValueError(f"{where} ({path}): protocol must be one of {PROTOCOLS}, got {protocol!r}")
    odvg = read_odvg(path)
    if odvg.kind != "grounding":
        raise ValueError(f"{where}: {path} holds detection records; REC and phrase-grounding evaluation read a "
                         "grounding file")
    found, checked = [], set()
    for record in odvg.records:
        image = image_root / record.filename
        if not image.is_file():
            raise FileNotFoundError(f"{path}:{record.line}: image not found: {image}")
        if check_images and image not in checked:
            check_image(image, (record.width, record.height), f"{path}:{record.line}")
            checked.add(image)
        found.append((record, image, f"{path}:{record.line}"))
    return protocol, name, path, found


def load_expressions(source: dict, index: int, split: str, start_id: int, check_images: bool) -> tuple[list[Expression], SkipReport]:
    """The expressions of one REC source (``{"anno", "image_root", "name"}``), ids from ``start_id``."""
    _, name, path, found = _evaluation_records(source, index, split, check_images)
    report = SkipReport(str(path))
    expressions: list[Expression] = []
    for record, image, where in found:
        expressions_found = expressions_of(record, start_id + len(expressions), image, name, where)
        if not expressions_found:
            report.add("record without a box", f"line {record.line}")
        expressions.extend(expressions_found)
    if not expressions:
        raise ValueError(f"data.{split}[{index}]: {path} holds no expression with a box")
    return expressions, report


def load_sentences(source: dict, index: int, split: str, start_ids: tuple[int, int], check_images: bool) -> tuple[list[Sentence], SkipReport]:
    """The sentences of one phrase-grounding source (``"protocol": "phrase"``): one per record, with its phrases;
    sentence and phrase ids from ``start_ids``."""
    _, name, path, found = _evaluation_records(source, index, split, check_images)
    report = SkipReport(str(path))
    sentences: list[Sentence] = []
    next_phrase = start_ids[1]
    for record, image, where in found:
        phrases = phrases_of(record, next_phrase)
        if not phrases:
            report.add("record without a box", f"line {record.line}")
            continue
        next_phrase += len(phrases)
        image_id = record.image_id if record.image_id is not None else record.filename
        sentences.append(Sentence(start_ids[0] + len(sentences), image, record.width, record.height, image_id,
                                  record.caption or "", phrases, name, where))
    if not sentences:
        raise ValueError(f"data.{split}[{index}]: {path} holds no phrase with a box")
    return sentences, report


# ------------------------------------------------------------------------------------------- datasets
class TextEncoding:
    """The tokenizer and ``max_text_len`` shared by a DataModule's datasets (set once the model is known)."""

    def __init__(self):
        self.tokenizer = None
        self.max_text_len: int | None = None

    def require(self) -> tuple[object, int]:
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer: GroundingDataModule.use_tokenizer(tokenizer, max_text_len) must be called"
                               " first (GroundingModule does it in its setup)")
        return self.tokenizer, self.max_text_len


class GroundingTrainingSet(Dataset):
    """Training samples of weighted ODVG sources (module docstring); ``dataset[(index, epoch)]`` as ``EpochSampler``
    yields them. A sample is ``(image (3, H, W) normalized, target)`` with target ``image_id``, ``orig_size``,
    ``size`` (h, w), ``boxes`` (n, 4) normalized cxcywh, ``class_labels`` (n,) rows of ``label_map``,
    ``input_ids`` (T,), ``label_map`` (R, max_text_len) long, ``text``, ``kind``; or an ``UnreadableImage``."""

    def __init__(self, sources: list[TrainSource], text: TextEncoding, settings: dict, seed: int = 0,
                 max_negatives: int = DEFAULT_MAX_NEGATIVES, skip_unreadable: bool = True, shuffle_categories: bool = True):
        self.sources = [s for s in sources if s.count]
        if not self.sources:
            raise ValueError("no training sample: every training source is empty or has weight 0")
        self.text = text
        self.seed = seed
        self.max_negatives = max_negatives
        self.shuffle_categories = shuffle_categories
        self.skip_unreadable = skip_unreadable
        s = settings
        size = (s["image_size"], s["max_size"], s["train_scales"])
        self.transforms = {
            "detection": detection_transforms(True, *size, s["flip_prob"], s["crop_prob"], s["crop_scale"]),
            "grounding": detection_transforms(True, *size, s["flip_prob"], 0.0, s["crop_scale"]),
            "grounding_no_flip": detection_transforms(True, *size, 0.0, 0.0, s["crop_scale"]),
        }
        self._length = sum(source.count for source in self.sources)
        self._table: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self._length

    def epoch_table(self, epoch: int) -> np.ndarray:
        """(len, 2) (source, record) of every sample index of ``epoch`` (the module docstring's repetition)."""
        if self._table is not None and self._table[0] == epoch:
            return self._table[1]
        parts = []
        for number, source in enumerate(self.sources):
            n = len(source.records)
            full, rest = divmod(source.count, n)
            chosen = [np.arange(n)] * full
            if rest:
                generator = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, number]))
                chosen.append(np.sort(generator.permutation(n)[:rest]))
            records = np.concatenate(chosen)
            parts.append(np.stack([np.full(len(records), number), records], axis=1))
        table = np.concatenate(parts)
        self._table = (epoch, table)
        return table

    def record(self, index: int, epoch: int = 0) -> tuple[TrainSource, OdvgRecord]:
        number, position = self.epoch_table(epoch)[index]
        source = self.sources[int(number)]
        return source, source.records[int(position)]

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = (key if isinstance(key, tuple) else (key, 0))
        source, record = self.record(index, epoch)
        seed = sample_seed(self.seed, epoch, index)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._load(source, record, random.Random(seed))
        except ImageReadError as error:
            if not self.skip_unreadable:
                raise
            return UnreadableImage(str(source.image_root / record.filename), f"{source.path}:{record.line}", str(error))

    def text_of(self, source: TrainSource, record: OdvgRecord, rng: random.Random) -> tuple[list[int], torch.Tensor, list[int | None], str]:
        """(input_ids, label map, each box's row or None when its phrase is not in the text, text)."""
        tokenizer, max_text_len = self.text.require()
        if record.kind == "grounding":
            ids, offsets = encode_text(tokenizer, record.caption, max_text_len)
            label_map, rows = label_map_from_spans(offsets, record.tokens_positive, max_text_len, max_rows=max_text_len)
            return ids, label_map, rows, record.caption
        if not source.costs:
            source.costs = {label: len(tokenizer(name, add_special_tokens=False)["input_ids"]) + 1 for label, name in source.names.items()}
        positives = list(dict.fromkeys(record.labels))
        chosen = detection_prompt(positives, list(source.names), source.costs, self.max_negatives, max_text_len - 2, rng,
                                  self.shuffle_categories)
        text, spans = prompt_text([source.names[label] for label in chosen])
        ids, offsets = encode_text(tokenizer, text, max_text_len)
        label_map = torch.zeros(len(chosen), max_text_len, dtype=torch.long)
        row_of = {}
        for row, (label, span) in enumerate(zip(chosen, spans)):
            tokens = span_tokens(offsets, [span])
            label_map[row, list(tokens)] = 1
            if tokens:
                row_of[label] = row
        return ids, label_map, [row_of.get(label) for label in record.labels], text

    def _load(self, source: TrainSource, record: OdvgRecord, rng: random.Random):
        ids, label_map, rows, text = self.text_of(source, record, rng)
        image = read_rgb_image(source.image_root / record.filename, (record.width, record.height), f"{source.path}:{record.line}")
        boxes, labels = [], []
        for box, row in zip(record.boxes, rows):
            clipped = clipped_box(box, record.width, record.height)
            if row is not None and clipped is not None:
                boxes.append(clipped)
                labels.append(row)
        if record.kind == "detection":
            transform = self.transforms["detection"]
        else:
            transform = self.transforms["grounding_no_flip" if SIDE_WORDS.search(record.caption) else "grounding"]
        size = (record.height, record.width)
        sample = transform({
            "image": tv_tensors.Image(F.pil_to_tensor(image)),
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=size),
        })
        pixels, moved = sample["image"], sample["boxes"].as_subclass(torch.Tensor)
        height, width = pixels.shape[-2:]
        keep = ((moved[:, 2] - moved[:, 0]) >= 1) & ((moved[:, 3] - moved[:, 1]) >= 1)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = {
            "image_id": record.image_id if record.image_id is not None else f"{source.path.name}:{record.line}",
            "orig_size": torch.tensor(size),
            "size": torch.tensor([height, width]),
            "boxes": box_convert(moved[keep], "xyxy", "cxcywh") / scale,
            "class_labels": torch.tensor(labels, dtype=torch.long)[keep],
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "label_map": label_map,
            "text": text,
            "kind": record.kind,
        }
        return pixels.as_subclass(torch.Tensor), target


class _TextOnImageSet(Dataset):
    """Evaluation samples of items (expressions or captions) that each have an image, a text and a split name:
    the image as the evaluation transforms give it, the text encoded by the model's tokenizer."""

    def __init__(self, items: list, text: TextEncoding, image_size: int, max_size: int):
        self.items = items
        self.text = text
        self.transforms = detection_transforms(False, image_size, max_size)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def split_names(self) -> list[str]:
        return list(dict.fromkeys(item.split for item in self.items if item.split is not None))

    def encoded(self, item, text: str) -> tuple[torch.Tensor, dict, list[tuple[int, int]], int]:
        """(pixels (3, H, W), the common target fields, the text's token offsets, max_text_len)."""
        tokenizer, max_text_len = self.text.require()
        ids, offsets = encode_text(tokenizer, text, max_text_len)
        image = read_rgb_image(item.image, (item.width, item.height), item.where)
        size = (item.height, item.width)
        pixels = self.transforms({
            "image": tv_tensors.Image(F.pil_to_tensor(image)),
            "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=size),
        })["image"]
        target = {
            "image_id": item.image_id,
            "text": text,
            "split": item.split,
            "orig_size": torch.tensor(size),
            "size": torch.tensor(list(pixels.shape[-2:])),
            "input_ids": torch.tensor(ids, dtype=torch.long),
        }
        return pixels.as_subclass(torch.Tensor), target, offsets, max_text_len


class ReferringExpressions(_TextOnImageSet):
    """Evaluation samples, one per expression: ``(image (3, H, W) normalized, target)`` with target
    ``expression_id``, ``image_id``, ``text``, ``gt_boxes`` (m, 4) xyxy original pixels, ``split``,
    ``orig_size``, ``size``, ``input_ids`` (T,), ``token_mask`` (max_text_len,) (the expression's tokens)."""

    @property
    def expressions(self) -> list[Expression]:
        return self.items

    def __getitem__(self, index: int):
        expression = self.items[index]
        pixels, target, offsets, max_text_len = self.encoded(expression, expression.text)
        target["expression_id"] = expression.expression_id
        target["gt_boxes"] = torch.tensor(expression.gt_boxes, dtype=torch.float32).reshape(-1, 4)
        target["token_mask"] = token_mask_of(offsets, max_text_len, len(expression.text.rstrip()))
        return pixels, target


class PhraseSentences(_TextOnImageSet):
    """Phrase-grounding evaluation samples, one per caption: ``(image (3, H, W) normalized, target)`` with target
    ``sentence_id``, ``image_id``, ``text`` (the caption), ``split``, ``orig_size``, ``size``, ``input_ids`` (T,),
    ``phrase_masks`` (P, max_text_len) bool (each phrase's tokens: those whose characters overlap its spans; a
    phrase cut off by ``max_text_len`` has none and is scored 0, so it counts as missed), ``phrase_ids`` (P,),
    ``phrases`` (P texts) and ``gt_boxes`` (P tensors (m, 4) xyxy original pixels)."""

    @property
    def sentences(self) -> list[Sentence]:
        return self.items

    def __getitem__(self, index: int):
        sentence = self.items[index]
        pixels, target, offsets, max_text_len = self.encoded(sentence, sentence.caption)
        masks = torch.zeros(len(sentence.phrases), max_text_len, dtype=torch.bool)
        for row, phrase in enumerate(sentence.phrases):
            masks[row, list(span_tokens(offsets, phrase.spans))] = True
        target["sentence_id"] = sentence.sentence_id
        target["phrase_masks"] = masks
        target["phrase_ids"] = torch.tensor([p.phrase_id for p in sentence.phrases], dtype=torch.long)
        target["phrases"] = [p.text for p in sentence.phrases]
        target["gt_boxes"] = [torch.tensor(p.gt_boxes, dtype=torch.float32).reshape(-1, 4) for p in sentence.phrases]
        return pixels, target


def _pad_texts(targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(t["input_ids"]) for t in targets)
    input_ids = torch.zeros(len(targets), length, dtype=torch.long)  # [PAD] = 0
    attention_mask = torch.zeros(len(targets), length, dtype=torch.long)
    for i, target in enumerate(targets):
        n = len(target["input_ids"])
        input_ids[i, :n] = target["input_ids"]
        attention_mask[i, :n] = 1
    return input_ids, attention_mask


def collate_grounding(batch: list) -> dict:
    """Training batch: ``pixel_values`` (B, 3, H, W), ``pixel_mask`` (B, H, W), ``input_ids`` (B, T) padded with
    [PAD] (0), ``attention_mask`` (B, T), ``label_maps`` (one (R_i, max_text_len) per image) and ``targets``
    (``class_labels``, ``boxes`` normalized cxcywh, ``image_id``, ``orig_size``, ``size``, ``text``, ``kind``).
    Unreadable images are left out and listed under ``"unreadable"``, as in ``collate_detection``."""
    images = collate_detection(batch)
    if "pixel_values" not in images:
        return images
    targets = images["targets"]
    input_ids, attention_mask = _pad_texts(targets)
    label_maps = [t.pop("label_map") for t in targets]
    for target in targets:
        target.pop("input_ids")
    return dict(images, input_ids=input_ids, attention_mask=attention_mask, label_maps=label_maps)


def collate_expressions(batch: list) -> dict:
    """Evaluation batch of expressions: ``pixel_values``, ``pixel_mask``, ``input_ids`` (B, T), ``attention_mask``,
    ``token_mask`` (B, max_text_len) bool, ``targets`` (per expression: ``expression_id``, ``image_id``, ``text``,
    ``gt_boxes``, ``split``, ``orig_size``, ``size``) and ``task: "rec"``."""
    images = collate_detection(batch)
    targets = images["targets"]
    input_ids, attention_mask = _pad_texts(targets)
    token_mask = torch.stack([t.pop("token_mask") for t in targets])
    for target in targets:
        target.pop("input_ids")
    return dict(images, input_ids=input_ids, attention_mask=attention_mask, token_mask=token_mask, task="rec")


def collate_phrases(batch: list) -> dict:
    """Evaluation batch of captions: ``pixel_values``, ``pixel_mask``, ``input_ids`` (B, T), ``attention_mask``,
    ``targets`` (``PhraseSentences``' targets less ``input_ids``; ``phrase_masks`` stay per caption) and
    ``task: "phrase"``."""
    images = collate_detection(batch)
    targets = images["targets"]
    input_ids, attention_mask = _pad_texts(targets)
    for target in targets:
        target.pop("input_ids")
    return dict(images, input_ids=input_ids, attention_mask=attention_mask, task="phrase")


# ------------------------------------------------------------------------------------------- the DataModule
class GroundingDataModule(L.LightningDataModule):
    """Grounding training (ODVG detection + grounding files, or the synthetic set) and REC evaluation.

    Args:
        format: ``odvg`` (the files of ``train`` / ``val`` / ``test``) or ``synthetic`` (the synthetic set's
            ODVG files at ``synthetic_root``: train = detection + grounding files of the train split, val / test =
            the grounding files of those splits).
        train: training sources ``{"anno": FILE, "image_root": DIR, "label_map": FILE (detection, optional),
            "weight": 1.0}`` (module docstring: repetition by weight).
        val, test: REC sources ``{"anno": grounding FILE, "image_root": DIR, "name": split name (optional)}``.
        val_detection, test_detection: ``{"annotations": COCO instances FILE, "images": DIR}``: also box AP on it.
        detection_eval: with ``format: synthetic``, box AP on the split's COCO file too.
        synthetic_root, synthetic: the synthetic dataset (generated there when absent) and its generator settings.
        synthetic_weights: ``{"detection": w, "grounding": w}`` of the synthetic training files (default 1, 1).
        max_negatives: negative categories drawn into a detection prompt (at most; 85 in MM-Grounding-DINO).
        shuffle_categories: a detection prompt's categories in a random order (MM-Grounding-DINO), or (False) in
            the label map's order, as a fixed category list is written.
        image_size, max_size, train_scales, flip_prob, crop_prob, crop_scale: as ``CocoDetectionDataModule``
            (grounding records: no crop, no flip when the caption names a side).
        batch_size, eval_batch_size, num_workers: loaders.
        split: the split ``test`` / ``predict`` read (what ``grounding-eval`` evaluates): val or test.
        check_images: read every image header up front in ``eval`` splits, ``all`` splits, or ``none``.
        seed: every sample is a function of (seed, epoch, index).
        max_bad_images: training images that may turn out unreadable during the run (skipped, counted).
    """

    def __init__(
        self,
        format: Literal["odvg", "synthetic"] = "odvg",
        train: list[dict] | None = None,
        val: list[dict] | None = None,
        test: list[dict] | None = None,
        val_detection: dict | None = None,
        test_detection: dict | None = None,
        detection_eval: bool = False,
        synthetic_root: str | None = None,
        synthetic: dict | None = None,
        synthetic_weights: dict | None = None,
        max_negatives: int = DEFAULT_MAX_NEGATIVES,
        shuffle_categories: bool = True,
        image_size: int = 800,
        max_size: int = 1333,
        train_scales: list[int] | None = None,
        flip_prob: float = 0.5,
        crop_prob: float = 0.5,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        split: Literal["val", "test"] = "val",
        check_images: Literal["none", "eval", "all"] = "eval",
        seed: int = 0,
        max_bad_images: int = 10,
    ):
        super().__init__()
        self.save_hyperparameters()
        if format not in FORMATS:
            raise ValueError(f"data.format must be one of {FORMATS}, got {format!r}")
        if split not in ("val", "test"):
            raise ValueError(f"data.split must be 'val' or 'test' (the split grounding-eval evaluates), got {split!r}")
        if check_images not in CHECK_IMAGES:
            raise ValueError(f"data.check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("image_size", image_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        if isinstance(max_negatives, bool) or not isinstance(max_negatives, int) or max_negatives < 0:
            raise ValueError(f"data.max_negatives must be an integer >= 0, got {max_negatives!r}")
        if isinstance(max_bad_images, bool) or not isinstance(max_bad_images, int) or max_bad_images < 0:
            raise ValueError(f"data.max_bad_images must be an integer >= 0, got {max_bad_images!r}")
        if max_size is not None and max_size <= max([image_size] + list(train_scales or [])):
            raise ValueError(f"max_size={max_size} must be greater than image_size and every train_scale ({image_size}, {train_scales})")
        if format == "synthetic":
            if synthetic_root is None:
                raise ValueError("data.format=synthetic needs data.synthetic_root (generated there when absent)")
            given = [name for name, value in (("train", train), ("val", val), ("test", test)) if value]
            if given:
                raise ValueError(f"data.format=synthetic reads the synthetic set's files; data.{given[0]} is for format=odvg")
            weights = dict(synthetic_weights or {})
            unknown = sorted(set(weights) - {"detection", "grounding"})
            if unknown:
                raise ValueError(f"data.synthetic_weights has unknown key(s) {unknown}; allowed: detection, grounding")
        elif detection_eval:
            raise ValueError("data.detection_eval is for format=synthetic; give data.val_detection / data.test_detection")
        for name, value in (("train", train), ("val", val), ("test", test)):
            if value is not None and not isinstance(value, (list, tuple)):
                raise ValueError(f"data.{name} must be a list of sources, got {value!r}")
        for name, value in (("val_detection", val_detection), ("test_detection", test_detection)):
            if value is not None and (not isinstance(value, dict) or sorted(value) != sorted(DETECTION_EVAL_KEYS)):
                raise ValueError(f"data.{name} must be {{'annotations': COCO FILE, 'images': DIR}}, got {value!r}")
        if format == "odvg" and not (train or val or test):
            raise ValueError("GroundingDataModule needs data.train, data.val or data.test sources (or format: synthetic)")
        self.text = TextEncoding()
        self.datasets: dict[str, Dataset] = {}
        self.detection_sets: dict[str, CocoDetection] = {}
        self.unreadable: UnreadableImages | None = None
        self._categories: dict[int, str] | None = None

    # ------------------------------------------------------------------------------------ configuration
    def use_tokenizer(self, tokenizer, max_text_len: int) -> None:
        """The model's tokenizer and ``max_text_len`` (``GroundingModule.setup`` calls this)."""
        if isinstance(max_text_len, bool) or not isinstance(max_text_len, int) or max_text_len < 3:
            raise ValueError(f"max_text_len must be an integer >= 3, got {max_text_len!r}")
        self.text.tokenizer, self.text.max_text_len = tokenizer, max_text_len

    def prepare_data(self) -> None:
        h = self.hparams
        if h.synthetic_root is not None:
            prepare_synthetic(h.synthetic_root, h.synthetic)
            if h.format == "synthetic":
                for split in ("train", "val", "test"):
                    write_synthetic_odvg(h.synthetic_root, split)

    def sources(self, split: str, protocol: str | None = None) -> list[dict]:
        """The ODVG sources of ``split`` (train: weighted; val / test: evaluation sources, only those of
        ``protocol`` (``rec`` or ``phrase``) when given)."""
        h = self.hparams
        if h.format == "odvg":
            found = list({"train": h.train, "val": h.val, "test": h.test}[split] or [])
            if protocol is None or split == "train":
                return found
            return [source for source in found if isinstance(source, dict) and source.get("protocol", "rec") == protocol]
        files = write_synthetic_odvg(h.synthetic_root, split)
        if split != "train":
            return [] if protocol == "phrase" else [{"anno": str(files.grounding), "image_root": str(files.image_root)}]
        weights = {"detection": 1.0, "grounding": 1.0, **(h.synthetic_weights or {})}
        return [
            {"anno": str(files.detection), "label_map": str(files.label_map), "image_root": str(files.image_root), "weight": weights["detection"]},
            {"anno": str(files.grounding), "image_root": str(files.image_root), "weight": weights["grounding"]},
        ]

    def detection_paths(self, split: str) -> tuple[str, str] | None:
        """(COCO file, image folder) of the box-AP evaluation of ``split``, or None."""
        h = self.hparams
        if h.format == "synthetic" and h.detection_eval and split in ("val", "test"):
            root = Path(h.synthetic_root)
            return str(root / "annotations" / f"instances_{split}.json"), str(root / "images" / split)
        given = {"val": h.val_detection, "test": h.test_detection}.get(split)
        return (given["annotations"], given["images"]) if given else None

    @property
    def categories(self) -> dict[int, str] | None:
        """The categories of the box-AP evaluation files (id -> name), or None without one."""
        if self._categories is None:
            found = {}
            for split in ("val", "test"):
                paths = self.detection_paths(split)
                if paths and Path(paths[0]).exists():
                    found[paths[0]] = read_categories(paths[0])
            if not found:
                return None
            (first, categories), *others = found.items()
            for other, other_categories in others:
                if other_categories != categories:
                    raise ValueError(f"categories differ between {first} and {other}: a model's prompt must be the same for both")
            self._categories = categories
        return self._categories

    @property
    def smallest_side(self) -> int:
        """The smallest shorter side an image is resized to (evaluation or any training scale)."""
        return min([self.hparams.image_size] + list(self.hparams.train_scales or []))

    @property
    def evaluation_split(self) -> str:
        """The split ``test_dataloader`` / ``predict_dataloader`` read."""
        return self.hparams.split

    def _check(self, train: bool) -> bool:
        mode = self.hparams.check_images
        return mode == "all" or (mode == "eval" and not train)

    # ------------------------------------------------------------------------------------ datasets
    def _settings(self) -> dict:
        h = self.hparams
        return {"image_size": h.image_size, "max_size": h.max_size, "train_scales": h.train_scales,
                "flip_prob": h.flip_prob, "crop_prob": h.crop_prob, "crop_scale": h.crop_scale}

    def dataset(self, split: str) -> Dataset:
        """The training set (``train``) or the REC set of ``split`` (built on first use)."""
        if split in self.datasets:
            return self.datasets[split]
        self._check_protocols(split)
        sources = self.sources(split, None if split == "train" else "rec")
        if not sources:
            raise ValueError(f"no {split} data: set data.{split} (or format: synthetic)")
        if split == "train":
            loaded = []
            for index, source in enumerate(sources):
                train_source, report = load_train_source(source, index, self._check(True))
                report.log()
                loaded.append(train_source)
                log.info("training source %s: %s, %d records, weight %g -> %d samples per epoch",
                         train_source.path, train_source.kind, len(train_source.records), train_source.weight, train_source.count)
            self.datasets[split] = GroundingTrainingSet(loaded, self.text, self._settings(), self.hparams.seed, self.hparams.max_negatives,
                                                        shuffle_categories=self.hparams.shuffle_categories)
        else:
            expressions: list[Expression] = []
            for index, source in self._indexed(split, "rec"):
                found, report = load_expressions(source, index, split, len(expressions), self._check(False))
                report.log()
                expressions.extend(found)
            self.datasets[split] = ReferringExpressions(expressions, self.text, self.hparams.image_size, self.hparams.max_size)
        return self.datasets[split]

    def _check_protocols(self, split: str) -> None:
        """Every evaluation source of ``split`` names a known protocol (before any file is read)."""
        if split == "train":
            return
        for index, source in enumerate(self.sources(split)):
            _check_keys(source, EVAL_SOURCE_KEYS, f"data.{split}[{index}]")
            protocol = source.get("protocol", "rec")
            if protocol not in PROTOCOLS:
                raise ValueError(f"data.{split}[{index}] ({source['anno']}): protocol must be one of {PROTOCOLS}, got {protocol!r}")

    def _indexed(self, split: str, protocol: str) -> list[tuple[int, dict]]:
        """(position in data.<split>, source) of the sources of ``protocol`` (errors name the position given)."""
        return [(index, source) for index, source in enumerate(self.sources(split))
                if source.get("protocol", "rec") == protocol]

    def phrase_set(self, split: str) -> PhraseSentences | None:
        """The phrase-grounding set of ``split`` (its ``"protocol": "phrase"`` sources), or None without one."""
        key = f"{split}:phrase"
        if key not in self.datasets:
            self._check_protocols(split)
            if not self.sources(split, "phrase"):
                return None
            sentences: list[Sentence] = []
            phrases = 0
            for index, source in self._indexed(split, "phrase"):
                found, report = load_sentences(source, index, split, (len(sentences), phrases), self._check(False))
                report.log()
                sentences.extend(found)
                phrases += sum(len(sentence.phrases) for sentence in found)
            log.info("%s phrase grounding: %d captions, %d phrases", split, len(sentences), phrases)
            self.datasets[key] = PhraseSentences(sentences, self.text, self.hparams.image_size, self.hparams.max_size)
        return self.datasets[key]

    def phrase_split_names(self, split: str) -> list[str]:
        """The split names of ``split``'s phrase-grounding sources (for per-split recall), in order."""
        dataset = self.phrase_set(split)
        return [] if dataset is None else dataset.split_names

    def detection_set(self, split: str) -> CocoDetection | None:
        """The COCO detection set of ``split``'s box-AP evaluation, or None."""
        paths = self.detection_paths(split)
        if paths is None:
            return None
        if split not in self.detection_sets:
            h = self.hparams
            self.detection_sets[split] = CocoDetection(
                paths[0], paths[1], detection_transforms(False, h.image_size, h.max_size), train=False,
                check_images=self._check(False), seed=h.seed,
            )
        return self.detection_sets[split]

    def ground_truth(self, split: str):
        """pycocotools ``COCO`` of the box-AP evaluation of ``split`` (None without one)."""
        dataset = self.detection_set(split)
        if dataset is None:
            return None
        return ground_truth(read_coco(dataset.annotation_file), dataset.annotation_ids, dataset.image_ids)

    def rec_split_names(self, split: str) -> list[str]:
        """The split names of ``split``'s expressions (for per-split accuracy), in order of appearance."""
        return self.dataset(split).split_names

    def setup(self, stage: str | None = None) -> None:
        if self.hparams.synthetic_root is not None:
            self.prepare_data()  # a no-op when present; under DDP every rank finds the files rank 0 wrote
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": [self.hparams.split], "predict": [self.hparams.split]}
        for split in wanted.get(stage, ["train", "val", "test"]):
            if self.sources(split, None if split == "train" else "rec"):
                self.dataset(split)
            if split != "train":
                self.phrase_set(split)
                self.detection_set(split)

    # ------------------------------------------------------------------------------------ loaders
    def _resolve_text(self) -> None:
        if self.text.tokenizer is None:
            module = getattr(getattr(self, "trainer", None), "lightning_module", None)
            if module is not None and hasattr(module, "tokenizer"):
                self.use_tokenizer(module.tokenizer, module.detector.config.max_text_len)
        self.text.require()

    def train_dataloader(self) -> DataLoader:
        self._resolve_text()
        h = self.hparams
        dataset = self.dataset("train")
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (None, None)
        sampler = EpochSampler(dataset, shuffle=True, seed=h.seed, num_replicas=world, rank=rank)
        if self.unreadable is None:
            self.unreadable = UnreadableImages(h.max_bad_images, SkipReport("training images"), sampler.num_replicas)
        return ResumableDataLoader(
            dataset, sampler, batch_size=h.batch_size, on_batch=self.unreadable.screen, num_workers=h.num_workers,
            collate_fn=collate_grounding, persistent_workers=h.num_workers > 0,
            generator=torch.Generator().manual_seed(h.seed),
        )

    def _evaluation_loaders(self, split: str) -> DataLoader | list[DataLoader]:
        self._resolve_text()
        h = self.hparams
        loaders = []
        if self.sources(split, "rec"):
            dataset = self.dataset(split)
            loaders.append(DataLoader(dataset, batch_size=h.eval_batch_size or h.batch_size, shuffle=False,
                                      sampler=evaluation_sampler(dataset), num_workers=h.num_workers,
                                      collate_fn=collate_expressions, persistent_workers=h.num_workers > 0))
        phrases = self.phrase_set(split)
        if phrases is not None:
            loaders.append(DataLoader(phrases, batch_size=h.eval_batch_size or h.batch_size, shuffle=False,
                                      sampler=evaluation_sampler(phrases), num_workers=h.num_workers,
                                      collate_fn=collate_phrases, persistent_workers=h.num_workers > 0))
        detection = self.detection_set(split)
        if detection is not None:
            loaders.append(DataLoader(detection, batch_size=h.eval_batch_size or h.batch_size, shuffle=False,
                                      sampler=evaluation_sampler(detection), num_workers=h.num_workers,
                                      collate_fn=collate_detection, persistent_workers=h.num_workers > 0))
        if not loaders:
            raise ValueError(f"no {split} data: set data.{split} or data.{split}_detection")
        return loaders[0] if len(loaders) == 1 else loaders

    def val_dataloader(self):
        return self._evaluation_loaders("val")

    def test_dataloader(self):
        return self._evaluation_loaders(self.hparams.split)

    def predict_dataloader(self):
        return self._evaluation_loaders(self.hparams.split)
