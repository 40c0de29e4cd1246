"""The training-free segmentation protocol: the presets (an explicit setting beats the preset), each cell's
grounding-eval arguments, the table from finished summaries beside the published figures, resuming and failures,
and one real cell on the synthetic set whose mIoU a direct computation reproduces."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from grounding.protocols import segmentation as protocol


def _value(args, flag):
    """The value after the LAST ``flag`` (jsonargparse: the last one wins)."""
    return args[len(args) - 1 - args[::-1].index(flag) + 1]


# ------------------------------------------------------------------------------------------------ presets
def test_an_explicit_setting_beats_the_preset():
    from grounding.lightning.gem_module import GEMSegmentationModule, preset_settings
    from grounding.models.templates import IMAGENET_TEMPLATES

    module = GEMSegmentationModule(backbone="tiny", depth=3, preset="sclip", short_side=128, logit_scale=None,
                                   background_threshold=0.3)
    h = module.hparams
    assert (h.short_side, h.background_threshold) == (128, 0.3)  # given
    assert (h.window, h.stride, h.background, h.logit_scale) == (224, 112, "prompted", 40.0)  # SCLIP's protocol
    assert h.templates == list(IMAGENET_TEMPLATES) and len(h.templates) == 80
    assert (module.dense.short_side, module.dense.window, module.dense.stride) == (128, 224, 112)
    gem = preset_settings("gem")
    assert (gem["short_side"], gem["window"], gem["stride"], gem["templates"]) == (448, 0, None, ["a photo of a {}."])
    assert (gem["background"], gem["background_threshold"], gem["logit_scale"]) == ("unprompted", 0.85, 100.0)
    whole = preset_settings("sclip", window=0, templates="the {}.")
    assert (whole["window"], whole["stride"], whole["templates"]) == (0, None, ["the {}."])
    with pytest.raises(ValueError, match=r"^model.window 0 \(the whole image\) takes no stride; got stride 56$"):
        preset_settings("sclip", window=0, stride=56)
    with pytest.raises(ValueError, match=r"^model.background_area applies to background 'prompted' only"):
        preset_settings("gem", background_area=0.1)
    with pytest.raises(ValueError, match=r"^model.preset='clip' is not one of \('gem', 'sclip'\)$"):
        preset_settings("clip")


def test_prompted_background_and_synonyms_set_the_labels():
    """Under sclip every class is prompted with its synonyms; the labels follow SCLIP's rule on the words' maps."""
    from grounding.lightning.gem_module import GEMSegmentationModule

    module = GEMSegmentationModule(backbone="tiny", depth=3, preset="sclip", templates="a {}.", background_threshold=0.6)
    module.set_classes(["background", "cat", "dog"], 0, synonyms=[["sky", "wall"], ["cat"], ["dog", "puppy"]])
    assert module.prompted == [0, 1, 2] and module.owners == [0, 0, 1, 2, 2] and module._text.shape[0] == 5
    maps = torch.tensor([[0.30, 0.0], [0.0, 0.0], [0.0, 0.31], [0.0, 0.0], [0.0, 0.30]]).reshape(5, 1, 2)
    # pixel 0: "sky" leads (background anyway); pixel 1: cat 0.31 against puppy 0.30 at logit scale 40 -> unsure
    probabilities = torch.softmax(40 * maps.reshape(5, 2), dim=0)
    assert float(probabilities[2, 1]) < 0.6
    assert module.predict_labels(maps).flatten().tolist() == [0, 0]
    module.hparams.background_threshold = 0.0
    assert module.predict_labels(maps).flatten().tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"the data's synonyms list 2 classes but it has 3"):
        module.set_classes(["background", "cat", "dog"], 0, synonyms=[["sky"], ["cat"]])


# ------------------------------------------------------------------------------------------------ the cells
def test_cells_are_the_grid_and_bad_names_are_named():
    grid = protocol.cells(["voc21", "synthetic"], ["gem", "naclip"], ["gem", "sclip"], "both")
    assert len(grid) == 2 * 2 * 2 * 2 and grid[0].name == "voc21-gem-gem" and grid[1].name == "voc21-gem-gem-pamr"
    assert [c.name for c in grid[:4]] == ["voc21-gem-gem", "voc21-gem-gem-pamr", "voc21-naclip-gem", "voc21-naclip-gem-pamr"]
    with pytest.raises(ValueError, match=r"^--datasets: unknown \['voc12'\]; choose from voc21, context60"):
        protocol.cells(["voc12"], ["gem"], ["sclip"])
    with pytest.raises(ValueError, match=r"^--methods: \['gem'\] given more than once$"):
        protocol.cells(["voc21"], ["gem", "gem"], ["sclip"])
    with pytest.raises(ValueError, match=r"^--presets: unknown \['clip'\]; choose from gem, sclip$"):
        protocol.cells(["voc21"], ["gem"], ["clip"])


def test_cell_arguments_hold_the_protocols_settings_then_the_users_then_the_cells_own(tmp_path):
    user = ["--model.backbone", "tiny", "--model.short_side", "224"]
    args = protocol.cell_args(protocol.Cell("cityscapes", "naclip", "sclip", True), "/data", user, tmp_path)
    assert args[:2] == ["--config", str(protocol.config_file("cityscapes"))] and args[1].endswith("gem/cityscapes.yaml")
    start = args.index("--model.backbone")
    assert args[start:start + 4] == user and args.index("--model.short_side") < start  # the user's come after
    assert _value(args, "--model.short_side") == "224"  # ... and so win over the preset's 560
    assert args[args.index("--model.short_side") + 1] == "560"  # SCLIP's Cityscapes shorter side
    for flag, value in (("--model.window", "224"), ("--model.stride", "112"), ("--model.background", "prompted"),
                        ("--model.logit_scale", "40.0"), ("--model.background_threshold", "0.0"),
                        ("--model.method", "naclip"), ("--model.preset", "sclip"), ("--model.pamr", "true"),
                        ("--data.synonyms", "cityscapes"), ("--data.root", str(Path("/data/cityscapes"))),
                        ("--trainer.logger.init_args.save_dir", str(tmp_path / "cityscapes-naclip-sclip-pamr"))):
        assert _value(args, flag) == value, flag
    voc = protocol.cell_args(protocol.Cell("voc21", "gem", "sclip"), "/data", [], tmp_path)
    # SCLIP's cfg_voc21.py: logit_scale=65, prob_thd=0.1, area_thd=0.1, shorter side 336
    assert [_value(voc, f"--model.{k}") for k in ("logit_scale", "background_threshold", "background_area", "short_side")] \
        == ["65.0", "0.1", "0.1", "336"]
    gem = protocol.cell_args(protocol.Cell("context60", "gem", "gem"), "/data", [], tmp_path)
    assert [_value(gem, f"--model.{k}") for k in ("short_side", "window", "stride", "background_threshold", "logit_scale")] \
        == ["448", "0", "null", "0.85", "100.0"]
    assert _value(gem, "--data.synonyms") == "null" and "--model.pamr" not in gem  # GEM prompts the class names
    with pytest.raises(ValueError, match=r"^the arguments after -- set --model.method, which the protocol sets"):
        protocol.run_protocol([protocol.Cell("voc21", "gem", "gem")], "/data", ["--model.init_args.method=x"], tmp_path)


# ------------------------------------------------------------------------------------------------ the table
def _fake_runner(calls, scores, fail=()):
    """Stands for grounding-eval: the summary line of ``scores[cell name]``, or exit code 2 for ``fail``."""

    def runner(args, cell_dir):
        name = Path(cell_dir).name
        calls.append(name)
        if name in fail:
            return subprocess.CompletedProcess(args, 2, "", "Traceback\nValueError: boom\n")
        line = json.dumps({"split": "val", "mIoU": scores[name], "mAcc": 0.5, "aAcc": 0.9, "run_dir": str(cell_dir)})
        return subprocess.CompletedProcess(args, 0, "log line\n" + line + "\n", "")

    return runner


def _rows(markdown):
    """[cells] of the table's rows (header and rule left out)."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("| ")][1:]


def test_the_table_of_finished_cells_beside_the_published_figures(tmp_path, capsys):
    out = tmp_path / "out"
    grid = protocol.cells(["voc21", "ade20k"], ["naclip", "maskclip"], ["sclip"])
    (out / "voc21-naclip-sclip").mkdir(parents=True)  # finished by an earlier run: kept, not run again
    (out / "voc21-naclip-sclip" / "summary.json").write_text(json.dumps({"mIoU": 0.5, "run_dir": "r"}))
    calls = []
    scores = {"ade20k-naclip-sclip": 0.2, "voc21-maskclip-sclip": 0.4}
    status = protocol.main(["--datasets", "voc21", "ade20k", "--methods", "naclip", "maskclip", "--out", str(out),
                            "--table", str(tmp_path / "t.md")],
                           runner=_fake_runner(calls, scores, fail={"ade20k-maskclip-sclip"}))
    printed = capsys.readouterr().out
    assert status == 1 and sorted(calls) == ["ade20k-maskclip-sclip", "ade20k-naclip-sclip", "voc21-maskclip-sclip"]
    assert "boom" in (out / "ade20k-maskclip-sclip" / "error.txt").read_text()
    markdown = (tmp_path / "t.md").read_text()
    assert markdown == (out / "table.md").read_text() and markdown in printed
    rows = _rows(markdown)
    assert rows[0] == ["naclip", "sclip", "50.00", "20.00", "35.00"]  # (50 + 20) / 2
    # NACLIP's published VOC21 and ADE20K (ViT-B/16, no PAMR), its mean over the eight
    assert rows[1] == ["published [1]", "ViT-B/16", "58.9", "17.4", "39.4 (eight)"]
    assert rows[2] == ["maskclip", "sclip", "40.00", "—", "40.00 (over 1)"]
    assert rows[3] == ["published [2]", "ViT-B/16", "43.4", "11.9", "30.3 (eight)"]
    assert "[1] NACLIP (Hajimiri et al., WACV 2025)" in markdown and "Failed cells" in markdown
    summary = json.loads(printed.strip().splitlines()[-1])  # the JSON line comes last
    assert summary["failed"] == ["ade20k-maskclip-sclip"] and len(summary["cells"]) == len(grid)
    assert {r["method"]: r["mean"] for r in summary["rows"]} == {"naclip": 0.35, "maskclip": 0.4}

    calls.clear()  # again: only the failed cell runs
    assert protocol.main(["--datasets", "voc21", "ade20k", "--methods", "naclip", "maskclip", "--out", str(out)],
                         runner=_fake_runner(calls, {"ade20k-maskclip-sclip": 0.1})) == 0
    assert calls == ["ade20k-maskclip-sclip"] and not (out / "ade20k-maskclip-sclip" / "error.txt").exists()


# ------------------------------------------------------------------------------------------------ one real cell
def _in_process(args, cell_dir):
    """grounding-eval in this process (the imports are paid once; the subprocess launch is sweep's, tested there)."""
    from grounding.cli import evaluate

    metrics = evaluate(args)
    return subprocess.CompletedProcess(args, 0, json.dumps(metrics) + "\n", "")


@pytest.mark.slow
def test_one_real_cell_on_the_synthetic_set(synthetic_root, tmp_path):
    """The cell's mIoU equals the labels of the preset's settings recomputed directly, with a naive mIoU."""
    from grounding.data.segmentation import SegmentationDataModule
    from grounding.lightning.gem_module import GEMSegmentationModule

    root = tmp_path / "data"
    root.mkdir()
    (root / "synthetic").symlink_to(synthetic_root, target_is_directory=True)
    user = ["--model.backbone", "tiny", "--model.depth", "3", "--model.short_side", "96", "--model.window", "64",
            "--model.stride", "32", "--model.templates", "a {}.", "--model.log_images", "0", "--data.limit", "2",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]
    cell = protocol.Cell("synthetic", "gem", "sclip")
    summary = protocol.run_protocol([cell], root, user, tmp_path / "out", runner=_in_process)
    assert summary["failed"] == [] and summary["cells"][0]["run_dir"]
    report = (Path(summary["cells"][0]["run_dir"]) / "predictions" / "gem_val_iou.md").read_text()
    assert report.startswith("gem (preset sclip: short side 96, windows 64 / stride 32, 'a {}.', background prompted")

    module = GEMSegmentationModule(backbone="tiny", depth=3, preset="sclip", short_side=96, window=64, stride=32,
                                   templates="a {}.")
    data = SegmentationDataModule(format="synthetic", synthetic_root=str(root / "synthetic"), split="val", limit=2)
    data.setup()
    module.classes_from(data)
    intersection, union = {}, {}
    for index in range(len(data.dataset)):
        sample = data.dataset[index]
        labels = module.predict_labels(module.class_maps(sample["image"], module._text))
        truth = sample["labels"]
        for c in range(len(data.class_names)):
            predicted, actual = (labels == c) & (truth != 255), truth == c
            intersection[c] = intersection.get(c, 0) + int((predicted & actual).sum())
            union[c] = union.get(c, 0) + int((predicted | actual).sum())
    ious = [intersection[c] / union[c] for c in union if union[c]]
    assert summary["cells"][0]["mIoU"] == pytest.approx(sum(ious) / len(ious), abs=1e-4)
