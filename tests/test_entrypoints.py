"""train.py / eval.py as a user runs them, and the same evaluation under DDP (2 CPU processes, gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .conftest import TEST_MODEL_CONFIG, run_in_process

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(script, *args, cwd, env=None, in_process=False):
    """The summary line of ``python SCRIPT ARGS``; ``in_process``: run in this process (a DDP comparison's 1-process
    reference: no subprocess imports), ``env``'s OMP_NUM_THREADS as its torch threads."""
    if in_process:
        threads = (env or {}).get("OMP_NUM_THREADS")
        result = run_in_process(script, list(args), cwd, threads=None if threads is None else int(threads))
    else:
        result = subprocess.run(
            [sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
            env={**__import__("os").environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def common_args(root, save_dir):
    return [
        "--data.synthetic_root", str(root), "--data.image_size", "96", "--data.max_size", "128", "--data.num_workers", "0",
        "--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
    ]


@pytest.fixture(scope="module")
def training_run(synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    summary = run(
        "train.py", *common_args(synthetic_root, folder / "runs"), "--trainer.max_epochs", "2",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1", "--model.lr", "5e-4",
        cwd=folder,
    )
    return folder, summary


def test_train_writes_checkpoints_logs_and_predictions(training_run):
    folder, summary = training_run
    run_dir = Path(summary["run_dir"])
    assert summary["steps"] == 2 * 3  # 12 training images, batch 4, 2 epochs
    assert set(summary["untrained"]) == set(summary["trained"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"}
    assert (run_dir / "config.yaml").is_file()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == summary["steps"]  # the latest weights, whether or not AP improved
    assert len(list((run_dir / "checkpoints").glob("epoch*.ckpt"))) == 1  # and the best one
    # the untrained model's validation, then one per epoch; the last one is the trained model's (no duplicate run)
    assert sorted(p.name for p in (run_dir / "predictions").iterdir()) == ["val_epoch000.json", "val_epoch001.json", "val_step000000.json"]
    trained = json.loads((run_dir / "predictions" / "val_epoch001.json").read_text())
    assert len(trained) == 5 * 30 * 6 or len(trained) == 5 * 300  # top (query, category) pairs of the 5 val images
    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert {"train/loss", "train/loss_ce", "train/loss_bbox", "train/loss_giou", "val/AP", "val/AP50", "mask/strength_k"} <= scalars
    assert {f"mask/ratio_level{level}" for level in range(4)} <= scalars
    assert {"val/predictions", "train/masks"} <= images
    # pictures a researcher reads: ground truth | predictions at >= 512 px each; the 4 level masks over the image
    predictions, masks = events.Images("val/predictions")[-1], events.Images("train/masks")[-1]
    assert predictions.width >= 2 * 512 and predictions.height >= 512
    assert masks.width >= 4 * 512 and masks.height >= 512
    strengths = [e.value for e in events.Scalars("mask/strength_k")]
    assert strengths[0] == pytest.approx(0.5) and strengths == sorted(strengths, reverse=True)  # k decays


def test_eval_of_the_checkpoint_reproduces_the_final_validation(training_run, synthetic_root):
    folder, summary = training_run
    run_dir = Path(summary["run_dir"])
    metrics = run(
        "eval.py", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
        "--trainer.logger.init_args.save_dir", str(folder / "eval"), cwd=folder,
    )
    for name, value in summary["trained"].items():
        assert metrics[name] == pytest.approx(value, abs=1e-4)


def test_ddp_evaluation_on_two_processes_equals_one(training_run, synthetic_root):
    folder, summary = training_run
    checkpoint = str(Path(summary["run_dir"]) / "checkpoints" / "last.ckpt")
    results = {}
    for devices in (1, 2):
        out = run(
            "eval.py", *common_args(synthetic_root, folder / f"ddp{devices}"), "--ckpt_path", checkpoint,
            "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto",
            "--data.eval_batch_size", "2", cwd=folder, in_process=devices == 1,
        )
        predictions = json.loads((Path(out["run_dir"]) / "predictions" / "val.json").read_text())
        results[devices] = (out, predictions)
    (one, p1), (two, p2) = results[1], results[2]
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert two[name] == pytest.approx(one[name], abs=1e-6)
    # 5 validation images over 2 processes: the sampler repeats one; it must be counted once, none missing.
    # Per image and category the same scores (to float noise: batches are composed differently).
    def by_image(predictions):
        grouped = {}
        for d in predictions:
            grouped.setdefault((d["image_id"], d["category_id"]), []).append(d["score"])
        return {key: sorted(scores) for key, scores in grouped.items()}

    g1, g2 = by_image(p1), by_image(p2)
    assert len(p2) == len(p1) and g2.keys() == g1.keys() and len({i for i, _ in g1}) == 5
    for key in g1:
        assert g2[key] == pytest.approx(g1[key], abs=1e-4)


MI_BACKBONE = {"vision_config": {"num_hidden_layers": 2, "image_size": 64}, "text_config": {"num_hidden_layers": 1}}


def maskinversion_args(root, save_dir):
    return [
        "--config", str(REPO / "configs" / "maskinversion" / "synthetic.yaml"),
        "--data.init_args.synthetic_root", str(root), "--model.init_args.image_size", "64",
        "--model.init_args.backbone_config", json.dumps(MI_BACKBONE), "--model.init_args.inversion.iterations", "3",
        "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false",
        "--trainer.accelerator", "cpu",
    ]


def test_maskinversion_eval_on_two_processes_equals_one(synthetic_root, tmp_path):
    results = {}
    for devices in (1, 2):
        out = run(
            "eval.py", *maskinversion_args(synthetic_root, tmp_path / f"mi{devices}"), "--trainer.devices", str(devices),
            "--trainer.strategy", "ddp" if devices > 1 else "auto", cwd=tmp_path, in_process=devices == 1,
        )
        saved = torch.load(Path(out["run_dir"]) / "predictions" / "maskinversion_val.pt", weights_only=False)
        results[devices] = (out, saved)
    (one, s1), (two, s2) = results[1], results[2]
    assert one["split"] == "val"
    assert {f"acc1_{m}" for m in ("maskinversion", "global", "crop", "masked_crop", "red_circle")} <= set(one)
    for name, value in one.items():
        if name.startswith("acc1_") or name == "regions":
            assert two[name] == pytest.approx(value, abs=1e-6), name
    # 5 validation images over 2 processes: the sampler repeats one; each region is saved once, none missing
    assert sorted(s2["keys"]) == sorted(s1["keys"]) and len(s1["keys"]) == one["regions"]
    order = [s2["keys"].index(k) for k in s1["keys"]]
    torch.testing.assert_close(s2["embeddings"][order], s1["embeddings"], rtol=1e-4, atol=1e-5)


def test_coco_config_applies_alone(synthetic_root, tmp_path, monkeypatch):
    """configs/image/coco.yaml is not layered on the demo config: its trainer settings are its own and
    Lightning's defaults (not the demo's check_val_every_n_epoch 9 / num_sanity_val_steps 0), no synthetic
    split is filled in, and the paper's step decay is used. Found from any folder, with or without "configs/"."""
    from grounding.cli import build_cli
    from grounding.data.coco_file import read_categories

    monkeypatch.chdir(tmp_path)  # the packaged configs are found wherever the command runs
    val = str(synthetic_root / "annotations" / "instances_val.json")
    for name in ("configs/image/coco.yaml", "image/coco.yaml"):
        cli = build_cli([
            "--config", name, "--model.model", "tiny", "--trainer.accelerator", "cpu",
            "--data.val_annotations", val, "--data.val_images", str(synthetic_root / "images" / "val"),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
        ])
        assert cli.trainer.check_val_every_n_epoch == 1 and cli.trainer.num_sanity_val_steps == 2
        assert cli.trainer.max_epochs == 12 and cli.trainer.gradient_clip_val == 0.1
        assert cli.datamodule.paths["train"] == (None, None) and cli.datamodule.paths["test"] == (None, None)
        assert cli.datamodule.categories == read_categories(val)
        assert cli.model.hparams.lr_schedule == "step" and cli.model.hparams.lr_drop_epochs == [11]
    demo = build_cli(["--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--trainer.accelerator", "cpu",
                      "--data.synthetic_root", str(synthetic_root), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    import yaml

    demo_trainer = yaml.safe_load((REPO / "configs" / "image" / "synthetic.yaml").read_text())["trainer"]
    assert demo_trainer["check_val_every_n_epoch"] != 1  # else the comparison below could not tell the configs apart
    assert demo.trainer.check_val_every_n_epoch == demo_trainer["check_val_every_n_epoch"]  # the demo without --config
    assert demo.trainer.num_sanity_val_steps == demo_trainer["num_sanity_val_steps"] == 0


def test_a_built_wheel_ships_the_configs_and_the_commands(tmp_path):
    """A plain (not editable) install finds its configs: they are package data, with the console scripts."""
    import zipfile

    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("grounding-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.split("grounding/configs/", 1)[1] for n in names if n.startswith("grounding/configs/")}
    in_repo = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped == in_repo and "image/synthetic.yaml" in shipped
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "grounding-train = grounding.cli:train_main" in entry_points and "grounding-eval = grounding.cli:eval_main" in entry_points


def test_invseg_eval_on_two_processes_equals_one(synthetic_root, tmp_path):
    """5 validation images over 2 processes (the sampler repeats one): the same mIoU as 1 process, every label
    PNG written once and equal, the IoU table in the run folder. One thread per process in both runs (Lightning
    gives each of 2 DDP processes 1 of the 2 cores): other thread counts sum in another order, which can flip
    a near-tied pixel."""
    outputs = {}
    for devices in (1, 2):
        out = run(
            "eval.py", "--config", str(REPO / "configs" / "invseg" / "synthetic.yaml"),
            "--data.init_args.synthetic_root", str(synthetic_root), "--data.init_args.limit", "null",
            "--model.init_args.image_size", "64", "--model.init_args.resolution", "8", "--model.init_args.inversion.steps", "1",
            "--trainer.logger.init_args.save_dir", str(tmp_path / f"is{devices}"), "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
            "--trainer.strategy", "ddp" if devices > 1 else "auto", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
            in_process=devices == 1,
        )
        outputs[devices] = out
    one, two = outputs[1], outputs[2]
    assert one["split"] == "val" and {"mIoU", "mAcc", "aAcc"} <= set(one)
    for name in ("mIoU", "mAcc", "aAcc"):
        assert two[name] == pytest.approx(one[name], abs=1e-6), name
    labels = {d: Path(o["run_dir"]) / "predictions" / "labels" for d, o in outputs.items()}
    names = sorted(p.name for p in labels[1].glob("*.png"))
    assert len(names) == 5 and sorted(p.name for p in labels[2].glob("*.png")) == names
    for name in names:
        assert np.array_equal(np.asarray(Image.open(labels[1] / name)), np.asarray(Image.open(labels[2] / name)))
    assert (Path(one["run_dir"]) / "predictions" / "invseg_val_iou.md").is_file()


def test_logger_false_drops_the_learning_rate_monitor(synthetic_root, tmp_path, monkeypatch):
    """Lightning refuses a LearningRateMonitor without a logger; the demo config has one."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from grounding.cli import build_cli

    monkeypatch.chdir(tmp_path)
    with_logger = build_cli(["--data.synthetic_root", str(synthetic_root), "--trainer.accelerator", "cpu"])
    assert any(isinstance(c, LearningRateMonitor) for c in with_logger.trainer.callbacks)
    cli = build_cli(["--data.synthetic_root", str(synthetic_root), "--trainer.accelerator", "cpu", "--trainer.logger", "false"])
    assert cli.trainer.logger is None
    assert not any(isinstance(c, LearningRateMonitor) for c in cli.trainer.callbacks)


@pytest.mark.parametrize("config, metric", [("synthetic.yaml", "mIoU")])
def test_gem_eval_on_two_processes_equals_one(synthetic_root, tmp_path, config, metric):
    """5 validation images over 2 processes (the sampler repeats one): the same mIoU as 1 process. (p-mIoU's
    gathering across processes is tested in tests/metrics/test_point_miou.py, on 2 spawned processes.)"""
    outputs = {}
    for devices in (1, 2):
        outputs[devices] = run(
            "eval.py", "--config", str(REPO / "configs" / "gem" / config),
            "--data.init_args.synthetic_root", str(synthetic_root), "--model.init_args.short_side", "64",
            "--trainer.logger.init_args.save_dir", str(tmp_path / f"gem{devices}"), "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
            "--trainer.strategy", "ddp" if devices > 1 else "auto", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
            in_process=devices == 1,
        )
    assert outputs[1]["split"] == "val" and outputs[1][metric] is not None
    assert outputs[2][metric] == pytest.approx(outputs[1][metric], abs=1e-6)
