"""The InvSeg LightningModule on the tiny random Stable Diffusion and the synthetic label maps."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grounding.data.category_lists import CategoryFile
from grounding.data.segmentation import SegmentationDataModule
from grounding.lightning.invseg_module import InvSegModule
from grounding.lightning.label_writer import LabelMapWriter
from grounding.models.invseg import predict_labels, weighted_resolution_maps
from grounding.models.invseg_inversion import BaselineSettings, InversionSettings
from grounding.models.stable_diffusion import category_prompt

SMALL = {"image_size": 64, "resolution": 8, "inversion": InversionSettings(steps=2), "log_images": 1}


def datamodule(root, **kwargs):
    return SegmentationDataModule(format="synthetic", synthetic_root=str(root), split="val", **kwargs)


@pytest.fixture(scope="module")
def invseg_run(synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("invseg")
    module = InvSegModule(**SMALL)
    data = datamodule(synthetic_root)
    trainer = Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(str(folder), name="invseg"),
                      callbacks=[LabelMapWriter()], enable_progress_bar=False, enable_model_summary=False)
    results = trainer.test(module, datamodule=data)[0]
    return module, data, trainer, results


def test_logged_miou_equals_the_written_label_maps_scored_by_hand(invseg_run):
    """The label PNGs in the run folder, scored with a confusion matrix computed here, give the logged mIoU."""
    module, data, trainer, results = invseg_run
    classes = len(data.class_names)
    matrix = np.zeros((classes, classes), dtype=np.int64)
    folder = Path(trainer.log_dir) / "predictions" / "labels"
    dataset = data.dataset
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(r.image_id for r in dataset.records)
    for index in range(len(dataset)):
        sample = dataset[index]
        pred = np.asarray(Image.open(folder / f"{sample['image_id']}.png")).astype(np.int64)
        truth = sample["labels"].numpy()
        assert pred.shape == truth.shape  # the image's own size
        valid = truth != 255
        np.add.at(matrix, (truth[valid], pred[valid]), 1)
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / union
        acc = tp / matrix.sum(1)
    assert results["test/mIoU"] == pytest.approx(np.nanmean(iou), abs=1e-6)
    assert results["test/mAcc"] == pytest.approx(np.nanmean(acc), abs=1e-6)
    assert results["test/aAcc"] == pytest.approx(tp.sum() / matrix.sum(), abs=1e-6)
    table = (Path(trainer.log_dir) / "predictions" / "invseg_val_iou.md").read_text()
    assert f"mIoU {np.nanmean(iou):.4f}" in table and "| background |" in table


def test_pictures_and_the_iou_table_reach_tensorboard(invseg_run):
    _, data, trainer, _ = invseg_run
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    images = events.Tags()["images"]
    assert len(images) == 1 and images[0].startswith("invseg/")
    picture = events.Images(images[0])[0]
    # a grid, 4 panels to a row at >= 512 px each: image | ground truth | prediction | overlay with its legend,
    # then 2 maps per category
    rows = 1 + -(-2 * len(data.class_names) // 4)
    assert 4 * 512 <= picture.width < 6 * 512 and picture.height >= rows * 512
    assert any("per_class_iou" in tag for tag in events.Tags()["tensors"])


def test_segment_is_a_function_of_the_image_not_of_the_order(synthetic_root):
    """Every draw is seeded by (seed, image id): the same image gives the same labels in any order."""
    module = InvSegModule(**SMALL)
    data = datamodule(synthetic_root)
    data.setup()
    module.set_classes(data.class_names, data.background_index)
    a, b = data.dataset[0], data.dataset[1]
    first = module.segment(a)["labels"]
    module.segment(b)
    again = module.segment(a)["labels"]
    assert torch.equal(first, again)
    other_seed = InvSegModule(**SMALL, seed=1)
    other_seed.set_classes(data.class_names, data.background_index)
    assert other_seed.segment(a)["losses"] != module.segment(a)["losses"]


def test_categories_all_oracle_and_a_list_keep_the_background_first(synthetic_root):
    data = datamodule(synthetic_root)
    data.setup()
    sample = next(s for s in (data.dataset[i] for i in range(len(data.dataset))) if len(s["present"]) > 1)
    for categories, expected in (
        ("all", list(range(len(data.class_names)))),
        ("oracle", sample["present"]),
        (["blue square", "red circle"], [0, data.class_names.index("blue square"), data.class_names.index("red circle")]),
    ):
        module = InvSegModule(**SMALL, categories=categories)
        module.set_classes(data.class_names, data.background_index)
        assert module.categories_of(sample) == expected
    seen = []

    def present_filter(image, names):  # a hand-made filter: "finds" the second and third candidates
        seen.append(list(names))
        return [1, 2]

    module = InvSegModule(**SMALL, categories="filter", category_filter=present_filter)
    module.set_classes(data.class_names, data.background_index)
    assert module.categories_of(sample) == [0, 2, 3] and seen == [data.class_names[1:]]
    with pytest.raises(ValueError, match=r"model.categories 'filter' needs model.category_filter"):
        InvSegModule(**SMALL, categories="filter")
    module = InvSegModule(**SMALL, categories=["green hexagon"])
    with pytest.raises(ValueError, match=r"model.categories names \['green hexagon'\] that are not classes of the dataset"):
        module.set_classes(data.class_names, data.background_index)


def test_diffsegmenter_predicts_the_argmax_of_the_weighted_resolution_maps(synthetic_root):
    """The baseline's labels equal the arg-max of the resolutions' maps captured and weighted here."""
    module = InvSegModule(**{**SMALL, "method": "diffsegmenter"}, baseline=BaselineSettings(weights={4: 0.3, 8: 0.5, 16: 0.2}))
    data = datamodule(synthetic_root)
    data.setup()
    module.set_classes(data.class_names, data.background_index)
    sample = data.dataset[0]
    result = module.segment(sample)
    assert result["losses"] == []
    sd = module.diffusion
    names = data.class_names
    embeddings, _ = sd.encode_prompt([category_prompt(names)])
    pixels = torch.nn.functional.interpolate(sample["image"][None].float() / 255, size=(64, 64), mode="bilinear",
                                             antialias=True, align_corners=False).clamp(0, 1)
    latents = sd.encode_image(pixels)
    generator = module.sample_generator(sample["image_id"])
    noisy = sd.noised(latents, 100, torch.randn(latents.shape, generator=generator))
    per_res = sd.attention_maps(noisy, 100, embeddings, [4, 8, 16])
    maps = weighted_resolution_maps(per_res, sd.category_token_positions(names), 16, {4: 0.3, 8: 0.5, 16: 0.2})[0]
    assert torch.equal(result["labels"], predict_labels(maps, sample["labels"].shape))


def test_a_prompt_too_long_names_the_image(synthetic_root):
    module = InvSegModule(**SMALL, categories="all")
    module.set_classes(["background"] + [f"class number {i} with a long name" for i in range(20)], 0)
    sample = {"image": torch.zeros(3, 40, 56, dtype=torch.uint8), "image_id": "img7", "present": [0]}
    with pytest.raises(ValueError, match=r"image img7: prompt .* tokens with its start and end tokens; the text encoder takes at most 77"):
        module.segment(sample)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "clip"}, r"model.method must be 'invseg' or 'diffsegmenter', got 'clip'"),
        ({"categories": []}, r"model.categories is an empty list"),
        ({"image_size": 72}, r"model.image_size 72 must be a multiple of 16 for this model"),
        ({"resolution": 5}, r"model.resolution 5 is not an attention grid of this model at image_size 64; available: \[4, 8, 16\]"),
        ({"inversion": InversionSettings(t_max=1000)}, r"model.inversion.t_max must be a timestep in \[0, 999\], got 1000"),
        ({"inversion": InversionSettings(t_min=50, t_max=10)}, r"model.inversion.t_min \(50\) and inversion.t_max \(10\) must satisfy"),
        ({"inversion": InversionSettings(min_scale=1.5)}, r"model.inversion.min_scale must be in \(0, 1\]"),
        ({"model_dtype": "int8"}, r"dtype must be one of float32, bfloat16, float16"),
        ({"method": "diffsegmenter", "baseline": BaselineSettings(weights={64: 1.0})}, r"model.baseline.weights names no attention grid"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InvSegModule(**{**SMALL, **kwargs})


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--model.method", "clip", r"model.method[\s\S]*Literal\['invseg', 'diffsegmenter'\]. Got value: clip"),
        ("--model.categories", "some", r"model.categories[\s\S]*Literal\['all', 'oracle', 'filter'\]"),
        ("--model.model_dtype", "int8", r"model.model_dtype[\s\S]*Literal\['float32', 'bfloat16', 'float16'\]"),
        ("--model.inversion.steps", "-1", r"model.inversion.steps[\s\S]*-1"),
        ("--model.inversion.min_scale", "0", r"model.inversion.min_scale[\s\S]*0"),
    ],
)
def test_the_parser_rejects_a_setting_outside_its_type_naming_the_choices(flag, value, message):
    """The settings' types (choices as Literal, positive numbers) are what the command line checks."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(InvSegModule, "model")
    parser.parse_args([])  # the defaults parse
    with pytest.raises(Exception, match=message):
        parser.parse_args([flag, value])


@pytest.mark.parametrize("how", ["autocast", "weights"])
def test_bfloat16_runs_and_keeps_the_maps_in_float32(synthetic_root, how):
    """bf16 as on a GPU (here on the CPU): autocast (--trainer.precision bf16-mixed) or bf16 weights
    (--model.model_dtype bfloat16); the attention maps and losses stay float32, the labels valid."""
    module = InvSegModule(**SMALL, model_dtype="bfloat16" if how == "weights" else "float32")
    data = datamodule(synthetic_root)
    data.setup()
    module.set_classes(data.class_names, data.background_index)
    sample = data.dataset[0]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
        result = module.segment(sample)
    assert result["after"].dtype == torch.float32 and all(np.isfinite(result["losses"]))
    assert result["labels"].shape == sample["labels"].shape
    assert set(result["labels"].unique().tolist()) <= set(range(len(data.class_names)))


def test_an_odd_sized_grey_image_gets_a_label_map_of_its_own_size(synthetic_root):
    """Any size enters the model resized to image_size; the prediction comes back at the image's size. A grey
    image is read as three equal channels by the data (here given directly as such)."""
    module = InvSegModule(**SMALL)
    module.set_classes(["background", "red circle", "blue square"], 0)
    grey = (torch.rand(1, 37, 53, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    sample = {"image": grey.expand(3, -1, -1), "image_id": "odd", "present": [0, 1]}
    result = module.segment(sample)
    assert result["labels"].shape == (37, 53) and result["after"].shape == (3, 8, 8)


# ------------------------------------------------------------------------------------- categories from a file
SHAPES = ["background", "red circle", "red square", "red triangle", "blue circle", "blue square", "blue triangle"]


def write_json(folder: Path, value) -> str:
    path = folder / "categories.json"
    path.write_text(json.dumps(value))
    return str(path)


def file_module(data, path: str, **spec) -> InvSegModule:
    module = InvSegModule(**SMALL, categories=CategoryFile(path, **spec))
    module.classes_from(data)
    return module


@pytest.mark.parametrize("key", ["image id", "file name", "path"])
def test_categories_from_a_file_are_the_images_listed_classes_with_the_background_first(synthetic_root, tmp_path, key):
    """Names, aliases and label values; an empty list is the background alone; an id the data lacks is fine."""
    data = datamodule(synthetic_root)
    data.setup()
    names, samples = data.class_names, [data.dataset[i] for i in range(len(data.dataset))]
    assert names == SHAPES
    listed, expected = {"not an image of the split.jpg": [1]}, {}
    for i, sample in enumerate(samples):
        entries = [names[1 + (i + 2) % 6], names[1 + i % 6]]  # two foreground classes, not in label order
        if i == 1:
            entries = [1 + i % 6, "background", 1 + (i + 2) % 6]  # label values, and the background named
        if i == 2:
            entries = ["red ball", names[1 + (i + 2) % 6]]  # an alias
        if i == 3:
            entries = []
        name = Path(sample["path"]).name
        keys = {"image id": sample["image_id"], "file name": name, "path": f"/elsewhere/JPEGImages/{name}"}
        listed[keys[key]] = entries
        values = {v if isinstance(v, int) else names.index({"red ball": "red circle"}.get(v, v)) for v in entries}
        expected[sample["image_id"]] = [0] + sorted(values - {0})
    module = file_module(data, write_json(tmp_path, listed), aliases={"red ball": "red circle"})
    for sample in reversed(samples):  # each image by its own id: any order, any process
        assert module.categories_of(sample) == expected[sample["image_id"]]
    assert expected[samples[3]["image_id"]] == [0]


def test_a_file_of_sections_joins_the_chosen_ones(synthetic_root, tmp_path):
    """DiffSegmenter's and iSeg's files: the image_similarity and text_similarity lists joined by default."""
    data = datamodule(synthetic_root)
    data.setup()
    sections = {"synonym_matching": {}, "image_similarity": {}, "text_similarity": {}}
    for sample in (data.dataset[i] for i in range(len(data.dataset))):
        sections["synonym_matching"][sample["image_id"]] = [SHAPES[6]]
        sections["image_similarity"][sample["image_id"]] = [SHAPES[2]]
        sections["text_similarity"][sample["image_id"]] = [SHAPES[4], SHAPES[2]]
    path = write_json(tmp_path, sections)
    sample = data.dataset[0]
    assert file_module(data, path).categories_of(sample) == [0, 2, 4]
    assert file_module(data, path, sections=["synonym_matching"]).categories_of(sample) == [0, 6]


def test_a_coco_image_is_found_by_the_number_its_published_file_name_ends_in(tmp_path):
    module = InvSegModule(**SMALL, categories=CategoryFile(write_json(tmp_path, {
        "COCO_val2014_000000182611.jpg": ["dog"], "COCO_val2014_000000000042.jpg": [1]})))
    module.set_classes(["background", "cat", "dog"], 0)
    assert module.categories_of({"image_id": "182611", "path": "/coco/val2017/000000182611.jpg"}) == [0, 2]
    assert module.categories_of({"image_id": "42", "path": None}) == [0, 1]
    assert module.categories_of({"image_id": "a copy", "path": "/copies/COCO_val2014_000000182611.png"}) == [0, 2]


@pytest.mark.parametrize(
    "content, spec, message",
    [
        ({"000013.jpg": ["red circle", "green hexagon"]}, {},
         "{p}: image '000013.jpg': 'green hexagon' is neither a class of the dataset nor an alias (aliases); "
         f"classes: {', '.join(SHAPES)}"),
        ({"000013": [2, 7]}, {}, "{p}: image '000013': label value 7 is not one of the dataset's 0..6"),
        ({"000013": [1.5]}, {}, "{p}: image '000013': 1.5 is neither a class name nor a label value"),
        ({"image_similarity": {"000013": [1]}}, {},
         "{p} has no section 'text_similarity'; its sections: image_similarity"),
        ({"000013": [1], "text_similarity": {}}, {},
         "{p}: its values must all be lists of classes (one map of images)"),
        ({"000013.jpg": [1], "/data/000013.jpg": [2]}, {},
         "{p}: '000013.jpg' and '/data/000013.jpg' name the same image '000013'"),
        ({"000013": ["plane"]}, {"aliases": {"plane": "aeroplane"}},
         "aliases maps 'plane' to 'aeroplane': not a class of the dataset"),
        ({"000013": [1]}, {"path": "absent.json"}, "category file absent.json does not exist"),
        ("not json", {}, "{p} is not JSON: Expecting value"),
    ],
)
def test_a_bad_category_file_is_an_error_naming_the_file_the_image_and_the_class(tmp_path, content, spec, message):
    path = tmp_path / "categories.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    module = InvSegModule(**SMALL, categories=CategoryFile(**{"path": str(path), **spec}))
    with pytest.raises(ValueError, match=re.escape("model.categories: " + message.format(p=f"category file {path}"))):
        module.set_classes(SHAPES, 0)


def test_an_image_missing_from_the_file_fails_the_setup_and_an_empty_list_needs_a_background(synthetic_root, tmp_path):
    data = datamodule(synthetic_root)
    data.setup()
    samples = [data.dataset[i] for i in range(len(data.dataset))]
    path = write_json(tmp_path, {sample["image_id"]: [1] for sample in samples[:-1]})
    last = samples[-1]
    with pytest.raises(ValueError, match=re.escape(
            f"model.categories: category file {path} lists no categories for image {last['image_id']} "
            f"({last['path']}); an image is named by its id, its file name or its path")):
        file_module(data, path)
    module = InvSegModule(**SMALL, categories=CategoryFile(write_json(tmp_path, {samples[0]["image_id"]: []})))
    module.set_classes(SHAPES[1:], None)  # no background class
    with pytest.raises(ValueError, match=re.escape(
            f"model.categories: category file {path} lists no class for image {samples[0]['image_id']}, "
            "and the dataset has no background class")):
        module.categories_of(samples[0])


def test_the_parser_reads_a_category_file_setting_with_the_published_sections_by_default():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(InvSegModule, "model")
    given = ["--model.image_size", "64", "--model.resolution", "8",
             "--model.categories", "{path: voc.json, aliases: {plane: aeroplane}}"]
    module = parser.instantiate(parser.parse_args(given)).model
    published = ["image_similarity", "text_similarity"]
    assert module.hparams.categories == CategoryFile("voc.json", published, {"plane": "aeroplane"})
    with pytest.raises(Exception, match=r"model.categories[\s\S]*Option 'pth' is not accepted"):
        parser.parse_args(["--model.categories", "{pth: voc.json}"])
