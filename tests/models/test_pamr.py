"""PAMR against a per-pixel Python loop of its definition (Araslanov & Roth 2020)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from grounding.models.pamr import neighbour_offsets, pamr, pamr_affinity


def _loop_pamr(image, masks, iterations, dilations):
    """One image (K, H, W) and its masks (C, H, W) as nested lists, pixel by pixel, Python floats."""
    channels, height, width = image.shape
    pixel = [[[float(image[k, i, j]) for j in range(width)] for i in range(height)] for k in range(channels)]

    def at(grid, i, j):  # replicate padding: the coordinates clamped to the image
        return grid[min(max(i, 0), height - 1)][min(max(j, 0), width - 1)]

    offsets = [(a * d, b * d) for d in dilations for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
    weights = {}
    for i in range(height):
        for j in range(width):
            logits = [0.0] * len(offsets)
            for k in range(channels):
                # per dilation: the centre and its 8 neighbours
                samples = [at(pixel[k], i + a * d, j + b * d) for d in dilations for a in (-1, 0, 1) for b in (-1, 0, 1)]
                scale = 1e-8 + 0.1 * statistics.stdev(samples)
                for p, (dy, dx) in enumerate(offsets):
                    logits[p] += -abs(pixel[k][i][j] - at(pixel[k], i + dy, j + dx)) / scale / channels
            top = max(logits)
            exps = [math.exp(v - top) for v in logits]
            weights[i, j] = [e / sum(exps) for e in exps]
    maps = [[[float(masks[c, i, j]) for j in range(width)] for i in range(height)] for c in range(masks.shape[0])]
    for _ in range(iterations):
        maps = [[[sum(w * at(grid, i + dy, j + dx) for w, (dy, dx) in zip(weights[i, j], offsets))
                  for j in range(width)] for i in range(height)] for grid in maps]
    return torch.tensor(maps, dtype=torch.float64)


@pytest.mark.parametrize("dilations", [(1, 2), (3, 8)])  # 8: every neighbour beyond the 6x7 image is clamped
def test_pamr_equals_a_per_pixel_loop(dilations):
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 6, 7, generator=generator, dtype=torch.float64)
    image[1, :, :3] = 0.5  # a flat region: σ = 0 there, only the 1e-8 keeps the affinity finite
    masks = torch.randn(2, 2, 6, 7, generator=generator, dtype=torch.float64)
    refined = pamr(image, masks, iterations=2, dilations=dilations)
    assert refined.shape == masks.shape and refined.dtype == torch.float64
    for b in range(2):
        torch.testing.assert_close(refined[b], _loop_pamr(image[b], masks[b], 2, dilations), rtol=0, atol=1e-12)


def test_affinities_are_a_distribution_and_constant_masks_stay():
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 9, 5, generator=generator)
    affinity = pamr_affinity(image, (1, 2))
    assert affinity.shape == (1, 16, 9, 5) and len(neighbour_offsets((1, 2))) == 16
    torch.testing.assert_close(affinity.sum(1), torch.ones(1, 9, 5))
    masks = torch.tensor([0.3, -2.0]).view(1, 2, 1, 1).expand(1, 2, 9, 5)
    torch.testing.assert_close(pamr(image, masks, iterations=3, dilations=(1, 2)), masks)
    # no iteration: the masks as they are; half precision in, half precision out
    assert torch.equal(pamr(image, masks.half(), iterations=0), masks.half())


def test_pamr_names_bad_inputs():
    image, masks = torch.rand(1, 3, 6, 7), torch.rand(1, 2, 6, 7)
    with pytest.raises(ValueError, match=r"^pamr masks \(1, 2, 6, 8\) must have the image's batch and size \(1, 3, 6, 7\)$"):
        pamr(image, torch.rand(1, 2, 6, 8))
    with pytest.raises(ValueError, match=r"^pamr_dilations=\(\) must be a non-empty list of positive integers$"):
        pamr(image, masks, dilations=())
    with pytest.raises(ValueError, match=r"^pamr_dilations=\(8, 0\) must be a non-empty list of positive integers$"):
        pamr(image, masks, dilations=(8, 0))
    with pytest.raises(ValueError, match=r"^pamr_iterations=-1 must be an integer >= 0$"):
        pamr(image, masks, iterations=-1)
