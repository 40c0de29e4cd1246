"""Grounding DINO from transformers: building it, and masking the feature maps that enter its encoder.

``build_grounding_dino("IDEA-Research/grounding-dino-tiny")`` (or a local folder) loads a pretrained
checkpoint with its own tokenizer; ``build_grounding_dino("tiny")`` builds a small random model from
``TINY_CONFIG`` (plus overrides) with a WordPiece tokenizer made offline (``grounding.models.tokenizer``).
The loss is the library's own (``GroundingDinoForObjectDetection(..., labels=...)``).

IMAGE masks the multi-scale maps between the backbone and the encoder (docs/image.md "Where masking
happens"): the outputs of ``model.model.input_proj_vision[l]``, the 3 projected backbone stages and the
extra stride-2 level. ``feature_masking`` attaches forward hooks to those projections for the duration of
one training forward pass, so no model code is copied and nothing changes outside the ``with`` block.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

from grounding.models.tokenizer import build_wordpiece_tokenizer, load_tokenizer, wordpiece_vocabulary
from grounding.utils import merge_nested

#: the random demo / test model: Swin embed 32, d_model 64, two-stage with auxiliary losses.
TINY_CONFIG: dict[str, Any] = {
    "backbone_config": {
        "embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [2, 2, 4, 4], "window_size": 4,
        "out_features": ["stage2", "stage3", "stage4"],
    },
    "text_config": {
        "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 256,
    },
    "d_model": 64, "encoder_layers": 2, "decoder_layers": 3, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "num_queries": 100, "max_text_len": 64,
    "auxiliary_loss": True, "two_stage": True,
}


def tiny_grounding_dino_config(vocab_size: int, overrides: dict | None = None) -> GroundingDinoConfig:
    """``TINY_CONFIG`` with ``overrides`` merged in (nested dicts merge key by key)."""
    settings = merge_nested(TINY_CONFIG, overrides or {})
    backbone = SwinConfig(**settings.pop("backbone_config"))
    text = BertConfig(vocab_size=vocab_size, **settings.pop("text_config"))
    if settings["d_model"] % 32:
        raise ValueError(f"model_config d_model={settings['d_model']} must be a multiple of 32 (GroupNorm(32, d_model))")
    return GroundingDinoConfig(backbone_config=backbone, text_config=text, **settings)


def build_grounding_dino(
    name_or_path: str = "tiny", overrides: dict | None = None, tokenizer_dir: str | Path | None = None
) -> tuple[GroundingDinoForObjectDetection, Any]:
    """The detector and its tokenizer.

    name_or_path: ``"tiny"`` for the random tiny model, else a hub id or local folder for ``from_pretrained``.
    overrides: config fields (tiny: merged into ``TINY_CONFIG``; pretrained: passed to ``from_pretrained``).
    tokenizer_dir: also save the tiny model's tokenizer there (it is built in memory; nothing is written
        when None).
    """
    if name_or_path == "tiny":
        tokenizer = build_wordpiece_tokenizer(tokenizer_dir)
        config = tiny_grounding_dino_config(len(wordpiece_vocabulary()), overrides)
        return GroundingDinoForObjectDetection(config), tokenizer
    model = GroundingDinoForObjectDetection.from_pretrained(name_or_path, **(overrides or {}))
    return model, load_tokenizer(name_or_path)


def untrained_modules(model: GroundingDinoForObjectDetection) -> dict[str, str]:
    """Modules of transformers' Grounding DINO that never receive a gradient in training, and why.

    - ``model.enc_output``, ``model.enc_output_norm``, ``model.encoder_output_bbox_embed`` (two-stage
      proposal head): transformers computes the encoder ("_enc") loss on the detached top-k proposals,
      so nothing downstream of these layers reaches a loss (docs/image.md "Known limitation").
    - the Swin backbone's final ``layernorm``: the encoder reads the stage outputs through their own
      norms, never the last hidden state.
    DDP needs every trainable parameter to get a gradient (else ``find_unused_parameters`` on every step);
    ``freeze_untrained`` freezes these, which changes no weight update (they had no gradient anyway).
    """
    found: dict[str, str] = {}
    if model.config.two_stage:
        for name in ("enc_output", "enc_output_norm", "encoder_output_bbox_embed"):
            if getattr(model.model, name, None) is not None:
                found[f"model.{name}"] = "two-stage proposal head: transformers' encoder loss uses detached proposals"
    backbone = model.model.backbone.conv_encoder.model
    for name, module in backbone.named_modules():
        if name.split(".")[-1] == "layernorm" and isinstance(module, nn.LayerNorm):
            found[f"model.backbone.conv_encoder.model.{name}"] = "backbone's final norm: its output feeds no feature level"
    return found


def freeze_untrained(model: GroundingDinoForObjectDetection) -> list[str]:
    """Freeze ``untrained_modules``; returns the names of the parameters frozen."""
    modules = dict(model.named_modules())
    frozen = []
    for name in untrained_modules(model):
        for parameter_name, parameter in modules[name].named_parameters():
            if parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen.append(f"{name}.{parameter_name}")
    return frozen


def encoder_token_count(config: GroundingDinoConfig, height: int, width: int) -> int:
    """Tokens of all feature levels entering the encoder for a (padded) input of height × width pixels.

    Swin embeds patches of ``patch_size`` and halves the grid at each later stage (rounding up, as it pads);
    the extra levels beyond the backbone's outputs are stride-2 convolutions (kernel 3, padding 1). The
    two-stage head keeps the top ``num_queries`` of these tokens, so an input with fewer cannot be run.
    """
    backbone = config.backbone_config
    grid_h, grid_w = math.ceil(height / backbone.patch_size), math.ceil(width / backbone.patch_size)
    stage_sizes = {}
    for stage, name in enumerate(backbone.stage_names[1:], start=1):
        if stage > 1:
            grid_h, grid_w = math.ceil(grid_h / 2), math.ceil(grid_w / 2)
        stage_sizes[name] = (grid_h, grid_w)
    sizes = [stage_sizes[name] for name in backbone.out_features]
    while len(sizes) < config.num_feature_levels:
        h, w = sizes[-1]
        sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return sum(h * w for h, w in sizes)


def parameter_groups(
    model: GroundingDinoForObjectDetection, lr: float, lr_backbone: float, lr_text_encoder: float, weight_decay: float
) -> list[dict]:
    """AdamW groups as in Open-GroundingDino (docs/image.md): backbone and text encoder at their own lr."""
    groups = {"backbone": [], "text_encoder": [], "rest": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("model.backbone."):
            groups["backbone"].append(parameter)
        elif name.startswith("model.text_backbone."):
            groups["text_encoder"].append(parameter)
        else:
            groups["rest"].append(parameter)
    rates = {"backbone": lr_backbone, "text_encoder": lr_text_encoder, "rest": lr}
    return [
        {"params": params, "lr": rates[name], "weight_decay": weight_decay, "name": name}
        for name, params in groups.items()
        if params
    ]


def level_valid_masks(pixel_mask: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """pixel_mask (B, H, W) 1 on real pixels -> (B, h_l, w_l) bool per level, resized as the model does."""
    return [
        nn.functional.interpolate(pixel_mask[None].float(), size=size).to(torch.bool)[0] for size in sizes
    ]


@contextlib.contextmanager
def feature_masking(
    model: GroundingDinoForObjectDetection, masker: nn.Module, progress: float, pixel_mask: torch.Tensor | None
) -> Iterator[None]:
    """Mask the encoder's input maps of the forward passes run inside the block.

    masker: an ``AdaptiveMasking`` (its ``mask_level(x, level, progress, valid)`` returns (masked x, mask)).
    pixel_mask: (B, H, W), 1 on real pixels, so that padding is never chosen as a salient patch.
    """
    handles = []

    def hook_for(level: int):
        def hook(module, inputs, output):  # output: (B, d_model, h, w)
            valid = None
            if pixel_mask is not None:
                valid = level_valid_masks(pixel_mask, [tuple(output.shape[-2:])])[0]
            masked, _ = masker.mask_level(output, level, progress, valid)
            return masked

        return hook

    for level, projection in enumerate(model.model.input_proj_vision):
        handles.append(projection.register_forward_hook(hook_for(level)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
