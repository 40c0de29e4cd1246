"""Building Grounding DINO: tiny config, loading from a local folder, optimizer groups, the library's loss."""

import pytest
import torch

from grounding.data.prompts import build_prompts
from grounding.models.grounding_dino import (
    build_grounding_dino,
    encoder_token_count,
    freeze_untrained,
    level_valid_masks,
    parameter_groups,
    untrained_modules,
)

from ..conftest import TEST_MODEL_CONFIG


def test_pretrained_path_loads_the_saved_model_and_its_own_tokenizer(tmp_path):
    model, tokenizer = build_grounding_dino("tiny", TEST_MODEL_CONFIG, tokenizer_dir=tmp_path / "vocab")
    model.save_pretrained(tmp_path / "checkpoint")
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    loaded, loaded_tokenizer = build_grounding_dino(str(tmp_path / "checkpoint"))
    prompt = build_prompts({1: "red circle", 2: "blue square"}, loaded_tokenizer, loaded.config.max_text_len)[0]
    assert prompt.input_ids.tolist() == tokenizer("red circle . blue square .")["input_ids"]
    pixel_values = torch.randn(1, 3, 96, 96)
    inputs = {"pixel_values": pixel_values, "input_ids": prompt.input_ids[None], "pixel_mask": torch.ones(1, 96, 96, dtype=torch.long)}
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).pred_boxes, loaded(**inputs).pred_boxes)


def test_d_model_must_suit_groupnorm():
    with pytest.raises(ValueError, match=r"model_config d_model=48 must be a multiple of 32"):
        build_grounding_dino("tiny", {**TEST_MODEL_CONFIG, "d_model": 48})


def test_parameter_groups_follow_the_spec_learning_rates():
    model, _ = build_grounding_dino("tiny", TEST_MODEL_CONFIG)
    model.model.text_backbone.requires_grad_(False)
    groups = {g["name"]: g for g in parameter_groups(model, lr=1e-4, lr_backbone=1e-5, lr_text_encoder=1e-5, weight_decay=1e-4)}
    assert set(groups) == {"backbone", "rest"}  # the frozen text encoder gets no group
    backbone = {id(p) for p in model.model.backbone.parameters() if p.requires_grad}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone and groups["backbone"]["lr"] == 1e-5
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in groups["rest"]["params"]} == trainable - backbone and groups["rest"]["lr"] == 1e-4
    assert all(g["weight_decay"] == 1e-4 for g in groups.values())


def test_library_loss_uses_our_class_labels_as_phrase_positions():
    """A query placed exactly on a box with its phrase's tokens on gets a lower loss than with another phrase's."""
    model, tokenizer = build_grounding_dino("tiny", TEST_MODEL_CONFIG)
    prompt = build_prompts({1: "red circle", 2: "blue square"}, tokenizer, model.config.max_text_len)[0]
    logits = torch.full((1, 5, model.config.max_text_len), -9.0)
    logits[0, 0, prompt.positive_map[1].bool()] = 9.0  # query 0 says "blue square"
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] + [[0.1, 0.1, 0.05, 0.05]] * 4])
    from transformers.loss.loss_grounding_dino import GroundingDinoForObjectDetectionLoss
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps, build_text_mask

    ids = prompt.input_ids[None]
    config = model.config
    config.auxiliary_loss, config.two_stage = False, False

    def loss(position):
        labels = [{"class_labels": torch.tensor([position]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
        _, loss_dict, _ = GroundingDinoForObjectDetectionLoss(
            logits, labels, "cpu", boxes, config, build_label_maps(logits, ids), build_text_mask(logits, torch.ones_like(ids))
        )
        return loss_dict["loss_ce"]

    assert loss(1) < 0.01 < loss(0)


def test_level_valid_masks_downsample_the_pixel_mask():
    pixel_mask = torch.zeros(1, 16, 16, dtype=torch.long)
    pixel_mask[0, :8, :12] = 1
    (valid,) = level_valid_masks(pixel_mask, [(4, 4)])
    assert valid[0].tolist() == [[True, True, True, False], [True, True, True, False], [False] * 4, [False] * 4]


def training_step_gradients(model, tokenizer, height=96, width=128):
    prompt = build_prompts({1: "red circle", 2: "blue square"}, tokenizer, model.config.max_text_len)[0]
    ids = prompt.input_ids[None].repeat(2, 1)
    labels = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])}] * 2
    model.train()
    model(pixel_values=torch.randn(2, 3, height, width), input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    return {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}


@pytest.mark.parametrize("freeze_text", [False, True])
def test_after_freezing_every_trainable_parameter_gets_a_gradient(freeze_text):
    """What DDP needs to run without find_unused_parameters; and exactly the documented modules are dead."""
    model, tokenizer = build_grounding_dino("tiny", TEST_MODEL_CONFIG)
    if freeze_text:
        model.model.text_backbone.requires_grad_(False)
    dead = training_step_gradients(model, tokenizer)
    documented = untrained_modules(model)
    assert set(documented) == {"model.enc_output", "model.enc_output_norm", "model.encoder_output_bbox_embed",
                               "model.backbone.conv_encoder.model.swin.layernorm"}
    assert dead == {n for n, _ in model.named_parameters() if any(n.startswith(m + ".") for m in documented)}
    model.zero_grad(set_to_none=True)
    frozen = freeze_untrained(model)
    assert set(frozen) == dead
    assert training_step_gradients(model, tokenizer) == set()


@pytest.mark.parametrize("height, width", [(96, 96), (96, 131), (128, 214), (200, 75)])
def test_encoder_token_count_equals_the_model_feature_maps(height, width):
    model, tokenizer = build_grounding_dino("tiny", TEST_MODEL_CONFIG)
    sizes = []
    hooks = [p.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-2] * o.shape[-1])) for p in model.model.input_proj_vision]
    ids = tokenizer(["red circle ."], return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, height, width), input_ids=ids)
    for hook in hooks:
        hook.remove()
    assert len(sizes) == model.config.num_feature_levels
    assert encoder_token_count(model.config, height, width) == sum(sizes)
