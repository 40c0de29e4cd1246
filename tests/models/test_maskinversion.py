"""MaskInversion: the two modes agree, the loss is that of docs/maskinversion.md (M-4), optimization fits the mask."""

from __future__ import annotations

import pytest
import torch

from grounding.models.clip import build_clip
from grounding.models.maskinversion import MaskInversion, soft_dice_loss


@pytest.fixture(scope="module")
def backbone():
    return build_clip("tiny", image_size=64, overrides={"vision_config": {"num_hidden_layers": 2}}).double()


def _image_and_masks(height=48, width=56):
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
    masks = torch.zeros(4, height, width, dtype=torch.bool)
    masks[0, :20, :20] = True
    masks[1, 25:, 30:] = True
    masks[2, 10:40, 15:35] = True
    masks[3, :, : width // 2] = True
    return image, masks


def test_soft_dice_matches_its_formula():
    maps = torch.tensor([[[0.2, 0.9], [0.0, 0.5]]], dtype=torch.float64)
    mask = torch.tensor([[[0, 1], [0, 1]]], dtype=torch.bool)
    expected = 1 - (2 * (0.9 + 0.5) + 1) / ((0.2 + 0.9 + 0.0 + 0.5) + 2 + 1)
    torch.testing.assert_close(soft_dice_loss(maps, mask), torch.tensor([expected], dtype=torch.float64))
    assert soft_dice_loss(mask.double(), mask).item() == 0.0  # a perfect map


@pytest.mark.parametrize("alpha", [0.0, 5.0])
@pytest.mark.parametrize("precompute", [False, True])
def test_naive_and_decomposed_gradients_agree_at_every_step(backbone, alpha, precompute):
    image, masks = _image_and_masks()
    naive = MaskInversion(backbone, iterations=6, lr=0.1, alpha=alpha, mode="naive", chunk_size=3)
    fast = MaskInversion(backbone, iterations=6, lr=0.1, alpha=alpha, mode="decomposed", chunk_size=3, precompute=precompute)
    state_naive, state_fast = naive.prepare(image), fast.prepare(image)
    if precompute:
        from grounding.models.legrad import precompute_basis

        precompute_basis(backbone, state_fast)
    lets = state_naive.global_embedding.expand(4, -1).clone()
    optimizer = torch.optim.AdamW([lets.requires_grad_(True)], lr=0.1, weight_decay=0.0)
    for _ in range(6):  # follow the naive trajectory, compare both gradients at each point
        loss_n, grad_n, _ = naive.step_gradient(state_naive, lets, masks)
        loss_f, grad_f, _ = fast.step_gradient(state_fast, lets, masks)
        assert abs(loss_n - loss_f) <= 1e-10
        assert (grad_n - grad_f).norm() <= 1e-5 * grad_n.norm()
        assert grad_n.norm() > 0
        optimizer.zero_grad()
        lets.grad = grad_n
        optimizer.step()


def test_both_modes_give_the_same_embeddings_and_maps(backbone):
    image, masks = _image_and_masks()
    results = [
        MaskInversion(backbone, iterations=5, lr=0.5, mode=mode, chunk_size=chunk)(image, masks, return_maps=True)
        for mode, chunk in (("naive", 4), ("decomposed", 3), ("decomposed", 1))
    ]
    for other in results[1:]:
        torch.testing.assert_close(other.embeddings, results[0].embeddings, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(other.maps, results[0].maps, rtol=0, atol=1e-10)
    assert results[0].maps.shape == masks.shape
    assert len(results[0].losses) == 5


def test_optimization_lowers_the_dice_loss_towards_the_mask(backbone):
    image, masks = _image_and_masks()
    result = MaskInversion(backbone, iterations=25, lr=0.5)(image, masks[:2], return_maps=True)
    first = soft_dice_loss(result.initial_maps, masks[:2])
    last = soft_dice_loss(result.maps, masks[:2])
    assert (last < first).all(), (first, last)
    assert result.losses[-1] < result.losses[0]
    # the LETs moved away from the global embedding they started from
    assert (result.embeddings - result.embeddings[0]).abs().sum() > 0


def test_float32_modes_agree_to_the_spec_tolerance():
    backbone = build_clip("tiny", image_size=64, overrides={"vision_config": {"num_hidden_layers": 2}})
    image, masks = _image_and_masks()
    naive = MaskInversion(backbone, iterations=10, mode="naive")(image, masks, return_maps=True)
    fast = MaskInversion(backbone, iterations=10, mode="decomposed")(image, masks, return_maps=True)
    assert (naive.maps - fast.maps).abs().max() <= 1e-4
    assert ((naive.embeddings - fast.embeddings).norm(dim=1) / naive.embeddings.norm(dim=1)).max() <= 1e-4


def test_runs_under_inference_mode(backbone):
    image, masks = _image_and_masks()
    expected = MaskInversion(backbone, iterations=2)(image, masks[:1]).embeddings
    with torch.inference_mode():
        got = MaskInversion(backbone, iterations=2)(image, masks[:1]).embeddings
    torch.testing.assert_close(got, expected)


def test_bad_inputs_are_named(backbone):
    image, masks = _image_and_masks()
    with pytest.raises(ValueError, match=r"masks are \(10, 10\) but the image is \(48, 56\)"):
        MaskInversion(backbone)(image, masks[:, :10, :10])
    with pytest.raises(ValueError, match=r"masks must be \(N, H, W\) with N >= 1, got \(0, 48, 56\)"):
        MaskInversion(backbone)(image, masks[:0])
    with pytest.raises(ValueError, match="mode must be one of"):
        MaskInversion(backbone, mode="fast")
    with pytest.raises(ValueError, match=r"init must be \(P,\) or \(N, P\) = \(4, 32\), got \(3, 32\)"):
        MaskInversion(backbone)(image, masks, init=torch.zeros(3, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="float masks must lie in"):
        MaskInversion(backbone)(image, masks.double() * 2)


@pytest.mark.parametrize("mode", ["decomposed", "naive"])
def test_bfloat16_backbone_runs_and_stays_close_to_float32(mode):
    """The GPU path in reduced precision (bf16 matmuls run on the CPU too): same shapes, finite, maps near fp32."""
    backbone = build_clip("tiny", image_size=64, overrides={"vision_config": {"num_hidden_layers": 2}})
    image, masks = _image_and_masks()
    reference = MaskInversion(backbone, iterations=3, mode=mode)(image, masks, return_maps=True)
    result = MaskInversion(backbone.to(torch.bfloat16), iterations=3, mode=mode)(image, masks, return_maps=True)
    assert result.embeddings.dtype == torch.bfloat16 and torch.isfinite(result.embeddings).all()
    assert (result.maps.float() - reference.maps).abs().max() < 0.15


def test_result_carries_the_global_embedding_of_the_image(backbone):
    image, masks = _image_and_masks()
    result = MaskInversion(backbone, iterations=0)(image, masks[:2])
    expected = backbone.encode_image(backbone.preprocess(image))[0]
    torch.testing.assert_close(result.global_embedding, expected)
    torch.testing.assert_close(result.embeddings, expected.expand(2, -1))  # zero iterations: the initial LETs


@pytest.mark.parametrize("layers", [(-1,), (-2, -1)])
def test_both_modes_start_from_the_very_same_global_embedding(layers):
    """float32, 448-px-like grid: the starting point of the optimization is bit-identical in both modes
    (and equal to the model's own forward), so the modes can only differ by their gradients."""
    backbone = build_clip("tiny", image_size=224, overrides={"vision_config": {"num_hidden_layers": 3}})
    image, _ = _image_and_masks(200, 230)
    starts = {mode: MaskInversion(backbone, iterations=0, mode=mode, layers=layers).prepare(image).global_embedding
              for mode in ("naive", "decomposed")}
    assert torch.equal(starts["naive"], starts["decomposed"])
    with torch.no_grad():
        torch.testing.assert_close(starts["naive"], backbone.encode_image(backbone.preprocess(image))[0], rtol=1e-5, atol=1e-6)
