"""GEM's evaluation modules on the tiny random CLIP: segmentation (mIoU, background rule, sliding windows) and
OpenImages-style point prediction (p-mIoU)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from grounding.data.openimages_points import OpenImagesPointsDataModule
from grounding.data.segmentation import SegmentationDataModule
from grounding.lightning.gem_module import GEMPointModule, GEMSegmentationModule
from grounding.lightning.label_writer import LabelMapWriter
from grounding.metrics.point_miou import point_counts, point_scores

SMALL = {"depth": 3, "short_side": 64, "log_images": 1}


def trainer_for(folder, callbacks=()):
    return Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(str(folder), name="gem"),
                   callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False)


@pytest.mark.parametrize("method", ["gem", "plain", "maskclip", "clipsurgery"])
def test_logged_miou_equals_the_written_label_maps_scored_by_hand(synthetic_root, tmp_path, method):
    data = SegmentationDataModule(format="synthetic", synthetic_root=str(synthetic_root), split="val")
    trainer = trainer_for(tmp_path, [LabelMapWriter()])
    results = trainer.test(GEMSegmentationModule(method=method, **SMALL), datamodule=data)[0]
    classes = len(data.class_names)
    matrix = np.zeros((classes, classes), dtype=np.int64)
    folder = Path(trainer.log_dir) / "predictions" / "labels"
    for index in range(len(data.dataset)):
        sample = data.dataset[index]
        pred = np.asarray(Image.open(folder / f"{sample['image_id']}.png")).astype(np.int64)
        truth = sample["labels"].numpy()
        valid = truth != 255
        np.add.at(matrix, (truth[valid], pred[valid]), 1)
    tp = np.diag(matrix).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (matrix.sum(0) + matrix.sum(1) - tp)
    assert results["test/mIoU"] == pytest.approx(np.nanmean(iou), abs=1e-6)
    assert (Path(trainer.log_dir) / "predictions" / "gem_val_iou.md").is_file()
    # beside each label PNG, the map over its image with a legend, at a readable size
    overlays = Path(trainer.log_dir) / "predictions" / "labels_overlays"
    assert sorted(p.name for p in overlays.iterdir()) == sorted(p.name for p in folder.iterdir())
    with Image.open(next(overlays.iterdir())) as picture:
        assert picture.mode == "RGB" and max(picture.size) > 512


def test_background_where_the_softmax_of_the_foreground_similarities_is_not_confident():
    module = GEMSegmentationModule(**SMALL)
    module.set_classes(["background", "cat", "dog"], background_index=0)
    # pixel 0: cat far ahead; pixel 1: cat and dog close (softmax max ~0.55); pixel 2: dog ahead
    maps = torch.tensor([[[0.30, 0.201, 0.10]], [[0.10, 0.200, 0.30]]])  # (C_fg=2, 1, 3)
    labels = module.predict_labels(maps)
    probabilities = torch.softmax(100 * maps, dim=0)
    expected = [0 if p.max() < 0.85 else 1 + int(p.argmax()) for p in probabilities.permute(1, 2, 0).reshape(-1, 2)]
    assert labels.flatten().tolist() == expected == [1, 0, 2]
    no_background = GEMSegmentationModule(**SMALL)
    no_background.set_classes(["wall", "floor"], background_index=None)
    assert no_background.predict_labels(maps).flatten().tolist() == [0, 0, 1]  # arg-max only


def test_point_module_logs_the_p_miou_of_its_own_maps(synthetic_root, tmp_path):
    data = OpenImagesPointsDataModule(synthetic_root=str(synthetic_root), split="val")
    module = GEMPointModule(**SMALL)
    results = trainer_for(tmp_path).test(module, datamodule=data)[0]
    tp = fp = fn = torch.zeros(len(data.class_names), dtype=torch.long)
    for index in range(len(data.dataset)):
        sample = data.dataset[index]
        maps = module.class_maps(sample["image"], module._text[sample["classes"]])
        counts = point_counts(maps, sample["classes"], sample["points"], sample["point_classes"], sample["point_labels"])
        where = torch.tensor(sample["classes"])
        tp, fp, fn = tp.index_add(0, where, counts[0]), fp.index_add(0, where, counts[1]), fn.index_add(0, where, counts[2])
    assert results["test/p_mIoU"] == pytest.approx(float(point_scores(tp, fp, fn)["p-mIoU"]), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "lseg"}, r"model.method='lseg' is not one of \('gem', 'clipsurgery', 'maskclip', 'plain', 'sclip', "
                             r"'clearclip', 'naclip'\)"),
        ({"feature_surgery": True}, r"^model.feature_surgery is CLIPSurgery's: it needs method='clipsurgery', not 'gem'$"),
        ({"pamr": True, "pamr_dilations": ()}, r"^model.pamr_dilations=\(\) must be a non-empty list of positive integers$"),
        ({"short_side": 60}, r"model.short_side 60 must be a positive multiple of the patch size 16"),
        ({"window": 64}, r"model.window and stride are set together"),
        ({"window": 64, "stride": 80}, r"model.window \(64\) and stride \(80\) must be multiples of the patch size"),
        ({"background_threshold": 1.5}, r"model.background_threshold must be in \[0, 1\], got 1.5"),
        ({"depth": 9}, r"depth=9 would modify 8 blocks of a vision tower of 4"),
        ({"templates": "a photo"}, r"model.templates: 'a photo' has no '\{\}' where the class name goes"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GEMSegmentationModule(**{**SMALL, **kwargs})


def test_the_parser_lists_the_methods_a_typo_is_not_one_of():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(GEMSegmentationModule, "model")
    with pytest.raises(Exception, match=r"model.method[\s\S]*Literal\['gem', 'plain', 'maskclip', 'clipsurgery', "
                                         r"'sclip', 'clearclip', 'naclip'\]. Got value: gems"):
        parser.parse_args(["--model.method", "gems"])
    with pytest.raises(Exception, match=r"model.short_side[\s\S]*PositiveInt"):
        parser.parse_args(["--model.short_side", "0"])
