"""GroundingDetector: a trained checkpoint's detector outside Lightning, equal to transformers' own loop, its
pipeline on the exported folder and the project's evaluation path; checkpoints read without unpickling."""

from __future__ import annotations

import types

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import box_convert
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, pipeline

from grounding.data.coco import collate_detection, detection_transforms
from grounding.data.detection import CocoDetectionDataModule
from grounding.lightning.image_module import ImageGroundingModule
from grounding.models.adaptive_masking import MaskingConfig
from grounding.models.denoising import DenoisingConfig
from grounding.models.detector import (
    CheckpointError,
    GroundingDetector,
    build_processor,
    class_prompt,
    read_checkpoint,
)

from ..conftest import TEST_MODEL_CONFIG

#: the resize of the trained checkpoint: the 96 px synthetic images are read at 80 px (a real resize)
IMAGE_SIZE, MAX_SIZE = 80, 120


def train_checkpoint(root, folder) -> types.SimpleNamespace:
    """Two training steps of ImageGroundingModule on the synthetic set, saved by the Trainer.

    The module is built in Python with config dataclasses (as a script would), so its hyper-parameters hold
    ``MaskingConfig`` / ``DenoisingConfig`` objects: a plain ``weights_only`` load cannot read the checkpoint.
    """
    torch.manual_seed(0)
    module = ImageGroundingModule(
        model="tiny", model_config=TEST_MODEL_CONFIG, masking=MaskingConfig(variant="threshold"),
        denoising=DenoisingConfig(number=3), log_images=False, lr=1e-3, lr_backbone=1e-3,
    )
    data = CocoDetectionDataModule(
        synthetic_root=str(root), image_size=IMAGE_SIZE, max_size=MAX_SIZE, batch_size=2, num_workers=0, crop_prob=0.0,
    )
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(folder),
    )
    before = {k: v.clone() for k, v in module.detector.state_dict().items()}
    trainer.fit(module, datamodule=data)
    assert any(not torch.equal(before[k], v) for k, v in module.detector.state_dict().items())  # it did train
    path = folder / "last.ckpt"
    trainer.save_checkpoint(path)
    return types.SimpleNamespace(module=module.eval(), data=data, path=path)


def photo(height: int, width: int, seed: int = 0) -> Image.Image:
    """Coloured shapes on a noisy grey background."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(90, 160, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    pixels[(yy - height // 2) ** 2 + (xx - width // 4) ** 2 < (min(height, width) // 5) ** 2] = (220, 30, 30)
    pixels[height // 4: height // 2, width // 2: width // 2 + height // 4] = (30, 40, 220)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def trained(trained_detector):
    return trained_detector


@pytest.fixture(scope="module")
def detector(trained):
    return GroundingDetector.from_checkpoint(trained.path)


@pytest.fixture(scope="module")
def exported(detector, tmp_path_factory):
    return detector.save_pretrained(tmp_path_factory.mktemp("export") / "detector")


class Marker:
    """An object no checkpoint loader should unpickle."""

    def __init__(self, value: int = 1):
        self.value = value


def sorted_by_score(result: dict) -> dict:
    order = torch.argsort(result["scores"], descending=True, stable=True)
    return {"scores": result["scores"][order], "boxes": result["boxes"][order],
            "text_labels": [result["text_labels"][i] for i in order.tolist()]}


# ------------------------------------------------------------------------------------------------ loading
def test_checkpoint_is_read_with_weights_only_and_only_the_config_dataclasses(trained, detector):
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(trained.path))
    assert any(name.endswith("MaskingConfig") for name in unsafe) and any(name.endswith("DenoisingConfig") for name in unsafe)
    with pytest.raises(Exception, match="Weights only load failed"):  # what a plain weights_only load says
        torch.load(trained.path, map_location="cpu", weights_only=True)
    checkpoint = read_checkpoint(trained.path)
    assert isinstance(checkpoint["hyper_parameters"]["masking"], MaskingConfig)
    # the detector: the module's trained weights, and the DataModule's resize
    for key, value in trained.module.detector.state_dict().items():
        assert torch.equal(detector.model.state_dict()[key], value), key
    assert detector.processor.image_processor.size["shortest_edge"] == IMAGE_SIZE
    assert detector.processor.image_processor.size["longest_edge"] == MAX_SIZE
    assert not detector.model.training


def test_a_checkpoint_with_another_pickled_object_is_refused(trained, tmp_path):
    checkpoint = torch.load(trained.path, map_location="cpu", weights_only=False)  # our own file, in the test
    checkpoint["extra"] = Marker(3)
    path = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle arbitrary objects") as error:
        GroundingDetector.from_checkpoint(path)
    assert str(path) in str(error.value) and "Marker" in str(error.value)
    assert Marker.__name__ not in str(read_checkpoint(trained.path).keys())  # the clean one still reads

    other = torch.load(trained.path, map_location="cpu", weights_only=False)
    other["hyper_parameters"]["_class_path"] = "grounding.lightning.gem_module.GemModule"
    torch.save(other, tmp_path / "gem.ckpt")
    with pytest.raises(CheckpointError, match="checkpoint of GemModule"):
        GroundingDetector.from_checkpoint(tmp_path / "gem.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        GroundingDetector.from_checkpoint(tmp_path / "missing.ckpt")


# ------------------------------------------------------------------------------------------------ export
def test_the_exported_folder_loads_in_transformers_with_the_checkpoint_weights(trained, exported):
    model = AutoModelForZeroShotObjectDetection.from_pretrained(exported)
    processor = AutoProcessor.from_pretrained(exported)
    weights = {k[len("detector."):]: v for k, v in torch.load(trained.path, map_location="cpu", weights_only=False)["state_dict"].items()
               if k.startswith("detector.")}
    loaded = model.state_dict()
    assert set(loaded) == set(weights)
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key
    assert processor.image_processor.size["shortest_edge"] == IMAGE_SIZE
    text = "red circle. blue square."
    assert processor.tokenizer(text)["input_ids"] == trained.module.tokenizer(text)["input_ids"]


def test_detections_equal_transformers_own_loop(detector, exported):
    images = [photo(96, 96), photo(70, 130, seed=1)]  # two sizes: the processor pads the batch
    model = AutoModelForZeroShotObjectDetection.from_pretrained(exported).eval()
    processor = AutoProcessor.from_pretrained(exported)

    def loop(text: str, threshold: float) -> list[dict]:
        inputs = processor(images=images, text=[text] * len(images), return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        return processor.post_process_grounded_object_detection(
            outputs, input_ids=inputs["input_ids"], threshold=threshold, text_threshold=0.25,
            target_sizes=[(image.height, image.width) for image in images])

    for text, classes in (("red circle. blue square.", None), (None, ["red circle", "blue square"])):
        prompt = text if text is not None else class_prompt(classes)
        threshold = float(loop(prompt, 0.0)[0]["scores"].median())  # about half the boxes pass
        expected = [sorted_by_score(r) for r in loop(prompt, threshold)]
        got = detector(images, text=text, classes=classes, box_threshold=threshold)
        assert [(r["width"], r["height"]) for r in got] == [(96, 96), (130, 70)]
        assert 0 < len(got[0]["scores"]) < 30
        for record, reference in zip(got, expected):
            assert torch.allclose(torch.tensor(record["scores"]), reference["scores"], rtol=0, atol=1e-6)
            assert torch.allclose(torch.tensor(record["boxes"]).reshape(-1, 4), reference["boxes"], atol=1e-4)
            if classes is None:
                assert record["labels"] == reference["text_labels"]
            else:
                assert set(record["labels"]) <= set(classes)
        top = detector(images, text=text, classes=classes, box_threshold=threshold, top_k=2)
        for record, full in zip(top, got):
            assert record["scores"] == full["scores"][:2] and record["labels"] == full["labels"][:2]


def test_pipeline_on_the_exported_folder_equals_the_detector(detector, exported, tmp_path):
    image_path = tmp_path / "photo.png"
    photo(90, 120, seed=2).save(image_path)
    labels = ["red circle", "blue square"]
    detect = pipeline("zero-shot-object-detection", model=str(exported))
    # transformers' pipeline runs the model once per candidate label, with that label alone as the prompt,
    # and truncates its boxes to integers: the detector with text=label, merged and sorted the same way
    per_label = [(label, detector(image_path, text=label, box_threshold=0.0)) for label in labels]
    everything = sorted(((s, label, b) for label, r in per_label for s, b in zip(r["scores"], r["boxes"])),
                        key=lambda entry: entry[0], reverse=True)
    threshold = everything[len(everything) // 2][0]
    expected = [(s, label, b) for s, label, b in everything if s > threshold][:7]
    got = detect(str(image_path), candidate_labels=labels, threshold=threshold, top_k=7)
    assert len(got) == len(expected) > 0
    for found, (score, label, box) in zip(got, expected):
        # (its score is the sigmoid of the best logit, the detector's the best sigmoid: equal up to rounding)
        assert found["label"] == label and found["score"] == pytest.approx(score, rel=0, abs=1e-6)
        assert [found["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] == [int(v) for v in box]
    # the classes= prompt is the processor's own join of candidate labels
    processor = AutoProcessor.from_pretrained(exported)
    classes = ["Red circle", " blue square ", "traffic light"]
    merged = processor(text=classes, return_tensors="pt")["input_ids"][0].tolist()
    assert class_prompt(classes) == "red circle. blue square. traffic light."
    assert merged == processor.tokenizer(class_prompt(classes))["input_ids"]


def test_boxes_and_labels_equal_the_evaluation_path(trained, detector):
    """The evaluation transform and the processor give the same input for this (uncapped) resize, the class
    prompt the same tokens as the module's prompt, so every box the detector keeps is one of the module's
    ``detect`` boxes, labelled with the category that scores best for it there."""
    data, module = trained.data, trained.module
    data.setup("validate")
    dataset = data.datasets["val"]
    module.set_categories(data.categories)
    names = [data.categories[c] for c in module.prompts[0].category_ids]
    assert len(module.prompts) == 1
    assert detector.processor.tokenizer(class_prompt(names))["input_ids"] == module.prompts[0].input_ids.tolist()
    batch = collate_detection([dataset[0]])
    target = batch["targets"][0]
    assert target["size"].tolist() == [IMAGE_SIZE, IMAGE_SIZE] and target["orig_size"].tolist() == [96, 96]
    with torch.no_grad():
        module_detections = module.detect(batch["pixel_values"], batch["pixel_mask"], target["orig_size"][None])[0]
    boxes = box_convert(module_detections["boxes"], "xywh", "xyxy")
    found = detector(dataset.records[0].path, classes=names, box_threshold=0.0)
    assert len(found["boxes"]) == module.detector.config.num_queries
    for box, label in zip(found["boxes"], found["labels"]):
        distance = (boxes - torch.tensor(box)).abs().max(-1).values
        assert float(distance.min()) < 1e-3
        best = int(torch.nonzero(distance < 1e-3)[0])  # the module's detections are sorted by score
        assert data.categories[int(module_detections["category_ids"][best])] == label
    # every_class: the evaluation's own (box, category) pairs, scores and order
    kept = len(module_detections["scores"])
    every = detector(dataset.records[0].path, classes=names, box_threshold=0.0, top_k=kept, every_class=True)
    assert len(every["scores"]) == kept == min(module.hparams.num_detections, module.detector.config.num_queries * len(names))
    assert torch.allclose(torch.tensor(every["scores"]), module_detections["scores"].cpu(), atol=1e-6)
    assert torch.allclose(torch.tensor(every["boxes"]), boxes.cpu(), atol=1e-3)
    assert every["labels"] == [data.categories[int(c)] for c in module_detections["category_ids"]]


def test_processor_and_evaluation_transform(trained):
    """Same pixels where the sizes agree (no cap on the longer side); a capped resize can differ by a pixel."""
    processor = build_processor(trained.module.tokenizer, IMAGE_SIZE, MAX_SIZE)
    transform = detection_transforms(False, IMAGE_SIZE, MAX_SIZE)
    image = torch.from_numpy(np.array(photo(96, 130))).permute(2, 0, 1).contiguous()
    ours = transform({"image": tv_tensors.Image(image)})["image"]
    theirs = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 80, 108)
    assert float((ours - theirs).abs().max()) < 1e-5
    capped = torch.zeros(3, 40, 95, dtype=torch.uint8)  # 95 / 40 * 80 > 120
    ours = transform({"image": tv_tensors.Image(capped)})["image"].shape[-2:]
    theirs = processor.image_processor(capped, return_tensors="pt")["pixel_values"].shape[-2:]
    assert tuple(ours) == (50, 120) and tuple(theirs) == (51, 120)


# ------------------------------------------------------------------------------------------------ inputs
def test_inputs_and_errors(detector, tmp_path):
    picture = photo(64, 90, seed=3)
    picture.save(tmp_path / "p.png")
    tensor = torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous()
    classes = ["red circle", "blue square"]
    results = [detector(x, classes=classes, box_threshold=0.0, top_k=5) for x in (picture, tmp_path / "p.png", str(tmp_path / "p.png"), tensor)]
    assert all(r == results[0] for r in results)
    assert results[0]["width"] == 90 and results[0]["height"] == 64 and len(results[0]["boxes"]) == 5
    assert all(0 <= v <= 90 + 1e-3 for box in results[0]["boxes"] for v in box[0::2])
    assert detector([picture], classes=classes, box_threshold=0.0, top_k=5) == [results[0]]
    for bad, message in (
        ({"classes": []}, "classes is empty"),
        ({"text": "  "}, "text is empty"),
        ({}, "either text"),
        ({"text": "a", "classes": ["a"]}, "either text"),
        ({"classes": ["a.b"]}, "contains '.'"),
        ({"classes": ["cat", "Cat"]}, "repeats"),
        ({"classes": ["cat"], "top_k": 0}, "top_k"),
        ({"classes": ["cat"], "box_threshold": 2}, "box_threshold"),
    ):
        with pytest.raises(ValueError, match=message):
            detector(picture, **bad)
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        detector(tmp_path / "nothing.png", classes=classes)
    with pytest.raises(ValueError, match="uint8"):
        detector(tensor.float(), classes=classes)
    with pytest.raises(ValueError, match="max_text_len"):
        detector(picture, text=" . ".join(["red circle"] * 20))


def test_save_pretrained_is_atomic(detector, exported, tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        detector.save_pretrained(target)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "keep.txt").read_text() == "mine"

    def broken(folder):
        (folder / "half.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(detector.processor, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        detector.save_pretrained(target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["keep.txt"]
    monkeypatch.undo()
    detector.save_pretrained(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in exported.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it
