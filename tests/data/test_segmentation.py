"""The semantic-segmentation data family: samples against the files, COCO-Object against a direct
pycocotools paint, the synthetic set, every bad input's message and the counted skips."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from grounding.constants import IGNORE_INDEX
from grounding.data import synthetic as syn
from grounding.data.images import ImageReadError
from grounding.data.label_maps import BUILTIN_SYNONYMS, SYNONYMS_DIR, read_class_synonyms, voc_palette
from grounding.data.segmentation import SegmentationDataModule
from grounding.data.segmentation_readers import (
    CITYSCAPES_CLASSES,
    COCO_OBJECT_CLASSES,
    COCO_STUFF_CLASSES,
    CONTEXT59_CLASSES,
    CONTEXT60_CLASSES,
    VOC20_CLASSES,
    VOC_CLASSES,
    VOC_PROMPT_NAMES,
    load_coco_object,
    load_label_folder,
    load_voc,
    paint_label_map,
)

# pycocotools' decode triggers a numpy-2 DeprecationWarning inside pycocotools itself
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


def save_image(path, width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)


def save_label_png(path, labels, palette=True):
    """labels (H, W) ints 0..255 -> 'P' PNG with the VOC palette (or 'L' without)."""
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8))
    if palette:
        image.putpalette(voc_palette(256).reshape(-1).tolist())
    image.save(path)


def bordered_labels(width, height, value, seed):
    """Background with a rectangle of ``value`` outlined by a 255 border, plus a 255 frame."""
    labels = np.zeros((height, width), dtype=np.int64)
    y0, x0 = 3 + seed, 4 + seed
    labels[y0 - 1: y0 + 9, x0 - 1: x0 + 11] = IGNORE_INDEX
    labels[y0: y0 + 8, x0: x0 + 10] = value
    labels[0, :] = IGNORE_INDEX
    return labels


def datamodule_samples(**settings):
    data = SegmentationDataModule(**settings)
    data.setup("test")
    return data, [sample for batch in data.test_dataloader() for sample in batch]


# ------------------------------------------------------------------------------------- VOC
@pytest.fixture()
def voc_root(tmp_path):
    """VOC tree: a (RGB 40x30, labels 0/15/255), b (grey 32x24, labels 0/1/255), c without label PNG,
    d without image; val.txt lists a, b, c, d."""
    root = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    save_image(root / "JPEGImages" / "a.jpg", 40, 30)
    save_label_png(root / "SegmentationClass" / "a.png", bordered_labels(40, 30, 15, 0))
    save_image(root / "JPEGImages" / "b.jpg", 32, 24, mode="L", seed=1)
    save_label_png(root / "SegmentationClass" / "b.png", bordered_labels(32, 24, 1, 2))
    save_image(root / "JPEGImages" / "c.jpg", 20, 20)
    save_label_png(root / "SegmentationClass" / "d.png", np.zeros((20, 20)))
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\nc\nd\n")
    return root


def test_voc_samples_equal_the_files(voc_root, caplog):
    with caplog.at_level(logging.WARNING):
        data, samples = datamodule_samples(format="voc", root=str(voc_root), batch_size=2)
    assert [s["image_id"] for s in samples] == ["a", "b"]
    assert data.class_names == list(VOC_CLASSES) and data.num_classes == 21
    assert data.background_index == 0 and data.ignore_index == 255
    for sample in samples:
        stem = sample["image_id"]
        png = np.asarray(Image.open(voc_root / "SegmentationClass" / f"{stem}.png")).astype(np.int64)
        rgb = np.array(Image.open(voc_root / "JPEGImages" / f"{stem}.jpg").convert("RGB"))
        assert sample["labels"].dtype == torch.int64 and torch.equal(sample["labels"], torch.from_numpy(png))
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, *png.shape)
        assert torch.equal(sample["image"], torch.from_numpy(rgb).permute(2, 0, 1))
        assert sample["present"] == sorted(set(np.unique(png).tolist()) - {255})
        assert sample["path"] == str(voc_root / "JPEGImages" / f"{stem}.jpg")
    assert samples[0]["present"] == [0, 15] and samples[1]["present"] == [0, 1]
    grey = samples[1]["image"]  # a grey JPEG becomes three equal channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert data.report.counts == {"missing label PNG": 1, "missing image": 1}
    assert "skipped 1 (missing label PNG)" in caplog.text and "skipped 1 (missing image)" in caplog.text


def test_voc_names_prompt_names_overrides_and_palette(voc_root, tmp_path):
    data = SegmentationDataModule(format="voc", root=str(voc_root), prompt_names=True)
    assert data.class_names == list(VOC_PROMPT_NAMES)
    assert data.class_names[11] == "dining table" and data.class_names[16] == "potted plant" and data.class_names[20] == "tv monitor"
    names = [f"thing {i}" for i in range(21)]
    assert SegmentationDataModule(format="voc", root=str(voc_root), class_names=names).class_names == names
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(["background"] + [f"c{i}" for i in range(1, 16)]))
    assert SegmentationDataModule(format="voc", root=str(voc_root), classes_file=str(classes)).num_classes == 16
    with pytest.raises(ValueError, match=re.escape(
        f"class_names lists 2 names but the voc data has 21 classes ({', '.join(VOC_CLASSES)})"
    )):
        SegmentationDataModule(format="voc", root=str(voc_root), class_names=["a", "b"]).setup()
    palette = data.palette
    assert palette.shape == (256, 3) and palette.dtype == torch.uint8
    assert palette[1].tolist() == [128, 0, 0] and palette[15].tolist() == [192, 128, 128]  # VOC's aeroplane, person
    assert palette[255].tolist() == [224, 224, 192]  # VOC's border colour


def test_limit_and_list_batches(voc_root):
    data, samples = datamodule_samples(format="voc", root=str(voc_root), limit=1)
    assert [s["image_id"] for s in samples] == ["a"]
    batches = list(SegmentationDataModule(format="voc", root=str(voc_root), batch_size=2).predict_dataloader())
    assert len(batches) == 1 and isinstance(batches[0], list)
    assert [b["image"].shape[1:] for b in batches[0]] == [(30, 40), (24, 32)]  # own sizes, no resizing


def test_voc_missing_parts_are_errors_naming_them(voc_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"VOC root not found: {tmp_path / 'nope'}")):
        load_voc(tmp_path / "nope", "val")
    with pytest.raises(FileNotFoundError, match=re.escape(f"image list not found: {voc_root / 'ImageSets/Segmentation/train.txt'}")):
        load_voc(voc_root, "train")
    with pytest.raises(FileNotFoundError, match=re.escape(f"classes file not found: {tmp_path / 'none.txt'}")):
        load_voc(voc_root, "val", tmp_path / "none.txt")
    (voc_root / "ImageSets" / "Segmentation" / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match=re.escape(f"image list {voc_root / 'ImageSets/Segmentation/dup.txt'} names 'a' twice")):
        load_voc(voc_root, "dup")
    (voc_root / "SegmentationClass").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=re.escape(f"VOC label folder not found: {voc_root / 'SegmentationClass'}")):
        load_voc(voc_root, "val")


# ------------------------------------------------------------------------------------- folder format
def folder_tree(tmp_path, labels_by_stem, classes=("wall", "floor", "sky"), sizes=None):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(exist_ok=True)
    labels.mkdir(exist_ok=True)
    for stem, values in labels_by_stem.items():
        height, width = (sizes or {}).get(stem, np.asarray(values).shape)
        save_image(images / f"{stem}.png", width, height)
        save_label_png(labels / f"{stem}.png", values, palette=False)
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("\n".join(classes) + "\n")
    return images, labels, classes_file


def test_folder_reduce_zero_label_maps_0_to_ignore_and_shifts_the_rest(tmp_path):
    raw = np.random.default_rng(0).integers(0, 4, (12, 16))  # 0 = "other", 1..3 the three classes
    raw[0, 0] = 255
    images, labels, classes = folder_tree(tmp_path, {"x": raw})
    data, samples = datamodule_samples(
        format="folder", image_dir=str(images), label_dir=str(labels), classes_file=str(classes), reduce_zero_label=True
    )
    expected = np.where((raw == 0) | (raw == 255), 255, raw - 1)
    assert torch.equal(samples[0]["labels"], torch.from_numpy(expected))
    assert samples[0]["present"] == [0, 1, 2] and data.class_names == ["wall", "floor", "sky"]
    assert data.background_index is None  # the first class is no background
    plain = SegmentationDataModule(format="folder", image_dir=str(images), label_dir=str(labels), classes_file=str(classes))
    plain.setup()
    with pytest.raises(ValueError, match=re.escape(f"label PNG {labels / 'x.png'} has label value 3 but the class list has 3 classes")):
        plain.dataset[0]  # without the reduction, value 3 names no class


def test_folder_counts_unmatched_files_and_honours_the_image_list(tmp_path):
    images, labels, classes = folder_tree(tmp_path, {"a": np.zeros((8, 8)), "b": np.ones((8, 8))})
    save_image(images / "lonely.jpg", 8, 8)
    save_label_png(labels / "orphan.png", np.zeros((8, 8)), palette=False)
    records, names, report = load_label_folder(images, labels, classes)
    assert [r.image_id for r in records] == ["a", "b"]
    assert report.counts == {"missing label PNG": 1, "missing image": 1}
    listed = tmp_path / "list.txt"
    listed.write_text("b\n")
    assert [r.image_id for r in load_label_folder(images, labels, classes, listed)[0]] == ["b"]


@pytest.mark.parametrize("problem", ["out of range", "size", "unreadable", "rgb"])
def test_folder_bad_label_pngs_are_errors_naming_the_file(tmp_path, problem):
    values = np.zeros((10, 12), dtype=np.int64)
    values[2, 3] = 3 if problem == "out of range" else 1
    sizes = {"x": (10, 14)} if problem == "size" else None
    images, labels, classes = folder_tree(tmp_path, {"x": values}, sizes=sizes)
    png = labels / "x.png"
    if problem == "unreadable":
        png.write_bytes(b"not a png at all")
    if problem == "rgb":
        Image.new("RGB", (12, 10)).save(png)
    expected = {
        "out of range": f"label PNG {png} has label value 3 but the class list has 3 classes (values 0..2, 255 = ignore)",
        "size": f"label PNG {png} is 12x10 but its image {images / 'x.png'} is 14x10",
        "unreadable": f"cannot read label PNG {png}",
        "rgb": f"label PNG {png} has mode 'RGB'; expected a palette ('P') or grey ('L') PNG of class indices",
    }[problem]
    settings = {"format": "folder", "image_dir": str(images), "label_dir": str(labels), "classes_file": str(classes)}
    for check_images in (True, False):  # the up-front pass or the reading of the sample
        data = SegmentationDataModule(**settings, check_images=check_images)
        with pytest.raises(ValueError, match=re.escape(expected)):
            data.setup()
            data.dataset[0]


def test_folder_missing_inputs_and_truncated_images(tmp_path):
    images, labels, classes = folder_tree(tmp_path, {"x": np.zeros((10, 12))})
    with pytest.raises(FileNotFoundError, match=re.escape(f"label folder not found: {tmp_path / 'none'}")):
        load_label_folder(images, tmp_path / "none", classes)
    with pytest.raises(FileNotFoundError, match=re.escape(f"image folder not found: {tmp_path / 'none'}")):
        load_label_folder(tmp_path / "none", labels, classes)
    with pytest.raises(FileNotFoundError, match=re.escape(f"classes file not found: {tmp_path / 'c.txt'}")):
        load_label_folder(images, labels, tmp_path / "c.txt")
    needs = "format 'folder' needs label_dir, classes_file (set: image_dir, label_dir, classes_file)"
    with pytest.raises(ValueError, match=re.escape(needs)):
        SegmentationDataModule(format="folder", image_dir=str(images))
    with pytest.raises(ValueError, match=re.escape("reduce_zero_label applies to format 'folder' only; got format 'voc'")):
        SegmentationDataModule(format="voc", root="x", reduce_zero_label=True)
    data = (images / "x.png").read_bytes()
    (images / "x.png").write_bytes(data[: len(data) - 20])
    with pytest.raises(ImageReadError, match=re.escape(f"image {images / 'x.png'} (image id x) is truncated")):
        SegmentationDataModule(format="folder", image_dir=str(images), label_dir=str(labels), classes_file=str(classes)).setup()


# ------------------------------------------------------------------------------------- COCO-Object
def rle_of(mask):
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def uncompressed_rle(mask):
    """Column-major run lengths, starting with zeros (COCO's uncompressed RLE)."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


@pytest.fixture()
def coco_object(tmp_path):
    """Image 1 (48x36): a polygon (cat 5), a compressed RLE (cat 2), an overlapping large / small pair
    (cats 2 and 5, the large listed last) and a crowd region; image 2 has no file; image 3 no annotation."""
    height, width = 36, 48
    images = tmp_path / "images"
    images.mkdir()
    save_image(images / "one.jpg", width, height)
    save_image(images / "three.png", 20, 10, mode="L")
    rle_mask = np.zeros((height, width), dtype=bool)
    rle_mask[20:30, 2:10] = True
    crowd_mask = np.zeros((height, width), dtype=bool)
    crowd_mask[0:8, 30:48] = True
    anns = [
        {"id": 11, "image_id": 1, "category_id": 5, "iscrowd": 0, "bbox": [2, 2, 10, 10], "area": 100,
         "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]},
        {"id": 12, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [2, 20, 8, 10], "area": 80, "segmentation": rle_of(rle_mask)},
        {"id": 13, "image_id": 1, "category_id": 5, "iscrowd": 0, "bbox": [26, 14, 6, 6], "area": 36,
         "segmentation": [[26, 14, 32, 14, 32, 20, 26, 20]]},
        {"id": 14, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [20, 10, 20, 16], "area": 320,
         "segmentation": [[20, 10, 40, 10, 40, 26, 20, 26]]},
        {"id": 15, "image_id": 1, "category_id": 5, "iscrowd": 1, "bbox": [30, 0, 18, 8], "area": 144,
         "segmentation": uncompressed_rle(crowd_mask)},
        {"id": 16, "image_id": 2, "category_id": 2, "iscrowd": 0, "bbox": [1, 1, 3, 3], "area": 9,
         "segmentation": [[1, 1, 4, 1, 4, 4]]},
    ]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "one.jpg", "width": width, "height": height},
                   {"id": 2, "file_name": "missing.jpg", "width": 10, "height": 10},
                   {"id": 3, "file_name": "three.png", "width": 20, "height": 10}],
        "annotations": anns,
        "categories": [{"id": 5, "name": "Dog"}, {"id": 2, "name": "cat"}],
    }))
    return path, images


def test_coco_object_labels_equal_a_direct_pycocotools_paint(coco_object):
    path, images = coco_object
    data, samples = datamodule_samples(format="coco_object", annotation_file=str(path), image_dir=str(images))
    assert data.class_names == ["background", "cat", "dog"]  # categories sorted by id: 2 cat, 5 dog
    assert data.background_index == 0
    assert data.report.counts == {"missing image": 1}
    assert [s["image_id"] for s in samples] == ["1", "3"]

    coco = COCO(str(path))
    label_of = {2: 1, 5: 2}
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    expected = np.zeros((36, 48), dtype=np.int64)
    for ann in anns:  # the documented order: crowds as 255 first, then instances largest first
        if ann["iscrowd"]:
            expected[coco.annToMask(ann) > 0] = 255
    for ann in sorted((a for a in anns if not a["iscrowd"]), key=lambda a: -int(coco.annToMask(a).sum())):
        expected[coco.annToMask(ann) > 0] = label_of[ann["category_id"]]
    labels = samples[0]["labels"]
    assert torch.equal(labels, torch.from_numpy(expected))
    assert labels[16, 28].item() == 2  # the small dog (listed before the large cat) stays on top of it
    assert labels[12, 22].item() == 1 and labels[3, 40].item() == 255 and labels[25, 5].item() == 1
    assert samples[0]["present"] == [0, 1, 2]
    assert samples[0]["image"].shape == (3, 36, 48)
    assert samples[1]["present"] == [0] and samples[1]["image"].shape == (3, 10, 20)  # no annotation: background


def test_paint_label_map_order_is_size_not_listing():
    big, small, crowd = (np.zeros((6, 6), dtype=bool) for _ in range(3))
    big[0:5, 0:5], small[1:3, 1:3], crowd[4:6, 4:6] = True, True, True
    for masks, labels in (([big, small], [1, 2]), ([small, big], [2, 1])):
        painted = paint_label_map(6, 6, masks + [crowd], labels + [7], [False, False, True])
        assert painted[1, 1] == 2 and painted[0, 0] == 1 and painted[5, 5] == 255
        assert painted[4, 4] == 1  # an instance wins over a crowd region
        assert painted[5, 0] == 0


def test_coco_object_errors_name_the_file(coco_object, tmp_path):
    path, images = coco_object
    data = json.loads(path.read_text())
    data["categories"].append({"id": 9, "name": "background"})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(f"annotation file {bad}: a category is named 'background'")):
        load_coco_object(bad, images)
    with pytest.raises(FileNotFoundError, match=re.escape(f"annotation file not found: {tmp_path / 'none.json'}")):
        load_coco_object(tmp_path / "none.json", images)
    data = json.loads(path.read_text())
    data["images"][0]["width"] = 50  # contradicts one.jpg (48x36)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(data))
    dataset = SegmentationDataModule(format="coco_object", annotation_file=str(wrong), image_dir=str(images), check_images=False)
    with pytest.raises(ImageReadError, match=re.escape(f"image {images / 'one.jpg'} (image id 1) is 48x36")):
        dataset.setup()
        dataset.dataset[0]


# ------------------------------------------------------------------------------------- synthetic
def test_synthetic_format_generates_on_first_use_and_reads_the_semantic_pngs(tmp_path):
    root = tmp_path / "synthetic"
    settings = {"image_size": 48, "num_train": 0, "num_val": 3, "num_test": 0, "max_objects": 3, "min_size_frac": 0.2, "seed": 1}
    data, samples = datamodule_samples(format="synthetic", synthetic_root=str(root), synthetic=settings)
    classes = (root / "semantic" / "classes.txt").read_text().split("\n")
    assert data.class_names == [c for c in classes if c] and data.class_names[0] == "background"
    assert data.num_classes == 7 and data.background_index == 0
    assert len(samples) == 3
    for sample in samples:
        png = np.asarray(Image.open(syn.semantic_dir(root, "val") / f"{sample['image_id']}.png")).astype(np.int64)
        assert torch.equal(sample["labels"], torch.from_numpy(png))
        assert sample["present"] == sorted(set(np.unique(png).tolist()) - {255}) and len(sample["present"]) >= 2
        assert sample["image"].shape == (3, 48, 48)


def test_the_parser_lists_the_formats_a_typo_is_not_one_of():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SegmentationDataModule, "data")
    assert parser.parse_args(["--data.format", "voc"]).data.format == "voc"
    formats = ("'voc', 'voc20', 'context60', 'context59', 'coco_stuff', 'coco_object_stuff', 'cityscapes', 'folder', "
               "'coco_object', 'synthetic'")
    with pytest.raises(Exception, match=r"data.format[\s\S]*Literal\[" + re.escape(formats) + r"\]. Got value: vocx"):
        parser.parse_args(["--data.format", "vocx"])


# ------------------------------------------------------------------------------------- the benchmarks' layouts
def converted(labels, convert_value):
    """The label map with ``convert_value`` applied pixel by pixel: the direct loop the readers must equal."""
    out = np.empty_like(labels)
    for (y, x), value in np.ndenumerate(labels):
        out[y, x] = convert_value(int(value))
    return out


def without_background(value):
    """VOC20 / Context-59: 0 (background) -> 255, v -> v - 1, 255 stays."""
    return 255 if value in (0, 255) else value - 1


def coco_object_of_stuff(value):
    """COCO-Object from COCO-Stuff train ids: things 0..79 -> 1..80, stuff 80..170 -> 0, 255 stays."""
    return 255 if value == 255 else (value + 1 if value < 80 else 0)


def random_labels(num_values, seed, fixed=()):
    """(8, 10) values in 0..num_values-1 with a few 255, and the (row, value) pairs of ``fixed`` written into row 0."""
    labels = np.random.default_rng(seed).integers(0, num_values, (8, 10))
    labels[7, :3] = 255
    for column, value in enumerate(fixed):
        labels[0, column] = value
    return labels


def context_root(tmp_path):
    """VOC2010 as mmsegmentation's converter writes Pascal Context: x, y (8x10, labels 0..59 and 255)."""
    root = tmp_path / "VOC2010"
    for folder in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (root / folder).mkdir(parents=True)
    for seed, stem in enumerate(("x", "y")):
        save_image(root / "JPEGImages" / f"{stem}.jpg", 10, 8, seed=seed)
        save_label_png(root / "SegmentationClassContext" / f"{stem}.png", random_labels(60, seed, (0, 59)))
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("x\ny\n")
    return root


def coco_stuff_root(tmp_path, values=None):
    """COCO-Stuff-164k converted to train ids: two val2017 images with their _labelTrainIds.png, the raw
    <stem>.png beside them (not read), and a label without its image."""
    root = tmp_path / "coco_stuff164k"
    images, labels = root / "images" / "val2017", root / "annotations" / "val2017"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for seed, stem in enumerate(("000000000139", "000000000285")):
        save_image(images / f"{stem}.jpg", 10, 8, seed=seed)
        train_ids = values if values is not None else random_labels(171, seed, (0, 5, 79, 80, 170))
        save_label_png(labels / f"{stem}_labelTrainIds.png", train_ids, palette=False)
        save_label_png(labels / f"{stem}.png", np.full((8, 10), 181), palette=False)
    save_label_png(labels / "000000000632_labelTrainIds.png", np.zeros((8, 10)), palette=False)
    return root


def cityscapes_root(tmp_path):
    """Cityscapes: one val image in each of two cities with its gtFine train-id map (and the labelIds map
    beside it, not read), and an image without its label."""
    root = tmp_path / "cityscapes"
    for seed, (city, name) in enumerate((("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313"))):
        (root / "leftImg8bit" / "val" / city).mkdir(parents=True)
        (root / "gtFine" / "val" / city).mkdir(parents=True)
        save_image(root / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png", 10, 8, seed=seed)
        save_label_png(root / "gtFine" / "val" / city / f"{name}_gtFine_labelTrainIds.png", random_labels(19, seed, (0, 18)), palette=False)
        save_label_png(root / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png", np.full((8, 10), 33), palette=False)
    save_image(root / "leftImg8bit" / "val" / "bochum" / "bochum_000001_000000_leftImg8bit.png", 10, 8)
    return root


def read_png(path):
    return np.asarray(Image.open(path)).astype(np.int64)


def test_voc20_drops_the_background_and_shifts_the_classes(voc_root):
    data, samples = datamodule_samples(format="voc20", root=str(voc_root))
    assert data.num_classes == 20 and data.class_names == list(VOC_CLASSES[1:]) and data.background_index is None
    for sample in samples:
        png = read_png(voc_root / "SegmentationClass" / f"{sample['image_id']}.png")
        assert torch.equal(sample["labels"], torch.from_numpy(converted(png, without_background)))
    assert samples[0]["present"] == [14]  # VOC's person (15) is VOC20's 14; background is ignored
    assert data.report.counts == {"missing label PNG": 1, "missing image": 1}
    prompts = SegmentationDataModule(format="voc20", root=str(voc_root), prompt_names=True).class_names
    assert prompts[10] == "dining table" and prompts[19] == "tv monitor" and len(prompts) == 20


@pytest.mark.parametrize("format, num_classes, convert", [("context60", 60, lambda v: v), ("context59", 59, without_background)])
def test_pascal_context_with_and_without_background(tmp_path, format, num_classes, convert):
    root = context_root(tmp_path)
    data, samples = datamodule_samples(format=format, root=str(root))
    assert data.num_classes == num_classes and data.class_names[-1] == "wood" and "pottedplant" in data.class_names
    assert data.background_index == (0 if format == "context60" else None)
    assert [s["image_id"] for s in samples] == ["x", "y"]
    for sample in samples:
        png = read_png(root / "SegmentationClassContext" / f"{sample['image_id']}.png")
        assert torch.equal(sample["labels"], torch.from_numpy(converted(png, convert)))


@pytest.mark.parametrize("format", ["coco_stuff", "coco_object_stuff"])
def test_coco_stuff_and_the_coco_object_made_from_it(tmp_path, format):
    root = coco_stuff_root(tmp_path)
    data, samples = datamodule_samples(format=format, root=str(root), split="val2017")
    assert [s["image_id"] for s in samples] == ["000000000139", "000000000285"]
    assert data.report.counts == {"missing image": 1}
    convert = (lambda v: v) if format == "coco_stuff" else coco_object_of_stuff
    for sample in samples:
        png = read_png(root / "annotations" / "val2017" / f"{sample['image_id']}_labelTrainIds.png")
        assert torch.equal(sample["labels"], torch.from_numpy(converted(png, convert)))
    if format == "coco_stuff":
        assert data.num_classes == 171 and data.background_index is None
        assert (data.class_names[0], data.class_names[79], data.class_names[80], data.class_names[170]) == (
            "person", "toothbrush", "banner", "wood")
    else:  # train ids 0, 5, 79, 80, 170 in row 0: person, bus, toothbrush, then two stuff classes
        assert data.num_classes == 81 and data.background_index == 0
        assert data.class_names[:3] == ["background", "person", "bicycle"] and data.class_names[80] == "toothbrush"
        assert samples[0]["labels"][0, :5].tolist() == [1, 6, 80, 0, 0]


def test_coco_object_stuff_rejects_a_value_beyond_the_171_train_ids(tmp_path):
    values = np.zeros((8, 10), dtype=np.int64)
    values[2, 2] = 200
    root = coco_stuff_root(tmp_path, values)
    data = SegmentationDataModule(format="coco_object_stuff", root=str(root), split="val2017")
    data.setup()
    png = root / "annotations" / "val2017" / "000000000139_labelTrainIds.png"
    with pytest.raises(ValueError, match=re.escape(
        f"label PNG {png} (after coco_stuff_to_object: things 0..79 -> 1..80, stuff 80..170 -> 0) has label value 200"
        " but the class list has 81 classes"
    )):
        data.dataset[0]


def test_cityscapes_pairs_the_city_folders(tmp_path):
    root = cityscapes_root(tmp_path)
    data, samples = datamodule_samples(format="cityscapes", root=str(root))
    assert data.num_classes == 19 and data.background_index is None
    assert data.class_names[6] == "traffic light" and data.class_names[18] == "bicycle"
    assert [s["image_id"] for s in samples] == ["aachen_000000_000019", "bochum_000000_000313"]
    assert data.report.counts == {"missing label PNG": 1}
    for sample in samples:
        city = sample["image_id"].split("_")[0]
        png = read_png(root / "gtFine" / "val" / city / f"{sample['image_id']}_gtFine_labelTrainIds.png")
        assert torch.equal(sample["labels"], torch.from_numpy(png))
        assert sample["path"] == str(root / "leftImg8bit" / "val" / city / f"{sample['image_id']}_leftImg8bit.png")


@pytest.mark.parametrize("format, build, label_dir, what", [
    ("voc20", None, "SegmentationClass", "VOC label folder"),
    ("context60", context_root, "SegmentationClassContext", "Pascal Context label folder"),
    ("context59", context_root, "SegmentationClassContext", "Pascal Context label folder"),
    ("coco_stuff", coco_stuff_root, "annotations/val2017", "COCO-Stuff label folder"),
    ("coco_object_stuff", coco_stuff_root, "annotations/val2017", "COCO-Stuff label folder"),
    ("cityscapes", cityscapes_root, "gtFine/val", "Cityscapes label folder"),
])
def test_a_missing_label_folder_is_an_error_naming_it(tmp_path, voc_root, format, build, label_dir, what):
    import shutil

    root = voc_root if build is None else build(tmp_path)
    shutil.rmtree(root / label_dir)
    split = "val2017" if "coco" in format else "val"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{what} not found: {root / label_dir}")):
        SegmentationDataModule(format=format, root=str(root), split=split).setup()


# ------------------------------------------------------------------------------------- synonyms
BUILTIN_COUNTS = {"voc21": VOC_CLASSES, "voc20": VOC20_CLASSES, "context60": CONTEXT60_CLASSES, "context59": CONTEXT59_CLASSES,
                  "coco_object": COCO_OBJECT_CLASSES, "coco_stuff": COCO_STUFF_CLASSES, "cityscapes": CITYSCAPES_CLASSES}


def squeezed(name):
    return name.replace(" ", "")


def test_the_builtin_synonym_files_have_a_line_per_class_of_their_format():
    assert set(BUILTIN_SYNONYMS) == set(BUILTIN_COUNTS) | {"ade20k"}
    assert len(read_class_synonyms("ade20k")) == 150
    for name, classes in BUILTIN_COUNTS.items():
        synonyms = read_class_synonyms(name)
        assert len(synonyms) == len(classes), name
        assert all(words and all(words) for words in synonyms), name
    # the published words against the class tuples, typed apart: the same classes in the same order
    assert [w[0] for w in read_class_synonyms("context60")] == list(CONTEXT60_CLASSES)
    assert [w[0] for w in read_class_synonyms("coco_object")][1:] == list(COCO_OBJECT_CLASSES[1:])
    assert [squeezed(w[0]) for w in read_class_synonyms("coco_stuff")] == [squeezed(n) for n in COCO_STUFF_CLASSES]
    assert [squeezed(w[0]) for w in read_class_synonyms("cityscapes")] == [squeezed(n) for n in CITYSCAPES_CLASSES]
    voc21 = read_class_synonyms("voc21")
    assert voc21[1:] == read_class_synonyms("voc20") and voc21[0][:3] == ["sky", "wall", "tree"]
    assert voc21[15][:2] == ["person", "person in shirt"] and len(voc21[15]) == 7
    assert voc21[20] == ["television monitor", "tv monitor", "monitor", "television", "screen"]


def test_class_synonyms_default_to_the_names_and_follow_the_file(voc_root, tmp_path):
    plain = SegmentationDataModule(format="voc", root=str(voc_root), prompt_names=True)
    assert plain.class_synonyms == [[name] for name in VOC_PROMPT_NAMES]
    data = SegmentationDataModule(format="voc", root=str(voc_root), synonyms="voc21")
    assert data.class_synonyms == read_class_synonyms("voc21") and data.class_synonyms[4] == ["ship"]
    own = tmp_path / "mine.txt"
    own.write_text("\n".join(["background"] + [f"thing {i}, item  {i}" for i in range(1, 21)]) + "\n\n")
    assert SegmentationDataModule(format="voc", root=str(voc_root), synonyms=str(own)).class_synonyms[3] == ["thing 3", "item 3"]


def test_synonym_file_errors_name_the_file(voc_root, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("cat\ndog, puppy\n")
    with pytest.raises(ValueError, match=re.escape(f"synonyms file {short} has 2 lines but the voc20 data has 20 classes")):
        SegmentationDataModule(format="voc20", root=str(voc_root), synonyms=str(short)).setup()
    with pytest.raises(ValueError, match=re.escape(f"synonyms file {SYNONYMS_DIR / 'voc21.txt'} has 21 lines but the voc20 data has 20 classes")):
        SegmentationDataModule(format="voc20", root=str(voc_root), synonyms="voc21").setup()
    (tmp_path / "gap.txt").write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match=re.escape(f"synonyms file {tmp_path / 'gap.txt'}: line 2 is empty")):
        read_class_synonyms(tmp_path / "gap.txt")
    (tmp_path / "comma.txt").write_text("cat\ndog, , puppy\n")
    with pytest.raises(ValueError, match=re.escape(f"synonyms file {tmp_path / 'comma.txt'}: line 2 has an empty synonym: 'dog, , puppy'")):
        read_class_synonyms(tmp_path / "comma.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(f"synonyms file not found: voc22 (built-in lists: {', '.join(BUILTIN_SYNONYMS)})")):
        SegmentationDataModule(format="voc", root=str(voc_root), synonyms="voc22")


GEM_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "gem").glob("*.yaml"))
CONFIG_CLASSES = {"voc": 21, "voc20": 20, "context": 59, "context60": 60, "coco_stuff": 171, "coco_object": 81,
                  "coco_object_stuff": 81, "cityscapes": 19, "ade20k": 150}


@pytest.mark.parametrize("config", [c for c in GEM_CONFIGS if c.stem in CONFIG_CLASSES], ids=lambda c: c.stem)
def test_each_benchmark_config_parses_and_its_synonyms_fit_its_classes(config):
    """Every benchmark config's data section as the command line parses it, and a synonyms line per class."""
    import yaml
    from jsonargparse import ArgumentParser

    section = yaml.safe_load(config.read_text())["data"]
    assert section["class_path"] == "grounding.data.segmentation.SegmentationDataModule"
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SegmentationDataModule, "data")
    settings = parser.parse_object({"data": section["init_args"]}).data
    data = SegmentationDataModule(**vars(settings))
    assert len(read_class_synonyms(settings.synonyms)) == CONFIG_CLASSES[config.stem]
    assert data.hparams.synonyms == settings.synonyms
