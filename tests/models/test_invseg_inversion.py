"""InvSeg's per-image computation on the tiny random Stable Diffusion, without Lightning."""

import pytest
import torch

from grounding.models.invseg import category_maps, predict_labels, weighted_resolution_maps
from grounding.models.invseg_inversion import BaselineSettings, InversionSettings, InvSeg
from grounding.models.stable_diffusion import build_stable_diffusion, category_prompt

NAMES = ["background", "red circle", "blue square"]


@pytest.fixture(scope="module")
def diffusion():
    return build_stable_diffusion("tiny")


def _image(seed: int = 0, size=(40, 56)) -> torch.Tensor:
    return (torch.rand(3, *size, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def test_zero_steps_leave_the_embeddings_and_the_maps_unchanged(diffusion):
    invseg = InvSeg(diffusion, image_size=64, resolution=8, inversion=InversionSettings(steps=0))
    result = invseg(_image(), NAMES, 0)
    assert result.losses == [] and torch.equal(result.before, result.after)
    assert result.index.shape == (40, 56) and int(result.index.max()) < len(NAMES)


def test_the_result_is_a_function_of_the_image_and_the_seed(diffusion):
    invseg = InvSeg(diffusion, image_size=64, resolution=8, inversion=InversionSettings(steps=2))
    first = invseg(_image(0), NAMES, torch.Generator().manual_seed(4))
    invseg(_image(1), NAMES, 9)
    again = invseg(_image(0), NAMES, 4)  # a seed is the generator it seeds
    assert torch.equal(first.index, again.index) and first.losses == again.losses
    assert invseg(_image(0), NAMES, 5).losses != first.losses


def test_inversion_changes_only_the_category_tokens(diffusion):
    invseg = InvSeg(diffusion, image_size=64, resolution=8, inversion=InversionSettings(steps=2))
    embeddings, _ = diffusion.encode_prompt([category_prompt(NAMES)])
    positions = diffusion.category_token_positions(NAMES)
    adapted, losses = invseg.invert(torch.rand(3, 64, 64), embeddings, positions, torch.Generator().manual_seed(0))
    changed = (adapted != embeddings).any(-1)[0]
    tokens = sorted(p for group in positions for p in group)
    assert changed.nonzero().flatten().tolist() == tokens and len(losses) == 2


def test_maps_are_the_category_maps_of_one_capture_on_the_same_noise(diffusion):
    invseg = InvSeg(diffusion, image_size=64, resolution=8)
    names = NAMES[:2]
    embeddings, _ = diffusion.encode_prompt([category_prompt(names)])
    positions = diffusion.category_token_positions(names)
    latents = diffusion.encode_image(torch.rand(1, 3, 64, 64))
    maps = invseg.maps(latents, 50, embeddings, positions, torch.Generator().manual_seed(3))
    noisy = diffusion.noised(latents, 50, torch.randn(latents.shape, generator=torch.Generator().manual_seed(3)))
    captured = diffusion.attention_maps(noisy, 50, embeddings, (8,))[8]
    expected = category_maps(captured.self_attention, captured.cross_attention, positions).reshape(1, 2, 8, 8)
    torch.testing.assert_close(maps, expected)


def test_the_adaptation_lowers_the_loss_on_a_fixed_draw(diffusion):
    """15 Adam steps lower the InvSeg loss measured on the same fixed draw (views, t, noise) before and after
    (t fixed and whole-image views so that the two measurements see the same inputs)."""
    settings = InversionSettings(steps=15, lr=0.05, t_min=50, t_max=50, min_scale=1.0)
    invseg = InvSeg(diffusion, image_size=64, resolution=8, inversion=settings)
    embeddings, _ = diffusion.encode_prompt([category_prompt(NAMES)])
    positions = diffusion.category_token_positions(NAMES)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))
    before = invseg.step_loss(image, embeddings, positions, torch.Generator().manual_seed(5))
    adapted, losses = invseg.invert(image, embeddings, positions, torch.Generator().manual_seed(1))
    after = invseg.step_loss(image, adapted, positions, torch.Generator().manual_seed(5))
    assert len(losses) == 15 and float(after.total) < float(before.total) - 1e-3


def test_diffsegmenter_is_the_argmax_of_the_weighted_resolution_maps(diffusion):
    weights = {4: 0.3, 8: 0.5, 16: 0.2}
    invseg = InvSeg(diffusion, "diffsegmenter", image_size=64, resolution=8, baseline=BaselineSettings(weights=weights))
    image = _image(3)
    result = invseg(image, NAMES, 7)
    embeddings, _ = diffusion.encode_prompt([category_prompt(NAMES)])
    pixels = torch.nn.functional.interpolate(image[None].float() / 255, size=(64, 64), mode="bilinear",
                                             antialias=True, align_corners=False).clamp(0, 1)
    latents = diffusion.encode_image(pixels)
    noisy = diffusion.noised(latents, 100, torch.randn(latents.shape, generator=torch.Generator().manual_seed(7)))
    per_res = diffusion.attention_maps(noisy, 100, embeddings, [4, 8, 16])
    maps = weighted_resolution_maps(per_res, diffusion.category_token_positions(NAMES), 16, weights)[0]
    assert result.losses == [] and torch.equal(result.index, predict_labels(maps, (40, 56)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 72}, r"image_size 72 must be a multiple of 16 for this model"),
        ({"resolution": 5}, r"resolution 5 is not an attention grid of this model at image_size 64"),
        ({"inversion": InversionSettings(t_max=1000)}, r"inversion.t_max must be a timestep in \[0, 999\], got 1000"),
        ({"baseline": BaselineSettings(t=1000)}, r"baseline.t must be a timestep in \[0, 999\], got 1000"),
    ],
)
def test_settings_the_model_cannot_take_are_named(diffusion, kwargs, message):
    with pytest.raises(ValueError, match=message):
        InvSeg(diffusion, **{"image_size": 64, "resolution": 8, **kwargs})


def test_bad_inputs_are_named(diffusion):
    invseg = InvSeg(diffusion, image_size=64, resolution=8, inversion=InversionSettings(steps=0))
    with pytest.raises(ValueError, match=r"class_names must be a non-empty list of names, got \[\]"):
        invseg(_image(), [])
    with pytest.raises(ValueError, match=r"image must be \(3, H, W\), got \(40, 56\)"):
        invseg(_image()[0], NAMES)
