"""Scores of synthesized images (MIMIC's CLIPScore and LPIPS diversity, docs/mimic.md "Metrics").

``clip_score``: 100 · max(cos(image, text), 0) of a CLIP's image and text embeddings (any backbone with
``preprocess``, ``encode_image`` and ``encode_text``, such as ``grounding.models.clip.ClipBackbone``).
``lpips_diversity``: the mean LPIPS distance over all pairs of the samples of one target; the distance comes
from the optional ``lpips`` package (``load_lpips``, ``pip install lpips``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def clip_score(backbone: Any, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """CLIPScore 100 · max(cos(image, text), 0) per pair; images (B, 3, H, W) in [0, 1], a
    ``grounding.models.clip.ClipBackbone``."""
    with torch.no_grad():
        image_embeddings = F.normalize(backbone.encode_image(backbone.preprocess(images)).float(), dim=-1)
        text_embeddings = F.normalize(backbone.encode_text(list(texts)).float(), dim=-1)
    return 100 * (image_embeddings * text_embeddings.to(image_embeddings.device)).sum(-1).clamp_min(0)


def load_lpips(net: str = "alex", pretrained_backbone: bool = True) -> nn.Module:
    """The LPIPS distance (the optional ``lpips`` package); a clear error when it is not installed.

    net: the backbone, "alex", "vgg" or "squeeze". pretrained_backbone: False gives a random backbone (offline
    tests); the learned linear heads are the package's own either way."""
    try:
        import lpips
    except ImportError:
        raise ImportError("LPIPS diversity needs the optional package lpips: pip install lpips "
                          "(or leave model.scoring.lpips_diversity false)") from None
    import warnings

    with warnings.catch_warnings():  # lpips calls torchvision's deprecated pretrained= argument
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False).eval().requires_grad_(False)


def lpips_diversity(distance: nn.Module, images: torch.Tensor) -> float:
    """Mean LPIPS distance over all pairs of ``images`` (B >= 2, (B, 3, H, W) in [0, 1])."""
    if images.shape[0] < 2:
        raise ValueError("LPIPS diversity needs at least 2 samples of a concept "
                         "(model.synthesis.samples_per_target >= 2)")
    scaled = images.float() * 2 - 1
    values = []
    with torch.no_grad():
        for i in range(images.shape[0]):
            for j in range(i + 1, images.shape[0]):
                values.append(float(distance(scaled[i:i + 1], scaled[j:j + 1]).flatten()[0]))
    return sum(values) / len(values)
