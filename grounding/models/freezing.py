"""Freezing named parts of Grounding DINO / MM-Grounding-DINO (docs/image.md "Freezing and gradient checkpointing").

``--model.freeze`` takes a list of part names. Each part is a fixed set of module (or parameter) paths of
transformers' ``GroundingDinoForObjectDetection``; ``MMGroundingDinoForObjectDetection`` has the same paths:

==========================  ===================================================================================
part                        what it holds
==========================  ===================================================================================
``backbone``                ``model.backbone``: the whole Swin (patch embedding, 4 stages, the norms of the
                            stages it outputs)
``backbone_stages:N``       N = 1..4: Swin's patch embedding and its first N stages (each with its patch
                            merging), with the output norm of those of them that feed a feature level (as
                            mmdetection's ``frozen_stages``)
``text_encoder``            ``model.text_backbone``: BERT (what ``freeze_text_encoder: true`` froze)
``input_projection``        ``model.input_proj_vision`` (the 1x1 / stride-2 convolutions to d_model whose outputs
                            IMAGE masks) and ``model.text_projection`` (BERT's output to d_model)
``encoder``                 ``model.encoder`` (the feature enhancer: text enhancer, fusion and deformable
                            layers) and ``model.level_embed``; ``feature_enhancer`` is the same part
``decoder``                 ``model.decoder.layers``, ``model.decoder.layer_norm``,
                            ``model.decoder.reference_points_head`` and ``model.query_position_embeddings``
                            (the query content); not the prediction heads
==========================  ===================================================================================

The prediction heads (``class_embed``, ``bbox_embed``: the decoder holds the same modules, tied) and the two-stage
proposal head are in no part: they always train (``freeze_untrained`` of ``grounding.models.grounding_dino`` still
freezes what gets no gradient at all).

A frozen parameter has ``requires_grad`` off, so the optimizer never receives it (``parameter_groups`` keeps the
trainable ones only) and holds no state for it, and DDP does not wait for its gradient. Freezing never cuts a
path from a trainable parameter to the loss (activations still carry gradients through frozen weights), so every
trainable parameter still gets a gradient and DDP needs no ``find_unused_parameters``. Autograd records nothing
for an operation none of whose inputs requires a gradient: a frozen backbone (or frozen first stages, or a frozen
text encoder) stores no activation for the backward pass; a frozen encoder or decoder between trainable parts
still does, since the gradient must pass through it. Frozen modules keep the training mode of the rest (dropout
and drop path stay on in training), as ``freeze_text_encoder`` did.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Literal, get_args

from torch import nn

#: the names ``--model.freeze`` accepts
FreezePart = Literal[
    "backbone", "backbone_stages:1", "backbone_stages:2", "backbone_stages:3", "backbone_stages:4",
    "text_encoder", "input_projection", "encoder", "feature_enhancer", "decoder",
]
FREEZE_PARTS: tuple[str, ...] = get_args(FreezePart)

#: other names of a part -> its name
ALIASES = {"feature_enhancer": "encoder"}

#: the default of ``--model.freeze``: the text encoder (the paper's fine-tuning setting)
DEFAULT_FREEZE = ("text_encoder",)

#: Swin inside the detector (a transformers ``SwinBackbone``)
SWIN = "model.backbone.conv_encoder.model"
STAGES_PREFIX = "backbone_stages:"

#: part -> module or parameter paths in the detector (``backbone_stages:N`` is built by ``part_paths``)
PART_PATHS: dict[str, tuple[str, ...]] = {
    "backbone": ("model.backbone",),
    "text_encoder": ("model.text_backbone",),
    "input_projection": ("model.input_proj_vision", "model.text_projection"),
    "encoder": ("model.encoder", "model.level_embed"),
    "decoder": (
        "model.decoder.layers", "model.decoder.layer_norm", "model.decoder.reference_points_head",
        "model.query_position_embeddings",
    ),
}


def _choices() -> str:
    return ", ".join(FREEZE_PARTS)


def resolve_freeze(freeze: Iterable[str] | None, freeze_text_encoder: bool | None = None) -> list[str]:
    """The parts to freeze, by their own names, once each, in the order given.

    freeze: part names (``FreezePart``); None is the default, ``DEFAULT_FREEZE``.
    freeze_text_encoder: the deprecated setting (a ``FutureWarning`` when given): True adds ``text_encoder`` to
        ``freeze``, False removes it from the default (an explicit ``freeze`` with ``text_encoder`` contradicts it:
        an error); None (the default) leaves ``freeze`` as it is.
    ``backbone`` covers any ``backbone_stages:N``; of several ``backbone_stages:N`` the largest N counts.
    """
    explicit = freeze is not None
    if isinstance(freeze, (str, bytes)):
        raise ValueError(f"model.freeze must be a list of parts (e.g. [{freeze!r}]), got the string {freeze!r}; parts: {_choices()}")
    names = list(freeze) if explicit else list(DEFAULT_FREEZE)
    for name in names:
        if name not in FREEZE_PARTS:
            raise ValueError(f"model.freeze: unknown part {name!r}; the parts are {_choices()}")
    parts: list[str] = []
    for name in names:
        name = ALIASES.get(name, name)
        if name not in parts:
            parts.append(name)
    if freeze_text_encoder is not None:
        if not isinstance(freeze_text_encoder, bool):
            raise ValueError(f"model.freeze_text_encoder must be true, false or null, got {freeze_text_encoder!r}")
        if explicit and not freeze_text_encoder and "text_encoder" in parts:
            raise ValueError(
                f"model.freeze_text_encoder={str(freeze_text_encoder).lower()} contradicts model.freeze={names}; "
                "freeze_text_encoder is deprecated: give only model.freeze (with or without text_encoder)"
            )
        warnings.warn(
            f"model.freeze_text_encoder is deprecated; use model.freeze: "
            f"{'[text_encoder]' if freeze_text_encoder else '[]'} (plus any other part to freeze)",
            FutureWarning, stacklevel=3,
        )
        if freeze_text_encoder and "text_encoder" not in parts:
            parts.append("text_encoder")
        if not freeze_text_encoder and "text_encoder" in parts:
            parts.remove("text_encoder")
    stages = [p for p in parts if p.startswith(STAGES_PREFIX)]
    if "backbone" in parts or len(stages) > 1:
        keep = None if "backbone" in parts else max(stages, key=lambda p: int(p[len(STAGES_PREFIX):]))
        parts = [p for p in parts if not p.startswith(STAGES_PREFIX) or p == keep]
    return parts


def swin_stage_count(model: nn.Module) -> int:
    """Stages of the detector's Swin (4 in every Grounding DINO)."""
    return len(model.get_submodule(f"{SWIN}.swin.encoder.layers"))


def part_paths(model: nn.Module, part: str) -> tuple[str, ...]:
    """The module or parameter paths of ``part`` (a name of ``FREEZE_PARTS``) in ``model``."""
    part = ALIASES.get(part, part)
    if part in PART_PATHS:
        return PART_PATHS[part]
    if not part.startswith(STAGES_PREFIX) or part not in FREEZE_PARTS:
        raise ValueError(f"model.freeze: unknown part {part!r}; the parts are {_choices()}")
    count = int(part[len(STAGES_PREFIX):])
    total = swin_stage_count(model)
    if not 1 <= count <= total:
        raise ValueError(f"model.freeze: {part} asks for {count} stages, the model's Swin has {total}")
    norms = model.get_submodule(f"{SWIN}.hidden_states_norms")
    paths = [f"{SWIN}.swin.embeddings"]
    for stage in range(1, count + 1):  # Swin's stage k is encoder.layers[k - 1], its output norm "stage{k}"
        paths.append(f"{SWIN}.swin.encoder.layers.{stage - 1}")
        if f"stage{stage}" in norms:
            paths.append(f"{SWIN}.hidden_states_norms.stage{stage}")
    return tuple(paths)


def part_parameters(model: nn.Module, part: str) -> dict[str, nn.Parameter]:
    """The parameters of ``part``: name (as ``model.named_parameters`` gives it) -> parameter. A parameter tied
    across modules is found under any of its names."""
    paths = part_paths(model, part)
    wanted = {
        id(parameter)
        for name, parameter in model.named_parameters(remove_duplicate=False)
        if any(name == path or name.startswith(path + ".") for path in paths)
    }
    found = {name: parameter for name, parameter in model.named_parameters() if id(parameter) in wanted}
    if not found:
        raise ValueError(f"model.freeze: part {part!r} ({', '.join(paths)}) has no parameter in {type(model).__name__}")
    return found


def freeze_parts(model: nn.Module, parts: Iterable[str]) -> list[str]:
    """Turn ``requires_grad`` off for every parameter of ``parts`` (resolved names, ``resolve_freeze``);
    returns the names of the parameters this froze."""
    frozen = []
    for part in parts:
        for name, parameter in part_parameters(model, part).items():
            if parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen.append(name)
    return frozen
