"""The command line as a newcomer meets it: --help, one-line errors, checks before a run, stdout, start-up time.

Most checks parse in-process (``build_cli`` stops at the error, before anything is built); the few subprocess
runs are what a user types."""

import importlib
import inspect
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import lightning  # noqa: F401 - imported at collection: its log handler then writes to the session's stderr
import pytest
import yaml

from grounding.cli import CONFIG_ROOT, build_cli, checkpoint_class_path, evaluate, resolve_arguments

from .conftest import TEST_MODEL_CONFIG

REPO = Path(__file__).resolve().parent.parent
GEM = REPO / "configs" / "gem" / "synthetic.yaml"
DEMO = REPO / "configs" / "image" / "synthetic.yaml"


def section(config: Path, key: str) -> dict:
    return yaml.safe_load(config.read_text())[key]


def class_name(config: Path, key: str) -> str:
    return section(config, key)["class_path"].rsplit(".", 1)[-1]


def error_of(capsys, args: list[str]) -> str:
    """The one error line of a command line that ``build_cli`` refuses (exit status 2), without ``PROG: error: ``."""
    with pytest.raises(SystemExit) as exit_info:
        build_cli(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Union" not in err and "usage:" not in err, err
    (line,) = [line for line in err.splitlines() if ": error: " in line]
    assert err.rstrip().endswith(line)  # the last thing written
    return line.split(": error: ", 1)[1]


def test_short_config_flag_replaces_the_demo_config():
    gem = str(CONFIG_ROOT / "gem" / "synthetic.yaml")
    assert resolve_arguments(["-c", "gem/synthetic.yaml", "--trainer.max_steps", "1"]) == ["-c", gem, "--trainer.max_steps", "1"]
    assert resolve_arguments(["--trainer.max_steps", "1"]) == ["--config", str(CONFIG_ROOT / "image" / "synthetic.yaml"),
                                                               "--trainer.max_steps", "1"]


def test_a_bad_config_file_is_one_line(capsys, tmp_path):
    (tmp_path / "broken.yaml").write_text("model:\n  class_path: [\n")
    (tmp_path / "list.yaml").write_text("- trainer\n")
    (tmp_path / "empty.yaml").write_text("")
    expected = {
        "broken.yaml": "not valid YAML: expected the node content, but found '<stream end>' (line 3, column 1)",
        "list.yaml": "expected a mapping of settings (model:, data:, trainer:, ...), got a list",
        "empty.yaml": "the file is empty",
    }
    for name, reason in expected.items():
        assert error_of(capsys, ["--config", str(tmp_path / name)]) == f"--config {tmp_path / name}: {reason}"
    assert error_of(capsys, ["--config", str(tmp_path)]) == f"--config {tmp_path}: a folder, not a config file"


def test_a_missing_config_is_reported_before_lightning_is_imported(tmp_path):
    """The fast path: no lightning, no torch (python -X importtime lists every module imported)."""
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "eval.py"), "--config", "nosuch.yaml"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert "grounding.cli" in imported and "yaml" in imported
    assert not {name for name in imported if name.split(".")[0] in ("lightning", "torch", "jsonargparse")}
    assert [line for line in lines if not line.startswith("import time:")] == [
        f"eval.py: error: --config nosuch.yaml: no such file (looked for it as given and among the packaged configs in "
        f"{CONFIG_ROOT}, e.g. --config image/synthetic.yaml)"]


@pytest.mark.parametrize("config", [GEM, None], ids=["gem", "demo"])
def test_help_ends_with_the_settings_of_the_configs_classes(capsys, config):
    """With --config, the help of its model and data classes follows the Trainer's; without, the demo's. Their
    defaults are the config's values."""
    with pytest.raises(SystemExit) as exit_info:
        build_cli((["--config", str(config)] if config else []) + ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    source = config or CONFIG_ROOT / "image" / "synthetic.yaml"  # the demo, as the package holds it
    config = config or DEMO
    assert "--trainer.max_steps MAX_STEPS" in text
    for key in ("model", "data"):
        header = (f"The {key} of this command line: {section(config, key)['class_path']} (from {source}); every setting "
                  f"below is --{key}.NAME VALUE, the defaults shown are the config's values:")
        assert header in text.splitlines()
        after = text.split(header, 1)[1]
        scalars = {name: value for name, value in section(config, key).get("init_args", {}).items()
                   if isinstance(value, (str, int, float))}
        assert scalars
        for name, value in scalars.items():  # each option's block: from its line to the next option
            block = re.search(rf"^  --{key}\.{name} .*?(?=^  --|\Z)", after, flags=re.M | re.S)
            assert block, name
            assert f"default: {value})" in " ".join(block[0].split()), (name, block[0])
    # some of the model's differ from the class's own defaults: the defaults shown are the config's
    module, _, name = section(config, "model")["class_path"].rpartition(".")
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    assert any(parameters[name].default != value for name, value in section(config, "model")["init_args"].items()
               if name in parameters and isinstance(value, (str, int, float)))


def test_abbreviated_flags_are_unknown(capsys):
    assert error_of(capsys, ["--trainer.max_step", "60"]) == (
        "unrecognized arguments: --trainer.max_step 60 (did you mean --trainer.max_steps?)")
    assert error_of(capsys, ["--conf", str(GEM)]) == f"unrecognized arguments: --conf {GEM} (did you mean --config?)"


def test_a_bad_setting_is_one_line_naming_it(capsys, synthetic_root, tmp_path):
    model = class_name(GEM, "model")
    cases = {
        ("--data.init_args.batch_size", "zero"): "--data.batch_size: expected int, got 'zero'",
        ("--model.init_args.depth", "-3"): "--model.depth: -3 is not a PositiveInt (v>0)",
        ("--model.foo", "1"): f"--model.foo: {model} has no such setting",
        ("--model.dept", "1"): f"--model.dept: {model} has no such setting; did you mean --model.depth?",
        ("--trainer.max_steps", "many"): "--trainer.max_steps: expected int, got 'many'",
        ("--seed_everything", "x"): "--seed_everything: expected bool or int, got 'x'",
        ("--trainer.logger.init_args.nope", "1"): "--trainer.logger.init_args.nope: TensorBoardLogger has no such setting",
    }
    for args, message in cases.items():
        assert error_of(capsys, ["--config", str(GEM), *args]) == message
    # a choice outside its Literal: the flag and the choices
    assert error_of(capsys, ["--config", str(GEM), "--data.init_args.format", "nope"]) == (
        "--data.format: expected one of 'voc', 'voc20', 'context60', 'context59', 'coco_stuff', 'coco_object_stuff', 'cityscapes', 'folder', 'coco_object', 'synthetic', got 'nope'")
    # a value the constructor refuses (its ValueError): the section, the class and the constructor's reason
    line = error_of(capsys, ["--config", str(GEM), "--model.init_args.background_threshold", "1.5", "--trainer.accelerator", "cpu"])
    assert line.startswith(f"--model ({model}): ") and "background_threshold must be in [0, 1], got 1.5" in line
    line = error_of(capsys, ["--config", str(GEM), "--progress.mode", "sometimes"])  # by its type or by the callback
    assert "progress.mode" in line and "'sometimes'" in line
    # a model it cannot read (an OSError of the constructor)
    line = error_of(capsys, ["--model.model", str(tmp_path / "missing"), "--data.synthetic_root", str(synthetic_root),
                             "--trainer.accelerator", "cpu"])
    assert line.startswith(f"--model ({class_name(DEMO, 'model')}): ") and str(tmp_path / "missing") in line


def test_optimizer_flags_are_refused_for_modules_with_their_own(capsys):
    for config in (GEM, DEMO):
        name = class_name(config, "model")
        assert error_of(capsys, ["--config", str(config), "--optimizer", "Adam"]) == (
            f"--optimizer: {name} defines its own optimizer and schedule (configure_optimizers), which this would "
            "replace; set them with its --model.* settings (--help lists them)")
    assert error_of(capsys, ["--config", str(GEM), "--optimizer", "SGD", "--optimizer.lr", "0.1", "--lr_scheduler",
                             "ConstantLR"]).startswith("--optimizer / --lr_scheduler: ")


@pytest.fixture(scope="module")
def image_checkpoint(synthetic_root, tmp_path_factory):
    """A Lightning checkpoint of the demo's IMAGE module (a tiny model), as the Trainer writes it."""
    cli = build_cli(["--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--data.synthetic_root", str(synthetic_root),
                     "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.callbacks", "[]"])
    path = tmp_path_factory.mktemp("checkpoint") / "image.ckpt"
    cli.trainer.strategy.connect(cli.model)
    cli.trainer.save_checkpoint(path)
    return path


def test_a_checkpoint_of_another_method_is_named(capsys, image_checkpoint, tmp_path):
    image, gem = section(DEMO, "model")["class_path"], section(GEM, "model")["class_path"]
    assert checkpoint_class_path(image_checkpoint) == image
    assert error_of(capsys, ["--config", str(GEM), "--ckpt_path", str(image_checkpoint)]) == (
        f"--ckpt_path {image_checkpoint} is a checkpoint of {image.rsplit('.', 1)[1]} ({image}), but the config builds "
        f"{gem.rsplit('.', 1)[1]} ({gem}): give the config it was trained with (RUN/config.yaml)")
    missing = tmp_path / "missing.ckpt"
    assert error_of(capsys, ["--config", str(GEM), "--ckpt_path", str(missing)]) == f"--ckpt_path {missing}: no such file"


def test_eval_of_an_untrained_trainable_module_warns_and_prints_one_json_line(synthetic_root, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="grounding.cli"):
        metrics = evaluate(["--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--data.synthetic_root", str(synthetic_root),
                            "--data.image_size", "96", "--data.max_size", "128", "--trainer.accelerator", "cpu",
                            "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "true",
                            "--trainer.logger.init_args.save_dir", str(tmp_path)])
    warnings = [r.getMessage() for r in caplog.records if r.name == "grounding.cli"]
    assert warnings == [f"no --ckpt_path: {class_name(DEMO, 'model')} is trainable, and is scored with the weights it is "
                        "built with (random or pretrained), not trained ones"]
    out = capsys.readouterr().out  # the progress bar went to stderr
    assert out.splitlines() == [json.dumps(metrics)]


@pytest.mark.slow
def test_eval_stdout_is_the_json_line_alone(synthetic_root, tmp_path):
    """Lightning's progress bar (forced on here) and messages go to stderr."""
    result = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--config", str(GEM), "--data.init_args.limit", "2",
         "--data.init_args.synthetic_root", str(synthetic_root), "--trainer.accelerator", "cpu",
         "--trainer.enable_progress_bar", "true", "--trainer.logger.init_args.save_dir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = result.stdout.splitlines()
    summary = json.loads(line)
    assert summary["split"] == "val" and Path(summary["run_dir"]).is_dir()
    assert "Testing" in result.stderr  # the bar was there, on stderr


@pytest.mark.slow
def test_a_bad_setting_from_the_command_line_is_one_line_and_status_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--config", str(GEM), "--model.init_args.depth", "-3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["eval.py: error: --model.depth: -3 is not a PositiveInt (v>0)"]


@pytest.mark.parametrize("module, tail", [
    ("odinw", "[--table TABLE] -- <grounding-eval arguments>"),
    ("ablation", "[--seeds SEEDS [SEEDS ...]] -- <grounding-train arguments>"),
    ("sweep", "[--collect] -- <grounding-train arguments>"),
    ("weight_ensemble", "--out OUT --eval NAME -- <grounding-eval arguments> [--eval NAME -- ...]"),
])
def test_protocol_help_shows_the_run_arguments(capsys, module, tail):
    protocol = importlib.import_module(f"grounding.protocols.{module}")
    with pytest.raises(SystemExit) as exit_info:
        (protocol.parse if module == "sweep" else protocol.main)(["--help"])
    assert exit_info.value.code == 0
    usage = " ".join(capsys.readouterr().out.split("\n\n", 1)[0].split())
    assert usage.startswith(f"usage: python -m grounding.protocols.{module} [-h]") and usage.endswith(tail)
