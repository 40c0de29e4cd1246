"""Grounding DINO from transformers: building it, and masking the feature maps that enter its encoder.

Two classes of the family are trained here, and every function of this module takes either:
``GroundingDinoForObjectDetection`` (IDEA-Research's Grounding DINO) and ``MMGroundingDinoForObjectDetection``
(MM-Grounding-DINO, whose class is also the one LLMDet checkpoints load as). ``build_grounding_dino(name)``
loads a hub id or a local folder of either through transformers' Auto classes
(``AutoModelForZeroShotObjectDetection``, ``AutoTokenizer``), with the checkpoint's own tokenizer;
``build_grounding_dino("tiny")`` builds a small random Grounding DINO from ``TINY_CONFIG`` (plus
overrides), ``build_grounding_dino("tiny-mm")`` the MM-Grounding-DINO of the same sizes, both with a
WordPiece tokenizer made offline (``grounding.models.tokenizer``).

The two classes share every module name this project hooks or freezes (``model.input_proj_vision``,
``model.decoder``, ``model.text_backbone``, ``model.enc_output``, ``class_embed``, ``bbox_embed``, …), their
forward code and the library's loss function (``GroundingDinoForObjectDetectionLoss``); MM-Grounding-DINO
is not a subclass of Grounding DINO, so nothing here tests the class. What it changes (docs/image.md
"Starting checkpoints"): its contrastive class heads (the decoder's ``class_embed[l]`` and the proposal
head's ``model.encoder_output_class_embed``) divide the query–token similarity by √d_model and add a
learned scalar bias (one for the proposals, one per decoder layer, tied into one by the default
``decoder_cls_embed_share``); the decoder's copy of the class heads is tied to them; the proposal box
head is always its own; there is no single-stage variant.
The loss is the library's own (``model(..., labels=...)``); inside ``trained_proposals`` its two-stage
encoder terms score the undetached proposals, as the original model.

IMAGE masks the multi-scale maps between the backbone and the encoder (docs/image.md "Where masking
happens"): the outputs of ``model.model.input_proj_vision[l]``, the 3 projected backbone stages and the
extra stride-2 level. ``feature_masking`` attaches forward hooks to those projections for the duration of
one training forward pass, so no model code is copied and nothing changes outside the ``with`` block.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForZeroShotObjectDetection,
    AutoTokenizer,
    BertConfig,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    MMGroundingDinoConfig,
    MMGroundingDinoForObjectDetection,
    SwinConfig,
)

from grounding.models.tokenizer import build_wordpiece_tokenizer, wordpiece_vocabulary
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


#: a detector this project trains: transformers' Grounding DINO or MM-Grounding-DINO (LLMDet loads as the latter)
GroundingDinoFamily = GroundingDinoForObjectDetection | MMGroundingDinoForObjectDetection
GroundingDinoFamilyConfig = GroundingDinoConfig | MMGroundingDinoConfig

#: a checkpoint's ``model_type`` -> the class ``AutoModelForZeroShotObjectDetection`` builds for it
DETECTOR_CLASSES: dict[str, type] = {
    "grounding-dino": GroundingDinoForObjectDetection,
    "mm-grounding-dino": MMGroundingDinoForObjectDetection,
}
CONFIG_CLASSES: dict[str, type] = {"grounding-dino": GroundingDinoConfig, "mm-grounding-dino": MMGroundingDinoConfig}

#: the random models built offline from ``TINY_CONFIG``: name -> model_type
TINY_MODELS = {"tiny": "grounding-dino", "tiny-mm": "mm-grounding-dino"}

#: ``from_pretrained`` arguments that say where the files come from (not config fields)
HUB_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def tiny_grounding_dino_config(
    vocab_size: int, overrides: dict | None = None, model_type: str = "grounding-dino"
) -> GroundingDinoFamilyConfig:
    """``TINY_CONFIG`` with ``overrides`` merged in (nested dicts merge key by key), as the config of
    ``model_type`` (``"grounding-dino"`` or ``"mm-grounding-dino"``)."""
    settings = merge_nested(TINY_CONFIG, overrides or {})
    backbone = SwinConfig(**settings.pop("backbone_config"))
    text = BertConfig(vocab_size=vocab_size, **settings.pop("text_config"))
    if settings["d_model"] % 32:
        raise ValueError(f"model_config d_model={settings['d_model']} must be a multiple of 32 (GroupNorm(32, d_model))")
    if model_type == "mm-grounding-dino" and not settings["two_stage"]:
        raise ValueError("model_config two_stage=false: MM-Grounding-DINO has no single-stage variant in transformers")
    return CONFIG_CLASSES[model_type](backbone_config=backbone, text_config=text, **settings)


def build_grounding_dino(
    name_or_path: str = "tiny", overrides: dict | None = None, tokenizer_dir: str | Path | None = None
) -> tuple[GroundingDinoFamily, Any]:
    """The detector and its tokenizer.

    name_or_path: ``"tiny"`` (random tiny Grounding DINO) or ``"tiny-mm"`` (random tiny MM-Grounding-DINO,
        the same sizes), else a hub id or local folder of a Grounding DINO, MM-Grounding-DINO or LLMDet
        checkpoint, loaded by ``AutoModelForZeroShotObjectDetection.from_pretrained`` with the
        checkpoint's own tokenizer (``AutoTokenizer``).
    overrides: config fields (tiny: merged into ``TINY_CONFIG``; pretrained: passed to ``from_pretrained``,
        e.g. ``{"num_queries": 300}`` or ``{"revision": "..."}``).
    tokenizer_dir: also save the tiny model's tokenizer there (it is built in memory; nothing is written
        when None).
    """
    if name_or_path in TINY_MODELS:
        model_type = TINY_MODELS[name_or_path]
        tokenizer = build_wordpiece_tokenizer(tokenizer_dir)
        config = tiny_grounding_dino_config(len(wordpiece_vocabulary()), overrides, model_type)
        return DETECTOR_CLASSES[model_type](config), tokenizer
    settings = dict(overrides or {})
    hub = {name: settings[name] for name in HUB_ARGUMENTS if name in settings}
    # the config first: a checkpoint of another family is refused before its weights are read
    model_type = AutoConfig.from_pretrained(name_or_path, **hub).model_type
    if model_type not in DETECTOR_CLASSES:
        raise ValueError(
            f"model {name_or_path!r} is a {model_type!r} checkpoint; supported: {sorted(DETECTOR_CLASSES)}"
            f" (Grounding DINO, MM-Grounding-DINO, LLMDet) or the random {sorted(TINY_MODELS)}"
        )
    model = AutoModelForZeroShotObjectDetection.from_pretrained(name_or_path, **settings)
    return model, AutoTokenizer.from_pretrained(name_or_path, **hub)


PROPOSAL_HEAD = ("enc_output", "enc_output_norm", "encoder_output_bbox_embed")


def untrained_modules(model: GroundingDinoFamily, proposal_loss: str = "trained") -> dict[str, str]:
    """Modules of transformers' Grounding DINO / MM-Grounding-DINO that never receive a gradient in training,
    and why (the same modules in both classes).

    - the Swin backbone's final ``layernorm``: the encoder reads the stage outputs through their own
      norms, never the last hidden state.
    - with ``proposal_loss="detached"`` (transformers' own loss), also ``model.enc_output``,
      ``model.enc_output_norm``, ``model.encoder_output_bbox_embed`` (two-stage proposal head):
      transformers computes the encoder ("_enc") loss on the detached top-k proposals, so nothing
      downstream of these layers reaches a loss. ``trained_proposals`` (the default of the training
      module) computes that loss on the undetached proposals, as the original Grounding DINO does.
      MM-Grounding-DINO's ``model.encoder_output_class_embed`` has a learned bias, which is trained either
      way: the library's encoder logits are computed from the detached queries but add that bias.
    DDP needs every trainable parameter to get a gradient (else ``find_unused_parameters`` on every step);
    ``freeze_untrained`` freezes these, which changes no weight update (they had no gradient anyway).
    """
    if proposal_loss not in ("trained", "detached"):
        raise ValueError(f"proposal_loss must be 'trained' or 'detached', got {proposal_loss!r}")
    found: dict[str, str] = {}
    if model.config.two_stage and proposal_loss == "detached":
        for name in PROPOSAL_HEAD:
            if getattr(model.model, name, None) is not None:
                found[f"model.{name}"] = "two-stage proposal head: transformers' encoder loss uses detached proposals"
    backbone = model.model.backbone.conv_encoder.model
    for name, module in backbone.named_modules():
        if name.split(".")[-1] == "layernorm" and isinstance(module, nn.LayerNorm):
            found[f"model.backbone.conv_encoder.model.{name}"] = "backbone's final norm: its output feeds no feature level"
    return found


def freeze_untrained(model: GroundingDinoFamily, proposal_loss: str = "trained") -> list[str]:
    """Freeze ``untrained_modules``; returns the names of the parameters frozen."""
    modules = dict(model.named_modules())
    frozen = []
    for name in untrained_modules(model, proposal_loss):
        for parameter_name, parameter in modules[name].named_parameters():
            if parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen.append(f"{name}.{parameter_name}")
    return frozen


def encoder_token_count(config: GroundingDinoFamilyConfig, height: int, width: int) -> int:
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
    model: GroundingDinoFamily, lr: float, lr_backbone: float, lr_text_encoder: float, weight_decay: float
) -> list[dict]:
    """AdamW groups as in Open-GroundingDino (docs/image.md): backbone and text encoder at their own lr.
    MM-Grounding-DINO's class-head biases fall in the rest; a parameter tied across modules counts once."""
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
    model: GroundingDinoFamily, masker: nn.Module, progress: float, pixel_mask: torch.Tensor | None
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


class _UndetachedProposalLoss:
    """transformers' Grounding DINO loss (MM-Grounding-DINO's too), with the encoder ("_enc") terms on the
    undetached proposals.

    transformers selects the top ``num_queries`` encoder tokens and scores the *detached* selection, so the
    proposal head gets no gradient; it also scores their classes against the text *before* the encoder,
    while the selection used the encoder's text output. The original Grounding DINO (and DINO) score the
    selection before detaching, against the encoder's text output (MM-Grounding-DINO: through its own
    scaled, biased class head, as the selection). A forward hook on ``model.model`` keeps
    the per-token class logits and box logits the selection was made from (both undetached); the loss
    gathers the same top-k (``torch.topk`` of the same scores, as the model does) and hands them to the
    library's own loss function in place of transformers' copies.
    """

    def __init__(self, loss_function):
        self.loss_function = loss_function
        self.captured: tuple[torch.Tensor, torch.Tensor] | None = None

    def capture(self, module, inputs, output) -> None:
        if torch.is_grad_enabled() and output.enc_outputs_class is not None:
            self.captured = (output.enc_outputs_class, output.enc_outputs_coord_logits)

    def __call__(self, *args, encoder_logits=None, encoder_pred_boxes=None, **kwargs):
        config = args[4] if len(args) > 4 else kwargs["config"]
        if self.captured is not None:
            scores, coords = self.captured
            self.captured = None
            top = torch.topk(scores.max(-1)[0], config.num_queries, dim=1)[1]
            encoder_logits = torch.gather(scores, 1, top.unsqueeze(-1).expand(-1, -1, scores.shape[-1]))
            encoder_pred_boxes = torch.gather(coords, 1, top.unsqueeze(-1).expand(-1, -1, 4)).sigmoid()
        return self.loss_function(*args, encoder_logits=encoder_logits, encoder_pred_boxes=encoder_pred_boxes, **kwargs)


@contextlib.contextmanager
def trained_proposals(model: GroundingDinoFamily) -> Iterator[None]:
    """Inside the block, the loss trains the two-stage proposal head (see ``_UndetachedProposalLoss``).

    The boxes scored are the same as transformers' (now with their gradient); the class logits are those
    the selection ranked. A model without the two-stage head is left as it is.
    """
    if not model.config.two_stage:
        yield
        return
    had_own = "_loss_function" in vars(model)
    previous = model.loss_function
    loss = _UndetachedProposalLoss(previous)
    handle = model.model.register_forward_hook(loss.capture)
    model.loss_function = loss
    try:
        yield
    finally:
        handle.remove()
        if had_own:
            model.loss_function = previous
        else:
            del model._loss_function


@contextlib.contextmanager
def shared_image_backbone(model: GroundingDinoFamily) -> Iterator[None]:
    """Within the block the image backbone (Swin and its position embeddings) runs once per input: a call with
    the same ``pixel_values`` and ``pixel_mask`` tensors (unchanged since) returns the output of the previous
    call. Several prompts over one batch (a vocabulary split over prompts) then cost one backbone pass, not one
    per prompt; the text encoder and the fusion encoder still run per prompt (they depend on the text)."""
    backbone = model.model.backbone
    original = backbone.forward
    cached: list = []  # [pixel_values, pixel_mask, their versions, the output]: the tensors held, so never reused

    def forward(pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
        # an inference-mode tensor has no version counter, and cannot be changed in place outside that mode
        versions = tuple(None if t.is_inference() else t._version for t in (pixel_values, pixel_mask))
        if not (cached and cached[0] is pixel_values and cached[1] is pixel_mask and cached[2] == versions):
            cached[:] = [pixel_values, pixel_mask, versions, original(pixel_values, pixel_mask)]
        return cached[3]

    backbone.forward = forward
    try:
        yield
    finally:
        del backbone.forward
        cached.clear()


class TextFeatureCache:
    """The text encoder's output for each distinct prompt, reused while the encoder's weights are unchanged.

    Grounding DINO runs its text encoder (BERT) on every image's prompt, although a run over a folder or a
    dataset gives every image the same prompts; on a 256-token prompt that encoder alone costs about 44
    GFLOPs an image, more than the Swin-T backbone at 800 px. Inside ``cached_text_features`` the encoder runs
    once per distinct row of its inputs: once for the rows a batch repeats, and not again for a row an earlier
    call computed. A row is known by its token ids and token types: the detector's forward derives the
    encoder's other inputs (the phrase-wise attention mask, the position ids) from the token ids. The encoder's
    output for a row does not depend on the other rows of the batch, so the cached features are the ones it
    would give, up to the float rounding of a matrix product of another batch size.

    The entries are dropped whenever the encoder's weights may have changed (another parameter tensor, or one
    changed in place since: an optimizer step, ``load_state_dict``, a weight-averaging swap), or the autocast
    or inference mode differs. The cache is used only where nothing needs a gradient (``torch.no_grad`` or
    inference mode, the encoder in eval mode); any other call runs the encoder as usual. Entries beyond
    ``max_bytes`` are dropped, least recently used first. A copy of the cache (``copy.deepcopy`` of a module
    holding it, pickling) starts empty.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.size = 0
        self.state: tuple | None = None
        self.computed = self.reused = 0  # rows run through the encoder / taken from the cache

    def __deepcopy__(self, memo: dict) -> "TextFeatureCache":
        return type(self)(self.max_bytes)

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"])

    def clear(self) -> None:
        self.entries.clear()
        self.size = 0
        self.state = None

    def _check_state(self, encoder: nn.Module, device: torch.device) -> None:
        tensors = [*encoder.parameters(), *encoder.buffers()]
        mode = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type), torch.is_inference_mode_enabled())
        versions = [None if t.is_inference() else t._version for t in tensors]
        if self.state is not None:
            held, held_versions, held_mode = self.state
            if held_mode == mode and held_versions == versions and len(held) == len(tensors) and all(
                    ref() is t for ref, t in zip(held, tensors)):
                return
        self.clear()
        # weak references: a tensor freed since (new weights) no longer matches, and nothing is kept alive
        self.state = ([weakref.ref(t) for t in tensors], versions, mode)

    def _put(self, key: bytes, features: torch.Tensor) -> None:
        self.entries[key] = features
        self.size += features.numel() * features.element_size()
        while self.size > self.max_bytes and self.entries:
            _, dropped = self.entries.popitem(last=False)
            self.size -= dropped.numel() * dropped.element_size()

    @staticmethod
    def keys(token_ids: torch.Tensor, token_type_ids: torch.Tensor) -> list[bytes]:
        """One key per row of (B, L) token ids and token types, both on the CPU."""
        ids, types = (t.to(torch.int64).contiguous().numpy() for t in (token_ids, token_type_ids))
        header = str(ids.shape[1]).encode() + b":"
        return [header + ids[i].tobytes() + types[i].tobytes() for i in range(ids.shape[0])]

    def encode(self, encoder: nn.Module, run, keys: list[bytes], device: torch.device) -> torch.Tensor:
        """The encoder's ``last_hidden_state`` (B, L, D) of the rows ``keys`` name; ``run(rows)`` computes those
        of the batch rows ``rows`` (an index tensor) that are not held."""
        self._check_state(encoder, device)
        found = {key: self.entries[key] for key in dict.fromkeys(keys) if key in self.entries}
        missing = {key: index for index, key in enumerate(keys) if key not in found}  # a row the batch repeats: once
        for key in found:
            self.entries.move_to_end(key)
        if missing:
            computed = run(torch.tensor(list(missing.values()), device=device))
            for key, features in zip(missing, computed):
                found[key] = features.clone()
                self._put(key, found[key])
        self.computed += len(missing)
        self.reused += len(keys) - len(missing)
        return torch.stack([found[key] for key in keys])


@contextlib.contextmanager
def cached_text_features(model: GroundingDinoFamily, cache: TextFeatureCache | None = None,
                         token_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                         ) -> Iterator[TextFeatureCache]:
    """Within the block the text encoder (``model.model.text_backbone``) runs once per distinct prompt row, its
    output kept in ``cache`` (a new ``TextFeatureCache`` if none; keep one to reuse it over calls). Yields the
    cache. Calls that need a gradient, or pass other arguments than the detector's forward does, run the
    encoder as usual.

    token_ids, token_type_ids: the CPU copies of the ``input_ids`` and ``token_type_ids`` (None: zeros) the
    model is called with inside the block (one batch of B rows): the rows are then told apart from the copies,
    without reading the device's tensors back (on an accelerator, that would wait for the device's queued work
    at every forward). Without them (or for a call of another batch size), the token ids are read back.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    cache = cache if cache is not None else TextFeatureCache()
    encoder = model.model.text_backbone
    had_own = "forward" in vars(encoder)
    original = encoder.forward

    def keys_of(input_ids: torch.Tensor, types: torch.Tensor) -> list[bytes]:
        batch, length = input_ids.shape
        if token_ids is not None and token_ids.shape[0] == batch and token_ids.shape[1] >= length:
            hint_types = token_type_ids if token_type_ids is not None else torch.zeros_like(token_ids)
            return TextFeatureCache.keys(token_ids[:, :length], hint_types[:, :length])  # the model truncates alike
        return TextFeatureCache.keys(input_ids.cpu(), types.cpu())

    def forward(input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *args, return_dict=None, **kwargs):
        inputs = (input_ids, attention_mask, token_type_ids, position_ids)
        usable = not (args or kwargs or encoder.training or torch.is_grad_enabled()) and all(
            isinstance(t, torch.Tensor) for t in inputs) and input_ids.dim() == 2
        if not usable:
            return original(*inputs, *args, return_dict=return_dict, **kwargs)

        def run(rows: torch.Tensor) -> torch.Tensor:
            return original(*(t[rows] for t in inputs), return_dict=True).last_hidden_state

        features = cache.encode(encoder, run, keys_of(input_ids, token_type_ids), input_ids.device)
        if return_dict is False or (return_dict is None and not getattr(encoder.config, "return_dict", True)):
            return (features,)
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=features)

    encoder.forward = forward
    try:
        yield cache
    finally:
        if had_own:
            encoder.forward = original
        else:
            del encoder.forward


#: the transformers modules whose detector forward builds the loss's label maps with a module-level
#: ``build_label_maps(logits, input_ids)`` (Grounding DINO, MM-Grounding-DINO)
LABEL_MAP_MODULES = (
    "transformers.models.grounding_dino.modeling_grounding_dino",
    "transformers.models.mm_grounding_dino.modeling_mm_grounding_dino",
)


@contextlib.contextmanager
def batch_label_maps(label_maps: list[torch.Tensor]) -> Iterator[list[int]]:
    """Inside the block, the loss of a forward pass with ``labels`` uses the batch's own label maps instead of
    the ones transformers derives from the prompt (one label per run of tokens between delimiters).

    label_maps: one (R_i, max_text_len) 0/1 tensor per image of the batch; row r marks the tokens of label r
        of image i (a phrase of its caption, a category of its prompt). Yields ``offsets``: the
        ``class_labels`` handed to the model (and to the denoising targets) must be ``r + offsets[i]``
        (``offset_class_labels``).

    transformers' loss reads the label maps twice: the matcher takes ``label_maps[i][class_labels]`` per
    image, while the focal loss concatenates all images' maps and moves image i's labels by
    ``len(label_maps[i])`` (releases up to 5.x), which points at the right rows only when every image has
    the same map. So every image is handed the same stacked tensor S = [M_0; M_1; ...] (sum of R_i rows) and
    image i's labels point at its own block of S: the matcher reads S[offsets[i] + r]; the concatenation of
    B copies of S read at ``len(S) + offsets[i] + r`` (or at ``i·len(S) + offsets[i] + r``, had the library
    moved them by the rows before image i) is the same row. Both classes' module-level ``build_label_maps``
    are replaced for the duration of the block and put back after it, however it ends.
    """
    import importlib

    maps = [torch.as_tensor(m) for m in label_maps]
    if not maps:
        raise ValueError("batch_label_maps needs one label map per image; got none")
    width = maps[0].shape[-1]
    for index, label_map in enumerate(maps):
        if label_map.dim() != 2 or label_map.shape[-1] != width:
            raise ValueError(f"label map {index} has shape {tuple(label_map.shape)}; expected (rows, {width}) like the first one")
    offsets, total = [], 0
    for label_map in maps:
        offsets.append(total)
        total += label_map.shape[0]
    stacked = torch.cat([m.to(maps[0].device) for m in maps]).to(torch.long)

    def build(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if logits.shape[0] != len(maps):
            raise ValueError(f"batch_label_maps holds {len(maps)} label maps but the forward pass has {logits.shape[0]} images")
        if logits.shape[-1] != width:
            raise ValueError(f"label maps of {width} token columns for logits of {logits.shape[-1]} (the model's max_text_len)")
        on_device = stacked.to(logits.device)
        return tuple(on_device for _ in maps)

    modules = [importlib.import_module(name) for name in LABEL_MAP_MODULES]
    originals = [module.build_label_maps for module in modules]
    for module in modules:
        module.build_label_maps = build
    try:
        yield offsets
    finally:
        for module, original in zip(modules, originals):
            module.build_label_maps = original


def offset_class_labels(labels: list[dict], offsets: list[int]) -> list[dict]:
    """``labels`` (one dict per image with ``class_labels``) with image i's labels moved by ``offsets[i]``
    (``batch_label_maps``); the other keys are kept as they are."""
    if len(labels) != len(offsets):
        raise ValueError(f"{len(labels)} label dicts for {len(offsets)} label maps")
    return [dict(label, class_labels=label["class_labels"] + offset) for label, offset in zip(labels, offsets)]
