"""MimicModule under the Trainer: PNGs written once, metrics equal to the written answers, bf16, 2 processes, the
setting groups and their checks."""

import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentError, ArgumentParser
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grounding.data.concepts import ConceptDataModule
from grounding.lightning.label_writer import RGBImageWriter
from grounding.lightning.mimic_module import LoggingSettings, MimicModule, ScoringSettings
from grounding.metrics.answers import exact_match, token_f1
from grounding.models.mimic import (
    BatchNormPrior,
    MimicObjective,
    MimicWeights,
    SynthesisSettings,
    VLMSettings,
    build_cnn,
    build_vlm,
    synthesize,
)

from ..conftest import run_in_process

REPO = Path(__file__).resolve().parents[2]
SYNTHESIS = SynthesisSettings(iterations=3, jitter=1, samples_per_target=2)
ONE_SAMPLE = SynthesisSettings(iterations=3, jitter=1, samples_per_target=1)
SCORING = ScoringSettings(verifier="tiny", clip_image_size=32, max_new_tokens=3)
NO_CLIP = ScoringSettings(verifier="tiny", clip=None, max_new_tokens=3)
FAST = dict(synthesis=SYNTHESIS, scoring=SCORING, logging=LoggingSettings(every=2))


def _targets(tmp_path):
    refs = tmp_path / "refs" / "fish"
    refs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(refs / f"{i}.png")
    targets = [{"id": "fish", "target": "a goldfish", "references": "refs/fish", "verifier_class": 3},
               {"id": "star", "prompt": "Which shape is it?", "target": "a red star"}]
    path = tmp_path / "targets.yaml"
    path.write_text(yaml.safe_dump(targets))
    return path


def _trainer(tmp_path, **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(str(tmp_path / "runs"), name="mimic"),
                     callbacks=[RGBImageWriter(folder_name="mimic")], enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.fixture(scope="module")
def mimic_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mimic")
    data = ConceptDataModule(format="file", targets_file=str(_targets(tmp_path)), batch_size=2)
    scoring = ScoringSettings(verifier="tiny", clip_image_size=32, max_new_tokens=3, lpips_diversity=True,
                              lpips_pretrained_backbone=False)
    model = MimicModule(cache_dir=str(tmp_path / "cache"), **{**FAST, "scoring": scoring})
    trainer = _trainer(tmp_path)
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    return tmp_path, model, data, trainer, metrics


def test_every_image_is_written_once_as_the_synthesis_gives_it(mimic_run):
    tmp_path, model, data, trainer, _ = mimic_run
    folder = Path(trainer.log_dir) / "predictions" / "mimic"
    assert sorted(p.name for p in folder.iterdir()) == ["fish_0.png", "fish_1.png", "star_0.png", "star_1.png"]
    model._logged = model.logging_settings.targets  # no more TensorBoard pictures from this call
    again = model.synthesize_target(data.dataset[0])  # seeded by the target id: the same images again
    for k in range(2):
        assert np.array_equal(np.asarray(Image.open(folder / f"fish_{k}.png")), again["images"][k].permute(1, 2, 0).numpy())
    assert list((tmp_path / "cache").glob("featstats-*.pt"))  # the fish's references were cached


def test_logged_metrics_are_those_of_the_written_answers(mimic_run):
    _, _, data, trainer, metrics = mimic_run
    payload = json.loads((Path(trainer.log_dir) / "predictions" / f"mimic_{data.evaluation_split}.json").read_text())
    records = {r["target_id"]: r for r in payload["targets"]}
    assert sorted(records) == ["fish", "star"] and metrics["test/targets"] == 2 and metrics["test/syntheses"] == 2
    want_em = np.mean([np.mean([exact_match(a, r["target"]) for a in r["answers"]]) for r in records.values()])
    want_f1 = np.mean([np.mean([token_f1(a, r["target"]) for a in r["answers"]]) for r in records.values()])
    assert metrics["test/exact_match"] == pytest.approx(want_em) and metrics["test/token_f1"] == pytest.approx(want_f1)
    assert all(len(r["answers"]) == 2 for r in records.values())
    assert metrics["test/verifier_acc1"] == pytest.approx(records["fish"]["verifier_acc1"])  # star has no class
    assert "verifier_acc1" not in records["star"] and "base" not in records["star"]["final_losses"]
    assert "base" in records["fish"]["final_losses"]
    for name in ("clip_score", "lpips_diversity", "sce_first", "sce_last"):
        assert metrics[f"test/{name}"] == pytest.approx(np.mean([r[name] for r in records.values()]), rel=1e-6)
    assert metrics["test/lpips_diversity"] > 0


def test_tensorboard_gets_image_grids_and_loss_curves(mimic_run):
    _, _, _, trainer, _ = mimic_run
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Images("mimic/fish")] == [0, 2]
    assert [e.step for e in events.Scalars("mimic/fish/sce")] == [0, 2]
    assert max(events.Images("mimic/fish")[0].width, events.Images("mimic/fish")[0].height) == 512  # enlarged to read


def test_bf16_autocast_runs_with_float32_losses(tmp_path):
    data = ConceptDataModule(format="file", targets_file=str(_targets(tmp_path)), limit=1)
    model = MimicModule(cache_dir=None, **{**FAST, "synthesis": ONE_SAMPLE, "scoring": NO_CLIP})
    metrics = _trainer(tmp_path, precision="bf16-mixed").test(model, datamodule=data, verbose=False)[0]
    assert math.isfinite(metrics["test/sce_last"]) and metrics["test/targets"] == 1
    assert math.isnan(metrics["test/clip_score"])


def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    data = ConceptDataModule(format="file", targets_file=str(_targets(tmp_path)), limit=1)
    results = []
    for checkpointing in (False, True):
        model = MimicModule(vlm=VLMSettings(gradient_checkpointing=checkpointing), cache_dir=None,
                            **{**FAST, "synthesis": ONE_SAMPLE, "scoring": NO_CLIP})
        results.append(_trainer(tmp_path / str(checkpointing)).test(model, datamodule=data, verbose=False)[0])
    assert results[1]["test/sce_last"] == pytest.approx(results[0]["test/sce_last"], rel=1e-5)
    assert results[1]["test/sce_first"] == pytest.approx(results[0]["test/sce_first"], rel=1e-6)


def test_a_reference_folder_without_images_names_the_target(tmp_path):
    (tmp_path / "empty").mkdir()
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump([{"id": "cat", "target": "a cat", "references": "empty"}]))
    data = ConceptDataModule(format="file", targets_file=str(path))
    model = MimicModule(cache_dir=None, synthesis=SynthesisSettings(iterations=1), scoring=NO_CLIP)
    with pytest.raises(ValueError, match=rf"^target 'cat': reference-image folder {tmp_path}/empty holds no image"):
        _trainer(tmp_path).test(model, datamodule=data, verbose=False)


@pytest.fixture(scope="module")
def parser():
    """The command line's parser of the module's settings (the groups as LightningCLI reads them)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MimicModule, "model")
    return parser


def test_the_config_groups_parse_into_their_dataclasses(parser):
    config = yaml.safe_load((REPO / "configs" / "mimic" / "llava.yaml").read_text())["model"]["init_args"]
    parsed = parser.parse_object({"model": config})
    assert parsed.model.vlm.dtype == "bfloat16" and parsed.model.weights.bn == 0.005
    assert tuple(parsed.model.synthesis.betas) == (0.5, 0.9) and parsed.model.scoring.verifier == "resnet50"
    synthetic = yaml.safe_load((REPO / "configs" / "mimic" / "synthetic.yaml").read_text())["model"]["init_args"]
    parsed = parser.parse_object({"model": synthetic})
    assert (parsed.model.synthesis.iterations, parsed.model.synthesis.samples_per_target) == (20, 2)
    assert (parsed.model.logging.every, parsed.model.scoring.max_new_tokens) == (5, 4)
    assert parsed.model.weights.sce == MimicWeights().sce  # a group the config leaves out keeps its defaults


@pytest.mark.parametrize("args, message", [
    (["--model.vlm.dtype", "bf16"],
     r"^Parser key \"model.vlm.dtype\":\n  Expected a typing.Literal\['float32', 'bfloat16', 'float16'\]. Got value: bf16$"),
    (["--model.scoring.lpips_net", "resnet"], r"Expected a typing.Literal\['alex', 'vgg', 'squeeze'\]. Got value: resnet$"),
    (["--model.weights.sce", "-1"], r"^Parser key \"model.weights.sce\":\n  Not of type NonNegativeFloat: -1 does not "
                                    r"conform to restriction v>=0$"),
    (["--model.synthesis.iterations", "-1"], r"Not of type NonNegativeInt: -1 does not conform to restriction v>=0$"),
    (["--model.synthesis.samples_per_target", "0"], r"Not of type PositiveInt: 0 does not conform to restriction v>0$"),
    (["--model.synthesis.betas", "[0.5, 1.0]"], r"Not of type AdamBeta: 1.0 does not conform to restriction v>=0 and v<1$"),
    (["--model.logging.every", "0"], r"Not of type PositiveInt: 0 does not conform to restriction v>0$"),
])
def test_the_types_reject_a_bad_setting_and_name_it(parser, args, message):
    with pytest.raises(ArgumentError, match=message):
        parser.parse_args(args)


@pytest.mark.parametrize("kwargs, message", [
    ({"scoring": ScoringSettings(lpips_diversity=True)},
     r"^model.scoring.lpips_diversity needs model.synthesis.samples_per_target >= 2 \(the distance between samples of "
     r"one target\), got 1$"),
    ({"synthesis": SynthesisSettings(lr=0.01, lr_min=0.1)},
     r"^model.synthesis.lr_min must be at most the starting lr \(the cosine runs from lr down to lr_min\), "
     r"got lr=0.01, lr_min=0.1$"),
    ({"vlm": VLMSettings(prompt_template="Q: {prompt}")},
     r"^model.vlm.prompt_template must hold '<image>' and '\{prompt\}', got 'Q: \{prompt\}'$"),
])
def test_settings_that_disagree_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MimicModule(**kwargs)


def test_the_module_synthesizes_what_the_plain_function_does(tmp_path):
    """``synthesize_target`` = ``synthesize`` on a fresh tiny VLM with the module's settings and the generator
    seeded by (seed, target id): the Trainer adds nothing to the images."""
    model = MimicModule(cache_dir=None, seed=3, **{**FAST, "scoring": NO_CLIP})
    out = model.synthesize_target({"target_id": "star", "prompt": "Which shape is it?", "target": "a red star"})
    objective = MimicObjective(build_vlm("tiny"), MimicWeights(), BatchNormPrior(build_cnn("tiny")))
    generator = torch.Generator().manual_seed(3 * 1_000_003 + zlib.crc32(b"star"))
    result = synthesize(objective, "Which shape is it?", "a red star", SYNTHESIS, generator=generator)
    want = (result.images * 255).round().clamp(0, 255).to(torch.uint8)
    assert len(out["images"]) == 2 and all(torch.equal(a, b) for a, b in zip(out["images"], want))
    assert out["record"]["final_losses"] == result.history[-1]


@pytest.mark.slow
def test_two_processes_split_the_targets_and_write_every_image_once(synthetic_root, tmp_path):
    """3 synthetic concepts over 2 spawned processes (gloo): the same images and metrics as 1 process, each PNG
    once, every target synthesized once (test/syntheses)."""
    outputs = {}
    for devices in (1, 2):
        args = ["--config", str(REPO / "configs" / "mimic" / "synthetic.yaml"),
                "--data.init_args.synthetic_root", str(synthetic_root), "--model.init_args.synthesis.iterations", "3",
                "--model.init_args.cache_dir", str(tmp_path / "cache"),
                "--trainer.logger.init_args.save_dir", str(tmp_path / f"d{devices}"), "--trainer.enable_progress_bar", "false",
                "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
                "--trainer.strategy", "ddp_spawn" if devices > 1 else "auto"]
        if devices == 1:  # the reference, in this process: no subprocess imports
            result = run_in_process("eval.py", args, tmp_path, threads=1)
        else:
            result = subprocess.run(
                [sys.executable, str(REPO / "eval.py"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                env={**__import__("os").environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
            )
        assert result.returncode == 0, result.stderr[-4000:]
        outputs[devices] = json.loads(result.stdout.strip().splitlines()[-1])
    one, two = outputs[1], outputs[2]
    assert one["targets"] == two["targets"] == 3 and one["syntheses"] == two["syntheses"] == 3
    for name in ("exact_match", "token_f1", "clip_score", "verifier_acc1", "sce_first", "sce_last"):
        assert two[name] == pytest.approx(one[name], abs=1e-4), name
    # the printed run folder is the one the (spawned) workers wrote to, and the only one
    for devices, out in outputs.items():
        assert [p.name for p in (tmp_path / f"d{devices}" / "mimic_synthetic").iterdir()] == ["version_0"]
        assert Path(out["run_dir"]).resolve() == (tmp_path / f"d{devices}" / "mimic_synthetic" / "version_0").resolve()
    folders = {d: Path(out["run_dir"]) / "predictions" / "mimic" for d, out in outputs.items()}
    names = sorted(p.name for p in folders[1].iterdir())
    assert len(names) == 6 and sorted(p.name for p in folders[2].iterdir()) == names
    for name in names:
        assert np.array_equal(np.asarray(Image.open(folders[1] / name)), np.asarray(Image.open(folders[2] / name)))
