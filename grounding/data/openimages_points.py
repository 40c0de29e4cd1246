"""OpenImages V7 point labels: images with positive / negative points per class, the input of zero-shot point
prediction (GEM) scored by p-mIoU (``grounding.metrics.point_miou``); docs/gem.md describes the protocol.

Files (the public V7 release; docs/gem.md shows the layout):

- point labels, e.g. ``oidv7-val-annotations-point-labels.csv``: a header naming at least the columns
  ``ImageId, Source, LabelName, X, Y, EstimatedYesNo`` (others, e.g. the vote counts or ``TextLabel``, are
  ignored); X, Y are the point's coordinates normalized to [0, 1] by the image width and height;
  EstimatedYesNo is ``yes`` (the class is there), ``no`` (it is not) or ``unsure``.
- class descriptions, ``oidv7-class-descriptions.csv``: ``LabelName, DisplayName`` rows (an optional header
  row spelling exactly these two words); the row order is the class index order.
- images: ``<ImageId>.jpg`` in one folder.

The labels file is streamed row by row and grouped by image into compact arrays (class index, x, y, label),
so memory grows with the points, not with Python objects. ``unsure`` points are skipped and counted, as are
images without a file (both logged when the DataModule is set up). Broken input fails naming the file (and
line): a missing column, a LabelName that is not in the class descriptions, a coordinate that is not a number
in [0, 1], an EstimatedYesNo that is none of yes / no / unsure.

``grounding.data.synthetic.write_synthetic_points`` turns the project's synthetic dataset into these files,
so the pipeline runs offline on data the project generates.
"""

from __future__ import annotations

import csv
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

import numpy as np
import torch

from grounding.data.evaluation import EvaluationDataModule, RecordDataset
from grounding.data.images import check_image, image_tensor, read_rgb_image
from grounding.data.label_maps import find_image, read_image_list
from grounding.data.skips import SkipReport
from grounding.data.synthetic import PointFiles, points_dir, write_synthetic_points

POINT_COLUMNS = ("ImageId", "Source", "LabelName", "X", "Y", "EstimatedYesNo")
"""The columns a point-labels file must have (in any order, among others)."""

CLASS_COLUMNS = ("LabelName", "DisplayName")
"""The columns of a class-descriptions file (its optional header row)."""

POINT_LABELS = {"yes": 1, "no": 0}
"""EstimatedYesNo -> point label (1 positive, 0 negative); "unsure" points are skipped."""


def _open_csv(path: Path, what: str) -> IO[str]:
    """``path`` opened for the csv module; FileNotFoundError naming ``what`` when it is absent."""
    try:
        return open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None


# ------------------------------------------------------------------------------------- class descriptions
def read_class_descriptions(classes_csv: str | Path) -> tuple[list[str], list[str]]:
    """(label names, display names) of a class-descriptions CSV, in file order (index = class index).

    A first row ``LabelName,DisplayName`` is a header; every other row is a class. Errors name the file and
    line: a row without two fields, an empty LabelName, a LabelName listed twice.
    """
    path = Path(classes_csv)
    labels: list[str] = []
    names: list[str] = []
    seen: dict[str, int] = {}
    with _open_csv(path, "class descriptions file") as handle:
        reader = csv.reader(handle)
        for row in reader:
            if not row or not any(field.strip() for field in row):
                continue
            if not labels and tuple(field.strip() for field in row[:2]) == CLASS_COLUMNS:
                continue
            if len(row) < 2:
                raise ValueError(f"class descriptions file {path}, line {reader.line_num}: expected LabelName,DisplayName; got {row!r}")
            label, name = row[0].strip(), row[1].strip()
            if not label:
                raise ValueError(f"class descriptions file {path}, line {reader.line_num}: empty LabelName")
            if label in seen:
                raise ValueError(
                    f"class descriptions file {path}, line {reader.line_num}: LabelName {label!r} is listed twice"
                    f" (first on line {seen[label]})"
                )
            seen[label] = reader.line_num
            labels.append(label)
            names.append(name)
    if not labels:
        raise ValueError(f"class descriptions file {path} lists no class")
    return labels, names


# ------------------------------------------------------------------------------------- point labels
@dataclass
class ImagePoints:
    """The points of one image, compact: classes int32 (P,), xy float32 (P, 2) normalized (x, y) in [0, 1],
    labels int8 (P,) (1 positive, 0 negative)."""

    classes: np.ndarray
    xy: np.ndarray
    labels: np.ndarray


class _PointBuffer:
    """Growing typed arrays of one image's points while the file is streamed (a few bytes per point)."""

    __slots__ = ("classes", "xy", "labels")

    def __init__(self) -> None:
        self.classes, self.xy, self.labels = array("i"), array("f"), array("b")

    def freeze(self) -> ImagePoints:
        xy = np.frombuffer(self.xy, dtype=np.float32).reshape(-1, 2).copy()
        return ImagePoints(np.frombuffer(self.classes, dtype=np.int32).copy(), xy, np.frombuffer(self.labels, dtype=np.int8).copy())


def _coordinate(value: str, column: str, path: Path, line: int) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"point labels file {path}, line {line}: {column} {value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:  # also rejects NaN
        raise ValueError(f"point labels file {path}, line {line}: {column} {value!r} is outside [0, 1] (coordinates are normalized)")
    return number


def read_point_labels(
    points_csv: str | Path, label_index: dict[str, int], report: SkipReport, keep: Iterable[str] | None = None,
) -> dict[str, ImagePoints]:
    """The points of a point-labels CSV grouped by image id (in order of first appearance).

    label_index: LabelName -> class index; keep: only these image ids (every row is still validated);
    report: counts "unsure point" skips. Errors name the file (and the line); see the module docstring.
    """
    path = Path(points_csv)
    keep = set(keep) if keep is not None else None
    buffers: dict[str, _PointBuffer] = {}
    with _open_csv(path, "point labels file") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in POINT_COLUMNS if name not in header]
        if missing:
            raise ValueError(f"point labels file {path} has no column {', '.join(missing)} (header: {','.join(header)})")
        i_image, _, i_label, i_x, i_y, i_yes = (header.index(name) for name in POINT_COLUMNS)
        width = len(header)
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) < width:
                raise ValueError(f"point labels file {path}, line {line}: {len(row)} fields, the header has {width}")
            image_id, label_name = row[i_image].strip(), row[i_label].strip()
            if not image_id:
                raise ValueError(f"point labels file {path}, line {line}: empty ImageId")
            class_index = label_index.get(label_name)
            if class_index is None:
                raise ValueError(f"point labels file {path}, line {line}: LabelName {label_name!r} is not in the class descriptions")
            x = _coordinate(row[i_x].strip(), "X", path, line)
            y = _coordinate(row[i_y].strip(), "Y", path, line)
            answer = row[i_yes].strip().lower()
            if answer not in POINT_LABELS and answer != "unsure":
                raise ValueError(f"point labels file {path}, line {line}: EstimatedYesNo {row[i_yes]!r} is not yes, no or unsure")
            if keep is not None and image_id not in keep:
                continue
            if answer == "unsure":
                report.add("unsure point", f"{image_id} line {line}")
                continue
            buffer = buffers.get(image_id)
            if buffer is None:
                buffer = buffers[image_id] = _PointBuffer()
            buffer.classes.append(class_index)
            buffer.xy.extend((x, y))
            buffer.labels.append(POINT_LABELS[answer])
    return {image_id: buffer.freeze() for image_id, buffer in buffers.items()}


@dataclass(frozen=True)
class PointRecord:
    """One image file and its points."""

    image_id: str
    path: Path
    points: ImagePoints


def load_openimages_points(
    points_csv: str | Path, classes_csv: str | Path, image_dir: str | Path, image_list: str | Path | None = None,
) -> tuple[list[PointRecord], list[str], list[str], SkipReport]:
    """(records, label names, display names, skip report) of a point-labels file and its images.

    Records follow the image list when given (ids one a line; an id without points is a counted skip), else
    the order in which images first appear in the file. An image without ``<ImageId>.jpg`` (or .png) in
    ``image_dir`` is a counted skip ("missing image"); so is an image whose points were all unsure.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    labels, names = read_class_descriptions(classes_csv)
    report = SkipReport(str(points_csv))
    wanted = read_image_list(image_list) if image_list is not None else None
    if wanted is not None and len(set(wanted)) != len(wanted):
        twice = next(i for n, i in enumerate(wanted) if i in wanted[:n])
        raise ValueError(f"image list {image_list} names {twice!r} twice (an image would be scored twice)")
    by_image = read_point_labels(points_csv, {label: i for i, label in enumerate(labels)}, report, wanted)
    records = []
    for image_id in wanted if wanted is not None else by_image:
        points = by_image.get(image_id)
        if points is None:
            report.add("no point", f"{image_id}: no yes/no point in {points_csv}")
            continue
        path = find_image(image_dir, image_id)
        if path is None:
            report.add("missing image", f"{image_id}: no {image_id}.jpg in {image_dir}")
            continue
        records.append(PointRecord(image_id, path, points))
    if not records:
        raise ValueError(f"point labels file {points_csv}: no image with points and a file in {image_dir}; skipped: {dict(report.counts)}")
    return records, labels, names, report


# ------------------------------------------------------------------------------------- dataset
class OpenImagesPointsDataset(RecordDataset):
    """Images at their own size with their points.

    ``dataset[i]`` is ``{"image": uint8 (3, H, W), "image_id": str, "classes": sorted class indices with a
    point in this image, "points": float32 (P, 2) pixel coordinates (x, y) = normalized (X * W, Y * H),
    "point_classes": int64 (P,), "point_labels": int64 (P,) (1 positive, 0 negative), "path": str}``.
    Pixel coordinates are continuous: pixel (i, j) covers x in [j, j + 1), y in [i, i + 1).
    """

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = read_rgb_image(record.path, None, record.image_id)
        width, height = image.size
        points = torch.from_numpy(record.points.xy.astype(np.float32)) * torch.tensor([width, height], dtype=torch.float32)
        point_classes = torch.from_numpy(record.points.classes.astype(np.int64))
        return {
            "image": image_tensor(image),
            "image_id": record.image_id,
            "classes": sorted(set(point_classes.tolist())),
            "points": points,
            "point_classes": point_classes,
            "point_labels": torch.from_numpy(record.points.labels.astype(np.int64)),
            "path": str(record.path),
        }


# ------------------------------------------------------------------------------------- DataModule
class OpenImagesPointsDataModule(EvaluationDataModule):
    """OpenImages V7 point-label batches for zero-shot point prediction: ``test_dataloader`` /
    ``predict_dataloader`` yield lists of ``OpenImagesPointsDataset`` samples.

    Args:
        points_csv, classes_csv, image_dir: the point-labels file, the class descriptions, the image folder.
        split: the split's name (what ``evaluation_split`` reports; the files say which data it is).
        image_list: optional file of image ids (one a line): only these images, in this order.
        synthetic_root, synthetic: instead of the three files, the project's synthetic dataset at this folder
            (generated if absent with the generator settings ``synthetic``), turned into point labels under
            ``<synthetic_root>/openimages_points/<split>`` by ``grounding.data.synthetic.write_synthetic_points``.
        limit: only the first N images (quick runs).
        check_images: read every image header before use (decodes, not truncated).
        batch_size, num_workers: loaders (batches are lists of samples).
    """

    def __init__(
        self,
        points_csv: str | None = None,
        classes_csv: str | None = None,
        image_dir: str | None = None,
        split: str = "val",
        image_list: str | None = None,
        synthetic_root: str | None = None,
        synthetic: dict | None = None,
        limit: int | None = None,
        check_images: bool = True,
        batch_size: int = 1,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        files = (points_csv, classes_csv, image_dir)
        if synthetic_root is None and not all(files):
            raise ValueError("set points_csv, classes_csv and image_dir (or synthetic_root for the synthetic dataset)")
        if synthetic_root is not None and any(files):
            raise ValueError("set either synthetic_root or points_csv / classes_csv / image_dir, not both")
        self.check_loader_settings(split, limit, batch_size, num_workers)
        self.dataset: OpenImagesPointsDataset | None = None
        self.report: SkipReport | None = None
        self.label_names: list[str] | None = None

    @property
    def uses_synthetic(self) -> bool:
        return self.hparams.synthetic_root is not None

    def _files(self) -> PointFiles:
        h = self.hparams
        if not self.uses_synthetic:
            return PointFiles(Path(h.points_csv), Path(h.classes_csv), Path(h.image_dir))
        self.prepare_data()
        return write_synthetic_points(h.synthetic_root, points_dir(h.synthetic_root, h.split), h.split)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        h = self.hparams
        files = self._files()
        records, labels, names, report = load_openimages_points(
            files.points_csv, files.classes_csv, files.image_dir, h.image_list
        )
        if h.limit is not None:
            records = records[: h.limit]
        if h.check_images:
            for record in records:
                check_image(record.path, None, record.image_id)
        report.log()
        self.report, self.label_names = report, labels
        self.dataset = OpenImagesPointsDataset(records, names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
