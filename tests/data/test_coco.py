"""The COCO detection data layer: targets, transforms, and every bad input of the issue."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from grounding.data.coco import CocoDetection, collate_detection, detection_transforms, load_coco_detection
from grounding.data.detection import CocoDetectionDataModule
from grounding.data.images import ImageReadError, read_rgb_image


def write_coco(folder, images, annotations, categories=None):
    """Write a COCO instances file; images: list of (id, file_name, width, height)."""
    payload = {
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    path = folder / "ann.json"
    path.write_text(json.dumps(payload))
    return path


def ann(ann_id, image_id, bbox, category_id=1, **extra):
    return {"id": ann_id, "image_id": image_id, "bbox": bbox, "category_id": category_id, "area": 1.0, "iscrowd": 0, **extra}


def save_rgb(folder, name, width=40, height=30):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / name)


# ------------------------------------------------------------------------------------- on the synthetic set
def test_targets_match_the_annotation_file(synthetic_root):
    ann_file = synthetic_root / "annotations" / "instances_val.json"
    dataset = CocoDetection(ann_file, synthetic_root / "images" / "val", detection_transforms(False, image_size=64, max_size=100))
    coco = COCO(str(ann_file))
    assert len(dataset) == len(coco.getImgIds())
    for index in range(len(dataset)):
        image, target = dataset[index]
        h, w = target["size"].tolist()
        assert image.shape == (3, h, w) and min(h, w) == 64
        anns = coco.loadAnns(coco.getAnnIds(imgIds=target["image_id"]))
        expected = torch.tensor([[a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2, a["bbox"][2], a["bbox"][3]] for a in anns])
        orig_h, orig_w = target["orig_size"].tolist()
        expected /= torch.tensor([orig_w, orig_h, orig_w, orig_h])
        assert torch.allclose(target["boxes"], expected, atol=1e-5)
        assert target["category_ids"].tolist() == [a["category_id"] for a in anns]


def test_training_transforms_keep_boxes_and_masks_consistent(synthetic_root):
    transforms = detection_transforms(True, image_size=80, max_size=120, train_scales=[64, 80], flip_prob=0.5, crop_prob=1.0, crop_scale=(0.5, 1.0))
    dataset = CocoDetection(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "images" / "train", transforms, train=True, return_masks=True)
    for index in range(len(dataset)):
        image, target = dataset[index]
        h, w = target["size"].tolist()
        assert target["masks"].shape[1:] == (h, w) and len(target["masks"]) == len(target["boxes"])
        for mask, box in zip(target["masks"], target["boxes"]):
            ys, xs = mask.nonzero(as_tuple=True)
            if len(xs) == 0:
                continue
            mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            cx, cy, bw, bh = (box * torch.tensor([w, h, w, h])).tolist()
            box_xyxy = torch.tensor([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
            # masks are resampled nearest-neighbour at up to ~2.5x magnification (crop then resize): edges
            # agree to a few pixels, a wrong flip or scale would be off by tens
            assert (mask_box[:2] >= box_xyxy[:2] - 3).all() and (mask_box[2:] <= box_xyxy[2:] + 3).all()
            cut_by_crop = box_xyxy[0] < 1 or box_xyxy[1] < 1 or box_xyxy[2] > w - 1 or box_xyxy[3] > h - 1
            if not cut_by_crop:  # a cut object's box is the clipped box, not the tight box of what remains
                assert torch.allclose(mask_box, box_xyxy, atol=3.0)


def test_collate_pads_and_marks_real_pixels():
    a, b = torch.ones(3, 10, 20), torch.ones(3, 16, 8)
    batch = collate_detection([(a, {"i": 0}), (b, {"i": 1})])
    assert batch["pixel_values"].shape == (2, 3, 16, 20)
    assert batch["pixel_mask"][0].sum() == 200 and batch["pixel_mask"][1].sum() == 128
    assert batch["pixel_mask"][0, :10, :20].all() and not batch["pixel_mask"][0, 10:].any()
    assert torch.equal(batch["pixel_values"][0].bool().any(0), batch["pixel_mask"][0].bool())


# ------------------------------------------------------------------------------------- bad inputs
def test_bad_boxes_missing_images_and_empty_images_are_counted_skips(tmp_path, caplog):
    save_rgb(tmp_path, "a.jpg")
    save_rgb(tmp_path, "b.jpg")
    path = write_coco(
        tmp_path,
        [(1, "a.jpg", 40, 30), (2, "missing.jpg", 40, 30), (3, "b.jpg", 40, 30)],
        [
            ann(10, 1, [5, 5, 10, 10]),
            ann(11, 1, [5, 5, 0, 10]),  # zero width
            ann(12, 1, [5, 5, 10, -3]),  # negative height
            ann(13, 1, [100, 100, 10, 10]),  # entirely outside
            ann(14, 1, [30, 20, 20, 20]),  # sticks out: clipped to the image
            ann(15, 2, [1, 1, 5, 5]),
            ann(16, 1, [1, 1, "x", 5]),  # malformed
        ],
    )
    with caplog.at_level(logging.WARNING):
        records, categories, report = load_coco_detection(path, tmp_path, keep_images_without_annotations=False)
        report.log()
    assert categories == {1: "cat", 2: "dog"}
    assert [r.id for r in records] == [1]  # 2: file missing, 3: no annotations
    assert [a.id for a in records[0].annotations] == [10, 14]
    assert records[0].annotations[1].box == (30.0, 20.0, 40.0, 30.0)
    assert report.counts == {
        "box of zero or negative size": 2, "box outside its image": 1, "malformed box": 1,
        "missing image file": 1, "image without annotations": 1,
    }
    assert "annotation id 11" in caplog.text and "missing.jpg" in caplog.text
    # evaluation keeps images without annotations (they count for false positives)
    records, _, _ = load_coco_detection(path, tmp_path, keep_images_without_annotations=True)
    assert [r.id for r in records] == [1, 3]


@pytest.mark.parametrize(
    "images, annotations, categories, message",
    [
        ([(1, "a.jpg", 40, 30), (1, "b.jpg", 40, 30)], [], None, r"ann.json: duplicate image id 1"),
        ([(1, "a.jpg", 40, 30)], [ann(5, 1, [1, 1, 2, 2]), ann(5, 1, [1, 1, 3, 3])], None, r"ann.json: duplicate annotation id 5"),
        ([(1, "a.jpg", 40, 30)], [], [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], r"ann.json: duplicate category id 1"),
        ([(1, "a.jpg", 40, 30)], [ann(7, 1, [1, 1, 2, 2], category_id=99)], None, r"ann.json: annotation id 7 has unknown category id 99"),
        ([(1, "a.jpg", 40, 30)], [ann(8, 42, [1, 1, 2, 2])], None, r"ann.json: annotation id 8 refers to unknown image id 42"),
        ([(1, "a.jpg", 40, 30)], [], [{"id": 3, "name": ""}], r"ann.json: category id 3 has an empty name"),
    ],
)
def test_broken_annotation_files_fail_naming_file_and_id(tmp_path, images, annotations, categories, message):
    save_rgb(tmp_path, "a.jpg")
    path = write_coco(tmp_path, images, annotations, categories)
    with pytest.raises(ValueError, match=message):
        load_coco_detection(path, tmp_path)


def test_not_json_and_not_coco_fail_naming_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON"):
        load_coco_detection(tmp_path / "bad.json", tmp_path)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match=r"list.json is not a COCO instances file"):
        load_coco_detection(tmp_path / "list.json", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*nope.json"):
        load_coco_detection(tmp_path / "nope.json", tmp_path)


def test_unreadable_image_error_names_file_and_id(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    path = write_coco(tmp_path, [(4, "broken.jpg", 40, 30)], [ann(1, 4, [1, 1, 5, 5])])
    dataset = CocoDetection(path, tmp_path)
    with pytest.raises(ImageReadError, match=r"cannot read image .*broken.jpg \(image id 4\)"):
        dataset[0]


def test_grayscale_rgba_16bit_and_palette_images_become_8bit_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[0, 0, 3] = 0  # transparent pixel: composited onto black
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    sixteen = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    Image.fromarray(gray, mode="L").convert("P").save(tmp_path / "palette.png")

    out = np.asarray(read_rgb_image(tmp_path / "gray.png", (4, 3)))
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3) and (out == gray[..., None]).all()
    out = np.asarray(read_rgb_image(tmp_path / "rgba.png", (4, 3)))
    assert out.shape == (3, 4, 3) and out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [200, 0, 0]
    out = np.asarray(read_rgb_image(tmp_path / "sixteen.png", (4, 3)))
    assert out.dtype == np.uint8 and (out[..., 0] == np.round(sixteen / 65535 * 255)).all()
    assert (np.asarray(read_rgb_image(tmp_path / "palette.png", (4, 3)))[..., 1] == gray).all()


def test_exif_rotated_image_is_read_in_the_annotations_orientation(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide, 20 high
    stored[:, :10] = 255  # white band on the left of the stored pixels
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    # annotations made on the displayed image (20 wide, 40 high): EXIF applied, white band now on top
    shown = np.asarray(read_rgb_image(tmp_path / "rotated.jpg", (20, 40)))
    assert shown.shape == (40, 20, 3) and shown[:8].mean() > 240 and shown[12:].mean() < 15
    # annotations made on the stored pixels (40 x 20): stored orientation kept
    raw = np.asarray(read_rgb_image(tmp_path / "rotated.jpg", (40, 20)))
    assert raw.shape == (20, 40, 3) and raw[:, :8].mean() > 240
    with pytest.raises(ImageReadError, match=r"rotated.jpg \(image id 9\) is 40x20 .* but the annotation file says 50x50"):
        read_rgb_image(tmp_path / "rotated.jpg", (50, 50), image_id=9)


def test_crowd_boxes_are_not_training_targets(tmp_path):
    save_rgb(tmp_path, "a.jpg")
    path = write_coco(tmp_path, [(1, "a.jpg", 40, 30)], [ann(1, 1, [1, 1, 10, 10]), ann(2, 1, [20, 5, 10, 10], iscrowd=1)])
    _, train_target = CocoDetection(path, tmp_path, detection_transforms(True, 30, 40, flip_prob=0, crop_prob=0), train=True)[0]
    _, eval_target = CocoDetection(path, tmp_path, detection_transforms(False, 30, 40))[0]
    assert train_target["annotation_ids"].tolist() == [1] and eval_target["annotation_ids"].tolist() == [1, 2]


def test_datamodule_rejects_disagreeing_categories_and_half_given_paths(tmp_path):
    save_rgb(tmp_path, "a.jpg")
    first = write_coco(tmp_path, [(1, "a.jpg", 40, 30)], [ann(1, 1, [1, 1, 5, 5])])
    other = tmp_path / "other"
    other.mkdir()
    second = write_coco(other, [(1, "a.jpg", 40, 30)], [], categories=[{"id": 1, "name": "cat"}])
    module = CocoDetectionDataModule(train_annotations=str(first), train_images=str(tmp_path), val_annotations=str(second), val_images=str(tmp_path))
    with pytest.raises(ValueError, match=r"categories differ between .*ann.json and .*other/ann.json"):
        module.setup("fit")
    with pytest.raises(ValueError, match=r"val_annotations and val_images must be given together"):
        CocoDetectionDataModule(val_annotations=str(first))


def test_few_shot_and_fraction_subsets(synthetic_root):
    from grounding.data.coco import fraction_subset, k_shot_subset

    records, categories, _ = load_coco_detection(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "images" / "train")
    half = fraction_subset(records, 0.5, seed=3)
    assert len(half) == round(0.5 * len(records)) and half == fraction_subset(records, 0.5, seed=3)
    one_shot = k_shot_subset(records, 1, seed=3)
    present = {a.category_id for r in records for a in r.annotations}
    assert present <= {a.category_id for r in one_shot for a in r.annotations}  # every category covered
    assert len(one_shot) <= len(present)
    with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\], got 0"):
        fraction_subset(records, 0, seed=0)


@pytest.mark.parametrize(
    "images, categories, message",
    [
        ([("000001", "a.jpg", 40, 30)], None, r"ann.json: image id '000001' is not an integer \(COCO ids are integers"),
        ([(1, "a.jpg", 40, 30)], [{"id": 1, "name": "Cat"}, {"id": 2, "name": "cat "}],
         r"ann.json: category ids 1 and 2 have the same name 'cat'; a prompt cannot tell them apart"),
        ([(1, "a.jpg", 0, 30)], None, r"ann.json: image id 1 has width 0; expected a positive integer"),
    ],
)
def test_ids_names_and_sizes_are_validated_when_the_file_is_read(tmp_path, images, categories, message):
    save_rgb(tmp_path, "a.jpg")
    path = write_coco(tmp_path, images, [], categories)
    with pytest.raises(ValueError, match=message):
        load_coco_detection(path, tmp_path)


def test_each_annotation_file_is_parsed_once_per_process(synthetic_root, monkeypatch):
    from grounding.data import coco_file

    calls = []
    original = coco_file._load_json
    monkeypatch.setattr(coco_file, "_load_json", lambda path: calls.append(path) or original(path))
    monkeypatch.setattr(coco_file, "_CACHE", type(coco_file._CACHE)())
    module = CocoDetectionDataModule(synthetic_root=str(synthetic_root), image_size=64, max_size=100)
    module.setup("fit")
    module.ground_truth("val")
    assert sorted(p.name for p in calls) == ["instances_test.json", "instances_train.json", "instances_val.json"]
    assert coco_file.read_coco(synthetic_root / "annotations" / "instances_val.json") is coco_file.read_coco(
        synthetic_root / "annotations" / "instances_val.json"
    )


def _broken_images(folder):
    """Files that decode only partly or not at all, and one whose size disagrees with the JSON."""
    save_rgb(folder, "good.jpg")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / "cut.jpg", quality=95)
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # a JPEG cut short (an interrupted copy)
    save_rgb(folder, "cut.png")
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) - 20])
    (folder / "garbage.jpg").write_bytes(b"\x00" * 64)
    save_rgb(folder, "small.jpg", width=20, height=30)


@pytest.mark.parametrize(
    "name, message",
    [
        ("cut.jpg", r"image .*cut.jpg \(image id 2\) is truncated: the JPEG file ends before its end marker"),
        ("cut.png", r"image .*cut.png \(image id 2\) is truncated: the PNG file ends before its end marker"),
        ("garbage.jpg", r"cannot read image .*garbage.jpg \(image id 2\)"),
        ("small.jpg", r"image .*small.jpg \(image id 2\) is 20x30 .* but the annotation file says 40x30"),
    ],
)
def test_bad_image_files_fail_at_setup_of_an_evaluation_split(tmp_path, name, message):
    _broken_images(tmp_path)
    path = write_coco(tmp_path, [(1, "good.jpg", 40, 30), (2, name, 40, 30)], [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [1, 1, 5, 5])])
    module = CocoDetectionDataModule(val_annotations=str(path), val_images=str(tmp_path), image_size=30, max_size=50)
    with pytest.raises(ImageReadError, match=message):
        module.setup("validate")  # before any batch is loaded
    # check_images none: the same file fails only when first read (or not at all, for a truncated JPEG
    # that PIL fills in), which is what the up-front pass is for
    lazy = CocoDetectionDataModule(val_annotations=str(path), val_images=str(tmp_path), image_size=30, max_size=50, check_images="none")
    lazy.setup("validate")
    assert len(lazy.datasets["val"]) == 2


def test_training_splits_are_checked_only_when_asked(tmp_path):
    _broken_images(tmp_path)
    path = write_coco(tmp_path, [(1, "good.jpg", 40, 30), (2, "cut.jpg", 40, 30)], [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [1, 1, 5, 5])])
    settings = dict(train_annotations=str(path), train_images=str(tmp_path), image_size=30, max_size=50)
    CocoDetectionDataModule(**settings)._dataset("train")  # default "eval": training images are read lazily
    with pytest.raises(ImageReadError, match=r"cut.jpg \(image id 2\) is truncated"):
        CocoDetectionDataModule(**settings, check_images="all")._dataset("train")
    with pytest.raises(ValueError, match=r"data.check_images must be one of \('none', 'eval', 'all'\), got 'some'"):
        CocoDetectionDataModule(**settings, check_images="some")


@pytest.mark.parametrize("subset", [{"shots_per_category": 1, "subset_seed": 7}, {"train_fraction": 0.5, "subset_seed": 3}])
def test_a_sampled_training_set_is_written_with_the_run_and_reloads_to_the_same_subset(synthetic_root, tmp_path, subset):
    """Under a Trainer the k-shot / fraction subset lands in the run folder; given back as the training file
    (without the sampling settings) it is exactly the same images and boxes."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    data = CocoDetectionDataModule(synthetic_root=str(synthetic_root), image_size=96, max_size=128, **subset)
    data.trainer = Trainer(accelerator="cpu", logger=CSVLogger(str(tmp_path)), enable_progress_bar=False)
    data.setup("fit")
    written = Path(data.trainer.log_dir) / "train_subset.json"
    sampled = data._dataset("train")
    again = CocoDetectionDataModule(
        train_annotations=str(written), train_images=str(synthetic_root / "images" / "train"), image_size=96, max_size=128,
    )._dataset("train")
    full = CocoDetectionDataModule(synthetic_root=str(synthetic_root), image_size=96, max_size=128)._dataset("train")
    assert sorted(again.image_ids) == sorted(sampled.image_ids) and len(sampled.image_ids) < len(full.image_ids)
    assert again.annotation_ids == sampled.annotation_ids
    assert json.loads(written.read_text())["categories"] == json.loads((synthetic_root / "annotations" / "instances_train.json").read_text())["categories"]
