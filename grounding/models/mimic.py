"""MIMIC: synthesizing an image whose vision-language-model answer to a prompt is a target text (docs/mimic.md).

Test-time optimization of pixels. The image v̂ lives in the VLM's normalized pixel space and minimizes

    γ1 · L_SCE + γ2 · L_base + β1 · R_V + β2 · R_patch + R_prior

- ``L_SCE`` (``answer_loss``): causal-LM cross-entropy of the target answer tokens given (image, prompt). The
  labels are built on the sequence AFTER the single image placeholder is expanded into the vision-token run
  (``expand_image_tokens`` / ``build_sequence``), so every label sits on the position the model predicts it at;
- ``L_base`` (``feature_statistics_loss``): per hooked layer of the vision tower (the patch embedding and every
  encoder block's MLP; ``FeatureStatistics``, a context manager whose hooks are removed on exit), the ℓ2
  distance between the per-channel mean / variance of the token features and those of reference images of the
  concept (``reference_statistics``, cached on disk);
- ``R_V`` (``BatchNormPrior``): DeepInversion's prior, the distance of a frozen BatchNorm CNN's batch statistics
  to its running statistics, the first BatchNorm layer weighted ×10;
- ``R_patch`` (``patch_border_loss``): the squared jump across the borders of the vision tower's patches;
- ``R_prior``: total variation (``tv_losses``: L1 and L2 over horizontal, vertical and both diagonal
  neighbours) and the ℓ2 norm of the image (``l2_loss``).

``synthesize`` runs the optimization (Adam with betas (0.5, 0.9), cosine learning rate, random roll jitter and
horizontal flips, clamp to the valid pixel range after every step). ``build_vlm`` loads an image-text-to-text
model from the hub or a folder (LLaVA-1.5 class by default) or builds ``"tiny"``, a random LLaVA with an
offline tokenizer, for tests and the CPU demo. The metrics (``exact_match``, ``token_f1``, ``clip_score``,
``lpips_diversity``, verifier top-1) are computed by ``grounding.lightning.mimic_module``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from grounding.data.coco import IMAGENET_MEAN, IMAGENET_STD  # R_V's CNN input normalization
from grounding.utils import write_atomic

IGNORE_LABEL = -100
"""Label of positions the cross-entropy skips (transformers' convention)."""

LLAVA_PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
"""LLaVA-1.5's conversation format; ``<image>`` is the image placeholder, ``{prompt}`` the question."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: the loss terms, in the order they are reported
TERMS = ("sce", "base", "bn", "patch", "tv_l1", "tv_l2", "l2")


# ============================================================================ sequences and labels
def expand_image_tokens(
    input_ids: torch.Tensor, image_token_id: int, count: int, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace every ``image_token_id`` of ``input_ids`` (L,) by ``count`` copies, as a LLaVA processor does.

    labels: (L,) labels of the unexpanded sequence (None: IGNORE_LABEL everywhere); they are carried along with
    their tokens, and the expanded image positions get IGNORE_LABEL. Returns (input_ids, labels), both of length
    L + (count - 1) · (number of image tokens).
    """
    if input_ids.dim() != 1:
        raise ValueError(f"expand_image_tokens takes one sequence (L,), got shape {tuple(input_ids.shape)}")
    if count < 1:
        raise ValueError(f"the image expands into at least one token, got count={count}")
    labels = torch.full_like(input_ids, IGNORE_LABEL) if labels is None else labels
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape")
    is_image = input_ids == image_token_id
    repeats = torch.where(is_image, count, 1)
    ids = torch.repeat_interleave(input_ids, repeats)
    out_labels = torch.repeat_interleave(torch.where(is_image, IGNORE_LABEL, labels), repeats)
    return ids, out_labels


def build_sequence(
    prompt_ids: Sequence[int], answer_ids: Sequence[int], image_token_id: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training sequence of one (prompt, answer) pair: prompt tokens (with exactly one image placeholder)
    then answer tokens, the image expanded to ``count`` tokens. Labels are IGNORE_LABEL everywhere except on
    the answer tokens, which carry their own ids (the model shifts them: position t predicts token t + 1)."""
    occurrences = sum(int(t == image_token_id) for t in prompt_ids)
    if occurrences != 1:
        raise ValueError(f"the prompt must hold exactly one image token (id {image_token_id}); it holds {occurrences}")
    if not answer_ids:
        raise ValueError("the target answer has no token")
    ids = torch.tensor(list(prompt_ids) + list(answer_ids), dtype=torch.long)
    labels = torch.tensor([IGNORE_LABEL] * len(prompt_ids) + list(answer_ids), dtype=torch.long)
    return expand_image_tokens(ids, image_token_id, count, labels)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_SCE: mean cross-entropy of the labelled tokens. logits (B, L, V) at every position; labels (B, L), the
    token each position's NEXT position holds is predicted by it (shifted here), IGNORE_LABEL skipped."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:].to(shifted.device)
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_LABEL)


# ============================================================================ image priors
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


# ============================================================================ feature statistics (L_base)
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


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision encoder of an image-text-to-text model (``model.model.vision_tower`` in transformers' LLaVA)."""
    for owner in (model, getattr(model, "model", None)):
        for name in ("vision_tower", "vision_model", "visual"):
            tower = getattr(owner, name, None) if owner is not None else None
            if isinstance(tower, nn.Module):
                return tower
    raise ValueError(f"{type(model).__name__} has no vision tower attribute (vision_tower / vision_model / visual)")


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


# ============================================================================ reference statistics and cache
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
                pixels = torch.from_numpy(__import__("numpy").asarray(image.convert("RGB"), dtype="uint8").copy())
        except OSError as error:
            raise ValueError(f"cannot read reference image {path}: {error}") from error
        pixels = pixels.permute(2, 0, 1)[None].float() / 255
        images.append(F.interpolate(pixels, size=(image_size, image_size), mode="bicubic", antialias=True,
                                    align_corners=False).clamp(0, 1)[0])
    return torch.stack(images)


def compute_reference_statistics(vlm: "VLM", images: torch.Tensor, batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
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
    vlm: "VLM", folder: str | Path, cache_dir: str | Path | None = None, batch_size: int = 8
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


# ============================================================================ BatchNorm prior (R_V) and CNNs
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


# ============================================================================ the VLM
@dataclass
class VLM:
    """An image-text-to-text model with what MIMIC needs around it.

    image_token_id: the placeholder the prompt holds once; num_image_tokens: how many tokens it expands into
    (patches, plus the CLS token when the model keeps it); mean / std: the model's pixel normalization.
    """

    model: nn.Module
    tokenizer: Any
    name: str
    image_token: str
    image_token_id: int
    image_size: int
    patch_size: int
    num_image_tokens: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    prompt_template: str = LLAVA_PROMPT_TEMPLATE
    extra: dict = field(default_factory=dict)

    def prompt_text(self, prompt: str) -> str:
        return self.prompt_template.replace("<image>", self.image_token).format(prompt=prompt)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the formatted prompt, with the tokenizer's begin-of-sequence token, unexpanded."""
        return list(self.tokenizer(self.prompt_text(prompt), add_special_tokens=True)["input_ids"])

    def answer_ids(self, target: str, prompt: str | None = None) -> list[int]:
        """Token ids of the answer " " + target followed by end-of-sequence.

        With ``prompt``: the ids that tokenizing prompt and answer together adds after the prompt's own ids, so
        that a SentencePiece tokenizer splits the answer as it would in the whole conversation; the answer
        tokenized alone (no special tokens) when the prompt's ids are not a prefix of the whole.
        """
        ids = None
        if prompt is not None:
            prompt_ids = self.prompt_ids(prompt)
            whole = list(self.tokenizer(self.prompt_text(prompt) + " " + target.strip(), add_special_tokens=True)["input_ids"])
            if whole[:len(prompt_ids)] == prompt_ids and len(whole) > len(prompt_ids):
                ids = whole[len(prompt_ids):]
        if ids is None:
            ids = list(self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and ids and ids[-1] == eos:  # a tokenizer that appends it itself
            ids = ids[:-1]
        return ids + ([eos] if eos is not None else [])

    def sequence(self, prompt: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of (prompt, target), the image expanded (``build_sequence``)."""
        return build_sequence(self.prompt_ids(prompt), self.answer_ids(target, prompt), self.image_token_id,
                              self.num_image_tokens)


TINY_WORDS = (
    "what", "is", "in", "the", "image", "a", "an", "this", "describe", "user", "assistant", "goldfish", "photo",
    "of", "shape", "colour", "color", "which", "there", "red", "blue", "green", "yellow", "purple", "orange",
    "circle", "square", "triangle", "star", "diamond", "?", ":", ".",
)


def build_tiny_tokenizer(words: Sequence[str] = TINY_WORDS):
    """An offline lower-casing WordPiece tokenizer for the tiny VLM, built in memory.

    The vocabulary is ``grounding.models.tokenizer.wordpiece_vocabulary`` (any lower-case word falls back to
    single-character pieces) plus ``<pad>``, ``<s>`` (added in front of every sequence), ``</s>`` and the
    image placeholder ``<image>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from grounding.models.tokenizer import DEFAULT_WORDS, wordpiece_vocabulary

    vocabulary = wordpiece_vocabulary(tuple(dict.fromkeys(tuple(DEFAULT_WORDS) + tuple(words))))
    specials = ["<pad>", "<s>", "</s>", "<image>"]
    vocab = {token: index for index, token in enumerate(vocabulary + specials)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="[UNK]")


#: the tiny random LLaVA: a 64-px CLIP vision tower with 8-px patches (64 image tokens) and a 2-block Llama
TINY_VLM = {
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 64, "patch_size": 8},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2, "max_position_embeddings": 512},
}

#: LLaVA-1.5-7B sizes (CLIP ViT-L/14 at 336 px, Llama-2-7B / Vicuna), random weights, for the GPU benchmark
LLAVA_7B_VLM = {
    "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "image_size": 336, "patch_size": 14, "projection_dim": 768},
    "text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "vocab_size": 32064},
}


def build_random_llava(sizes: dict = TINY_VLM, seed: int | None = 0, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", name: str = "tiny") -> VLM:
    """A random ``LlavaForConditionalGeneration`` of ``sizes`` with the offline tiny tokenizer (a text vocabulary
    larger than the tokenizer's, as in ``LLAVA_7B_VLM``, just leaves ids unused)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = dict(sizes["text"])
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    text_config = LlamaConfig(**text, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    vision_config = CLIPVisionConfig(**sizes["vision"])
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2)
    context = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with context:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                model = LlavaForConditionalGeneration(config)
            finally:
                torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval().requires_grad_(False)
    side = vision_config.image_size // vision_config.patch_size
    return VLM(model, tokenizer, name, "<image>", image_token_id, vision_config.image_size, vision_config.patch_size,
               side * side, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def build_vlm(name_or_path: str = "tiny", dtype: torch.dtype | None = None, prompt_template: str | None = None) -> VLM:
    """The VLM to invert: ``"tiny"`` (``build_random_llava``), else a hub id or local folder of a transformers
    image-text-to-text model with its processor (``llava-hf/llava-1.5-7b-hf``: ``LlavaForConditionalGeneration``;
    other architectures through ``AutoModelForImageTextToText``). prompt_template: the conversation format with
    ``<image>`` and ``{prompt}`` (default LLaVA-1.5's)."""
    if name_or_path == "tiny":
        vlm = build_random_llava(dtype=dtype or torch.float32)
    else:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

        config = AutoConfig.from_pretrained(name_or_path)
        loader = LlavaForConditionalGeneration if config.model_type == "llava" else AutoModelForImageTextToText
        model = loader.from_pretrained(name_or_path, dtype=dtype or torch.float32).eval().requires_grad_(False)
        processor = AutoProcessor.from_pretrained(name_or_path)
        tokenizer = processor.tokenizer
        image_token = getattr(processor, "image_token", None) or "<image>"
        image_token_id = getattr(config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_index", None)
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        count = side * side + (0 if strategy == "default" else 1)
        image_processor = processor.image_processor
        mean = tuple(getattr(image_processor, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        std = tuple(getattr(image_processor, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        vlm = VLM(model, tokenizer, str(name_or_path), image_token, int(image_token_id), vision.image_size,
                  vision.patch_size, count, mean, std)
    if prompt_template is not None:
        if "<image>" not in prompt_template or "{prompt}" not in prompt_template:
            raise ValueError(f"prompt_template must hold '<image>' and '{{prompt}}', got {prompt_template!r}")
        vlm.prompt_template = prompt_template
    return vlm


def vlm_logits(vlm: VLM, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, L, V) of the VLM on normalized ``pixel_values`` (B, 3, S, S) and expanded ``input_ids`` (B, L)."""
    dtype = next(vision_tower(vlm.model).parameters()).dtype
    out = vlm.model(input_ids=input_ids, pixel_values=pixel_values.to(dtype), attention_mask=torch.ones_like(input_ids),
                    use_cache=False)
    return out.logits


def generate_answers(vlm: VLM, pixel_values: torch.Tensor, prompt: str, max_new_tokens: int = 16) -> list[str]:
    """The VLM's greedy answers to ``prompt`` on each normalized image of ``pixel_values`` (B, 3, S, S)."""
    ids, _ = expand_image_tokens(torch.tensor(vlm.prompt_ids(prompt)), vlm.image_token_id, vlm.num_image_tokens)
    ids = ids[None].expand(pixel_values.shape[0], -1).to(pixel_values.device)
    dtype = next(vision_tower(vlm.model).parameters()).dtype
    with torch.no_grad():
        out = vlm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values.to(dtype),
                                 max_new_tokens=max_new_tokens, do_sample=False)
    return [vlm.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]


# ============================================================================ the objective and the optimization
@dataclass
class MimicWeights:
    """The weights of the loss terms (defaults: the reference settings, docs/mimic.md)."""

    sce: float = 0.05
    bn: float = 0.005
    base: float = 1e-4
    patch: float = 1e-5
    tv_l1: float = 1e-4
    tv_l2: float = 1e-6
    l2: float = 1e-6

    def __post_init__(self) -> None:
        for name in TERMS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"weight {name} must be a finite number >= 0, got {value!r}")


class MimicObjective:
    """The MIMIC loss of a batch of images for one (prompt, target) pair.

    vlm: the model; prior: the R_V prior (None: R_V left out); weights: ``MimicWeights``.
    ``losses`` returns every computed term (unweighted, float32) and ``total`` (weighted sum); a term whose
    weight is 0 is not computed, and L_base needs target statistics.
    """

    def __init__(self, vlm: VLM, weights: MimicWeights, prior: BatchNormPrior | None = None) -> None:
        self.vlm, self.weights, self.prior = vlm, weights, prior
        self._recorder: FeatureStatistics | None = None

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """Keep L_base's hooks on the vision tower for a whole block of forward AND backward passes (removed on
        exit). Needed under gradient checkpointing: the backward pass re-runs the blocks' forward, hooks
        included, and must find the same hooks as the first pass did."""
        if self._recorder is not None:
            yield
            return
        with FeatureStatistics(vision_tower(self.vlm.model)) as recorder:
            self._recorder = recorder
            try:
                yield
            finally:
                self._recorder = None

    def losses(self, images: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
               target_statistics: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
               terms: Sequence[str] = TERMS) -> dict[str, torch.Tensor]:
        """images: normalized (B, 3, S, S) (the jittered view); input_ids / labels: (B, L)."""
        w = self.weights
        wanted = {t for t in terms if getattr(w, t) > 0}
        if target_statistics is None:
            wanted.discard("base")
        if self.prior is None:
            wanted.discard("bn")
        out: dict[str, torch.Tensor] = {}
        tower = vision_tower(self.vlm.model)
        recorder = None
        if "base" in wanted:
            recorder = self._recorder if self._recorder is not None else FeatureStatistics(tower)
        own_hooks = recorder is not None and recorder is not self._recorder
        with recorder if own_hooks else contextlib.nullcontext():
            if "sce" in wanted:
                out["sce"] = answer_loss(vlm_logits(self.vlm, images, input_ids), labels)
            elif recorder is not None:  # L_base alone: the vision tower is enough
                tower(images.to(next(tower.parameters()).dtype))
            if recorder is not None:
                out["base"] = feature_statistics_loss(recorder.current(), target_statistics)
        pixels = None
        if "bn" in wanted:
            pixels = to_unit(images.float(), self.vlm.mean, self.vlm.std)
            out["bn"], _ = self.prior(pixels)
        if "patch" in wanted:
            out["patch"] = patch_border_loss(images.float(), self.vlm.patch_size)
        if "tv_l1" in wanted or "tv_l2" in wanted:
            l1, l2 = tv_losses(images.float())
            if "tv_l1" in wanted:
                out["tv_l1"] = l1
            if "tv_l2" in wanted:
                out["tv_l2"] = l2
        if "l2" in wanted:
            out["l2"] = l2_loss(images.float())
        out = {name: value.float() for name, value in out.items()}
        total = images.new_zeros((), dtype=torch.float32)
        for name, value in out.items():
            total = total + getattr(w, name) * value
        out["total"] = total
        return out


@dataclass
class SynthesisSettings:
    """The optimization (defaults: the reference settings, docs/mimic.md)."""

    iterations: int = 3000
    lr: float = 0.25
    lr_min: float = 0.005
    betas: tuple[float, float] = (0.5, 0.9)
    jitter: int = 8
    flip: bool = True
    samples: int = 1

    def __post_init__(self) -> None:
        for name in ("iterations", "samples", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "samples" else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name == 'samples' else 0}, got {value!r}")
        if not (self.lr > 0) or not (0 <= self.lr_min <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= lr_min <= lr, got lr={self.lr!r}, lr_min={self.lr_min!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclass
class SynthesisResult:
    """images: (B, 3, S, S) in [0, 1]; normalized: the optimized normalized values; history: per iteration,
    {term: unweighted value} (plus ``total``)."""

    images: torch.Tensor
    normalized: torch.Tensor
    history: list[dict[str, float]]


def synthesize(
    objective: MimicObjective, prompt: str, target: str, settings: SynthesisSettings,
    target_statistics: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
    callback: Callable[[int, torch.Tensor, dict[str, float]], None] | None = None,
) -> SynthesisResult:
    """Optimize ``settings.samples`` images so that the VLM answers ``prompt`` with ``target``.

    Random init N(0, 1) in the normalized space (clamped), Adam(betas), cosine learning rate from lr to lr_min
    over the iterations, a random roll ± jitter and flip per iteration (the same for the batch), clamp to the
    valid pixel range after every step. Every draw comes from ``generator`` (a CPU generator).
    callback(iteration, normalized images (detached), losses) is called after every step.
    """
    vlm = objective.vlm
    size = vlm.image_size
    ids, labels = vlm.sequence(prompt, target)
    ids = ids[None].expand(settings.samples, -1).to(device)
    labels = labels[None].expand(settings.samples, -1).to(device)
    hooks = objective.hooked() if target_statistics is not None and objective.weights.base > 0 else contextlib.nullcontext()
    with torch.inference_mode(False), torch.enable_grad(), hooks:  # Lightning tests under inference mode
        ids, labels = ids.clone(), labels.clone()
        init = torch.randn((settings.samples, 3, size, size), generator=generator)
        images = nn.Parameter(clamp_pixels(init, vlm.mean, vlm.std).to(device))
        optimizer = torch.optim.Adam([images], lr=settings.lr, betas=tuple(settings.betas))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(settings.iterations, 1), eta_min=settings.lr_min)
        history: list[dict[str, float]] = []
        for iteration in range(settings.iterations):
            view, _ = jitter_flip(images, settings.jitter, settings.flip, generator)
            losses = objective.losses(view, ids, labels, target_statistics)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            schedule.step()
            clamp_pixels(images.data, vlm.mean, vlm.std)
            values = {k: float(v.detach()) for k, v in losses.items()}
            history.append(values)
            if callback is not None:
                callback(iteration, images.detach(), values)
    normalized = images.detach()
    return SynthesisResult(to_unit(normalized.float(), vlm.mean, vlm.std), normalized, history)


# ============================================================================ metrics
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a / an / the), single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, target: str) -> float:
    """1.0 when the normalized answer equals the normalized target, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(target))


def token_f1(prediction: str, target: str) -> float:
    """F1 of the normalized words (a bag of words, counted with multiplicity); two empty texts: 1.0."""
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(target).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    remaining = list(wanted)
    common = 0
    for word in predicted:
        if word in remaining:
            remaining.remove(word)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def clip_score(backbone: Any, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """CLIPScore 100 · max(cos(image, text), 0) per pair; images (B, 3, H, W) in [0, 1], a
    ``grounding.models.clip.ClipBackbone``."""
    with torch.no_grad():
        image_embeddings = F.normalize(backbone.encode_image(backbone.preprocess(images)).float(), dim=-1)
        text_embeddings = F.normalize(backbone.encode_text(list(texts)).float(), dim=-1)
    return 100 * (image_embeddings * text_embeddings.to(image_embeddings.device)).sum(-1).clamp_min(0)


def load_lpips(net: str = "alex", pretrained_backbone: bool = True) -> nn.Module:
    """The LPIPS distance (the optional ``lpips`` package); a clear error when it is not installed.

    pretrained_backbone: False gives a random backbone (offline tests); the learned linear heads are the
    package's own either way."""
    try:
        import lpips
    except ImportError:
        raise ImportError("LPIPS diversity needs the optional package lpips: pip install lpips "
                          "(or leave model.lpips_diversity false)") from None
    import warnings

    with warnings.catch_warnings():  # lpips calls torchvision's deprecated pretrained= argument
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False).eval().requires_grad_(False)


def lpips_diversity(distance: nn.Module, images: torch.Tensor) -> float:
    """Mean LPIPS distance over all pairs of ``images`` (B >= 2, (B, 3, H, W) in [0, 1])."""
    if images.shape[0] < 2:
        raise ValueError("LPIPS diversity needs at least 2 samples of a concept (model.samples_per_target >= 2)")
    scaled = images.float() * 2 - 1
    values = []
    with torch.no_grad():
        for i in range(images.shape[0]):
            for j in range(i + 1, images.shape[0]):
                values.append(float(distance(scaled[i:i + 1], scaled[j:j + 1]).flatten()[0]))
    return sum(values) / len(values)


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' (non-reentrant) activation checkpointing of the model's blocks (``gradient_checkpointing_enable``
    before transformers 5.x renamed it). It runs in training mode only: see ``train_mode``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def train_mode(module: nn.Module, enabled: bool) -> Iterator[None]:
    """``module.train()`` inside the block when ``enabled`` (transformers' gradient checkpointing runs only in
    training mode; the VLMs have no dropout at inference settings), restored after."""
    if not enabled:
        yield
        return
    was = module.training
    module.train()
    try:
        yield
    finally:
        module.train(was)
