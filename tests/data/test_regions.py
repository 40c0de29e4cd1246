"""The region data layer (MaskInversion): readers checked against independent decodings, every bad input."""

import json
import logging
import pickle
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from grounding.data import synthetic as syn
from grounding.data.images import ImageReadError
from grounding.data.label_maps import voc_palette
from grounding.data.region_readers import (
    LabelMask,
    Region,
    RegionImageRecord,
    load_coco_regions,
    load_phrasecut_regions,
    load_refcoco_regions,
    load_semantic_regions,
)
from grounding.data.evaluation import collate_samples
from grounding.data.regions import RegionDataModule, RegionDataset

# pycocotools' decode triggers a numpy-2 DeprecationWarning inside pycocotools itself
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

SAMPLE_KEYS = {"image_id", "image", "masks", "region_ids", "class_names", "category_ids", "expressions"}


def samples(records, class_names=(), report=None):
    dataset = RegionDataset(records, list(class_names), report)
    return [dataset[i] for i in range(len(dataset))]


def save_rgb(folder, name, width=40, height=30):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / name)


def write_coco(path, images, annotations, categories=None):
    """images: (id, file_name, width, height) tuples."""
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 1, "name": "Cat"}, {"id": 2, "name": "dog"}],
    }))
    return path


def poly_ann(ann_id, image_id, polygon, category_id=1):
    xs, ys = polygon[0::2], polygon[1::2]
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "area": 1.0, "iscrowd": 0, "segmentation": [polygon]}


SQUARE = [5, 5, 20, 5, 20, 20, 5, 20]
DEGENERATE_TWO_POINTS = [5, 5, 20, 20]  # pycocotools would read 4 numbers as a box
DEGENERATE_COLLINEAR = [0, 0, 5, 0, 10, 0]


# ------------------------------------------------------------------------------------- readers on the synthetic set
def test_coco_class_regions_are_unions_of_the_instance_masks(synthetic_root):
    ann_file = syn.instances_path(synthetic_root, "train")
    records, class_names, report = load_coco_regions(ann_file, syn.images_dir(synthetic_root, "train"), level="class")
    coco = COCO(str(ann_file))
    assert class_names == [c["name"] for c in sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])]
    assert not report.counts
    expected = defaultdict(list)  # (image id, category id) -> instance masks, by pycocotools itself
    for ann in coco.loadAnns(coco.getAnnIds()):
        expected[(ann["image_id"], ann["category_id"])].append(coco.annToMask(ann).astype(bool))
    # the fixture exercises unions of several instances and RLE (occluded) segmentations
    assert any(len(m) > 1 for m in expected.values())
    assert any(isinstance(a["segmentation"], dict) for a in coco.loadAnns(coco.getAnnIds()))
    seen = set()
    for sample in samples(records, class_names):
        image_id = int(sample["image_id"])
        info = coco.loadImgs(image_id)[0]
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, info["height"], info["width"])
        assert sample["masks"].dtype == torch.bool and sample["masks"].shape[1:] == (info["height"], info["width"])
        for mask, region_id, name, category_id, expressions in zip(
            sample["masks"], sample["region_ids"], sample["class_names"], sample["category_ids"], sample["expressions"]
        ):
            assert region_id == f"{image_id}:{category_id}" and expressions == []
            assert name == coco.loadCats(category_id)[0]["name"]
            assert np.array_equal(mask.numpy(), np.logical_or.reduce(expected[(image_id, category_id)]))
            seen.add((image_id, category_id))
    assert seen == set(expected)


def test_coco_instance_regions_one_per_annotation(synthetic_root):
    ann_file = syn.instances_path(synthetic_root, "train")
    records, _, _ = load_coco_regions(ann_file, syn.images_dir(synthetic_root, "train"), level="instance")
    coco = COCO(str(ann_file))
    assert sum(len(r.regions) for r in records) == len(coco.getAnnIds())
    for sample in samples(records[:4]):
        for mask, region_id in zip(sample["masks"], sample["region_ids"]):
            assert np.array_equal(mask.numpy(), coco.annToMask(coco.loadAnns(int(region_id))[0]).astype(bool))


def test_refcoco_regions_one_per_ref_with_its_sentences(synthetic_root):
    folder = syn.refcoco_dir(synthetic_root)
    records, class_names, _ = load_refcoco_regions(folder / "refs(synthetic).p", folder / "instances.json", synthetic_root / "images", "val")
    with open(folder / "refs(synthetic).p", "rb") as handle:
        refs = {str(r["ref_id"]): r for r in pickle.load(handle) if r["split"] == "val"}
    coco = COCO(str(folder / "instances.json"))
    assert class_names == [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))]
    assert sorted(region.region_id for r in records for region in r.regions) == sorted(refs)
    for record, sample in zip(records, samples(records, class_names)):
        assert record.path == synthetic_root / "images" / coco.loadImgs(int(sample["image_id"]))[0]["file_name"]
        for mask, region_id, expressions, name in zip(sample["masks"], sample["region_ids"], sample["expressions"], sample["class_names"]):
            ref = refs[region_id]
            assert expressions == [s["sent"] for s in ref["sentences"]]
            assert name == coco.loadCats(ref["category_id"])[0]["name"]
            assert np.array_equal(mask.numpy(), coco.annToMask(coco.loadAnns(ref["ann_id"])[0]).astype(bool))


def test_generated_phrasecut_tasks_follow_the_refs(synthetic_root):
    coco = COCO(str(syn.instances_path(synthetic_root, "train")))
    refs = json.loads(syn.refs_json_path(synthetic_root, "train").read_text())
    tasks = json.loads((syn.phrasecut_dir(synthetic_root) / "refer_train.json").read_text())
    with_polygon = [r for r in refs if isinstance(coco.loadAnns(r["ann_id"])[0]["segmentation"], list)]
    assert 0 < len(with_polygon) < len(refs)  # occluded (RLE) objects get no task
    assert [t["task_id"] for t in tasks] == [f"{r['image_id']}__{r['ann_id']}" for r in with_polygon]
    for task, ref in zip(tasks, with_polygon):
        ann = coco.loadAnns(ref["ann_id"])[0]
        assert task["phrase"] == ref["sentences"][0]["sent"] and task["instance_boxes"] == [ann["bbox"]]
        assert [[v for point in polygon for v in point] for polygon in task["Polygons"][0]] == ann["segmentation"]
    image_data = json.loads((syn.phrasecut_dir(synthetic_root) / "image_data_train.json").read_text())
    assert image_data == [{"image_id": i["id"], "width": i["width"], "height": i["height"]} for i in coco.dataset["images"]]


def test_phrasecut_regions_are_the_rasterized_polygons(synthetic_root):
    refer = syn.phrasecut_dir(synthetic_root) / "refer_train.json"
    tasks = {t["task_id"]: t for t in json.loads(refer.read_text())}
    images = syn.images_dir(synthetic_root, "train")
    records, class_names, _ = load_phrasecut_regions(refer, images, syn.phrasecut_dir(synthetic_root) / "image_data_train.json", "{image_id:06d}.jpg")
    assert class_names == [] and sorted(region.region_id for r in records for region in r.regions) == sorted(tasks)
    for sample in samples(records):
        height, width = sample["image"].shape[1:]
        for mask, region_id, expressions, name in zip(sample["masks"], sample["region_ids"], sample["expressions"], sample["class_names"]):
            task = tasks[region_id]
            flat = [[v for point in polygon for v in point] for instance in task["Polygons"] for polygon in instance]
            expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(flat, height, width))).astype(bool)
            assert np.array_equal(mask.numpy(), expected)
            assert expressions == [task["phrase"]] and name is None and sample["image_id"] == str(task["image_id"])
    # without the image data file the sizes come from the images: same records
    again, _, _ = load_phrasecut_regions(refer, images, file_pattern="{image_id:06d}.jpg")
    assert [(r.image_id, r.width, r.height, len(r.regions)) for r in again] == [(r.image_id, r.width, r.height, len(r.regions)) for r in records]


def test_semantic_regions_are_label_equals_class(synthetic_root):
    labels = syn.semantic_dir(synthetic_root, "val")
    classes = synthetic_root / "semantic" / "classes.txt"
    records, class_names, _ = load_semantic_regions(syn.images_dir(synthetic_root, "val"), labels, classes)
    all_names = classes.read_text().splitlines()
    assert class_names == all_names[1:]
    ignored_seen = False
    for sample in samples(records, class_names):
        label = np.asarray(Image.open(labels / f"{sample['image_id']}.png"))
        present = sorted(set(np.unique(label).tolist()) - {0, 255})
        assert sample["category_ids"] == present and sample["class_names"] == [all_names[c] for c in present]
        assert sample["region_ids"] == [f"{sample['image_id']}:{c}" for c in present]
        for mask, value in zip(sample["masks"], sample["category_ids"]):
            assert np.array_equal(mask.numpy(), label == value)
        assert not sample["masks"][:, torch.from_numpy(label == 255)].any()  # ignore pixels are in no mask
        ignored_seen |= bool((label == 255).any())
    assert ignored_seen
    with_background, names, _ = load_semantic_regions(syn.images_dir(synthetic_root, "val"), labels, classes, ignore_background=False)
    assert names == all_names and all(r.regions[0].category_id == 0 and r.regions[0].class_name == "background" for r in with_background)


# ------------------------------------------------------------------------------------- bad inputs
def test_empty_masks_and_images_without_regions_are_counted_skips(tmp_path, caplog):
    save_rgb(tmp_path, "a.jpg")
    save_rgb(tmp_path, "b.jpg")
    empty_rle = mask_utils.encode(np.zeros((30, 40), dtype=np.uint8, order="F"))
    empty_rle["counts"] = empty_rle["counts"].decode()
    path = write_coco(tmp_path / "ann.json", [(1, "a.jpg", 40, 30), (2, "b.jpg", 40, 30)], [
        poly_ann(10, 1, SQUARE),
        poly_ann(11, 1, DEGENERATE_TWO_POINTS, category_id=2),
        poly_ann(12, 1, DEGENERATE_COLLINEAR),  # class level: unioned with 10, which is not empty
        {**poly_ann(13, 2, SQUARE, category_id=2), "segmentation": empty_rle, "iscrowd": 1},
    ])
    with caplog.at_level(logging.WARNING):
        records, _, report = load_coco_regions(path, tmp_path, level="class")
        report.log()
    assert [(r.image_id, [g.region_id for g in r.regions]) for r in records] == [("1", ["1:1"])]
    assert report.counts == {"empty mask": 2, "image without regions": 1}
    assert report.examples["empty mask"] == ["1:2", "2:2"] and report.examples["image without regions"] == ["image id 2"]
    assert "skipped 2 (empty mask), e.g. 1:2; 2:2" in caplog.text
    assert samples(records)[0]["masks"][0].sum() == 15 * 15
    records, _, report = load_coco_regions(path, tmp_path, level="instance")
    assert [g.region_id for g in records[0].regions] == ["10"] and report.examples["empty mask"] == ["11", "12", "13"]


def test_a_region_empty_only_after_decoding_is_dropped_and_counted(tmp_path):
    save_rgb(tmp_path, "a.png")
    Image.fromarray(np.ones((30, 40), dtype=np.uint8), mode="L").save(tmp_path / "label.png")
    regions = [Region("a:1", LabelMask(tmp_path / "label.png", 1), "cat", 1), Region("a:2", LabelMask(tmp_path / "label.png", 2), "dog", 2)]
    dataset = RegionDataset([RegionImageRecord("a", tmp_path / "a.png", 40, 30, regions)], ["cat", "dog"])
    sample = dataset[0]
    assert sample["region_ids"] == ["a:1"] and sample["masks"].shape == (1, 30, 40) and sample["masks"].all()
    assert dataset.report.counts == {"empty mask": 1} and dataset.report.examples["empty mask"] == ["a:2"]


def test_missing_images_are_counted_skips_in_every_reader(tmp_path):
    save_rgb(tmp_path, "a.jpg")
    path = write_coco(tmp_path / "ann.json", [(1, "a.jpg", 40, 30), (2, "gone.jpg", 40, 30)], [poly_ann(10, 1, SQUARE), poly_ann(11, 2, SQUARE)])
    records, _, report = load_coco_regions(path, tmp_path)
    assert [r.image_id for r in records] == ["1"] and report.counts == {"missing image": 1} and "gone.jpg" in report.examples["missing image"][0]

    refs = [ref(1, 10, 1), ref(2, 11, 2)]
    refs_path = tmp_path / "refs(test).p"
    refs_path.write_bytes(pickle.dumps(refs))
    records, _, report = load_refcoco_regions(refs_path, path, tmp_path, "val")
    assert [r.image_id for r in records] == ["1"] and report.counts == {"missing image": 1}

    save_rgb(tmp_path, "1.jpg")
    refer = write_json(tmp_path / "refer_val.json", [task("t1", 1, [[SQUARE_POINTS]]), task("t2", 2, [[SQUARE_POINTS]])])
    records, _, report = load_phrasecut_regions(refer, tmp_path)
    assert [r.image_id for r in records] == ["1"] and report.counts == {"missing image": 1}

    labels = tmp_path / "labels"
    labels.mkdir()
    for stem in ("a", "nothing"):
        Image.fromarray(np.ones((30, 40), dtype=np.uint8), mode="L").save(labels / f"{stem}.png")
    records, _, report = load_semantic_regions(tmp_path, labels, write_classes(tmp_path))
    # "nothing.png" has no image; the image "1.jpg" has no label PNG: neither is dropped without a word
    assert [r.image_id for r in records] == ["a"] and report.counts == {"missing image": 1, "missing label PNG": 1}
    assert "1.png" in report.examples["missing label PNG"][0]


def test_semantic_image_list_selects_the_split_and_reports_missing_labels(tmp_path, caplog):
    for stem in ("a", "b", "c"):
        save_rgb(tmp_path, f"{stem}.jpg")
    labels = tmp_path / "labels"
    labels.mkdir()
    for stem in ("a", "c"):
        Image.fromarray(np.ones((30, 40), dtype=np.uint8), mode="L").save(labels / f"{stem}.png")
    listing = tmp_path / "val.txt"
    listing.write_text("a\nb\n")
    with caplog.at_level(logging.WARNING):
        records, _, report = load_semantic_regions(tmp_path, labels, write_classes(tmp_path), image_list=listing)
        report.log()
    assert [r.image_id for r in records] == ["a"]  # c is not in the list
    assert report.counts == {"missing label PNG": 1} and "b.png" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"image list not found: .*nope.txt"):
        load_semantic_regions(tmp_path, labels, write_classes(tmp_path), image_list=tmp_path / "nope.txt")


def test_semantic_image_with_only_background_and_ignore_is_a_counted_skip(tmp_path):
    save_rgb(tmp_path, "a.jpg")
    save_rgb(tmp_path, "b.png")
    labels = tmp_path / "labels"
    labels.mkdir()
    label = np.zeros((30, 40), dtype=np.uint8)
    label[:, :5] = 255
    Image.fromarray(label, mode="L").save(labels / "b.png")
    label[10:20, 10:20] = 2
    palette = Image.fromarray(label, mode="L").convert("P")  # palette PNG: values are the indices
    palette.putpalette(voc_palette().ravel().tolist())
    palette.save(labels / "a.png")
    records, _, report = load_semantic_regions(tmp_path, labels, write_classes(tmp_path))
    assert [(r.image_id, [g.region_id for g in r.regions]) for r in records] == [("a", ["a:2"])]
    assert report.counts == {"image without regions": 1} and report.examples["image without regions"] == ["image id b"]
    assert samples(records)[0]["masks"].sum() == 100


def test_size_mismatches_fail_naming_the_file(tmp_path):
    save_rgb(tmp_path, "a.jpg", width=40, height=30)
    labels = tmp_path / "labels"
    labels.mkdir()
    Image.fromarray(np.ones((30, 41), dtype=np.uint8), mode="L").save(labels / "a.png")
    with pytest.raises(ValueError, match=r"label PNG .*labels/a.png is 41x30 but its image .*a.jpg is 40x30"):
        load_semantic_regions(tmp_path, labels, write_classes(tmp_path))
    # the annotation file's width/height contradict the image file
    path = write_coco(tmp_path / "ann.json", [(7, "a.jpg", 50, 30)], [poly_ann(10, 7, SQUARE)])
    records, _, _ = load_coco_regions(path, tmp_path)
    with pytest.raises(ImageReadError, match=r"a.jpg \(image id 7\) is 40x30 .* but the annotation file says 50x30"):
        samples(records)
    # an RLE mask of another size than its image
    rle = mask_utils.encode(np.ones((20, 40), dtype=np.uint8, order="F"))
    rle["counts"] = rle["counts"].decode()
    path = write_coco(tmp_path / "rle.json", [(7, "a.jpg", 40, 30)], [{**poly_ann(12, 7, SQUARE), "segmentation": rle}])
    with pytest.raises(ValueError, match=r"annotation file .*rle.json: annotation id 12: RLE mask is 40x20 \(w x h\) but its image is 40x30"):
        load_coco_regions(path, tmp_path)


def test_missing_files_fail_naming_the_path(tmp_path):
    save_rgb(tmp_path, "a.jpg")
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*nope.json"):
        load_coco_regions(tmp_path / "nope.json", tmp_path)
    instances = write_coco(tmp_path / "ann.json", [(1, "a.jpg", 40, 30)], [poly_ann(10, 1, SQUARE)])
    with pytest.raises(FileNotFoundError, match=r"refs file not found: .*refs\(unc\).p"):
        load_refcoco_regions(tmp_path / "refs(unc).p", instances, tmp_path, "val")
    (tmp_path / "refs.p").write_bytes(pickle.dumps([ref(1, 10, 1)]))
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*instances.json"):
        load_refcoco_regions(tmp_path / "refs.p", tmp_path / "instances.json", tmp_path, "val")
    with pytest.raises(FileNotFoundError, match=r"PhraseCut file not found: .*refer_val.json"):
        load_phrasecut_regions(tmp_path / "refer_val.json", tmp_path)
    refer = write_json(tmp_path / "refer.json", [task("t1", 1, [[SQUARE_POINTS]])])
    with pytest.raises(FileNotFoundError, match=r"PhraseCut image data file not found: .*image_data_val.json"):
        load_phrasecut_regions(refer, tmp_path, tmp_path / "image_data_val.json")
    with pytest.raises(FileNotFoundError, match=r"classes file not found: .*classes.txt"):
        load_semantic_regions(tmp_path, tmp_path, tmp_path / "classes.txt")
    with pytest.raises(FileNotFoundError, match=r"label folder not found: .*no_labels"):
        load_semantic_regions(tmp_path, tmp_path / "no_labels", write_classes(tmp_path))


def test_malformed_files_fail_naming_the_file(tmp_path):
    save_rgb(tmp_path, "a.jpg")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"annotation file .*bad.json is not valid JSON"):
        load_coco_regions(tmp_path / "bad.json", tmp_path)
    with pytest.raises(ValueError, match=r"PhraseCut file .*bad.json is not valid JSON"):
        load_phrasecut_regions(tmp_path / "bad.json", tmp_path)
    with pytest.raises(ValueError, match=r"refs file .*bad.json is not valid JSON"):
        load_refcoco_regions(tmp_path / "bad.json", tmp_path / "bad.json", tmp_path, "val")
    refer = write_json(tmp_path / "refer.json", [task("t1", 1, [[SQUARE_POINTS]])])
    with pytest.raises(ValueError, match=r"PhraseCut image data file .*bad.json is not valid JSON"):
        load_phrasecut_regions(refer, tmp_path, tmp_path / "bad.json")
    (tmp_path / "broken.p").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match=r"refs file .*broken.p is not a readable pickle"):
        load_refcoco_regions(tmp_path / "broken.p", tmp_path / "bad.json", tmp_path, "val")
    write_json(tmp_path / "dict.json", {"task_id": "t1"})
    with pytest.raises(ValueError, match=r"PhraseCut file .*dict.json is not a JSON list of tasks"):
        load_phrasecut_regions(tmp_path / "dict.json", tmp_path)


def test_inconsistent_ids_and_labels_fail_naming_file_and_id(tmp_path):
    save_rgb(tmp_path, "a.jpg")
    path = write_coco(tmp_path / "ann.json", [(1, "a.jpg", 40, 30)], [poly_ann(10, 1, SQUARE), poly_ann(11, 1, SQUARE, category_id=99)])
    with pytest.raises(ValueError, match=r"annotation file .*ann.json: annotation id 11 has unknown category id 99 \(known: \[1, 2\]\)"):
        load_coco_regions(path, tmp_path)
    instances = write_coco(tmp_path / "instances.json", [(1, "a.jpg", 40, 30)], [poly_ann(10, 1, SQUARE)])
    for bad_ref, message in [
        (ref(5, 77, 1), r"refs file .*refs.p: ref id 5 refers to annotation id 77 missing from .*instances.json"),
        (ref(6, 10, 42), r"refs file .*refs.p: ref id 6 refers to image id 42 missing from .*instances.json"),
    ]:
        (tmp_path / "refs.p").write_bytes(pickle.dumps([ref(1, 10, 1), bad_ref]))
        with pytest.raises(ValueError, match=message):
            load_refcoco_regions(tmp_path / "refs.p", instances, tmp_path, "val")
    with pytest.raises(ValueError, match=r"refs file .*refs.p has no ref of split 'testA' \(splits: val\)"):
        load_refcoco_regions(tmp_path / "refs.p", instances, tmp_path, "testA")
    labels = tmp_path / "labels"
    labels.mkdir()
    label = np.zeros((30, 40), dtype=np.uint8)
    label[0, 0] = 3  # classes.txt lists 3 classes: values 0..2
    Image.fromarray(label, mode="L").save(labels / "a.png")
    with pytest.raises(ValueError, match=r"label PNG .*labels/a.png has label value 3 but .*classes.txt lists 3 classes \(values 0..2, 255 = ignore\)"):
        load_semantic_regions(tmp_path, labels, write_classes(tmp_path))


def test_phrasecut_unions_all_instances_and_reads_the_head_noun(tmp_path):
    save_rgb(tmp_path, "3.jpg")
    other = [[30, 2], [38, 2], [38, 10], [30, 10]]
    refer = write_json(tmp_path / "refer.json", [
        {**task("3__1", 3, [[SQUARE_POINTS], [other, [[0, 0], [1, 1]]]]), "phrase_structure": {"name": "Two  Cats"}},
        task("3__2", 3, [[[[5, 5], [20, 20]]]]),  # degenerate: empty mask
    ])
    records, class_names, report = load_phrasecut_regions(refer, tmp_path)
    assert class_names == ["two cats"] and report.counts == {"empty mask": 1} and report.examples["empty mask"] == ["3__2"]
    sample = samples(records)[0]
    assert sample["class_names"] == ["two cats"] and sample["expressions"] == [["the thing"]] and sample["category_ids"] == [None]
    assert sample["masks"].sum() == 15 * 15 + 8 * 8


# ------------------------------------------------------------------------------------- DataModule
@pytest.mark.parametrize("settings", [
    {"task": "class"},
    {"task": "class", "level": "instance"},
    {"task": "referring"},
    {"task": "semantic"},
    {"task": "phrasecut"},
    {"format": "coco", "annotations": "annotations/instances_val.json", "images": "images/val"},
    {"format": "refcoco", "refs": "refcoco/refs(synthetic).p", "annotations": "refcoco/instances.json", "images": "images"},
    {"format": "phrasecut", "annotations": "phrasecut/refer_val.json", "images": "images/val", "file_pattern": "{image_id:06d}.jpg"},
    {"format": "semantic", "images": "images/val", "labels": "semantic/val", "classes": "semantic/classes.txt"},
])
def test_datamodule_yields_the_documented_samples(synthetic_root, settings):
    settings = {k: str(synthetic_root / v) if k in ("annotations", "images", "refs", "labels", "classes") else v for k, v in settings.items()}
    module = RegionDataModule(synthetic_root=str(synthetic_root), split="val", batch_size=2, **settings)
    module.setup("test")
    batches = list(module.test_dataloader())
    assert [len(b) for b in batches] == [2, 2, 1]  # 5 val images, lists of samples
    expected_names = [] if "phrasecut" in settings.values() else syn.category_names(syn.SyntheticConfig(**syn.load_meta(synthetic_root)["config"]))
    assert module.class_names == expected_names
    for sample in [s for b in batches for s in b]:
        assert set(sample) == SAMPLE_KEYS and isinstance(sample["image_id"], str)
        image, masks = sample["image"], sample["masks"]
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and masks.dtype == torch.bool
        assert masks.shape[1:] == image.shape[1:] and len(masks) > 0 and masks.flatten(1).any(1).all()
        for key in ("region_ids", "class_names", "category_ids", "expressions"):
            assert len(sample[key]) == len(masks)
    assert len(list(module.predict_dataloader())) == 3
    module = RegionDataModule(synthetic_root=str(synthetic_root), split="val", max_images=2, **settings)
    module.setup()
    assert [len(b) for b in module.predict_dataloader()] == [1, 1]


def test_datamodule_generates_the_synthetic_set_when_absent(tmp_path):
    root = tmp_path / "generated"
    module = RegionDataModule(synthetic_root=str(root), synthetic={"image_size": 64, "num_train": 1, "num_val": 2, "num_test": 1}, task="semantic")
    assert module.class_names[:2] == ["red circle", "red square"] and (root / "meta.json").is_file()
    assert len(module.dataset) == 2
    # a synthetic set from before the PhraseCut files: the error says how to get them
    for path in (root / "phrasecut").iterdir():
        path.unlink()
    module = RegionDataModule(synthetic_root=str(root), task="phrasecut")
    with pytest.raises(FileNotFoundError, match=r"PhraseCut file not found: .*refer_val.json \(the synthetic dataset at .* predates"):
        module.setup()


@pytest.mark.parametrize("settings, message", [
    ({"format": "voc"}, r"format must be one of synthetic, coco, refcoco, phrasecut, semantic; got 'voc'"),
    ({"task": "detection"}, r"task must be one of class, referring, semantic, phrasecut \(format 'synthetic'\); got 'detection'"),
    ({"level": "pixel"}, r"level must be 'class' or 'instance'; got 'pixel'"),
    ({"max_images": 0}, r"max_images must be a positive integer or None; got 0"),
    ({"format": "coco", "images": "x"}, r"format 'coco' needs annotations \(set: annotations, images\)"),
    ({"format": "semantic"}, r"format 'semantic' needs images, labels, classes"),
    ({"synthetic_root": None}, r"format 'synthetic' needs synthetic_root"),
])
def test_datamodule_rejects_bad_settings_naming_them(settings, message):
    with pytest.raises(ValueError, match=message):
        RegionDataModule(**settings)


def test_collate_keeps_the_samples():
    batch = [{"image": torch.zeros(3, 4, 5)}, {"image": torch.zeros(3, 6, 2)}]
    assert collate_samples(batch) is batch


# ------------------------------------------------------------------------------------- helpers
SQUARE_POINTS = [[5, 5], [20, 5], [20, 20], [5, 20]]


def ref(ref_id, ann_id, image_id, split="val"):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1, "split": split,
            "file_name": f"a_{ann_id}.jpg", "sent_ids": [ref_id], "sentences": [{"sent_id": ref_id, "sent": f"ref {ref_id}", "raw": "", "tokens": []}]}


def task(task_id, image_id, polygons_per_instance):
    return {"task_id": task_id, "image_id": image_id, "phrase": "the thing", "instance_boxes": [[0, 0, 1, 1]] * len(polygons_per_instance),
            "Polygons": polygons_per_instance}


def write_json(path, payload):
    path.write_text(json.dumps(payload))
    return path


def write_classes(folder):
    path = folder / "classes.txt"
    path.write_text("background\ncat\ndog\n")
    return path
