"""The user's own images as a DataModule for ``grounding-predict``: files, folders and lists of paths.

``ImageFolderDataModule`` reads what ``inputs`` names:

- an image file (any suffix: a file named explicitly is always read);
- a folder: its files with a suffix of ``grounding.data.images.IMAGE_SUFFIXES`` (any case), sorted by path;
  only the folder itself unless ``recursive`` (then every sub-folder too);
- a ``.txt`` file: one image path per line (blank lines and lines starting with ``#`` left out; a relative
  path is relative to the list's folder).

An image's id is its file stem (``photos/cat.jpg`` -> ``cat``), the name of its output files; two inputs with
the same stem in different folders are an error naming both (rename one, or predict them in two runs with
two ``--out`` folders). A file named twice is read once.

Samples are ``{"image_id", "image": uint8 (3, H, W), "path"}`` read by ``read_rgb_image`` (EXIF orientation
applied, alpha composited onto black, 16-bit rescaled). An image that cannot be read is never a crash: the
dataset returns an ``UnreadableImage`` marker, and ``on_before_batch_transfer`` (in the main process) takes it
out of the batch, counts it and logs a warning naming it with the running count.

Resuming: ``setup`` leaves out the images whose outputs are complete in ``out_dir`` (their record
``records/<id>.json`` and every file it names exist; ``complete_record``). Rank 0 decides and broadcasts the
decision, so every process reads the same list; ``predict_dataloader`` then spreads the rest over the processes
with ``evaluation_sampler`` (each image on one process).

Classes: ``class_names`` are the classes given, in order (label value = index). A class named
``background`` is the background class (``background_index``): GEM does not prompt it and applies its
background threshold rule, InvSeg puts it first in its prompt, as on a dataset with a background class.
Without one every pixel goes to one of the classes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from grounding.data.evaluation import EvaluationDataModule, LabelMapOutput, RecordDataset
from grounding.data.images import IMAGE_SUFFIXES, ImageReadError, image_tensor, read_rgb_image
from grounding.data.skips import SkipReport, UnreadableImage
from grounding.data.user_masks import MaskSource

log = logging.getLogger(__name__)

#: the keys of a record that name output files (relative to the output folder): a path, a list or a {name: path} map
OUTPUT_KEYS = ("drawn", "label_map", "overlay", "heatmaps", "embeddings", "maps", "images")


def _list_file(path: Path) -> list[Path]:
    files = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        file = Path(line).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise ValueError(f"inputs (--inputs): {path} line {number}: no such file: {line}")
        files.append(file)
    return files


def list_images(inputs: Sequence[str], recursive: bool = False) -> list[Path]:
    """The image files that ``inputs`` names (see the module docstring), in order, each once."""
    if isinstance(inputs, str) or not inputs:
        raise ValueError(f"inputs (--inputs) is empty: give image files, folders or .txt lists of paths; got {inputs!r}")
    files: list[Path] = []
    for given in inputs:
        path = Path(str(given)).expanduser()
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            files += sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file() and path.suffix.lower() == ".txt":
            files += _list_file(path)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"inputs (--inputs): no such file or folder: {given}")
    unique, seen = [], set()
    for file in files:
        key = file.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(file)
    if not unique:
        raise ValueError(f"inputs (--inputs) {list(inputs)} hold no image (a folder is read for {', '.join(IMAGE_SUFFIXES)}"
                         f"{', sub-folders included' if recursive else '; --recursive reads its sub-folders'})")
    return unique


def image_ids(files: Sequence[Path]) -> list[str]:
    """The id of each file: its stem; two files with one stem are an error naming both."""
    owners: dict[str, Path] = {}
    for file in files:
        if file.stem in owners:
            raise ValueError(f"inputs (--inputs): {owners[file.stem]} and {file} have the same name {file.stem!r}, "
                             "the name of their output files: rename one or predict them in separate runs (--out)")
        if not file.stem or file.stem.startswith("."):
            raise ValueError(f"inputs (--inputs): {file} has no usable name for its output files")
        owners[file.stem] = file
    return list(owners)


def output_files(record: dict) -> list[str]:
    """The output files (relative paths) a record names."""
    files = []
    for key in OUTPUT_KEYS:
        value = record.get(key)
        if isinstance(value, str):
            files.append(value)
        elif isinstance(value, dict):
            files += [v for v in value.values() if isinstance(v, str)]
        elif isinstance(value, list):
            files += [v for v in value if isinstance(v, str)]
    return files


def record_path(out_dir: str | Path, image_id: str) -> Path:
    return Path(out_dir) / "records" / f"{image_id}.json"


def complete_record(out_dir: str | Path, image_id: str) -> dict | None:
    """The record of ``image_id`` in ``out_dir`` when it and every file it names exist, else None."""
    path = record_path(out_dir, image_id)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("image_id") != image_id:
        return None
    if not all((Path(out_dir) / name).is_file() for name in output_files(record)):
        return None
    return record


def remove_partial_writes(out_dir: str | Path) -> int:
    """Delete the temporary files an interrupted run left in ``out_dir`` (``grounding.utils.write_atomic``'s
    ``.<name>.<random>.tmp`` beside each file it was writing); returns how many."""
    folder = Path(out_dir)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.rglob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d partial files an interrupted run left in %s", removed, folder)
    return removed


def parse_classes(classes: str | Sequence[str] | None) -> list[str] | None:
    """``"red circle, blue square"`` or a list of names -> the names, stripped; None stays None."""
    if classes is None:
        return None
    names = classes.split(",") if isinstance(classes, str) else list(classes)
    names = [" ".join(str(name).split()) for name in names]
    if not names or not any(names):
        raise ValueError(f"classes (--classes) is empty: give class names separated by commas, e.g. 'red circle, blue square'; got {classes!r}")
    empty = [index for index, name in enumerate(names) if not name]
    if empty:
        raise ValueError(f"classes (--classes) {classes!r}: class {empty[0] + 1} has no name (two commas in a row?)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"classes (--classes) {classes!r} names {', '.join(repeated)} more than once")
    return names


class ImageFolderDataset(RecordDataset):
    """``(image id, path)`` records read as samples, or an ``UnreadableImage`` for a file that cannot be read;
    with a ``MaskSource`` each sample also holds its ``region_ids`` and ``masks`` (R, H, W)."""

    def __init__(self, records: list, class_names: Sequence[str], mask_source: MaskSource | None = None) -> None:
        super().__init__(records, class_names)
        self.mask_source = mask_source

    def __getitem__(self, index: int) -> dict | UnreadableImage:
        image_id, path = self.records[index]
        try:
            image = image_tensor(read_rgb_image(path))
        except (ImageReadError, OSError) as error:
            return UnreadableImage(str(path), image_id, str(error))
        sample = {"image_id": image_id, "image": image, "path": str(path)}
        if self.mask_source is not None:
            sample["region_ids"], sample["masks"] = self.mask_source.regions(image_id, *image.shape[-2:])
        return sample


class PredictionDataModule(LabelMapOutput, EvaluationDataModule):
    """What ``grounding-predict`` runs on: items with ids (``self.ids``, one output record each), an output folder
    whose complete records are left out, and the count of what could not be read. Subclasses set ``ids``,
    ``sources`` (what each id was made from: a file, a text) and ``classes``, and define ``make_dataset``."""

    def __init__(self, out_dir: str | None, skip_existing: bool, batch_size: int, num_workers: int, what: str) -> None:
        super().__init__()
        self.check_loader_settings("predict", None, batch_size, num_workers)
        self.out_dir: Path | None = Path(out_dir) if out_dir is not None else None
        self.skip_existing = skip_existing
        self.ids: list[str] = []
        self.sources: list[str] = []
        self.classes: list[str] | None = None
        self.left_out: list[str] = []  # ids with nothing to predict (set by a subclass)
        self.skipped_existing = 0
        self.report = SkipReport(what)
        self.unreadable: list[UnreadableImage] = []

    @property
    def evaluation_split(self) -> str:
        return "predict"

    @property
    def class_names(self) -> list[str]:
        return list(self.classes or [])

    @property
    def background_index(self) -> int | None:
        """The index of a class named "background", else None."""
        names = [name.lower() for name in self.class_names]
        return names.index("background") if "background" in names else None

    def resolve_out_dir(self) -> Path:
        """``out_dir``, or ``<run folder>/predictions`` (a collective call under DDP: every process makes it)."""
        if self.out_dir is None:
            trainer = self.trainer
            if trainer is None:
                raise RuntimeError(f"{type(self).__name__} needs out_dir when it is not run by a Trainer")
            self.out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "predictions"
        return self.out_dir

    def make_dataset(self, ids: list[str]) -> RecordDataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        out_dir = self.resolve_out_dir()
        done: list[str] = []
        trainer = self.trainer
        if trainer is None or trainer.is_global_zero:
            remove_partial_writes(out_dir)
        if self.skip_existing and (trainer is None or trainer.is_global_zero):
            done = [item for item in self.ids if complete_record(out_dir, item) is not None]
        if trainer is not None and trainer.world_size > 1:
            done = trainer.strategy.broadcast(done, src=0)  # the same list on every process
        finished = set(done)
        self.skipped_existing = len(finished)
        if self.skipped_existing:
            log.info("%s: %d of %d already have their outputs in %s (left out)", self.report.source,
                     self.skipped_existing, len(self.ids), out_dir)
        finished |= set(self.left_out)
        self.dataset = self.make_dataset([item for item in self.ids if item not in finished])

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The batch without its unreadable images, each counted and named in a warning."""
        kept = []
        for sample in batch:
            if isinstance(sample, UnreadableImage):
                self.unreadable.append(sample)
                self.report.add("unreadable image", str(sample))
                log.warning("%s: skipped unreadable image %d so far: %s", self.report.source, len(self.unreadable), sample)
            else:
                kept.append(sample)
        return kept


class ImageFolderDataModule(PredictionDataModule):
    """The user's images for ``Trainer.predict`` (see the module docstring).

    Args:
        inputs: image files, folders and ``.txt`` lists of paths.
        classes: class names (a list, or one string separated by commas); the detector takes these or ``text``,
            the segmentation methods need these.
        text: a free prompt for the detector (``"the red circle . a blue square"``).
        masks, boxes: MaskInversion's regions (``grounding.data.user_masks.MaskSource``): a folder of masks
            (``<image id>.png`` label maps or ``<image id>/`` folders of binary PNGs), or a JSON file of pixel boxes
            ``{image id: [[x0, y0, x1, y1], ...]}``; images without regions are left out with a warning.
        out_dir: the output folder (default ``<run folder>/predictions``); images whose outputs are complete
            there are left out.
        recursive: read the sub-folders of a folder too.
        skip_existing: leave out the images with complete outputs (False: predict every image again).
        batch_size, num_workers: the loader's.
    """

    def __init__(
        self,
        inputs: list[str],
        classes: list[str] | str | None = None,
        text: str | None = None,
        masks: str | None = None,
        boxes: str | None = None,
        out_dir: str | None = None,
        recursive: bool = False,
        skip_existing: bool = True,
        batch_size: int = 1,
        num_workers: int = 0,
    ):
        super().__init__(out_dir, skip_existing, batch_size, num_workers, "images to predict")
        self.save_hyperparameters()
        self.classes = parse_classes(classes)
        if text is not None and not text.strip():
            raise ValueError(f"text (--text) is empty: give a prompt such as 'the red circle . a blue square'; got {text!r}")
        self.mask_source = MaskSource(masks, boxes) if masks is not None or boxes is not None else None
        if self.classes is None and text is None and self.mask_source is None:
            raise ValueError("give the classes to find (--classes 'red circle, blue square') or, for the detector, a prompt (--text)")
        self.files = list_images(inputs, recursive)
        self.ids = image_ids(self.files)
        self.sources = [str(file) for file in self.files]
        self.left_out = self.mask_source.missing(self.ids) if self.mask_source is not None else []
        if self.left_out and len(self.left_out) == len(self.ids):
            raise ValueError(f"no image of inputs (--inputs) has regions in {masks or boxes}: "
                             f"e.g. {self.ids[0]} needs {masks + '/' + self.ids[0] + '.png' if masks else 'an entry ' + repr(self.ids[0])}")
        for image_id in self.left_out:
            self.report.add("no regions", image_id)
        if self.left_out:
            log.warning("%s: %d images have no regions (masks or boxes) and are left out: %s", self.report.source,
                        len(self.left_out), ", ".join(self.left_out[:10]))

    def make_dataset(self, ids: list[str]) -> ImageFolderDataset:
        files = dict(zip(self.ids, self.files))
        return ImageFolderDataset([(image_id, files[image_id]) for image_id in ids], self.class_names, self.mask_source)


class TargetTextDataset(RecordDataset):
    """Target texts as MIMIC's samples: ``{"image_id", "target_id", "prompt", "target", "references",
    "verifier_class"}`` (no references, no verifier class)."""

    def __getitem__(self, index: int) -> dict:
        target_id, prompt, target = self.records[index]
        return {"image_id": target_id, "target_id": target_id, "prompt": prompt, "target": target,
                "references": None, "verifier_class": None}


class TargetTextDataModule(PredictionDataModule):
    """Target texts for ``Trainer.predict`` of an image-synthesis method (MIMIC): one output per target.

    Args:
        classes: the target texts (a list, or one string separated by commas): "a red circle, a blue square".
        text: the prompt put to the vision-language model (default "What is in the image?").
        out_dir, skip_existing, batch_size, num_workers: as ``ImageFolderDataModule``'s.

    A target's id (its output files' name) is ``grounding.data.concepts.target_id`` of its text.
    """

    def __init__(
        self,
        classes: list[str] | str,
        text: str | None = None,
        out_dir: str | None = None,
        skip_existing: bool = True,
        batch_size: int = 1,
        num_workers: int = 0,
    ):
        from grounding.data.concepts import DEFAULT_PROMPT, target_id

        super().__init__(out_dir, skip_existing, batch_size, num_workers, "targets to synthesize")
        self.save_hyperparameters()
        self.classes = parse_classes(classes)
        if self.classes is None:
            raise ValueError("classes (--classes): give the target texts, e.g. 'a red circle, a blue square'")
        if text is not None and not text.strip():
            raise ValueError(f"text (--text) is empty: give the prompt, e.g. 'What is in the image?'; got {text!r}")
        self.prompt = " ".join((text or DEFAULT_PROMPT).split())
        self.ids = [target_id(target) for target in self.classes]
        repeated = sorted({i for i in self.ids if self.ids.count(i) > 1})
        if repeated:
            raise ValueError(f"classes (--classes): the targets {self.classes} give the same id {repeated[0]!r} (their output name) twice")
        self.sources = list(self.classes)

    def make_dataset(self, ids: list[str]) -> TargetTextDataset:
        texts = dict(zip(self.ids, self.classes))
        return TargetTextDataset([(i, self.prompt, texts[i]) for i in ids], self.class_names)
