"""LoRA adapters of the detector (grounding.models.lora): the groups' layers, what trains, the hooks that still find
their modules, the optimizer groups, exact resuming, merging for export, the parameter counts, 2 processes = 1."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import lightning as L
import lightning_utilities.core.rank_zero as rank_zero
import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForZeroShotObjectDetection,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    MMGroundingDinoConfig,
    MMGroundingDinoForObjectDetection,
)

from grounding.checkpoints import load_checkpoint
from grounding.lightning.callbacks import AtomicCheckpointIO, LastCheckpoint
from grounding.data.coco import collate_detection
from grounding.data.detection import CocoDetectionDataModule
from grounding.export import export
from grounding.lightning.grounding_module import GroundingModule
from grounding.lightning.image_module import ImageGroundingModule
from grounding.models.adaptive_masking import MaskingConfig
from grounding.models.denoising import DenoisingConfig
from grounding.models.detector import CheckpointError, detector_state_dict
from grounding.models.grounding_dino import build_grounding_dino, freeze_untrained
from grounding.models.lora import (
    DEFAULT_RANK,
    LORA_GROUPS,
    TRAINABLE_HEADS,
    LoraSettings,
    apply_lora,
    lora_layer_names,
    lora_layers,
    parameter_counts,
)

from ..conftest import TEST_MODEL_CONFIG

ALL_GROUPS = tuple(LORA_GROUPS)


@pytest.fixture(autouse=True, scope="module")
def _flush_denormals():
    """Denormal floats as zeros, as the command line sets it (``grounding.cli.build_cli``): a few training steps
    leave denormals in softmax tails, and CPU arithmetic on them made these runs 10 to 50 times slower."""
    torch.set_flush_denormal(True)
IMAGE_SIZE, MAX_SIZE = 80, 120


def make_module(lora: LoraSettings | None, model: str = "tiny", seed: int = 0, **kwargs) -> ImageGroundingModule:
    torch.manual_seed(seed)
    settings = dict(model=model, model_config=TEST_MODEL_CONFIG, masking=MaskingConfig(variant="threshold"),
                    denoising=DenoisingConfig(number=3), log_images=False, lr=1e-3, lr_backbone=2e-3, lr_text_encoder=3e-3)
    settings.update(kwargs)
    return ImageGroundingModule(lora=lora, **settings)


def datamodule(root, batch_size=2) -> CocoDetectionDataModule:
    return CocoDetectionDataModule(synthetic_root=str(root), image_size=IMAGE_SIZE, max_size=MAX_SIZE,
                                   batch_size=batch_size, num_workers=0, crop_prob=0.0)


def trainer(max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    settings = dict(max_steps=max_steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                    num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()])  # weights_only loads allow the settings
    settings.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **settings)


def randomize_adapters(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Non-zero B matrices (peft starts them at zero: the adapted model would equal the base one)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(module).values():
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * scale)


# --------------------------------------------------------------------------------------------- the groups
@pytest.mark.parametrize("model", ["tiny", "tiny-mm"])
def test_every_group_names_the_linear_layers_its_config_implies(model):
    detector, _ = build_grounding_dino(model, TEST_MODEL_CONFIG)
    config = detector.config
    enc, dec = config.encoder_layers, config.decoder_layers
    blocks = sum(config.backbone_config.depths)
    text_layers = config.text_config.num_hidden_layers
    expected = {  # counts from the architecture, per layer
        "encoder_attention": enc * (2 + 4),  # deformable value/output + text enhancer q, k, v, out
        "encoder_ffn": enc * 4,  # fc1, fc2 of the deformable and text-enhancer layers
        "fusion": enc * 6,
        "decoder_attention": dec * (4 + 4 + 2),  # self, text cross (q, k, v, out), deformable value/output
        "decoder_ffn": dec * 2,
        "deformable_sampling": (enc + dec) * 2,
        "backbone": blocks * 6,  # q, k, v, o, fc1, fc2 of each Swin block
        "text_encoder": text_layers * 6,
    }
    found = lora_layer_names(detector, ALL_GROUPS)
    assert {group: len(names) for group, names in found.items()} == expected
    modules = dict(detector.named_modules())
    every = [name for names in found.values() for name in names]
    assert len(every) == len(set(every))  # no layer in two groups
    assert all(isinstance(modules[name], torch.nn.Linear) for name in every)
    assert not any(name.endswith(("sampling_offsets", "attention_weights")) for group in LoraSettings().target_modules
                   for name in found[group])
    assert not any(name.startswith(tuple(TRAINABLE_HEADS)) for name in every)  # heads are trained whole
    with pytest.raises(ValueError, match="matches no linear layer"):
        lora_layer_names(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["backbone"])


def test_settings_are_checked():
    assert not LoraSettings().enabled and LoraSettings(r=8, alpha=4).scaling == 0.5
    assert LoraSettings(r=2, target_modules=["backbone", "backbone"]).target_modules == ("backbone",)
    for bad in ({"r": -1}, {"r": 1.5}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": ["decoder"]}, {"target_modules": []}):
        with pytest.raises(ValueError, match="lora"):
            LoraSettings(**bad)


# --------------------------------------------------------------------------------------------- training
def test_adapters_and_heads_train_through_masking_denoising_and_bf16_and_the_optimizer_groups_hold_only_them(synthetic_root):
    lora = LoraSettings(r=4, target_modules=ALL_GROUPS)
    module = make_module(lora)
    randomize_adapters(module)  # B = 0 would give A no gradient on the first step
    before = {name: value.clone() for name, value in module.state_dict().items()}
    adapted = set(lora_layers(module.detector))
    assert adapted == set(module.lora_layers) and len(adapted) == sum(
        len(v) for v in lora_layer_names(build_grounding_dino("tiny", TEST_MODEL_CONFIG)[0], ALL_GROUPS).values())
    # the hooks patch modules by attribute path: still the modules they hook
    assert isinstance(module.detector.model.input_proj_vision[0][0], torch.nn.Conv2d)
    assert type(module.detector.model.decoder).__name__.endswith("Decoder")

    # by identity: the decoder's box (and MM's class) heads are the top-level ones under a second name
    heads = {id(p) for head in TRAINABLE_HEADS for _, p in _named_parameters(module.detector, head)}
    adapters = {id(p) for name, p in module.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    assert {id(p) for p in module.parameters() if p.requires_grad} == adapters | heads | {id(module.denoising.label_embedding.weight)}
    trainable = {name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}

    seen: dict[str, float] = {}

    class Gradients(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.update({n: float(p.grad.abs().max()) if p.grad is not None else 0.0
                         for n, p in pl_module.named_parameters() if p.requires_grad})

    run = trainer(2, [Gradients()], precision="bf16-mixed")
    run.fit(module, datamodule=datamodule(synthetic_root))
    assert run.global_step == 2
    # every adapter, head and the label table learn (checked at the second step: the box heads' last layers start
    # at zero, so their first layers get no gradient before it)
    assert {n for n, g in seen.items() if g == 0.0} == set()
    metrics = run.callback_metrics
    assert "train/loss_ce_dn" in metrics  # the denoising hooks found the decoder
    assert "mask/ratio_level0" in metrics and float(metrics["mask/ratio_level0"]) > 0  # masking hooks found the projections
    after = module.state_dict()
    for name, value in after.items():
        moved = not torch.equal(before[name], value)
        assert moved == (name in trainable), name  # frozen base weights never move, trained ones all do

    # the optimizer: trainable parameters only, each in the group its name gives (backbone, text encoder, rest)
    groups = {group["name"]: {id(p) for p in group["params"]} for group in run.optimizers[0].param_groups}
    rates = {group["name"]: group["lr"] for group in run.optimizers[0].param_groups}
    expected = {"backbone": set(), "text_encoder": set(), "rest": set(), "denoising": set()}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        part = ("denoising" if name.startswith("denoising.") else "backbone" if name.startswith("detector.model.backbone.")
                else "text_encoder" if name.startswith("detector.model.text_backbone.") else "rest")
        expected[part].add(id(parameter))
    assert groups == expected
    assert rates == {"backbone": 2e-3, "text_encoder": 3e-3, "rest": 1e-3, "denoising": 1e-3}


def _named_parameters(model, head):
    modules = dict(model.named_modules())
    if head in modules:
        return [(f"{head}.{n}", p) for n, p in modules[head].named_parameters()]
    owner, _, attribute = head.rpartition(".")
    parameter = getattr(modules.get(owner), attribute, None)
    return [(head, parameter)] if isinstance(parameter, torch.nn.Parameter) else []


def test_heads_frozen_before_stay_frozen_and_grounding_module_takes_the_setting():
    module = make_module(LoraSettings(r=2), proposal_loss="detached")  # the proposal head gets no gradient: frozen
    frozen = [n for n, p in module.detector.model.enc_output.named_parameters() if not p.requires_grad]
    assert frozen == ["weight", "bias"]
    assert module.detector.bbox_embed[0].layers[0].weight.requires_grad
    torch.manual_seed(0)
    grounding = GroundingModule(model="tiny", model_config=TEST_MODEL_CONFIG, lora={"r": 2, "target_modules": ["fusion"]})
    assert grounding.hparams.lora == {"r": 2, "target_modules": ["fusion"]}
    fresh, _ = build_grounding_dino("tiny", TEST_MODEL_CONFIG)
    assert set(grounding.lora_layers) == set(lora_layer_names(fresh, ["fusion"])["fusion"]) == set(lora_layers(grounding.detector))


def test_a_resumed_run_ends_with_the_weights_of_the_uninterrupted_one(synthetic_root, tmp_path):
    """IMAGE masking, contrastive denoising and LoRA dropout draw random numbers: LastCheckpoint restores them,
    and the adapters, heads and optimizer state come back from the checkpoint."""
    lora = LoraSettings(r=4, dropout=0.1)

    class CopyAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                shutil.copy(tmp_path / "a" / "last.ckpt", tmp_path / "step2.ckpt")

    uninterrupted = make_module(lora)
    trainer(3, [LastCheckpoint(str(tmp_path / "a"), every_n_train_steps=2), CopyAt()]).fit(uninterrupted, datamodule=datamodule(synthetic_root))
    resumed = make_module(lora)
    trainer(3, [LastCheckpoint(str(tmp_path / "b"))]).fit(resumed, datamodule=datamodule(synthetic_root),
                                                          ckpt_path=str(tmp_path / "step2.ckpt"), weights_only=True)
    start = make_module(lora).state_dict()
    final, again = uninterrupted.state_dict(), resumed.state_dict()
    assert final.keys() == again.keys()
    for name in final:
        assert torch.equal(final[name], again[name]), name
    assert any(not torch.equal(final[n], start[n]) for n in final if ".lora_B." in n)  # the adapters did train


# --------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("model", ["tiny", "tiny-mm"])
def test_the_merged_export_computes_what_the_adapted_detector_computes(synthetic_root, tmp_path, model):
    module = make_module(LoraSettings(r=4, target_modules=ALL_GROUPS), model=model).eval()
    randomize_adapters(module)
    checkpoint = tmp_path / "lora.ckpt"  # as a module built in Python saves it: LoraSettings in the hyper-parameters
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, checkpoint)
    assert isinstance(load_checkpoint(checkpoint)["hyper_parameters"]["lora"], LoraSettings)  # weights_only allows it

    data = datamodule(synthetic_root)
    data.setup("validate")
    batch = collate_detection([data.datasets["val"][i] for i in range(2)])
    ids = module.tokenizer(["red circle. blue square."] * 2, return_tensors="pt")
    inputs = dict(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], input_ids=ids["input_ids"],
                  attention_mask=ids["attention_mask"])
    with torch.no_grad():
        adapted = module.detector(**inputs)
        with _adapters_off(module.detector):
            base = module.detector(**inputs)

    out = tmp_path / "exported"
    export(checkpoint, out, image_size=IMAGE_SIZE, max_size=MAX_SIZE)
    merged = AutoModelForZeroShotObjectDetection.from_pretrained(out).eval()  # export: GroundingDetector.from_checkpoint
    classes = {"tiny": GroundingDinoForObjectDetection, "tiny-mm": MMGroundingDinoForObjectDetection}
    with safe_open(out / "model.safetensors", "pt") as file:
        keys = list(file.keys())
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    assert type(merged) is classes[model] and not lora_layers(merged)
    with torch.no_grad():
        outputs = merged(**inputs)
    for field in ("logits", "pred_boxes"):  # logits beyond the prompt's tokens are -inf in both
        torch.testing.assert_close(getattr(outputs, field), getattr(adapted, field), rtol=0, atol=1e-5, msg=field)
    real = adapted.logits.isfinite()
    assert (adapted.logits[real] - base.logits[real]).abs().max() > 1e-2  # the adapters do change the outputs
    assert (adapted.pred_boxes - base.pred_boxes).abs().max() > 1e-3


def test_merging_needs_the_settings_that_trained_the_adapters():
    module = make_module(LoraSettings(r=4, alpha=8, target_modules=("decoder_ffn",)))
    randomize_adapters(module)
    state = module.state_dict()
    plain = {f"detector.{k}" for k in build_grounding_dino("tiny", TEST_MODEL_CONFIG)[0].state_dict()}
    merged = detector_state_dict({"state_dict": state, "hyper_parameters": {"lora": {"r": 4, "alpha": 8}}})
    assert {f"detector.{k}" for k in merged} == plain
    layer = "model.decoder.layers.0.fc1"
    expected = (state[f"detector.{layer}.base_layer.weight"].double() + 2.0 * state[f"detector.{layer}.lora_B.default.weight"].double()
                @ state[f"detector.{layer}.lora_A.default.weight"].double())
    assert torch.allclose(merged[f"{layer}.weight"].double(), expected, rtol=0, atol=1e-6)
    for hyper_parameters in ({}, {"lora": None}, {"lora": {"r": 0}}, {"lora": {"r": 4, "alpha": -1}}):
        with pytest.raises(CheckpointError, match="LoRA"):
            detector_state_dict({"state_dict": state, "hyper_parameters": hyper_parameters})


class _adapters_off:
    """Run peft's layers without their adapters."""

    def __init__(self, model):
        self.layers = list(lora_layers(model).values())

    def __enter__(self):
        for layer in self.layers:
            layer.enable_adapters(False)

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.enable_adapters(True)


# --------------------------------------------------------------------------------------------- sizes
def test_the_default_rank_trains_at_most_a_tenth_of_the_parameters_and_the_counts_are_logged_once():
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = rank_zero.log  # Lightning's rank_zero_info logs through it
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        torch.manual_seed(0)
        module = ImageGroundingModule(model="tiny", lora=LoraSettings(r=DEFAULT_RANK), denoising=DenoisingConfig(number=30))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    # independent count: r (in + out) per adapted layer, the heads and the denoising table trainable
    modules = dict(module.detector.named_modules())
    adapter_values = sum(DEFAULT_RANK * (modules[n].in_features + modules[n].out_features) for n in module.lora_layers)
    head_values = sum(p.numel() for head in TRAINABLE_HEADS for _, p in _named_parameters(module.detector, head))
    table = module.denoising.label_embedding.weight.numel()
    total = sum(p.numel() for p in module.parameters())
    trainable = adapter_values + head_values + table
    lines = [r for r in records if r.startswith("parameters:")]
    assert lines == [f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%);"
                     f" LoRA adapters on {len(module.lora_layers)} linear layers"]
    assert trainable / total <= 0.10

    for config_class, model_class in ((GroundingDinoConfig, GroundingDinoForObjectDetection),
                                      (MMGroundingDinoConfig, MMGroundingDinoForObjectDetection)):
        with torch.device("meta"):  # Swin-T + BERT-base sizes (the configs' defaults), parameters never allocated
            detector = model_class(config_class())
            detector.model.text_backbone.requires_grad_(False)
            freeze_untrained(detector)
            base_total = parameter_counts(detector)[1]
            apply_lora(detector, LoraSettings(r=DEFAULT_RANK))
        trainable, total = parameter_counts(detector)
        assert base_total > 150e6 and trainable / total <= 0.10, (trainable, total)


# --------------------------------------------------------------------------------------------- command line
def test_the_command_line_takes_lora_settings(synthetic_root, tmp_path):
    from grounding.cli import build_cli

    cli = build_cli(["--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--data.synthetic_root", str(synthetic_root),
                     "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--model.lora.r", "8",
                     "--model.lora.target_modules", "[backbone, decoder_ffn]", "--model.lora.dropout", "0"])
    settings = cli.model.lora_settings
    assert (settings.r, settings.alpha, settings.dropout, settings.target_modules) == (8, 32.0, 0.0, ("backbone", "decoder_ffn"))
    names = lora_layer_names(build_grounding_dino("tiny", TEST_MODEL_CONFIG)[0], ["backbone", "decoder_ffn"])
    assert set(cli.model.lora_layers) == set(names["backbone"] + names["decoder_ffn"])


# --------------------------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_two_processes_with_lora_take_the_steps_of_one_with_the_global_batch(synthetic_root, tmp_path):
    """``ddp`` (gloo) relaunches train.py; without dropout (LoRA's included) both runs draw no random number
    that depends on the process count; DDP would stop at the second step on a parameter without gradient. The
    weight average (WeightEMA) of both runs is the same too."""
    from ..test_runs import NO_DROPOUT, initial_weights, run, summary, train_args

    results = {}
    for devices, batch in ((1, 4), (2, 2)):
        result = run("train.py", train_args(
            synthetic_root, tmp_path / f"d{devices}", "--trainer.devices", str(devices),
            "--trainer.strategy", "ddp" if devices > 1 else "auto", "--data.batch_size", str(batch),
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.precision", "64-true",
            "--model.denoising.number", "0", "--model.lora.r", "4", "--model.lora.dropout", "0",
            "--model.lora.target_modules", "[encoder_attention, fusion, decoder_attention, decoder_ffn, backbone]",
            "--trainer.callbacks+=grounding.lightning.ema.WeightEMA", "--trainer.callbacks.decay", "0.5",
            model_config=NO_DROPOUT,
        ), cwd=tmp_path, in_process=devices == 1)
        assert len(re.findall(r"parameters: [\d,]+ trainable of", result.stderr)) == 1  # logged by rank 0 only
        out = summary(result)
        checkpoint = torch.load(Path(out["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        results[devices] = checkpoint["current_model_state"], checkpoint["state_dict"]  # the weights, their average
    (one, one_average), (two, two_average) = results[1], results[2]
    assert one.keys() == two.keys() == one_average.keys() == two_average.keys() and any(".lora_B." in k for k in one)
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-9
    assert max((one_average[k] - two_average[k]).abs().max().item() for k in one) < 1e-9
    assert max((one_average[k] - one[k]).abs().max().item() for k in one) > 1e-5  # an average, not the weights
    start = initial_weights(lora=LoraSettings(r=4, dropout=0.0, target_modules=(
        "encoder_attention", "fusion", "decoder_attention", "decoder_ffn", "backbone")))
    assert max((one[k] - start[k].double()).abs().max().item() for k in one if ".lora_B." in k) > 1e-4
