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
  v̂ = v/‖v‖ and no iteration (CLIPSurgery's v-v attention); with ``feature_surgery`` the maps also get its
  redundant-feature removal (``feature_surgery``, on the patch-text cosines);
- ``sclip``: the last block with correlative self-attention (softmax(s q qᵀ) + softmax(s k kᵀ)) v, its residual
  and MLP kept (SCLIP, Wang et al. 2024);
- ``clearclip``: the last block reduced to out_proj(softmax(s q qᵀ) v), no residual, no MLP (ClearCLIP, Lan et
  al. 2024);
- ``naclip``: the last block reduced to out_proj(softmax(s k kᵀ + ω) v), ω a Gaussian of the patch-grid distance
  (std 5 patches), no residual, no MLP (NACLIP, Hajimiri et al. 2025).
s is the block's own attention scale head_dim^-1/2. PAMR, the mask refinement of NACLIP's "+PAMR" results, is
``DenseSimilarity``'s ``pamr`` setting (``grounding.models.pamr``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from grounding.models.clip import ClipBackbone
from grounding.models.pamr import check_dilations, pamr
from grounding.models.templates import GEM_TEMPLATE, checked_templates

METHODS = ("gem", "clipsurgery", "maskclip", "plain", "sclip", "clearclip", "naclip")
#: the methods that change the last block only (no pathway: depth, iterations and temperature unused)
LAST_BLOCK_METHODS = ("maskclip", "sclip", "clearclip", "naclip")


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


def sclip_block(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SCLIP's last block: correlative self-attention in place of the block's attention, residual and MLP kept.

    x: (B, T, d) the block's input. With q, k, v its own projections of LN1(x) per head and s its scale
    head_dim^-1/2: y = x + out_proj((softmax(s q qᵀ) + softmax(s k kᵀ)) v), returns y + MLP(LN2(y)), (B, T, d)
    (the two maps are summed, not averaged, as in SCLIP's reference code; every token, CLS included, attends).
    """
    attn = layer.self_attn
    _, query, key, value = block_projections(layer, x)
    # (A_q + A_k) v as two fused attentions: no T x T map is formed
    mixed = (F.scaled_dot_product_attention(query, query, value, scale=attn.scale)
             + F.scaled_dot_product_attention(key, key, value, scale=attn.scale))
    mid = x + attn.out_proj(_merge_heads(mixed))
    return mid + layer.mlp(layer.layer_norm2(mid))


def clearclip_tokens(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ClearCLIP's last block: out_proj(softmax(s q qᵀ) v), (B, T, d) -> (B, T, d).

    Query-query attention with the block's own q, v (of LN1(x), per head) and scale s; no residual, no MLP.
    """
    attn = layer.self_attn
    _, query, _, value = block_projections(layer, x)
    return attn.out_proj(_merge_heads(F.scaled_dot_product_attention(query, query, value, scale=attn.scale)))


def neighbourhood_bias(grid: tuple[int, int], std: float = 5.0, device=None, dtype=None) -> torch.Tensor:
    """NACLIP's additive attention bias ω (1 + N, 1 + N) for a (gh, gw) patch grid, N = gh · gw row-major.

    ω[i, j] = exp(-‖p_i - p_j‖² / (2 std²)) between patches at grid positions p (row, column), in patches; the
    class token's row and column are 0 (it neither gets nor gives a neighbourhood bonus).
    """
    if not std > 0:
        raise ValueError(f"std={std} of the neighbourhood Gaussian must be > 0")
    rows, cols = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=-1).to(torch.float64)  # (N, 2)
    gaussian = torch.exp(-torch.cdist(positions, positions) ** 2 / (2 * std ** 2))
    return F.pad(gaussian, (1, 0, 1, 0)).to(dtype or torch.get_default_dtype())


def naclip_tokens(layer: nn.Module, x: torch.Tensor, grid: tuple[int, int], std: float = 5.0) -> torch.Tensor:
    """NACLIP's last block: out_proj(softmax(s k kᵀ + ω) v), (B, T, d) -> (B, T, d).

    Key-key attention with the block's own k, v (of LN1(x), per head) and scale s, plus the neighbourhood bias
    ω = ``neighbourhood_bias(grid, std)`` (not scaled); no residual, no MLP. grid: the (gh, gw) patch grid of x's
    T = 1 + gh · gw tokens.
    """
    if x.shape[1] != 1 + grid[0] * grid[1]:
        raise ValueError(f"a {grid[0]}x{grid[1]} patch grid has {1 + grid[0] * grid[1]} tokens, x has {x.shape[1]}")
    attn = layer.self_attn
    _, _, key, value = block_projections(layer, x)
    bias = neighbourhood_bias(grid, std, device=x.device, dtype=key.dtype)
    mixed = F.scaled_dot_product_attention(key, key, value, attn_mask=bias, scale=attn.scale)
    return attn.out_proj(_merge_heads(mixed))


def block_class_output(layer: nn.Module, x: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor) -> torch.Tensor:
    """``block_output(layer, x, query, key, value)[:, 0]`` (B, d): the class token's row only (its attention
    over all T tokens, out_proj, residual, LayerNorm2, MLP), not the whole block."""
    attn = layer.self_attn
    heads_out = F.scaled_dot_product_attention(query[:, :, :1], key, value, scale=attn.scale)
    mid = x[:, :1] + attn.out_proj(_merge_heads(heads_out))
    return (mid + layer.mlp(layer.layer_norm2(mid)))[:, 0]


def feature_surgery(scores: torch.Tensor, image_scores: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery's redundant-feature removal (Li et al. 2023) on patch-text cosines (docs/gem.md).

    scores: (B, C, ...) cosines of unit patch embeddings x_n with the C unit text embeddings t_c;
    image_scores: (B, C) cosines of the image's own CLIP embedding with them. With the class weights
    w = C · softmax(2 · image_scores) (they restrain the classes obvious in the whole image), the paper's
    features f_nc = w_c (x_n ⊙ t_c), less their mean over the classes, summed over the channels, give
        s_nc = w_c cos(x_n, t_c) - mean_c' w_c' cos(x_n, t_c'),
    computed here in that closed form ((B, C, ...) out; linear in the cosines, so it commutes with upsampling).
    """
    classes = scores.shape[1]
    if classes < 2:
        raise ValueError("feature_surgery needs at least 2 classes: with one, every map is 0")
    weights = classes * torch.softmax(2 * image_scores, dim=-1)  # (B, C)
    weighted = scores * weights.reshape(weights.shape + (1,) * (scores.dim() - 2))
    return weighted - weighted.mean(dim=1, keepdim=True)


def project_patches(backbone: ClipBackbone, tokens: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, 1 + N, d) -> unit patch embeddings (B, N, P): CLS dropped, post-LN, projection."""
    patches = backbone.vision.post_layernorm(tokens[:, 1:])
    return F.normalize(backbone.model.visual_projection(patches), dim=-1)


class GEM(nn.Module):
    """Dense patch embeddings in CLIP's joint space by ``method`` (one of ``METHODS``), training-free.

    depth: the last depth - 1 blocks get the parallel pathway (gem, clipsurgery); depth = 1 leaves every block
    original (then gem equals plain). iterations: self-self attention iterations (gem only).
    temperature: None for the adaptive β of each block, else β = 1 / temperature (gem, clipsurgery).
    The other methods ignore the three settings. feature_surgery (clipsurgery only): ``encode`` also returns
    CLIP's own image embedding, which ``similarity_maps`` needs for the feature surgery.
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        method: str = "gem",
        depth: int = 7,
        iterations: int = 1,
        temperature: float | None = None,
        feature_surgery: bool = False,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {METHODS}")
        blocks = backbone.num_layers
        # only gem and clipsurgery have a pathway: the others' depth is not checked
        if method in ("gem", "clipsurgery") and not 1 <= depth <= blocks + 1:
            raise ValueError(
                f"depth={depth} would modify {depth - 1} blocks of a vision tower of {blocks}: "
                f"use 1 <= depth <= {blocks + 1}"
            )
        if iterations < 0:
            raise ValueError(f"iterations={iterations} must be >= 0")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0 (or None for the adaptive one)")
        if feature_surgery and method != "clipsurgery":
            raise ValueError(f"feature_surgery is CLIPSurgery's: it needs method='clipsurgery', not {method!r}")
        self.backbone = backbone
        self.method = method
        self.depth = int(depth)
        self.iterations = int(iterations)
        self.temperature = None if temperature is None else float(temperature)
        self.feature_surgery = bool(feature_surgery)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized pixels, H and W multiples of the patch -> (B, N, P) unit patch embeddings
        (N = H/patch * W/patch, row-major)."""
        return self.encode(pixel_values)[0]

    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward``'s (B, N, P) patch embeddings and, with ``feature_surgery``, CLIP's own unit image embedding
        (B, P) (the original stream's class token after the last block, post-LN, projection), else None."""
        backbone = self.backbone
        blocks = backbone.num_layers
        tokens = backbone.embed(pixel_values)
        if self.method == "plain":
            return project_patches(backbone, run_fused(backbone, tokens, 0, blocks)), None
        if self.method in LAST_BLOCK_METHODS:
            x = run_fused(backbone, tokens, 0, blocks - 1)
            grid = (pixel_values.shape[-2] // backbone.patch_size, pixel_values.shape[-1] // backbone.patch_size)
            tokens = last_block_tokens(self.method, backbone.vision.encoder.layers[-1], x, grid)
            return project_patches(backbone, tokens), None
        first = blocks - (self.depth - 1)
        x_ori = run_fused(backbone, tokens, 0, first)
        x_path = x_ori
        image_token = x_ori[:, 0] if first == blocks else None  # depth 1: the original stream ran every block
        for index in range(first, blocks):
            layer = backbone.vision.encoder.layers[index]
            projections = block_projections(layer, x_ori)  # shared by both streams: q, k, v projected once
            if self.method == "gem":
                x_path = x_path + gem_attention(layer, x_ori, self.iterations, self.temperature, projections)
            else:
                x_path = x_path + surgery_attention(layer, x_ori, self.temperature)
            if index < blocks - 1:  # the original stream's last output is only needed for its class token
                x_ori = block_output(layer, x_ori, *projections[1:])
            elif self.feature_surgery:
                image_token = block_class_output(layer, x_ori, *projections[1:])
        image = backbone.project_pooled(image_token) if self.feature_surgery else None
        return project_patches(backbone, x_path), image


def last_block_tokens(method: str, layer: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The last block's output (B, T, d) for the methods of ``LAST_BLOCK_METHODS``; x: (B, T, d) its input,
    grid: the (gh, gw) patch grid (naclip's neighbourhood)."""
    if method == "maskclip":
        return maskclip_tokens(layer, x)
    if method == "sclip":
        return sclip_block(layer, x)
    if method == "clearclip":
        return clearclip_tokens(layer, x)
    if method == "naclip":
        return naclip_tokens(layer, x, grid)
    raise ValueError(f"method={method!r} is not one of {LAST_BLOCK_METHODS}")


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
    text: (C, P) text embeddings (normalized here); settings: ``GEM``'s depth / iterations / temperature /
    feature_surgery (then the cosines go through ``feature_surgery`` with each image's own embedding).
    Returns (B, C, H, W), or (B, C, *output_size): the (gh, gw) patch grid upsampled bilinearly.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if text.dim() != 2 or text.shape[1] != backbone.embed_dim:
        raise ValueError(f"text must be (C, {backbone.embed_dim}) embeddings, got {tuple(text.shape)}")
    height, width = images.shape[-2:]
    patches, image = GEM(backbone, method, **settings).encode(images)  # (B, N, P), N = gh * gw; (B, P) or None
    text = F.normalize(text.to(device=patches.device, dtype=patches.dtype), dim=-1)
    scores = torch.einsum("bnp,cp->bcn", patches, text)
    if image is not None:
        scores = feature_surgery(scores, image @ text.T)
    grid = (height // backbone.patch_size, width // backbone.patch_size)
    scores = scores.reshape(*scores.shape[:2], *grid)
    size = (height, width) if output_size is None else tuple(output_size)
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


def synonym_classes(class_names: Sequence[str | Sequence[str]]) -> list[int]:
    """The class index of each name of ``class_names`` (a class is a name or a list of its synonyms), in the
    order ``class_text_embeddings`` embeds them: [0, 1, 1, 2] for ["sky", ["cat", "kitten"], "dog"]."""
    if isinstance(class_names, str):
        raise TypeError("class_names must be a list of strings, not one string")
    if not class_names:
        raise ValueError("class_names is empty")
    owners = []
    for index, names in enumerate(class_names):
        names = [names] if isinstance(names, str) else list(names)
        if not names or not all(isinstance(name, str) and name.strip() for name in names):
            raise ValueError(f"class {index} has no name or an empty one: {names!r}")
        owners += [index] * len(names)
    return owners


def class_text_embeddings(backbone: ClipBackbone, class_names: Sequence[str | Sequence[str]],
                          templates: str | Sequence[str] = GEM_TEMPLATE) -> torch.Tensor:
    """(S, P) unit text embeddings, one per name: a class of ``class_names`` is a name or a list of its synonyms
    (S names in all, in order; ``synonym_classes`` gives each one's class). A name's embedding is the normalized
    mean over ``templates`` of the normalized embeddings of each template filled with the name (CLIP's prompt
    ensembling; one template: the normalized embedding of its sentence)."""
    owners = synonym_classes(class_names)  # checks the names
    templates = checked_templates(templates)
    names = [name for entry in class_names for name in ([entry] if isinstance(entry, str) else entry)]
    with torch.no_grad():
        sentences = backbone.encode_text([template.format(name) for name in names for template in templates])
        per_template = F.normalize(sentences, dim=-1).view(len(owners), len(templates), -1)  # (S, T, P)
        return F.normalize(per_template.mean(1), dim=-1)


def max_over_synonyms(maps: torch.Tensor, owners: Sequence[int]) -> torch.Tensor:
    """(S, ...) maps of the names -> (C, ...) maps of the classes: each class's the element-wise maximum over its
    synonyms' (``owners``: the class of each name, ``synonym_classes``; C = max(owners) + 1)."""
    owners = torch.as_tensor(list(owners), device=maps.device)
    if owners.shape != maps.shape[:1]:
        raise ValueError(f"{owners.numel()} owners for {maps.shape[0]} maps: one class index per map")
    index = owners.view(-1, *([1] * (maps.dim() - 1))).expand_as(maps)
    empty = maps.new_full((int(owners.max()) + 1, *maps.shape[1:]), float("-inf"))
    return empty.scatter_reduce(0, index, maps, reduce="amax")


def resize_to_short_side(backbone: ClipBackbone, image: torch.Tensor, short_side: int) -> torch.Tensor:
    """uint8 (3, H, W) -> normalized (1, 3, h, w) on the backbone's device with min(h, w) ≈ ``short_side``, the
    aspect kept and both sides rounded to multiples of the patch size (bicubic, antialiased)."""
    patch = backbone.patch_size
    height, width = image.shape[-2:]
    scale = short_side / min(height, width)
    size = [max(patch, round(height * scale / patch) * patch), max(patch, round(width * scale / patch) * patch)]
    pixels = F.interpolate(image[None].float().to(backbone.mean.device) / 255, size=size, mode="bicubic",
                           align_corners=False, antialias=True).clamp(0, 1)
    return (pixels - backbone.mean) / backbone.std


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` px every ``stride`` px along a side of ``size`` px, the last one flush
    with the border (one window at 0 when the side is not longer than a window)."""
    if size <= window:
        return [0]
    positions = list(range(0, size - window + 1, stride))
    return positions if positions[-1] == size - window else positions + [size - window]


def sliding_window_maps(backbone: ClipBackbone, pixels: torch.Tensor, text: torch.Tensor, method: str, window: int,
                        stride: int, **settings) -> torch.Tensor:
    """(C, h, w) maps of normalized ``pixels`` (1, 3, h, w): ``similarity_maps`` of every window, averaged where
    windows overlap (docs/gem.md)."""
    height, width = pixels.shape[-2:]
    total = pixels.new_zeros(text.shape[0], height, width)
    count = pixels.new_zeros(1, height, width)
    for top in window_starts(height, window, stride):
        for left in window_starts(width, window, stride):
            crop = pixels[..., top:top + window, left:left + window]
            maps = similarity_maps(backbone, crop, text, method, **settings)[0]
            total[:, top:top + crop.shape[-2], left:left + crop.shape[-1]] += maps
            count[:, top:top + crop.shape[-2], left:left + crop.shape[-1]] += 1
    return total / count


def labels_with_background(maps: torch.Tensor, foreground: Sequence[int], background: int | None,
                           threshold: float = 0.85, logit_scale: float = 100.0) -> torch.Tensor:
    """(C_fg, H, W) cosine maps of the foreground classes -> (H, W) label values: the arg-max class's value from
    ``foreground``; with a ``background`` value, pixels whose largest softmax(``logit_scale`` · cosine) over the
    foreground classes is below ``threshold`` get it (docs/gem.md)."""
    # max(0).indices is argmax(0) (the first of equal maxima) at a twentieth of its time on the CPU (a (C, H, W) map)
    labels = torch.tensor(list(foreground), device=maps.device)[maps.max(0).indices]
    if background is not None:
        confidence = (logit_scale * maps).softmax(0).amax(0)
        labels = torch.where(confidence < threshold, torch.full_like(labels, background), labels)
    return labels


def class_probabilities(maps: torch.Tensor, owners: Sequence[int], logit_scale: float = 40.0) -> torch.Tensor:
    """(S, H, W) cosine maps of every prompted name -> (C, H, W) class probabilities, the rule of SCLIP's
    protocol (docs/gem.md): softmax over all S names of ``logit_scale`` · cosine, then each class's maximum over
    its synonyms (``owners``: the class of each name)."""
    return max_over_synonyms((logit_scale * maps).softmax(0), owners)


def labels_from_probabilities(probabilities: torch.Tensor, background: int | None = None, threshold: float = 0.0,
                              area_threshold: float | None = None) -> torch.Tensor:
    """(C, H, W) class probabilities (``class_probabilities``; class index = label value) -> (H, W) labels, as
    SCLIP's protocol decides them (docs/gem.md). With a ``background`` class: first, when ``area_threshold`` is
    set, every other class whose arg-max area is at most ``area_threshold`` times the area of all the non-background
    arg-max pixels gets probability 0; then the arg-max, and pixels whose largest probability is below
    ``threshold`` become ``background``. Without one: the arg-max."""
    if background is None:
        return probabilities.max(0).indices
    if area_threshold is not None:
        area = torch.bincount(probabilities.max(0).indices.flatten(), minlength=probabilities.shape[0]).to(probabilities.dtype)
        area[background] = 0  # the share is of the non-background pixels, and background is never dropped
        dropped = area <= area_threshold * area.sum()
        dropped[background] = False
        probabilities = probabilities * (~dropped).to(probabilities.dtype)[:, None, None]
    confidence, labels = probabilities.max(0)
    return torch.where(confidence < threshold, torch.full_like(labels, background), labels)


class DenseSimilarity:
    """GEM's (or a baseline's) whole per-image computation: an image of any size and class names (or their text
    embeddings) in, per-class cosine maps at the image's own size out (docs/gem.md).

    The image is resized so that its shorter side is ``short_side`` (sides rounded to patch multiples), run whole
    or in sliding windows (``window`` / ``stride`` px, maps averaged where they overlap), and the maps are
    upsampled bilinearly back to the image's size.

    Args:
        backbone: a frozen ``ClipBackbone`` (``grounding.models.clip.build_clip``).
        method: one of ``METHODS`` (gem | clipsurgery | maskclip | plain | sclip | clearclip | naclip).
        depth, iterations, temperature, feature_surgery: ``GEM``'s settings.
        pamr, pamr_iterations, pamr_dilations: refine the maps at the image's own size with PAMR
            (``grounding.models.pamr``) along the edges of the image's own pixels, CLIP-normalized (the input
            NACLIP's reference gives PAMR; its affinities are invariant to that per-channel scaling up to the
            1e-8 of their denominator).
        short_side: the resized image's shorter side.
        window, stride: sliding-window inference (both None: the whole image at once).
        templates: the sentence a class name is put in, or several (each name's embedding is then their
            normalized mean, ``class_text_embeddings``).
    """

    def __init__(self, backbone: ClipBackbone, method: str = "gem", depth: int = 7, iterations: int = 1,
                 temperature: float | None = None, feature_surgery: bool = False, pamr: bool = False,
                 pamr_iterations: int = 10, pamr_dilations: Sequence[int] = (8, 16),
                 short_side: int = 448, window: int | None = None,
                 stride: int | None = None, templates: str | Sequence[str] = GEM_TEMPLATE) -> None:
        settings = {"depth": depth, "iterations": iterations, "temperature": temperature,
                    "feature_surgery": feature_surgery}
        GEM(backbone, method, **settings)  # checks the settings
        if pamr:
            check_dilations(pamr_dilations)
            if not isinstance(pamr_iterations, int) or pamr_iterations < 1:
                raise ValueError(f"pamr_iterations={pamr_iterations!r} must be an integer >= 1")
        patch = backbone.patch_size
        if short_side < patch or short_side % patch:
            raise ValueError(f"short_side {short_side} must be a positive multiple of the patch size {patch}")
        if (window is None) != (stride is None):
            raise ValueError("window and stride are set together (sliding-window inference) or not at all")
        if window is not None and (window % patch or window < patch or not 0 < stride <= window or stride % patch):
            raise ValueError(f"window ({window}) and stride ({stride}) must be multiples of the patch size {patch} "
                             f"with 0 < stride <= window")
        templates = checked_templates(templates)
        self.backbone = backbone
        self.method = method
        self.settings = settings
        self.refinement = {"iterations": pamr_iterations, "dilations": tuple(pamr_dilations)} if pamr else None
        self.short_side, self.window, self.stride, self.templates = short_side, window, stride, templates

    def text(self, class_names: Sequence[str | Sequence[str]]) -> torch.Tensor:
        """(S, P) unit text embeddings of the class names (a class: a name or a list of its synonyms) in
        ``templates`` (``class_text_embeddings``)."""
        return class_text_embeddings(self.backbone, class_names, self.templates)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, classes: Sequence[str | Sequence[str]] | torch.Tensor) -> torch.Tensor:
        """(C, H, W) cosine similarities at every pixel of ``image`` uint8 (3, H, W); ``classes``: class names (a
        class: a name or a list of its synonyms, its map the maximum over theirs) or (C, P) text embeddings, one
        map per row."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
        if not isinstance(classes, torch.Tensor):
            return max_over_synonyms(self(image, self.text(classes)), synonym_classes(classes))
        text = classes
        pixels = resize_to_short_side(self.backbone, image, self.short_side)
        if self.window is None:
            maps = similarity_maps(self.backbone, pixels, text, self.method, **self.settings)[0]
        else:
            maps = sliding_window_maps(self.backbone, pixels, text, self.method, self.window, self.stride, **self.settings)
        return self._at_image_size(image, maps)

    @torch.no_grad()
    def many(self, images: Sequence[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        """``self(image, text)`` of every image of ``images`` (uint8 (3, H, W) each) for (C, P) text embeddings.
        Whole-image inference runs the images whose resized shapes are equal as one batch through the vision
        tower (every per-image quantity, GEM's adaptive temperature included, stays per image); sliding windows
        run image by image (each image's windows are one batch already)."""
        for image in images:
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
        if self.window is not None or len(images) < 2:
            return [self(image, text) for image in images]
        pixels = [resize_to_short_side(self.backbone, image, self.short_side) for image in images]
        shapes: dict[tuple[int, ...], list[int]] = {}
        for index, resized in enumerate(pixels):
            shapes.setdefault(tuple(resized.shape), []).append(index)
        out: list[torch.Tensor | None] = [None] * len(images)
        for indices in shapes.values():
            maps = similarity_maps(self.backbone, torch.cat([pixels[i] for i in indices]), text, self.method, **self.settings)
            for index, image_maps in zip(indices, maps):
                out[index] = self._at_image_size(images[index], image_maps)
        return out

    def _at_image_size(self, image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """(C, h, w) maps of the resized ``image`` -> (C, H, W) at its own size, PAMR-refined when it is on."""
        maps = F.interpolate(maps[None], size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[0]
        if self.refinement is None:
            return maps
        return pamr(self.normalized(image, maps.device)[None], maps[None], **self.refinement)[0]

    def normalized(self, image: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 (3, H, W) -> float32 (3, H, W) on ``device``, CLIP-normalized at its own size (PAMR's guide)."""
        mean, std = (t.to(device=device, dtype=torch.float32) for t in (self.backbone.mean, self.backbone.std))
        return ((image.to(device).float() / 255 - mean) / std).reshape(image.shape)
