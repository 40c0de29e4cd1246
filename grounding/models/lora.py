"""LoRA (low-rank adapters) for the Grounding DINO family, through peft (docs/training.md "Parameter-efficient
fine-tuning and weight averaging").

``apply_lora(detector, LoraSettings(r=16))`` puts an adapter beside every ``nn.Linear`` of the chosen groups of
transformers' ``GroundingDinoForObjectDetection`` / ``MMGroundingDinoForObjectDetection`` (both classes name their
layers alike), freezes every base weight and keeps the heads of ``TRAINABLE_HEADS`` trainable. A layer ``W`` then
computes ``W x + (alpha / r) · B A x`` with A (r × in) drawn at random and B (out × r) zero at the start, so the
adapted detector starts as the pretrained one.

The adapters are injected with peft's ``inject_adapter_in_model``, which replaces each chosen ``nn.Linear`` in place
by a peft ``lora.Linear`` (the original layer becomes its ``base_layer``). The detector keeps its class, its
``forward``, its ``config`` and the attribute path of every other module, so the hooks of
``grounding.models.grounding_dino`` (``feature_masking`` on ``model.input_proj_vision``, ``trained_proposals`` on
``model`` and ``loss_function``, ``shared_image_backbone``), ``grounding.models.denoising.denoising_training`` (on
``model.decoder``) and ``batch_label_maps`` (transformers' module functions) find what they patch. (peft's
``get_peft_model`` would wrap the detector in a ``PeftModel``, moving every path under ``base_model.model``.)
peft looks for word embeddings tied to the input embeddings, which these detectors cannot answer
(``get_input_embeddings`` is not implemented for them), so the adapters are injected through a plain holder
module that has no tied weights; nothing is left on the detector but the adapted layers.

A checkpoint of an adapted detector holds ``<layer>.base_layer.weight`` / ``.bias`` and
``<layer>.lora_A.default.weight`` / ``<layer>.lora_B.default.weight``; ``merged_state_dict`` folds every adapter
into its base weight, ``W + (alpha / r) B A``, so that ``GroundingDetector.from_checkpoint`` and
``grounding-export`` give a plain detector (transformers' own keys, no peft needed to load it).

Groups (``LoraSettings.target_modules``, names of ``LORA_GROUPS``):

- ``encoder_attention``: the encoder's deformable self-attention value and output projections and the text
  enhancer's self-attention (query, key, value, output);
- ``encoder_ffn``: the feed-forward layers (fc1, fc2) of the encoder's deformable and text-enhancer layers;
- ``fusion``: the image-text fusion layers' bi-attention projections (image and text queries, values, outputs);
- ``decoder_attention``: the decoder's self-attention and text cross-attention (query, key, value, output) and
  its deformable cross-attention value and output projections;
- ``decoder_ffn``: the decoder's feed-forward layers;
- ``deformable_sampling``: the deformable attentions' ``sampling_offsets`` and ``attention_weights`` (not in the
  default, see below);
- ``backbone``: the Swin blocks' attention (query, key, value, output) and MLP (fc1, fc2);
- ``text_encoder``: BERT's attention (query, key, value, output) and feed-forward (intermediate, output).

The default is the first five. The deformable attentions' ``sampling_offsets`` and ``attention_weights`` are left
frozen by default: they do not transform features but predict, per query, where on each level to sample and how
to weigh the samples (Deformable DETR initializes them specially: zero weights, a grid of directions as the
offsets' bias); an adapter there moves the pretrained sampling pattern of every query, whereas adapters on the
value and output projections (and the feed-forward layers) change what is read at those points, which is the
usual place of LoRA in attention layers. ``deformable_sampling`` adds them for those who want to try.

Kept fully trainable (``TRAINABLE_HEADS``), because they are the detector's output layers or small and specific to
this training: the decoder's box heads ``bbox_embed`` and class heads ``class_embed`` (parameter-free in Grounding
DINO, a learned bias in MM-Grounding-DINO; ``model.decoder.*`` holds the same modules), the two-stage proposal head
(``model.enc_output``, ``model.enc_output_norm``, ``model.encoder_output_bbox_embed``,
``model.encoder_output_class_embed``: this project trains it with the undetached proposal loss, which transformers'
loss does not), the query embeddings (``model.query_position_embeddings``, ``model.reference_points`` of the
single-stage model) and ``model.decoder.reference_points_head``, which embeds the reference boxes (also the noised
boxes of contrastive denoising). The denoising label table (``ImageGroundingModule.denoising``) is not part of the
detector, is new in this training and stays trainable. A head frozen before ``apply_lora`` (e.g. the proposal head
with ``proposal_loss: detached``, by ``freeze_untrained``) stays frozen. Everything else of the detector (norms,
embeddings, input projections, the text projection) is frozen; the adapters are trainable wherever they are put
(also in the text encoder, which ``freeze_text_encoder`` otherwise keeps frozen as a whole).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, get_args

import torch
from torch import nn

#: a named group of linear layers (``LORA_GROUPS``)
LoraGroup = Literal[
    "encoder_attention", "encoder_ffn", "fusion", "decoder_attention", "decoder_ffn", "deformable_sampling",
    "backbone", "text_encoder",
]

#: group -> patterns of the full module names (in the detector) of its ``nn.Linear`` layers (``re.fullmatch``);
#: the backbone and text encoder patterns take both namings transformers has used for Swin and BERT layers
LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "encoder_attention": (
        r"model\.encoder\.layers\.\d+\.deformable_layer\.self_attn\.(value_proj|output_proj)",
        r"model\.encoder\.layers\.\d+\.text_enhancer_layer\.self_attn\.(query|key|value|out_proj)",
    ),
    "encoder_ffn": (r"model\.encoder\.layers\.\d+\.(deformable_layer|text_enhancer_layer)\.(fc1|fc2)",),
    "fusion": (
        r"model\.encoder\.layers\.\d+\.fusion_layer\.attn\."
        r"(vision_proj|text_proj|values_vision_proj|values_text_proj|out_vision_proj|out_text_proj)",
    ),
    "decoder_attention": (
        r"model\.decoder\.layers\.\d+\.(self_attn|encoder_attn_text)\.(query|key|value|out_proj)",
        r"model\.decoder\.layers\.\d+\.encoder_attn\.(value_proj|output_proj)",
    ),
    "decoder_ffn": (r"model\.decoder\.layers\.\d+\.(fc1|fc2)",),
    "deformable_sampling": (
        r"model\.(encoder\.layers\.\d+\.deformable_layer\.self_attn|decoder\.layers\.\d+\.encoder_attn)"
        r"\.(sampling_offsets|attention_weights)",
    ),
    "backbone": (
        r"model\.backbone\.conv_encoder\.model\.(swin\.)?encoder\.layers\.\d+\.blocks\.\d+\."
        r"(attention\.(q_proj|k_proj|v_proj|o_proj|self\.(query|key|value)|output\.dense)"
        r"|mlp\.(fc1|fc2)|intermediate\.dense|output\.dense)",
    ),
    "text_encoder": (
        r"model\.text_backbone\.encoder\.layer\.\d+\."
        r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    ),
}

#: the rank the documentation suggests (``--model.lora.r 16``); ``LoraSettings.r`` defaults to 0, LoRA off
DEFAULT_RANK = 16

#: the groups adapted when ``target_modules`` is not given
DEFAULT_TARGETS: tuple[str, ...] = ("encoder_attention", "encoder_ffn", "fusion", "decoder_attention", "decoder_ffn")

#: modules of the detector left fully trainable under LoRA (those the model has; see the module docstring)
TRAINABLE_HEADS = (
    "bbox_embed", "class_embed", "model.enc_output", "model.enc_output_norm", "model.encoder_output_bbox_embed",
    "model.encoder_output_class_embed", "model.query_position_embeddings", "model.reference_points",
    "model.decoder.reference_points_head",
)

#: the name peft gives the one adapter
ADAPTER = "default"

#: what a checkpoint of an adapted layer holds, after the layer's name
_BASE = ".base_layer."
_FACTORS = {f".lora_{which}.{ADAPTER}.weight": which for which in "AB"}


@dataclass
class LoraSettings:
    """LoRA settings of the detector (``--model.lora.*``; docs/training.md).

    Attributes:
        r: rank of the adapters; 0 (the default) trains without LoRA. 16 is a usual choice.
        alpha: scale numerator: an adapter adds ``(alpha / r) · B A x``. 32 with r = 16 (scale 2).
        dropout: dropout on an adapter's input during training (0.05); 0 has none.
        target_modules: the groups of linear layers that get an adapter (``LORA_GROUPS``); default the encoder's
            and the decoder's attention and feed-forward projections and the fusion layers.
    """

    r: int = 0
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[LoraGroup, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"lora.r must be an integer >= 0 (0 turns LoRA off), got {self.r!r}")
        if isinstance(self.alpha, bool) or not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora.alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
        known = get_args(LoraGroup)
        unknown = [name for name in targets if name not in known]
        if unknown or not targets:
            raise ValueError(f"lora.target_modules must be a non-empty list of {list(known)}, got {list(targets)!r}")
        self.target_modules = tuple(dict.fromkeys(targets))
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def scaling(self) -> float:
        """alpha / r, the factor of every adapter's output (peft's ``scaling`` without rsLoRA)."""
        return self.alpha / self.r


def lora_settings(value: Any) -> LoraSettings:
    """``LoraSettings`` from what a module's hyper-parameters hold: the dataclass (a module built in Python), a
    dict (the command line's config) or None (LoRA off)."""
    if value is None:
        return LoraSettings()
    if isinstance(value, LoraSettings):
        return value
    if isinstance(value, Mapping):
        return LoraSettings(**dict(value))
    raise ValueError(f"lora settings must be LoraSettings, a dict or None, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------- choosing layers
def lora_layer_names(model: nn.Module, groups: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """group -> the full names of the ``nn.Linear`` layers of ``model`` in it (in the model's order). A group
    that matches no linear layer is an error (a renamed layer would otherwise silently get no adapter)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    found: dict[str, list[str]] = {}
    for group in groups:
        if group not in LORA_GROUPS:
            raise ValueError(f"unknown LoRA group {group!r}; known: {sorted(LORA_GROUPS)}")
        patterns = [re.compile(pattern) for pattern in LORA_GROUPS[group]]
        found[group] = [name for name in linear if any(p.fullmatch(name) for p in patterns)]
        if not found[group]:
            raise ValueError(f"LoRA group {group!r} matches no linear layer of this {type(model).__name__}")
    return found


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the ``TRAINABLE_HEADS`` the model has, by full name (tied ones once)."""
    modules = dict(model.named_modules())
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for head in TRAINABLE_HEADS:
        if head in modules:
            named = [(f"{head}.{name}", p) for name, p in modules[head].named_parameters()]
        else:
            owner, _, attribute = head.rpartition(".")
            parameter = getattr(modules.get(owner), attribute, None) if owner in modules else None
            named = [(head, parameter)] if isinstance(parameter, nn.Parameter) else []
        for name, parameter in named:
            if id(parameter) not in seen:
                seen.add(id(parameter))
                found[name] = parameter
    return found


# ------------------------------------------------------------------------------------------- adapting
def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Adapt ``model`` in place (see the module docstring); returns the names of the adapted layers.

    Every parameter of the model is frozen but the adapters' and those of the ``TRAINABLE_HEADS`` that were
    trainable before the call.
    """
    if not settings.enabled:
        return []
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:  # an optional dependency
        raise ImportError("model.lora needs peft: pip install 'grounding[lora]' (or pip install peft)") from error
    names = [name for group in lora_layer_names(model, settings.target_modules).values() for name in group]
    names = list(dict.fromkeys(names))
    heads = {name for name, parameter in head_parameters(model).items() if parameter.requires_grad}
    holder = nn.Module()  # no tied weights for peft to look for; the detector's layers are replaced in place
    holder.detector = model
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
        target_modules=[f"detector.{name}" for name in names],
    )
    inject_adapter_in_model(config, holder, adapter_name=ADAPTER)
    del holder.detector
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_A." in name or ".lora_B." in name)
    for name, parameter in head_parameters(model).items():
        if name in heads:
            parameter.requires_grad_(True)
    return names


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The adapted layers of a model (peft's LoRA layers), by name."""
    return {name: module for name, module in model.named_modules()
            if hasattr(module, "lora_A") and hasattr(module, "base_layer")}


def _factor(key: str) -> tuple[str, str] | None:
    """(layer, "A" or "B") of an adapter factor's state-dict key, else None."""
    for suffix, which in _FACTORS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], which
    return None


def has_adapters(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict holds LoRA adapters."""
    return any(_factor(key) for key in state_dict)


def merged_state_dict(state_dict: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The state dict with every adapter folded into its base weight: ``<layer>.weight = W + scaling · B A``
    (computed in float64, stored in W's dtype), ``<layer>.bias`` the base bias; the adapter keys are gone and the
    keys are those of the model without adapters. ``scaling`` is ``alpha / r`` (``LoraSettings.scaling``)."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    merged: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        factor = _factor(key)
        if factor:
            factors.setdefault(factor[0], {})[factor[1]] = value
        elif _BASE in key:
            layer, _, rest = key.partition(_BASE)
            merged[f"{layer}.{rest}"] = value
        else:
            merged[key] = value
    for layer, pair in factors.items():
        weight = merged.get(f"{layer}.weight")
        if weight is None or set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA adapter of {layer!r} is incomplete: factors {sorted(pair)}, base weight {'found' if weight is not None else 'missing'}")
        delta = pair["B"].to(torch.float64) @ pair["A"].to(torch.float64)
        if delta.shape != weight.shape:
            raise ValueError(f"LoRA adapter of {layer!r} gives a {tuple(delta.shape)} update for a {tuple(weight.shape)} weight")
        merged[f"{layer}.weight"] = (weight.to(torch.float64) + scaling * delta).to(weight.dtype)
    return merged


# ------------------------------------------------------------------------------------------- reporting
def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameter values of a module (a tied parameter counted once)."""
    trainable = total = 0
    for parameter in module.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def log_parameter_counts(module: nn.Module, adapted: list[str] | None = None) -> str:
    """Log (INFO, rank 0 only, through Lightning's ``rank_zero_info``) the trainable and total parameter counts;
    returns the line."""
    trainable, total = parameter_counts(module)
    line = f"parameters: {trainable:,} trainable of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)"
    if adapted:
        line += f"; LoRA adapters on {len(adapted)} linear layers"
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    rank_zero_info(line)
    return line
