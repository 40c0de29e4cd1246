"""The forgetting protocol: the category split, the cells (resumable, failures recorded), the table and the plot."""

from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from grounding.protocols import forgetting

COCO = {
    "info": {"description": "hand-made"},
    "images": [{"id": i, "file_name": f"{i}.jpg", "width": 8, "height": 8} for i in (1, 2, 3)],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 2, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 0, 3, 3], "area": 9, "iscrowd": 0},
        {"id": 13, "image_id": 3, "category_id": 4, "bbox": [0, 0, 3, 3], "area": 9, "iscrowd": 0},
    ],
    "categories": [{"id": i, "name": n} for i, n in ((1, "red circle"), (2, "red square"), (3, "blue circle"), (4, "blue square"))],
}


def test_split_keeps_the_half_its_images_and_nothing_else():
    novel = forgetting.novel_categories(COCO["categories"], None)
    assert novel == {2, 4}  # every second id
    base = forgetting.split_by_category(COCO, {1, 3})
    assert [a["id"] for a in base["annotations"]] == [10, 12]
    assert [i["id"] for i in base["images"]] == [1, 2] and [c["name"] for c in base["categories"]] == ["red circle", "blue circle"]
    assert base["info"] == COCO["info"]
    half = forgetting.split_by_category(COCO, novel)
    assert [i["id"] for i in half["images"]] == [1, 3] and [a["id"] for a in half["annotations"]] == [11, 13]
    assert forgetting.novel_categories(COCO["categories"], ["blue square"]) == {4}
    with pytest.raises(ValueError, match=r"--novel-categories: \['green'\] are not categories"):
        forgetting.novel_categories(COCO["categories"], ["green"])
    with pytest.raises(ValueError, match="must leave both halves non-empty"):
        forgetting.novel_categories(COCO["categories"], [c["name"] for c in COCO["categories"]])


def test_synthetic_split_partitions_every_annotation(synthetic_root, tmp_path):
    splits = forgetting.write_synthetic_split(synthetic_root, tmp_path, None)
    for split in ("train", "val"):
        original = json.loads((Path(synthetic_root) / "annotations" / f"instances_{split}.json").read_text())
        halves = [json.loads(Path(splits[f"{h}_{split}"].annotations).read_text()) for h in ("base", "novel")]
        ids = sorted(a["id"] for half in halves for a in half["annotations"])
        assert ids == sorted(a["id"] for a in original["annotations"])
        names = [{c["name"] for c in half["categories"]} for half in halves]
        assert not names[0] & names[1] and names[0] | names[1] == {c["name"] for c in original["categories"]}
        assert splits[f"novel_{split}"].images == str(Path(synthetic_root) / "images" / split)
    # novel-only: the novel training images are those of the novel half without any base object
    clean = forgetting.write_synthetic_split(synthetic_root, tmp_path / "clean", None, "novel-only")
    original = json.loads((Path(synthetic_root) / "annotations" / "instances_train.json").read_text())
    novel_names = {c["name"] for c in json.loads(Path(splits["novel_train"].annotations).read_text())["categories"]}
    novel_ids = {c["id"] for c in original["categories"] if c["name"] in novel_names}
    expected = {i["id"] for i in original["images"]
                if {a["category_id"] for a in original["annotations"] if a["image_id"] == i["id"]} <= novel_ids
                and any(a["image_id"] == i["id"] for a in original["annotations"])}
    kept = json.loads(Path(clean["novel_train"].annotations).read_text())
    assert {i["id"] for i in kept["images"]} == expected and expected
    assert {a["image_id"] for a in kept["annotations"]} == expected
    assert Path(clean["base_train"].annotations).read_text() == Path(splits["base_train"].annotations).read_text()


# novel / base AP50 each fake fine-tune reaches, per seed; the pretrained model: novel 0.05, base 0.60
FAKE = {"full": ((0.50, 0.20), (0.60, 0.10)), "lora": ((0.47, 0.52), (0.55, 0.50)),
        "frozen_backbone": ((0.30, 0.40), (0.36, 0.30)), "ema": ((0.40, 0.30), (0.44, 0.26))}
PRETRAINED = (0.05, 0.60)
TRAINABLE = {"full": 1000, "lora": 50, "frozen_backbone": 400, "ema": 1000}


def _method_of(args: list[str]) -> str:
    save_dir = Path(args[args.index("--trainer.logger.init_args.save_dir") + 1])
    return save_dir.name.rsplit("_seed", 1)[0]


def _fake_runner(calls: list):
    def run(args: list[str], cell: Path) -> subprocess.CompletedProcess:
        calls.append(args)
        method, seed = _method_of(args), int(args[args.index("--seed_everything") + 1])
        run_dir = cell / "train" / "run"
        (run_dir / "checkpoints").mkdir(parents=True)
        # one "weight" per figure: a WiSE-FT interpolation of it scores the interpolated figures (_fake_evaluate)
        torch.save({"state_dict": {"w": torch.tensor(FAKE[method][seed], dtype=torch.float64)},
                    "hyper_parameters": {"method": method}}, run_dir / "checkpoints" / "last.ckpt")
        (run_dir / "config.yaml").write_text("model: {}\n")
        (run_dir / "step_stats.json").write_text(json.dumps(
            {"trainable_parameters": TRAINABLE[method], "total_parameters": 1000, "step_time_s": 0.1 * (seed + 1),
             "peak_memory_mb": 100.0}))
        novel = FAKE[method][seed][0]
        summary = {"untrained": {}, "trained": {"AP": novel / 2, "AP50": novel}, "run_dir": str(run_dir)}
        return subprocess.CompletedProcess(args, 0, "progress\n" + json.dumps(summary) + "\n", "")
    return run


def _fake_evaluate(args: list[str]) -> dict:
    split = args[args.index("--data.val_annotations") + 1]
    if "--ckpt_path" not in args:
        value = PRETRAINED[0] if split.endswith("novel_val.json") else PRETRAINED[1]
        return {"AP": value / 2, "AP50": value}
    checkpoint = Path(args[args.index("--ckpt_path") + 1])
    if checkpoint.name.startswith("alpha_"):  # a WiSE-FT cell's interpolated weights: (novel, base)
        weights = torch.load(checkpoint, weights_only=True)["state_dict"]["w"]
        return {"AP": 0.0, "AP50": float(weights[0] if split.endswith("novel_val.json") else weights[1])}
    cell = checkpoint.parents[3].name  # <cell>/train/run/checkpoints/last.ckpt
    method, seed = cell.rsplit("_seed", 1)
    assert split.endswith("base_val.json")  # a fine-tune's novel figure is its run's own last validation
    return {"AP": 0.0, "AP50": FAKE[method][int(seed)][1]}


def _parse(tmp_path: Path, *extra: str):
    for name in ("novel_train.json", "novel_val.json", "base_val.json"):
        (tmp_path / name).write_text("{}")
    return forgetting.parse(["--out", str(tmp_path / "out"), "--pretrained", "some/model", "--seeds", "0", "1",
                             "--methods", "full", "lora", "frozen_backbone", "ema",
                             "--novel-train", str(tmp_path / "novel_train.json"), str(tmp_path),
                             "--novel-val", str(tmp_path / "novel_val.json"), str(tmp_path),
                             "--base", "coco", str(tmp_path / "base_val.json"), str(tmp_path), *extra,
                             "--", "--config", "image/coco.yaml"])


def test_protocol_table_plot_and_resume(tmp_path, monkeypatch):
    from grounding.protocols import plots

    drawn = []
    real = plots.scatter_with_spread
    monkeypatch.setattr(plots, "scatter_with_spread", lambda points, path, *a: (drawn.extend(points), real(points, path, *a)))
    calls: list = []
    payload = forgetting.run(_parse(tmp_path), _fake_runner(calls), _fake_evaluate)
    assert len(calls) == 8 and payload["failed"] == []
    first = calls[0]
    assert first[:2] == ["--config", "image/coco.yaml"] and first[first.index("--model.model") + 1] == "some/model"
    assert first[first.index("--model.freeze") + 1] == "[]" and "--trainer.callbacks+=grounding.lightning.step_stats.StepStats" in first
    lora = next(a for a in calls if _method_of(a) == "lora")
    assert lora[lora.index("--model.lora.r") + 1] == "8"
    ema = next(a for a in calls if _method_of(a) == "ema")
    assert "--trainer.callbacks+=grounding.lightning.ema.WeightEMA" in ema and ema[ema.index("--trainer.callbacks.decay") + 1] == "0.99"

    rows = {r["method"]: r for r in payload["rows"]}
    full_novel = statistics.fmean(v[0] for v in FAKE["full"])
    for method, values in FAKE.items():
        row = rows[method]
        assert row["novel_AP50"] == pytest.approx(statistics.fmean(v[0] for v in values))
        assert row["novel_AP50_std"] == pytest.approx(statistics.stdev(v[0] for v in values))
        assert row["base_kept"] == pytest.approx(statistics.fmean(v[1] for v in values) / PRETRAINED[1])
        assert row["novel_of_full"] == pytest.approx(row["novel_AP50"] / full_novel)
        assert row["trainable_parameters"] == TRAINABLE[method] and row["step_time_s"] == pytest.approx(0.15)
        assert row["meets_goal"] == (method != "full" and row["base_kept"] >= 0.8 and row["novel_of_full"] >= 0.9)
    assert payload["meets_goal"] == ["lora"]  # base kept 0.85, novel 0.931 of full
    assert rows["pretrained"]["base_AP50"] == PRETRAINED[1] and rows["pretrained"]["n"] == 1

    out = tmp_path / "out"
    table = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [r["method"] for r in table] == ["pretrained", "full", "lora", "frozen_backbone", "ema"]
    markdown = (out / "table.md").read_text()
    assert "| lora ✓ | 2 | 0.510 ± 0.057 | 0.510 ± 0.014 | 85 % | 93 % | 50 (5.0 %) | 0.150 | 100 |" in markdown
    image = Image.open(out / "forgetting.png")
    assert image.format == "PNG" and image.size == (640, 480)
    lora_point = next(p for p in drawn if p[0] == "lora")
    assert lora_point[5] == [(0.47, 0.52), (0.55, 0.50)]  # each seed's (novel, base) as a dot

    # a second run finds every cell done; a new seed's failing training is recorded and the status is failure
    def failing(args, cell):
        calls.append(args)
        return subprocess.CompletedProcess(args, 1, "", "Traceback...\nRuntimeError: out of memory\n")
    again = forgetting.run(_parse(tmp_path, "--seeds", "0", "1", "2"), failing, _fake_evaluate)
    assert len(calls) == 8 + 4 and sorted(again["failed"]) == sorted(f"{m}_seed2" for m in FAKE)
    error = (out / "full_seed2" / "error.txt").read_text()
    assert error.startswith("training failed: exit code 1") and "RuntimeError: out of memory" in error


def test_wise_rows_interpolate_each_seeds_fine_tune(tmp_path, monkeypatch):
    from grounding.protocols import weight_ensemble

    monkeypatch.setattr(weight_ensemble, "init_state_dict",  # the base model's "weights": its own figures
                        lambda args: {"w": torch.tensor(PRETRAINED, dtype=torch.float64)})
    calls: list = []
    args = _parse(tmp_path, "--methods", "wise", "wise_frozen_backbone", "--wise-alpha", "0.5", "0.8")
    payload = forgetting.run(args, _fake_runner(calls), _fake_evaluate)
    # full and frozen_backbone each trained once per seed, though only their interpolations are rows
    assert sorted(_method_of(a) for a in calls) == ["frozen_backbone"] * 2 + ["full"] * 2 and payload["failed"] == []
    rows = {(r["method"], r.get("alpha")): r for r in payload["rows"]}
    assert sorted(rows) == sorted([("pretrained", None), ("wise", 0.5), ("wise", 0.8), ("wise_frozen_backbone", 0.5),
                                   ("wise_frozen_backbone", 0.8)])
    for method, source in (("wise", "full"), ("wise_frozen_backbone", "frozen_backbone")):
        for alpha in (0.5, 0.8):
            expected = [[(1 - alpha) * PRETRAINED[i] + alpha * FAKE[source][seed][i] for seed in (0, 1)] for i in (0, 1)]
            row = rows[(method, alpha)]
            assert row["novel_AP50"] == pytest.approx(statistics.fmean(expected[0]))
            assert row["base_AP50"] == pytest.approx(statistics.fmean(expected[1]))
            assert row["trainable_parameters"] == TRAINABLE[source]  # the fine-tune's cost
    written = torch.load(tmp_path / "out" / "wise_frozen_backbone_a0.8_seed1" / "alpha_0.8.ckpt", weights_only=True)
    assert written["weight_ensemble"]["alpha"] == 0.8 and written["hyper_parameters"] == {"method": "frozen_backbone"}
    markdown = (tmp_path / "out" / "table.md").read_text()
    assert "| wise_frozen_backbone (α = 0.8) | 2 |" in markdown and "| wise (α = 0.5) | 2 |" in markdown


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        forgetting.parse(["--out", str(tmp_path), "--pretrained", "x"])
    assert "--pretrained needs --novel-train, --novel-val and at least one --base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        forgetting.parse(["--out", str(tmp_path), "--wise-alpha", "1.5"])
    assert "--wise-alpha must be in [0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(tmp_path, "--novel-val", str(tmp_path / "missing.json"), str(tmp_path))
    assert f"{tmp_path / 'missing.json'}: no such file or folder" in capsys.readouterr().err
