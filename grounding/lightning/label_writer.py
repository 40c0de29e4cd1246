"""Writing predictions as PNGs: label maps as palette PNGs (the format of the datasets' own ground truth, VOC)
and synthesized images as RGB PNGs.

``write_label_png`` writes one (H, W) label map as a 'P'-mode PNG and ``write_rgb_png`` one (3, H, W) uint8
image, each atomically (a temporary file beside it, renamed over it). ``PredictionPngWriter`` is the callback
that writes what a LightningModule's ``test_step`` / ``predict_step`` returns, ``{"image_ids": [id, ...],
<key>: [item, ...]}``, to ``<out_dir>/<image_id>.png``, each id once: ``LabelMapWriter`` (key ``label_maps``,
default folder ``predictions/labels``) and ``RGBImageWriter`` (key ``images``, default folder
``predictions/<folder_name>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from grounding.constants import IGNORE_INDEX
from grounding.data.label_maps import voc_palette
from grounding.utils import write_atomic

IGNORE_COLOUR = (255, 255, 255)
"""Colour of label 255 when the palette is shorter than 256 entries (white, as ``colorize_labels`` draws it)."""


def write_label_png(path: str | Path, labels: torch.Tensor | np.ndarray, palette: torch.Tensor | np.ndarray) -> None:
    """Write ``labels`` (H, W) ints as a palette PNG at ``path``, atomically.

    palette: (N, 3) uint8 colours of labels 0..N-1 (N <= 256). Pixel values are the labels themselves, so
    the file reads back as the same label map; IGNORE_INDEX (255) stays 255, coloured ``palette[255]``
    when N = 256, else ``IGNORE_COLOUR``. A label neither in [0, N) nor 255 is an error naming ``path``.
    """
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    colours = palette.detach().cpu().numpy() if isinstance(palette, torch.Tensor) else np.asarray(palette)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label map for {path} must be (H, W) integers; got {labels.shape} {labels.dtype}")
    if colours.ndim != 2 or colours.shape[1] != 3 or not 1 <= colours.shape[0] <= 256:
        raise ValueError(f"palette for {path} must be (N, 3) with 1 <= N <= 256; got {colours.shape}")
    bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= colours.shape[0]))]
    if bad.size:
        raise ValueError(
            f"label map for {path} holds label {int(bad[0])}, outside the palette's 0..{colours.shape[0] - 1} and not {IGNORE_INDEX}"
        )
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: colours.shape[0]] = colours.astype(np.uint8)
    if colours.shape[0] <= IGNORE_INDEX:
        table[IGNORE_INDEX] = IGNORE_COLOUR
    image = Image.fromarray(labels.astype(np.uint8))  # 'L'; putpalette turns it into 'P' keeping the values
    image.putpalette(table.reshape(-1).tolist())
    write_atomic(path, lambda temporary: image.save(temporary, format="PNG"))


def _checked_id(image_id: Any) -> str:
    """An image id as a file name: no folder parts, so that a file never lands outside ``out_dir``."""
    name = str(image_id)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"image id {image_id!r} cannot be a file name (it must not be empty or hold a path separator)")
    return name


#: zlib level of the RGB PNGs (pictures for people): 1 encodes a 512 px overlay about 2.5x faster than PIL's
#: default 6 for about a third more bytes; the PNGs stay lossless
RGB_PNG_COMPRESS_LEVEL = 1


def write_rgb_png(path: str | Path, image: torch.Tensor | np.ndarray) -> None:
    """Write ``image`` (3, H, W) uint8 as an RGB PNG at ``path``, atomically (zlib level ``RGB_PNG_COMPRESS_LEVEL``)."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[0] != 3 or array.dtype != np.uint8:
        raise ValueError(f"image for {path} must be (3, H, W) uint8; got {array.shape} {array.dtype}")
    picture = Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")
    write_atomic(path, lambda temporary: picture.save(temporary, format="PNG", compress_level=RGB_PNG_COMPRESS_LEVEL))


class PredictionPngWriter(Callback):
    """Writes the items under ``key`` of ``test_step`` / ``predict_step`` outputs to ``<out_dir>/<image_id>.png``.

    out_dir: default ``<trainer.log_dir>/predictions/<folder_name>``. Each image is written once per run and
    process (an id met again, e.g. an image a distributed sampler repeats to pad a batch, is not rewritten);
    processes writing the same id both write complete files (atomic renames), so the survivor is whole.
    Subclasses set ``key`` and ``folder_name`` and write one item in ``write_item``.
    """

    key = ""
    folder_name = ""

    def __init__(self, out_dir: str | None = None):
        self.out_dir = out_dir
        self._folder: Path | None = None  # the resolved folder of the current run
        self._written: set[str] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        root = trainer.log_dir or trainer.default_root_dir  # a collective call under DDP: every rank makes it
        self._folder = Path(self.out_dir) if self.out_dir is not None else Path(root) / "predictions" / self.folder_name
        self._written = set()

    def write_item(self, path: Path, item: Any) -> None:
        raise NotImplementedError

    def write(self, outputs: Any) -> None:
        """Write ``outputs[key]`` under ``outputs["image_ids"]`` (see the class docstring)."""
        name = type(self).__name__
        if not isinstance(outputs, dict) or "image_ids" not in outputs or self.key not in outputs:
            raise ValueError(
                f"{name} needs test_step / predict_step to return a dict with 'image_ids' and '{self.key}';"
                f" got {type(outputs).__name__}" + (f" with keys {sorted(outputs)}" if isinstance(outputs, dict) else "")
            )
        image_ids, items = list(outputs["image_ids"]), list(outputs[self.key])
        if len(image_ids) != len(items):
            raise ValueError(f"{name}: {len(image_ids)} image ids for {len(items)} {self.key.replace('_', ' ')}")
        if self._folder is None:
            raise RuntimeError(f"{name}.write was called before the trainer set it up")
        for image_id, item in zip(image_ids, items):
            file_name = _checked_id(image_id)
            if file_name in self._written:
                continue
            self.write_item(self._folder / f"{file_name}.png", item)
            self._written.add(file_name)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.write(outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.write(outputs)


class LabelMapWriter(PredictionPngWriter):
    """Writes the label maps of ``test_step`` and ``predict_step`` outputs (``label_maps``: (H, W) long each) as
    palette PNGs to ``<out_dir>/<image_id>.png``, and, for a person to look at, each map over its image beside a
    legend of its classes (name per colour) to ``<out_dir>_overlays/<image_id>.png``.

    out_dir: default ``<trainer.log_dir>/predictions/labels``.
    palette: (N, 3) uint8; default the datamodule's ``palette`` when it has one, else the VOC palette.
    overlays: write the overlays (they need the batch's samples to hold their ``image``; the class names are the
        datamodule's ``class_names``, else the label values).
    """

    key = "label_maps"
    folder_name = "labels"

    def __init__(self, out_dir: str | None = None, palette: torch.Tensor | None = None, overlays: bool = True):
        super().__init__(out_dir)
        self.palette = palette
        self.overlays = overlays
        self._colours: torch.Tensor | None = None
        self._class_names: list[str] = []
        self._overlaid: set[str] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        datamodule = getattr(trainer, "datamodule", None)
        colours = self.palette if self.palette is not None else getattr(datamodule, "palette", None)
        self._colours = torch.as_tensor(colours if colours is not None else voc_palette(256), dtype=torch.uint8)
        self._class_names = list(getattr(datamodule, "class_names", None) or []) if datamodule is not None else []
        self._overlaid = set()

    def write_item(self, path: Path, item: Any) -> None:
        write_label_png(path, item, self._colours)

    def write_overlays(self, outputs: Any, batch: Any) -> None:
        """Each label map of ``outputs`` over the image of the sample of ``batch`` with the same id, with a legend."""
        from grounding.visualize import labelled_overlay

        if not self.overlays or not isinstance(batch, (list, tuple)) or self._folder is None:
            return
        images = {str(s["image_id"]): s["image"] for s in batch if isinstance(s, dict) and "image" in s and "image_id" in s}
        folder = self._folder.with_name(self._folder.name + "_overlays")
        for image_id, labels in zip(outputs["image_ids"], outputs[self.key]):
            name = _checked_id(image_id)
            if name in self._overlaid or name not in images:
                continue
            names = self._class_names or [str(v) for v in range(int(self._colours.shape[0]))]
            write_rgb_png(folder / f"{name}.png", labelled_overlay(images[name], labels, names, self._colours))
            self._overlaid.add(name)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.write(outputs)
        self.write_overlays(outputs, batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.write(outputs)
        self.write_overlays(outputs, batch)


class RGBImageWriter(PredictionPngWriter):
    """Writes the images of ``test_step`` and ``predict_step`` outputs (``images``: (3, H, W) uint8 each) as RGB
    PNGs to ``<out_dir>/<image_id>.png``; out_dir: default ``<trainer.log_dir>/predictions/<folder_name>``."""

    key = "images"

    def __init__(self, out_dir: str | None = None, folder_name: str = "images"):
        super().__init__(out_dir)
        self.folder_name = _checked_id(folder_name)

    def write_item(self, path: Path, item: Any) -> None:
        write_rgb_png(path, item)
