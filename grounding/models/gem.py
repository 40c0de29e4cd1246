"""GEM (Grounding Everything Module) and the training-free baselines on a CLIP ViT (docs/gem.md).

GEM adds a parallel "self-self attention" pathway to the last ``depth - 1`` blocks of the vision tower.
With x_ori the original stream (run unchanged: attention + MLP) and x_gem the GEM stream, which starts equal
to the input of the first modified block, each modified block does

    z = LN1(x_ori);   q, k, v = the block's own projections of z, split per head
    β = mean over tokens of ‖z‖₂ / √head_dim               (adaptive; or β = 1 / temperature)
    for s in (q, k, v):  s ← s/‖s‖;  `iterations` times: s ← softmax(β s sᵀ) s,  s ← s/‖s‖
                         attn_s = softmax(β s sᵀ)
    x_gem ← x_gem + out_proj((attn_q v + attn_k v + attn_v v) / 3)          (no MLP on the GEM path)

and the patch tokens of x_gem go through post-LayerNorm and the visual projection. Their cosine with text
embeddings of "a photo of a {class}." on the patch grid, upsampled bilinearly, is the localization map.

Baselines through the same interface (``METHODS``), each giving (B, N, P) unit patch embeddings:
- ``plain``: the patch tokens of the last block's output (CLIP as is);
- ``maskclip``: the last block's value path only, out_proj(v_proj(LN1(x))), no attention mixing, no residual,
  no MLP (MaskCLIP, Zhou et al. 2022);
- ``clipsurgery``: the parallel pathway of GEM with value-value attention only, softmax(β v̂ v̂ᵀ) v with
  v̂ = v/‖v‖ and no iteration (CLIPSurgery's v-v attention; its "feature surgery" redundancy removal is not
  applied).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from grounding.models.clip import ClipBackbone

METHODS = ("gem", "clipsurgery", "maskclip", "plain")


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    # half precision softmax loses the small attention weights: do it in float32 there
    if scores.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    return torch.softmax(scores, dim=-1)


def _per_batch(beta: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """β as a float, or (B,) per image, shaped to broadcast against ``like`` (B, ..., T, T)."""
    if isinstance(beta, torch.Tensor) and beta.dim() > 0:
        return beta.reshape(beta.shape + (1,) * (like.dim() - beta.dim())).to(like.dtype)
    return beta


def _sqrt_beta(beta: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    return _per_batch(beta, like) ** 0.5 if isinstance(beta, torch.Tensor) else beta ** 0.5


def _clustered(stream: torch.Tensor, beta: torch.Tensor | float, iterations: int) -> torch.Tensor:
    """ŝ after the iterations: s ← s/‖s‖, then ``iterations`` times s ← softmax(β s sᵀ) s, s ← s/‖s‖ (fused
    attention with √β folded into both operands: no T × T matrix is kept)."""
    if iterations < 0:
        raise ValueError(f"iterations={iterations} must be >= 0")
    s = F.normalize(stream, dim=-1)
    for _ in range(iterations):
        scaled = s * _sqrt_beta(beta, s)
        s = F.normalize(F.scaled_dot_product_attention(scaled, scaled, s, scale=1.0), dim=-1)
    return s


def self_self_attention(stream: torch.Tensor, beta: torch.Tensor | float, iterations: int = 1) -> torch.Tensor:
    """Iterated, normalized self-self attention of one projection, per head (docs/gem.md).

    stream: (B, h, T, c) one of q, k, v split per head (any leading dims work); beta: inverse temperature,
    a float or (B,) per image. s ← s/‖s‖; ``iterations`` times s ← softmax(β s sᵀ) s, s ← s/‖s‖;
    returns attn = softmax(β s sᵀ), (B, h, T, T), rows summing to 1.
    """
    s = _clustered(stream, beta, iterations)
    scores = torch.matmul(s, s.transpose(-1, -2))
    return _softmax(_per_batch(beta, scores) * scores)


def self_self_output(stream: torch.Tensor, value: torch.Tensor, beta: torch.Tensor | float, iterations: int = 1) -> torch.Tensor:
    """``self_self_attention(stream, beta, iterations) @ value`` (B, h, T, c) by fused attention: the T × T map
    is never formed (at 448 px, 12 heads × 785² floats per stream and block)."""
    s = _clustered(stream, beta, iterations)
    scaled = s * _sqrt_beta(beta, s)
    return F.scaled_dot_product_attention(scaled, scaled, value, scale=1.0)


def adaptive_inverse_temperature(z: torch.Tensor, head_dim: int) -> torch.Tensor:
    """β = mean over tokens of ‖z_i‖₂ / √head_dim, per image: (B,) (docs/gem.md; the paper's 1/τ, τ = N√d / Σ‖x_i‖).

    z: (B, T, d) the LayerNorm1 output of the ORIGINAL stream at the block's input (what q, k, v are
    projected from), all T tokens including CLS; head_dim: d / heads.
    """
    return z.norm(dim=-1).mean(dim=-1) / math.sqrt(head_dim)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, d) -> (B, h, T, d/h)."""
    batch, tokens, width = t.shape
    return t.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, h, T, c) -> (B, T, h*c)."""
    batch, heads, tokens, channels = t.shape
    return t.transpose(1, 2).reshape(batch, tokens, heads * channels)


def _inverse_temperature(z: torch.Tensor, head_dim: int, temperature: float | None) -> torch.Tensor | float:
    return adaptive_inverse_temperature(z, head_dim) if temperature is None else 1.0 / temperature


def block_projections(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z = LN1(x) (B, T, d) and the block's q, k, v per head (B, h, T, d/h), with its own weights and biases."""
    attn = layer.self_attn
    z = layer.layer_norm1(x)
    query, key, value = (_split_heads(proj(z), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    return z, query, key, value


def block_output(layer: nn.Module, x: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The block's own output for input x (B, T, d) from its q, k, v (fused attention, then out_proj, residual,
    LayerNorm2, MLP, residual): ``layer(x)`` without projecting q, k, v a second time."""
    attn = layer.self_attn
    heads_out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
    mid = x + attn.out_proj(_merge_heads(heads_out))
    return mid + layer.mlp(layer.layer_norm2(mid))


def run_fused(backbone: ClipBackbone, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Blocks ``start``..``stop - 1`` of the vision tower with fused attention (``block_output``), whatever
    attention implementation the model was loaded with: every method here runs the same kernels."""
    for layer in backbone.vision.encoder.layers[start:stop]:
        tokens = block_output(layer, tokens, *block_projections(layer, tokens)[1:])
    return tokens


def gem_attention(layer: nn.Module, x: torch.Tensor, iterations: int = 1, temperature: float | None = None,
                  projections: tuple | None = None) -> torch.Tensor:
    """The GEM pathway's update of one ``CLIPEncoderLayer`` (docs/gem.md): out_proj of the qkv-ensemble.

    x: (B, T, d) the ORIGINAL stream entering the block. Returns o (B, T, d), added to x_gem by the caller.
    temperature: None for the adaptive β, else β = 1 / temperature. projections: ``block_projections(layer, x)``
    when the caller has them already. Each attn_s v is a fused attention (``self_self_output``).
    """
    z, query, key, value = projections if projections is not None else block_projections(layer, x)
    head_dim = x.shape[-1] // layer.self_attn.num_heads
    beta = _inverse_temperature(z, head_dim, temperature)
    # the three streams as one batch of 3B: one fused call per step instead of three
    streams = torch.cat([query, key, value])
    betas = beta.repeat(3) if isinstance(beta, torch.Tensor) else beta
    mixed = self_self_output(streams, value.repeat(3, 1, 1, 1), betas, iterations)
    return layer.self_attn.out_proj(_merge_heads(mixed.view(3, *value.shape).mean(0)))


def surgery_attention(layer: nn.Module, x: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """CLIPSurgery-style value-value update of one block: out_proj(softmax(β v̂ v̂ᵀ) v), v̂ = v/‖v‖ (docs/gem.md).

    x: (B, T, d) the original stream entering the block; β as in GEM (adaptive, or 1 / temperature).
    Returns (B, T, d).
    """
    attn = layer.self_attn
    z = layer.layer_norm1(x)
    value = _split_heads(attn.v_proj(z), attn.num_heads)
    beta = _inverse_temperature(z, x.shape[-1] // attn.num_heads, temperature)
    return attn.out_proj(_merge_heads(self_self_output(value, value, beta, 0)))


def maskclip_tokens(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's dense features of the last block: out_proj(v_proj(LN1(x))), (B, T, d) -> (B, T, d).

    The attention mixing is replaced by the identity (each token keeps its own value); no residual, no MLP.
    """
    attn = layer.self_attn
    return attn.out_proj(attn.v_proj(layer.layer_norm1(x)))


def project_patches(backbone: ClipBackbone, tokens: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, 1 + N, d) -> unit patch embeddings (B, N, P): CLS dropped, post-LN, projection."""
    patches = backbone.vision.post_layernorm(tokens[:, 1:])
    return F.normalize(backbone.model.visual_projection(patches), dim=-1)


class GEM(nn.Module):
    """Dense patch embeddings in CLIP's joint space by ``method`` (one of ``METHODS``), training-free.

    depth: the last depth - 1 blocks get the parallel pathway (gem, clipsurgery); depth = 1 leaves every block
    original (then gem equals plain). iterations: self-self attention iterations (gem only).
    temperature: None for the adaptive β of each block, else β = 1 / temperature (gem, clipsurgery).
    plain and maskclip ignore the three settings.
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        method: str = "gem",
        depth: int = 7,
        iterations: int = 1,
        temperature: float | None = None,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {METHODS}")
        blocks = backbone.num_layers
        # plain and maskclip have no pathway: their depth is not checked
        if method in ("gem", "clipsurgery") and not 1 <= depth <= blocks + 1:
            raise ValueError(
                f"depth={depth} would modify {depth - 1} blocks of a vision tower of {blocks}: "
                f"use 1 <= depth <= {blocks + 1}"
            )
        if iterations < 0:
            raise ValueError(f"iterations={iterations} must be >= 0")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0 (or None for the adaptive one)")
        self.backbone = backbone
        self.method = method
        self.depth = int(depth)
        self.iterations = int(iterations)
        self.temperature = None if temperature is None else float(temperature)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized pixels, H and W multiples of the patch -> (B, N, P) unit patch embeddings
        (N = H/patch * W/patch, row-major)."""
        backbone = self.backbone
        blocks = backbone.num_layers
        tokens = backbone.embed(pixel_values)
        if self.method == "plain":
            return project_patches(backbone, run_fused(backbone, tokens, 0, blocks))
        if self.method == "maskclip":
            x = run_fused(backbone, tokens, 0, blocks - 1)
            return project_patches(backbone, maskclip_tokens(backbone.vision.encoder.layers[-1], x))
        first = blocks - (self.depth - 1)
        x_ori = run_fused(backbone, tokens, 0, first)
        x_path = x_ori
        for index in range(first, blocks):
            layer = backbone.vision.encoder.layers[index]
            projections = block_projections(layer, x_ori)  # shared by both streams: q, k, v projected once
            if self.method == "gem":
                x_path = x_path + gem_attention(layer, x_ori, self.iterations, self.temperature, projections)
            else:
                x_path = x_path + surgery_attention(layer, x_ori, self.temperature)
            if index < blocks - 1:  # the original stream's last output is never used
                x_ori = block_output(layer, x_ori, *projections[1:])
        return project_patches(backbone, x_path)


def similarity_maps(
    backbone: ClipBackbone,
    images: torch.Tensor,
    text: torch.Tensor,
    method: str = "gem",
    output_size: tuple[int, int] | None = None,
    **settings,
) -> torch.Tensor:
    """Patch-text cosine similarities upsampled to the image (docs/gem.md).

    images: (B, 3, H, W) normalized pixels, H and W multiples of the patch size (any aspect ratio);
    text: (C, P) text embeddings (normalized here); settings: ``GEM``'s depth / iterations / temperature.
    Returns (B, C, H, W), or (B, C, *output_size): the (gh, gw) patch grid upsampled bilinearly.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if text.dim() != 2 or text.shape[1] != backbone.embed_dim:
        raise ValueError(f"text must be (C, {backbone.embed_dim}) embeddings, got {tuple(text.shape)}")
    height, width = images.shape[-2:]
    patches = GEM(backbone, method, **settings)(images)  # (B, N, P), N = gh * gw
    text = F.normalize(text.to(device=patches.device, dtype=patches.dtype), dim=-1)
    scores = torch.einsum("bnp,cp->bcn", patches, text)
    grid = (height // backbone.patch_size, width // backbone.patch_size)
    scores = scores.reshape(*scores.shape[:2], *grid)
    size = (height, width) if output_size is None else tuple(output_size)
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


def class_text_embeddings(
    backbone: ClipBackbone, class_names: Sequence[str], template: str = "a photo of a {}."
) -> torch.Tensor:
    """(C, P) unit text embeddings of ``template`` filled with each class name."""
    if isinstance(class_names, str):
        raise TypeError("class_names must be a list of strings, not one string")
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' for the class name")
    if not class_names:
        raise ValueError("class_names is empty")
    with torch.no_grad():
        return F.normalize(backbone.encode_text([template.format(name) for name in class_names]), dim=-1)
