"""IMAGE adaptive masking of the multi-scale feature maps of Grounding DINO (docs/image.md).

The masking sits between the backbone and the transformer encoder: every level l of the
feature pyramid (stride 8 -> 64) is masked on its salient patches during training only.

Pipeline per level (docs/image.md "Importance prior" and "Masks"):

1. ``importance_prior``: parameter-free self-attention importance I_j of every patch, in [0, 1].
2. ``top_ratio_points``: the top r_l(p)·N patches by importance.
3. A mask M in [0, 1]: ``radiance_field_mask`` (RF-GAM), ``threshold_mask`` or ``random_mask``.
4. ``apply_mask``: x' = x · (1 − (1 − k)·M), with the progressive ``schedule`` of r and k.

``AdaptiveMasking`` bundles the four steps in a parameter-free ``nn.Module``.

Shapes: B batch, D channels, H×W the level's grid, N = H·W tokens (N_b: the valid tokens of
image b), c the row chunk, L the number of levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARIANTS = ("rf_gam", "threshold", "random", "none")


@dataclass
class MaskingConfig:
    """Settings of the IMAGE adaptive masking (docs/image.md "Masks").

    Attributes:
        variant: "rf_gam" (Gaussian radiance-field mask), "threshold" (binary top-r mask),
            "random" (ablation: same count, uniformly random patches) or "none" (no masking).
        r0: initial mask ratio per level, from stride 8 to stride 64.
        r1: final mask ratio per level. None -> min(r0 + 0.20, 1) **[choice]** (docs/image.md).
        sigma: RF-GAM Gaussian standard deviation, in patches. Default 1.0 **[choice]**.
        k0: initial residual strength kept inside the mask (k(0) = k0).
        progressive: False keeps r0 and k0 fixed for the whole training (ablation).
        tau: softmax temperature of the importance prior. None -> 1/sqrt(D) **[choice]**.
        max_tokens: levels with more tokens get their prior on an average-pooled grid of at most
            this many tokens, upsampled bilinearly.
        chunk_size: number of attention rows computed at once by the prior.

    Lists are accepted for ``r0`` / ``r1`` (configs come from YAML) and stored as tuples.
    """

    variant: Literal["rf_gam", "threshold", "random", "none"] = "rf_gam"
    r0: tuple[float, ...] = (0.10, 0.20, 0.30, 0.40)
    r1: tuple[float, ...] | None = None
    sigma: float = 1.0
    k0: float = 0.5
    progressive: bool = True
    tau: float | None = None
    max_tokens: int = 1024
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"MaskingConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        self.r0 = _ratios("r0", self.r0)
        if self.r1 is not None:
            self.r1 = _ratios("r1", self.r1)
            if len(self.r1) != len(self.r0):
                raise ValueError(
                    f"MaskingConfig.r1 must have one ratio per level like r0 "
                    f"({len(self.r0)}), got {len(self.r1)}"
                )
            for level, (start, end) in enumerate(zip(self.r0, self.r1)):
                if end < start:
                    raise ValueError(
                        f"MaskingConfig.r1 must be >= r0 at every level (the mask ratio grows during training):"
                        f" level {level} has r1 {end} < r0 {start}"
                    )
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"MaskingConfig.sigma must be a finite number > 0, got {self.sigma!r}")
        if not (isinstance(self.k0, (int, float)) and 0.0 <= self.k0 <= 1.0):
            raise ValueError(f"MaskingConfig.k0 must be in [0, 1], got {self.k0!r}")
        if not isinstance(self.progressive, bool):
            raise ValueError(f"MaskingConfig.progressive must be a bool, got {self.progressive!r}")
        if self.tau is not None and not (
            isinstance(self.tau, (int, float)) and math.isfinite(self.tau) and self.tau > 0
        ):
            raise ValueError(f"MaskingConfig.tau must be None or a finite number > 0, got {self.tau!r}")
        for name in ("max_tokens", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MaskingConfig.{name} must be an integer >= 1, got {value!r}")
        self.sigma = float(self.sigma)
        self.k0 = float(self.k0)

    def check_levels(self, num_levels: int) -> None:
        """r0 must give exactly one ratio per masked feature level of the model (no silent truncation)."""
        if len(self.r0) != num_levels:
            raise ValueError(
                f"MaskingConfig.r0 has {len(self.r0)} ratios but the model has {num_levels} feature levels"
                f" (strides 8 to {8 * 2 ** (num_levels - 1)}); give exactly one ratio per level"
            )

    @property
    def final_ratios(self) -> tuple[float, ...]:
        """r1, or min(r0 + 0.20, 1) per level when r1 is None **[choice]**."""
        if self.r1 is not None:
            return self.r1
        return tuple(min(r + 0.20, 1.0) for r in self.r0)


def _ratios(name: str, values: Sequence[float]) -> tuple[float, ...]:
    """Validate a per-level ratio list of the config and return it as a tuple of floats."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"MaskingConfig.{name} must be a non-empty list of ratios, got {values!r}")
    out = []
    for r in values:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ValueError(f"MaskingConfig.{name} ratios must be numbers in [0, 1], got {values!r}")
        out.append(float(r))
    return tuple(out)


def _check_grid(name: str, t: Tensor | None, b: int, h: int, w: int) -> None:
    if t is not None and tuple(t.shape) != (b, h, w):
        raise ValueError(f"{name} must have shape (B, H, W) = {(b, h, w)}, got {tuple(t.shape)}")


# ----------------------------------------------------------------------------- importance prior


def pooled_size(h: int, w: int, max_tokens: int) -> tuple[int, int]:
    """Largest grid (h', w') with h'·w' <= max_tokens and about the aspect ratio of (h, w)."""
    if h * w <= max_tokens:
        return h, w
    scale = math.sqrt(max_tokens / (h * w))
    ph = min(h, max(1, math.floor(h * scale)))
    pw = min(w, max(1, math.floor(w * scale)), max(1, max_tokens // ph))
    return ph, pw


def _attention_received(tokens: Tensor, tau: float, chunk_size: int) -> Tensor:
    """(1/N) Σ_i softmax_j(x̂_i·x̂_j / τ) for the unit-norm tokens (N, D) -> (N,).

    Rows are processed ``chunk_size`` at a time, so at most a (chunk_size, N) block of scores
    exists; the column sums are accumulated as (1/Z)ᵀ exp(S − max), which needs no second block.
    """
    n = tokens.shape[0]
    received = tokens.new_zeros(n)
    for start in range(0, n, chunk_size):
        scores = tokens[start : start + chunk_size] @ tokens.T  # (c, N)
        scores.mul_(1.0 / tau)
        scores.sub_(scores.amax(dim=1, keepdim=True)).exp_()
        inv_z = scores.sum(dim=1).reciprocal_()  # (c,)
        received += inv_z @ scores
        del scores
    return received / n


def _minmax(imp: Tensor, valid: Tensor | None) -> Tensor:
    """Min-max normalize imp (B, H, W) to [0, 1] per image over the valid positions.

    Padding positions get 0; an image whose valid importances are all equal gets 0 everywhere.
    """
    if valid is None:
        valid = torch.ones_like(imp, dtype=torch.bool)
    lo = torch.where(valid, imp, torch.inf).amin(dim=(1, 2), keepdim=True)
    hi = torch.where(valid, imp, -torch.inf).amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    ok = span > 0
    out = (imp - torch.where(ok, lo, 0.0)) / torch.where(ok, span, 1.0)
    return torch.where(ok & valid, out, 0.0)


def _prior_on_grid(x: Tensor, valid: Tensor | None, tau: float, chunk_size: int) -> Tensor:
    """Exact (chunked) prior of x (B, D, H, W) with valid (B, H, W) or None -> (B, H, W)."""
    b, d, h, w = x.shape
    received = x.new_zeros(b, h * w)
    for i in range(b):
        tokens = F.normalize(x[i].reshape(d, h * w).T, dim=1)  # (N, D)
        if valid is None:
            received[i] = _attention_received(tokens, tau, chunk_size)
            continue
        keep = valid[i].reshape(-1).nonzero().squeeze(1)  # (N_b,)
        if keep.numel() > 0:
            received[i, keep] = _attention_received(tokens[keep], tau, chunk_size)
    return _minmax(received.view(b, h, w), valid)


def importance_prior(
    x: Tensor,
    valid: Tensor | None = None,
    tau: float | None = None,
    max_tokens: int = 1024,
    chunk_size: int = 1024,
) -> Tensor:
    """Parameter-free importance of every patch of a feature map (docs/image.md "Importance prior").

    x̂_i = x_i/‖x_i‖₂, A = softmax_row(x̂ x̂ᵀ / τ), I_j = (1/N) Σ_i A_ij (the attention patch j
    receives), min-max normalized to [0, 1] per image. **[choice]** parameter-free, no gradient,
    τ = 1/√D by default.

    Padding: the tokens of image b are only its valid positions (N = N_b, both as queries and as
    keys); padding gets importance 0 and the min-max runs over valid positions only.

    Memory: never an N×N matrix. Rows are computed ``chunk_size`` at a time. When H·W > max_tokens
    the map is first average-pooled (``adaptive_avg_pool2d``; with ``valid`` a masked average over
    the valid positions of each cell, a cell being valid when it holds any valid position) to a
    grid of at most ``max_tokens`` tokens with about the same aspect ratio, the prior is computed
    there, upsampled bilinearly (align_corners=False; with ``valid`` interpolating between valid
    cells only) to (H, W), and min-max normalized again over the valid positions.

    Args:
        x: (B, D, H, W) feature map of one level.
        valid: (B, H, W) bool, True on real (non-padding) positions; None means all valid.
        tau: softmax temperature; None -> 1/sqrt(D).
        max_tokens: largest grid on which the prior is computed directly.
        chunk_size: rows of the attention matrix computed at once.

    Returns:
        (B, H, W) importance in [0, 1], detached, in x's dtype promoted to at least float32.
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, D, H, W), got {tuple(x.shape)}")
    b, d, h, w = x.shape
    _check_grid("valid", valid, b, h, w)
    if max_tokens < 1 or chunk_size < 1:
        raise ValueError(f"max_tokens and chunk_size must be >= 1, got {max_tokens}, {chunk_size}")
    tau = 1.0 / math.sqrt(d) if tau is None else float(tau)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    # the scores are compared across a softmax: keep them out of bf16/fp16 autocast
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        x = x.detach().to(dtype)
        valid = None if valid is None else valid.to(device=x.device, dtype=torch.bool)
        if h * w <= max_tokens:
            return _prior_on_grid(x, valid, tau, chunk_size)

        ph, pw = pooled_size(h, w, max_tokens)
        if valid is None:
            pooled = F.adaptive_avg_pool2d(x, (ph, pw))  # (B, D, h', w')
            coarse = _prior_on_grid(pooled, None, tau, chunk_size)  # (B, h', w')
            imp = F.interpolate(coarse[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            return _minmax(imp, None)

        area = F.adaptive_avg_pool2d(valid[:, None].to(dtype), (ph, pw))  # (B, 1, h', w')
        pooled = F.adaptive_avg_pool2d(x * valid[:, None], (ph, pw)) / area.clamp_min(1e-12)
        coarse_valid = area[:, 0] > 0  # (B, h', w')
        coarse = _prior_on_grid(pooled, coarse_valid, tau, chunk_size)  # 0 on padding cells
        # normalized interpolation: padding cells carry no weight in the upsampled values
        num = F.interpolate(coarse[:, None], size=(h, w), mode="bilinear", align_corners=False)
        den = F.interpolate(
            coarse_valid[:, None].to(dtype), size=(h, w), mode="bilinear", align_corners=False
        )
        imp = torch.where(den > 0, num / den.clamp_min(1e-12), 0.0)[:, 0]
        return _minmax(imp, valid)


# ----------------------------------------------------------------------------- masks


def top_ratio_points(importance: Tensor, ratio: float, valid: Tensor | None = None) -> Tensor:
    """The top round(ratio·N_b) valid positions of each image by importance (docs/image.md "Masks").

    The count rounds half up (floor(ratio·N_b + 0.5)). Ties are broken by a stable sort: among
    equal importances the earlier position in row-major order wins. Padding is never selected.

    Args:
        importance: (B, H, W) scores.
        ratio: fraction of the valid positions to select, in [0, 1].
        valid: (B, H, W) bool, True on real positions; None means all valid.

    Returns:
        (B, H, W) bool, True on the selected positions.
    """
    if importance.dim() != 3:
        raise ValueError(f"importance must have shape (B, H, W), got {tuple(importance.shape)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    b, h, w = importance.shape
    _check_grid("valid", valid, b, h, w)
    scores = importance.detach().reshape(b, h * w)
    if valid is None:
        n_valid = torch.full((b,), h * w, device=importance.device, dtype=torch.float64)
    else:
        flat_valid = valid.to(device=importance.device, dtype=torch.bool).reshape(b, h * w)
        scores = torch.where(flat_valid, scores, -torch.inf)
        n_valid = flat_valid.sum(dim=1).to(torch.float64)
    count = torch.floor(ratio * n_valid + 0.5).long()  # (B,)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, N)
    keep = torch.arange(h * w, device=importance.device)[None] < count[:, None]  # (B, N) by rank
    points = torch.zeros_like(keep).scatter_(1, order, keep)
    return points.view(b, h, w)


def threshold_mask(importance: Tensor, ratio: float, valid: Tensor | None = None) -> Tensor:
    """Threshold variant (docs/image.md): M_j = 1 for the top ratio·N_b patches by importance, else 0.

    Args:
        importance: (B, H, W) scores.
        ratio: fraction of the valid positions to mask, in [0, 1].
        valid: (B, H, W) bool, True on real positions; None means all valid.

    Returns:
        (B, H, W) float mask of 0/1 in importance's dtype (a floating dtype).
    """
    dtype = importance.dtype if importance.is_floating_point() else torch.float32
    return top_ratio_points(importance, ratio, valid).to(dtype)


def gaussian_kernel(sigma: float, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Unnormalized 1-D Gaussian exp(−d²/(2σ²)) for d = −r..r, r = ceil(3σ) -> (2r + 1,)."""
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    return torch.exp(-(offsets**2) / (2 * sigma**2))


def radiance_field_mask(
    importance: Tensor, ratio: float, sigma: float, valid: Tensor | None = None
) -> Tensor:
    """RF-GAM mask (docs/image.md "Masks"): a Gaussian radiance field of the top-r patches.

    The top ratio·N_b patches p radiate with intensity I_p:
    R(x, y) = Σ_p I_p exp(−‖(x, y) − (x_p, y_p)‖² / (2σ²)), M = R / max R per image.
    R is the point map P = I · top_ratio_points convolved with a separable Gaussian of std σ
    (patches) truncated to |dx|, |dy| <= ceil(3σ), with zero padding at the border (never an
    N×P distance matrix). Padding positions get 0 and max R is taken over valid positions; an
    image with max R = 0 (ratio 0, or all selected importances 0) gets an all-zero mask.

    Args:
        importance: (B, H, W) importance in [0, 1].
        ratio: fraction of the valid positions that radiate, in [0, 1].
        sigma: Gaussian std in patches, > 0. Default in the config 1.0 **[choice]**.
        valid: (B, H, W) bool, True on real positions; None means all valid.

    Returns:
        (B, H, W) soft mask in [0, 1] with max 1 per image (unless all zero), detached.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    points = top_ratio_points(importance, ratio, valid)  # (B, H, W) bool
    dtype = importance.dtype if importance.is_floating_point() else torch.float32
    with torch.no_grad():
        field = (importance.detach().to(dtype) * points)[:, None]  # (B, 1, H, W) point map P
        g = gaussian_kernel(sigma, dtype, importance.device)
        radius = (g.numel() - 1) // 2
        field = F.conv2d(field, g.view(1, 1, 1, -1), padding=(0, radius))  # along x
        field = F.conv2d(field, g.view(1, 1, -1, 1), padding=(radius, 0))[:, 0]  # along y
        if valid is not None:
            field = field * valid.to(device=field.device, dtype=torch.bool)
        peak = field.amax(dim=(1, 2), keepdim=True)
        return torch.where(peak > 0, field / peak.clamp_min(torch.finfo(dtype).tiny), 0.0)


def random_mask(
    like: Tensor | Sequence[int],
    ratio: float,
    valid: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random variant (docs/image.md, ablation): round(ratio·N_b) valid patches chosen uniformly.

    Args:
        like: a (B, H, W) tensor (its shape, device and floating dtype are used) or the shape.
        ratio: fraction of the valid positions to mask, in [0, 1].
        valid: (B, H, W) bool, True on real positions; None means all valid.
        generator: optional torch.Generator on the mask's device, for reproducible masks.

    Returns:
        (B, H, W) float mask of 0/1.
    """
    if isinstance(like, Tensor):
        shape, device = tuple(like.shape), like.device
        dtype = like.dtype if like.is_floating_point() else torch.float32
    else:
        shape, dtype = tuple(int(s) for s in like), torch.float32
        device = valid.device if valid is not None else (generator.device if generator is not None else None)
    if len(shape) != 3:
        raise ValueError(f"random_mask needs a (B, H, W) shape, got {shape}")
    # the top-r of i.i.d. uniform scores is a uniformly random subset of that size
    scores = torch.rand(shape, generator=generator, device=device)
    return top_ratio_points(scores, ratio, valid).to(dtype)


# ----------------------------------------------------------------------------- schedule, application


def schedule(progress: float, config: MaskingConfig, num_levels: int) -> tuple[list[float], float]:
    """Progressive ratios and strength (docs/image.md "Masks").

    r_l(p) = r0_l + (r1_l − r0_l)·p and k(p) = k0·(1 − p), with p clamped to [0, 1];
    ``config.progressive = False`` gives (r0, k0) at any p.

    Args:
        progress: training progress p (epoch / E_total or step / total steps).
        config: the masking settings.
        num_levels: number of pyramid levels L; config.r0 must have at least L ratios.

    Returns:
        (ratios, k): the first L ratios and the residual strength inside the mask.
    """
    if len(config.r0) < num_levels:
        raise ValueError(
            f"MaskingConfig.r0 has {len(config.r0)} ratios but {num_levels} feature levels are masked; "
            f"give one ratio per level"
        )
    p = float(progress)
    if not math.isfinite(p):
        raise ValueError(f"progress must be a finite number, got {progress!r}")
    p = min(max(p, 0.0), 1.0)
    r0 = config.r0[:num_levels]
    if not config.progressive:
        return list(r0), config.k0
    r1 = config.final_ratios[:num_levels]
    ratios = [min(max(a + (z - a) * p, 0.0), 1.0) for a, z in zip(r0, r1)]
    return ratios, config.k0 * (1.0 - p)


def apply_mask(x: Tensor, mask: Tensor, k: float) -> Tensor:
    """x' = x · (1 − (1 − k)·M) (docs/image.md "Application"), M broadcast over channels.

    Args:
        x: (B, D, H, W) features; gradients flow through x.
        mask: (B, H, W) mask in [0, 1] (treated as a constant).
        k: residual kept inside the mask, in [0, 1].

    Returns:
        (B, D, H, W) masked features.
    """
    keep = 1.0 - (1.0 - k) * mask.detach().to(x.dtype)  # (B, H, W)
    return x * keep[:, None]


# ----------------------------------------------------------------------------- module


class AdaptiveMasking(nn.Module):
    """IMAGE adaptive masking of a feature pyramid during training (docs/image.md).

    Parameter-free (empty state_dict). Active only when ``self.training`` and
    ``config.variant != "none"``; otherwise it returns its inputs unchanged (the very same
    tensor objects) and ``None`` masks, and leaves the ``last_*`` attributes as they were.

    After each masked level the detached mask, ratio and strength are kept for logging in
    ``last_masks[level]`` ((B, H, W)), ``last_ratios[level]`` and ``last_strength``.
    """

    def __init__(self, config: MaskingConfig, generator: torch.Generator | None = None):
        """config: the settings; generator: optional RNG of the "random" variant."""
        super().__init__()
        self.config = config
        self.generator = generator
        self.last_masks: dict[int, Tensor] = {}
        self.last_ratios: dict[int, float] = {}
        self.last_strength: float | None = None

    @property
    def active(self) -> bool:
        return self.training and self.config.variant != "none"

    def compute_mask(self, x: Tensor, ratio: float, valid: Tensor | None = None) -> Tensor:
        """Mask of one level for the configured variant.

        Args:
            x: (B, D, H, W) features of the level.
            ratio: mask ratio of the level.
            valid: (B, H, W) bool, True on real positions, or None.

        Returns:
            (B, H, W) mask in [0, 1], in x's dtype promoted to at least float32.
        """
        cfg = self.config
        if cfg.variant == "random":
            b, _, h, w = x.shape
            dtype = torch.promote_types(x.dtype, torch.float32)
            like = torch.empty(b, h, w, device=x.device, dtype=dtype)
            return random_mask(like, ratio, valid, self.generator)
        imp = importance_prior(x, valid, cfg.tau, cfg.max_tokens, cfg.chunk_size)  # (B, H, W)
        if cfg.variant == "threshold":
            return threshold_mask(imp, ratio, valid)
        return radiance_field_mask(imp, ratio, cfg.sigma, valid)

    def mask_level(
        self, x: Tensor, level: int, progress: float, valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Mask one pyramid level (for a forward hook on that level's input projection).

        Args:
            x: (B, D, H, W) features of level ``level`` (0 = stride 8).
            level: index of the level into config.r0 / r1.
            progress: training progress p in [0, 1] (clamped).
            valid: (B, H, W) bool, True on real positions, or None.

        Returns:
            (x', mask): masked (B, D, H, W) features and the (B, H, W) mask; (x, None) when inactive.
        """
        if not self.active:
            return x, None
        ratios, k = schedule(progress, self.config, level + 1)
        mask = self.compute_mask(x, ratios[level], valid)
        self.last_masks[level] = mask.detach()
        self.last_ratios[level] = ratios[level]
        self.last_strength = k
        return apply_mask(x, mask, k), mask

    def forward(
        self, features: list[Tensor], progress: float, valid: list[Tensor | None] | None = None
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """Mask every level of the pyramid.

        Args:
            features: L tensors (B, D_l, H_l, W_l), from stride 8 up.
            progress: training progress p in [0, 1] (clamped).
            valid: None, or L tensors (B, H_l, W_l) bool (True on real positions) or None.

        Returns:
            (masked features, masks): L tensors (B, D_l, H_l, W_l) and L masks (B, H_l, W_l);
            when inactive the input tensors themselves and L ``None``.
        """
        if valid is not None and len(valid) != len(features):
            raise ValueError(f"valid must have one entry per level ({len(features)}), got {len(valid)}")
        if not self.active:
            return list(features), [None] * len(features)
        schedule(progress, self.config, len(features))  # fail early on a too-short r0
        out, masks = [], []
        for level, x in enumerate(features):
            x, mask = self.mask_level(x, level, progress, None if valid is None else valid[level])
            out.append(x)
            masks.append(mask)
        return out, masks
