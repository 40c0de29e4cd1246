"""Building Grounding DINO (and MM-Grounding-DINO): tiny configs, loading a local folder through the Auto classes,
optimizer groups, the library's loss."""

import contextlib

import pytest
import torch
from transformers import GroundingDinoForObjectDetection, MMGroundingDinoForObjectDetection

from grounding.data.prompts import build_prompts
from grounding.models.grounding_dino import (
    build_grounding_dino,
    encoder_token_count,
    freeze_untrained,
    level_valid_masks,
    parameter_groups,
    trained_proposals,
    untrained_modules,
)

from ..conftest import TEST_MODEL_CONFIG


@pytest.mark.parametrize("name, cls", [("tiny", GroundingDinoForObjectDetection), ("tiny-mm", MMGroundingDinoForObjectDetection)])
def test_pretrained_path_loads_the_saved_model_and_its_own_tokenizer(tmp_path, name, cls):
    """``save_pretrained`` -> ``build_grounding_dino(folder)``: transformers' Auto classes' ``from_pretrained`` picks
    the class from the saved config and restores every weight (the path a hub checkpoint takes, offline)."""
    model, tokenizer = build_grounding_dino(name, TEST_MODEL_CONFIG, tokenizer_dir=tmp_path / "vocab")
    model.save_pretrained(tmp_path / "checkpoint")
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    loaded, loaded_tokenizer = build_grounding_dino(str(tmp_path / "checkpoint"), {"local_files_only": True})
    assert type(model) is type(loaded) is cls
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    prompt = build_prompts({1: "red circle", 2: "blue square"}, loaded_tokenizer, loaded.config.max_text_len)[0]
    assert prompt.input_ids.tolist() == tokenizer("red circle . blue square .")["input_ids"]
    pixel_values = torch.randn(1, 3, 96, 96)
    inputs = {"pixel_values": pixel_values, "input_ids": prompt.input_ids[None], "pixel_mask": torch.ones(1, 96, 96, dtype=torch.long)}
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).pred_boxes, loaded(**inputs).pred_boxes)


def test_a_checkpoint_of_another_family_is_refused_before_its_weights_are_read(tmp_path):
    from transformers import OwlViTConfig

    OwlViTConfig().save_pretrained(tmp_path)  # a config alone: the weights are never looked for
    with pytest.raises(ValueError, match=r"is a 'owlvit' checkpoint; supported: \['grounding-dino', 'mm-grounding-dino'\]"):
        build_grounding_dino(str(tmp_path))


def test_d_model_must_suit_groupnorm():
    with pytest.raises(ValueError, match=r"model_config d_model=48 must be a multiple of 32"):
        build_grounding_dino("tiny", {**TEST_MODEL_CONFIG, "d_model": 48})


@pytest.mark.parametrize("name", ["tiny", "tiny-mm"])
def test_parameter_groups_follow_the_spec_learning_rates(name):
    model, _ = build_grounding_dino(name, TEST_MODEL_CONFIG)
    model.model.text_backbone.requires_grad_(False)
    groups = {g["name"]: g for g in parameter_groups(model, lr=1e-4, lr_backbone=1e-5, lr_text_encoder=1e-5, weight_decay=1e-4)}
    assert set(groups) == {"backbone", "rest"}  # the frozen text encoder gets no group
    backbone = {id(p) for p in model.model.backbone.parameters() if p.requires_grad}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone and groups["backbone"]["lr"] == 1e-5
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in groups["rest"]["params"]} == trainable - backbone and groups["rest"]["lr"] == 1e-4
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)  # tied parameters once
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


def training_step_gradients(model, tokenizer, height=96, width=128, proposal_loss="detached"):
    prompt = build_prompts({1: "red circle", 2: "blue square"}, tokenizer, model.config.max_text_len)[0]
    ids = prompt.input_ids[None].repeat(2, 1)
    labels = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])}] * 2
    model.train()
    with trained_proposals(model) if proposal_loss == "trained" else contextlib.nullcontext():
        loss = model(pixel_values=torch.randn(2, 3, height, width), input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    loss.backward()
    return {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}


PROPOSAL_HEAD = {"model.enc_output", "model.enc_output_norm", "model.encoder_output_bbox_embed"}


@pytest.mark.parametrize("name", ["tiny", "tiny-mm"])
@pytest.mark.parametrize("freeze_text", [False, True])
@pytest.mark.parametrize("proposal_loss", ["detached", "trained"])
def test_after_freezing_every_trainable_parameter_gets_a_gradient(freeze_text, proposal_loss, name):
    """What DDP needs to run without find_unused_parameters; and exactly the documented modules are dead:
    with transformers' loss the proposal head too, with the undetached encoder loss only the backbone's norm
    (the same modules in MM-Grounding-DINO, whose proposal class head's bias is trained either way)."""
    model, tokenizer = build_grounding_dino(name, TEST_MODEL_CONFIG)
    if freeze_text:
        model.model.text_backbone.requires_grad_(False)
    dead = training_step_gradients(model, tokenizer, proposal_loss=proposal_loss)
    documented = untrained_modules(model, proposal_loss)
    expected = {"model.backbone.conv_encoder.model.swin.layernorm"} | (PROPOSAL_HEAD if proposal_loss == "detached" else set())
    assert set(documented) == expected
    assert dead == {n for n, _ in model.named_parameters() if any(n.startswith(m + ".") for m in documented)}
    model.zero_grad(set_to_none=True)
    frozen = freeze_untrained(model, proposal_loss)
    assert set(frozen) == dead
    assert training_step_gradients(model, tokenizer, proposal_loss=proposal_loss) == set()


def test_untrained_modules_names_a_bad_proposal_loss():
    model, _ = build_grounding_dino("tiny", TEST_MODEL_CONFIG)
    with pytest.raises(ValueError, match=r"proposal_loss must be 'trained' or 'detached', got 'frozen'"):
        untrained_modules(model, "frozen")


def test_trained_proposals_scores_the_selected_encoder_tokens_against_the_encoders_text():
    """The encoder loss inside ``trained_proposals`` equals the library's loss given the top-k proposals recomputed
    here from the proposal head's own output (classes against the encoder's text output, as the original model);
    the boxes selected and the decoder terms are transformers' own; outside the block the model is as before."""
    from transformers.loss.loss_grounding_dino import GroundingDinoForObjectDetectionLoss

    torch.manual_seed(0)
    model, tokenizer = build_grounding_dino("tiny", TEST_MODEL_CONFIG)
    model.eval()  # no dropout: both passes see the same network
    prompt = build_prompts({1: "red circle", 2: "blue square"}, tokenizer, model.config.max_text_len)[0]
    ids = prompt.input_ids[None].repeat(2, 1)
    labels = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])}] * 2
    inputs = {"pixel_values": torch.randn(2, 3, 96, 128), "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    queries = []
    hook = model.model.enc_output_norm.register_forward_hook(lambda m, i, o: queries.append(o))
    plain = model(**inputs)
    with trained_proposals(model):
        ours = model(**inputs)
    hook.remove()
    assert not model.model._forward_hooks and "_loss_function" not in vars(model)

    # independent: scores of every encoder token against the encoder's text output, top num_queries of them
    text = ours.encoder_last_hidden_state_text  # (B, T, d)
    scores = queries[1] @ text.transpose(1, 2)  # (B, S, T), all T tokens are real (mask of ones)
    top = scores.max(-1)[0].topk(model.config.num_queries, dim=1)[1]
    logits = torch.full((*top.shape, model.config.max_text_len), float("-inf"))
    logits[..., : text.shape[1]] = torch.gather(scores, 1, top[..., None].expand(-1, -1, text.shape[1]))
    assert torch.equal(ours.encoder_pred_boxes, plain.encoder_pred_boxes)  # the same tokens were selected
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps, build_text_mask

    config = model.config
    _, expected, _ = GroundingDinoForObjectDetectionLoss(
        ours.logits, labels, "cpu", ours.pred_boxes, config, build_label_maps(ours.logits, ids),
        build_text_mask(ours.logits, inputs["attention_mask"]),
        outputs_class=torch.stack([a["logits"] for a in ours.auxiliary_outputs] + [ours.logits]),
        outputs_coord=torch.stack([a["pred_boxes"] for a in ours.auxiliary_outputs] + [ours.pred_boxes]),
        encoder_logits=logits, encoder_pred_boxes=plain.encoder_pred_boxes,
    )
    for name in ("loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"):
        torch.testing.assert_close(ours.loss_dict[name], expected[name])
    assert not torch.isclose(ours.loss_dict["loss_ce_enc"], plain.loss_dict["loss_ce_enc"])  # transformers' text differs
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0"):
        torch.testing.assert_close(ours.loss_dict[name], plain.loss_dict[name])
    assert plain.loss_dict["loss_bbox_enc"].grad_fn is None and ours.loss_dict["loss_bbox_enc"].grad_fn is not None


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


def _two_prompt_batch(tokenizer, model, rows: list[int]):
    """Inputs of len(rows) random images, image i with prompt rows[i] of two class prompts (padded alike)."""
    texts = ["red circle . blue square .", "green triangle ."]
    encoded = tokenizer([texts[r] for r in rows], padding="longest", return_tensors="pt")
    generator = torch.Generator().manual_seed(3)
    return {"pixel_values": torch.randn(len(rows), 3, 96, 96, generator=generator),
            "pixel_mask": torch.ones(len(rows), 96, 96, dtype=torch.long), **encoded}


def _close(a, b) -> bool:
    """Equal up to float rounding; the logits' -inf (padding tokens) on the same places."""
    return torch.equal(a.isinf(), b.isinf()) and torch.allclose(a.nan_to_num(posinf=0, neginf=0), b.nan_to_num(posinf=0, neginf=0), atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-mm"])
def test_cached_text_features_run_the_text_encoder_once_per_distinct_prompt(name):
    """The outputs equal the uncached model's; the encoder sees each distinct prompt row once, over the images
    of a batch and over calls; a change of its weights in place drops what was kept."""
    from grounding.models.grounding_dino import TextFeatureCache, cached_text_features

    model, tokenizer = build_grounding_dino(name, TEST_MODEL_CONFIG)
    model.eval()
    encoder = model.model.text_backbone
    seen = []  # the batch sizes the encoder's layers compute (hooks on the encoder itself see every call)
    encoder.embeddings.register_forward_hook(lambda module, args, output: seen.append(output.shape[0]))
    inputs = _two_prompt_batch(tokenizer, model, [0, 1, 0, 0])
    with torch.no_grad():
        reference = model(**inputs)
        seen.clear()
        cache = TextFeatureCache()
        with cached_text_features(model, cache) as used:
            assert used is cache
            first = model(**inputs)
            second = model(**inputs)
        assert seen == [2]  # one encoder pass of the two distinct rows; the second call none
        assert (cache.computed, cache.reused) == (2, 6)
        for outputs in (first, second):
            assert _close(outputs.logits, reference.logits) and torch.allclose(outputs.pred_boxes, reference.pred_boxes, atol=1e-5)
        assert "forward" not in vars(encoder)  # the module's own forward is back after the block

        weight = encoder.embeddings.word_embeddings.weight  # changed in place: its version moves, the cache is dropped
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)))
        changed = model(**inputs)
        assert not _close(changed.logits, reference.logits)
        seen.clear()
        with cached_text_features(model, cache):
            recomputed = model(**inputs)
        assert seen == [2] and cache.computed == 4
        assert _close(recomputed.logits, changed.logits)


def test_cached_text_features_leave_calls_that_need_a_gradient_alone():
    """With gradients on, the encoder runs as usual (and gets its gradient); nothing is kept."""
    from grounding.models.grounding_dino import TextFeatureCache, cached_text_features

    model, tokenizer = build_grounding_dino("tiny", TEST_MODEL_CONFIG)
    model.eval()
    inputs = _two_prompt_batch(tokenizer, model, [0, 0])
    cache = TextFeatureCache()
    with cached_text_features(model, cache):
        model(**inputs).logits.nan_to_num(neginf=0).sum().backward()
    weight = model.model.text_backbone.embeddings.word_embeddings.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert (cache.computed, cache.reused, len(cache.entries)) == (0, 0, 0)


def test_text_feature_cache_keeps_at_most_max_bytes_and_copies_start_empty():
    import copy
    import pickle

    from grounding.models.grounding_dino import TextFeatureCache, cached_text_features

    model, tokenizer = build_grounding_dino("tiny", TEST_MODEL_CONFIG)
    model.eval()
    inputs = _two_prompt_batch(tokenizer, model, [0, 1])
    length, width = inputs["input_ids"].shape[1], model.config.text_config.hidden_size
    cache = TextFeatureCache(max_bytes=length * width * 4)  # room for one prompt's features
    with torch.no_grad(), cached_text_features(model, cache):
        model(**inputs)
        assert len(cache.entries) == 1 and cache.size == length * width * 4
        model(**inputs)  # the dropped row is computed again
    assert cache.computed == 3
    for copied in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert len(copied.entries) == 0 and copied.max_bytes == cache.max_bytes


def test_cached_text_features_tell_rows_apart_by_the_token_ids_given_on_the_cpu():
    """With CPU copies of the token ids, the rows are keyed by them (what an accelerator's caller gives, so that
    nothing is read back from the device): the same copies find the kept rows, other copies do not; a copy
    of another batch size is not used."""
    from grounding.models.grounding_dino import TextFeatureCache, cached_text_features

    model, tokenizer = build_grounding_dino("tiny", TEST_MODEL_CONFIG)
    model.eval()
    inputs = _two_prompt_batch(tokenizer, model, [0, 1])
    cache = TextFeatureCache()
    with torch.no_grad():
        reference = model(**inputs)
        with cached_text_features(model, cache, inputs["input_ids"].clone(), inputs["token_type_ids"].clone()):
            assert _close(model(**inputs).logits, reference.logits)
        assert (cache.computed, cache.reused) == (2, 0)
        with cached_text_features(model, cache, inputs["input_ids"].clone()):  # token types None: zeros, as given
            assert _close(model(**inputs).logits, reference.logits)
        assert (cache.computed, cache.reused) == (2, 2)
        with cached_text_features(model, cache, inputs["input_ids"] + 1):  # other ids: other keys, computed again
            model(**inputs)
        assert cache.computed == 4
        with cached_text_features(model, cache, inputs["input_ids"][:1]):  # one row for a batch of two: read back
            model(**inputs)
        assert (cache.computed, cache.reused) == (4, 4)


def test_cached_text_features_drop_what_other_weight_tensors_gave():
    """A parameter replaced by another tensor (new weights, a module moved or converted) drops the kept rows,
    although the new tensor has never been changed in place."""
    from grounding.models.grounding_dino import TextFeatureCache, cached_text_features

    model, tokenizer = build_grounding_dino("tiny", TEST_MODEL_CONFIG)
    model.eval()
    inputs = _two_prompt_batch(tokenizer, model, [0])
    cache = TextFeatureCache()
    embeddings = model.model.text_backbone.embeddings.word_embeddings
    with torch.no_grad(), cached_text_features(model, cache):
        model(**inputs)
        replaced = embeddings.weight.detach() + torch.randn(embeddings.weight.shape, generator=torch.Generator().manual_seed(1))
        embeddings.weight = torch.nn.Parameter(replaced)
        cached = model(**inputs)
    assert cache.computed == 2
    with torch.no_grad():
        assert _close(cached.logits, model(**inputs).logits)
