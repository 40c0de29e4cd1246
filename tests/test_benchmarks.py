"""The benchmark table: the data arguments each benchmark passes to grounding-eval, the results in percent beside
the right published figures and their labels, missing files named before any evaluation, and one real REC run
on the synthetic referring expressions whose numbers the table shows."""

import json
import shutil
from pathlib import Path

import pytest

from .conftest import TEST_MODEL_CONFIG

from grounding.data.synthetic.odvg import write_synthetic_odvg
from grounding.protocols import benchmarks, odinw


def _fake_evaluate(monkeypatch, detection=None):
    """``grounding.cli.evaluate`` replaced: each call's arguments are recorded. A grounding call answers per test
    source ``<name>/rec_acc@k`` (or ``phrase_R@k``) = (source number + 1) / 10 + k / 1000; a detection call
    answers ``detection`` (by logger name) or fixed numbers."""
    calls = []

    def evaluate(args):
        calls.append(args)
        name = args[args.index("--trainer.logger.init_args.name") + 1]
        if "--data.init_args.test" in args:
            metrics = {}
            for number, source in enumerate(json.loads(args[args.index("--data.init_args.test") + 1])):
                prefix = "phrase_R@" if source.get("protocol") == "phrase" else "rec_acc@"
                for k in (1, 5, 10):
                    metrics[f"{source['name']}/{prefix}{k}"] = round((number + 1) / 10 + k / 1000, 4)
            return metrics
        return dict((detection or {}).get(name, {"AP": 0.4321, "AP50": 0.6, "APr": 0.1, "APc": 0.2, "APf": 0.3}))

    monkeypatch.setattr("grounding.cli.evaluate", evaluate)
    return calls


def _value(args, flag):
    return args[args.index(flag) + 1]


def _table_rows(text):
    """[cells] of the table rows (header and rule left out)."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")][1:]


def _grounding_files(tmp_path):
    """RefCOCO (val, testA; testB missing), RefCOCOg (both) and Flickr30k (val) files, contents unused."""
    refcoco, flickr, images = tmp_path / "refcoco", tmp_path / "flickr", tmp_path / "train2014"
    for folder in (refcoco, flickr, images):
        folder.mkdir()
    for name in ("refcoco_val", "refcoco_testA", "refcocog_val", "refcocog_test"):
        (refcoco / f"{name}.jsonl").write_text("{}\n")
    (flickr / "flickr30k_val.jsonl").write_text("{}\n")
    return refcoco, flickr, images


def test_each_benchmark_passes_its_data_and_the_table_shows_its_numbers(tmp_path, monkeypatch, capsys):
    refcoco, flickr, images = _grounding_files(tmp_path)
    lvis_file, coco_file = tmp_path / "lvis_v1_minival.json", tmp_path / "instances_val2017.json"
    lvis_file.write_text("{}")
    coco_file.write_text("{}")
    calls = _fake_evaluate(monkeypatch, {"COCO": {"AP": 0.5, "AP50": 0.7}})
    table_file = tmp_path / "out" / "table.md"
    summary = benchmarks.main([
        "--refcoco-dir", str(refcoco), "--refcoco-images", str(images), "--flickr30k-dir", str(flickr),
        "--flickr30k-images", str(images), "--lvis-annotations", str(lvis_file), "--lvis-images", str(tmp_path),
        "--coco-annotations", str(coco_file), "--coco-images", str(images), "--benchmarks", "coco", "refcocog",
        "refcoco", "flickr30k", "lvis", "--skip-missing", "--save-dir", str(tmp_path / "runs"),
        "--table", str(table_file), "--", "--config", "x.yaml", "--ckpt_path", "c.ckpt",
    ])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == summary  # the JSON line stays last
    assert all(call[:4] == ["--config", "x.yaml", "--ckpt_path", "c.ckpt"] for call in calls)
    assert [_value(call, "--trainer.logger.init_args.name") for call in calls] == ["refcoco", "refcocog", "flickr30k", "lvis", "COCO"]
    assert {_value(call, "--trainer.logger.init_args.save_dir") for call in calls} == {str(tmp_path / "runs")}

    rec = calls[0]  # one call per dataset, its splits as named sources; testB is missing and skipped
    assert rec[4:rec.index("--trainer.logger.init_args.save_dir")] == [
        "--model.class_path", "grounding.lightning.grounding_module.GroundingModule",
        "--data.class_path", "grounding.data.grounding_data.GroundingDataModule",
        "--data.init_args.format", "odvg", "--data.init_args.split", "test", "--data.init_args.test", json.dumps([
            {"anno": str(refcoco / "refcoco_val.jsonl"), "image_root": str(images), "name": "refcoco_val"},
            {"anno": str(refcoco / "refcoco_testA.jsonl"), "image_root": str(images), "name": "refcoco_testA"},
        ]),
        "--data.init_args.synthetic_root", "null", "--data.init_args.detection_eval", "false",
        "--data.init_args.test_detection", "null",
    ]
    assert json.loads(_value(calls[2], "--data.init_args.test")) == [
        {"anno": str(flickr / "flickr30k_val.jsonl"), "image_root": str(images), "name": "flickr30k_val", "protocol": "phrase"}]
    lvis = calls[3]
    for flag, value in (("--data.class_path", "grounding.data.detection.CocoDetectionDataModule"),
                        ("--data.init_args.val_annotations", str(lvis_file)), ("--data.init_args.val_images", str(tmp_path)),
                        ("--data.init_args.evaluator", "lvis"), ("--data.init_args.split", "val")):
        assert _value(lvis, flag) == value
    for flag, value in (("--data.val_annotations", str(coco_file)), ("--data.val_images", str(images)),
                        ("--data.class_path", "grounding.data.detection.CocoDetectionDataModule")):
        assert _value(calls[4], flag) == value
    assert "--model.class_path" not in lvis and "--model.class_path" not in calls[4]  # the config's detector

    assert summary["benchmarks"]["refcoco"]["splits"]["testA"] == {"acc@1": 0.201, "acc@5": 0.205, "acc@10": 0.21, "count": None}
    assert summary["benchmarks"]["flickr30k"]["splits"]["val"]["R@1"] == 0.101
    assert summary["benchmarks"]["lvis"] == {"AP": 0.4321, "AP50": 0.6, "APr": 0.1, "APc": 0.2, "APf": 0.3}
    assert summary["skipped"] == {
        "refcoco/testB": f"RefCOCO: split file not found: {refcoco / 'refcoco_testB.jsonl'} (grounding-convert refcoco --out writes it)",
        "flickr30k/test": f"Flickr30k Entities: split file not found: {flickr / 'flickr30k_test.jsonl'} "
                          "(grounding-convert flickr30k --out writes it)",
    }

    written = table_file.read_text()
    assert written in out and written == benchmarks.table(summary)
    assert sorted(p.name for p in table_file.parent.iterdir()) == ["table.md"]  # written atomically
    assert _table_rows(written) == [
        ["RefCOCO", "val", "acc@1", "10.10", "50.8 [1]; 53.1 [2]; 89.2 [3]; 89.5 [4]"],
        ["RefCOCO", "testA", "acc@1", "20.10", "57.4 [1]; 59.1 [2]; 91.9 [3]; 91.4 [4]"],
        ["RefCOCO", "testB", "acc@1", "not run", "45.0 [1]; 46.8 [2]; 86.0 [3]; 86.6 [4]"],
        ["RefCOCOg", "val", "acc@1", "10.10", "60.4 [1]; 62.9 [2]; 84.2 [3]; 85.5 [4]"],
        ["RefCOCOg", "test", "acc@1", "20.10", "59.7 [1]; 62.9 [2]; 84.9 [3]; 85.8 [4]"],
        ["Flickr30k Entities", "val", "R@1", "10.10", "87.8 [1]; 86.7 [2]"],
        ["Flickr30k Entities", "test", "R@1", "not run", "88.1 [1]; 87.2 [2]"],
        ["LVIS", "minival", "AP (Fixed)", "43.21", "28.8 [1]; 41.4 [2]; 58.7 [4]"],
        ["LVIS", "minival", "APr", "10.00", "18.8 [1]; 34.2 [2]; 50.7 [4]"],
        ["LVIS", "minival", "APc", "20.00", "24.2 [1]; 37.4 [2]; 58.8 [4]"],
        ["LVIS", "minival", "APf", "30.00", "34.7 [1]; 46.2 [2]; 60.1 [4]"],
        ["COCO", "val2017", "AP", "50.00", "48.4 [1]; 50.4 [2]; 57.2 [5]; 58.1 [6]; 58.2 [4]; 48.1 [7]"],
    ]
    notes = written.split("\n\n", 1)[1]
    for label in (
        "[1] Grounding DINO-T: Swin-T, the official checkpoint pretrained on O365, GoldG, Cap4M, not fine-tuned (zero-shot). "
        "mmdetection, configs/mm_grounding_dino/README.md",
        "[2] MM-Grounding-DINO-T: Swin-T pretrained on O365, GoldG, GRIT, V3Det, not fine-tuned (zero-shot).",
        "[3] Grounding DINO-T: fine-tuned on the benchmark's training split (schedule not given). As reported by",
        "[4] MM-Grounding-DINO-T: fine-tuned on the benchmark's training split (RefCOCO/+/g: 5 epochs; LVIS, COCO: 1x).",
        "[5] Grounding DINO-T: Swin-T pretrained on O365, GoldG, Cap4M, fine-tuned on COCO train2017. IDEA-Research/GroundingDINO README",
        "[6] Grounding DINO-T: the official checkpoint fine-tuned on COCO train2017 by mmdetection (1x;",
        "[7] IMAGE: close-set: Grounding DINO (Swin-T) fine-tuned on COCO train2017 with adaptive masking; its own baseline "
        "reaches 45.4 (48.1 - 2.7)",
        "a different, weaker setup",
        "Flickr30k Entities: GoldG, in the pretraining of both models, holds its training annotations.",
        f"Not run: refcoco/testB: RefCOCO: split file not found: {refcoco / 'refcoco_testB.jsonl'}",
    ):
        assert label in notes, label
    assert "[8]" not in notes and "ODinW splits" not in notes  # only the references and notes the rows use


def test_odinw_rows_reuse_the_odinw_protocol(tmp_path, monkeypatch):
    """Both suites through odinw's functions: the suite's mean, its split variant named, the per-dataset AP kept
    (Aquarium and EgoHands generic are in both suites, from the same files)."""
    root = tmp_path / "odinw"
    for suite, names in (("odinw13", ["Aquarium", "EgoHands"]), ("odinw35", ["EgoHands_specific"])):
        for dataset in odinw.SUITE_DATASETS[suite]:
            if dataset.name in names:
                for variant in odinw.SPLIT_VARIANTS:
                    annotations = root / dataset.files(variant)[0]
                    annotations.parent.mkdir(parents=True, exist_ok=True)
                    annotations.write_text("{}")
    calls = _fake_evaluate(monkeypatch, {"Aquarium": {"AP": 0.3, "AP50": 0.5}, "EgoHands": {"AP": 0.5, "AP50": 0.6},
                                         "EgoHands_generic": {"AP": 0.1, "AP50": 0.2},
                                         "EgoHands_specific": {"AP": 0.02, "AP50": 0.05}})
    summary = benchmarks.run(["odinw35", "odinw13"], benchmarks.BenchmarkData(odinw_root=str(root)), ["--config", "x.yaml"],
                             skip_missing=True, save_dir=str(tmp_path / "runs"), odinw_split_variant="valid")
    assert [_value(call, "--trainer.logger.init_args.save_dir") for call in calls] == [
        str(tmp_path / "runs" / "odinw13")] * 2 + [str(tmp_path / "runs" / "odinw35")] * 3
    assert _value(calls[1], "--data.val_annotations") == str(root / "EgoHands/generic/valid/annotations_without_background.json")
    result = summary["benchmarks"]["odinw13"]
    assert result["mean_AP"] == 0.4 and result["splits"] == {"Aquarium": "valid", "EgoHands": "valid"}
    assert result["datasets"]["EgoHands"] == {"AP": 0.5, "AP50": 0.6}
    text = benchmarks.table(summary)
    assert _table_rows(text) == [
        ["ODinW-13", "valid variant", "mean AP (over 2 of 13)", "40.00", "51.4 [1]; 53.3 [2]; 25.1 [3]"],
        ["ODinW-35", "valid variant", "mean AP (over 3 of 35)", "14.00", "22.7 [1]; 28.4 [2]"],
    ]
    assert "[3] IMAGE: zero-shot, the paper's own model and pretraining" in text
    assert "ODinW splits here: valid for every dataset (as mmdetection); the mmdetection figures used valid" in text


def test_missing_files_and_options_are_named_before_any_evaluation(tmp_path, monkeypatch, capsys):
    refcoco, flickr, images = _grounding_files(tmp_path)
    calls = _fake_evaluate(monkeypatch)
    data = benchmarks.BenchmarkData(refcoco_dir=str(refcoco), refcoco_images=str(images),
                                    coco_annotations=str(tmp_path / "instances_val2017.json"), coco_images=str(images))
    with pytest.raises(FileNotFoundError) as error:  # RefCOCO+ has no file at all; looked for before COCO's check
        benchmarks.run(["coco", "refcoco+"], data, [])
    assert str(error.value) == (f"RefCOCO+: split file not found: {refcoco / 'refcoco+_val.jsonl'} "
                                "(grounding-convert refcoco --out writes it) (--skip-missing to go on)")
    with pytest.raises(FileNotFoundError) as error:
        benchmarks.run(["refcocog", "coco"], data, [])
    assert str(error.value) == f"COCO: annotation file not found: {tmp_path / 'instances_val2017.json'} (--skip-missing to go on)"
    missing_images = benchmarks.BenchmarkData(refcoco_dir=str(refcoco), refcoco_images=str(tmp_path / "train2014x"))
    with pytest.raises(FileNotFoundError, match=r"RefCOCO: image folder not found: .*train2014x \(--skip-missing"):
        benchmarks.run(["refcoco"], missing_images, [])
    with pytest.raises(FileNotFoundError, match="ODinW dataset AerialMaritimeDrone: annotation file not found"):
        benchmarks.run(["odinw13"], benchmarks.BenchmarkData(odinw_root=str(tmp_path)), [])
    with pytest.raises(ValueError, match="lvis needs --lvis-annotations and --lvis-images"):
        benchmarks.run(["lvis"], data, [])
    assert calls == []  # nothing was evaluated
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a chosen benchmark without its options: a command-line error naming them
        benchmarks.main(["--benchmarks", "flickr30k", "--refcoco-dir", str(refcoco)])
    assert "flickr30k needs --flickr30k-dir and --flickr30k-images" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no data option at all
        benchmarks.main([])
    summary = benchmarks.run(["refcoco+", "coco", "refcoco"], data, [], skip_missing=True)  # the rest still runs
    assert list(summary["benchmarks"]) == ["refcoco"] and len(calls) == 1
    assert summary["skipped"]["coco"] == f"COCO: annotation file not found: {tmp_path / 'instances_val2017.json'}"
    assert summary["skipped"]["refcoco+"] == f"RefCOCO+: no split file found in {refcoco}"
    rows = _table_rows(benchmarks.table(summary))
    assert [row[3] for row in rows if row[0] == "COCO"] == ["not run"]


def test_published_figures_and_their_labels():
    """The figures the table cites, as the sources give them, and a label for every one."""
    published = benchmarks.PUBLISHED
    assert [v for _, v in published[("refcoco", "val", "acc@1")]] == [50.8, 53.1, 89.2, 89.5]
    assert dict(published[("refcoco", "testB", "acc@1")])["mm_gd_t_finetuned"] == 86.6
    assert dict(published[("flickr30k", "test", "R@1")]) == {"gd_t": 88.1, "mm_gd_t": 87.2}
    assert dict(published[("lvis", "minival", "AP")])["gd_t"] == 28.8
    assert dict(published[("odinw35", "", "mean AP")]) == {"gd_t": 22.7, "mm_gd_t": 28.4}
    assert dict(published[("coco", "val2017", "AP")]) == {
        "gd_t": 48.4, "mm_gd_t": 50.4, "gd_t_official_finetuned": 57.2, "gd_t_mmdet_finetuned": 58.1,
        "mm_gd_t_finetuned": 58.2, "image_close_set": 48.1}
    assert {key for values in published.values() for key, _ in values} == set(benchmarks.REFERENCES)
    # the ODinW figures agree with the ODinW protocol's own references
    assert dict(published[("odinw13", "", "mean AP")])["gd_t"] == odinw.REFERENCES["mmdetection"]["ODinW13_mean_AP_percent"]
    assert dict(published[("odinw35", "", "mean AP")])["mm_gd_t"] == odinw.REFERENCES["MM-Grounding-DINO"]["ODinW35_mean_AP_percent"]


def test_a_real_rec_run_on_the_synthetic_expressions(synthetic_root, tmp_path, monkeypatch):
    """The tiny model on the synthetic referring expressions as RefCOCO val (two batches): the table's row is the
    acc@1 that grounding-eval returned, in percent."""
    from grounding import cli

    files = write_synthetic_odvg(synthetic_root, "val")
    refcoco = tmp_path / "refcoco"
    refcoco.mkdir()
    shutil.copy(files.grounding, refcoco / "refcoco_val.jsonl")
    returned, real_evaluate = [], cli.evaluate
    monkeypatch.setattr("grounding.cli.evaluate", lambda args: returned.append(real_evaluate(args)) or returned[-1])
    summary = benchmarks.main([
        "--refcoco-dir", str(refcoco), "--refcoco-images", str(files.image_root), "--benchmarks", "refcoco",
        "--skip-missing", "--save-dir", str(tmp_path / "runs"), "--",
        "--config", "configs/image/synthetic.yaml", "--model.model_config", json.dumps(TEST_MODEL_CONFIG),
        "--data.image_size", "96", "--data.max_size", "128", "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.limit_test_batches", "2",
    ])
    (metrics,) = returned  # one evaluation for RefCOCO's one split file
    val = summary["benchmarks"]["refcoco"]["splits"]["val"]
    assert val == {stat: metrics[f"refcoco_val/rec_{stat}"] for stat in ("acc@1", "acc@5", "acc@10", "count")}
    assert val["count"] == 8  # 2 batches of 4 expressions
    rows = _table_rows(benchmarks.table(summary))
    assert rows[0][:3] == ["RefCOCO", "val", "acc@1"] and rows[0][3] == f"{100 * metrics['refcoco_val/rec_acc@1']:.2f}"
    assert [row[3] for row in rows[1:]] == ["not run", "not run"]
    assert Path(summary["benchmarks"]["refcoco"]["run_dir"]).parent == tmp_path / "runs" / "refcoco"
