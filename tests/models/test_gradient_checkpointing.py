"""``--model.gradient_checkpointing``: one training step with and without it gives the same loss and gradients with
IMAGE masking, contrastive denoising, the trained proposal head and dropout on (also per-image label maps); every
checkpointed layer is recomputed once in the backward pass while the masks and the other hooks run once; evaluation
and no-grad passes are untouched."""

import pytest
import torch

from grounding.data.coco import collate_detection
from grounding.data.detection import CocoDetectionDataModule
from grounding.lightning.image_module import ImageGroundingModule
from grounding.models.adaptive_masking import MaskingConfig
from grounding.models.checkpointing import checkpointed_layers, gradient_checkpointing_enabled, set_gradient_checkpointing
from grounding.models.denoising import DenoisingConfig

from ..conftest import TEST_MODEL_CONFIG

#: per part, the checkpointed layers of the test model: Swin's 4 blocks, 1 BERT layer, 1 encoder and 2 decoder layers
LAYERS = {"backbone": 4, "text_encoder": 1, "encoder": 1, "decoder": 2}


def make_module(name="tiny", variant="rf_gam", cls=ImageGroundingModule, **kwargs):
    torch.manual_seed(0)
    settings = dict(model=name, model_config=TEST_MODEL_CONFIG, masking=MaskingConfig(variant=variant), log_images=False,
                    denoising=DenoisingConfig(number=10), freeze=[])
    return cls(**{**settings, **kwargs})


@pytest.fixture(scope="module")
def batch(synthetic_root):
    data = CocoDetectionDataModule(synthetic_root=str(synthetic_root), image_size=96, max_size=128, batch_size=2, num_workers=0)
    data.setup("fit")
    return data.categories, collate_detection([data.datasets["train"][i] for i in range(2)])


def instrument(module):
    """Counters of the forward runs of every checkpointed layer (a pre-hook on its first child, which runs inside the
    recomputation too), of the hooks on the layers themselves (outside it), of the masks made, and of the decoder
    layers' inputs (matching + denoising queries)."""
    counts = {part: 0 for part in LAYERS}
    seen = {"masks": 0, "queries": set(), "attention_masks": 0, "layer_hooks": dict.fromkeys(LAYERS, 0)}
    for part, layers in checkpointed_layers(module.detector).items():
        for layer in layers:
            first = next(iter(layer.children()))
            first.register_forward_pre_hook(lambda m, a, part=part: counts.__setitem__(part, counts[part] + 1))
            layer.register_forward_hook(lambda m, a, o, part=part: seen["layer_hooks"].__setitem__(part, seen["layer_hooks"][part] + 1))

    def decoder_layer(m, args, kwargs):
        seen["queries"].add(kwargs["hidden_states"].shape[1])
        seen["attention_masks"] += kwargs.get("self_attn_mask") is not None

    module.detector.model.decoder.layers[0].register_forward_pre_hook(decoder_layer, with_kwargs=True)
    mask_level = module.masking.mask_level

    def counted(*args, **kwargs):
        seen["masks"] += 1
        return mask_level(*args, **kwargs)

    module.masking.mask_level = counted
    return counts, seen


def step(module, data, seed=1):
    """One training step's loss, gradients and the bytes autograd kept for the backward pass."""
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = module.training_step(data, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}, saved[0]


def assert_same_gradients(grads, reference):
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        scale = reference[name].abs().max().item()
        assert (grad - reference[name]).abs().max().item() <= 1e-6 * scale + 1e-12, name


@pytest.mark.parametrize("name, variant", [("tiny", "rf_gam"), ("tiny-mm", "random")])
def test_checkpointing_gives_the_same_loss_and_gradients(batch, name, variant):
    """Dropout (0.1 in the encoder, decoder and BERT, drop path in Swin and the fusion layers) draws inside the
    checkpointed layers, the random masks outside them: the recomputation must draw the same numbers."""
    categories, data = batch
    runs = {}
    for checkpointing in (False, True):
        module = make_module(name, variant, gradient_checkpointing=checkpointing)
        module.set_categories(categories)
        counts, seen = instrument(module)
        loss, grads, saved = step(module, data)
        runs[checkpointing] = loss, grads, saved, counts, seen
    (loss0, grads0, saved0, counts0, seen0), (loss1, grads1, saved1, counts1, seen1) = runs[False], runs[True]
    assert torch.equal(loss1, loss0)
    assert_same_gradients(grads1, grads0)
    assert len(grads0) == sum(p.requires_grad for p in module.parameters())  # every trainable parameter, BERT's too
    assert counts0 == LAYERS and counts1 == {part: 2 * n for part, n in LAYERS.items()}  # each layer recomputed once
    assert saved1 < 0.6 * saved0
    for seen in (seen0, seen1):
        assert seen["layer_hooks"] == LAYERS  # a forward hook on a checkpointed layer runs once
        assert seen["masks"] == 4  # one mask per level per step: the masking hook is not in a recomputed region
        assert seen["attention_masks"] >= 1 and max(seen["queries"]) > TEST_MODEL_CONFIG["num_queries"]  # + denoising
    if variant == "random":  # the random draws matter: another seed gives other gradients
        _, other, _ = step(module, data, seed=2)
        assert any(not torch.allclose(other[n], grads1[n]) for n in other)


def test_checkpointing_with_per_image_label_maps_and_a_frozen_backbone(synthetic_root):
    """GroundingModule's step on grounding data (``batch_label_maps``); a frozen backbone's blocks store nothing,
    so they are not recomputed, and the other layers are."""
    from grounding.lightning.grounding_module import GroundingModule

    from ..lightning.test_grounding_module import synthetic_data

    module_plain = make_module(cls=GroundingModule, freeze=["backbone"])
    module_checkpointed = make_module(cls=GroundingModule, freeze=["backbone"], gradient_checkpointing=True)
    data = synthetic_data(synthetic_root, batch_size=2)
    data.prepare_data()
    data.setup("fit")
    data.use_tokenizer(module_plain.tokenizer, TEST_MODEL_CONFIG["max_text_len"])
    grounding_batch = next(iter(data.train_dataloader()))
    assert "label_maps" in grounding_batch
    counts, _ = instrument(module_checkpointed)
    loss0, grads0, _ = step(module_plain, grounding_batch)
    loss1, grads1, _ = step(module_checkpointed, grounding_batch)
    assert torch.equal(loss1, loss0)
    assert_same_gradients(grads1, grads0)
    assert not any(n.startswith("detector.model.backbone.") for n in grads1)
    assert counts == {"backbone": 4, "text_encoder": 2, "encoder": 2, "decoder": 4}


def test_evaluation_and_no_grad_passes_are_not_checkpointed(batch):
    categories, data = batch
    checkpointed = make_module(gradient_checkpointing=True)
    assert gradient_checkpointing_enabled(checkpointed.detector) == dict.fromkeys(LAYERS, True)
    counts, _ = instrument(checkpointed)
    orig = torch.stack([t["orig_size"] for t in data["targets"]])
    checkpointed.set_categories(categories)
    checkpointed.eval()
    checkpointed.detect(data["pixel_values"], data["pixel_mask"], orig)
    assert counts == LAYERS  # once each, in eval mode without gradients
    checkpointed.train()
    with torch.no_grad():
        checkpointed.training_step(data, 0)
    assert counts == {part: 2 * n for part, n in LAYERS.items()}  # a training pass without gradients: once more
    assert set_gradient_checkpointing(checkpointed.detector, False) == sum(LAYERS.values())
    assert gradient_checkpointing_enabled(checkpointed.detector) == dict.fromkeys(LAYERS, False)
    step(checkpointed, data)
    assert counts == {part: 3 * n for part, n in LAYERS.items()}  # off again: no recomputation


def test_a_bad_setting_is_named():
    with pytest.raises(ValueError, match="model.gradient_checkpointing must be true or false, got 'yes'"):
        make_module(gradient_checkpointing="yes")


def test_checkpointing_with_lora_adapters(batch):
    """LoRA's adapters inside checkpointed layers (encoder, decoder, BERT, Swin): the same loss and adapter gradients,
    the layers recomputed once; the frozen base weights get none."""
    from grounding.models.lora import LoraSettings

    categories, data = batch
    lora = LoraSettings(r=4, dropout=0.1, target_modules=("encoder_attention", "decoder_ffn", "text_encoder", "backbone"))
    runs = {}
    for checkpointing in (False, True):
        module = make_module(variant="random", lora=lora, gradient_checkpointing=checkpointing)
        module.set_categories(categories)
        counts, _ = instrument(module)
        runs[checkpointing] = (*step(module, data), counts)
    (loss0, grads0, _, counts0), (loss1, grads1, _, counts1) = runs[False], runs[True]
    assert torch.equal(loss1, loss0)
    assert_same_gradients(grads1, grads0)
    assert any("lora_A" in n for n in grads1) and not any(n.endswith("base_layer.weight") for n in grads1)
    assert counts1 == {part: 2 * n for part, n in counts0.items()} and counts0 == LAYERS
