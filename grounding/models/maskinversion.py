"""MaskInversion: localized embedding tokens (LETs) by test-time optimization (docs/maskinversion.md).

    from grounding.models.clip import build_clip
    from grounding.models.maskinversion import MaskInversion

    backbone = build_clip("openai/clip-vit-base-patch16", image_size=448)
    inverter = MaskInversion(backbone, iterations=10, lr=0.5, alpha=0.0, mode="decomposed")
    result = inverter(image, masks, return_maps=True)    # image (3, H, W) uint8, masks (N, H, W) bool
    result.embeddings   # (N, P) LETs, not normalized: compare with text embeddings by cosine
    result.maps         # (N, H, W) LeGrad maps of the last iteration, before its update step

Each LET starts at the image's global embedding; every iteration computes the LeGrad map of the
normalized LET (the last block by default), the loss soft Dice(map, mask) + α·(1 − cos(LET, global)),
averaged over masks, and one AdamW step on the LETs alone (the backbone is frozen).

``mode="naive"`` differentiates through the LeGrad gradient with second-order autograd every iteration:
each mask's copy of the image runs through the selected blocks (the blocks before them depend on neither
LET nor mask and run once). ``mode="decomposed"`` uses the gradient decomposition of
``grounding.models.legrad``: the image's part is computed once, each iteration is a contraction with the
LETs and a first-order backward pass through it alone. Both give the same gradients (tested in float64).
Masks are processed in chunks of ``chunk_size`` (each mask's loss term depends on its own LET only, so
per-chunk backward passes accumulate the exact gradient), which bounds memory at 448 px.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from grounding.models.clip import ClipBackbone
from grounding.models import legrad as lg

MODES = ("decomposed", "naive")
OPTIMIZERS = ("adamw", "adam", "sgd")
Mode = Literal["decomposed", "naive"]
Optimizer = Literal["adamw", "adam", "sgd"]


@dataclass
class MaskInversionSettings:
    """The optimization of the LETs (``MaskInversion``'s arguments but the backbone and α).

    Attributes:
        iterations: optimizer steps per image (0: the LETs stay the global embedding).
        lr: the optimizer's learning rate.
        weight_decay: the optimizer's weight decay.
        optimizer: adamw, adam or sgd.
        mode: decomposed (the gradient decomposition, one first-order backward per step) or naive
            (second-order autograd through the LeGrad gradient, the reference behaviour).
        layers: vision blocks of the LeGrad map (negative: from the end; the last one by default).
        chunk_size: masks per forward/backward chunk (bounds memory at 448 px).
    """

    iterations: NonNegativeInt = 10
    lr: PositiveFloat = 0.5
    weight_decay: NonNegativeFloat = 0.0
    optimizer: Optimizer = "adamw"
    mode: Mode = "decomposed"
    layers: list[int] = field(default_factory=lambda: [-1])
    chunk_size: PositiveInt = 16


def soft_dice_loss(maps: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-map soft Dice loss 1 − (2ΣE·M + s)/(ΣE + ΣM + s) over the last two dims: (N, H, W) -> (N,)."""
    masks = masks.to(maps.dtype)
    overlap = (maps * masks).sum(dim=(-2, -1))
    return 1.0 - (2.0 * overlap + smooth) / (maps.sum(dim=(-2, -1)) + masks.sum(dim=(-2, -1)) + smooth)


@dataclass
class MaskInversionResult:
    embeddings: torch.Tensor                  # (N, P), not normalized
    maps: torch.Tensor | None = None          # (N, H, W) at the masks' size
    losses: list[float] = field(default_factory=list)   # mean loss of each iteration (before its step)
    initial_maps: torch.Tensor | None = None  # (N, H, W) maps of the initial LETs (first iteration)
    global_embedding: torch.Tensor | None = None  # (P,) the image's global embedding, not normalized


class MaskInversion:
    """Test-time optimization of one LET per mask. See the module docstring.

    iterations / lr / weight_decay / optimizer ("adamw", "adam", "sgd"): the optimization of the LETs.
    alpha: weight of the regularizer 1 − cos(LET, global embedding) (0 for class masks, 5 for referring
        expressions in the paper's protocols).
    mode: "decomposed" (default) or "naive" (second-order autograd, the reference behaviour).
    layers: vision blocks of the LeGrad map (default: the last one, as MaskInversion).
    chunk_size: masks per forward/backward chunk.
    precompute: decomposed mode: apply the contraction chain to the embedding basis once per image (True),
        per mask every iteration (False), or choose by the number of mask-iterations (None) [choice].
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        iterations: int = 10,
        lr: float = 0.5,
        alpha: float = 0.0,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        mode: str = "decomposed",
        layers: Sequence[int] = (-1,),
        chunk_size: int = 16,
        precompute: bool | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.backbone = backbone
        self.iterations = int(iterations)
        self.lr = float(lr)
        self.alpha = float(alpha)
        self.weight_decay = float(weight_decay)
        self.optimizer = optimizer
        self.mode = mode
        self.layers = backbone.layer_indices(layers)
        self.chunk_size = int(chunk_size)
        self.precompute = precompute

    # -- pieces, public for tests and for callers that reuse a prepared image ----------------------------
    def prepare(self, image: torch.Tensor) -> lg.LeGradState:
        """An image (3, H, W) (uint8 or [0, 1] float) or preprocessed pixels (1, 3, S, S) -> its LeGrad state."""
        pixels = image if image.dim() == 4 else self.backbone.preprocess(image)
        return lg.prepare(self.backbone, pixels, self.layers, decomposed=self.mode == "decomposed")

    def _use_basis(self, masks: int) -> bool:
        if self.precompute is not None:
            return bool(self.precompute)
        layer = self.backbone.vision.encoder.layers[self.layers[-1]]
        hidden, width = layer.mlp.fc1.out_features, self.backbone.embed_dim
        # per mask-iteration the chain costs ~4·T·F·d flops (forward + backward), the basis product ~4·T·P·d;
        # the basis itself costs P chains, ~2·T·F·d·P, once per image
        saved = masks * max(self.iterations, 1) * 2 * (hidden - width)
        return saved > width * hidden

    def _regularizer(self, state: lg.LeGradState, queries: torch.Tensor) -> torch.Tensor:
        """(N,) α·(1 − cos(LET, global embedding))."""
        reference = F.normalize(state.global_embedding, dim=-1)
        return self.alpha * (1.0 - queries @ reference)

    def losses(
        self, state: lg.LeGradState, lets: torch.Tensor, masks: torch.Tensor, create_graph: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-mask loss (N,) and maps (N, H, W) of ``lets`` (N, P) against ``masks`` (N, H, W).

        Differentiable w.r.t. ``lets`` (naive mode needs ``create_graph=True`` for that).
        """
        queries = F.normalize(lets, dim=-1)
        method = "decomposed" if self.mode == "decomposed" else "autograd"
        maps = lg.maps_for_state(self.backbone, state, queries, method, tuple(masks.shape[-2:]), create_graph)
        loss = soft_dice_loss(maps, masks)
        if self.alpha:
            loss = loss + self._regularizer(state, queries)
        return loss, maps

    def step_gradient(
        self, state: lg.LeGradState, lets: torch.Tensor, masks: torch.Tensor, keep_maps: bool = False
    ) -> tuple[float, torch.Tensor, torch.Tensor | None]:
        """Mean loss, its gradient w.r.t. ``lets`` (N, P), and the maps (if asked), chunk by chunk."""
        lets = lets.detach().requires_grad_(True)
        with torch.enable_grad():
            if self.mode == "decomposed" and all(block.basis is not None for block in state.blocks):
                total, maps = self._basis_step(state, lets, masks, keep_maps)
            else:
                total, maps = 0.0, []
                count = lets.shape[0]
                for start in range(0, count, self.chunk_size):
                    rows = slice(start, start + self.chunk_size)
                    loss, chunk_maps = self.losses(state, lets[rows], masks[rows], create_graph=self.mode == "naive")
                    chunk_loss = loss.sum() / count
                    chunk_loss.backward()
                    total += float(chunk_loss.detach())
                    if keep_maps:
                        maps.append(chunk_maps.detach())
        return total, lets.grad, (torch.cat(maps) if keep_maps else None)

    def _basis_step(self, state: lg.LeGradState, lets: torch.Tensor, masks: torch.Tensor, keep_maps: bool):
        """With the precomputed basis, ∂s/∂o of all masks is one matrix product: run it (and its backward)
        once for all masks, and only the per-mask maps and losses chunk by chunk."""
        count = lets.shape[0]
        queries = F.normalize(lets, dim=-1)
        grads = lg.attention_output_gradients(self.backbone, state, queries)
        leaves = [g.detach().requires_grad_(True) for g in grads]
        total, maps = 0.0, []
        for start in range(0, count, self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            relevance = lg.relevance_from_gradients(state, [leaf[rows] for leaf in leaves])
            chunk_maps = lg.assemble_maps(relevance, state.grid, self.backbone.patch_size, tuple(masks.shape[-2:]))
            chunk_loss = soft_dice_loss(chunk_maps, masks[rows]).sum() / count
            chunk_loss.backward()
            total += float(chunk_loss.detach())
            if keep_maps:
                maps.append(chunk_maps.detach())
        outputs, cotangents = list(grads), [leaf.grad for leaf in leaves]
        if self.alpha:
            regularizer = self._regularizer(state, queries).sum() / count
            total += float(regularizer.detach())
            outputs.append(regularizer)
            cotangents.append(None)
        torch.autograd.backward(outputs, cotangents)
        return total, maps

    def _optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)

    def _check(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if image.dim() not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
        if masks.dim() != 3 or masks.shape[0] == 0:
            raise ValueError(f"masks must be (N, H, W) with N >= 1, got {tuple(masks.shape)}")
        if image.dim() == 3 and tuple(masks.shape[-2:]) != tuple(image.shape[-2:]):
            raise ValueError(
                f"masks are {tuple(masks.shape[-2:])} but the image is {tuple(image.shape[-2:])}: give masks at the image's size"
            )
        masks = masks.clone()  # a normal tensor even if it was made under inference mode
        if masks.dtype == torch.bool:
            return masks
        if masks.is_floating_point() and ((masks < 0) | (masks > 1)).any():
            raise ValueError("float masks must lie in [0, 1]")
        return masks

    def __call__(
        self, image: torch.Tensor, masks: torch.Tensor, return_maps: bool = False, init: torch.Tensor | None = None
    ) -> MaskInversionResult:
        """LETs (N, P) for ``masks`` (N, H, W) on ``image`` (3, H, W); ``init`` replaces the global embedding."""
        with torch.inference_mode(False):
            image = image.clone()
            masks = self._check(image, masks)
            device = self.backbone.mean.device
            masks = masks.to(device)
            state = self.prepare(image.to(device))
            count = masks.shape[0]
            if self.mode == "decomposed" and self._use_basis(count):
                lg.precompute_basis(self.backbone, state)
            start = state.global_embedding if init is None else init.to(state.global_embedding)
            if start.shape not in ((state.global_embedding.shape[0],), (count, state.global_embedding.shape[0])):
                raise ValueError(
                    f"init must be (P,) or (N, P) = ({count}, {state.global_embedding.shape[0]}), got {tuple(start.shape)}"
                )
            lets = start.detach().clone().expand(count, -1).clone() if start.dim() == 1 else start.detach().clone()
            lets.requires_grad_(True)
            optimizer = self._optimizer([lets])
            result = MaskInversionResult(embeddings=lets, global_embedding=state.global_embedding.detach())
            for iteration in range(self.iterations):
                last = iteration == self.iterations - 1
                loss, grad, maps = self.step_gradient(state, lets, masks, keep_maps=return_maps and (last or iteration == 0))
                if return_maps and iteration == 0:
                    result.initial_maps = maps
                if return_maps and last:
                    result.maps = maps
                optimizer.zero_grad(set_to_none=True)
                lets.grad = grad
                optimizer.step()
                result.losses.append(loss)
            if return_maps and self.iterations == 0:
                with torch.no_grad():
                    _, result.maps = self.losses(state, lets.detach(), masks)
                result.initial_maps = result.maps
            result.embeddings = lets.detach()
        return result
