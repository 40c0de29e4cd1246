"""Writing the dataset: one split (images, label PNGs, COCO annotations, refs), the whole layout
and meta.json, and the entry points :func:`generate`, :func:`ensure_synthetic` and
:func:`prepare_synthetic` (plus :func:`load_meta` / :func:`check_meta`)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from grounding.data.label_maps import voc_palette

from .config import (
    GENERATOR_VERSION,
    SPLITS,
    SyntheticConfig,
    category_names,
    coco_categories,
    image_file_name,
    images_dir,
    instances_path,
    phrasecut_dir,
    refcoco_dir,
    referring_vocabulary,
    refs_json_path,
    semantic_dir,
)
from .geometry import mask_bbox, mask_to_uncompressed_rle
from .referring import choose_sentences, describe_object, phrasecut_tasks
from .scene import SceneObject, render_image, sample_scene
from .semantic import semantic_label_map


# --------------------------------------------------------------------------------------------
# one split
# --------------------------------------------------------------------------------------------


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Return the generator of image ``index`` of ``split``: independent of every other split
    and of the split sizes (sub-seed from seed, crc32 of the split name and the index)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(zlib.crc32(split.encode()), index)))


def _annotation(ann_id: int, image_id: int, obj: SceneObject) -> dict[str, Any]:
    """Return the COCO annotation of one object (visible box/area; polygon unless occluded)."""
    occluded = bool((obj.mask & ~obj.visible).any())
    segmentation: Any
    if occluded:
        segmentation = mask_to_uncompressed_rle(obj.visible)
    else:
        segmentation = [[float(v) for v in obj.polygon.reshape(-1).tolist()]]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj.category_id,
        "bbox": mask_bbox(obj.visible),
        "area": float(np.count_nonzero(obj.visible)),
        "iscrowd": 0,
        "segmentation": segmentation,
    }


@dataclass
class _Counters:
    """Next free ids, shared over the splits so that ids are unique across them."""

    image_id: int = 1
    ann_id: int = 1
    ref_id: int = 1
    sent_id: int = 1


def _write_split(
    root: Path, split: str, config: SyntheticConfig, counters: _Counters
) -> tuple[list[dict], list[dict], list[dict]]:
    """Render and write the images and label PNGs of one split.

    Returns (COCO images, COCO annotations, refs) of the split and advances ``counters``.
    """
    names = category_names(config)
    images_dir(root, split).mkdir(parents=True, exist_ok=True)
    semantic_dir(root, split).mkdir(parents=True, exist_ok=True)
    palette = voc_palette().ravel().tolist()
    images, annotations, refs = [], [], []
    for index in range(config.split_size(split)):
        rng = image_rng(config.seed, split, index)
        scene = sample_scene(rng, config)
        pixels = render_image(rng, scene, config.image_size)
        image_id = counters.image_id
        counters.image_id += 1
        file_name = image_file_name(image_id, config.image_format)
        picture = Image.fromarray(pixels)
        if config.image_format == "jpg":
            picture.save(images_dir(root, split) / file_name, quality=config.jpeg_quality, subsampling=0)
        else:
            picture.save(images_dir(root, split) / file_name)
        label_png = Image.fromarray(semantic_label_map(scene, config.image_size, config.semantic_border_px))
        label_png.putpalette(palette)
        label_png.save(semantic_dir(root, split) / f"{image_id:06d}.png")
        images.append({"id": image_id, "file_name": file_name,
                       "width": config.image_size, "height": config.image_size})
        image_anns = []
        for obj in scene:
            image_anns.append(_annotation(counters.ann_id, image_id, obj))
            counters.ann_id += 1
        annotations += image_anns
        bboxes = [a["bbox"] for a in image_anns]
        areas = [a["area"] for a in image_anns]
        category_ids = [a["category_id"] for a in image_anns]
        for obj_index, ann in enumerate(image_anns):
            candidates = describe_object(obj_index, bboxes, areas, category_ids, names, config.image_size)
            sentences = []
            for sent in choose_sentences(rng, candidates, config.max_sentences):
                sentences.append({"sent_id": counters.sent_id, "sent": sent,
                                  "raw": sent[0].upper() + sent[1:], "tokens": sent.split(" ")})
                counters.sent_id += 1
            refs.append({
                "ref_id": counters.ref_id, "ann_id": ann["id"], "image_id": image_id,
                "category_id": ann["category_id"], "split": split,
                "file_name": f"{split}/{file_name}",
                "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
            })
            counters.ref_id += 1
    return images, annotations, refs


def _coco_document(config: SyntheticConfig, images: list, annotations: list, description: str) -> dict:
    """Return a COCO instances document (fixed info, no timestamps, so files are reproducible)."""
    return {
        "info": {"description": description, "version": str(GENERATOR_VERSION),
                 "contributor": "grounding.data.synthetic", "year": 2024,
                 "date_created": "synthetic", "seed": config.seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(config),
    }


def _write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as compact, key-order-preserving JSON (byte-reproducible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, separators=(",", ":")) + "\n", encoding="utf-8")


def _write_dataset(root: Path, config: SyntheticConfig) -> dict[str, Any]:
    """Write the whole dataset into ``root`` (meta.json last); returns the meta dict."""
    counters = _Counters()
    all_images, all_annotations, all_refs = [], [], []
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        images, annotations, refs = _write_split(root, split, config, counters)
        _write_json(instances_path(root, split),
                    _coco_document(config, images, annotations, f"synthetic shapes, {split} split"))
        _write_json(refs_json_path(root, split), refs)
        _write_json(phrasecut_dir(root) / f"refer_{split}.json", phrasecut_tasks(annotations, refs))
        _write_json(phrasecut_dir(root) / f"image_data_{split}.json",
                    [{"image_id": i["id"], "width": i["width"], "height": i["height"]} for i in images])
        all_images += [{**image, "file_name": f"{split}/{image['file_name']}"} for image in images]
        all_annotations += annotations
        all_refs += refs
        counts[split] = {"images": len(images), "annotations": len(annotations), "refs": len(refs),
                         "sentences": sum(len(r["sentences"]) for r in refs)}
    _write_json(refcoco_dir(root) / "instances.json",
                _coco_document(config, all_images, all_annotations, "synthetic shapes, all splits"))
    with open(refcoco_dir(root) / "refs(synthetic).p", "wb") as handle:
        pickle.dump(all_refs, handle, protocol=4)
    classes = ["background", *category_names(config)]
    (root / "semantic" / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    meta = {
        "generator": "grounding.data.synthetic",
        "version": GENERATOR_VERSION,
        "config": config.to_dict(),
        "categories": category_names(config),
        "vocabulary": referring_vocabulary(config),
        "counts": counts,
    }
    _write_json(root / "meta.json", meta)
    return meta


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------


def generate(out_dir: str | Path, config: SyntheticConfig | None = None, *, overwrite: bool = False) -> Path:
    """Generate the dataset into ``out_dir`` and return it as a Path.

    The data is written into a temporary sibling folder that is renamed to ``out_dir`` at the end,
    so an interrupted run never leaves a folder that looks complete. An existing non-empty
    ``out_dir`` raises ValueError unless ``overwrite`` (then it is deleted first).
    """
    config = config or SyntheticConfig()
    target = Path(out_dir).resolve()
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise ValueError(f"{target} already exists and is not empty; pass overwrite=True (--force) to replace it")
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        _write_dataset(staging, config)
        if target.exists():
            target.rmdir()  # empty, checked above (a non-empty one means a concurrent writer won)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_meta(out_dir: str | Path) -> dict[str, Any]:
    """Return the parsed ``meta.json`` of a generated dataset."""
    return json.loads((Path(out_dir) / "meta.json").read_text(encoding="utf-8"))


def check_meta(out_dir: str | Path, config: SyntheticConfig) -> None:
    """Raise ValueError naming the folder and the first setting where the dataset at ``out_dir``
    differs from ``config`` (or when it was written by another generator version)."""
    folder = Path(out_dir)
    meta = load_meta(folder)
    if meta.get("version") != GENERATOR_VERSION:
        raise ValueError(
            f"synthetic dataset at {folder} has generator version {meta.get('version')!r}, "
            f"expected {GENERATOR_VERSION}; regenerate it (--force) or use another folder"
        )
    stored = meta.get("config", {})
    for key, wanted in config.to_dict().items():
        if stored.get(key) != wanted:
            raise ValueError(
                f"synthetic dataset at {folder} was generated with {key}={stored.get(key)!r} but "
                f"{key}={wanted!r} was requested; use another folder or regenerate it (--force)"
            )


def ensure_synthetic(out_dir: str | Path, config: SyntheticConfig | None = None) -> Path:
    """Return ``out_dir``, generating the dataset first if its ``meta.json`` is absent.

    An existing dataset is never overwritten: differing settings raise ValueError (see
    :func:`check_meta`), and a non-empty folder without ``meta.json`` raises ValueError too.
    """
    config = config or SyntheticConfig()
    folder = Path(out_dir).resolve()
    if (folder / "meta.json").exists():
        check_meta(folder, config)
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(
            f"{folder} exists but has no meta.json (an incomplete or foreign folder); "
            f"delete it or choose another folder"
        )
    try:
        return generate(folder, config)
    except (OSError, ValueError):
        # another process may have finished the same dataset first
        if (folder / "meta.json").exists():
            check_meta(folder, config)
            return folder
        raise


def prepare_synthetic(out_dir: str | Path, settings: dict[str, Any] | None = None) -> None:
    """What the DataModules do before loading: an existing dataset is used as it is when no generator
    ``settings`` were asked for (nothing could differ); otherwise ``ensure_synthetic`` with those settings."""
    if settings is None and (Path(out_dir) / "meta.json").exists():
        return
    ensure_synthetic(out_dir, SyntheticConfig(**(settings or {})))
