"""CLIP-family backbones from transformers, at any input size.

``build_clip("openai/clip-vit-base-patch16")`` (a hub id or a local folder: OpenAI CLIP, OpenCLIP/LAION and
MetaCLIP checkpoints in HF format) loads ``CLIPModel`` with the checkpoint's own tokenizer and image
statistics; ``build_clip("open_clip:ViT-B-16/laion2b_s34b_b88k")`` converts an open_clip model into one
(``grounding.models.open_clip_convert``); ``build_clip("tiny")`` builds a small random model from
``TINY_CLIP_CONFIG`` with a CLIP BPE tokenizer made offline (``grounding.models.clip_tokenizer``).

``ClipBackbone`` wraps the model for the explainability methods (docs/maskinversion.md): images are resized to
``image_size`` (448 px by default) and the patch position embeddings resampled to the new grid with
bicubic **antialiased** interpolation (the public LeGrad / MaskInversion / GEM code does that; transformers'
own ``interpolate_pos_encoding`` is plain bicubic, offered by ``antialias=False``). The vision tower runs
block by block so that the explainability code can take a block apart (``attention_block``) with the
model's own weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel

from grounding.constants import CLIP_MEAN, CLIP_STD  # OpenAI CLIP's, used when a checkpoint has no image processor config
from grounding.utils import merge_nested

#: the random test / demo model: ViT with patch 16 (as ViT-B/16), 4 blocks of width 64
TINY_CLIP_CONFIG: dict[str, Any] = {
    "vision_config": {
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "image_size": 224, "patch_size": 16,
    },
    "text_config": {
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 77,
    },
    "projection_dim": 32,
}

#: ViT-B/16 sizes (random weights) for the benchmarks
VIT_B16_CONFIG: dict[str, Any] = {
    "vision_config": {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "image_size": 224, "patch_size": 16,
    },
    "text_config": {
        "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
        "max_position_embeddings": 77,
    },
    "projection_dim": 512,
}


def resample_position_embeddings(
    weight: torch.Tensor, grid: tuple[int, int], antialias: bool = True
) -> torch.Tensor:
    """(1 + g*g, D) position embeddings of a square g×g patch grid -> (1 + gh*gw, D) for ``grid``.

    The CLS position is kept; the patch positions are resampled bicubically (antialiased if asked).
    """
    count = weight.shape[0] - 1
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"position embeddings of {count} patches are not a square grid")
    if tuple(grid) == (side, side):
        return weight
    patches = weight[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    work = patches if patches.dtype in (torch.float32, torch.float64) else patches.float()  # no bicubic in half
    resized = F.interpolate(work, size=tuple(grid), mode="bicubic", align_corners=False, antialias=antialias)
    resized = resized.to(weight.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    return torch.cat([weight[:1], resized], dim=0)


@dataclass
class AttentionBlock:
    """One encoder block taken apart (batch B, heads h, tokens T, width d, MLP width F).

    x: block input (B, T, d); value: (B, h, T, d/h); attention: post-softmax probabilities (B, h, T, T);
    mid: x + attention output (B, T, d); ln2: LayerNorm2(mid); pre_activation: fc1(ln2) (B, T, F);
    output: the block's output (B, T, d).
    """

    x: torch.Tensor
    value: torch.Tensor
    attention: torch.Tensor
    mid: torch.Tensor
    ln2: torch.Tensor
    pre_activation: torch.Tensor
    output: torch.Tensor


def attention_block(layer: nn.Module, x: torch.Tensor, attention_hook=None) -> AttentionBlock:
    """Run a transformers ``CLIPEncoderLayer`` step by step with its own weights.

    attention_hook: optional function applied to the attention probabilities before they are used (naive
    LeGrad makes them a leaf that requires grad). Equals ``layer(x, None)`` (tested).
    """
    attn = layer.self_attn
    batch, tokens, width = x.shape
    heads = attn.num_heads
    ln1 = layer.layer_norm1(x)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, tokens, heads, width // heads).transpose(1, 2)

    query, key, value = split(attn.q_proj(ln1)), split(attn.k_proj(ln1)), split(attn.v_proj(ln1))
    scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
    attention = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if attention_hook is not None:
        attention = attention_hook(attention)
    heads_out = torch.matmul(attention, value).transpose(1, 2).reshape(batch, tokens, width)
    mid = x + attn.out_proj(heads_out)
    ln2 = layer.layer_norm2(mid)
    pre_activation = layer.mlp.fc1(ln2)
    output = mid + layer.mlp.fc2(layer.mlp.activation_fn(pre_activation))
    return AttentionBlock(x, value, attention, mid, ln2, pre_activation, output)


class ClipBackbone(nn.Module):
    """A frozen transformers ``CLIPModel`` at ``image_size`` with resampled position embeddings.

    tokenizer: the checkpoint's (or the offline tiny one); mean/std: the checkpoint's image statistics.
    """

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: Any,
        image_size: int = 448,
        antialias: bool = True,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        super().__init__()
        patch = model.config.vision_config.patch_size
        if image_size <= 0 or image_size % patch:
            raise ValueError(f"image_size={image_size} must be a positive multiple of the patch size {patch}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.antialias = bool(antialias)
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)
        self._positions: dict[tuple, torch.Tensor] = {}

    # -- sizes ---------------------------------------------------------------------------------------
    @property
    def vision(self) -> nn.Module:
        return self.model.vision_model

    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size

    @property
    def num_layers(self) -> int:
        return len(self.vision.encoder.layers)

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    def layer_indices(self, layers: Sequence[int]) -> list[int]:
        """Block indices (negative counts from the end), sorted and unique; out of range is an error."""
        count = self.num_layers
        resolved = set()
        for layer in layers:
            index = layer + count if layer < 0 else layer
            if not 0 <= index < count:
                raise ValueError(f"layer {layer} is out of range for a vision tower of {count} blocks")
            resolved.add(index)
        if not resolved:
            raise ValueError("layers must name at least one block")
        return sorted(resolved)

    # -- images --------------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 or [0, 1] float images (3, H, W) (a list, or a (B, 3, H, W) tensor) -> normalized
        (B, 3, S, S) at ``image_size`` (bicubic, antialiased), in the model's dtype and device."""
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            images = [images]
        out = []
        for image in images:
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"an image must be (3, H, W), got {tuple(image.shape)}")
            pixels = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
            pixels = F.interpolate(
                pixels[None].to(self.mean.device), size=(self.image_size, self.image_size), mode="bicubic",
                align_corners=False, antialias=True,
            )[0].clamp(0.0, 1.0)
            out.append((pixels - self.mean) / self.std)
        dtype = self.vision.embeddings.patch_embedding.weight.dtype
        return torch.stack(out).to(dtype)

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        weight = self.vision.embeddings.position_embedding.weight
        key = (grid, weight.device, weight.dtype, weight.data_ptr())
        if key not in self._positions:
            self._positions = {key: resample_position_embeddings(weight, grid, self.antialias)}
        return self._positions[key]

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized pixels -> tokens entering block 0 (B, 1 + gh*gw, d), pre-LayerNorm applied."""
        embeddings = self.vision.embeddings
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image {height}x{width} is not a multiple of the patch size {self.patch_size}")
        patches = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = embeddings.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        tokens = torch.cat([cls, patches], dim=1)
        tokens = tokens + self.position_embeddings((height // self.patch_size, width // self.patch_size))
        return self.vision.pre_layrnorm(tokens)

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Tokens entering block ``start`` -> tokens leaving block ``stop - 1``."""
        for layer in self.vision.encoder.layers[start:stop]:
            tokens = layer(tokens, None)
            tokens = tokens[0] if isinstance(tokens, tuple) else tokens
        return tokens

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., T, d) -> normalized projected mean of ALL tokens (LeGrad's f_l, docs/maskinversion.md)."""
        pooled = self.vision.post_layernorm(tokens.mean(dim=-2))
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    def project_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """A mean token (..., d) -> normalized projected embedding (the map m -> f of docs/maskinversion.md)."""
        return F.normalize(self.model.visual_projection(self.vision.post_layernorm(pooled)), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The global image embedding (B, P): CLS after the last block, post-LayerNorm, projected, not normalized."""
        tokens = self.run_blocks(self.embed(pixel_values), 0, self.num_layers)
        return self.model.visual_projection(self.vision.post_layernorm(tokens[:, 0]))

    # -- text ----------------------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(len(texts), P) projected text embeddings, not normalized."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings")
        device = self.model.text_projection.weight.device
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start:start + batch_size]), padding=True, truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt",
            )
            outputs = self.model.text_model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            )
            out.append(self.model.text_projection(outputs.pooler_output))
        if not out:
            return torch.zeros(0, self.embed_dim, device=device)
        return torch.cat(out)


def tiny_clip_config(tokenizer: Any, overrides: dict | None = None, base: dict | None = None) -> CLIPConfig:
    """``base`` (default ``TINY_CLIP_CONFIG``) plus overrides, with the text tower sized for ``tokenizer``."""
    from grounding.models.clip_tokenizer import clip_token_ids

    settings = merge_nested(TINY_CLIP_CONFIG if base is None else base, overrides or {})
    settings["text_config"].update(clip_token_ids(tokenizer))
    return CLIPConfig(**settings)


def _image_statistics(name_or_path: str) -> tuple[Sequence[float], Sequence[float]]:
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(name_or_path)
        return tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        return CLIP_MEAN, CLIP_STD


def build_clip(
    name_or_path: str = "tiny",
    image_size: int = 448,
    antialias: bool = True,
    overrides: dict | None = None,
    tokenizer_dir: str | Path | None = None,
    seed: int | None = 0,
) -> ClipBackbone:
    """A ``ClipBackbone``.

    name_or_path: ``"tiny"`` (random ``TINY_CLIP_CONFIG``), ``"vit-b16-random"`` (ViT-B/16 sizes, random
    weights, for benchmarks), ``"open_clip:<model>/<pretrained tag or checkpoint file>"`` (an open_clip model
    converted by ``grounding.models.open_clip_convert``; needs the ``openclip`` extra), else a hub id or local
    folder for ``CLIPModel.from_pretrained``.
    overrides: config fields merged into the random configs (nested dicts key by key); ignored otherwise.
    seed: seeds the random initialization of the random models (None: the global RNG state).
    tokenizer_dir: also save the random models' offline tokenizer there (nothing is written when None).
    """
    if name_or_path in ("tiny", "vit-b16-random"):
        from grounding.models.clip_tokenizer import build_clip_tokenizer

        tokenizer = build_clip_tokenizer(tokenizer_dir)  # built in memory; saved only when a folder is given
        base = TINY_CLIP_CONFIG if name_or_path == "tiny" else VIT_B16_CONFIG
        config = tiny_clip_config(tokenizer, overrides, base)
        config.vision_config._attn_implementation = "eager"
        if seed is None:
            model = CLIPModel(config)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = CLIPModel(config)
        return ClipBackbone(model, tokenizer, image_size, antialias)
    if name_or_path.startswith("open_clip:"):
        from grounding.models.open_clip_convert import build_open_clip

        return build_open_clip(name_or_path, image_size, antialias)
    from transformers import AutoTokenizer

    model = CLIPModel.from_pretrained(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    mean, std = _image_statistics(name_or_path)
    return ClipBackbone(model, tokenizer, image_size, antialias, mean, std)
