"""Checkpoints are read without running pickled code: every method's checkpoint loads with ``weights_only`` and
the package's allow-list (also Lightning's load behind ``--ckpt_path``, also a resumed run); a file that needs
anything else is refused by the three commands (one line, exit status 2), by the detector and by the weight
ensembles, and nothing of it runs."""

from __future__ import annotations

import json
import os
import pickle
import shlex
from pathlib import Path

import lightning as L
import pytest
import torch

from grounding import checkpoints
from grounding.checkpoints import SAFE_CLASS_PATHS, UnsafeCheckpointError, load_checkpoint
from grounding.cli import checkpoint_class_path, checkpoint_problem, evaluate, predict, train
from grounding.lightning.callbacks import AtomicCheckpointIO

from .conftest import TEST_MODEL_CONFIG

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "image" / "synthetic.yaml")
GEM = str(REPO / "configs" / "gem" / "synthetic.yaml")
REFUSAL = ("; refusing to unpickle arbitrary objects, which can run any code (only tensors, plain values and the "
           "settings classes of grounding.checkpoints.SAFE_CLASS_PATHS are read)")


class Marker:
    """An arbitrary class: a checkpoint holding one is refused."""

    def __init__(self, value: int = 1):
        self.value = value


class Payload:
    """Unpickled, it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def image_args(root, save_dir) -> list[str]:
    """The demo IMAGE config with the test model, 64 px images, no validation and no extra callbacks."""
    return ["--config", DEMO, "--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--data.synthetic_root",
            str(root), "--data.image_size", "64", "--data.max_size", "96", "--data.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
            "--trainer.logger.init_args.save_dir", str(save_dir), "--progress.mode", "never"]


def error_line(capsys) -> str:
    """The one error line the command wrote, without ``PROG: error: ``."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if ": error: " in line]
    assert err.rstrip().endswith(line)
    return line.split(": error: ", 1)[1]


@pytest.fixture
def load_calls(monkeypatch) -> list:
    """The ``weights_only`` of every ``torch.load`` call while the test runs."""
    calls, real = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


# ------------------------------------------------------------------------------------ what checkpoints hold
def _python_built_modules() -> dict[str, L.LightningModule]:
    """One module of each method built in Python with its settings dataclasses (not the defaults), as a script
    would: their hyper-parameters hold those objects."""
    from grounding.lightning.gem_module import GEMSegmentationModule
    from grounding.lightning.image_module import ImageGroundingModule
    from grounding.lightning.invseg_module import InvSegModule
    from grounding.lightning.maskinversion_module import MaskInversionModule
    from grounding.lightning.mimic_module import LoggingSettings, MimicModule
    from grounding.models.adaptive_masking import MaskingConfig
    from grounding.models.denoising import DenoisingConfig
    from grounding.models.invseg_inversion import BaselineSettings, InversionSettings
    from grounding.models.maskinversion import MaskInversionSettings
    from grounding.models.mimic.objective import SynthesisSettings

    return {
        "image": ImageGroundingModule(model_config=TEST_MODEL_CONFIG, masking=MaskingConfig(variant="threshold"),
                                      denoising=DenoisingConfig(number=2), log_images=False),
        "invseg": InvSegModule(image_size=128, inversion=InversionSettings(steps=3), baseline=BaselineSettings(t=50)),
        "maskinversion": MaskInversionModule(image_size=64, inversion=MaskInversionSettings(iterations=2)),
        "mimic": MimicModule(synthesis=SynthesisSettings(iterations=2), logging=LoggingSettings(targets=1)),
        "gem": GEMSegmentationModule(depth=3),
    }


@pytest.fixture(scope="module")
def python_checkpoints(tmp_path_factory) -> dict[str, tuple[L.LightningModule, Path]]:
    folder = tmp_path_factory.mktemp("python_built")
    saved = {}
    for name, module in _python_built_modules().items():
        trainer = L.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
        trainer.strategy.connect(module)
        trainer.save_checkpoint(folder / f"{name}.ckpt")
        saved[name] = (module, folder / f"{name}.ckpt")
    return saved


@pytest.fixture(scope="module")
def image_run(synthetic_root, tmp_path_factory) -> dict:
    """One training step of the demo IMAGE config from the command line: last.ckpt with optimizer, schedule,
    loops, callbacks' and random states."""
    folder = tmp_path_factory.mktemp("image_run")
    summary = train([*image_args(synthetic_root, folder / "runs"), "--trainer.max_steps", "1", "--validate_before_fit",
                     "false", "--trainer.limit_val_batches", "0"])
    return {**summary, "folder": folder, "last": Path(summary["run_dir"]) / "checkpoints" / "last.ckpt"}


@pytest.mark.parametrize("method", ["image", "invseg", "maskinversion", "mimic", "gem"])
def test_each_methods_checkpoint_passes_the_safe_load(python_checkpoints, method):
    module, path = python_checkpoints[method]
    held = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))  # beyond torch's own
    dataclasses = {name for name, value in module.hparams.items() if hasattr(value, "__dataclass_fields__")}
    assert held <= set(SAFE_CLASS_PATHS) and len(held) == len({type(module.hparams[n]) for n in dataclasses})
    assert (held == set()) == (method == "gem")  # GEM's settings are plain values
    assert checkpoints.unsafe_globals(path) == []
    for checkpoint in (load_checkpoint(path), AtomicCheckpointIO().load_checkpoint(path, weights_only=True)):
        for name in dataclasses:
            assert checkpoint["hyper_parameters"][name] == module.hparams[name]
        assert checkpoint["state_dict"].keys() == module.state_dict().keys()
    registered = {f"{g.__module__}.{g.__qualname__}" for g in torch.serialization.get_safe_globals() if isinstance(g, type)}
    assert not registered & set(SAFE_CLASS_PATHS)  # the allow-list is not left registered (torch adds its own lazily)
    assert checkpoint_problem(str(path), type(module)) is None
    assert checkpoint_class_path(path) is None  # built in Python: no _class_path


def test_a_trained_runs_checkpoint_holds_tensors_and_plain_values_only(image_run):
    last = image_run["last"]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(last)) == []
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)  # not even the allow-list is needed
    assert checkpoint["global_step"] == 1 and checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]
    assert any("LastCheckpoint" in key for key in checkpoint["callbacks"])  # the random states too
    assert checkpoint_class_path(last) == "grounding.lightning.image_module.ImageGroundingModule"


def test_resume_from_last_ckpt_with_weights_only_continues_the_step_count(image_run, synthetic_root, load_calls):
    summary = train([*image_args(synthetic_root, image_run["folder"] / "resumed"), "--trainer.max_steps", "2",
                     "--trainer.limit_val_batches", "0", "--ckpt_path", str(image_run["last"])])
    assert summary["steps"] == 2  # step 1 restored, one more taken
    assert load_calls and all(value is True for value in load_calls)


def test_eval_and_predict_read_ckpt_path_with_weights_only_and_the_allow_list(
        python_checkpoints, synthetic_root, tmp_path, load_calls, capsys):
    # the IMAGE checkpoint holds MaskingConfig / DenoisingConfig: Lightning's load needs the allow-list
    metrics = evaluate([*image_args(synthetic_root, tmp_path / "eval"), "--data.split", "test",
                        "--trainer.limit_test_batches", "1", "--ckpt_path", str(python_checkpoints["image"][1])])
    assert metrics["split"] == "test" and "AP" in metrics
    image = sorted((Path(synthetic_root) / "images" / "val").glob("*.jpg"))[0]
    summary = predict(["--config", GEM, "--trainer.logger", "false", "--progress.mode", "never", "--inputs", str(image),
                       "--classes", "background, red circle", "--out", str(tmp_path / "predicted"),
                       "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(python_checkpoints["gem"][1])])
    assert summary["predicted"] == 1
    assert len(load_calls) >= 2 and all(value is True for value in load_calls)


# ------------------------------------------------------------------------------------------ crafted files
@pytest.fixture
def crafted(tmp_path) -> dict:
    """Checkpoints whose unpickling would create ``marker`` (torch's format, a plain pickle) or build an
    arbitrary class; the payload is checked to work when unpickled in full."""
    marker = tmp_path / "marker"
    files = {"torch": tmp_path / "payload.ckpt", "pickle": tmp_path / "payload.pkl", "class": tmp_path / "marker.ckpt"}
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 1e-4, "note": Payload(marker)},
                "pytorch-lightning_version": L.__version__}, files["torch"])
    plain = {"state_dict": {}, "hyper_parameters": {"note": Payload(marker)}}
    files["pickle"].write_bytes(pickle.dumps(plain, protocol=4))
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"extra": Marker(3)}}, files["class"])
    torch.load(files["torch"], weights_only=False)  # the control: a full unpickling runs the command
    assert marker.is_file()
    marker.unlink()
    return {"marker": marker, **files}


SYSTEM = f"{os.system.__module__}.system"


def test_eval_predict_and_train_refuse_a_crafted_checkpoint_before_the_run(crafted, synthetic_root, tmp_path, capsys):
    path = crafted["torch"]
    images = str(Path(synthetic_root) / "images" / "val")
    commands = {
        evaluate: [*image_args(synthetic_root, tmp_path), "--ckpt_path", str(path)],
        train: [*image_args(synthetic_root, tmp_path), "--ckpt_path", str(path)],
        predict: ["--config", GEM, "--trainer.logger", "false", "--inputs", images, "--classes",
                  "background, red circle", "--out", str(tmp_path / "out"), "--ckpt_path", str(path)],
    }
    for command, args in commands.items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as raised:
            command(args)
        assert raised.value.code == 2, command.__name__
        assert error_line(capsys) == f"--ckpt_path {path} holds pickled objects ({SYSTEM}){REFUSAL}", command.__name__
        assert not crafted["marker"].exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch's note on the plain pickle
@pytest.mark.parametrize("kind, names", [("pickle", SYSTEM), ("class", f"{__name__}.Marker")])
def test_other_unsafe_files_are_named_too(crafted, kind, names, synthetic_root, tmp_path, capsys):
    path = crafted[kind]
    with pytest.raises(SystemExit) as raised:
        evaluate([*image_args(synthetic_root, tmp_path), "--ckpt_path", str(path)])
    assert raised.value.code == 2
    assert error_line(capsys) == f"--ckpt_path {path} holds pickled objects ({names}){REFUSAL}"
    assert checkpoint_class_path(path) is None
    assert not crafted["marker"].exists()


def test_the_detector_lightnings_load_and_the_ensembles_refuse_it(crafted):
    from grounding.models.detector import CheckpointError, GroundingDetector
    from grounding.protocols.weight_ensemble import load_checkpoint as ensemble_checkpoint

    path = crafted["torch"]
    with pytest.raises(CheckpointError) as error:
        GroundingDetector.from_checkpoint(path)
    assert str(error.value) == f"checkpoint {path} holds pickled objects ({SYSTEM}){REFUSAL}"
    with pytest.raises(UnsafeCheckpointError) as error:  # what Lightning's load meets, had the check been skipped
        AtomicCheckpointIO().load_checkpoint(path)
    assert error.value.names == [SYSTEM]
    with pytest.raises(ValueError, match=f"--finetuned: {path} holds pickled objects"):
        ensemble_checkpoint(path, "--finetuned")
    assert not crafted["marker"].exists()
