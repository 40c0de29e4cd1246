"""ODinW-13 driver: per-dataset AP equals grounding-eval on that dataset, the mean is over the datasets evaluated."""

import json
import shutil
from pathlib import Path

import pytest

from .conftest import TEST_MODEL_CONFIG

from grounding.cli import evaluate
from grounding.protocols import odinw

pytestmark = pytest.mark.slow


def _layout(synthetic_root, root, names):
    """Put the synthetic val split where the ODinW release keeps each named dataset."""
    entries = {name: (a, i) for name, a, i in odinw.ODINW13}
    for name in names:
        annotations, images = entries[name]
        shutil.copytree(Path(synthetic_root) / "images" / "val", root / images, dirs_exist_ok=True)
        (root / annotations).write_text((Path(synthetic_root) / "annotations" / "instances_val.json").read_text())


def _args(save_dir):
    return [
        "--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--data.image_size", "96", "--data.max_size", "128",
        "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(save_dir),
    ]


def test_per_dataset_results_and_mean(synthetic_root, tmp_path):
    root = tmp_path / "odinw"
    _layout(synthetic_root, root, ["Aquarium", "pothole"])
    summary = odinw.run(root, _args(tmp_path / "unused"), datasets=["Aquarium", "pothole"], save_dir=str(tmp_path / "runs"))
    assert sorted(summary["datasets"]) == ["Aquarium", "pothole"] and summary["evaluated"] == 2
    direct = evaluate([
        *_args(tmp_path / "direct"), "--data.synthetic_root", "null",
        "--data.val_annotations", str(root / "pothole/valid/annotations_without_background.json"),
        "--data.val_images", str(root / "pothole/valid"),
    ])
    assert summary["datasets"]["pothole"]["AP50"] == pytest.approx(direct["AP50"], abs=1e-6)
    assert summary["datasets"]["pothole"]["AP"] == pytest.approx(direct["AP"], abs=1e-6)
    expected = sum(r["AP50"] for r in summary["datasets"].values()) / 2
    assert summary["mean_AP50"] == pytest.approx(expected, abs=1e-4) and summary["mean_AP50_over"] == 2
    assert (tmp_path / "runs" / "Aquarium").is_dir()  # one run folder per dataset


def test_missing_and_unknown_datasets_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ODinW dataset Raccoon: annotation file not found: .*Raccoon.v2-raw.coco/valid"):
        odinw.run(tmp_path, [], datasets=["Raccoon"])
    with pytest.raises(FileNotFoundError, match="no ODinW-13 dataset found under"):
        odinw.run(tmp_path, [], datasets=["Raccoon"], skip_missing=True)
    with pytest.raises(ValueError, match=r"unknown ODinW-13 datasets \['Zebra'\]"):
        odinw.run(tmp_path, [], datasets=["Zebra"])


def test_an_undefined_statistic_is_left_out_of_the_mean(synthetic_root, tmp_path):
    """A dataset without annotations has an undefined AP (null): the mean is over the others, never with a 0."""
    root = tmp_path / "odinw"
    _layout(synthetic_root, root, ["Aquarium", "pothole"])
    empty = root / dict((n, a) for n, a, _ in odinw.ODINW13)["pothole"]
    empty.write_text(json.dumps(dict(json.loads(empty.read_text()), annotations=[])))
    summary = odinw.run(root, _args(tmp_path / "unused"), datasets=["Aquarium", "pothole"], save_dir=str(tmp_path / "runs"))
    assert summary["datasets"]["pothole"]["AP"] is None and summary["datasets"]["Aquarium"]["AP"] is not None
    assert summary["mean_AP"] == summary["datasets"]["Aquarium"]["AP"] and summary["mean_AP_over"] == 1
