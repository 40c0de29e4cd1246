"""Stable Diffusion wrapper: attention capture against diffusers' fused pass and its own scores, prompts, images."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from grounding.models.stable_diffusion import (
    CapturingAttnProcessor,
    build_stable_diffusion,
    capture_attention,
    category_prompt,
)

LATENT = (16, 16)  # the tiny UNet's levels: 16x16, 8x8, 4x4 (mid block)


@pytest.fixture(scope="module")
def sd():
    return build_stable_diffusion("tiny")


def _inputs(sd, batch=2, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, *LATENT, generator=generator, dtype=dtype)
    embeddings = 3 * torch.randn(1, sd.max_tokens, 32, generator=generator, dtype=dtype)  # peakier than 1x
    return latents, embeddings.expand(batch, -1, -1)


def _layer_sequence_lengths(sd, latents, embeddings):
    """Processor name -> number of query positions the layer sees, recorded by hooks in a plain pass."""
    lengths, handles = {}, []
    for name, module in sd.unet.named_modules():
        if isinstance(module, Attention):
            def record(module, args, kwargs, name=name):
                hidden = args[0] if args else kwargs["hidden_states"]
                lengths[f"{name}.processor"] = hidden.shape[1]
            handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            sd.unet(latents, 10, encoder_hidden_states=embeddings)
    finally:
        for handle in handles:
            handle.remove()
    return lengths


def test_capture_leaves_the_unet_output_unchanged(sd):
    latents, embeddings = _inputs(sd)
    with torch.no_grad():
        plain = sd.unet(latents, 10, encoder_hidden_states=embeddings).sample
        with capture_attention(sd.unet, LATENT, "all") as capture:
            captured = sd.unet(latents, 10, encoder_hidden_states=embeddings).sample
    assert capture.calls == len(sd.unet.attn_processors)
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)
    # the output does depend on the attention: other prompt embeddings change it
    with torch.no_grad():
        other = sd.unet(latents, 10, encoder_hidden_states=2 * embeddings).sample
    assert (other - plain).abs().max() > 1e-3


def test_only_layers_of_the_chosen_resolution_capture_and_all_are_restored(sd):
    latents, embeddings = _inputs(sd)
    lengths = _layer_sequence_lengths(sd, latents, embeddings)
    expected = {name for name, length in lengths.items() if length == 8 * 8}
    assert expected and len(expected) < len(lengths)
    before = sd.unet.attn_processors
    with capture_attention(sd.unet, LATENT, (8,)):
        installed = sd.unet.attn_processors
        capturing = {name for name, processor in installed.items() if isinstance(processor, CapturingAttnProcessor)}
        assert capturing == expected
        assert all(isinstance(installed[name], AttnProcessor2_0) for name in set(installed) - expected)
    after = sd.unet.attn_processors
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)


def test_processors_are_restored_after_an_exception(sd):
    latents, embeddings = _inputs(sd)
    before = sd.unet.attn_processors
    with pytest.raises(RuntimeError):
        # a text width the cross-attention projections cannot take fails inside the captured pass
        sd.attention_maps(latents, 10, torch.zeros(2, sd.max_tokens, 5), resolutions="all")
    with pytest.raises(KeyError):
        with capture_attention(sd.unet, LATENT, (16,)):
            raise KeyError("boom")
    after = sd.unet.attn_processors
    assert all(after[name] is before[name] for name in before)


def test_captured_maps_equal_diffusers_attention_scores(sd):
    latents, embeddings = _inputs(sd)
    lengths = _layer_sequence_lengths(sd, latents, embeddings)
    layers = [name.removesuffix(".processor") for name, length in lengths.items() if length == 8 * 8]
    recorded, handles = {}, []
    for name in layers:
        attn = sd.unet.get_submodule(name)
        for projection in ("to_q", "to_k"):
            def keep(module, args, output, key=(name, projection)):
                recorded[key] = output
            handles.append(getattr(attn, projection).register_forward_hook(keep))
    try:
        with torch.no_grad():
            maps = sd.attention_maps(latents, 10, embeddings, resolutions=(8,), stop_early=False)
    finally:
        for handle in handles:
            handle.remove()
    expected = {"attn1": [], "attn2": []}
    for name in layers:
        attn = sd.unet.get_submodule(name)
        query, key = attn.head_to_batch_dim(recorded[name, "to_q"]), attn.head_to_batch_dim(recorded[name, "to_k"])
        scores = attn.get_attention_scores(query, key)  # (B*h, N, S), diffusers' own softmax(QKᵀ·scale)
        expected[name.rsplit(".", 1)[1]].append(scores.view(2, attn.heads, *scores.shape[1:]).mean(1))
    assert set(maps) == {8}
    torch.testing.assert_close(maps[8].self_attention, torch.stack(expected["attn1"]).mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(maps[8].cross_attention, torch.stack(expected["attn2"]).mean(0), rtol=1e-5, atol=1e-7)
    assert maps[8].self_attention.shape == (2, 64, 64) and maps[8].cross_attention.shape == (2, 64, sd.max_tokens)
    for matrix in maps[8]:
        torch.testing.assert_close(matrix.sum(-1), torch.ones(matrix.shape[:-1]))


def test_stop_early_skips_the_rest_of_the_unet_and_gives_the_same_maps(sd):
    latents, embeddings = _inputs(sd)
    calls = []
    handle = sd.unet.conv_out.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            early = sd.attention_maps(latents, 10, embeddings, resolutions=(8,), stop_early=True)
            assert not calls
            full = sd.attention_maps(latents, 10, embeddings, resolutions=(8,), stop_early=False)
            assert calls
    finally:
        handle.remove()
    torch.testing.assert_close(early[8], full[8], rtol=0, atol=0)


def test_all_resolutions_capture_every_level(sd):
    latents, embeddings = _inputs(sd)
    with torch.no_grad():
        maps = sd.attention_maps(latents, 10, embeddings[:1], resolutions="all")  # (1, K, D) broadcasts
    assert {side: tuple(m.self_attention.shape) for side, m in maps.items()} == {
        16: (2, 256, 256), 8: (2, 64, 64), 4: (2, 16, 16)
    }


def test_unknown_resolution_is_an_error(sd):
    latents, embeddings = _inputs(sd)
    with pytest.raises(ValueError, match=r"^no attention layer at resolution\(s\) \[32\] for 16x16 latents; "
                                         r"available: \[4, 8, 16\]$"):
        sd.attention_maps(latents, 10, embeddings, resolutions=(32, 8))


def test_gradient_of_cross_maps_reaches_embeddings_and_matches_finite_differences():
    model = build_stable_diffusion("tiny", dtype=torch.float64)
    latents, embeddings = _inputs(model, batch=1, dtype=torch.float64)
    embeddings = embeddings.clone().requires_grad_(True)
    position, coordinate = 3, 5

    def objective(values):
        maps = model.attention_maps(latents, 10, values, resolutions=(8,))
        return maps[8].cross_attention[..., position].sum() + (maps[8].self_attention ** 2).sum()

    (gradient,) = torch.autograd.grad(objective(embeddings), embeddings)
    assert gradient[0, position].abs().sum() > 0
    step = 1e-6
    with torch.no_grad():
        plus, minus = embeddings.detach().clone(), embeddings.detach().clone()
        plus[0, position, coordinate] += step
        minus[0, position, coordinate] -= step
        numeric = (objective(plus) - objective(minus)) / (2 * step)
    torch.testing.assert_close(gradient[0, position, coordinate], numeric, rtol=1e-5, atol=1e-9)


def test_bf16_autocast_keeps_float32_maps(sd):
    latents, embeddings = _inputs(sd)
    with torch.no_grad():
        reference = sd.attention_maps(latents, 10, embeddings, resolutions=(8,))[8]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = sd.attention_maps(latents, 10, embeddings, resolutions=(8,))[8]
    assert mixed.cross_attention.dtype == torch.float32
    torch.testing.assert_close(mixed.cross_attention.sum(-1), torch.ones(2, 64))
    torch.testing.assert_close(mixed.cross_attention, reference.cross_attention, rtol=0.05, atol=2e-3)


def test_category_token_positions_follow_the_tokens_of_each_name(sd):
    names = ["background", "cat", "dining table"]
    positions = sd.category_token_positions(names)
    # independently: tokenize each name and the separator alone, and lay them out after the start token
    pieces = [sd.tokenizer(name, add_special_tokens=False).input_ids for name in names]
    separator = sd.tokenizer(",", add_special_tokens=False).input_ids
    assert len(pieces[0]) == 1 and len(pieces[1]) > 1  # one single-token and one multi-token name
    expected, cursor = [], 1
    for piece in pieces:
        expected.append(list(range(cursor, cursor + len(piece))))
        cursor += len(piece) + len(separator)
    assert positions == expected
    _, ids = sd.encode_prompt([category_prompt(names)])
    for piece, found in zip(pieces, positions):
        assert ids[0, found].tolist() == piece


def test_category_errors_have_clear_messages(sd):
    with pytest.raises(ValueError, match=r"^category ' ' gives no token; give it a non-empty name$"):
        sd.category_token_positions(["background", " ", "cat"])
    with pytest.raises(ValueError, match=r"^categories is empty"):
        sd.category_token_positions([])
    names = ["background"] * 80
    prompt = category_prompt(names)
    count = 1 + 80 + 79 + 1  # start, one token per name, one per separator, end
    message = f"prompt {prompt!r} has {count} tokens with its start and end tokens; the text encoder takes at most 77"
    with pytest.raises(ValueError) as error:
        sd.category_token_positions(names)
    assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        sd.encode_prompt([prompt])
    assert str(error.value) == message


def test_encode_image_is_the_scaled_posterior_mean_and_checks_the_size(sd):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    latents = sd.encode_image(images)
    assert latents.shape == (2, 4, 16, 16)  # VAE factor 4
    with torch.no_grad():
        posterior = sd.vae.encode(images * 2 - 1).latent_dist
    torch.testing.assert_close(latents, posterior.mean * 0.18215)
    size_error = r"^image size 40x64 is not a multiple of 16 \(VAE factor 4 x UNet downsampling 4\)$"
    with pytest.raises(ValueError, match=size_error):
        sd.encode_image(torch.rand(1, 3, 40, 64))
    with pytest.raises(ValueError, match=r"^images must be in \[0, 1\]"):
        sd.encode_image(images * 255)


def test_noised_follows_the_scaled_linear_schedule(sd):
    latents = torch.randn(2, 4, 4, 4)
    noise = torch.randn(2, 4, 4, 4)
    steps = torch.tensor([0, 300])
    noisy = sd.noised(latents, steps, noise=noise)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    for row, step in enumerate(steps.tolist()):
        alpha_bar = math.prod(1 - beta for beta in betas[: step + 1].tolist())
        expected = alpha_bar ** 0.5 * latents[row] + (1 - alpha_bar) ** 0.5 * noise[row]
        torch.testing.assert_close(noisy[row], expected)
    seeded = [sd.noised(latents, 50, generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    torch.testing.assert_close(seeded[0], seeded[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^timesteps must be in \[0, 999\], got \[1000, 1000\]$"):
        sd.noised(latents, 1000)


def test_tiny_model_saves_and_reloads_with_identical_outputs(sd, tmp_path):
    sd.save_pretrained(tmp_path / "sd")
    reloaded = build_stable_diffusion(tmp_path / "sd")
    names = ["background", "cat"]
    assert reloaded.category_token_positions(names) == sd.category_token_positions(names)
    embeddings, ids = sd.encode_prompt([category_prompt(names)])
    embeddings_again, ids_again = reloaded.encode_prompt([category_prompt(names)])
    assert torch.equal(ids, ids_again)
    torch.testing.assert_close(embeddings_again, embeddings, rtol=0, atol=0)
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(reloaded.encode_image(images), sd.encode_image(images), rtol=0, atol=0)
    latents = sd.noised(sd.encode_image(images), 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = sd.attention_maps(latents, 20, embeddings, resolutions="all")
        second = reloaded.attention_maps(latents, 20, embeddings, resolutions="all")
    for side in first:
        torch.testing.assert_close(second[side], first[side], rtol=0, atol=0)
    # and the seeded random initialisation is reproducible
    again = build_stable_diffusion("tiny")
    assert all(torch.equal(a, b) for a, b in zip(again.unet.parameters(), sd.unet.parameters()))
