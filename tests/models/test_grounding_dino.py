"""Building Grounding DINO: tiny config, loading from a local folder, optimizer groups, the library's loss."""

import pytest
import torch

from grounding.data.prompts import build_prompts
from grounding.models.grounding_dino import build_grounding_dino, level_valid_masks, parameter_groups

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
