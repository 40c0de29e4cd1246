"""open_clip CLIP models converted to transformers: against open_clip's own forward and modules, offline.

The models are small random open_clip CLIPs (no download) with every parameter perturbed, so that no bias,
LayerNorm or embedding conversion can pass by being zero or one.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, resize_pos_embed, set_model_preprocess_cfg  # noqa: E402

from grounding.models.clip import build_clip  # noqa: E402
from grounding.models.gem import METHODS, GEM, DenseSimilarity, similarity_maps  # noqa: E402
from grounding.models.legrad import legrad  # noqa: E402
from grounding.models.open_clip_convert import OpenClipTokenizer, convert_open_clip, open_clip_backbone  # noqa: E402

PROMPTS = ["a photo of a cat.", "a dog", "a photo of a red circle on the left " * 12]  # the last one is truncated


def _random_clip(quick_gelu: bool, image_size: int = 64, seed: int = 0, **vision) -> CLIP:
    """A small random open_clip CLIP (4 heads of 16, 3 image blocks, 2 text blocks) with perturbed parameters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(
            embed_dim=32,
            vision_cfg=CLIPVisionCfg(width=64, layers=3, head_width=16, patch_size=16, image_size=image_size, **vision),
            text_cfg=CLIPTextCfg(width=64, layers=2, heads=4, context_length=77, vocab_size=49408),
            quick_gelu=quick_gelu,
        )
        with torch.no_grad():
            for parameter in model.parameters():  # biases start at 0 and LayerNorms at 1: move them all
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")  # ships its BPE vocabulary: offline


@pytest.fixture(scope="module", params=[True, False], ids=["quickgelu", "gelu"])
def pair(request, tokenizer):
    model = _random_clip(quick_gelu=request.param)
    return model, open_clip_backbone(model, tokenizer, image_size=64)


def _pixels(size=64, count=2, seed=0, dtype=torch.float32):
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _tokens_in(model, pixels):
    """open_clip's image tokens entering block 0, from its own modules (conv1, class token, positions, ln_pre)."""
    visual = model.visual
    patches = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(patches.shape[0], 1, -1)
    return visual.ln_pre(torch.cat([cls, patches], dim=1) + visual.positional_embedding)


def _unit_patches(model, hidden):
    """(B, 1 + N, d) -> (B, N, P) open_clip's ln_post and proj on the patch tokens, normalized."""
    return F.normalize(model.visual.ln_post(hidden[:, 1:]) @ model.visual.proj, dim=-1)


def _maps(model, patches, text, size):
    """Cosine maps (B, C, size, size) of unit patches on their square grid, upsampled bilinearly."""
    side = int(patches.shape[1] ** 0.5)
    scores = torch.einsum("bnp,cp->bcn", patches, F.normalize(text, dim=-1)).reshape(*patches.shape[:1], -1, side, side)
    return F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False)


def test_every_vision_block_equals_open_clips_resblocks(pair):
    model, backbone = pair
    outputs = []
    hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out))
             for block in model.visual.transformer.resblocks]
    pixels = _pixels()
    with torch.no_grad():
        model.encode_image(pixels)
        tokens = backbone.embed(pixels)
        torch.testing.assert_close(tokens, _tokens_in(model, pixels), rtol=0, atol=1e-5)
        for index, expected in enumerate(outputs):
            tokens = backbone.run_blocks(tokens, index, index + 1)
            torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)
    for hook in hooks:
        hook.remove()
    assert len(outputs) == backbone.num_layers == 3
    quick = type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert backbone.model.config.vision_config.hidden_act == ("quick_gelu" if quick else "gelu")


def test_encode_image_and_text_equal_open_clip(pair, tokenizer):
    model, backbone = pair
    pixels = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image(pixels), model.encode_image(pixels), rtol=0, atol=1e-5)
        torch.testing.assert_close(backbone.encode_text(PROMPTS), model.encode_text(tokenizer(PROMPTS)),
                                   rtol=0, atol=1e-5)
    # padding drops only the columns that are zero in every row; the mask ends at each text's last token
    raw = tokenizer(PROMPTS[:2])
    lengths = [int((row != 0).sum()) for row in raw]
    batch = OpenClipTokenizer(tokenizer)(PROMPTS[:2], padding=True, truncation=True, max_length=77)
    assert torch.equal(batch["input_ids"], raw[:, :max(lengths)])
    assert batch["attention_mask"].sum(1).tolist() == lengths


def test_plain_and_maskclip_maps_equal_open_clip_computations(pair, tokenizer):
    model, backbone = pair
    pixels = _pixels()
    blocks = model.visual.transformer.resblocks
    with torch.no_grad():
        text = model.encode_text(tokenizer(PROMPTS))
        before_last = _tokens_in(model, pixels)
        for block in blocks[:-1]:
            before_last = block(before_last)
        last = blocks[-1]
        v_weight, v_bias = last.attn.in_proj_weight.chunk(3)[2], last.attn.in_proj_bias.chunk(3)[2]
        value = F.linear(last.ln_1(before_last), v_weight, v_bias)
        expected = {
            "plain": _unit_patches(model, last(before_last)),
            "maskclip": _unit_patches(model, last.attn.out_proj(value)),  # value path only: no mixing, residual, MLP
        }
        for method, patches in expected.items():
            torch.testing.assert_close(GEM(backbone, method)(pixels), patches, rtol=0, atol=1e-5)
            maps = similarity_maps(backbone, pixels, backbone.encode_text(PROMPTS), method)
            torch.testing.assert_close(maps, _maps(model, patches, text, 64), rtol=0, atol=1e-5)


def test_every_method_gives_finite_maps(pair):
    _, backbone = pair
    pixels = _pixels(count=1)
    with torch.no_grad():
        text = backbone.encode_text(PROMPTS[:2])
        for method in METHODS:
            maps = similarity_maps(backbone, pixels, text, method, depth=backbone.num_layers)
            assert maps.shape == (1, 2, 64, 64), method
            assert torch.isfinite(maps).all(), method


def _gem_torch_reference(model, tokenizer, depth: int, iterations: int, inverse_temperature: float | None):
    """The public GEM code (gem_torch's ``GEMWrapper``) around a copy of ``model``.

    gem_torch 1.0.1 hands the blocks sequence-first (L, N, D) tokens, as open_clip's blocks took them when it was
    written; open_clip's blocks are batch-first now, so the blocks it leaves unmodified get their attention set
    back to sequence-first, which is what the reference computed then."""
    from gem.gem_wrapper import GEMWrapper

    wrapper = GEMWrapper(copy.deepcopy(model), tokenizer, depth=depth, ss_attn_iter=iterations,
                         ss_attn_temp=inverse_temperature).eval()
    for block in wrapper.model.visual.transformer.resblocks:
        if isinstance(getattr(block, "attn", None), torch.nn.MultiheadAttention):
            block.attn.batch_first = False
    return wrapper


@pytest.mark.parametrize("depth, iterations, temperature", [(3, 1, None), (2, 2, None), (4, 1, 0.5), (3, 0, None)])
def test_gem_maps_equal_the_public_gem_code_on_the_same_weights(tokenizer, depth, iterations, temperature):
    """DenseSimilarity's GEM cosine maps equal gem_torch's (``normalize=False``: before its min-max scaling) on
    a square image at a size that resamples the position grid. gem_torch's ``ss_attn_temp`` is the inverse
    temperature, GEM's ``temperature`` the temperature; its class sentence is ``GEM_TEMPLATE``."""
    pytest.importorskip("gem.gem_wrapper")  # gem_torch
    model = _random_clip(quick_gelu=False)
    backbone = open_clip_backbone(model, tokenizer, image_size=96)
    gem = DenseSimilarity(backbone, "gem", depth=depth, iterations=iterations, temperature=temperature, short_side=96)
    reference = _gem_torch_reference(model, tokenizer, depth, iterations, None if temperature is None else 1 / temperature)
    names = ["cat", "red circle", "dog"]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (open_clip.constants.OPENAI_DATASET_MEAN, open_clip.constants.OPENAI_DATASET_STD))
    for seed in (0, 1):
        image = torch.randint(0, 256, (3, 96, 96), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
        with torch.no_grad():
            expected = reference(((image.float() / 255 - mean) / std)[None], names, normalize=False)[0]
        got = gem(image, names)
        assert expected.shape == got.shape == (3, 96, 96)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    # the reference's GEM path differs from its own plain path: the comparison is not of two plain CLIPs
    with torch.no_grad():
        plain = DenseSimilarity(backbone, "plain", short_side=96)(image, names)
    assert (plain - expected).abs().max() > 1e-3


def test_legrad_equals_a_direct_autograd_on_open_clip_modules(tokenizer):
    model = _random_clip(quick_gelu=True)
    backbone = open_clip_backbone(model, tokenizer, image_size=64).double()
    model = model.double()
    pixels = _pixels(count=1, dtype=torch.float64)
    queries = F.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=-1)
    # LeGrad of the last block, written with open_clip's tensors: d(e · f)/dA, ReLU, mean over heads and rows
    blocks, visual = model.visual.transformer.resblocks, model.visual
    with torch.no_grad():
        x = _tokens_in(model, pixels)
        for block in blocks[:-1]:
            x = block(x)
    last, heads, head_dim, grid = blocks[-1], 4, 16, (4, 4)  # _random_clip's sizes at 64 px
    query, key, value = (t.view(1, -1, heads, head_dim).transpose(1, 2)
                         for t in F.linear(last.ln_1(x), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, -1))
    expected = []
    for e in queries:
        attention = torch.softmax(query @ key.transpose(-1, -2) / head_dim ** 0.5, dim=-1).detach().requires_grad_(True)
        mid = x + last.attn.out_proj((attention @ value).transpose(1, 2).reshape(1, -1, heads * head_dim))
        out = mid + last.mlp(last.ln_2(mid))
        score = e @ F.normalize(visual.ln_post(out.mean(1)) @ visual.proj, dim=-1)[0]
        (grad,) = torch.autograd.grad(score, attention)
        relevance = F.relu(grad).mean(dim=(1, 2))[0, 1:].reshape(1, 1, *grid)
        up = F.interpolate(relevance, scale_factor=16, mode="bilinear", align_corners=False)[0, 0]
        expected.append((up - up.min()) / (up.max() - up.min()))
    got = legrad(backbone, pixels, queries, layers=(-1,))
    torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=1e-8)


@pytest.mark.parametrize("size", [48, 96])
def test_position_embeddings_resampled_like_open_clip(tokenizer, size):
    """A backbone at another size equals open_clip's model at that size loaded with open_clip's own resampling."""
    model = _random_clip(quick_gelu=False)
    backbone = open_clip_backbone(model, tokenizer, image_size=size)
    resized = _random_clip(quick_gelu=False, image_size=size, seed=1)
    state = model.state_dict()
    resize_pos_embed(state, resized)  # bicubic, antialiased, the class position kept
    resized.load_state_dict(state)
    pixels = _pixels(size=size)
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image(pixels), resized.encode_image(pixels), rtol=0, atol=1e-5)


def test_image_statistics_come_from_the_preprocessing_config(tokenizer):
    model = _random_clip(quick_gelu=False)
    mean, std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
    set_model_preprocess_cfg(model, {"size": 64, "mean": mean, "std": std, "interpolation": "bicubic",
                                     "resize_mode": "shortest"})
    backbone = open_clip_backbone(model, tokenizer, image_size=64)
    assert backbone.mean.flatten().tolist() == pytest.approx(mean)
    assert backbone.std.flatten().tolist() == pytest.approx(std)


@pytest.mark.parametrize("setting, message", [
    ("open_clip:NoSuchModel/x", "open_clip has no model 'NoSuchModel'"),
    ("open_clip:ViT-B-16/no_such_tag", "'no_such_tag' is neither a pretrained tag of open_clip's ViT-B-16"),
    ("open_clip:ViT-B-16", "names no pretrained weights"),
    ("open_clip:RN50/openai", "'open_clip:RN50/openai' cannot run .*image tower is a ModifiedResNet"),
    ("open_clip:coca_ViT-B-32/laion2b_s13b_b90k", "'open_clip:coca_ViT-B-32/laion2b_s13b_b90k' cannot run .*CoCa"),
    ("open_clip:ViT-B-16-SigLIP/webli", "'open_clip:ViT-B-16-SigLIP/webli' cannot run .*CustomTextCLIP"),
])
def test_bad_or_unsupported_settings_fail_before_any_download(setting, message):
    with pytest.raises(ValueError, match=message):
        build_clip(setting)


def test_layer_scale_and_average_pooling_are_refused_by_name():
    with pytest.raises(ValueError, match="'layer-scaled' cannot run .*layer scale"):
        convert_open_clip(_random_clip(quick_gelu=False, ls_init_value=0.1), "layer-scaled")
    with pytest.raises(ValueError, match="'averaged' cannot run .*pools by 'avg'"):
        convert_open_clip(_random_clip(quick_gelu=False, pool_type="avg"), "averaged")
