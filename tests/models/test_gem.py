"""GEM and the training-free baselines against loop / raw-weight computations and transformers' own forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from grounding.models.clip import build_clip
from grounding.models.gem import (
    GEM,
    DenseSimilarity,
    adaptive_inverse_temperature,
    block_class_output,
    block_output,
    block_projections,
    class_text_embeddings,
    clearclip_tokens,
    feature_surgery,
    naclip_tokens,
    sclip_block,
    labels_with_background,
    resize_to_short_side,
    self_self_attention,
    similarity_maps,
    sliding_window_maps,
    window_starts,
)

#: native size 64 px (a 4x4 grid) so that transformers' own forward runs at the same size as ours
NATIVE = {"vision_config": {"image_size": 64}}


@pytest.fixture(scope="module")
def backbone():
    return build_clip("tiny", image_size=64, overrides=NATIVE).double()


def _pixels(backbone, seed=0, count=1, size=(64, 64)):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, *size, generator=generator, dtype=torch.float64)
    return images.to(backbone.vision.embeddings.patch_embedding.weight.dtype)


# -- independent computations ---------------------------------------------------------------------------
def _unit(vector):
    return vector / math.sqrt(float((vector * vector).sum()))


def _loop_softmax_row(logits):
    top = max(logits)
    weights = [math.exp(value - top) for value in logits]
    total = sum(weights)
    return [weight / total for weight in weights]


def _loop_self_self(stream, beta, iterations):
    """One head (T, c): the iterated self-self attention token by token, Python floats for the softmax."""
    rows = [_unit(row) for row in stream]
    for _ in range(iterations):
        updated = []
        for row in rows:
            weights = _loop_softmax_row([beta * float(row @ other) for other in rows])
            updated.append(_unit(sum(weight * other for weight, other in zip(weights, rows))))
        rows = updated
    return torch.tensor([_loop_softmax_row([beta * float(row @ other) for other in rows]) for row in rows],
                        dtype=stream.dtype)


def _loop_beta(z, head_dim):
    """τ = N √d / Σ‖x_i‖ of the paper, inverted, one image (T, d)."""
    norms = [math.sqrt(sum(float(value) ** 2 for value in token)) for token in z]
    return 1.0 / (len(norms) * math.sqrt(head_dim) / sum(norms))


def _ln(module, x):
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _linear(module, x):
    return x @ module.weight.T + module.bias


def _hf_hidden_states(backbone, pixels):
    """transformers' own forward at the native size: the inputs of every block and the last output."""
    with torch.no_grad():
        return backbone.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states


def _hf_project(backbone, tokens):
    vision, projection = backbone.vision.post_layernorm, backbone.model.visual_projection
    return F.normalize(_linear_nobias(projection, _ln(vision, tokens[:, 1:])), dim=-1)


def _linear_nobias(module, x):
    assert module.bias is None  # CLIP's visual projection has none
    return x @ module.weight.T


def _direct_pathway(backbone, pixels, depth, mode, iterations=1, temperature=None):
    """GEM / CLIPSurgery pathway from the raw weights, head by head, with transformers' hidden states as x_ori."""
    hidden = _hf_hidden_states(backbone, pixels)  # hidden[i]: input of block i
    layers = backbone.vision.encoder.layers
    first = len(layers) - (depth - 1)
    path = hidden[first].clone()
    for index in range(first, len(layers)):
        layer, x = layers[index], hidden[index]
        heads = layer.self_attn.num_heads
        head_dim = x.shape[-1] // heads
        z = _ln(layer.layer_norm1, x)
        q, k, v = (_linear(proj, z) for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
        merged = torch.zeros_like(x)
        for b in range(x.shape[0]):
            beta = _loop_beta(z[b], head_dim) if temperature is None else 1.0 / temperature
            for h in range(heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                value = v[b, :, cols]
                if mode == "gem":
                    maps = [_loop_self_self(s[b, :, cols], beta, iterations) for s in (q, k, v)]
                    merged[b, :, cols] = sum(attn @ value for attn in maps) / 3
                else:
                    merged[b, :, cols] = _loop_self_self(value, beta, 0) @ value
        path = path + _linear(layer.self_attn.out_proj, merged)
    return _hf_project(backbone, path)


# -- self-self attention and β ----------------------------------------------------------------------------
@pytest.mark.parametrize("iterations", [0, 1, 2])
def test_self_self_attention_equals_a_token_by_token_loop(iterations):
    stream = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    beta = torch.tensor([0.7, 3.0], dtype=torch.float64)
    attn = self_self_attention(stream, beta, iterations)
    assert attn.shape == (2, 3, 6, 6)
    for b in range(2):
        for h in range(3):
            expected = _loop_self_self(stream[b, h], float(beta[b]), iterations)
            torch.testing.assert_close(attn[b, h], expected, rtol=0, atol=1e-12)


def test_zero_iterations_is_the_plain_normalized_self_self_form():
    stream = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    unit = stream / stream.norm(dim=-1, keepdim=True)
    expected = torch.softmax(2.5 * torch.einsum("bhic,bhjc->bhij", unit, unit), dim=-1)
    torch.testing.assert_close(self_self_attention(stream, 2.5, 0), expected, rtol=0, atol=1e-12)
    # an iteration changes the map (so the loop above is really exercised)
    assert not torch.allclose(self_self_attention(stream, 2.5, 1), expected, atol=1e-6)


def test_adaptive_inverse_temperature_is_the_inverse_of_the_papers_tau():
    z = torch.randn(3, 9, 16, dtype=torch.float64) * torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)[:, None, None]
    beta = adaptive_inverse_temperature(z, head_dim=4)
    assert beta.shape == (3,)
    for b in range(3):
        assert float(beta[b]) == pytest.approx(_loop_beta(z[b], 4), rel=1e-12)


# -- the pathways against direct computations ------------------------------------------------------------
def test_plain_equals_transformers_vision_model_and_gem_without_modified_blocks(backbone):
    pixels = _pixels(backbone, count=2)
    plain = GEM(backbone, "plain")(pixels)
    expected = _hf_project(backbone, _hf_hidden_states(backbone, pixels)[-1])
    assert plain.shape == (2, 16, backbone.embed_dim)
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-8)  # fused attention vs transformers' eager one
    assert torch.equal(GEM(backbone, "gem", depth=1)(pixels), plain)


@pytest.mark.parametrize(("depth", "iterations", "temperature"), [(3, 1, None), (5, 2, None), (2, 1, 0.3)])
def test_gem_equals_a_direct_head_by_head_computation(backbone, depth, iterations, temperature):
    pixels = _pixels(backbone, seed=1, count=2)
    gem = GEM(backbone, "gem", depth=depth, iterations=iterations, temperature=temperature)(pixels)
    expected = _direct_pathway(backbone, pixels, depth, "gem", iterations, temperature)
    torch.testing.assert_close(gem, expected, rtol=0, atol=1e-8)  # the original stream runs fused attention
    assert not torch.allclose(gem, GEM(backbone, "plain")(pixels), atol=1e-3)


@pytest.mark.parametrize("temperature", [None, 0.5])
def test_clipsurgery_equals_a_direct_value_value_computation(backbone, temperature):
    pixels = _pixels(backbone, seed=2, count=2)
    surgery = GEM(backbone, "clipsurgery", depth=4, temperature=temperature)(pixels)
    expected = _direct_pathway(backbone, pixels, 4, "clipsurgery", temperature=temperature)
    torch.testing.assert_close(surgery, expected, rtol=0, atol=1e-8)  # the original stream runs fused attention


def test_maskclip_is_the_last_blocks_value_path(backbone):
    pixels = _pixels(backbone, seed=3, count=2)
    layer = backbone.vision.encoder.layers[-1]
    x = _hf_hidden_states(backbone, pixels)[-2]  # input of the last block
    tokens = _linear(layer.self_attn.out_proj, _linear(layer.self_attn.v_proj, _ln(layer.layer_norm1, x)))
    torch.testing.assert_close(GEM(backbone, "maskclip")(pixels), _hf_project(backbone, tokens), rtol=0, atol=1e-8)


# -- maps ------------------------------------------------------------------------------------------------
def test_non_square_maps_are_batched_per_image_and_on_the_patch_grid(backbone):
    pixels = _pixels(backbone, seed=4, count=2, size=(64, 96))
    text = torch.randn(3, backbone.embed_dim, dtype=torch.float64)
    maps = similarity_maps(backbone, pixels, text, depth=3)
    assert maps.shape == (2, 3, 64, 96)
    for b in range(2):
        torch.testing.assert_close(maps[b:b + 1], similarity_maps(backbone, pixels[b:b + 1], text, depth=3),
                                   rtol=0, atol=1e-12)
    # at the grid size the upsampling is the identity: row-major cosines of the patch embeddings
    grid = similarity_maps(backbone, pixels, text, depth=3, output_size=(4, 6))
    patches = GEM(backbone, depth=3)(pixels)
    cosines = F.cosine_similarity(patches[:, None, :, :], text[None, :, None, :], dim=-1)  # (B, C, N)
    torch.testing.assert_close(grid, cosines.reshape(2, 3, 4, 6), rtol=0, atol=1e-12)
    assert grid.abs().max() <= 1 + 1e-12
    # bilinear with half-pixel centres: the cell centre (0, 0) sits at pixel 7.5, so the corner 8x8 pixels
    # are clamped to it, and the map varies from pixel 8 on (no nearest / align_corners upsampling)
    corner = maps[:, :, :8, :8]
    torch.testing.assert_close(corner, grid[:, :, :1, :1].expand_as(corner), rtol=0, atol=1e-12)
    weight = 0.5 / 16
    torch.testing.assert_close(maps[:, :, 0, 8], (1 - weight) * grid[:, :, 0, 0] + weight * grid[:, :, 0, 1],
                               rtol=0, atol=1e-12)


def test_class_text_embeddings_are_unit_prompts(backbone):
    embeddings = class_text_embeddings(backbone, ["cat", "dog"])
    expected = backbone.encode_text(["a photo of a cat.", "a photo of a dog."])
    torch.testing.assert_close(embeddings, expected / expected.norm(dim=-1, keepdim=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2, dtype=embeddings.dtype))


# -- errors ----------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(backbone):
    text = torch.randn(2, backbone.embed_dim, dtype=torch.float64)
    with pytest.raises(ValueError, match="^image 64x90 is not a multiple of the patch size 16$"):
        similarity_maps(backbone, _pixels(backbone, size=(64, 90)), text, depth=2)
    with pytest.raises(ValueError, match=r"^depth=7 would modify 6 blocks of a vision tower of 4: use 1 <= depth <= 5$"):
        GEM(backbone)
    with pytest.raises(ValueError, match=r"^method='gradcam' is not one of \('gem', 'clipsurgery', 'maskclip', 'plain', "
                                         r"'sclip', 'clearclip', 'naclip'\)$"):
        GEM(backbone, "gradcam", depth=2)
    with pytest.raises(ValueError, match=r"^temperature=0 must be > 0 \(or None for the adaptive one\)$"):
        GEM(backbone, depth=2, temperature=0)
    with pytest.raises(ValueError, match=r"^text must be \(C, 32\) embeddings, got \(2, 5\)$"):
        similarity_maps(backbone, _pixels(backbone), torch.randn(2, 5, dtype=torch.float64), depth=2)
    with pytest.raises(TypeError, match="^class_names must be a list of strings, not one string$"):
        class_text_embeddings(backbone, "cat")


@pytest.mark.parametrize("iterations", [0, 1, 2])
def test_fused_self_self_output_equals_the_map_times_the_values(iterations):
    """self_self_output never forms the T x T map; it equals self_self_attention(...) @ value."""
    from grounding.models.gem import self_self_output

    generator = torch.Generator().manual_seed(iterations)
    stream = torch.randn(2, 3, 10, 4, generator=generator, dtype=torch.float64)
    value = torch.randn(2, 3, 10, 4, generator=generator, dtype=torch.float64)
    beta = torch.tensor([1.5, 4.0], dtype=torch.float64)
    expected = torch.matmul(self_self_attention(stream, beta, iterations), value)
    torch.testing.assert_close(self_self_output(stream, value, beta, iterations), expected, rtol=0, atol=1e-12)


def test_resize_to_short_side_keeps_the_aspect_with_patch_multiples():
    backbone = build_clip("tiny")
    patch = backbone.patch_size
    pixels = resize_to_short_side(backbone, torch.zeros(3, 50, 120, dtype=torch.uint8), 64)
    assert pixels.shape[-2] == 64 and pixels.shape[-1] == round(120 * 64 / 50 / patch) * patch
    # a black image is (0 - mean) / std in every channel
    torch.testing.assert_close(pixels[0, :, 0, 0], (-backbone.mean / backbone.std).flatten())


def test_window_starts_cover_the_side_with_the_last_window_flush():
    assert window_starts(64, 64, 32) == [0]
    assert window_starts(96, 64, 32) == [0, 32]
    assert window_starts(100, 64, 32) == [0, 32, 36]


def test_sliding_windows_average_the_windows_maps():
    """With one window covering the image the result is the whole-image map; with two overlapping windows a
    pixel seen by one window only carries that window's map, one seen by both the mean."""
    backbone = build_clip("tiny")
    text = class_text_embeddings(backbone, ["background", "red circle", "blue square"])
    settings = {"depth": 3, "iterations": 1, "temperature": None}
    pixels = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    out = sliding_window_maps(backbone, pixels, text, "gem", 64, 32, **settings)
    left = similarity_maps(backbone, pixels[..., :, 0:64], text, "gem", **settings)[0]
    right = similarity_maps(backbone, pixels[..., :, 32:96], text, "gem", **settings)[0]
    torch.testing.assert_close(out[..., :32], left[..., :32])
    torch.testing.assert_close(out[..., 64:], right[..., 32:])
    torch.testing.assert_close(out[..., 32:64], (left[..., 32:] + right[..., :32]) / 2)
    square = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sliding_window_maps(backbone, square, text, "gem", 64, 32, **settings),
                               similarity_maps(backbone, square, text, "gem", **settings)[0])


def test_dense_similarity_is_the_resized_map_brought_back_to_the_image_size():
    """An image of any size: resized to its short side, mapped, upsampled back; names or embeddings alike."""
    backbone = build_clip("tiny")
    names = ["red circle", "blue square"]
    dense = DenseSimilarity(backbone, "gem", depth=3, short_side=64)
    image = (torch.rand(3, 50, 77, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    maps = dense(image, names)
    pixels = resize_to_short_side(backbone, image, 64)
    resized = similarity_maps(backbone, pixels, class_text_embeddings(backbone, names), "gem", depth=3)  # (1, C, 64, 96)
    expected = F.interpolate(resized, size=(50, 77), mode="bilinear", align_corners=False)[0]
    assert maps.shape == (2, 50, 77)
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(dense(image, dense.text(names)), maps)
    with pytest.raises(ValueError, match=r"image must be \(3, H, W\), got \(50, 77\)"):
        dense(image[0], names)


@pytest.mark.parametrize("method, settings", [("gem", {"depth": 3}), ("clipsurgery", {"depth": 3, "feature_surgery": True}),
                                              ("naclip", {"pamr": True, "pamr_iterations": 2})])
def test_many_images_are_each_images_own_maps(method, settings):
    """Images of one resized shape run as one batch: every image's maps are still its own (GEM's temperature,
    the surgery's image embedding and PAMR per image); a differently shaped image runs apart."""
    backbone = build_clip("tiny").double()
    dense = DenseSimilarity(backbone, method, short_side=32, **settings)
    generator = torch.Generator().manual_seed(5)
    images = [(torch.rand(3, *size, generator=generator) * 255).to(torch.uint8)
              for size in ((40, 56), (48, 40), (40, 56), (40, 57))]  # 1st, 3rd and 4th: one resized shape
    text = dense.text(["red circle", "blue square", "sky"])
    together = dense.many(images, text)
    assert [tuple(m.shape) for m in together] == [(3, *image.shape[-2:]) for image in images]
    for image, maps in zip(images, together):
        torch.testing.assert_close(maps, dense(image, text), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(together[0], together[2])  # distinct images, distinct maps: the check can fail
    with pytest.raises(ValueError, match=r"image must be \(3, H, W\), got \(40, 56\)"):
        dense.many([images[0][0]], text)


def test_labels_with_background_follow_the_softmax_confidence():
    maps = torch.tensor([[[0.30, 0.201, 0.10]], [[0.10, 0.200, 0.30]]])  # (C_fg=2, 1, 3)
    assert labels_with_background(maps, [1, 2], 0).flatten().tolist() == [1, 0, 2]
    assert labels_with_background(maps, [0, 1], None).flatten().tolist() == [0, 0, 1]


# -- SCLIP, ClearCLIP, NACLIP: the last block against explicit softmax(...) @ v per head ----------------------
def _heads(t, heads):
    """(B, T, d) -> list of h (B, T, d/h) column blocks."""
    return list(t.chunk(heads, dim=-1))


def _softmax_rows(logits):
    exps = torch.exp(logits - logits.amax(-1, keepdim=True))
    return exps / exps.sum(-1, keepdim=True)


def _loop_gaussian(grid, std):
    """NACLIP's ω token by token: 0 for the class token, exp(-d² / 2σ²) between patches (row-major grid)."""
    positions = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    omega = torch.zeros(1 + len(positions), 1 + len(positions), dtype=torch.float64)
    for i, (r1, c1) in enumerate(positions):
        for j, (r2, c2) in enumerate(positions):
            omega[1 + i, 1 + j] = math.exp(-((r1 - r2) ** 2 + (c1 - c2) ** 2) / (2 * std ** 2))
    return omega


def _explicit_last_block(layer, x, method, grid=None):
    """The method's last block from the raw weights: explicit matmul + softmax, head by head."""
    attn = layer.self_attn
    heads, scale = attn.num_heads, attn.scale
    z = _ln(layer.layer_norm1, x)
    q, k, v = (_heads(_linear(proj, z), heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    outs = []
    for h in range(heads):
        if method == "sclip":
            maps = _softmax_rows(scale * q[h] @ q[h].transpose(-1, -2)) + _softmax_rows(scale * k[h] @ k[h].transpose(-1, -2))
        elif method == "clearclip":
            maps = _softmax_rows(scale * q[h] @ q[h].transpose(-1, -2))
        else:
            maps = _softmax_rows(scale * k[h] @ k[h].transpose(-1, -2) + _loop_gaussian(grid, 5.0))
        outs.append(maps @ v[h])
    attended = _linear(attn.out_proj, torch.cat(outs, dim=-1))
    if method != "sclip":
        return attended  # no residual, no MLP
    mid = x + attended
    mlp = layer.mlp
    return mid + _linear(mlp.fc2, mlp.activation_fn(_linear(mlp.fc1, _ln(layer.layer_norm2, mid))))


def _last_block_function(method, layer, x, grid):
    if method == "sclip":
        return sclip_block(layer, x)
    if method == "clearclip":
        return clearclip_tokens(layer, x)
    return naclip_tokens(layer, x, grid)


@pytest.mark.parametrize("method", ["sclip", "clearclip", "naclip"])
def test_last_block_functions_equal_explicit_softmaxes_on_random_tokens(backbone, method):
    layer = backbone.vision.encoder.layers[-1]
    x = torch.randn(2, 1 + 2 * 3, backbone.vision.config.hidden_size, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64)  # a 2x3 grid: rows and columns do not commute
    out = _last_block_function(method, layer, x, (2, 3))
    assert out.shape == x.shape
    torch.testing.assert_close(out, _explicit_last_block(layer, x, method, (2, 3)), rtol=0, atol=1e-10)
    # not CLIP's own block: the replacement changes the tokens
    assert not torch.allclose(out, block_output(layer, x, *block_projections(layer, x)[1:]), atol=1e-3)


def test_naclip_neighbourhoods_follow_the_grid_it_is_given(backbone):
    layer = backbone.vision.encoder.layers[-1]
    x = torch.randn(1, 7, backbone.vision.config.hidden_size, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    # a 3x2 grid reads the same 7 tokens with other neighbourhoods
    assert not torch.allclose(naclip_tokens(layer, x, (2, 3)), naclip_tokens(layer, x, (3, 2)), atol=1e-6)
    with pytest.raises(ValueError, match=r"^a 2x2 patch grid has 5 tokens, x has 7$"):
        naclip_tokens(layer, x, (2, 2))


@pytest.mark.parametrize("method", ["sclip", "clearclip", "naclip"])
def test_last_block_methods_run_the_function_on_the_last_blocks_input(backbone, method):
    pixels = _pixels(backbone, seed=5, count=2, size=(64, 48))
    hidden = _hf_hidden_states_any_size(backbone, pixels)
    layer = backbone.vision.encoder.layers[-1]
    expected = _hf_project(backbone, _explicit_last_block(layer, hidden, method, (4, 3)))
    torch.testing.assert_close(GEM(backbone, method)(pixels), expected, rtol=0, atol=1e-8)


def _hf_hidden_states_any_size(backbone, pixels):
    """The input of the last block by transformers' own layers (our embedding: the grid may differ from native)."""
    with torch.no_grad():
        return backbone.run_blocks(backbone.embed(pixels), 0, backbone.num_layers - 1)


# -- CLIPSurgery's feature surgery ---------------------------------------------------------------------------
def test_feature_surgery_equals_the_papers_elementwise_features():
    generator = torch.Generator().manual_seed(9)
    patches = F.normalize(torch.randn(2, 5, 8, generator=generator, dtype=torch.float64), dim=-1)  # (B, N, P)
    image = F.normalize(torch.randn(2, 8, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(3, 8, generator=generator, dtype=torch.float64), dim=-1)
    out = feature_surgery(torch.einsum("bnp,cp->bcn", patches, text), image @ text.T)  # (B, C, N)
    for b in range(2):
        logits = [2 * float(image[b] @ t) for t in text]
        exps = [math.exp(v) for v in logits]
        weights = [len(text) * e / sum(exps) for e in exps]  # softmax / its mean
        for n in range(5):
            features = [patches[b, n] * text[c] * weights[c] for c in range(3)]  # (P,) per class
            redundant = sum(features) / 3
            for c in range(3):
                assert float(out[b, c, n]) == pytest.approx(float((features[c] - redundant).sum()), abs=1e-12)
    with pytest.raises(ValueError, match="^feature_surgery needs at least 2 classes: with one, every map is 0$"):
        feature_surgery(out[:, :1], image @ text[:1].T)


def test_block_class_output_and_the_image_embedding_are_clips_own(backbone):
    layer = backbone.vision.encoder.layers[-1]
    x = torch.randn(2, 17, backbone.vision.config.hidden_size, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    torch.testing.assert_close(block_class_output(layer, x, *block_projections(layer, x)[1:]),
                               block_output(layer, x, *block_projections(layer, x)[1:])[:, 0], rtol=0, atol=1e-12)
    pixels = _pixels(backbone, seed=11, count=2)
    with torch.no_grad():
        expected = F.normalize(backbone.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    for depth in (1, 3):  # depth 1: the original stream ran every block already
        patches, image = GEM(backbone, "clipsurgery", depth=depth, feature_surgery=True).encode(pixels)
        torch.testing.assert_close(image, expected, rtol=0, atol=1e-8)
        assert torch.equal(patches, GEM(backbone, "clipsurgery", depth=depth)(pixels))


def test_similarity_maps_with_feature_surgery_are_the_surgery_of_the_cosines(backbone):
    pixels = _pixels(backbone, seed=12, count=2)
    text = torch.randn(3, backbone.embed_dim, dtype=torch.float64)
    cosines = similarity_maps(backbone, pixels, text, "clipsurgery", depth=3, output_size=(4, 4))
    surgery = similarity_maps(backbone, pixels, text, "clipsurgery", depth=3, output_size=(4, 4), feature_surgery=True)
    with torch.no_grad():
        image = F.normalize(backbone.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    weights = 3 * torch.softmax(2 * image @ F.normalize(text, dim=-1).T, dim=-1)[:, :, None, None]
    torch.testing.assert_close(surgery, weights * cosines - (weights * cosines).mean(1, keepdim=True), rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match=r"^feature_surgery is CLIPSurgery's: it needs method='clipsurgery', not 'gem'$"):
        GEM(backbone, "gem", depth=2, feature_surgery=True)


# -- PAMR in DenseSimilarity ----------------------------------------------------------------------------------
def test_dense_similarity_with_pamr_refines_the_maps_along_the_images_own_pixels():
    from grounding.models.pamr import pamr

    backbone = build_clip("tiny")
    names = ["red circle", "blue square"]
    image = (torch.rand(3, 40, 53, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    maps = DenseSimilarity(backbone, "naclip", short_side=32)(image, names)
    refined = DenseSimilarity(backbone, "naclip", short_side=32, pamr=True, pamr_iterations=2,
                              pamr_dilations=(1, 3))(image, names)
    guide = (image.float() / 255 - backbone.mean.reshape(3, 1, 1)) / backbone.std.reshape(3, 1, 1)
    torch.testing.assert_close(refined, pamr(guide[None], maps[None], 2, (1, 3))[0])
    assert refined.shape == maps.shape and not torch.allclose(refined, maps, atol=1e-4)
    with pytest.raises(ValueError, match=r"^pamr_iterations=0 must be an integer >= 1$"):
        DenseSimilarity(backbone, "naclip", pamr=True, pamr_iterations=0)
    with pytest.raises(ValueError, match=r"^pamr_dilations=\[\] must be a non-empty list of positive integers$"):
        DenseSimilarity(backbone, "naclip", pamr=True, pamr_dilations=[])


# -- templates, synonyms and SCLIP's background rule -------------------------------------------------------------
def test_class_embeddings_average_the_templates_of_each_synonym(backbone):
    """Each name: the normalized mean over the templates of the normalized sentence embeddings (CLIP's ensembling)."""
    from grounding.models.gem import synonym_classes

    classes, templates = ["cat", ["dog", "puppy"]], ["a photo of a {}.", "a drawing of the {}!", "{}"]
    embeddings = class_text_embeddings(backbone, classes, templates)
    sentences = {(name, template): template.replace("{}", name) for name in ["cat", "dog", "puppy"] for template in templates}
    encoded = dict(zip(sentences, backbone.encode_text(list(sentences.values()))))  # one call: the tokenizer is slow
    expected = []
    for name in ["cat", "dog", "puppy"]:
        total = torch.zeros(backbone.embed_dim, dtype=torch.float64)
        for template in templates:
            total += _unit(encoded[name, template])
        expected.append(_unit(total / len(templates)))
    torch.testing.assert_close(embeddings, torch.stack(expected), rtol=0, atol=1e-12)
    assert synonym_classes(classes) == [0, 1, 1]
    one = class_text_embeddings(backbone, ["cat"], "a photo of a {}.")  # one template: its sentence, normalized
    torch.testing.assert_close(one[0], _unit(backbone.encode_text(["a photo of a cat."])[0]), rtol=0, atol=1e-12)


def test_dense_maps_of_a_class_are_the_maximum_over_its_synonyms(backbone):
    dense = DenseSimilarity(backbone, "maskclip", short_side=32, templates=["a {}.", "the {}."])
    image = (torch.rand(3, 48, 70, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)
    per_name = dense(image, dense.text(["sky", "cat", "kitten", "dog"]))  # (4, 48, 70), one map per row
    maps = dense(image, ["sky", ["cat", "kitten"], "dog"])
    assert maps.shape == (3, 48, 70)
    for y, x in [(0, 0), (10, 33), (47, 69), (20, 5)]:
        assert maps[1, y, x] == max(per_name[1, y, x], per_name[2, y, x])
        assert maps[0, y, x] == per_name[0, y, x] and maps[2, y, x] == per_name[3, y, x]


def _loop_sclip_labels(maps, owners, logit_scale, background, threshold, area_threshold):
    """SCLIP's post-processing pixel by pixel in Python floats: softmax over every name, the maximum per class,
    classes of small arg-max area dropped, the arg-max, background below the threshold."""
    names, height, width = maps.shape
    classes = max(owners) + 1
    probabilities = {}
    for y in range(height):
        for x in range(width):
            row = _loop_softmax_row([logit_scale * float(maps[s, y, x]) for s in range(names)])
            probabilities[y, x] = [max(p for p, o in zip(row, owners) if o == c) for c in range(classes)]
    dropped = set()
    if area_threshold is not None:
        winners = [max(range(classes), key=lambda c: probabilities[pixel][c]) for pixel in probabilities]
        area = {c: winners.count(c) for c in range(classes) if c != background}
        dropped = {c for c, a in area.items() if a <= area_threshold * sum(area.values())}
    labels = torch.zeros(height, width, dtype=torch.long)
    for (y, x), probability in probabilities.items():
        kept = [0.0 if c in dropped else p for c, p in enumerate(probability)]
        best = max(range(classes), key=lambda c: kept[c])
        labels[y, x] = background if kept[best] < threshold else best
    return labels


@pytest.mark.parametrize("area_threshold", [None, 0.25])
def test_labels_from_probabilities_are_sclips_rule(area_threshold):
    from grounding.models.gem import class_probabilities, labels_from_probabilities

    owners = [0, 0, 1, 2, 2, 3]  # background with two words, a class with two synonyms
    maps = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.05
    maps[3:5, :2] += 0.05  # class 2 wins a small area only
    probabilities = class_probabilities(maps, owners, logit_scale=50.0)
    assert probabilities.shape == (4, 5, 7) and bool((probabilities <= 1).all())
    labels = labels_from_probabilities(probabilities, background=0, threshold=0.3, area_threshold=area_threshold)
    expected = _loop_sclip_labels(maps, owners, 50.0, 0, 0.3, area_threshold)
    assert torch.equal(labels, expected) and 0 < int((labels == 0).sum()) < 35
    assert torch.equal(labels_from_probabilities(probabilities), probabilities.argmax(0))  # no background: arg-max


def test_template_and_synonym_errors_are_named(backbone):
    from grounding.models.gem import max_over_synonyms

    with pytest.raises(ValueError, match=r"^templates: 'a photo' has no '\{\}' where the class name goes$"):
        DenseSimilarity(backbone, depth=3, templates=["a {}.", "a photo"])
    with pytest.raises(ValueError, match=r"^templates is empty"):
        class_text_embeddings(backbone, ["cat"], [])
    with pytest.raises(ValueError, match=r"^class 1 has no name or an empty one: \[\]$"):
        class_text_embeddings(backbone, ["cat", []])
    with pytest.raises(ValueError, match=r"^3 owners for 2 maps: one class index per map$"):
        max_over_synonyms(torch.zeros(2, 4), [0, 0, 1])
