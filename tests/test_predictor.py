"""grounding.predictor: every method from Python on the user's images, and MaskInversion's regions through
grounding-predict (masks or boxes in, embeddings and maps out)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from grounding.cli import predict
from grounding.data.images import image_tensor, read_rgb_image
from grounding.data.user_masks import region_masks
from grounding.models.detector import GroundingDetector, build_processor
from grounding.models.gem import DenseSimilarity, labels_with_background
from grounding.models.maskinversion import MaskInversion
from grounding.predictor import Predictor, json_record

from .models.test_detector import IMAGE_SIZE, MAX_SIZE, photo


@pytest.fixture(scope="module")
def files(synthetic_root) -> list[Path]:
    return sorted((Path(synthetic_root) / "images" / "val").glob("*.jpg"))[:2]


def test_gem_records_are_dense_similarity_with_the_background_rule(files):
    predictor = Predictor.load("gem/synthetic.yaml")
    classes = ["background", "red circle", "blue square"]
    records = predictor([str(f) for f in files], classes=classes)
    h = predictor.module.hparams
    dense = DenseSimilarity(predictor.module.backbone, method=h.method, depth=h.depth, iterations=h.iterations,
                            temperature=h.temperature, templates=h.templates, short_side=h.short_side)
    assert [r["image_id"] for r in records] == [f.stem for f in files]
    for record, file in zip(records, files):
        image = image_tensor(read_rgb_image(file))
        maps = dense(image, ["red circle", "blue square"])
        expected = labels_with_background(maps, [1, 2], 0, h.background_threshold, h.logit_scale)
        assert torch.equal(record["label_map"], expected.cpu())
        heat = maps[1].float()
        assert torch.allclose(record["heatmaps"]["blue square"], (heat - heat.min()) / (heat.max() - heat.min()), atol=1e-6)
        assert json_record(record) == {"image_id": file.stem, "path": str(file), "classes": classes}
    picture = predictor.draw(records[0])
    assert picture.height >= 512 and picture.width > picture.height  # the overlay enlarged, its legend beside it


def test_detector_from_a_checkpoint_or_a_run_folder_is_the_trained_module(trained_detector, tmp_path):
    expected = GroundingDetector(trained_detector.module.detector, build_processor(trained_detector.module.tokenizer, IMAGE_SIZE, MAX_SIZE))
    image = photo(72, 100)
    run = tmp_path / "RUN"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(trained_detector.path.read_bytes())
    for source in (trained_detector.path, run):
        predictor = Predictor.load(source)
        assert predictor.method == "detector"
        [record] = predictor(image, classes=["red circle", "blue square"], box_threshold=0.0, top_k=5)
        assert record == {"image_id": "image0", "path": None,
                          **expected(image, classes=["red circle", "blue square"], box_threshold=0.0, top_k=5)}
    drawn = predictor.draw(record, image)
    assert drawn.size == (100, 72) and np.asarray(drawn).tolist() != np.asarray(image).tolist()


def test_maskinversion_regions_from_boxes_and_through_grounding_predict(files, tmp_path):
    predictor = Predictor.load("maskinversion/synthetic.yaml", inversion={"iterations": 3})
    image = image_tensor(read_rgb_image(files[0]))
    height, width = image.shape[-2:]
    boxes = [[0, 0, width / 2, height], [width / 2, 0, width, height / 2]]
    classes = ["red circle", "blue square"]
    [record] = predictor(str(files[0]), boxes=boxes, classes=classes)

    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, :, : width // 2] = True
    masks[1, : height // 2, width // 2:] = True
    module = predictor.module
    settings = module.hparams.inversion
    inverter = MaskInversion(module.backbone, alpha=module.alpha, iterations=3, lr=settings.lr, mode=settings.mode,
                             layers=settings.layers)
    direct = inverter(image, masks, return_maps=True)
    assert torch.allclose(record["embeddings"], direct.embeddings.float(), atol=1e-5)
    assert torch.allclose(record["maps"], direct.maps.float(), atol=1e-5)
    text = F.normalize(module.backbone.encode_text([f"a photo of a {c}." for c in classes]).float(), dim=-1)
    cosine = F.normalize(direct.embeddings.float(), dim=-1) @ text.T
    assert [r["label"] for r in record["regions"]] == [classes[i] for i in cosine.argmax(-1).tolist()]
    assert [r["box"] for r in record["regions"]] == [[0, 0, width // 2, height], [width // 2, 0, width, height // 2]]
    assert [r["area"] for r in record["regions"]] == [int(m.sum()) for m in masks]

    # the same regions as a label PNG, through grounding-predict
    folder = tmp_path / "masks"
    folder.mkdir()
    Image.fromarray((masks[0].numpy() * 1 + masks[1].numpy() * 2).astype(np.uint8)).save(folder / f"{files[0].stem}.png")
    out = tmp_path / "out"
    summary = predict(["--config", "maskinversion/synthetic.yaml", "--model.inversion.iterations", "3",
                       "--trainer.logger", "false", "--progress.mode", "never", "--inputs", *map(str, files),
                       "--masks", str(folder), "--classes", "red circle, blue square", "--out", str(out),
                       "--trainer.default_root_dir", str(tmp_path)])
    assert (summary["images"], summary["predicted"]) == (2, 1)  # the second image has no mask: left out
    written = json.loads((out / "records" / f"{files[0].stem}.json").read_text())
    assert [r["region_id"] for r in written["regions"]] == ["1", "2"]
    assert [r["label"] for r in written["regions"]] == [r["label"] for r in record["regions"]]
    saved = torch.load(out / written["embeddings"], weights_only=True)
    assert saved["region_ids"] == ["1", "2"]
    assert torch.allclose(saved["embeddings"], direct.embeddings.float(), atol=1e-5)
    assert all((out / path).is_file() for path in written["maps"].values())
    assert json.loads((out / "predictions.json").read_text()) == [written]


def test_mimic_synthesizes_each_target(tmp_path):
    predictor = Predictor.load("mimic/synthetic.yaml", synthesis={"iterations": 2, "samples_per_target": 1},
                               scoring={"clip": None, "verifier": None})
    records = predictor(classes=["a red circle", "a blue/square"], text="What is it?")
    assert [(r["target_id"], r["target"], r["prompt"]) for r in records] == [
        ("a_red_circle", "a red circle", "What is it?"), ("a_blue_square", "a blue/square", "What is it?")]
    size = predictor.module.vlm.image_size
    assert all(len(r["images"]) == 1 and r["images"][0].shape == (3, size, size) and r["images"][0].dtype == torch.uint8
               for r in records)
    assert "images" not in json_record(records[0]) and len(records[0]["answers"]) == 1


@pytest.mark.parametrize("call, message", [
    (lambda: Predictor.load("no/such.ckpt"), "no/such.ckpt: no such file"),
    (lambda: Predictor.load("notes.txt"), "notes.txt: not a checkpoint (.ckpt), a run folder"),
    (lambda: Predictor.load("gem/synthetic.yaml", depth=0), "cannot build grounding.lightning.gem_module.GEMSegmentationModule"),
    (lambda: Predictor.load("gem/synthetic.yaml")(photo(40, 40), text="a cat"), "text is the detector's free prompt; gem takes classes"),
    (lambda: Predictor.load("gem/synthetic.yaml")(photo(40, 40)), "gem segments the classes given"),
    (lambda: region_masks(torch.ones(2, 5, 5, dtype=torch.bool), 5, 6, "cat"), "image cat, region 0: the mask is (5, 5) px (W, H), the image 6x5"),
    (lambda: region_masks([[3, 3, 3, 8]], 10, 10, "cat", boxes=True), "image cat, region 0: box [3, 3, 3, 8] is empty"),
    (lambda: region_masks(torch.zeros(5, 5, dtype=torch.long), 5, 5, "cat"), "image cat: no region given"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises((ValueError, TypeError)) as raised:
        call()
    assert message in str(raised.value)


def test_mimic_through_grounding_predict_is_the_predictor_and_resumes(tmp_path, capsys):
    settings = ["--model.synthesis.iterations", "2", "--model.synthesis.samples_per_target", "1"]
    args = ["--config", "mimic/synthetic.yaml", *settings, "--trainer.logger", "false", "--progress.mode", "never",
            "--text", "What is it?", "--out", str(tmp_path / "out"), "--trainer.default_root_dir", str(tmp_path)]
    summary = predict([*args, "--classes", "a red circle"])
    assert (summary["images"], summary["predicted"]) == (1, 1)
    record = json.loads((tmp_path / "out" / "records" / "a_red_circle.json").read_text())
    assert record["images"] == ["images/a_red_circle.png"] and record["prompt"] == "What is it?"
    written = torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / record["images"][0]))).permute(2, 0, 1)

    predictor = Predictor.load("mimic/synthetic.yaml", synthesis={"iterations": 2, "samples_per_target": 1})
    [expected] = predictor(classes=["a red circle"], text="What is it?")
    assert torch.equal(written, expected["images"][0])  # same seed, same target id: the same image
    assert record["answers"] == expected["answers"]

    summary = predict([*args, "--classes", "a red circle, a blue square"])  # the first target is done: left out
    assert (summary["images"], summary["predicted"], summary["skipped_existing"]) == (2, 1, 1)
    assert [r["target_id"] for r in json.loads((tmp_path / "out" / "predictions.json").read_text())] == ["a_blue_square", "a_red_circle"]
    with pytest.raises(SystemExit):
        predict([*args, "--classes", "a cat", "--inputs", str(tmp_path)])
    assert "MimicModule synthesizes images from the target texts of --classes; it reads no images" in capsys.readouterr().err


def test_invseg_records_and_grounding_predict_are_the_inversion(files, tmp_path):
    predictor = Predictor.load("invseg/synthetic.yaml", inversion={"steps": 1, "views": 1})
    classes = ["background", "red circle", "blue square"]
    [record] = predictor(str(files[0]), classes=classes)
    module = predictor.module
    image = image_tensor(read_rgb_image(files[0]))
    direct = module.invseg(image, classes, module.sample_generator(files[0].stem))  # background first: label = index
    assert torch.equal(record["label_map"], direct.index.cpu())
    assert "heatmaps" not in record and record["classes"] == classes

    out = tmp_path / "out"
    summary = predict(["--config", "invseg/synthetic.yaml", "--model.inversion.steps", "1", "--model.inversion.views", "1", "--trainer.logger", "false",
                       "--progress.mode", "never", "--inputs", str(files[0]), "--classes", ", ".join(classes),
                       "--out", str(out), "--trainer.default_root_dir", str(tmp_path)])
    assert summary["predicted"] == 1
    written = json.loads((out / "records" / f"{files[0].stem}.json").read_text())
    assert torch.equal(torch.from_numpy(np.asarray(Image.open(out / written["label_map"])).astype(np.int64)), record["label_map"])
    assert Image.open(out / written["overlay"]).mode == "RGB"


def test_a_method_name_builds_its_module_from_its_defaults_and_the_settings():
    predictor = Predictor.load("gem", backbone="tiny", depth=2, short_side=64)
    assert (predictor.method, predictor.module.hparams.depth, predictor.module.hparams.short_side) == ("gem", 2, 64)
    assert predictor.module.hparams.background_threshold == 0.85  # the class's default
    [record] = predictor(photo(30, 50), classes=["red circle", "blue square"])
    assert record["label_map"].shape == (30, 50) and set(record["label_map"].unique().tolist()) <= {0, 1}


def test_a_checkpoint_of_a_module_built_in_python_is_known_by_its_settings(tmp_path):
    import lightning as L

    from grounding.lightning.maskinversion_module import MaskInversionModule
    from grounding.models.maskinversion import MaskInversionSettings

    module = MaskInversionModule(image_size=64, inversion=MaskInversionSettings(iterations=2, lr=0.25), methods=["maskinversion", "crop"])
    with torch.no_grad():
        next(module.backbone.parameters()).add_(0.5)  # weights the settings alone do not rebuild
    trainer = L.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "mi.ckpt")
    predictor = Predictor.load(tmp_path / "mi.ckpt", inversion={"iterations": 1})
    assert predictor.method == "maskinversion" and predictor.module.methods == ["maskinversion", "crop"]
    assert (predictor.module.hparams.inversion.iterations, predictor.module.hparams.inversion.lr) == (1, 0.25)
    assert all(torch.equal(a, b) for a, b in zip(predictor.module.state_dict().values(), module.state_dict().values()))
