"""Tests of the synthetic coloured-shapes dataset generator (grounding.data.synthetic)."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from grounding.data import synthetic as syn  # noqa: E402

# pycocotools' decode triggers a numpy-2 DeprecationWarning inside pycocotools itself
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

REPO_ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val", "test")


def tiny_config(**overrides) -> syn.SyntheticConfig:
    """Default settings except tiny images and split sizes (so a generation takes well under 1 s)."""
    settings = dict(image_size=64, num_train=10, num_val=4, num_test=4)
    settings.update(overrides)
    return syn.SyntheticConfig(**settings)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, syn.SyntheticConfig]:
    """A generated dataset with default settings except size (64 px, 40/8/8 images)."""
    config = tiny_config(num_train=40, num_val=8, num_test=8)
    root = syn.generate(tmp_path_factory.mktemp("syn") / "data", config)
    return root, config


def read_pixels(path: Path) -> np.ndarray:
    """Return the decoded pixel array of an image file."""
    with Image.open(path) as image:
        return np.asarray(image).copy()


def load_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def decode_masks(coco: COCO, image_id: int) -> list[tuple[dict, np.ndarray]]:
    """Return (annotation, bool mask) pairs of one image in annotation (drawing) order."""
    anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: a["id"])
    return [(ann, coco.annToMask(ann).astype(bool)) for ann in anns]


def all_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------
# layout, determinism and split independence
# ------------------------------------------------------------------------------------------


def test_layout_files_exist(dataset):
    root, config = dataset
    ids = []
    for split in SPLITS:
        doc = load_json(root / "annotations" / f"instances_{split}.json")
        assert len(doc["images"]) == config.split_size(split)
        for image in doc["images"]:
            assert image["file_name"] == f"{image['id']:06d}.jpg"
            assert (root / "images" / split / image["file_name"]).is_file()
            assert (root / "semantic" / split / f"{image['id']:06d}.png").is_file()
            assert image["width"] == image["height"] == config.image_size
            ids.append(image["id"])
        assert (root / f"refs_{split}.json").is_file()
    assert ids == list(range(1, len(ids) + 1))
    assert (root / "refcoco" / "instances.json").is_file()
    assert (root / "refcoco" / "refs(synthetic).p").is_file()
    classes = (root / "semantic" / "classes.txt").read_text().splitlines()
    assert classes == ["background", "red circle", "red square", "red triangle",
                       "blue circle", "blue square", "blue triangle"]
    meta = load_json(root / "meta.json")
    assert meta["config"] == config.to_dict()
    assert meta["counts"]["train"]["images"] == config.num_train


def test_categories_are_colour_major_with_shape_supercategory(dataset):
    root, config = dataset
    categories = load_json(root / "annotations" / "instances_val.json")["categories"]
    assert [c["id"] for c in categories] == list(range(1, 7))
    assert [c["name"] for c in categories] == syn.category_names(config)
    assert [c["supercategory"] for c in categories] == ["circle", "square", "triangle"] * 2


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    config = tiny_config()
    first = syn.generate(tmp_path / "a", config)
    second = syn.generate(tmp_path / "b", config)
    files = all_files(first)
    assert files == all_files(second)
    for rel in files:
        if rel.suffix == ".jpg":
            assert np.array_equal(read_pixels(first / rel), read_pixels(second / rel)), rel
        else:
            assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    other = syn.generate(tmp_path / "c", tiny_config(seed=1))
    for rel in ("annotations/instances_train.json", "refs_val.json"):
        assert (first / rel).read_bytes() != (other / rel).read_bytes()
    assert not np.array_equal(read_pixels(first / "images/train/000001.jpg"),
                              read_pixels(other / "images/train/000001.jpg"))


def _content_without_ids(root: Path, split: str) -> list[tuple]:
    """Per image of a split: (pixels bytes, [(category, bbox, area, segmentation), ...])."""
    doc = load_json(root / "annotations" / f"instances_{split}.json")
    by_image = defaultdict(list)
    for ann in doc["annotations"]:
        by_image[ann["image_id"]].append(
            (ann["category_id"], ann["bbox"], ann["area"], json.dumps(ann["segmentation"])))
    return [(read_pixels(root / "images" / split / image["file_name"]).tobytes(), by_image[image["id"]])
            for image in doc["images"]]


def test_split_content_independent_of_other_split_sizes(tmp_path):
    big = syn.generate(tmp_path / "big", tiny_config(num_train=8, num_val=4, num_test=3))
    small = syn.generate(tmp_path / "small", tiny_config(num_train=3, num_val=4, num_test=5))
    assert _content_without_ids(big, "val") == _content_without_ids(small, "val")
    assert _content_without_ids(big, "train")[:3] == _content_without_ids(small, "train")
    assert _content_without_ids(big, "test") == _content_without_ids(small, "test")[:3]
    # the splits themselves differ from each other
    assert _content_without_ids(big, "val")[0] != _content_without_ids(big, "train")[0]


def test_ids_unique_across_splits(dataset):
    root, _ = dataset
    image_ids, ann_ids = [], []
    for split in SPLITS:
        doc = load_json(root / "annotations" / f"instances_{split}.json")
        image_ids += [image["id"] for image in doc["images"]]
        ann_ids += [ann["id"] for ann in doc["annotations"]]
    assert len(set(image_ids)) == len(image_ids)
    assert len(set(ann_ids)) == len(ann_ids)


# ------------------------------------------------------------------------------------------
# COCO annotations
# ------------------------------------------------------------------------------------------


def test_coco_bbox_and_area_match_decoded_masks(dataset):
    root, config = dataset
    checked = 0
    for split in SPLITS:
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        for ann in coco.loadAnns(coco.getAnnIds()):
            mask = coco.annToMask(ann)
            assert mask.shape == (config.image_size, config.image_size)
            rows, cols = np.nonzero(mask)
            decoded_box = [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            # the generator annotates the rasterised mask itself, so both are exact (the
            # requirement is 1 px / a small area tolerance)
            assert ann["bbox"] == [float(v) for v in decoded_box], (ann["id"], ann["bbox"], decoded_box)
            assert ann["area"] == float(mask.sum())
            assert ann["iscrowd"] == 0
            checked += 1
    assert checked > 50


def test_polygons_and_rle_both_present_and_polygons_match_masks(dataset):
    root, _ = dataset
    coco = COCO(str(root / "annotations" / "instances_train.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    polygons = [a for a in anns if isinstance(a["segmentation"], list)]
    rles = [a for a in anns if isinstance(a["segmentation"], dict)]
    assert polygons and rles
    for ann in rles:
        assert ann["segmentation"]["size"] == [64, 64]
        assert sum(ann["segmentation"]["counts"]) == 64 * 64
    # an unoccluded object's polygon rasterises to its visible mask, as seen in the semantic map
    for ann in polygons:
        polygon = np.array(ann["segmentation"][0]).reshape(-1, 2)
        assert len(polygon) >= 3
        mask = coco.annToMask(ann).astype(bool)
        semantic = np.asarray(Image.open(root / "semantic" / "train" / f"{ann['image_id']:06d}.png"))
        labelled = mask & (semantic != 255)
        assert (semantic[labelled] == ann["category_id"]).all()
        assert labelled.sum() > 0


def test_uncompressed_rle_round_trips_with_pycocotools():
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (16, 16), (9, 3)]:
        for start_on in (False, True):
            mask = rng.random(shape) < 0.4
            mask[0, 0] = start_on
            rle = syn.mask_to_uncompressed_rle(mask)
            decoded = mask_utils.decode(mask_utils.frPyObjects(rle, *shape)).astype(bool)
            assert np.array_equal(decoded, mask)
            assert rle["counts"][0] == (0 if start_on else rle["counts"][0])


def test_rasterized_shapes_match_painted_pixels(dataset):
    """Inside the (eroded) visible masks the image shows the category's colour."""
    root, _ = dataset
    coco = COCO(str(root / "annotations" / "instances_train.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    checked = 0
    for image_id in coco.getImgIds():
        pixels = read_pixels(root / "images" / "train" / f"{image_id:06d}.jpg").astype(float)
        for ann, mask in decode_masks(coco, image_id):
            interior = mask & ~syn.label_boundary_band(mask.astype(np.uint8), 1)
            if interior.sum() < 4:
                continue
            red, green, blue = pixels[interior].mean(axis=0)
            if names[ann["category_id"]].startswith("red"):
                assert red > green + 60 and red > blue + 60
            else:
                assert blue > red + 60 and blue > green + 60
            checked += 1
    assert checked > 50


# ------------------------------------------------------------------------------------------
# semantic label PNGs
# ------------------------------------------------------------------------------------------


def test_semantic_png_matches_instance_masks(dataset):
    root, config = dataset
    for split in SPLITS:
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        for image_id in coco.getImgIds():
            with Image.open(root / "semantic" / split / f"{image_id:06d}.png") as png:
                assert png.mode == "P"
                assert png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
                semantic = np.asarray(png)
            expected = np.zeros(semantic.shape, dtype=np.uint8)
            for ann, mask in decode_masks(coco, image_id):
                assert not (expected[mask] > 0).any()  # visible masks are disjoint
                expected[mask] = ann["category_id"]
            ignore = semantic == 255
            assert np.array_equal(semantic[~ignore], expected[~ignore])
            # pixels whose 3x3 neighbourhood is uniform are never ignored, and every ignored
            # pixel has a differently labelled pixel within 1 px (chessboard)
            padded = np.pad(expected, 1, mode="edge")
            h, w = expected.shape
            windows = np.stack([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])
            uniform = (windows == expected[None]).all(axis=0)
            assert not (ignore & uniform).any()
            assert np.array_equal(ignore, ~uniform)


def test_semantic_border_can_be_disabled(tmp_path):
    root = syn.generate(tmp_path / "d", tiny_config(num_train=3, num_val=0, num_test=0, semantic_border_px=0))
    for png in (root / "semantic" / "train").glob("*.png"):
        assert 255 not in np.asarray(Image.open(png))


# ------------------------------------------------------------------------------------------
# objects: counts, visibility, occlusion
# ------------------------------------------------------------------------------------------


def test_object_counts_within_settings(tmp_path):
    config = tiny_config(num_train=25, num_val=0, num_test=0, min_objects=2, max_objects=4)
    root = syn.generate(tmp_path / "counts", config)
    doc = load_json(root / "annotations" / "instances_train.json")
    per_image = defaultdict(int)
    for ann in doc["annotations"]:
        per_image[ann["image_id"]] += 1
    counts = [per_image[image["id"]] for image in doc["images"]]
    assert min(counts) >= 2 and max(counts) <= 4
    assert set(counts) == {2, 3, 4}


def test_visible_fraction_and_annotations_follow_the_scene(dataset):
    root, config = dataset
    doc = load_json(root / "annotations" / "instances_train.json")
    areas_by_image = defaultdict(list)
    for ann in doc["annotations"]:
        areas_by_image[ann["image_id"]].append(ann["area"])
    occluded = 0
    for index, image in enumerate(doc["images"]):
        scene = syn.sample_scene(syn.image_rng(config.seed, "train", index), config)
        for obj in scene:
            full = obj.mask.sum()
            assert not (obj.visible & ~obj.mask).any()
            assert obj.visible.sum() >= config.min_visible_frac * full
            occluded += obj.visible.sum() < full
        assert [float(obj.visible.sum()) for obj in scene] == areas_by_image[image["id"]]
    assert occluded > 0


def test_higher_min_visible_frac_is_respected():
    config = tiny_config(min_visible_frac=0.8, occlusion_prob=1.0, min_objects=3, max_objects=5)
    for index in range(30):
        for obj in syn.sample_scene(syn.image_rng(3, "train", index), config):
            assert obj.visible.sum() >= 0.8 * obj.mask.sum()


def test_occlusion_happens_in_a_fair_fraction_of_images(tmp_path):
    config = tiny_config(num_train=60, num_val=0, num_test=0)
    occluded_images = 0
    for index in range(config.num_train):
        scene = syn.sample_scene(syn.image_rng(config.seed, "train", index), config)
        occluded_images += any((obj.mask & ~obj.visible).any() for obj in scene)
    assert 0.15 <= occluded_images / config.num_train <= 0.6


def test_same_colour_objects_never_overlap():
    config = tiny_config(occlusion_prob=1.0, min_objects=4, max_objects=6)
    for index in range(30):
        scene = syn.sample_scene(syn.image_rng(0, "val", index), config)
        for i, first in enumerate(scene):
            for second in scene[i + 1:]:
                if first.colour == second.colour:
                    assert not (first.mask & second.mask).any()


# ------------------------------------------------------------------------------------------
# referring expressions
# ------------------------------------------------------------------------------------------


def test_refs_point_to_annotations_and_pickle_equals_json(dataset):
    root, config = dataset
    combined = load_json(root / "refcoco" / "instances.json")
    anns = {a["id"]: a for a in combined["annotations"]}
    images = {i["id"]: i for i in combined["images"]}
    vocabulary = set(syn.REFERRING_WORDS) | set(config.colours) | set(config.shapes)
    assert sorted(vocabulary) == syn.referring_vocabulary(config)
    all_refs = []
    for split in SPLITS:
        refs = load_json(root / f"refs_{split}.json")
        split_ann_ids = {a["id"] for a in load_json(root / "annotations" / f"instances_{split}.json")["annotations"]}
        assert {r["ann_id"] for r in refs} == split_ann_ids  # one ref per object
        for ref in refs:
            ann = anns[ref["ann_id"]]
            assert ref["split"] == split
            assert ann["image_id"] == ref["image_id"] and ann["category_id"] == ref["category_id"]
            assert ref["file_name"] == images[ref["image_id"]]["file_name"] == f"{split}/{ref['image_id']:06d}.jpg"
            assert (root / "images" / ref["file_name"]).is_file()
            assert 1 <= len(ref["sentences"]) <= config.max_sentences
            assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
            for sentence in ref["sentences"]:
                assert sentence["sent"] == sentence["sent"].lower() == sentence["raw"].lower()
                assert sentence["tokens"] == sentence["sent"].split(" ")
                assert set(sentence["tokens"]) <= vocabulary
                assert syn.category_names(config)[ref["category_id"] - 1] in sentence["sent"]
        all_refs += refs
    with open(root / "refcoco" / "refs(synthetic).p", "rb") as handle:
        assert pickle.load(handle) == all_refs
    assert len({r["ref_id"] for r in all_refs}) == len(all_refs)
    sent_ids = [s for r in all_refs for s in r["sent_ids"]]
    assert len(set(sent_ids)) == len(sent_ids)
    assert len(combined["images"]) == sum(config.split_size(s) for s in SPLITS)


SIDES = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}


def _centre(ann) -> tuple[float, float]:
    x, y, w, h = ann["bbox"]
    return x + w / 2, y + h / 2


def _absolute_sentence_true(words: list[str], ann, size: int) -> bool:
    """Thirds rule: left cx < S/3, right cx > 2S/3, top cy < S/3, bottom cy > 2S/3, and an axis
    without a word is the middle third; sizes by the longer box side."""
    cx, cy = _centre(ann)
    third = size / 3
    region_x = "left" if cx < third else "right" if cx > 2 * third else "middle"
    region_y = "top" if cy < third else "bottom" if cy > 2 * third else "middle"
    said_x = next((w for w in words if w in ("left", "right")), None)
    said_y = next((w for w in words if w in ("top", "bottom")), None)
    if said_x or said_y or "middle" in words:
        if (said_x or "middle") != region_x or (said_y or "middle") != region_y:
            return False
    longer = max(ann["bbox"][2:])
    if "small" in words and longer > 0.2 * size:
        return False
    if ("large" in words or "big" in words) and longer < 0.33 * size:
        return False
    return True


def _relative_sentence_true(words: list[str], ann, group: list[dict], size: int) -> bool:
    """Relative rule among same-category objects (margin 0.08 S on box centres, area ratio 1.4)."""
    margin = 0.08 * size
    others = [g for g in group if g["id"] != ann["id"]]
    if "largest" in words or "biggest" in words:
        return all(ann["area"] >= 1.4 * o["area"] for o in others)
    if "smallest" in words:
        return all(o["area"] >= 1.4 * ann["area"] for o in others)
    side = words[-1] if "from" in words else next(w for w in words if w in SIDES)
    axis, sign = SIDES[side]
    own = _centre(ann)[axis]
    # signed offset of every other object towards `side`: positive = further to that side
    offsets = [sign * (_centre(o)[axis] - own) for o in others]
    if any(abs(d) < margin for d in offsets):
        return False
    beyond = sum(d > 0 for d in offsets)
    if "from" in words:
        rank = {"second": 1, "third": 2}[words[1]]
        return beyond == rank and beyond < len(others)
    return beyond == 0


def test_referring_expressions_are_true_and_disambiguating(dataset):
    root, config = dataset
    seen = defaultdict(int)
    for split in SPLITS:
        anns = load_json(root / "annotations" / f"instances_{split}.json")["annotations"]
        by_id = {a["id"]: a for a in anns}
        for ref in load_json(root / f"refs_{split}.json"):
            ann = by_id[ref["ann_id"]]
            group = [a for a in anns if a["image_id"] == ann["image_id"] and a["category_id"] == ann["category_id"]]
            for sentence in ref["sentences"]:
                words = sentence["tokens"]
                if len(group) == 1 or "image" in words:
                    assert _absolute_sentence_true(words, ann, config.image_size), sentence["sent"]
                    seen["absolute"] += 1
                else:
                    assert _relative_sentence_true(words, ann, group, config.image_size), sentence["sent"]
                    # the sentence is true of no other object of the same category
                    assert not any(_relative_sentence_true(words, other, group, config.image_size)
                                   for other in group if other["id"] != ann["id"]), sentence["sent"]
                    seen["from" if "from" in words else "relative"] += 1
    assert seen["absolute"] > 20 and seen["relative"] > 5


def test_describe_object_rules_on_hand_made_layout():
    names = ["red circle", "blue square"]
    # three red circles in a row (left, middle, right), one lone blue square at the top right
    bboxes = [[2, 40, 10, 10], [30, 40, 10, 10], [50, 40, 10, 10], [50, 2, 8, 8]]
    areas = [100.0, 100.0, 30.0, 64.0]
    category_ids = [1, 1, 1, 2]
    left = syn.describe_object(0, bboxes, areas, category_ids, names, 64)
    assert "the red circle on the left" in left and "the left red circle" in left
    assert not any("right" in s or "second" in s for s in left)
    middle = syn.describe_object(1, bboxes, areas, category_ids, names, 64)
    assert "the second red circle from the left" in middle and "the second red circle from the right" in middle
    right = syn.describe_object(2, bboxes, areas, category_ids, names, 64)
    assert "the smallest red circle" in right and "the red circle on the right" in right
    lone = syn.describe_object(3, bboxes, areas, category_ids, names, 64)
    assert "the blue square" in lone and "the blue square at the top right" in lone
    assert "the small blue square" in lone
    # two same-category objects too close to tell apart: falls back to the absolute phrase
    close = syn.describe_object(0, [[10, 10, 10, 10], [12, 12, 10, 10]], [100.0, 100.0], [1, 1], names, 64)
    assert close == ["the red circle at the top left of the image"]


# ------------------------------------------------------------------------------------------
# settings, ensure_synthetic, CLI
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"min_objects": 4, "max_objects": 2}, "min_objects (4) must be <= max_objects (2)"),
        ({"colours": ("red", "pink")}, "unknown colour 'pink' in colours"),
        ({"shapes": "circle,hexagon"}, "unknown shape 'hexagon' in shapes"),
        ({"image_size": 16}, "image_size must be an integer >= 32, got 16"),
        ({"colours": ()}, "colours must name at least one colour (fewer than 1 category)"),
        ({"shapes": ""}, "shapes must name at least one shape (fewer than 1 category)"),
        ({"colours": "red,red"}, "colours contains duplicates: red, red"),
        ({"min_size_frac": 0.5, "max_size_frac": 0.3}, "min_size_frac (0.5) must be <= max_size_frac (0.3)"),
        ({"min_visible_frac": 0.0}, "min_visible_frac must be in (0, 1], got 0.0"),
        ({"occlusion_prob": 1.5}, "occlusion_prob must be in [0, 1], got 1.5"),
        ({"num_val": -1}, "num_val must be an integer >= 0, got -1"),
        ({"image_format": "gif"}, "image_format must be 'jpg' or 'png', got 'gif'"),
        ({"min_objects": 0}, "min_objects must be an integer >= 1, got 0"),
        ({"image_size": 32, "min_size_frac": 0.1}, "min_size_frac * image_size must be at least 4 pixels"),
    ],
)
def test_bad_settings_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        syn.SyntheticConfig(**overrides)


def test_settings_normalise_names():
    config = syn.SyntheticConfig(colours="Red, green", shapes=["STAR", "diamond"])
    assert config.colours == ("red", "green") and config.shapes == ("star", "diamond")
    assert syn.category_names(config) == ["red star", "red diamond", "green star", "green diamond"]


def test_png_format_and_extra_shapes(tmp_path):
    config = tiny_config(num_train=4, num_val=1, num_test=1, image_format="png",
                         colours=("green", "yellow", "purple"), shapes=("star", "diamond"))
    root = syn.generate(tmp_path / "png", config)
    doc = load_json(root / "annotations" / "instances_train.json")
    assert all(i["file_name"].endswith(".png") for i in doc["images"])
    assert len(doc["categories"]) == 6
    assert read_pixels(root / "images" / "train" / doc["images"][0]["file_name"]).shape == (64, 64, 3)


def test_ensure_synthetic_generates_once_and_checks_settings(tmp_path):
    folder = tmp_path / "ensure"
    config = tiny_config(num_train=3, num_val=1, num_test=1)
    assert syn.ensure_synthetic(folder, config) == folder.resolve()
    meta_stamp = (folder / "meta.json").stat().st_mtime_ns
    image_stamp = (folder / "images" / "train" / "000001.jpg").stat().st_mtime_ns
    syn.ensure_synthetic(folder, config)
    assert (folder / "meta.json").stat().st_mtime_ns == meta_stamp
    assert (folder / "images" / "train" / "000001.jpg").stat().st_mtime_ns == image_stamp
    with pytest.raises(ValueError, match=r"ensure.*num_train=3 but num_train=4 was requested"):
        syn.ensure_synthetic(folder, tiny_config(num_train=4, num_val=1, num_test=1))
    assert (folder / "meta.json").stat().st_mtime_ns == meta_stamp
    with pytest.raises(ValueError, match="already exists and is not empty"):
        syn.generate(folder, config)
    # a non-empty folder without meta.json is never taken for (or replaced by) a dataset
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists but has no meta.json"):
        syn.ensure_synthetic(foreign, config)
    assert (foreign / "notes.txt").read_text() == "mine"
    # no staging folder left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ensure", "foreign"]


def test_generate_overwrite_replaces_dataset(tmp_path):
    folder = syn.generate(tmp_path / "o", tiny_config(num_train=2, num_val=1, num_test=1))
    syn.generate(folder, tiny_config(num_train=3, num_val=1, num_test=1), overwrite=True)
    assert syn.load_meta(folder)["counts"]["train"]["images"] == 3
    assert len(list((folder / "images" / "train").iterdir())) == 3


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "grounding.data.synthetic", *args],
                           capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)


def test_cli(tmp_path):
    out = tmp_path / "cli"
    common = ["--out", str(out), "--image-size", "64", "--num-train", "3", "--num-val", "2",
              "--num-test", "2", "--colours", "red,blue,green", "--shapes", "circle,star"]
    result = _run_cli(*common, "--seed", "5")
    assert result.returncode == 0, result.stderr
    meta = syn.load_meta(out)
    assert meta["config"]["seed"] == 5 and meta["config"]["colours"] == ["red", "blue", "green"]
    assert meta["categories"][:2] == ["red circle", "red star"]
    again = _run_cli(*common, "--seed", "5")
    assert again.returncode == 0 and "already present" in again.stdout
    mismatch = _run_cli(*common, "--seed", "6")
    assert mismatch.returncode == 2 and "seed=5 but seed=6 was requested" in mismatch.stderr
    forced = _run_cli(*common, "--seed", "6", "--force")
    assert forced.returncode == 0, forced.stderr
    assert syn.load_meta(out)["config"]["seed"] == 6
    invalid = _run_cli("--out", str(tmp_path / "bad"), "--min-objects", "5", "--max-objects", "2")
    assert invalid.returncode == 2 and "min_objects (5) must be <= max_objects (2)" in invalid.stderr
    assert not (tmp_path / "bad").exists()
