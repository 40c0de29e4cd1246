"""IMAGE LightningModule: masking only in training, schedule driven by the Trainer, loss goes down, AP export."""

import contextlib
import io
import json

import lightning as L
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from grounding.data.coco import collate_detection
from grounding.data.detection import CocoDetectionDataModule
from grounding.lightning.image_module import ImageGroundingModule
from grounding.models.adaptive_masking import MaskingConfig
from grounding.models.denoising import DenoisingConfig
from grounding.models.grounding_dino import feature_masking

from ..conftest import TEST_MODEL_CONFIG


def make_module(variant="rf_gam", **kwargs):
    torch.manual_seed(0)
    return ImageGroundingModule(model="tiny", model_config=TEST_MODEL_CONFIG, masking=MaskingConfig(variant=variant), **kwargs)


def datamodule(root, **kwargs):
    settings = dict(synthetic_root=str(root), image_size=96, max_size=128, batch_size=4, num_workers=0, crop_prob=0.0)
    settings.update(kwargs)
    return CocoDetectionDataModule(**settings)


def batch_of(root, split="val", size=3):
    data = datamodule(root)
    data.setup("validate" if split == "val" else "fit")
    dataset = data.datasets[split]
    return data, collate_detection([dataset[i] for i in range(size)])


def test_evaluation_and_prediction_are_untouched_by_masking(synthetic_root):
    data, batch = batch_of(synthetic_root)
    masked, plain = make_module("rf_gam"), make_module("none")
    plain.load_state_dict(masked.state_dict())
    for module in (masked, plain):
        module.set_categories(data.categories)
        module.eval()
    orig = torch.stack([t["orig_size"] for t in batch["targets"]])
    a = masked.detect(batch["pixel_values"], batch["pixel_mask"], orig)
    b = plain.detect(batch["pixel_values"], batch["pixel_mask"], orig)
    for x, y in zip(a, b):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"])
    # and the masking context is a no-op on an evaluating masker, even inside a forward pass
    with feature_masking(masked.detector, masked.masking, 0.5, batch["pixel_mask"]):
        c = masked.detect(batch["pixel_values"], batch["pixel_mask"], orig)
    assert all(torch.equal(x["scores"], z["scores"]) for x, z in zip(a, c))


def test_training_masks_change_the_encoder_inputs_and_nothing_else(synthetic_root):
    data, batch = batch_of(synthetic_root)
    module = make_module("threshold")
    module.set_categories(data.categories)
    module.detector.eval()  # no dropout: differences come from the masks alone
    module.masking.train()
    seen = {}
    encoder = module.detector.model.encoder

    def capture(module, args, kwargs):  # the flattened maps entering the encoder: (B, sum of h*w, d_model)
        seen["x"] = kwargs["vision_features"].clone()

    handle = encoder.register_forward_pre_hook(capture, with_kwargs=True)
    text = module._text_inputs(module.prompts[0], 3)
    with torch.no_grad():
        module.detector(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], **text)
        unmasked = seen.pop("x")
        with feature_masking(module.detector, module.masking, 0.0, batch["pixel_mask"]):
            module.detector(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], **text)
        masked = seen.pop("x")
    handle.remove()
    # threshold masks with k0 = 0.5 at p = 0: masked tokens are exactly halved, the others unchanged
    masks = torch.cat([m.flatten(1) for _, m in sorted(module.masking.last_masks.items())], dim=1)  # (B, N)
    ratio = (masked / unmasked.where(unmasked != 0, torch.ones_like(unmasked))).mean(-1)
    assert torch.allclose(ratio[masks == 1], torch.tensor(0.5), atol=1e-4)
    assert torch.allclose(masked[masks == 0], unmasked[masks == 0])
    assert masks.sum() > 0
    # hooks are gone after the block
    assert all(len(p._forward_hooks) == 0 for p in module.detector.model.input_proj_vision)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses, self.ratios, self.progress = [], [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.ratios.append(dict(module.masking.last_ratios))
        self.progress.append(module.global_step - 1)


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    module = make_module("rf_gam", lr=5e-4)
    recorder = LossRecorder()
    trainer = L.Trainer(
        max_epochs=8, accelerator="cpu", devices=1, logger=L.pytorch.loggers.TensorBoardLogger(folder, name="t"),
        callbacks=[recorder], enable_checkpointing=False, enable_progress_bar=False, gradient_clip_val=0.1,
        check_val_every_n_epoch=8, enable_model_summary=False,
    )
    data = datamodule(synthetic_root)
    trainer.fit(module, datamodule=data)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    return trainer, module, recorder, metrics


def test_tiny_training_lowers_the_loss(trained):
    _, _, recorder, _ = trained
    first, last = recorder.losses[:3], recorder.losses[-3:]
    assert sum(last) / 3 < 0.7 * sum(first) / 3, recorder.losses


def test_mask_ratio_follows_the_schedule_of_trainer_progress(trained):
    trainer, module, recorder, _ = trained
    total = trainer.estimated_stepping_batches
    r0 = module.masking.config.r0
    for step, ratios in zip(recorder.progress, recorder.ratios):
        p = min(step / total, 1.0)
        assert ratios == pytest.approx({level: r0[level] + 0.2 * p for level in range(len(r0))})
    assert recorder.progress[-1] == total - 1


def test_exported_predictions_give_the_logged_ap(trained, synthetic_root):
    trainer, _, _, metrics = trained
    # the validation after fit is named by the weights' step (the fit's own validations by their epoch)
    name = f"val_step{trainer.global_step:06d}.json"
    exported = json.loads((__import__("pathlib").Path(trainer.log_dir) / "predictions" / name).read_text())
    annotation_file = synthetic_root / "annotations" / "instances_val.json"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        evaluator = COCOeval(gt, gt.loadRes(exported), "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert metrics["val/AP"] == pytest.approx(max(evaluator.stats[0], 0), abs=1e-6)
    assert metrics["val/AP50"] == pytest.approx(max(evaluator.stats[1], 0), abs=1e-6)
    per_image = {}
    for d in exported:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert sorted(per_image) == sorted(gt.getImgIds())
    assert set(per_image.values()) == {30 * 6 if 30 * 6 < 300 else 300}  # top (query, category) pairs


def test_bf16_mixed_precision_trains_through_the_trainer(synthetic_root):
    """Masking and contrastive denoising under bf16 autocast, with the configs' gradient clipping (the optimizer
    is then not the fused one, which Lightning cannot clip under mixed precision): finite losses, (nearly) every
    weight moves."""
    module = make_module("rf_gam", denoising=DenoisingConfig(number=10))
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    recorder = LossRecorder()
    trainer = L.Trainer(
        max_steps=2, precision="bf16-mixed", gradient_clip_val=0.1, accelerator="cpu", logger=False, enable_checkpointing=False,
        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
    )
    trainer.fit(module, datamodule=datamodule(synthetic_root))
    assert len(recorder.losses) == 2 and all(torch.isfinite(torch.tensor(recorder.losses)))
    changed = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) > 0.9 * len(before) and "denoising.label_embedding.weight" in changed
    assert set(module.masking.last_masks) == {0, 1, 2, 3}
    # RF-GAM masks are normalized by their maximum: exactly 1 at the peak, also under bf16 autocast
    assert all(m.max() == 1 and m.min() >= 0 for m in module.masking.last_masks.values())


class LearningRates(L.Callback):
    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.rates.append([group["lr"] for group in trainer.optimizers[0].param_groups])


def test_cosine_schedule_decays_every_group_per_step(synthetic_root):
    import math

    module = make_module("none", lr=1e-3, lr_backbone=1e-4, lr_schedule="cosine", lr_min_factor=0.1, denoising=DenoisingConfig(number=5))
    recorder = LearningRates()
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
    )
    trainer.fit(module, datamodule=datamodule(synthetic_root))
    for step, rates in enumerate(recorder.rates):
        factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / 3))
        assert rates == pytest.approx([1e-4 * factor, 1e-3 * factor, 1e-3 * factor])  # backbone, the rest, denoising


def test_unknown_or_conflicting_lr_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match=r"model.lr_schedule must be 'step' or 'cosine', got 'linear'"):
        make_module("none", lr_schedule="linear")
    with pytest.raises(ValueError, match=r"model.lr_drop_epochs=\[5\] has no effect with model.lr_schedule=cosine"):
        make_module("none", lr_schedule="cosine", lr_drop_epochs=[5])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1e-4}, r"model.lr must be a finite number > 0, got -0.0001"),
        ({"lr_backbone": 0.0}, r"model.lr_backbone must be a finite number > 0, got 0.0"),
        ({"weight_decay": -1.0}, r"model.weight_decay must be a finite number >= 0"),
        ({"num_detections": 0}, r"model.num_detections must be an integer >= 1 \(detections kept per image\), got 0"),
        ({"lr_drop_epochs": [8, 4]}, r"model.lr_drop_epochs must be increasing epochs >= 1"),
        ({"max_nonfinite_steps": 0}, r"model.max_nonfinite_steps must be an integer >= 1"),
        ({"proposal_loss": "frozen"}, r"model.proposal_loss must be 'trained' or 'detached', got 'frozen'"),
    ],
)
def test_bad_settings_fail_at_construction_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module("none", **kwargs)


@pytest.mark.parametrize("ratios", [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5]])
def test_mask_ratios_must_match_the_models_levels_at_construction(ratios):
    with pytest.raises(ValueError, match=rf"MaskingConfig.r0 has {len(ratios)} ratios but the model has 4 feature levels"):
        ImageGroundingModule(model="tiny", model_config=TEST_MODEL_CONFIG, masking=MaskingConfig(r0=ratios))


def test_an_image_size_too_small_for_the_model_fails_before_any_batch(synthetic_root):
    module = make_module("none")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    # 32 px: 8x8 + 4x4 + 2x2 + 1x1 + 1x1 = 86... per level grids give 22 tokens < num_queries 30
    with pytest.raises(ValueError, match=r"data.image_size / data.train_scales \(smallest side 32\): a 32x32 px input gives 22 encoder"
                                         r" tokens, fewer than the model's num_queries=30; raise data.image_size"):
        trainer.validate(module, datamodule=datamodule(synthetic_root, image_size=32, max_size=64))


class Snapshots(L.Callback):
    def __init__(self):
        self.weights, self.steps = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})
        self.steps.append(trainer.global_step)


def test_nonfinite_losses_skip_their_step_and_stop_the_run_after_the_limit(synthetic_root):
    from grounding.lightning.guards import NonFiniteLossError

    module = make_module("none", max_nonfinite_steps=3)
    forward, calls = module.detector.forward, {"n": 0}

    def sometimes_nan(*args, **kwargs):  # calls 2, 4, 5, 6 give a NaN loss
        outputs = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (2, 4, 5, 6):
            outputs.loss = outputs.loss * float("nan")
        return outputs

    module.detector.forward = sometimes_nan
    snapshots = Snapshots()
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[snapshots])
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite \(NaN/inf\) losses in a row at step 5 \(4 skipped in all\);"
                                                 r" stopping \(model.max_nonfinite_steps=3\)"):
        trainer.fit(module, datamodule=datamodule(synthetic_root))
    assert len(snapshots.weights) == 5  # the 6th call raised
    first, skipped, third = snapshots.weights[:3]
    assert all(torch.equal(first[n], skipped[n]) for n in first)  # no update at all from the NaN step
    assert any(not torch.equal(skipped[n], third[n]) for n in first)  # the next finite step trains again
    assert all(torch.isfinite(p).all() for p in snapshots.weights[-1].values())
    assert module.nonfinite.skipped == 4


class FakeStrategy:
    def __init__(self, other_ranks_boxes):
        self.other = other_ranks_boxes

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        return tensor + self.other


class FakeTrainer:
    world_size = 2

    def __init__(self, other_ranks_boxes):
        self.strategy = FakeStrategy(other_ranks_boxes)


def test_ddp_loss_normalization_equals_one_process_over_the_global_batch():
    """transformers normalizes a process's loss sum S_r by its own box count n_r; DDP averages the ranks'
    gradients. After the factor, mean_r(S_r / n_r * factor_r) = (S_0 + S_1) / (n_0 + n_1): one process's loss."""
    module = make_module("none")
    sums, counts = (7.0, 2.5), (3, 1)
    scaled = []
    for rank in (0, 1):
        module._trainer = FakeTrainer(other_ranks_boxes=counts[1 - rank])
        labels = [{"boxes": torch.zeros(counts[rank], 4)}]
        scaled.append(sums[rank] / counts[rank] * module._global_box_normalization(labels))
    module._trainer = None
    assert sum(scaled) / 2 == pytest.approx(sum(sums) / sum(counts))


def test_the_image_backbone_runs_once_for_all_prompts_with_the_same_detections(synthetic_root):
    module = make_module("none").eval()
    data, batch = batch_of(synthetic_root)
    module.set_categories({i + 1: f"shape number {i}" for i in range(12)})  # 12 names over several 32-token prompts
    assert len(module.prompts) >= 3
    calls = []
    module.detector.model.backbone.conv_encoder.register_forward_hook(lambda *args: calls.append(1))  # Swin itself
    sizes = torch.stack([t["orig_size"] for t in batch["targets"]])
    with torch.inference_mode():  # as Trainer.test and Trainer.predict run it
        shared = module.detect(batch["pixel_values"].clone(), batch["pixel_mask"].clone(), sizes)
    assert len(calls) == 1
    rerun = module.detect(batch["pixel_values"], batch["pixel_mask"], sizes, share_backbone=False)
    assert len(calls) == 1 + len(module.prompts)
    for a, b in zip(shared, rerun):
        assert all(torch.equal(a[key], b[key]) for key in ("boxes", "scores", "category_ids"))
    assert "forward" not in vars(module.detector.model.backbone)  # the backbone is itself again after the block


def test_the_text_encoder_runs_once_per_prompt_over_batches_with_the_same_detections(synthetic_root):
    """``detect`` encodes each prompt once (the batch's images and later batches reuse it) and gives the
    detections of rerunning the encoder for every image and prompt; an optimizer step makes it encode again."""
    module = make_module("none").eval()
    data, batch = batch_of(synthetic_root)
    module.set_categories({i + 1: f"shape number {i}" for i in range(12)})
    images = batch["pixel_values"].shape[0]
    assert images > 1 and len(module.prompts) >= 3
    rows = []  # the rows each text encoder pass computes
    module.detector.model.text_backbone.embeddings.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    sizes = torch.stack([t["orig_size"] for t in batch["targets"]])
    inputs = (batch["pixel_values"], batch["pixel_mask"], sizes)
    with torch.inference_mode():
        first, second = module.detect(*inputs), module.detect(*inputs)
    assert rows == [1] * len(module.prompts)  # one row per prompt, none for the second batch
    rows.clear()
    rerun = module.detect(*inputs, cache_text=False)
    assert rows == [images] * len(module.prompts)
    for detections in (first, second):
        for a, b in zip(detections, rerun):
            assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4) and torch.allclose(a["scores"], b["scores"], atol=1e-6)
            assert torch.equal(a["category_ids"], b["category_ids"])
    with torch.no_grad():  # a step changes the encoder's weights in place
        module.detector.model.text_backbone.embeddings.word_embeddings.weight.mul_(1.5)
    rows.clear()
    module.detect(*inputs)
    assert rows == [1] * len(module.prompts)
