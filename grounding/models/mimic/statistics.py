"""L_base's feature statistics: the hooks on the vision tower, the reference images and their on-disk cache
(docs/mimic.md "L_base, feature-statistics alignment", "The reference-statistics cache")."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grounding.data.images import IMAGE_SUFFIXES
from grounding.utils import write_atomic

from .priors import from_unit
from .vlm import VLM, vision_tower



# ============================================================================ statistics and the loss
def token_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance over tokens and batch, in float32.

    features: (B, T, C) token features, or (B, C, H, W) maps (a patch-embedding convolution's output), whose
    H·W positions are the tokens.
    """
    if features.dim() == 4:
        features = features.flatten(2).transpose(1, 2)
    tokens = features.reshape(-1, features.shape[-1]).float()
    return tokens.mean(dim=0), tokens.var(dim=0, unbiased=False)


def feature_statistics_loss(
    statistics: Sequence[tuple[torch.Tensor, torch.Tensor]], targets: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """L_base: Σ over layers of ‖μ − μ*‖₂ + ‖σ² − σ*²‖₂."""
    if len(statistics) != len(targets):
        raise ValueError(f"{len(statistics)} layers of statistics for {len(targets)} target layers")
    total = None
    for (mean, var), (target_mean, target_var) in zip(statistics, targets):
        term = torch.linalg.vector_norm(mean - target_mean.to(mean)) + torch.linalg.vector_norm(var - target_var.to(var))
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no layer statistics to compare")
    return total


# ============================================================================ the hooks
_BLOCK_MLP = re.compile(r"(?:^|\.)(?:layers|layer|blocks)\.(\d+)\.mlp$")


def statistics_modules(tower: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules L_base reads: the patch embedding, then every encoder block's MLP in block order."""
    named = list(tower.named_modules())
    patch = next(((n, m) for n, m in named if n.endswith(("patch_embedding", "patch_embed"))), None)
    if patch is None:
        patch = next(((n, m) for n, m in named if isinstance(m, nn.Conv2d)), None)
    mlps = sorted(((n, m) for n, m in named if _BLOCK_MLP.search(n)), key=lambda nm: int(_BLOCK_MLP.search(nm[0]).group(1)))
    if patch is None or not mlps:
        raise ValueError(f"{type(tower).__name__}: no patch embedding or no encoder-block MLPs found for the feature statistics")
    return [patch] + mlps


class FeatureStatistics:
    """Forward hooks on the vision tower that record each hooked layer's (mean, variance) per forward pass.

    A context manager: the hooks exist inside ``with`` only, so the model is unchanged afterwards.
    ``statistics`` holds the last forward pass's values (differentiable); ``accumulate=True`` instead sums the
    exact token count, sum and sum of squares (float64, detached) over every pass, for reference images.
    """

    def __init__(self, tower: nn.Module, accumulate: bool = False) -> None:
        self.modules = statistics_modules(tower)
        self.accumulate = accumulate
        self.statistics: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.modules)
        self.sums: list[list] = [[0, 0.0, 0.0] for _ in self.modules]
        self._handles: list = []

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.modules]

    def _hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            features = output[0] if isinstance(output, (tuple, list)) else output
            if self.accumulate:
                tokens = (features.flatten(2).transpose(1, 2) if features.dim() == 4 else features).detach()
                tokens = tokens.reshape(-1, tokens.shape[-1]).double()
                entry = self.sums[index]
                entry[0] += tokens.shape[0]
                entry[1] = entry[1] + tokens.sum(0)
                entry[2] = entry[2] + tokens.pow(2).sum(0)
            else:
                self.statistics[index] = token_statistics(features)
        return hook

    def __enter__(self) -> "FeatureStatistics":
        self._handles = [module.register_forward_hook(self._hook(i)) for i, (_, module) in enumerate(self.modules)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def current(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (mean, variance) of every hooked layer in the last forward pass."""
        if any(s is None for s in self.statistics):
            raise RuntimeError("no forward pass of the vision tower was recorded")
        return list(self.statistics)  # type: ignore[arg-type]

    def accumulated(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The exact (mean, biased variance) over every token of every accumulated pass, float32."""
        out = []
        for count, total, squares in self.sums:
            if count == 0:
                raise RuntimeError("no reference image went through the vision tower")
            mean = total / count
            out.append((mean.float(), (squares / count - mean.pow(2)).clamp_min(0).float()))
        return out


# ============================================================================ reference images and the cache
def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference-image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"reference-image folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return files


def statistics_cache_key(model_name: str, folder: str | Path, image_size: int) -> str:
    """The cache key of a folder's statistics: the model, the folder's resolved path, the image size and a
    fingerprint of its image files (names, sizes, modification times): any added, removed or rewritten image
    gives a new key."""
    files = list_images(folder)
    listing = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    payload = json.dumps([str(model_name), str(Path(folder).resolve()), int(image_size), listing])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def load_reference_images(folder: str | Path, image_size: int) -> torch.Tensor:
    """The folder's images as (N, 3, S, S) pixels in [0, 1] (bicubic, antialiased, squashed to the square)."""
    from PIL import Image

    images = []
    for path in list_images(folder):
        try:
            with Image.open(path) as image:
                pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype="uint8").copy())
        except OSError as error:
            raise ValueError(f"cannot read reference image {path}: {error}") from error
        pixels = pixels.permute(2, 0, 1)[None].float() / 255
        images.append(F.interpolate(pixels, size=(image_size, image_size), mode="bicubic", antialias=True,
                                    align_corners=False).clamp(0, 1)[0])
    return torch.stack(images)


def compute_reference_statistics(vlm: VLM, images: torch.Tensor, batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exact per-layer (mean, variance) of the vision tower's hooked features over all of ``images`` ((N, 3, S, S)
    in [0, 1]), every token of every image counted once."""
    tower = vision_tower(vlm.model)
    dtype = next(tower.parameters()).dtype
    device = next(tower.parameters()).device
    with FeatureStatistics(tower, accumulate=True) as recorder, torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            chunk = from_unit(images[start:start + batch_size].to(device), vlm.mean, vlm.std)
            tower(chunk.to(dtype))
    return recorder.accumulated()


def reference_statistics(
    vlm: VLM, folder: str | Path, cache_dir: str | Path | None = None, batch_size: int = 8
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The target statistics of L_base from a folder of reference images, cached on disk.

    The cache file is ``<cache_dir>/featstats-<key>.pt`` (``statistics_cache_key``), written atomically (a
    temporary file renamed over it) and read on later runs; None: no cache. Tensors are on the CPU.
    """
    path = None
    if cache_dir is not None:
        dtype = next(vision_tower(vlm.model).parameters()).dtype
        key = statistics_cache_key(f"{vlm.name}|{str(dtype).replace('torch.', '')}", folder, vlm.image_size)
        path = Path(cache_dir).expanduser() / f"featstats-{key}.pt"
        if path.is_file():
            payload = torch.load(path, map_location="cpu", weights_only=True)
            return [(m, v) for m, v in zip(payload["means"], payload["variances"])]
    statistics = compute_reference_statistics(vlm, load_reference_images(folder, vlm.image_size), batch_size)
    statistics = [(m.cpu(), v.cpu()) for m, v in statistics]
    if path is not None:
        payload = {"means": [m for m, _ in statistics], "variances": [v for _, v in statistics],
                   "model": vlm.name, "folder": str(Path(folder).resolve())}
        write_atomic(path, lambda temporary: torch.save(payload, temporary))
    return statistics
