"""MM-Grounding-DINO (the class LLMDet checkpoints load as too): the offline tiny model, and IMAGE's hooks,
proposal loss, freezing and training on it as on Grounding DINO."""

import lightning as L
import pytest
import torch
from transformers import GroundingDinoForObjectDetection, MMGroundingDinoForObjectDetection

from grounding.data.coco import collate_detection
from grounding.data.detection import CocoDetectionDataModule
from grounding.data.prompts import build_prompts
from grounding.lightning.image_module import ImageGroundingModule
from grounding.models.adaptive_masking import AdaptiveMasking, MaskingConfig
from grounding.models.denoising import DenoisingConfig
from grounding.models.grounding_dino import build_grounding_dino, feature_masking, trained_proposals

from ..conftest import TEST_MODEL_CONFIG

#: MM-Grounding-DINO's only parameters beyond Grounding DINO's: the learned biases of its class heads
MM_ONLY = {"model.decoder.class_embed.0.bias", "model.encoder_output_class_embed.bias"}


def test_tiny_mm_is_the_mm_class_with_the_tiny_sizes_and_grounding_dinos_modules():
    gd, _ = build_grounding_dino("tiny", TEST_MODEL_CONFIG)
    mm, _ = build_grounding_dino("tiny-mm", TEST_MODEL_CONFIG)
    assert type(mm) is MMGroundingDinoForObjectDetection and not isinstance(mm, GroundingDinoForObjectDetection)
    for field in ("d_model", "encoder_layers", "decoder_layers", "num_queries", "max_text_len", "two_stage", "auxiliary_loss",
                  "num_feature_levels"):
        assert getattr(mm.config, field) == getattr(gd.config, field), field
    assert mm.config.backbone_config.to_dict() == gd.config.backbone_config.to_dict()
    gd_names, mm_names = {n for n, _ in gd.named_parameters()}, {n for n, _ in mm.named_parameters()}
    assert mm_names - gd_names == MM_ONLY and gd_names <= mm_names
    # one bias for every decoder layer (decoder_cls_embed_share) and the decoder's copy of the heads tied to it
    assert mm.class_embed[1].bias is mm.class_embed[0].bias is mm.model.decoder.class_embed[0].bias
    assert mm.loss_function is gd.loss_function  # the library's Grounding DINO loss


def test_tiny_mm_refuses_a_single_stage_model():
    with pytest.raises(ValueError, match="two_stage=false: MM-Grounding-DINO has no single-stage variant"):
        build_grounding_dino("tiny-mm", {**TEST_MODEL_CONFIG, "two_stage": False})


def test_masking_hooks_change_the_encoder_input_exactly_as_on_grounding_dino():
    """With Grounding DINO's weights in the MM model (all but the class-head biases), everything before the
    encoder is the same network: the maps entering the encoder, unmasked and masked, and the masks are equal."""
    gd, tokenizer = build_grounding_dino("tiny", TEST_MODEL_CONFIG)
    mm, _ = build_grounding_dino("tiny-mm", TEST_MODEL_CONFIG)
    missing, unexpected = mm.load_state_dict(gd.state_dict(), strict=False)
    assert not unexpected and missing and all("class_embed" in k and k.endswith(".bias") for k in missing)
    ids = build_prompts({1: "red circle", 2: "blue square"}, tokenizer, gd.config.max_text_len)[0].input_ids[None].repeat(2, 1)
    pixel_values = torch.randn(2, 3, 96, 128)
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.long)
    pixel_mask[1, :, 100:] = 0  # padding is never chosen
    masker = AdaptiveMasking(MaskingConfig(variant="threshold")).train()
    seen = {}
    for name, model in (("gd", gd), ("mm", mm)):
        model.eval()
        handle = model.model.encoder.register_forward_pre_hook(
            lambda module, args, kwargs: seen.setdefault(name, []).append(kwargs["vision_features"].clone()), with_kwargs=True
        )
        with torch.no_grad():
            model(pixel_values=pixel_values, pixel_mask=pixel_mask, input_ids=ids)
            with feature_masking(model, masker, 0.0, pixel_mask):
                model(pixel_values=pixel_values, pixel_mask=pixel_mask, input_ids=ids)
        handle.remove()
        seen[name].append(torch.cat([m.flatten(1) for _, m in sorted(masker.last_masks.items())], dim=1))
        assert all(not p._forward_hooks for p in model.model.input_proj_vision)
    for gd_tensor, mm_tensor in zip(seen["gd"], seen["mm"]):
        assert torch.equal(gd_tensor, mm_tensor)
    unmasked, masked, masks = seen["mm"]
    assert masks.sum() > 0 and not torch.equal(unmasked, masked)
    ratio = (masked / unmasked.where(unmasked != 0, torch.ones_like(unmasked))).mean(-1)
    assert torch.allclose(ratio[masks == 1], torch.tensor(0.5), atol=1e-4)  # threshold masks, k0 = 0.5 at p = 0
    assert torch.allclose(masked[masks == 0], unmasked[masks == 0])


def test_trained_proposals_score_the_selected_tokens_with_the_mm_class_head():
    """The encoder loss inside ``trained_proposals`` equals the library's loss given the top-k proposals recomputed
    here from the proposal head's output, scored as MM-Grounding-DINO scores them (similarity / sqrt(d) + bias)."""
    from transformers.loss.loss_grounding_dino import GroundingDinoForObjectDetectionLoss
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps, build_text_mask

    model, tokenizer = build_grounding_dino("tiny-mm", TEST_MODEL_CONFIG)
    model.eval()
    with torch.no_grad():
        model.model.encoder_output_class_embed.bias.fill_(0.7)  # not the initial value of the other heads
    ids = build_prompts({1: "red circle", 2: "blue square"}, tokenizer, model.config.max_text_len)[0].input_ids[None].repeat(2, 1)
    labels = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])}] * 2
    inputs = {"pixel_values": torch.randn(2, 3, 96, 128), "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    queries = []
    hook = model.model.enc_output_norm.register_forward_hook(lambda m, i, o: queries.append(o))
    plain = model(**inputs)
    with trained_proposals(model):
        ours = model(**inputs)
    hook.remove()
    assert not model.model._forward_hooks and "_loss_function" not in vars(model)
    text = ours.encoder_last_hidden_state_text
    scores = queries[1] @ text.transpose(1, 2) / model.config.d_model ** 0.5 + 0.7
    top = scores.max(-1)[0].topk(model.config.num_queries, dim=1)[1]
    logits = torch.full((*top.shape, model.config.max_text_len), float("-inf"))
    logits[..., : text.shape[1]] = torch.gather(scores, 1, top[..., None].expand(-1, -1, text.shape[1]))
    assert torch.equal(ours.encoder_pred_boxes, plain.encoder_pred_boxes)  # the same tokens were selected
    _, expected, _ = GroundingDinoForObjectDetectionLoss(
        ours.logits, labels, "cpu", ours.pred_boxes, model.config, build_label_maps(ours.logits, ids),
        build_text_mask(ours.logits, inputs["attention_mask"]),
        outputs_class=torch.stack([a["logits"] for a in ours.auxiliary_outputs] + [ours.logits]),
        outputs_coord=torch.stack([a["pred_boxes"] for a in ours.auxiliary_outputs] + [ours.pred_boxes]),
        encoder_logits=logits, encoder_pred_boxes=plain.encoder_pred_boxes,
    )
    for name in ("loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"):
        torch.testing.assert_close(ours.loss_dict[name], expected[name])
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"):
        torch.testing.assert_close(ours.loss_dict[name], plain.loss_dict[name])
    assert plain.loss_dict["loss_bbox_enc"].grad_fn is None and ours.loss_dict["loss_bbox_enc"].grad_fn is not None


@pytest.mark.parametrize("proposal_loss, number", [("trained", 10), ("detached", 0)])
def test_every_trainable_parameter_of_the_module_gets_a_gradient(synthetic_root, proposal_loss, number):
    """DDP without find_unused_parameters on the MM class: after the module's freezing, one training step (masking,
    the chosen proposal loss, denoising) reaches every trainable parameter, the class-head biases included."""
    torch.manual_seed(0)
    module = ImageGroundingModule(model="tiny-mm", model_config=TEST_MODEL_CONFIG, proposal_loss=proposal_loss,
                                  denoising=DenoisingConfig(number=number))
    assert isinstance(module.detector, MMGroundingDinoForObjectDetection)
    expected = {"model.backbone.conv_encoder.model.swin.layernorm.weight", "model.backbone.conv_encoder.model.swin.layernorm.bias"}
    if proposal_loss == "detached":
        expected |= {n for n, _ in module.detector.named_parameters()
                     if n.startswith(("model.enc_output.", "model.enc_output_norm.", "model.encoder_output_bbox_embed."))}
    assert set(module.frozen_untrained) == expected
    data = CocoDetectionDataModule(synthetic_root=str(synthetic_root), image_size=96, max_size=128, batch_size=2, num_workers=0)
    data.setup("fit")
    module.set_categories(data.categories)
    module.training_step(collate_detection([data.datasets["train"][i] for i in range(2)]), 0).backward()
    assert {name for name, p in module.named_parameters() if p.requires_grad and p.grad is None} == set()
    for name in MM_ONLY:
        assert module.detector.get_parameter(name).grad.abs() > 0, name


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_a_few_training_steps_lower_the_loss(synthetic_root):
    """The demo's recipe (RF-GAM masks, trained proposals, contrastive denoising) through the Trainer, on the MM
    class: the loss falls and every parameter group moves."""
    torch.manual_seed(0)
    module = ImageGroundingModule(model="tiny-mm", model_config=TEST_MODEL_CONFIG, lr=5e-4, denoising=DenoisingConfig(number=10))
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    recorder = LossRecorder()
    trainer = L.Trainer(
        max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0, gradient_clip_val=0.1,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
    )
    data = CocoDetectionDataModule(synthetic_root=str(synthetic_root), image_size=96, max_size=128, batch_size=4, num_workers=0,
                                   crop_prob=0.0)
    trainer.fit(module, datamodule=data)
    first, last = recorder.losses[:3], recorder.losses[-3:]
    assert len(recorder.losses) == 12 and sum(last) < 0.85 * sum(first), recorder.losses
    groups = {g["name"]: g["params"] for g in trainer.optimizers[0].param_groups}
    assert set(groups) == {"backbone", "rest", "denoising"}  # the text encoder is frozen by default
    for name in MM_ONLY:
        assert not torch.equal(module.detector.get_parameter(name), before[f"detector.{name}"]), name
    assert set(module.masking.last_masks) == {0, 1, 2, 3}
