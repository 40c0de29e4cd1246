"""A trained Grounding DINO as a plain object: images and a prompt in, boxes with scores and labels out.

``GroundingDetector`` holds transformers' ``GroundingDinoForObjectDetection`` (or another detector of the
family ``build_grounding_dino`` builds, e.g. MM-Grounding-DINO's) and its ``GroundingDinoProcessor`` (image
processor + tokenizer) and runs the library's own pieces only:
the processor prepares the batch, the model runs under ``torch.no_grad()``, and
``processor.post_process_grounded_object_detection`` turns its outputs into boxes. No Lightning is
involved; ``from_checkpoint`` reads the ``last.ckpt`` of an ``ImageGroundingModule`` run and
``save_pretrained`` writes a folder that transformers loads by itself
(``AutoModelForZeroShotObjectDetection``, ``AutoProcessor``, ``pipeline("zero-shot-object-detection")``).

::

    detector = GroundingDetector.from_checkpoint("RUN/checkpoints/last.ckpt")
    detector("photo.jpg", classes=["red circle", "blue square"])
    # {"boxes": [[x0, y0, x1, y1], ...], "scores": [...], "labels": [...], "width": W, "height": H}
    detector.save_pretrained("exported/")

Checkpoints are read with ``torch.load(..., weights_only=True)`` (``grounding.checkpoints``): tensors and
plain values only, plus the settings dataclasses of the package's one allow-list
(``grounding.checkpoints.SAFE_CLASS_PATHS``; ``ImageGroundingModule.save_hyperparameters`` may store
``MaskingConfig``, ``DenoisingConfig`` and ``LoraSettings``). A checkpoint that needs any other global is refused
with an error naming the file and the globals; nothing is unpickled beyond that list. A checkpoint trained with
LoRA adapters gives the detector with the adapters merged into its weights (``detector_state_dict``).
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torchvision.ops import box_convert
from torchvision.transforms.functional import to_pil_image
from transformers import (
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
)
from transformers.image_utils import load_image

from grounding.checkpoints import UnsafeCheckpointError, load_checkpoint
from grounding.constants import IMAGENET_MEAN, IMAGENET_STD
from grounding.models.grounding_dino import TextFeatureCache, build_grounding_dino, cached_text_features, encoder_token_count
from grounding.models.lora import has_adapters, lora_settings, merged_state_dict

#: the LightningModule whose checkpoints ``from_checkpoint`` reads (LightningCLI stores it as ``_class_path``)
MODULE_CLASS_PATH = "grounding.lightning.image_module.ImageGroundingModule"

#: the prefix of the detector's weights in the module's state dict
DETECTOR_PREFIX = "detector."

#: the image size of the CocoDetectionDataModule's defaults, used when a checkpoint names none
DEFAULT_IMAGE_SIZE, DEFAULT_MAX_SIZE = 800, 1333

#: ``longest_edge`` standing for "no cap" (the DataModule's ``max_size: null``): transformers' Grounding DINO
#: image processor only resizes by a (shortest, longest) pair, and an edge this long is never reached
UNCAPPED_LONGEST_EDGE = 1_000_000

#: characters that end a phrase in Grounding DINO's prompts; a class name holding one would be split in two
PHRASE_DELIMITERS = (".", "?")


class CheckpointError(ValueError):
    """A checkpoint that is not a readable ``ImageGroundingModule`` checkpoint, or that holds objects this
    loader refuses to unpickle."""


# --------------------------------------------------------------------------------------------- checkpoints
def _class_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint, loaded on the CPU with ``weights_only=True`` (``grounding.checkpoints``).

    Only tensors, plain Python values and the classes of ``grounding.checkpoints.SAFE_CLASS_PATHS`` are
    accepted. Anything else is a ``CheckpointError`` naming the file and the globals it would need: this
    function never falls back to unpickling arbitrary objects (which can run any code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = load_checkpoint(path)
    except UnsafeCheckpointError as error:
        raise CheckpointError(f"checkpoint {error}") from error
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def module_hyper_parameters(checkpoint: dict, path: str | Path = "checkpoint") -> dict:
    """The ``ImageGroundingModule`` hyper-parameters of a checkpoint; a ``CheckpointError`` when it was saved
    from another LightningModule (``_class_path`` names another class) or holds no detector."""
    hparams = checkpoint.get("hyper_parameters")
    hparams = dict(hparams) if isinstance(hparams, dict) else {}
    class_path = hparams.get("_class_path")
    expected = _class_name(MODULE_CLASS_PATH)
    if isinstance(class_path, str) and class_path != MODULE_CLASS_PATH and _class_name(class_path) != expected:
        raise CheckpointError(
            f"{path} is a checkpoint of {_class_name(class_path)} ({class_path}), not of {expected}: "
            "only Grounding DINO detectors trained with ImageGroundingModule can be loaded or exported"
        )
    if not any(key.startswith(DETECTOR_PREFIX) for key in checkpoint["state_dict"]):
        raise CheckpointError(f"{path} holds no '{DETECTOR_PREFIX}*' weights: it is not a checkpoint of {expected}")
    return hparams


def detector_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The detector's weights of an ``ImageGroundingModule`` checkpoint, without the ``detector.`` prefix, as
    the plain detector's keys, so that ``from_checkpoint`` and ``grounding-export`` use them alike.

    These are the checkpoint's ``state_dict``: the weights the module trained or, for a run with
    ``grounding.lightning.ema.WeightEMA`` (or Lightning's ``EMAWeightAveraging``), their moving average (the
    callback saves the average there and the training weights under ``current_model_state``). LoRA adapters
    (a module trained with ``lora.r > 0``) are merged into their base weights, ``W + (alpha / r) B A``
    (``grounding.models.lora.merged_state_dict``), with alpha and r of the checkpoint's hyper-parameters.
    """
    weights = {
        key[len(DETECTOR_PREFIX):]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(DETECTOR_PREFIX)
    }
    if not has_adapters(weights):
        return weights
    hparams = checkpoint.get("hyper_parameters")
    try:
        settings = lora_settings(hparams.get("lora") if isinstance(hparams, dict) else None)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the checkpoint holds LoRA adapters but its lora settings are unreadable: {error}") from error
    if not settings.enabled:
        raise CheckpointError("the checkpoint holds LoRA adapters but its hyper-parameters give no lora.r > 0 (their scale alpha / r)")
    try:
        return merged_state_dict(weights, settings.scaling)
    except ValueError as error:
        raise CheckpointError(f"cannot merge the checkpoint's LoRA adapters: {error}") from error


def kept_boxes(outputs: Any, threshold: float, sizes: Sequence[tuple[int, int]]) -> list[dict]:
    """transformers' ``post_process_grounded_object_detection`` without its phrase decoding: per image, the
    boxes whose best token probability exceeds ``threshold`` as ``{"scores", "boxes"}`` ([x0, y0, x1, y1] in
    the pixels of ``sizes`` (height, width)), by the same operations in the same order, so the values are its own;
    ``"kept"``: the (Q,) mask of the queries kept, in the same order."""
    from transformers.image_transforms import center_to_corners_format

    scores = torch.max(torch.sigmoid(outputs.logits), dim=-1)[0]
    boxes = center_to_corners_format(outputs.pred_boxes)
    heights, widths = torch.Tensor([h for h, _ in sizes]), torch.Tensor([w for _, w in sizes])
    boxes = boxes * torch.stack([widths, heights, widths, heights], dim=1).to(boxes.device)[:, None, :]
    results = []
    for image_scores, image_boxes in zip(scores, boxes):
        kept = image_scores > threshold
        results.append({"scores": image_scores[kept], "boxes": image_boxes[kept], "kept": kept})
    return results


def checkpoint_image_size(checkpoint: dict) -> tuple[int, int | None]:
    """(image_size, max_size) of the DataModule the checkpoint was trained with (its
    ``datamodule_hyper_parameters``), else the DataModule's defaults (800, 1333)."""
    data = checkpoint.get("datamodule_hyper_parameters")
    data = data if isinstance(data, dict) else {}
    image_size = data.get("image_size") or DEFAULT_IMAGE_SIZE
    max_size = data["max_size"] if "max_size" in data else DEFAULT_MAX_SIZE
    return int(image_size), None if max_size is None else int(max_size)


# --------------------------------------------------------------------------------------------- preprocessing
def build_processor(tokenizer: Any, image_size: int = DEFAULT_IMAGE_SIZE, max_size: int | None = DEFAULT_MAX_SIZE) -> GroundingDinoProcessor:
    """transformers' ``GroundingDinoProcessor`` resizing as the project's evaluation transform does.

    The image processor resizes the shorter side to ``image_size`` with the longer side capped at
    ``max_size`` (``CocoDetectionDataModule``'s settings; ``None``: no cap), bilinear with antialiasing on
    the uint8 image, rescales by 1/255, normalizes with ImageNet's mean / std (``grounding.constants``)
    and pads each batch at the bottom and right with zeros (after normalization) plus a ``pixel_mask``, as
    ``grounding.data.coco.detection_transforms`` + ``collate_detection`` do. Where the two differ:

    - size when the cap applies: torchvision's ``Resize(image_size, max_size)`` sets the longer side to
      ``max_size`` and the shorter to ``int(max_size * image_size / int(image_size * long / short))``;
      transformers sets the shorter to ``round(max_size * short / long)`` and the longer to
      ``int(max_size * short / long * long / short)``. Either side can come out one pixel apart (and an
      image whose longer side just reaches the cap, ``max_size < image_size * long / short < max_size + 1``,
      is capped by transformers only). Without the cap both give ``(image_size, int(image_size * long /
      short))``, and an image whose shorter side already is ``image_size`` is left as it is by both.
    - normalization: transformers computes ``(x - 255 mean) / (255 std)`` in one step, the project
      ``(x / 255 - mean) / std``: float32 rounding, below 1e-5 apart.
    - reading files (``GroundingDetector`` and the pipeline use transformers' ``load_image``): EXIF
      orientation is always applied and the image converted by PIL's ``convert("RGB")``, which drops
      an alpha channel and clips 16-bit values; the project's ``read_rgb_image`` applies the orientation
      only when it agrees with the annotation file, composites alpha onto black and rescales 16-bit images.
      8-bit RGB and grayscale files read the same.

    Training augmentation (flips, crops, ``train_scales``) has no counterpart here: inference uses the
    evaluation resize.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < image_size):
        raise ValueError(f"max_size must be an integer >= image_size ({image_size}) or None, got {max_size!r}")
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": image_size, "longest_edge": max_size if max_size is not None else UNCAPPED_LONGEST_EDGE},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_pad=True,
    )
    return GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


def class_prompt(classes: Sequence[str]) -> str:
    """The prompt of a list of class names, joined as transformers' ``GroundingDinoProcessor`` joins a list of
    candidate labels: each stripped and lower-cased, ``". "`` between them and ``"."`` at the end
    (``["cat", "Traffic light"]`` -> ``"cat. traffic light."``).

    A name that is empty, not text, repeated, or contains "." or "?" (which would end its phrase early) is a
    ``ValueError``.
    """
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise TypeError(f"classes must be a list of class names, got {type(classes).__name__}")
    if len(classes) == 0:
        raise ValueError("classes is empty: give at least one class name")
    names, seen = [], {}
    for index, name in enumerate(classes):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"classes[{index}] is empty ({name!r}): every class needs a name")
        if any(d in name for d in PHRASE_DELIMITERS):
            raise ValueError(f"classes[{index}] = {name!r} contains '.' or '?', which end a phrase of the prompt")
        clean = name.strip().lower()
        if clean in seen:
            raise ValueError(f"classes[{index}] = {name!r} repeats classes[{seen[clean]}]")
        seen[clean] = index
        names.append(clean)
    return ". ".join(names) + "."


def _class_token_map(tokenizer: Any, prompt: str, classes: Sequence[str], length: int) -> torch.Tensor:
    """(C, length) float: row c is 1 on the tokens of class c in ``prompt`` (found by character offsets)."""
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    token_map = torch.zeros(len(classes), length)
    cursor = 0
    for row, name in enumerate(classes):
        clean = name.strip().lower()
        start = prompt.index(clean, cursor)
        end = cursor = start + len(clean)
        tokens = [t for t, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end and t < length]
        if not tokens:
            raise ValueError(f"class {name!r} gives no token of the prompt {prompt!r} the model sees")
        token_map[row, tokens] = 1.0
    return token_map


# --------------------------------------------------------------------------------------------- the detector
def _as_pil(image: Any, index: int) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or a uint8 (3, H, W) tensor (transformers' ``load_image`` for
    the first two: EXIF orientation applied, ``convert("RGB")``, as the pipeline reads them)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {index}: no such file: {path}")
        return load_image(str(path))
    if isinstance(image, Image.Image):
        return load_image(image)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"image {index}: a tensor must be uint8 of shape (3, H, W), got {image.dtype} {tuple(image.shape)}"
            )
        return to_pil_image(image.detach().cpu())
    raise TypeError(f"image {index}: expected a file path, a PIL image or a uint8 (3, H, W) tensor, got {type(image).__name__}")


def _check_threshold(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class GroundingDetector:
    """Grounding DINO's whole per-image computation, from images and a prompt to boxes in the images' pixels.

    Args:
        model: transformers' ``GroundingDinoForObjectDetection`` or a model of the same family with the same
            inputs and outputs (``MMGroundingDinoForObjectDetection``); put in eval mode here.
        processor: its ``GroundingDinoProcessor`` (``build_processor`` makes one with the training resize).

    ``detector(images, text=... | classes=...)`` returns one record per image (a list for a list of images,
    a single record for one image); see ``__call__``.
    """

    def __init__(self, model: torch.nn.Module, processor: GroundingDinoProcessor):
        self.model = model.eval()
        self.processor = processor
        #: the text encoder's output per prompt, computed once for the images and calls that share a prompt
        self.text_features = TextFeatureCache()

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        image_size: int | None = None,
        max_size: int | None = None,
        device: str | torch.device | None = None,
    ) -> "GroundingDetector":
        """The detector of an ``ImageGroundingModule`` Lightning checkpoint (e.g. ``RUN/checkpoints/last.ckpt``).

        The model and tokenizer are rebuilt as the checkpoint's hyper-parameters describe (``model``,
        ``model_config``, through ``build_grounding_dino``, as the module builds them; a hub id as ``model``
        is read from the hub or its cache), then the ``detector.*`` weights are loaded strictly.
        image_size, max_size: the resize; each by default the checkpoint's DataModule setting
        (``datamodule_hyper_parameters``), else 800 / 1333.
        Reading is safe (``read_checkpoint``): no arbitrary object is unpickled.
        """
        checkpoint = read_checkpoint(path)
        hparams = module_hyper_parameters(checkpoint, path)
        name = hparams.get("model", "tiny")
        model_config = hparams.get("model_config")
        if not isinstance(name, str) or (model_config is not None and not isinstance(model_config, dict)):
            raise CheckpointError(f"{path}: hyper-parameters model={name!r}, model_config={model_config!r} do not describe a detector")
        model, tokenizer = build_grounding_dino(name, model_config)
        weights = detector_state_dict(checkpoint)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: the detector.* weights do not fit the model its hyper-parameters build "
                f"(model={name!r}): missing {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {sorted(unexpected)[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        trained_size, trained_max = checkpoint_image_size(checkpoint)
        processor = build_processor(
            tokenizer,
            image_size if image_size is not None else trained_size,
            max_size if max_size is not None else trained_max,
        )
        detector = cls(model, processor)
        return detector.to(device) if device is not None else detector

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device | None = None) -> "GroundingDetector":
        """A hub id (``IDEA-Research/grounding-dino-tiny``) or a folder written by ``save_pretrained`` /
        ``grounding-export``, read with ``AutoModelForZeroShotObjectDetection`` and ``AutoProcessor``."""
        model = AutoModelForZeroShotObjectDetection.from_pretrained(str(name_or_path))
        processor = AutoProcessor.from_pretrained(str(name_or_path))
        detector = cls(model, processor)
        return detector.to(device) if device is not None else detector

    def to(self, device: str | torch.device) -> "GroundingDetector":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_parameters(self) -> int:
        """Number of parameters of the model."""
        return sum(p.numel() for p in self.model.parameters())

    # ----------------------------------------------------------------------------------------- detection
    def __call__(
        self,
        images: Any,
        text: str | None = None,
        classes: Sequence[str] | None = None,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        top_k: int | None = None,
        every_class: bool = False,
    ) -> dict | list[dict]:
        """Detect what ``text`` or ``classes`` names in one image or a list of images.

        images: a file path, a PIL image or a uint8 (3, H, W) tensor, or a list of them (any sizes: the
            processor pads the batch at the bottom and right; the Swin backbone sees that padding, so an
            image's detections in a batch of larger images differ slightly from its detections alone, as
            with transformers' own model).
        text: a free prompt, ``"the dog on the left . a red ball"``; its phrases and every box's label are
            found by transformers' ``post_process_grounded_object_detection`` (the tokens whose probability
            exceeds ``text_threshold``, decoded).
        classes: class names, ``["cat", "dog", "traffic light"]``, joined by ``class_prompt`` into
            ``"cat. dog. traffic light."``; a box's label is the class (as given) whose tokens have the highest
            mean probability for it (docs/image.md (I-12), the project's evaluation scoring).
        box_threshold: keep the boxes whose best token probability exceeds it (transformers' ``threshold``).
        text_threshold: token probability for a token to be part of a ``text`` label (unused with ``classes``).
        top_k: keep at most the k best boxes of each image after the threshold.
        every_class: with ``classes``, score every (box, class) pair by the mean probability of the class's
            tokens and keep the pairs above ``box_threshold`` (a box may then come out once per class), as the
            project's COCO evaluation scores detections (``ImageGroundingModule.detect``); by default each box
            comes out once, scored by transformers' post-processing and labelled with its best class.

        Returns per image ``{"boxes": [[x0, y0, x1, y1], ...]`` in the image's pixels, ``"scores": [...]``,
        ``"labels": [...]``, ``"width": W, "height": H}``, best score first, plain Python values.
        """
        single = not isinstance(images, (list, tuple))
        batch = [_as_pil(image, i) for i, image in enumerate([images] if single else images)]
        if not batch:
            raise ValueError("no image given")
        box_threshold = _check_threshold("box_threshold", box_threshold)
        text_threshold = _check_threshold("text_threshold", text_threshold)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
        if (text is None) == (classes is None):
            raise ValueError("give either text (a prompt) or classes (a list of class names), not both or neither")
        if every_class and classes is None:
            raise ValueError("every_class scores the boxes of each class of classes; a free text has no classes")
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text is empty ({text!r}): give a prompt such as 'a red ball . the dog on the left'")
            prompt = text
        else:
            prompt = class_prompt(classes)

        inputs = self.processor(images=batch, text=prompt, return_tensors="pt")
        count = len(batch)
        for key in ("input_ids", "attention_mask", "token_type_ids"):  # one prompt for every image
            if key in inputs:
                inputs[key] = inputs[key].expand(count, -1)
        config = self.model.config
        length = inputs["input_ids"].shape[1]
        if length > config.max_text_len:
            raise ValueError(f"the prompt has {length} tokens, more than the model's max_text_len={config.max_text_len}: {prompt!r}")
        height, width = inputs["pixel_values"].shape[-2:]
        if getattr(config, "two_stage", False) and encoder_token_count(config, height, width) < config.num_queries:
            raise ValueError(
                f"a {width}x{height} px input gives fewer encoder tokens than the model's num_queries={config.num_queries};"
                " use larger images or a larger image_size"
            )
        dtype = next(self.model.parameters()).dtype
        on_cpu = (inputs["input_ids"], inputs.get("token_type_ids"))  # the text rows' keys, read without the device
        inputs = {
            key: value.to(self.device, dtype=dtype) if key == "pixel_values" else value.to(self.device)
            for key, value in inputs.items()
        }
        with torch.no_grad(), cached_text_features(self.model, self.text_features, *on_cpu):
            outputs = self.model(**inputs)
        sizes = [(image.height, image.width) for image in batch]
        if classes is None:  # the phrases of a free text: transformers' post-processing decodes them
            results = self.processor.post_process_grounded_object_detection(
                outputs, input_ids=inputs["input_ids"], threshold=box_threshold, text_threshold=text_threshold,
                target_sizes=sizes)
        else:  # its boxes and scores by its own arithmetic, without decoding phrases the class labels replace
            results = kept_boxes(outputs, box_threshold, sizes)
        if classes is not None:
            token_map = _class_token_map(self.processor.tokenizer, prompt, classes, outputs.logits.shape[-1]).to(self.device)
            weights = token_map / token_map.sum(-1, keepdim=True)
        records = []
        for index, (result, (image_height, image_width)) in enumerate(zip(results, sizes)):
            if every_class:
                records.append(self._every_class(outputs, index, weights, classes, box_threshold, top_k, image_width, image_height))
                continue
            scores = result["scores"].float().cpu()
            boxes = result["boxes"].float().cpu()
            if classes is not None:  # the kept queries' token probabilities, in the order of their boxes
                class_scores = outputs.logits[index][result["kept"]].float().sigmoid() @ weights.t()  # (kept, C): class means
                labels = [classes[c] for c in class_scores.argmax(-1).tolist()]
            else:
                labels = list(result["text_labels"])
            order = torch.argsort(scores, descending=True, stable=True)
            if top_k is not None:
                order = order[:top_k]
            records.append({
                "boxes": boxes[order].tolist(),
                "scores": scores[order].tolist(),
                "labels": [labels[i] for i in order.tolist()],
                "width": image_width,
                "height": image_height,
            })
        return records[0] if single else records

    @staticmethod
    def _every_class(outputs: Any, index: int, weights: torch.Tensor, classes: Sequence[str], box_threshold: float,
                     top_k: int | None, width: int, height: int) -> dict:
        """One image's (box, class) pairs scored by the mean probability of the class's tokens, best first."""
        scores = (outputs.logits[index].float().sigmoid() @ weights.t()).cpu()  # (Q, C)
        flat = scores.flatten()
        order = torch.argsort(flat, descending=True, stable=True)
        order = order[flat[order] > box_threshold]
        if top_k is not None:
            order = order[:top_k]
        count = len(classes)
        boxes = box_convert(outputs.pred_boxes[index].float().cpu(), "cxcywh", "xyxy")
        boxes = boxes * torch.tensor([width, height, width, height], dtype=torch.float32)
        return {
            "boxes": boxes[order // count].tolist(),
            "scores": flat[order].tolist(),
            "labels": [classes[c] for c in (order % count).tolist()],
            "width": width,
            "height": height,
        }

    # ----------------------------------------------------------------------------------------- export
    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the model (safetensors + config) and the processor (tokenizer + image processor config) into
        ``folder``, which transformers then loads by itself (``from_pretrained``, the pipeline).

        Written atomically: everything goes into a temporary folder beside ``folder``, which is renamed into
        place at the end, so ``folder`` is never left half-written. An existing non-empty ``folder`` is an
        error unless ``overwrite`` (it is then replaced as a whole). Returns the folder.
        """
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise FileExistsError(f"{folder} exists and is not empty (overwrite=True, or --overwrite, replaces it)")
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
        previous = None
        try:
            self.model.save_pretrained(temporary)
            self.processor.save_pretrained(temporary)
            if folder.is_dir():
                if any(folder.iterdir()):
                    if not overwrite:
                        raise FileExistsError(f"{folder} exists and is not empty (overwrite=True, or --overwrite, replaces it)")
                    previous = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
                    os.rmdir(previous)
                    os.replace(folder, previous)
                else:
                    os.rmdir(folder)
            try:
                os.replace(temporary, folder)
            except BaseException:
                if previous is not None:
                    os.replace(previous, folder)
                    previous = None
                raise
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return folder
