"""LeGrad explainability maps of CLIP query embeddings (docs/maskinversion.md).

For a query embedding e (unit norm) and a block l of the vision tower:

    f_l = normalize(visual_projection(post_layernorm(mean over ALL tokens of the block's output)))
    s   = e · f_l,     G = ∂s/∂A_l   (A_l: post-softmax attention, heads h × (T × T))
    E_l = mean over heads and query rows of ReLU(G), CLS key dropped, on the patch grid,

upsampled bilinearly by the patch size; the maps of the selected layers are summed and then min-max
normalized per map. Query i sees only its own copy of its image.

Two ways to compute the same maps:
- ``method="autograd"``: the definition, with ``torch.autograd.grad`` through the block (pass
  ``create_graph=True`` to differentiate the maps again: MaskInversion's naive mode).
- ``method="decomposed"``: s is linear in e, so G = (∂f/∂o)ᵀe ⊗ v, where o is the attention output of the
  block and v its values. Everything but e is computed once per image (``prepare``); a query costs one
  contraction chain (``_attention_output_gradient``) with no backward pass through the ViT. With
  ``precompute`` the chain is applied once to the P basis vectors of the embedding space, after which a
  query is a single (P → T·d) matrix product — cheaper when many queries or iterations reuse an image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from grounding.models.clip import ClipBackbone, attention_block

METHODS = ("decomposed", "autograd")


@dataclass
class LayerState:
    """What the decomposed maps need of one block, for one image (T tokens, d width, F MLP width)."""

    index: int
    value: torch.Tensor        # (h, T, d/h)
    mid_hat: torch.Tensor      # (T, d) normalized input of LayerNorm2
    inv_std: torch.Tensor      # (T, 1) its 1/σ
    act_grad: torch.Tensor     # (T, F) derivative of the MLP activation at fc1's output
    jacobian: torch.Tensor     # (P, d) ∂f/∂(mean token)
    basis: torch.Tensor | None = None  # (P, T, d): the chain applied to the P basis vectors


@dataclass
class LeGradState:
    """One image prepared for LeGrad: the tokens entering the first selected block, per-block states."""

    layers: list[int]
    grid: tuple[int, int]
    image_size: tuple[int, int]
    tokens_in: torch.Tensor               # (1, T, d)
    global_embedding: torch.Tensor        # (P,) pooled CLS, projected, not normalized
    blocks: list[LayerState] = field(default_factory=list)


def _activation_derivative(activation, pre_activation: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        point = pre_activation.detach().requires_grad_(True)
        (derivative,) = torch.autograd.grad(activation(point).sum(), point)
    return derivative


def _pooled_jacobian(backbone: ClipBackbone, mean_token: torch.Tensor) -> torch.Tensor:
    """(P, d): Jacobian of m -> normalize(proj(post_ln(m))) at the block's mean token m."""
    with torch.enable_grad():
        return torch.autograd.functional.jacobian(backbone.project_pooled, mean_token.detach())


@torch.no_grad()
def prepare(
    backbone: ClipBackbone, pixel_values: torch.Tensor, layers: Sequence[int] = (-1,), decomposed: bool = True
) -> LeGradState:
    """Run one image (1, 3, H, W) once; keep what the maps of any query need (no grad)."""
    if pixel_values.dim() != 4 or pixel_values.shape[0] != 1:
        raise ValueError(f"prepare takes one image (1, 3, H, W), got {tuple(pixel_values.shape)}")
    indices = backbone.layer_indices(layers)
    height, width = pixel_values.shape[-2:]
    grid = (height // backbone.patch_size, width // backbone.patch_size)
    tokens = backbone.run_blocks(backbone.embed(pixel_values), 0, indices[0])
    state = LeGradState(indices, grid, (height, width), tokens, torch.empty(0))
    encoder = backbone.vision.encoder.layers
    for index in range(indices[0], backbone.num_layers):
        if index in indices and decomposed:
            layer = encoder[index]
            block = attention_block(layer, tokens)
            mid = block.mid[0]
            mean, var = mid.mean(-1, keepdim=True), mid.var(-1, unbiased=False, keepdim=True)
            inv_std = torch.rsqrt(var + layer.layer_norm2.eps)
            state.blocks.append(LayerState(
                index=index,
                value=block.value[0],
                mid_hat=(mid - mean) * inv_std,
                inv_std=inv_std,
                act_grad=_activation_derivative(layer.mlp.activation_fn, block.pre_activation[0]),
                jacobian=_pooled_jacobian(backbone, block.output[0].mean(0)),
            ))
        # the stream always goes through the model's own block, in both methods: one global embedding for both
        # (the decomposition's block rebuild agrees only to float rounding, which grew to a visible drift at 448 px)
        tokens = backbone.run_blocks(tokens, index, index + 1)
    state.global_embedding = backbone.model.visual_projection(backbone.vision.post_layernorm(tokens[0, 0]))
    return state


def _attention_output_gradient(layer, block: LayerState, queries: torch.Tensor) -> torch.Tensor:
    """(N, P) unit queries -> ∂s/∂o (N, T, d): s = e·f, o the block's attention output (heads concatenated).

    The transposed Jacobian of o -> f, written out for a CLIP block: f depends on o through out_proj,
    the residual, LayerNorm2 + MLP (per token) and the mean over tokens.
    """
    tokens = block.mid_hat.shape[0]
    u = queries @ block.jacobian / tokens                                      # ∂s/∂y_t, same for every t
    hidden = (u @ layer.mlp.fc2.weight)[:, None, :] * block.act_grad          # (N, T, F)
    grad_ln2 = hidden @ layer.mlp.fc1.weight                                  # (N, T, d)
    scaled = grad_ln2 * layer.layer_norm2.weight
    grad_mid = (
        scaled - scaled.mean(-1, keepdim=True) - block.mid_hat * (scaled * block.mid_hat).mean(-1, keepdim=True)
    ) * block.inv_std
    return (grad_mid + u[:, None, :]) @ layer.self_attn.out_proj.weight


def precompute_basis(backbone: ClipBackbone, state: LeGradState, chunk: int = 64) -> None:
    """Apply the contraction chain to the P basis vectors once per image (memory P·T·d per block)."""
    encoder = backbone.vision.encoder.layers
    for block in state.blocks:
        if block.basis is not None:
            continue
        dim = block.jacobian.shape[0]
        eye = torch.eye(dim, dtype=block.jacobian.dtype, device=block.jacobian.device)
        with torch.no_grad():
            block.basis = torch.cat(
                [_attention_output_gradient(encoder[block.index], block, eye[i:i + chunk]) for i in range(0, dim, chunk)]
            )


def attention_output_gradients(
    backbone: ClipBackbone, state: LeGradState, queries: torch.Tensor
) -> list[torch.Tensor]:
    """Per selected block, ∂s/∂o (N, T, d) for unit ``queries`` (N, P): the precomputed basis product if
    ``precompute_basis`` ran, else the contraction chain."""
    encoder = backbone.vision.encoder.layers
    out = []
    for block in state.blocks:
        heads, tokens, head_dim = block.value.shape
        if block.basis is not None:
            out.append((queries @ block.basis.reshape(block.basis.shape[0], -1)).view(-1, tokens, heads * head_dim))
        else:
            out.append(_attention_output_gradient(encoder[block.index], block, queries))
    return out


class _PositiveMean(torch.autograd.Function):
    """(N, h, T, d/h) ∂s/∂o and constant values v (h, T, d/h) -> (N, T) mean over heads and query rows of
    ReLU(∂s/∂o · vᵀ). Keeps only the sign pattern (bool) for the backward pass instead of the float
    (N, h, T, T) tensors autograd would keep, and its backward is a single batched product."""

    @staticmethod
    def forward(ctx, grad_o: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        scores = grad_o @ value.transpose(-1, -2)
        scores.clamp_(min=0)
        count = scores.shape[1] * scores.shape[2]
        ctx.save_for_backward(scores > 0, value)
        return scores.sum(dim=(1, 2)) / count

    @staticmethod
    def backward(ctx, grad_relevance: torch.Tensor):
        positive, value = ctx.saved_tensors
        count = positive.shape[1] * positive.shape[2]
        weighted = value * (grad_relevance / count)[:, None, :, None]          # (N, h, T, d/h)
        return positive.to(value.dtype) @ weighted, None


def relevance_from_gradients(state: LeGradState, output_gradients: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per selected block, (N, T): mean over heads and query rows of ReLU(∂s/∂A), ∂s/∂A[h,t,j] = ∂s/∂o[h,t]·v[h,j]."""
    out = []
    for block, grad_o in zip(state.blocks, output_gradients):
        heads, tokens, head_dim = block.value.shape
        grad_o = grad_o.view(-1, tokens, heads, head_dim).transpose(1, 2)    # (N, h, T, d/h)
        out.append(_PositiveMean.apply(grad_o, block.value))
    return out


def _relevance_decomposed(backbone: ClipBackbone, state: LeGradState, queries: torch.Tensor) -> list[torch.Tensor]:
    return relevance_from_gradients(state, attention_output_gradients(backbone, state, queries))


def _relevance_autograd(
    backbone: ClipBackbone, state: LeGradState, queries: torch.Tensor, create_graph: bool
) -> list[torch.Tensor]:
    """The definition: each query's own copy of the image through the selected blocks, autograd to A."""
    count = queries.shape[0]
    tokens = state.tokens_in.expand(count, -1, -1)
    encoder = backbone.vision.encoder.layers
    out = []
    with torch.enable_grad():
        for index in range(state.layers[0], state.layers[-1] + 1):
            if index not in state.layers:
                tokens = backbone.run_blocks(tokens, index, index + 1)
                continue
            leaf = {}

            def as_leaf(attention: torch.Tensor) -> torch.Tensor:
                leaf["attention"] = attention.detach().requires_grad_(True)
                return leaf["attention"]

            block = attention_block(encoder[index], tokens, as_leaf)
            score = (queries * backbone.pool_tokens(block.output)).sum()
            (grad_attention,) = torch.autograd.grad(score, leaf["attention"], create_graph=create_graph)
            out.append(F.relu(grad_attention).mean(dim=(1, 2)))
            tokens = block.output.detach()
    return out


def assemble_maps(
    relevance: list[torch.Tensor], grid: tuple[int, int], patch_size: int, out_size: tuple[int, int] | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Per-block (N, 1 + gh*gw) relevance -> (N, H, W) maps in [0, 1]: upsample each block's grid by the
    patch size (bilinear), sum over blocks, min-max normalize each map, then resize to ``out_size``."""
    total = None
    for values in relevance:
        grid_map = values[:, 1:].reshape(-1, 1, *grid)
        upsampled = F.interpolate(grid_map, scale_factor=patch_size, mode="bilinear", align_corners=False)
        total = upsampled if total is None else total + upsampled
    total = total[:, 0]
    low = total.amin(dim=(1, 2), keepdim=True)
    high = total.amax(dim=(1, 2), keepdim=True)
    maps = (total - low) / (high - low).clamp_min(eps)
    if out_size is not None and tuple(out_size) != tuple(maps.shape[-2:]):
        maps = F.interpolate(maps[:, None], size=tuple(out_size), mode="bilinear", align_corners=False)[:, 0]
    return maps


def maps_for_state(
    backbone: ClipBackbone, state: LeGradState, queries: torch.Tensor, method: str = "decomposed",
    out_size: tuple[int, int] | None = None, create_graph: bool = False,
) -> torch.Tensor:
    """(N, H, W) LeGrad maps of unit ``queries`` (N, P) on a prepared image."""
    if method == "decomposed":
        if not state.blocks:
            raise ValueError("the state was prepared without the decomposition (prepare(..., decomposed=False))")
        relevance = _relevance_decomposed(backbone, state, queries)
    elif method == "autograd":
        relevance = _relevance_autograd(backbone, state, queries, create_graph)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return assemble_maps(relevance, state.grid, backbone.patch_size, out_size)


def legrad(
    backbone: ClipBackbone,
    pixel_values: torch.Tensor,
    queries: torch.Tensor,
    layers: Sequence[int] = (-2, -1),
    image_index: torch.Tensor | Sequence[int] | None = None,
    method: str = "decomposed",
    chunk_size: int = 32,
) -> torch.Tensor:
    """LeGrad maps ``(N, H, W)`` in [0, 1] of ``queries`` (N, P) on ``pixel_values`` (B, 3, H, W).

    Query i explains image ``image_index[i]`` (default: image i when B == N, image 0 when B == 1).
    layers: vision blocks whose maps are summed (LeGrad's default: the last two; MaskInversion: the last).
    Queries are normalized here. Not differentiable (use ``maps_for_state`` for that).
    """
    if queries.dim() != 2:
        raise ValueError(f"queries must be (N, P), got {tuple(queries.shape)}")
    count, images = queries.shape[0], pixel_values.shape[0]
    if image_index is None:
        if images not in (1, count):
            raise ValueError(f"{images} images for {count} queries: pass image_index")
        image_index = [0] * count if images == 1 else list(range(count))
    image_index = torch.as_tensor(image_index, dtype=torch.long).cpu()
    if image_index.numel() != count or (image_index < 0).any() or (image_index >= images).any():
        raise ValueError(f"image_index must give an image in [0, {images}) for each of the {count} queries")
    queries = F.normalize(queries.to(pixel_values), dim=-1)  # the images' dtype and device
    maps = torch.empty(count, *pixel_values.shape[-2:], dtype=pixel_values.dtype, device=pixel_values.device)
    for image in image_index.unique().tolist():
        rows = (image_index == image).nonzero().flatten()
        state = prepare(backbone, pixel_values[image:image + 1], layers, decomposed=method == "decomposed")
        for start in range(0, rows.numel(), chunk_size):
            chunk = rows[start:start + chunk_size]
            with torch.no_grad():
                maps[chunk.to(maps.device)] = maps_for_state(backbone, state, queries[chunk.to(queries.device)], method)
    return maps
