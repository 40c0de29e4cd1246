"""grounding-predict: GEM and the detector on a folder of the synthetic images, resuming, errors, two processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from grounding.cli import predict
from grounding.data.images import image_tensor, read_rgb_image

GEM = ["--config", "configs/gem/synthetic.yaml", "--trainer.logger", "false", "--progress.mode", "never"]
CLASSES = "background, red circle, blue square, green triangle"


@pytest.fixture(scope="module")
def images(synthetic_root, tmp_path_factory) -> Path:
    """The synthetic val images and one file that is not an image."""
    folder = tmp_path_factory.mktemp("images")
    for file in sorted((Path(synthetic_root) / "images" / "val").glob("*.jpg")):
        shutil.copy(file, folder / file.name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def _run(args: list[str], capsys, root: Path) -> dict:
    capsys.readouterr()
    summary = predict([*args, "--trainer.default_root_dir", str(root)])
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == summary  # one JSON line on stdout
    return summary


@pytest.fixture(scope="module")
def gem_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("gem") / "out"
    summary = predict([*GEM, "--inputs", str(images), "--classes", CLASSES, "--out", str(out),
                       "--trainer.default_root_dir", str(out.parent)])
    return out, summary


def test_gem_writes_every_readable_image(images, gem_run, caplog):
    out, summary = gem_run
    readable = sorted(p.stem for p in images.glob("*.jpg") if p.stem != "broken")
    assert summary["images"] == len(readable) + 1
    assert (summary["predicted"], summary["unreadable"], summary["skipped_existing"]) == (len(readable), 1, 0)
    assert sorted(p.stem for p in (out / "records").glob("*.json")) == readable
    everything = json.loads((out / "predictions.json").read_text())
    assert [r["image_id"] for r in everything] == readable  # valid JSON, sorted by id
    record = everything[0]
    assert record["classes"] == [c.strip() for c in CLASSES.split(",")]
    assert sorted(record["heatmaps"]) == ["blue square", "green triangle", "red circle"]  # background not prompted
    for name in [record["label_map"], record["overlay"], *record["heatmaps"].values()]:
        assert (out / name).is_file()

    # the label maps equal GEM's own computation on the same images
    from grounding.lightning.gem_module import GEMSegmentationModule

    L.seed_everything(0)  # the config's seed, set before the model is built
    module = GEMSegmentationModule(backbone="tiny", method="gem", depth=3, iterations=1, short_side=128,
                                   background_threshold=0.85, log_images=0)
    module.set_classes(record["classes"], background_index=0)
    for image_id in readable[:3]:
        image = image_tensor(read_rgb_image(images / f"{image_id}.jpg"))
        with torch.no_grad():
            expected = module.predict_labels(module.class_maps(image, module._text))
        written = np.array(Image.open(out / "labels" / f"{image_id}.png"))
        assert np.array_equal(written, expected.numpy())


def test_resume_redoes_only_the_missing(images, gem_run, capsys):
    out, first = gem_run
    before = json.loads((out / "predictions.json").read_text())
    ids = [r["image_id"] for r in before]
    removed, kept = ids[::2], ids[1::2]
    (out / "records" / f"{removed[0]}.json").unlink()
    for image_id in removed[1:]:  # a record left, but a file it names gone: redone too
        (out / "labels" / f"{image_id}.png").unlink()
    times = {i: (out / "records" / f"{i}.json").stat().st_mtime_ns for i in kept}
    partial = out / "labels_overlays" / f".{removed[0]}.png.x1y2z3.tmp"  # what a killed write leaves
    partial.write_bytes(b"half a png")
    summary = _run([*GEM, "--inputs", str(images), "--classes", CLASSES, "--out", str(out)], capsys, out.parent)
    assert not partial.exists() and not list(out.rglob("*.tmp"))
    assert (summary["predicted"], summary["skipped_existing"], summary["unreadable"]) == (len(removed), len(kept), 1)
    assert {i: (out / "records" / f"{i}.json").stat().st_mtime_ns for i in kept} == times
    assert json.loads((out / "predictions.json").read_text()) == before


def test_detector_records_are_grounding_detector_records(images, tmp_path, capsys):
    from grounding.lightning.image_module import ImageGroundingModule
    from grounding.models.detector import GroundingDetector, build_processor

    files = sorted(images.glob("*.jpg"))[:2]
    out = tmp_path / "out"
    summary = _run(["--config", "configs/image/synthetic.yaml", "--trainer.logger", "false", "--inputs", *map(str, files),
                    "--classes", "red circle, blue square", "--box_threshold", "0.2", "--top_k", "5", "--out", str(out)], capsys, tmp_path)
    assert summary["predicted"] == 2
    L.seed_everything(0)
    module = ImageGroundingModule(model="tiny")
    detector = GroundingDetector(module.detector, build_processor(module.tokenizer, 128, 214))  # the config's data sizes
    for file in files:
        expected = detector(image_tensor(read_rgb_image(file)), classes=["red circle", "blue square"], box_threshold=0.2, top_k=5)
        record = json.loads((out / "records" / f"{file.stem}.json").read_text())
        assert record == {**expected, "image_id": file.stem, "path": str(file), "drawn": f"drawn/{file.stem}.png"}
        assert (out / record["drawn"]).is_file()


@pytest.mark.parametrize("args, message", [
    (["--classes", " , "], "classes (--classes) is empty"),
    (["--classes", "a", "--masks", "."], "--masks / --boxes are MaskInversion's regions; GEMSegmentationModule does not take them"),
    (["--classes", "a", "--data.batch_size", "4"], "--data.batch_size: grounding-predict reads the images of --inputs"),
    (["--classes", "a", "--inputs", "no/such/folder"], "no such file or folder: no/such/folder"),
])
def test_clear_errors(images, args, message, capsys):
    args = args if "--inputs" in args else [*args, "--inputs", str(images)]
    with pytest.raises(SystemExit) as raised:
        predict([*GEM, *args, "--trainer.default_root_dir", str(images)])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_unsupported_method_is_named(images, capsys):
    with pytest.raises(SystemExit) as raised:
        predict(["--config", "configs/image/synthetic.yaml", "--model", "grounding.lightning.gem_module.GEMPointModule",
                 "--inputs", str(images), "--classes", "a", "--trainer.default_root_dir", str(images)])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert "does not run GEMPointModule" in error and "MimicModule" in error


@pytest.mark.slow
def test_two_processes_give_the_same_predictions(images, gem_run, tmp_path):
    """DDP as on several GPUs: Lightning relaunches the command once per further process."""
    out, _ = gem_run
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "predict.py")]
    result = subprocess.run(
        [*command, *GEM, "--inputs", str(images), "--classes", CLASSES, "--out", str(tmp_path / "out"),
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.default_root_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1], env={**os.environ},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["predicted"], summary["unreadable"]) == (len(list(images.glob("*.jpg"))) - 1, 1)
    assert json.loads((tmp_path / "out" / "predictions.json").read_text()) == json.loads((out / "predictions.json").read_text())


def test_help_names_the_options_then_the_configs_settings(capsys):
    with pytest.raises(SystemExit) as raised:
        predict(["--config", "configs/gem/synthetic.yaml", "--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert out.index("--masks DIR") < out.index("examples:") < out.index("  --trainer.devices DEVICES") < out.index("--model.background_threshold")


def test_background_writes_keep_order_count_and_raise_the_first_error(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from grounding.lightning.prediction_writer import ImagePredictionWriter

    writer = ImagePredictionWriter(threads=2)
    writer._pool = ThreadPoolExecutor(2)
    written = []

    def write(record, sample):
        if record["image_id"] == "bad":
            raise OSError("disk full")
        written.append(record["image_id"])

    writer.write = write
    records = [{"image_id": str(i)} for i in range(20)]
    writer.on_predict_batch_end(None, None, records, [{"image_id": r["image_id"]} for r in records], 0)
    writer._finish(0)
    assert writer.predicted == 20 and sorted(written, key=int) == [str(i) for i in range(20)]
    writer.on_predict_batch_end(None, None, [{"image_id": "bad"}], [{"image_id": "bad"}], 1)
    with pytest.raises(OSError, match="disk full"):
        writer._finish(0)
    writer.teardown(None, None, "predict")
    assert writer._pool is None and writer.predicted == 20


def test_default_writer_threads_take_half_of_each_processs_cpus_between_2_and_8():
    from grounding.lightning.prediction_writer import default_writer_threads

    for processes in (1, 2, 3, 8):
        previous = 0
        for cpus in range(1, 200):
            threads = default_writer_threads(processes, cpus)
            assert 2 <= threads <= 8 and threads >= previous  # bounded, and more CPUs never give fewer threads
            # half of each process's share, unless that is below the floor of 2 or above the cap of 8
            assert threads == 2 or threads == 8 or threads == cpus // processes // 2, (processes, cpus)
            assert threads * processes <= max(cpus // 2, 2 * processes)  # the writers never take more than half
            previous = threads
    assert default_writer_threads(1, 16) == 8 and default_writer_threads(8, 16) == 2 and default_writer_threads(2, 20) == 5


def test_predict_sizes_the_writers_from_the_machine_unless_told(images, tmp_path, capsys, monkeypatch):
    import grounding.lightning.prediction_writer as prediction_writer

    asked, made = [], []
    monkeypatch.setattr(prediction_writer, "default_writer_threads", lambda processes: asked.append(processes) or 3)
    original = prediction_writer.ImagePredictionWriter.__init__
    monkeypatch.setattr(prediction_writer.ImagePredictionWriter, "__init__",
                        lambda self, threads=2, pictures=True: made.append(threads) or original(self, threads, pictures))
    file = str(sorted(images.glob("*.jpg"))[0])
    _run([*GEM, "--inputs", file, "--classes", CLASSES, "--out", str(tmp_path / "auto"), "--no_pictures"], capsys, tmp_path)
    _run([*GEM, "--inputs", file, "--classes", CLASSES, "--out", str(tmp_path / "told"), "--no_pictures",
          "--writer_threads", "0"], capsys, tmp_path)
    assert asked == [1] and made == [3, 0]
    assert (tmp_path / "auto" / "labels").is_dir() and (tmp_path / "told" / "labels").is_dir()


def test_no_pictures_writes_the_records_and_label_maps_only(images, gem_run, tmp_path, capsys):
    out, _ = gem_run
    files = sorted(images.glob("*.jpg"))[:2]
    summary = _run([*GEM, "--inputs", *map(str, files), "--classes", CLASSES, "--out", str(tmp_path / "bare"), "--no_pictures"],
                   capsys, tmp_path)
    assert summary["predicted"] == 2
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["labels", "predictions.json", "records"]
    for file in files:
        record = json.loads((tmp_path / "bare" / "records" / f"{file.stem}.json").read_text())
        assert set(record) == {"image_id", "path", "classes", "label_map"}
        assert (tmp_path / "bare" / record["label_map"]).read_bytes() == (out / record["label_map"]).read_bytes()
