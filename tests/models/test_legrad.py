"""CLIP wrapper and LeGrad maps against transformers' own forward pass and a direct autograd computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grounding.models.clip import attention_block, build_clip, resample_position_embeddings
from grounding.models.legrad import legrad, maps_for_state, prepare

NATIVE = {"vision_config": {"image_size": 64, "num_hidden_layers": 3}}


@pytest.fixture(scope="module")
def backbone():
    return build_clip("tiny", image_size=64, overrides=NATIVE).double()


def _pixels(backbone, seed=0, count=1, size=(64, 64)):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, *size), generator=generator, dtype=torch.uint8) for _ in range(count)]
    return backbone.preprocess(images)


def test_attention_block_equals_the_transformers_layer(backbone):
    tokens = backbone.embed(_pixels(backbone))
    layer = backbone.vision.encoder.layers[1]
    block = attention_block(layer, tokens)
    expected = layer(tokens, None)
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(block.output, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(block.attention.sum(-1), torch.ones_like(block.attention[..., 0]))


def test_native_size_embedding_and_global_embedding_equal_transformers(backbone):
    pixels = _pixels(backbone, count=2)
    with torch.no_grad():
        hf = backbone.model.vision_model(pixel_values=pixels, output_hidden_states=True)
        torch.testing.assert_close(backbone.embed(pixels), backbone.vision.pre_layrnorm(backbone.vision.embeddings(pixels)))
        expected = backbone.model.visual_projection(hf.pooler_output)
        torch.testing.assert_close(backbone.encode_image(pixels), expected, rtol=0, atol=1e-12)


def test_plain_bicubic_resampling_equals_transformers_interpolation():
    plain = build_clip("tiny", image_size=96, antialias=False, overrides=NATIVE).double()
    pixels = _pixels(plain, size=(96, 96))
    with torch.no_grad():
        hf = plain.vision.embeddings(pixels, interpolate_pos_encoding=True)
        torch.testing.assert_close(plain.embed(pixels), plain.vision.pre_layrnorm(hf), rtol=0, atol=1e-12)


def test_antialiased_resampling_keeps_cls_and_is_identity_at_the_native_grid():
    weight = torch.randn(1 + 4 * 4, 8, dtype=torch.float64)
    assert resample_position_embeddings(weight, (4, 4)) is weight
    down = resample_position_embeddings(weight, (2, 2), antialias=True)
    plain = resample_position_embeddings(weight, (2, 2), antialias=False)
    torch.testing.assert_close(down[0], weight[0])
    # antialiasing a 2x downsampling averages 4x4 neighbourhoods: its values vary less than plain bicubic's
    assert down[1:].std() < plain[1:].std()
    assert down.shape == (5, 8)


def _hf_legrad(backbone, pixels, query, layers):
    """LeGrad straight from the definition on transformers' own forward: autograd to its attention outputs."""
    pixels = pixels.clone().requires_grad_(True)  # so that transformers' forward records a graph
    out = backbone.model.vision_model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    query = F.normalize(query, dim=-1)
    grid = pixels.shape[-1] // backbone.patch_size
    total = 0
    for layer in layers:
        hidden = out.hidden_states[layer + 1]  # hidden_states[0] is the embedding output
        f = F.normalize(backbone.model.visual_projection(backbone.vision.post_layernorm(hidden.mean(1))), dim=-1)
        (grad,) = torch.autograd.grad((f * query).sum(), out.attentions[layer], retain_graph=True)
        relevance = grad.clamp_min(0).mean(dim=(1, 2))[:, 1:].reshape(1, 1, grid, grid)
        total = total + F.interpolate(relevance, scale_factor=backbone.patch_size, mode="bilinear", align_corners=False)
    total = total[0, 0]
    return (total - total.min()) / (total.max() - total.min())


@pytest.mark.parametrize("layers", [(2,), (1, 2), (0, 2)])
@pytest.mark.parametrize("method", ["decomposed", "autograd"])
def test_legrad_equals_the_definition_on_transformers_forward(backbone, layers, method):
    backbone.model.config.vision_config._attn_implementation = "eager"
    pixels = _pixels(backbone, seed=1)
    queries = torch.randn(3, backbone.embed_dim, dtype=torch.float64)
    maps = legrad(backbone, pixels, queries, layers=layers, method=method)
    assert maps.shape == (3, 64, 64)
    for i in range(3):
        torch.testing.assert_close(maps[i], _hf_legrad(backbone, pixels, queries[i:i + 1], layers), rtol=0, atol=1e-10)


def test_maps_lie_in_unit_range_and_each_query_sees_its_own_image(backbone):
    pixels = _pixels(backbone, seed=2, count=2)
    queries = torch.randn(4, backbone.embed_dim, dtype=torch.float64)
    maps = legrad(backbone, pixels, queries, image_index=[1, 0, 1, 0])
    assert torch.allclose(maps.amin(dim=(1, 2)), torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(maps.amax(dim=(1, 2)), torch.ones(4, dtype=torch.float64))
    alone = legrad(backbone, pixels[1:2], queries[2:3])
    torch.testing.assert_close(maps[2], alone[0])
    other = legrad(backbone, pixels[0:1], queries[2:3])
    assert (maps[2] - other[0]).abs().max() > 1e-3


def test_precomputed_basis_gives_the_same_maps(backbone):
    from grounding.models.legrad import precompute_basis

    state = prepare(backbone, _pixels(backbone, seed=3), (1, 2))
    queries = F.normalize(torch.randn(5, backbone.embed_dim, dtype=torch.float64), dim=-1)
    chain = maps_for_state(backbone, state, queries)
    precompute_basis(backbone, state)
    torch.testing.assert_close(maps_for_state(backbone, state, queries), chain, rtol=0, atol=1e-12)


def test_bad_arguments_are_named(backbone):
    pixels = _pixels(backbone)
    with pytest.raises(ValueError, match="layer 7 is out of range for a vision tower of 3 blocks"):
        legrad(backbone, pixels, torch.randn(1, backbone.embed_dim, dtype=torch.float64), layers=(7,))
    with pytest.raises(ValueError, match=r"2 images for 3 queries: pass image_index"):
        legrad(backbone, _pixels(backbone, count=2), torch.randn(3, backbone.embed_dim, dtype=torch.float64))
    with pytest.raises(ValueError, match="image_size=70 must be a positive multiple of the patch size 16"):
        build_clip("tiny", image_size=70)


def test_a_saved_checkpoint_folder_loads_with_its_own_tokenizer(tmp_path):
    tiny = build_clip("tiny", image_size=64, overrides=NATIVE)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = build_clip(str(tmp_path), image_size=64)
    texts = ["a photo of a red circle.", "the blue square on the left"]
    torch.testing.assert_close(loaded.encode_text(texts), tiny.encode_text(texts))
    pixels = _pixels(tiny)
    torch.testing.assert_close(loaded.encode_image(pixels.float()), tiny.encode_image(pixels.float()))
    assert loaded.tokenizer("red")["input_ids"] == tiny.tokenizer("red")["input_ids"]
