"""The image priors and the pixel space (docs/mimic.md "The objective", "The optimization").

R_prior (``tv_losses``, ``l2_loss``), R_patch (``patch_border_loss``), the random view of every iteration
(``jitter_flip``), the normalized pixel space (``pixel_bounds``, ``clamp_pixels``, ``to_unit``, ``from_unit``) and
R_V, DeepInversion's BatchNorm prior (``BatchNormPrior`` on a CNN from ``build_cnn``; ``PriorSettings``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from jsonargparse.typing import NonNegativeFloat
from torch import nn

from grounding.constants import IMAGENET_MEAN, IMAGENET_STD  # R_V's CNN input normalization


# ============================================================================ R_prior and R_patch
def tv_losses(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Total variation of ``images`` (B, C, H, W) over horizontal, vertical and both diagonal neighbours.

    Returns (TV-L1, TV-L2): TV-L1 = Σ over the 4 directions of the mean |difference|; TV-L2 = Σ over the 4
    directions of the ℓ2 (Frobenius) norm of the differences of the whole batch (DeepInversion's form).
    """
    diffs = (
        images[..., :, :-1] - images[..., :, 1:],          # horizontal neighbours
        images[..., :-1, :] - images[..., 1:, :],          # vertical neighbours
        images[..., 1:, :-1] - images[..., :-1, 1:],       # anti-diagonal
        images[..., :-1, :-1] - images[..., 1:, 1:],       # diagonal
    )
    l1 = sum(d.abs().mean() for d in diffs)
    l2 = sum(torch.linalg.vector_norm(d) for d in diffs)
    return l1, l2


def l2_loss(images: torch.Tensor) -> torch.Tensor:
    """The ℓ2 norm of each image (B, C, H, W), averaged over the batch."""
    return torch.linalg.vector_norm(images.flatten(1), dim=1).mean()


def patch_border_loss(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """R_patch: mean squared difference of the pixel pairs that face each other across a patch border.

    Borders lie between columns (rows) k·p - 1 and k·p for k = 1 .. ⌈W/p⌉ - 1 (rows likewise); the mean runs over
    all pairs of all vertical and horizontal borders, channels and images together. No border: 0.
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    height, width = images.shape[-2:]
    columns = torch.tensor(list(range(patch_size, width, patch_size)), dtype=torch.long, device=images.device)
    rows = torch.tensor(list(range(patch_size, height, patch_size)), dtype=torch.long, device=images.device)
    pieces = []
    if len(columns):
        pieces.append((images[..., :, columns] - images[..., :, columns - 1]).pow(2).flatten())
    if len(rows):
        pieces.append((images[..., rows, :] - images[..., rows - 1, :]).pow(2).flatten())
    if not pieces:
        return images.new_zeros(())
    return torch.cat(pieces).mean()


# ============================================================================ the random view and the pixel space
def jitter_flip(
    images: torch.Tensor, max_shift: int, flip: bool, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, tuple[int, int, bool]]:
    """A random roll of (dy, dx) ∈ [-max_shift, max_shift]² pixels and, when ``flip``, a horizontal flip with
    probability 1/2 (drawn from ``generator``). Returns the view and (dy, dx, flipped)."""
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)) if max_shift > 0 else (0, 0)
    flipped = bool(flip and torch.rand((), generator=generator) < 0.5)
    out = torch.roll(images, shifts=(dy, dx), dims=(-2, -1)) if (dy or dx) else images
    if flipped:
        out = torch.flip(out, dims=(-1,))
    return out, (dy, dx, flipped)


def pixel_bounds(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high), each (3, 1, 1): the normalized values of pixels 0 and 1 per channel."""
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return (0 - m) / s, (1 - m) / s


def clamp_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Clamp normalized ``images`` (B, 3, H, W) in place to the normalized valid range [0, 1] per channel."""
    low, high = pixel_bounds(mean, std)
    with torch.no_grad():
        images.copy_(torch.maximum(torch.minimum(images, high.to(images)), low.to(images)))
    return images


def to_unit(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalized (B, 3, H, W) -> pixels in [0, 1]."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    return (images * s + m).clamp(0, 1)


def from_unit(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Pixels in [0, 1] (B, 3, H, W) -> normalized."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    return (images - m) / s


# ============================================================================ R_V: the BatchNorm prior and its CNN
def bn_layer_loss(inputs: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """‖mean − running_mean‖₂ + ‖var − running_var‖₂ of a BatchNorm2d's input (B, C, H, W), batch statistics
    over (B, H, W), biased variance."""
    x = inputs.float()
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    return (torch.linalg.vector_norm(mean - bn.running_mean.float())
            + torch.linalg.vector_norm(var - bn.running_var.float()))


class TinyBNCNN(nn.Module):
    """A small random BatchNorm CNN classifier (tests and the CPU demo): 3 conv-BN-ReLU stages, pooled, linear."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, num_classes)
        with torch.no_grad():  # running statistics that are not the trivial (0, 1), so the prior has a target
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def build_cnn(name: str, weights: str | None = None, seed: int | None = 0) -> nn.Module:
    """A frozen classifier in eval mode, by name.

    name: ``"tiny"`` (``TinyBNCNN``), ``"timm:<model>"`` (timm; ``weights`` not None: pretrained), or a
    torchvision model name (``resnet50``; ``weights``: torchvision's weights name, e.g. ``"DEFAULT"``,
    None = random). Random models are seeded by ``seed`` (None: the global RNG).
    """
    context = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with context:
        if seed is not None:
            torch.manual_seed(seed)
        if name == "tiny":
            model = TinyBNCNN()
        elif name.startswith("timm:"):
            import timm

            model = timm.create_model(name[5:], pretrained=weights is not None)
        else:
            import torchvision

            try:
                model = torchvision.models.get_model(name, weights=weights)
            except ValueError as error:
                raise ValueError(f"CNN {name!r}: {error}") from None
    return model.eval().requires_grad_(False)


class BatchNormPrior:
    """R_V: the BatchNorm-statistics distance of a frozen CNN on pixels in [0, 1] (DeepInversion).

    Forward pre-hooks on every BatchNorm2d record the layer's input during ``__call__`` only (removed after).
    The first BatchNorm layer's term is multiplied by ``first_multiplier``.
    """

    def __init__(self, cnn: nn.Module, first_multiplier: float = 10.0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.cnn = cnn
        self.layers = [m for m in cnn.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError(f"{type(cnn).__name__} has no BatchNorm2d layer: the R_V prior needs a BatchNorm CNN")
        self.first_multiplier = float(first_multiplier)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R_V, logits) of ``pixels`` (B, 3, H, W) in [0, 1]."""
        terms: list[torch.Tensor] = []
        handles = [bn.register_forward_pre_hook(lambda module, args: terms.append(bn_layer_loss(args[0], module)))
                   for bn in self.layers]
        try:
            param = next(self.cnn.parameters())
            logits = self.cnn(from_unit(pixels, self.mean, self.std).to(param.dtype))
        finally:
            for handle in handles:
                handle.remove()
        total = terms[0] * self.first_multiplier
        for term in terms[1:]:
            total = total + term
        return total, logits


@dataclass(frozen=True)
class PriorSettings:
    """R_V's CNN (docs/mimic.md "R_V, the BatchNorm prior").

    Attributes:
        cnn: the frozen BatchNorm CNN (``build_cnn``): "tiny" (a small random one, offline), a torchvision
            classifier name such as "resnet50", or "timm:<name>"; null: no R_V.
        weights: the CNN's weights: a torchvision weights name ("DEFAULT": ImageNet), for timm any value loads
            the pretrained weights; null: random weights.
        first_bn_multiplier: the weight of the first BatchNorm layer's term (the reference: 10).
    """

    cnn: str | None = "tiny"
    weights: str | None = None
    first_bn_multiplier: NonNegativeFloat = 10.0

    def build_cnn(self) -> nn.Module | None:
        """The frozen CNN (None when ``cnn`` is None)."""
        return build_cnn(self.cnn, self.weights) if self.cnn is not None else None
