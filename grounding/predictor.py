"""Every method on one's own images from Python: load, call, draw.

    from grounding.predictor import Predictor

    predictor = Predictor.load("RUN/checkpoints/last.ckpt")     # or a run folder, a config, a detector hub id
    records = predictor(["photo.jpg"], classes=["red circle", "blue square"])
    predictor.draw(records[0]).save("drawn.png")

``Predictor.load(source, **settings)`` takes

- a Lightning checkpoint (``.ckpt``) of any of the project's methods: the module is rebuilt from the
  checkpoint's saved settings and its weights loaded; the file is read without unpickling anything but
  tensors, plain values and the project's own settings classes (``grounding.checkpoints``);
- a run folder (``config.yaml`` and ``checkpoints/last.ckpt``, what ``grounding-train`` writes);
- a config (a YAML file, or a config shipped with the package such as ``"gem/synthetic.yaml"``): its
  ``model`` section, ``settings`` overriding its ``init_args`` (``backbone="openai/clip-vit-base-patch16"``);
- a hub id or a transformers folder of a Grounding-DINO-family detector (``"IDEA-Research/grounding-dino-tiny"``,
  a ``grounding-export`` folder);
- a method's name (``detector``, ``gem``, ``invseg``, ``maskinversion``, ``mimic``): its LightningModule with
  its defaults and ``settings``, e.g. ``Predictor.load("gem", backbone="openai/clip-vit-base-patch16")``.

``predictor(images, classes=..., text=..., masks=..., boxes=...)`` returns one record per image, the records
``grounding-predict`` writes (``grounding.lightning.prediction_writer``) with tensors where it writes files:

- detector: ``{"image_id", "path", "boxes": [[x0, y0, x1, y1], ...], "scores", "labels", "width", "height"}``
  (``GroundingDetector``'s record; thresholds ``box_threshold``, ``text_threshold``, ``top_k``; ``every_class``
  scores every (box, class) pair as the COCO evaluation does);
- GEM, InvSeg: ``{"image_id", "path", "classes", "label_map": (H, W) long}`` and, for GEM, ``"heatmaps":
  {class: (H, W) float in [0, 1]}`` (each prompted class's similarity map, min-max scaled). A class named
  ``background`` is the background class (GEM's threshold rule, InvSeg's prompt);
- MaskInversion: ``masks`` (per image an (R, H, W) bool tensor, a label PNG path, or ``{region id: (H, W)}``)
  or ``boxes`` (per image a list of ``[x0, y0, x1, y1]`` in pixels) name the regions; the record is
  ``{"image_id", "path", "regions": [{"region_id", "box", "area"[, "label", "score"]}], "embeddings": (R, P),
  "maps": (R, H, W)}``: the localized embeddings and their explainability maps after the inversion; with
  ``classes`` each region also gets its best-matching class (cosine with the module's template);
- MIMIC: no images; ``classes`` are the target texts, ``text`` the prompt (default "What is in the image?"):
  per target ``{"target_id", "prompt", "target", "answers", ..., "images": [(3, S, S) uint8, ...]}``.

``images``: a path, a PIL image, a uint8 (3, H, W) tensor, or a list of them; an image's id is its file stem
(``image<i>`` for an image given as pixels). ``predictor.draw(record, image=None)`` gives the picture
``grounding-predict`` writes (a PIL image): the boxes, the label map with its legend, the regions' maps, or
MIMIC's images side by side. ``json_record(record)`` is the record with its tensors left out (JSON-ready).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from PIL import Image

from grounding.constants import IGNORE_INDEX
from grounding.data.images import image_tensor, read_rgb_image
from grounding.utils import merge_nested

#: the methods, by the class name of their LightningModule
METHODS = {
    "ImageGroundingModule": "detector",
    "GEMSegmentationModule": "gem",
    "InvSegModule": "invseg",
    "MaskInversionModule": "maskinversion",
    "MimicModule": "mimic",
}
#: each method's LightningModule (``Predictor.load("gem", backbone=...)`` builds it from its defaults)
METHOD_CLASSES = {
    "detector": "grounding.lightning.image_module.ImageGroundingModule",
    "gem": "grounding.lightning.gem_module.GEMSegmentationModule",
    "invseg": "grounding.lightning.invseg_module.InvSegModule",
    "maskinversion": "grounding.lightning.maskinversion_module.MaskInversionModule",
    "mimic": "grounding.lightning.mimic_module.MimicModule",
}


# ------------------------------------------------------------------------------------------------- inputs
def as_samples(images: Any) -> list[dict]:
    """``{"image_id", "image": uint8 (3, H, W), "path"}`` of a path, PIL image or tensor, or of a list of them."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("no image given")
    samples, seen = [], set()
    for index, item in enumerate(items):
        if isinstance(item, (str, Path)):
            path = Path(item)
            image, image_id, where = image_tensor(read_rgb_image(path)), path.stem, str(path)
        elif isinstance(item, Image.Image):
            image, image_id, where = image_tensor(item.convert("RGB")), f"image{index}", None
        elif isinstance(item, torch.Tensor):
            if item.dtype != torch.uint8 or item.ndim != 3 or item.shape[0] != 3:
                raise ValueError(f"image {index}: a tensor must be uint8 (3, H, W), got {item.dtype} {tuple(item.shape)}")
            image, image_id, where = item, f"image{index}", None
        else:
            raise TypeError(f"image {index}: expected a path, a PIL image or a uint8 (3, H, W) tensor, got {type(item).__name__}")
        if image_id in seen:
            raise ValueError(f"image {index}: the id {image_id!r} is taken by an earlier image (two files with one name)")
        seen.add(image_id)
        samples.append({"image_id": image_id, "image": image, "path": where})
    return samples


def background_index(classes: Sequence[str]) -> int | None:
    """The index of a class named "background" (any case), else None."""
    names = [name.lower() for name in classes]
    return names.index("background") if "background" in names else None


# ------------------------------------------------------------------------------------------------- records
def segmentation_records(outputs: dict, samples: Sequence[dict], classes: Sequence[str]) -> list[dict]:
    """The in-memory records of a GEM / InvSeg ``predict_step`` output ``{"image_ids", "label_maps"[, "heatmaps"]}``."""
    by_id = {str(sample["image_id"]): sample for sample in samples}
    heatmaps = outputs.get("heatmaps") or [None] * len(outputs["image_ids"])
    records = []
    for image_id, labels, maps in zip(outputs["image_ids"], outputs["label_maps"], heatmaps):
        sample = by_id[str(image_id)]
        record = {"image_id": str(image_id), "path": sample.get("path"), "classes": list(classes), "label_map": labels.cpu()}
        if maps is not None:
            record["heatmaps"] = {}
            for name, heat in zip(maps["classes"], maps["maps"]):
                heat = heat.float().cpu()
                record["heatmaps"][name] = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-8)
        records.append(record)
    return records


def json_record(record: dict) -> dict:
    """``record`` without its tensors (label maps, heatmaps, embeddings, maps, images): plain JSON values."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if not isinstance(v, torch.Tensor)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value if not isinstance(v, torch.Tensor)]
        return value

    return {key: plain(value) for key, value in record.items() if not isinstance(value, torch.Tensor)
            and not (key in ("heatmaps", "images") and value and _holds_tensors(value))}


def _holds_tensors(value: Any) -> bool:
    values = value.values() if isinstance(value, dict) else value
    return any(isinstance(v, torch.Tensor) for v in values)


def _image_of(record: dict, image: Any) -> torch.Tensor:
    if image is None:
        if not record.get("path"):
            raise ValueError(f"record {record.get('image_id')!r} has no path: give the image to draw on")
        image = record["path"]
    return as_samples(image)[0]["image"]


def draw_record(record: dict, image: Any = None) -> torch.Tensor:
    """The picture of a record (see the module docstring) as uint8 (3, H, W)."""
    from grounding.visualize import PRED_COLOR, draw_boxes, labelled_overlay, overlay_heatmap, panel_row

    if "images" in record:  # MIMIC: its images side by side
        pictures = [image if isinstance(image, torch.Tensor) else as_samples(image)[0]["image"] for image in record["images"]]
        return panel_row(pictures, [record.get("target", "")] + [""] * (len(pictures) - 1))
    picture = _image_of(record, image)
    if "boxes" in record:
        labels = [f"{label} {score:.2f}" for label, score in zip(record["labels"], record["scores"])]
        return draw_boxes(picture, torch.tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4), labels, PRED_COLOR)
    if "label_map" in record:
        labels = record["label_map"]
        if not isinstance(labels, torch.Tensor):
            raise ValueError("draw_record draws an in-memory record (its label_map a tensor), not a written one")
        return labelled_overlay(picture, labels, record["classes"])
    if "regions" in record:
        maps = record.get("maps")
        if not isinstance(maps, torch.Tensor):
            raise ValueError("draw_record draws an in-memory record (its maps a tensor), not a written one")
        titles = [f"{region['region_id']}: {region['label']} {region['score']:.2f}" if "label" in region else str(region["region_id"])
                  for region in record["regions"]]
        panels = [overlay_heatmap(picture, heat.float()) for heat in maps]
        return panel_row(panels or [picture], titles or ["no region"])
    raise ValueError(f"cannot draw a record with keys {sorted(record)}")


# ------------------------------------------------------------------------------------------------- loading
def _read_yaml(path: str | Path) -> dict:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"config {path} cannot be read: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"config {path} has no model section (model: {{class_path: ..., init_args: ...}})")
    return config


def build_module(class_path: str, init_args: dict, where: str) -> Any:
    """The LightningModule ``class_path`` built from ``init_args`` as the command line builds it (jsonargparse:
    nested settings groups, types checked)."""
    import lightning as L
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model", required=True)
    try:
        config = parser.parse_object({"model": {"class_path": class_path, "init_args": init_args}})
        return parser.instantiate_classes(config).model
    except Exception as error:  # noqa: BLE001 - jsonargparse wraps what the constructor raised
        raise ValueError(f"{where}: cannot build {class_path}: {error}") from None


def _class_of_settings(settings: dict, path: Path) -> str:
    """The method class whose constructor takes exactly the settings a checkpoint holds (a checkpoint of a module
    built in Python names no class)."""
    import importlib
    import inspect

    for class_path in METHOD_CLASSES.values():
        module_name, name = class_path.rsplit(".", 1)
        parameters = set(inspect.signature(getattr(importlib.import_module(module_name), name).__init__).parameters) - {"self"}
        if parameters == set(settings):
            return class_path
    raise ValueError(f"{path}: the checkpoint names no LightningModule class and its settings {sorted(settings)} are "
                     f"those of none of {', '.join(METHODS)}")


class Predictor:
    """A method ready to run on images (see the module docstring). ``method`` is ``detector``, ``gem``,
    ``invseg``, ``maskinversion`` or ``mimic``; ``module`` the LightningModule (None for a detector loaded from a
    transformers folder), ``detector`` the ``GroundingDetector`` of the detector."""

    def __init__(self, method: str, module: Any = None, detector: Any = None) -> None:
        if method not in METHODS.values():
            raise ValueError(f"method must be one of {sorted(set(METHODS.values()))}, got {method!r}")
        self.method, self.module, self.detector = method, module, detector

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, source: str | Path, device: str | torch.device | None = None, **settings: Any) -> "Predictor":
        """A predictor from a checkpoint, a run folder, a config or a detector hub id / folder (module docstring)."""
        from grounding.cli import find_config

        text = str(source)
        path = Path(text).expanduser()
        if text in METHOD_CLASSES and not path.exists():
            predictor = cls.from_module(build_module(METHOD_CLASSES[text], settings, f"method {text}"))
        elif path.is_dir() and (path / "config.yaml").is_file() and (path / "checkpoints" / "last.ckpt").is_file():
            predictor = cls._from_checkpoint(path / "checkpoints" / "last.ckpt", settings)
        elif path.suffix == ".ckpt":
            if not path.is_file():
                raise ValueError(f"{text}: no such file")
            predictor = cls._from_checkpoint(path, settings)
        elif path.suffix in (".yaml", ".yml") and Path(find_config(text)).is_file():
            predictor = cls._from_config(Path(find_config(text)), settings)
        elif path.is_dir() and (path / "config.json").is_file() or (not path.exists() and text.count("/") == 1 and path.suffix == ""):
            if settings:
                raise ValueError(f"{text}: a transformers detector takes no settings, got {sorted(settings)}")
            from grounding.models.detector import GroundingDetector

            predictor = cls("detector", detector=GroundingDetector.from_pretrained(text))
        else:
            raise ValueError(f"{text}: not a checkpoint (.ckpt), a run folder (config.yaml and checkpoints/last.ckpt), "
                             "a config (.yaml) nor a detector's hub id or transformers folder")
        return predictor.to(device) if device is not None else predictor

    @classmethod
    def from_module(cls, module: Any, data: dict | None = None) -> "Predictor":
        """The predictor of a method's LightningModule built in Python; ``data``: the detector's resize
        (``image_size``, ``max_size``; default 800 / 1333)."""
        method = METHODS.get(type(module).__name__)
        if method is None:
            raise ValueError(f"{type(module).__name__} is not one of the methods a Predictor runs ({', '.join(METHODS)})")
        if method != "detector":
            return cls(method, module=module.eval())
        from grounding.models.detector import DEFAULT_IMAGE_SIZE, DEFAULT_MAX_SIZE, GroundingDetector, build_processor

        data = data or {}
        processor = build_processor(module.tokenizer, data.get("image_size") or DEFAULT_IMAGE_SIZE, data.get("max_size", DEFAULT_MAX_SIZE))
        return cls("detector", module=module.eval(), detector=GroundingDetector(module.detector, processor))

    @classmethod
    def _from_config(cls, path: Path, settings: dict) -> "Predictor":
        config = _read_yaml(path)
        model = config["model"]
        if "class_path" not in model:
            raise ValueError(f"config {path}: the model section names no class_path")
        seed = config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool):  # the random tiny models, as the command line builds them
            from lightning.fabric.utilities.seed import seed_everything

            seed_everything(seed, verbose=False)
        module = build_module(model["class_path"], merge_nested(model.get("init_args") or {}, settings), f"config {path}")
        data = config.get("data") or {}
        return cls.from_module(module, data.get("init_args", data) if isinstance(data, dict) else {})

    @classmethod
    def _from_checkpoint(cls, path: Path, settings: dict) -> "Predictor":
        from grounding.lightning.test_time import plain_settings
        from grounding.models.detector import CheckpointError, GroundingDetector, read_checkpoint

        checkpoint = read_checkpoint(path)
        hparams = checkpoint.get("hyper_parameters")
        hparams = dict(hparams) if isinstance(hparams, dict) else {}
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: the checkpoint holds no state_dict")
        class_path = hparams.get("_class_path")
        if class_path is None and any(key.startswith("detector.") for key in state) or str(class_path).endswith(".ImageGroundingModule"):
            if settings:
                raise ValueError(f"{path}: a detector checkpoint takes no settings, got {sorted(settings)}")
            return cls("detector", detector=GroundingDetector.from_checkpoint(path))
        init_args = {k: v for k, v in hparams.items() if not k.startswith("_")}
        if not isinstance(class_path, str):  # saved from a module built in Python: known by its settings' names
            class_path = _class_of_settings(init_args, path)
        module = build_module(class_path, merge_nested(plain_settings(init_args), settings), f"checkpoint {path}")
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: its weights do not fit the {class_path.rsplit('.', 1)[-1]} its settings build: "
                                  f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        return cls.from_module(module)

    def to(self, device: str | torch.device) -> "Predictor":
        for part in (self.module, self.detector):
            if part is not None:
                part.to(device)
        return self

    @property
    def device(self) -> torch.device:
        owner = self.detector if self.detector is not None else self.module
        return owner.device

    # ----------------------------------------------------------------------------------------- running
    def __call__(
        self,
        images: Any = None,
        classes: Sequence[str] | str | None = None,
        text: str | None = None,
        masks: Any = None,
        boxes: Any = None,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        top_k: int | None = None,
        every_class: bool = False,
    ) -> list[dict]:
        """One record per image (per target for MIMIC); see the module docstring."""
        from grounding.data.image_folder import parse_classes

        names = parse_classes(classes)
        if self.method == "mimic":
            return self._synthesize(names, text, images)
        samples = as_samples(images)
        if self.method == "detector":
            if (names is None) == (text is None):
                raise ValueError("give the detector either classes or text (a prompt), not both or neither")
            records = []
            for sample in samples:  # one image at a time, as grounding-predict's default batch size
                record = self.detector(sample["image"], text=text, classes=names, box_threshold=box_threshold,
                                       text_threshold=text_threshold, top_k=top_k, every_class=every_class)
                records.append({"image_id": sample["image_id"], "path": sample["path"], **record})
            return records
        if text is not None:
            raise ValueError(f"text is the detector's free prompt; {self.method} takes classes")
        if self.method == "maskinversion":
            from grounding.data.user_masks import region_masks

            if (masks is None) == (boxes is None):
                raise ValueError("give MaskInversion the regions: masks or boxes (one entry per image), not both or neither")
            given = masks if masks is not None else boxes
            entries = list(given) if isinstance(given, (list, tuple)) and len(samples) > 1 else [given]
            if len(entries) != len(samples):
                raise ValueError(f"{len(samples)} images but {len(entries)} entries of {'masks' if masks is not None else 'boxes'}")
            for sample, entry in zip(samples, entries):
                height, width = sample["image"].shape[-2:]
                sample["region_ids"], sample["masks"] = region_masks(entry, height, width, sample["image_id"], boxes=boxes is not None)
            return self.module.describe_regions(samples, names)
        if names is None:
            raise ValueError(f"{self.method} segments the classes given: pass classes=[...]")
        self.module.set_classes(names, background_index(names), IGNORE_INDEX)
        outputs = self.module.process(samples, score=False)
        return segmentation_records(outputs, samples, names)

    def _synthesize(self, targets: list[str] | None, prompt: str | None, images: Any) -> list[dict]:
        from grounding.data.concepts import DEFAULT_PROMPT, target_id

        if images is not None:
            raise ValueError("MIMIC synthesizes images from target texts; it takes no images")
        if not targets:
            raise ValueError("give MIMIC its target texts: classes=['a red circle', ...]")
        prompt = " ".join((prompt or DEFAULT_PROMPT).split())
        records = []
        for target in targets:
            sample = {"target_id": target_id(target), "prompt": prompt, "target": target, "references": None,
                      "verifier_class": None}
            out = self.module.synthesize_target(sample)
            records.append({**out["record"], "images": out["images"]})
        return records

    def draw(self, record: dict, image: Any = None) -> Image.Image:
        """The picture of ``record`` over ``image`` (default: the file at ``record["path"]``) as a PIL image."""
        picture = draw_record(record, image)
        return Image.fromarray(picture.permute(1, 2, 0).numpy(), mode="RGB")
