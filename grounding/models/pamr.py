"""Pixel-adaptive mask refinement, PAMR (Araslanov & Roth 2020), as NACLIP's "+PAMR" results use it (docs/gem.md).

Each pixel x has, for every dilation d, the 8 neighbours x + d·(a, b) with a, b ∈ {-1, 0, 1}, (a, b) ≠ (0, 0),
coordinates clamped at the border (replicate padding): P = 8 · len(dilations) neighbours in all. With I the image
(K channels) and σ_k(x) the standard deviation (unbiased) of channel k over the 9 · len(dilations) samples made
of, for each dilation, x itself and its 8 neighbours (so x is counted once per dilation),

    α(x, n) = softmax over the P neighbours n of  mean_k [ -|I_k(x) - I_k(n)| / (1e-8 + 0.1 σ_k(x)) ]

and ``iterations`` times  m(x) ← Σ_n α(x, n) m(n)  for every class map m (the centre itself is not a neighbour).
The affinities are fixed by the image; only the masks move.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The P = 8 · len(dilations) (row, column) offsets, dilation by dilation, each in row-major order."""
    return [(a * d, b * d) for d in dilations for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]


def check_dilations(dilations: Sequence[int]) -> None:
    """A ValueError naming ``pamr_dilations`` unless it is a non-empty sequence of positive integers."""
    if isinstance(dilations, (int, str)) or not len(dilations) or any(not isinstance(d, int) or d < 1 for d in dilations):
        raise ValueError(f"pamr_dilations={dilations!r} must be a non-empty list of positive integers")


def _shift(padded: torch.Tensor, pad: int, offset: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The value at (i + dy, j + dx) for every (i, j) of a (..., H, W) tensor replicate-padded by ``pad``."""
    (dy, dx), (height, width) = offset, size
    return padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width]


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """α (B, P, H, W) of the module docstring: softmax over the P neighbours of ``image`` (B, K, H, W)."""
    check_dilations(dilations)
    size, pad = tuple(image.shape[-2:]), max(dilations)
    padded = F.pad(image, [pad] * 4, mode="replicate")
    # σ over the centre and its 8 neighbours at every dilation, in two passes (no cancellation in flat regions)
    samples = [image] * len(dilations) + [_shift(padded, pad, o, size) for o in neighbour_offsets(dilations)]
    mean = sum(samples) / len(samples)
    std = (sum((s - mean) ** 2 for s in samples) / (len(samples) - 1)).sqrt()  # (B, K, H, W)
    scale = 1e-8 + 0.1 * std
    logits = torch.stack([(-(image - _shift(padded, pad, o, size)).abs() / scale).mean(1)
                          for o in neighbour_offsets(dilations)], dim=1)
    return logits.softmax(dim=1)


def pamr(image: torch.Tensor, masks: torch.Tensor, iterations: int = 10,
         dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """Refine ``masks`` (B, C, H, W) along the edges of ``image`` (B, K, H, W), same size: returns (B, C, H, W).

    ``iterations`` steps of m(x) ← Σ_n α(x, n) m(n) with α = ``pamr_affinity(image, dilations)`` (module docstring).
    Computed in float32 at least (float64 stays float64), returned in the masks' dtype; the neighbours are
    accumulated one by one, so memory stays O(B · C · H · W) whatever the number of neighbours.
    """
    if image.dim() != 4 or masks.dim() != 4:
        raise ValueError(f"pamr needs image (B, K, H, W) and masks (B, C, H, W), got {tuple(image.shape)} and "
                         f"{tuple(masks.shape)}")
    if image.shape[0] != masks.shape[0] or image.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"pamr masks {tuple(masks.shape)} must have the image's batch and size {tuple(image.shape)}")
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"pamr_iterations={iterations!r} must be an integer >= 0")
    dtype = torch.promote_types(masks.dtype, torch.float32)
    affinity = pamr_affinity(image.to(dtype), dilations)  # (B, P, H, W)
    offsets, size, pad = neighbour_offsets(dilations), tuple(masks.shape[-2:]), max(dilations)
    refined = masks.to(dtype)
    for _ in range(int(iterations)):
        padded = F.pad(refined, [pad] * 4, mode="replicate")
        refined = sum(affinity[:, p:p + 1] * _shift(padded, pad, o, size) for p, o in enumerate(offsets))
    return refined.to(masks.dtype)
