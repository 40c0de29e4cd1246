"""The moving average of the weights (grounding.lightning.ema.WeightEMA, Lightning's EMAWeightAveraging): validation
and the best checkpoint use the average computed by hand, frozen weights stay exact, checkpoints written during
validation or after fit hold the same as any other, a resumed run averages as the uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from grounding.data.detection import CocoDetectionDataModule
from grounding.lightning.callbacks import AtomicCheckpointIO, LastCheckpoint
from grounding.lightning.ema import WeightEMA
from grounding.lightning.image_module import ImageGroundingModule
from grounding.models.adaptive_masking import MaskingConfig
from grounding.models.denoising import DenoisingConfig
from grounding.models.lora import LoraSettings

from ..conftest import TEST_MODEL_CONFIG

DECAY = 0.7  # a short memory (three steps leave the average far from the last weights); not a power of 2, so
#             decay·w + (1 - decay)·w is not always w in float32
LORA = LoraSettings(r=4, dropout=0.1)
VAL_BATCHES = 1  # validations of the first 2 images (the same in fit and by hand)


@pytest.fixture(autouse=True, scope="module")
def _flush_denormals():
    """Denormal floats as zeros, as the command line sets it (``grounding.cli.build_cli``): a few training steps
    leave denormals in softmax tails, and CPU arithmetic on them made these runs 10 to 50 times slower."""
    torch.set_flush_denormal(True)


def make_module(seed: int = 0) -> ImageGroundingModule:
    torch.manual_seed(seed)
    return ImageGroundingModule(model="tiny", model_config=TEST_MODEL_CONFIG, masking=MaskingConfig(variant="threshold"),
                                denoising=DenoisingConfig(number=3), log_images=False, lr=5e-3, lora=LORA)


def datamodule(root) -> CocoDetectionDataModule:
    return CocoDetectionDataModule(synthetic_root=str(root), image_size=80, max_size=120, batch_size=2, num_workers=0,
                                   crop_prob=0.0)


def make_trainer(folder: Path, callbacks, **kwargs) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=CSVLogger(folder, name="run"), enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()])
    settings.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **settings)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


class Steps(L.Callback):
    """The module's weights after every optimizer step."""

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(snapshot(pl_module))


class SaveAround(L.Callback):
    """A checkpoint before the average is swapped in for validation and one while it is (as SIGTERM's would be)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_validation_start(self, trainer, pl_module):
        trainer.save_checkpoint(self.folder / "before_validation.ckpt")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            trainer.save_checkpoint(self.folder / "during_validation.ckpt")


def by_hand(steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """avg_1 = w_1, avg_k = decay avg_{k-1} + (1 - decay) w_k, in float64 (integer tensors: the last value)."""
    average = {name: value.double() if value.is_floating_point() else value for name, value in steps[0].items()}
    for weights in steps[1:]:
        for name, value in weights.items():
            if value.is_floating_point():
                average[name] = DECAY * average[name] + (1 - DECAY) * value.double()
            else:
                average[name] = value
    return average


def predictions(folder: Path) -> list[dict]:
    files = list(folder.rglob("predictions/val_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def evaluate(weights: dict[str, torch.Tensor], root, folder: Path) -> tuple[dict, list[dict]]:
    """Validation of a fresh module holding ``weights``: its logged metrics and written detections."""
    module = make_module(seed=1)
    module.load_state_dict({name: value.to(torch.float32) if value.is_floating_point() else value for name, value in weights.items()})
    trainer = make_trainer(folder, [], limit_val_batches=VAL_BATCHES)
    metrics = trainer.validate(module, datamodule=datamodule(root), verbose=False)[0]
    return metrics, predictions(folder)


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=atol) for k in a)


def test_validation_and_the_best_checkpoint_use_the_average_and_frozen_weights_stay_exact(synthetic_root, tmp_path):
    module = make_module()
    start = snapshot(module)
    trained = {name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    frozen = set(start) - trained  # frozen parameters and the saved buffers
    buffers = {name: value.clone() for name, value in module.named_buffers()}  # also the unsaved (integer) ones
    steps, ema = Steps(), WeightEMA(decay=DECAY)
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val/AR100", mode="max", save_top_k=1)
    trainer = make_trainer(tmp_path / "fit", [steps, ema, best, SaveAround(tmp_path)], max_steps=3, limit_train_batches=3,
                           check_val_every_n_epoch=1, limit_val_batches=VAL_BATCHES)
    trainer.fit(module, datamodule=datamodule(synthetic_root))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert len(steps.weights) == 3

    average, last = by_hand(steps.weights), steps.weights[-1]
    checkpoint = torch.load(best.best_model_path, map_location="cpu", weights_only=False)
    assert close(checkpoint["state_dict"], average, atol=1e-6)  # the best checkpoint holds the average
    assert all(torch.equal(checkpoint["current_model_state"][k], last[k]) for k in last)  # and the training weights
    assert not close(average, last, atol=1e-4)  # which are far from the average
    for name in frozen:  # frozen base weights and buffers: bit for bit the initial ones (no rounding drift)
        assert torch.equal(checkpoint["state_dict"][name], start[name]), name
    now = module.state_dict()
    assert all(torch.equal(now[k], checkpoint["state_dict"][k]) for k in last)  # after fit: the average
    assert all(torch.equal(value, buffers[name]) for name, value in module.named_buffers())

    # a checkpoint written while the average is swapped in holds the same as one written just before
    before = torch.load(tmp_path / "before_validation.ckpt", map_location="cpu", weights_only=False)
    during = torch.load(tmp_path / "during_validation.ckpt", map_location="cpu", weights_only=False)
    for key in ("state_dict", "current_model_state"):
        assert all(torch.equal(before[key][k], during[key][k]) for k in last), key
    # and so does one written after fit, when the module holds the average
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    after = torch.load(tmp_path / "after_fit.ckpt", map_location="cpu", weights_only=False)
    for key in ("state_dict", "current_model_state"):
        assert all(torch.equal(before[key][k], after[key][k]) for k in last), key

    # the validation inside fit scored the averaged weights: the same metrics and detections as they give by hand
    metrics, detections = evaluate(average, synthetic_root, tmp_path / "by_hand")
    assert metrics.keys() == logged.keys()
    assert all(metrics[k] == pytest.approx(logged[k], abs=1e-6, nan_ok=True) for k in logged)
    in_fit = scores(predictions(tmp_path / "fit"))
    assert in_fit.shape == scores(detections).shape and (in_fit - scores(detections)).abs().max() < 1e-5
    _, raw = evaluate(last, synthetic_root, tmp_path / "raw")  # the test can tell the two apart
    assert (in_fit - scores(raw)).abs().max() > 1e-3


def scores(detections: list[dict]) -> torch.Tensor:
    """(images, detections) the scores of each image, sorted (equal scores may come in either order)."""
    per_image: dict[int, list[float]] = {}
    for detection in detections:
        per_image.setdefault(detection["image_id"], []).append(detection["score"])
    return torch.tensor([sorted(values, reverse=True) for _, values in sorted(per_image.items())], dtype=torch.float64)


def test_a_resumed_run_averages_as_the_uninterrupted_one(synthetic_root, tmp_path):
    """LastCheckpoint first in the list: its step-2 checkpoint is written before the average's update of that step,
    which the callback makes before saving."""

    class CopyAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                shutil.copy(tmp_path / "a" / "last.ckpt", tmp_path / "step2.ckpt")

    settings = dict(max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False)
    uninterrupted, ema_a = make_module(), WeightEMA(decay=DECAY)
    make_trainer(tmp_path, [LastCheckpoint(str(tmp_path / "a"), every_n_train_steps=2), CopyAt(), ema_a], **settings).fit(
        uninterrupted, datamodule=datamodule(synthetic_root))
    resumed, ema_b = make_module(), WeightEMA(decay=DECAY)
    make_trainer(tmp_path, [LastCheckpoint(str(tmp_path / "b")), ema_b], **settings).fit(
        resumed, datamodule=datamodule(synthetic_root), ckpt_path=str(tmp_path / "step2.ckpt"), weights_only=True)
    saved = torch.load(tmp_path / "step2.ckpt", map_location="cpu", weights_only=False)
    assert int(saved["averaging_state"]["n_averaged"]) == 2  # the step-2 update is in the file
    # after fit the modules hold the averages, the callbacks' AveragedModels the training weights
    for a, b in ((uninterrupted.state_dict(), resumed.state_dict()),
                 (ema_a._average_model.module.state_dict(), ema_b._average_model.module.state_dict())):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int(ema_a._average_model.n_averaged) == int(ema_b._average_model.n_averaged) == 3


def test_the_command_line_appends_the_average_to_the_config_callbacks(synthetic_root):
    from grounding.cli import build_cli

    cli = build_cli(["--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--data.synthetic_root", str(synthetic_root),
                     "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                     "--trainer.callbacks+=grounding.lightning.ema.WeightEMA", "--trainer.callbacks.decay", "0.9"])
    callbacks = cli.trainer.callbacks
    averages = [c for c in callbacks if isinstance(c, WeightEMA)]
    assert len(averages) == 1 and averages[0].decay == 0.9
    assert any(isinstance(c, ModelCheckpoint) and c.monitor == "val/AP50" for c in callbacks)  # the config's stays
    last = next(i for i, c in enumerate(callbacks) if isinstance(c, LastCheckpoint))
    assert callbacks.index(averages[0]) < last  # updated before last.ckpt is written at a step's end


def test_the_average_follows_a_wider_dtype_keeps_float32_under_a_narrower_one_and_copies_integer_buffers():
    """The strategy converts the module to the precision's dtype after the callbacks' setup (where the average is
    made): on_fit_start adopts float64, keeps float32 for bfloat16 weights (0.3 · (w - avg) would round away)."""
    import types

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)
            self.register_buffer("index", torch.tensor([3, 17, 30522]))

    stub = types.SimpleNamespace(callbacks=[])
    for dtype, kept in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32)):
        torch.manual_seed(0)
        module, ema = Tiny(), WeightEMA(decay=DECAY)
        ema.setup(stub, module, "fit")
        module.layer.to(dtype)
        ema.on_fit_start(stub, module)
        average = ema._average_model.module
        assert average.layer.weight.dtype == kept
        first = module.layer.weight.detach().clone()
        ema._average_model.update_parameters(module)
        with torch.no_grad():
            module.layer.weight.add_(1.0)
            module.index.add_(1)
        ema._average_model.update_parameters(module)
        expected = first.to(kept) + (1 - DECAY) * (module.layer.weight.detach().to(kept) - first.to(kept))
        assert average.layer.weight.dtype == kept and torch.allclose(average.layer.weight, expected, rtol=1e-6, atol=0)
        assert torch.equal(average.index, torch.tensor([4, 18, 30523]))  # copied, never averaged
        # in for a validation and back out: the module evaluates the average, then both are as they were
        weights, averaged = module.layer.weight.detach().clone(), average.layer.weight.detach().clone()
        ema.on_validation_epoch_start(stub, module)
        assert torch.equal(module.layer.weight, averaged.to(dtype))
        ema.on_validation_epoch_end(stub, module)
        assert torch.equal(module.layer.weight, weights) and torch.equal(average.layer.weight, averaged)
