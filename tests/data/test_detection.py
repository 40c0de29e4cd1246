"""The detection DataModule in training: unreadable images met mid-epoch are skipped and counted (also with
loader workers), up to ``max_bad_images``; and the DataModule's old import path still loads."""

import json
import logging
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from grounding.data.coco import CocoDetection, collate_detection
from grounding.data.detection import CocoDetectionDataModule
from grounding.data.images import ImageReadError, read_rgb_image
from grounding.data.skips import SkipReport, UnreadableImage, UnreadableImages

# the recording module below trains only: Lightning notes that the DataModule also offers a validation loader
pytestmark = pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")


@pytest.fixture
def train_split(synthetic_root, tmp_path):
    """A copy of the synthetic training split that a test may break: (annotation file, image folder, {file: id})."""
    images = tmp_path / "train"
    shutil.copytree(synthetic_root / "images" / "train", images)
    annotations = synthetic_root / "annotations" / "instances_train.json"
    ids = {entry["file_name"]: entry["id"] for entry in json.loads(annotations.read_text())["images"]}
    return annotations, images, ids


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy


def garbage(path):
    path.write_bytes(b"\x00" * 64)


def wrong_size(path):
    Image.fromarray(np.zeros((30, 20, 3), dtype=np.uint8)).save(path)  # 20x30, the JSON says 96x96


def module(train_split, **settings):
    annotations, images, _ = train_split
    return CocoDetectionDataModule(train_annotations=str(annotations), train_images=str(images), image_size=64,
                                   max_size=100, crop_prob=0.0, **settings)


class Recorder(L.LightningModule):
    """Trains one weight on the mean pixel and records the image ids of every batch it is given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []

    def training_step(self, batch, batch_index):
        assert set(batch) == {"pixel_values", "pixel_mask", "targets"}
        self.seen += [target["image_id"] for target in batch["targets"]]
        return (self.weight * batch["pixel_values"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(data, epochs=2):
    model = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    return model


def test_an_unreadable_training_image_is_skipped_counted_once_and_logged_with_workers(train_split, caplog):
    _, images, ids = train_split
    bad = images / "000003.jpg"
    truncate(bad)
    data = module(train_split, batch_size=3, num_workers=2, max_bad_images=1)
    with caplog.at_level(logging.WARNING, logger="grounding.data.skips"):
        model = fit(data)
    good = sorted(i for name, i in ids.items() if name != bad.name)
    assert sorted(model.seen) == sorted(good * 2)  # two epochs of every other image, each once per epoch
    assert list(data.unreadable.files) == [str(bad)] and len(data.unreadable) == 1
    assert data.datasets["train"].skipped.counts["unreadable image"] == 1  # met twice, counted once
    assert data.datasets["train"].skipped.examples["unreadable image"] == [f"image id {ids[bad.name]}: {bad}"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "grounding.data.skips"]
    assert len(warnings) == 1, warnings  # the report's source names the annotation file
    assert warnings[0].startswith(
        f"{data.datasets['train'].annotation_file}: skipped unreadable training image 1 (at most 1): {bad} (image id"
        f" {ids[bad.name]}): cannot read image {bad} (image id {ids[bad.name]}): image file is truncated"
    ), warnings[0]


def test_more_unreadable_images_than_the_limit_stop_the_run_listing_every_file(train_split):
    _, images, ids = train_split
    broken = {images / "000002.jpg": truncate, images / "000005.jpg": garbage, images / "000009.jpg": wrong_size}
    expected = []
    for path, damage in broken.items():
        damage(path)
        with pytest.raises(ImageReadError) as error:
            read_rgb_image(path, (96, 96), ids[path.name])
        expected.append(f"  {path} (image id {ids[path.name]}): {error.value}")
    data = module(train_split, batch_size=2, num_workers=2, max_bad_images=2)
    with pytest.raises(ImageReadError) as stopped:
        fit(data, epochs=1)
    first, *listed = str(stopped.value).split("\n")
    assert first == "training images that could not be read: 3, more than data.max_bad_images=2 allows:"
    assert sorted(listed) == sorted(expected)
    assert "is 20x30 (EXIF-oriented 20x30) but the annotation file says 96x96" in "\n".join(listed)


def test_with_no_bad_image_allowed_the_first_one_stops_the_run(train_split):
    _, images, ids = train_split
    garbage(images / "000004.jpg")
    with pytest.raises(ImageReadError, match=r"^training images that could not be read: 1, more than data.max_bad_images=0 allows:\n"
                                             rf"  {images / '000004.jpg'} \(image id {ids['000004.jpg']}\): cannot read image "):
        fit(module(train_split, batch_size=2, num_workers=0, max_bad_images=0), epochs=1)


def test_a_batch_of_only_unreadable_images_is_left_out_but_still_counts_as_consumed(train_split):
    _, images, ids = train_split
    garbage(images / "000007.jpg")
    data = module(train_split, batch_size=1, num_workers=0)
    data.setup("fit")
    loader = data.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(ids) - 1 == len(loader) - 1
    assert ids["000007.jpg"] not in [b["targets"][0]["image_id"] for b in batches]
    assert loader.state_dict() == {"epoch": 0, "batches": len(ids)}  # a resume skips the left-out batch too
    assert len(data.unreadable) == 1


def test_under_several_processes_a_batch_of_only_unreadable_images_is_an_error():
    counter = UnreadableImages(5, SkipReport("train.json"), num_processes=2)
    assert counter.screen({"pixel_values": 1, "unreadable": [UnreadableImage("a.jpg", 7, "broken")]}) == {"pixel_values": 1}
    with pytest.raises(ImageReadError) as error:
        counter.screen({"unreadable": [UnreadableImage("b.jpg", 8, "cut short")]})
    assert str(error.value) == ("every image of a training batch could not be read, and with 2 processes the batch cannot"
                                " be left out (the processes would fall out of step): b.jpg (image id 8): cut short")
    assert list(counter.files) == ["a.jpg", "b.jpg"] and counter.report.counts["unreadable image"] == 2


def test_only_the_training_dataset_skips_and_collate_hands_the_skips_on(train_split):
    annotations, images, ids = train_split
    truncate(images / "000001.jpg")
    index = sorted(ids.values()).index(ids["000001.jpg"])
    evaluation = CocoDetection(annotations, images)
    with pytest.raises(ImageReadError, match=r"000001.jpg \(image id \d+\): image file is truncated"):
        evaluation[index]
    training = CocoDetection(annotations, images, train=True, skip_unreadable=True)
    skipped = training[(index, 0)]
    assert isinstance(skipped, UnreadableImage) and skipped.path == str(images / "000001.jpg")
    assert skipped.image_id == ids["000001.jpg"] and "image file is truncated" in skipped.error
    good = training[(index + 1, 0)]
    batch = collate_detection([skipped, good])
    assert batch["unreadable"] == [skipped] and batch["pixel_values"].shape[0] == 1
    assert batch["targets"][0]["image_id"] == good[1]["image_id"]
    assert collate_detection([skipped]) == {"unreadable": [skipped]}
    assert "unreadable" not in collate_detection([good])


@pytest.mark.parametrize("value", [-1, True, 2.5])
def test_max_bad_images_is_checked(train_split, value):
    with pytest.raises(ValueError, match=rf"^data.max_bad_images must be an integer >= 0, got {value!r}$"):
        module(train_split, max_bad_images=value)


# ------------------------------------------------------------------------------------- the old import path
def test_run_configs_and_checkpoints_naming_the_old_module_still_load(synthetic_root, tmp_path):
    """Runs saved before the DataModule moved to grounding.data.detection name grounding.data.datamodule in
    their config.yaml (read again to resume) and in their checkpoints' datamodule hyper-parameters."""
    from jsonargparse import ArgumentParser

    import grounding.data.datamodule as old

    assert old.CocoDetectionDataModule is CocoDetectionDataModule
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    settings = {"synthetic_root": str(synthetic_root), "image_size": 64, "max_size": 100}
    config = parser.parse_object({"data": {"class_path": "grounding.data.datamodule.CocoDetectionDataModule", "init_args": settings}})
    data = parser.instantiate_classes(config).data
    assert type(data) is CocoDetectionDataModule and data.hparams.image_size == 64

    checkpoint = {"pytorch-lightning_version": L.__version__, "state_dict": {}, "datamodule_hparams_name": "kwargs",
                  "datamodule_hyper_parameters": {"_class_path": "grounding.data.datamodule.CocoDetectionDataModule",
                                                  "_instantiator": "lightning.pytorch.cli.instantiate_module", **settings}}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = L.LightningDataModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert type(loaded) is CocoDetectionDataModule and loaded.hparams.max_size == 100
