"""open_clip ViT-CLIP models as transformers ``CLIPModel``s, for every CLIP method of the project.

``build_clip("open_clip:ViT-B-16/laion2b_s34b_b88k")`` goes through ``build_open_clip``: open_clip builds the
model and loads the pretrained tag (or a local checkpoint file: ``open_clip:ViT-B-16//path/to/model.pt``,
or a whole open_clip folder / hub repository: ``open_clip:local-dir:/path``, ``open_clip:hf-hub:org/repo``),
its weights are copied into an equal ``CLIPModel`` (``convert_open_clip``) and the result is wrapped in a
``ClipBackbone`` with the tag's image mean / std and open_clip's own tokenizer (``OpenClipTokenizer``). GEM,
LeGrad, MaskInversion and the category filter then run on it unchanged (docs/gem.md, "open_clip backbones").

The weights map one to one: open_clip's ``nn.MultiheadAttention`` in-projection is split into q, k, v;
``proj`` / ``text_projection`` (applied as ``x @ proj``) become the projections' weights transposed;
``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``ln_post``, ``token_embedding``,
``ln_final`` and ``logit_scale`` are copied; each tower's activation (QuickGELU, GELU, tanh GELU) and
LayerNorm eps are read off its modules.

Supported: ``open_clip.CLIP`` with a ViT image tower that has a class token, one square position grid,
pre-LayerNorm, plain pre-norm blocks (no layer scale, no q/k norm or other custom attention), class-token
pooling and no attentional pooler, and open_clip's own causal text transformer (BPE tokenizer, pooled at the
end-of-text token, projection without bias): OpenAI CLIP, LAION / DataComp OpenCLIP, MetaCLIP, DFN. Any
other model (ResNet or timm towers, ConvNeXt, SigLIP, CoCa, EVA, Hugging Face text towers, layer scale)
fails with an error that names it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Sequence

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel

from grounding.constants import CLIP_MEAN, CLIP_STD
from grounding.models.clip import ClipBackbone

#: ``build_clip`` settings that start with it name an open_clip model
OPEN_CLIP_PREFIX = "open_clip:"

#: open_clip's own text pad id: its BPE tokenizer fills the context after the end-of-text token with zeros
PAD_TOKEN_ID = 0

#: transformers' CLIP text model pools at ``argmax(input_ids)`` when ``eos_token_id == 2`` (the rule of the HF
#: copies of OpenAI CLIP), the very rule of open_clip's ``argmax`` text pooling
ARGMAX_POOLING_EOS_ID = 2


def parse_open_clip_setting(setting: str) -> tuple[str, str | None]:
    """``"open_clip:<model>/<pretrained>"`` -> (model, pretrained); a ``hf-hub:`` / ``local-dir:`` model
    carries its weights and gets None. pretrained: an open_clip tag or a checkpoint file."""
    if not setting.startswith(OPEN_CLIP_PREFIX):
        raise ValueError(f"backbone {setting!r} does not start with {OPEN_CLIP_PREFIX!r}")
    rest = setting[len(OPEN_CLIP_PREFIX):]
    if rest.startswith(("hf-hub:", "local-dir:")):
        return rest, None
    name, _, pretrained = rest.partition("/")
    if not name or not pretrained:
        raise ValueError(
            f"backbone {setting!r} names no pretrained weights: use {OPEN_CLIP_PREFIX}<model>/<tag or checkpoint file> "
            f"(open_clip.list_pretrained() lists the tags), e.g. open_clip:ViT-B-16/laion2b_s34b_b88k"
        )
    return name, pretrained


# -- what fits ---------------------------------------------------------------------------------------
def _activation_name(module: nn.Module) -> str | None:
    """transformers' ``hidden_act`` of an open_clip MLP activation (None: no equivalent)."""
    if type(module).__name__ == "QuickGELU":
        return "quick_gelu"
    if type(module) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(module.approximate)
    return None


def _side(size: int | Sequence[int]) -> int | None:
    """The side of a square size (an int or an (h, w) pair); None when it is not square."""
    sides = set(size) if isinstance(size, (tuple, list)) else {size}
    return int(sides.pop()) if len(sides) == 1 else None


def _block_problems(block: nn.Module, tower: str) -> list[str]:
    """Why one residual block of a tower does not map onto a ``CLIPEncoderLayer`` (empty: it does)."""
    if type(block).__name__ != "ResidualAttentionBlock":
        return [f"its {tower} blocks are {type(block).__name__} (custom attention: q/k norm, scaled cosine, ...)"]
    problems = []
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or attn.in_proj_bias is None \
            or attn.bias_k is not None or attn.out_proj.bias is None:
        problems.append(f"its {tower} attention is not a biased self-attention with one in-projection")
    if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
        problems.append(f"its {tower} blocks have layer scale")
    if hasattr(block, "ln_1_kv"):
        problems.append(f"its {tower} blocks are cross-attention blocks")
    if _activation_name(block.mlp.gelu) is None:
        problems.append(f"its {tower} MLP activation {block.mlp.gelu!r} has no transformers equivalent")
    return problems


def _norm_problems(norms: Sequence[nn.Module], tower: str) -> list[str]:
    if not all(isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None for norm in norms):
        return [f"its {tower} has a normalization that is not a LayerNorm with weight and bias"]
    if len({norm.eps for norm in norms}) > 1:
        return [f"its {tower} LayerNorms have different eps"]
    return []


def convertibility_problems(model: nn.Module) -> list[str]:
    """Why ``model`` has no equal transformers ``CLIPModel`` (empty: ``convert_open_clip`` can convert it).

    Reads module types and shapes only, so it works on a model built on the meta device."""
    if type(model).__name__ != "CLIP":
        return [f"it is an open_clip {type(model).__name__}, not a CLIP with open_clip's own text transformer"]
    visual = model.visual
    if type(visual).__name__ != "VisionTransformer":
        return [f"its image tower is a {type(visual).__name__}, not a ViT"]
    problems = []
    if getattr(visual, "attn_pool", None) is not None:
        problems.append("its image tower pools with an attentional pooler")
    if getattr(visual, "pool_type", "tok") != "tok":
        problems.append(f"its image tower pools by {visual.pool_type!r}, not by the class token")
    if isinstance(visual.ln_pre, nn.Identity):
        problems.append("its image tower has no pre-LayerNorm")
    if _side(visual.image_size) is None or _side(visual.conv1.kernel_size) is None or visual.conv1.bias is not None:
        problems.append("its image tower is not square (image size, patch size) or its patch embedding has a bias")
    if visual.proj is None:
        problems.append("its image tower has no projection")
    if model.attn_mask is None:
        problems.append("its text transformer is not causal")
    pooling = getattr(model, "text_pool_type", "argmax")
    if pooling not in ("argmax", "eos"):
        problems.append(f"its text tower pools by {pooling!r}, not at the end-of-text token")
    elif pooling == "eos" and model.text_eos_id == ARGMAX_POOLING_EOS_ID:
        problems.append(f"its text tower pools at token id {ARGMAX_POOLING_EOS_ID}, which transformers reads as argmax")
    if not isinstance(model.text_projection, nn.Parameter):
        problems.append("its text projection is not a bias-free matrix")
    if model.positional_embedding.shape[0] != model.context_length:
        problems.append("its text tower has extra (class) positions")
    if getattr(model, "logit_bias", None) is not None:
        problems.append("it has a logit bias (sigmoid loss, SigLIP-style)")
    for tower, transformer, norms in (
        ("image tower", visual.transformer, [visual.ln_pre, visual.ln_post]),
        ("text tower", model.transformer, [model.ln_final]),
    ):
        blocks = list(transformer.resblocks)
        block_problems = _block_problems(blocks[0], tower)  # every block of a tower is built alike
        problems += block_problems or _norm_problems(norms + [n for b in blocks for n in (b.ln_1, b.ln_2)], tower)
    return problems


def check_convertible(model: nn.Module, name: str) -> None:
    """Raise a ValueError naming ``name`` and every reason when ``model`` cannot be converted."""
    problems = convertibility_problems(model)
    if problems:
        raise ValueError(
            f"open_clip model {name!r} cannot run as a CLIP backbone here: {'; '.join(problems)}. Supported: ViT CLIP "
            f"models with a class token, pre-LayerNorm, plain pre-norm blocks and open_clip's causal text transformer "
            f"(OpenAI CLIP, LAION / DataComp OpenCLIP, MetaCLIP, DFN)"
        )


# -- the conversion ----------------------------------------------------------------------------------
def _tower_settings(transformer: nn.Module, final_norm: nn.Module) -> dict[str, Any]:
    """The size fields of a transformers tower config read off an open_clip ``Transformer``."""
    block = transformer.resblocks[0]
    return {
        "hidden_size": block.attn.embed_dim,
        "intermediate_size": block.mlp.c_fc.out_features,
        "num_hidden_layers": len(transformer.resblocks),
        "num_attention_heads": block.attn.num_heads,
        "hidden_act": _activation_name(block.mlp.gelu),
        "layer_norm_eps": final_norm.eps,
    }


def clip_config(model: nn.Module) -> CLIPConfig:
    """The ``CLIPConfig`` of an open_clip ``CLIP`` (checked with ``check_convertible`` first; shapes only, so a
    model on the meta device works; the logit scale comes with the weights)."""
    visual = model.visual
    pooled_eos = ARGMAX_POOLING_EOS_ID if getattr(model, "text_pool_type", "argmax") == "argmax" else model.text_eos_id
    vision = {**_tower_settings(visual.transformer, visual.ln_post), "image_size": _side(visual.image_size),
              "patch_size": _side(visual.conv1.kernel_size), "num_channels": visual.conv1.in_channels}
    text = {**_tower_settings(model.transformer, model.ln_final), "vocab_size": model.token_embedding.num_embeddings,
            "max_position_embeddings": model.context_length, "eos_token_id": pooled_eos, "pad_token_id": PAD_TOKEN_ID}
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=visual.proj.shape[1])


def _linear(prefix: str, linear: nn.Linear) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": linear.weight, f"{prefix}.bias": linear.bias}


def _block_state(prefix: str, block: nn.Module) -> dict[str, torch.Tensor]:
    """One open_clip ``ResidualAttentionBlock`` as a ``CLIPEncoderLayer``'s weights (in_proj split into q, k, v)."""
    attn = block.attn
    q_weight, k_weight, v_weight = attn.in_proj_weight.chunk(3)
    q_bias, k_bias, v_bias = attn.in_proj_bias.chunk(3)
    return {
        f"{prefix}.self_attn.q_proj.weight": q_weight, f"{prefix}.self_attn.q_proj.bias": q_bias,
        f"{prefix}.self_attn.k_proj.weight": k_weight, f"{prefix}.self_attn.k_proj.bias": k_bias,
        f"{prefix}.self_attn.v_proj.weight": v_weight, f"{prefix}.self_attn.v_proj.bias": v_bias,
        **_linear(f"{prefix}.self_attn.out_proj", attn.out_proj),
        **_linear(f"{prefix}.layer_norm1", block.ln_1), **_linear(f"{prefix}.layer_norm2", block.ln_2),
        **_linear(f"{prefix}.mlp.fc1", block.mlp.c_fc), **_linear(f"{prefix}.mlp.fc2", block.mlp.c_proj),
    }


def clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """An open_clip ``CLIP``'s weights under a transformers ``CLIPModel``'s names (views, nothing copied)."""
    visual = model.visual
    state = {
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        **_linear("vision_model.pre_layrnorm", visual.ln_pre),
        **_linear("vision_model.post_layernorm", visual.ln_post),
        "visual_projection.weight": visual.proj.t(),  # open_clip applies x @ proj, nn.Linear x @ weight.T
        "text_model.embeddings.token_embedding.weight": model.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": model.positional_embedding,
        **_linear("text_model.final_layer_norm", model.ln_final),
        "text_projection.weight": model.text_projection.t(),
        "logit_scale": model.logit_scale.reshape(()),
    }
    for index, block in enumerate(visual.transformer.resblocks):
        state.update(_block_state(f"vision_model.encoder.layers.{index}", block))
    for index, block in enumerate(model.transformer.resblocks):
        state.update(_block_state(f"text_model.encoder.layers.{index}", block))
    return state


@torch.no_grad()
def convert_open_clip(model: nn.Module, name: str = "open_clip model") -> CLIPModel:
    """An open_clip ``CLIP`` -> a float32 transformers ``CLIPModel`` computing the same (tested to 1e-5).

    name: what errors call the model. Raises ValueError when it does not fit (``check_convertible``)."""
    check_convertible(model, name)
    with _uninitialized():  # every weight is loaded below: no random initialization (1.6 s of ViT-B/16's 1.8 s)
        clip = CLIPModel(clip_config(model))
    state = {key: value.detach().float() for key, value in clip_state_dict(model).items()}
    clip.load_state_dict(state, strict=True)
    return clip.eval()


def _uninitialized():
    """transformers' context in which a new model's weights are left uninitialized (its buffers are made)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # where transformers keeps it in modeling_utils
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


# -- the tokenizer -----------------------------------------------------------------------------------
class OpenClipTokenizer:
    """open_clip's BPE tokenizer behind the call ``ClipBackbone.encode_text`` makes of a transformers one.

    Returns ``input_ids`` exactly as open_clip makes them (start, BPE tokens, end-of-text, truncated to the
    context with the end-of-text token kept last) and ``attention_mask`` (1 up to each text's end-of-text
    token). ``padding=True`` drops the trailing columns that are padding in every row: under the causal mask
    nothing at or before the end-of-text token depends on them.
    """

    def __init__(self, tokenizer: Any, context_length: int = 77) -> None:
        if not hasattr(tokenizer, "eot_token_id"):
            raise ValueError(
                f"open_clip tokenizer {type(tokenizer).__name__} is not open_clip's CLIP BPE one (SimpleTokenizer)"
            )
        self.tokenizer = tokenizer
        self.context_length = int(context_length)

    def __call__(self, texts: Sequence[str], padding: bool | str = True, truncation: bool = True,
                 max_length: int | None = None, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if return_tensors != "pt" or not truncation:
            raise ValueError("open_clip's tokenizer gives torch tensors (return_tensors='pt') and always truncates")
        ids = self.tokenizer(list(texts), context_length=max_length or self.context_length)  # (N, L)
        filled = ids != PAD_TOKEN_ID
        positions = torch.arange(ids.shape[1])
        last = torch.where(filled, positions, -1).amax(dim=1)                        # (N,) last non-pad token
        mask = (positions[None] <= last[:, None]).long()
        if padding in (True, "longest") and len(texts):
            keep = int(last.max()) + 1
            ids, mask = ids[:, :keep], mask[:, :keep]
        return {"input_ids": ids, "attention_mask": mask}


# -- from a setting ----------------------------------------------------------------------------------
def open_clip_backbone(model: nn.Module, tokenizer: Any, image_size: int = 448, antialias: bool = True,
                       name: str = "open_clip model") -> ClipBackbone:
    """A ``ClipBackbone`` of an open_clip ``CLIP`` already built, with the image mean / std of its
    preprocessing config (OpenAI CLIP's when it has none) and ``tokenizer`` wrapped by ``OpenClipTokenizer``."""
    import open_clip

    clip = convert_open_clip(model, name)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    mean, std = tuple(preprocess.get("mean") or CLIP_MEAN), tuple(preprocess.get("std") or CLIP_STD)
    wrapped = OpenClipTokenizer(tokenizer, clip.config.text_config.max_position_embeddings)
    return ClipBackbone(clip, wrapped, image_size, antialias, mean, std)


@contextlib.contextmanager
def _quiet_open_clip():
    """Hide open_clip's 'initialized randomly' warning while it builds an architecture on the meta device."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _check_named_model(setting: str, name: str, pretrained: str, quick_gelu: bool) -> None:
    """Before any download: the model and tag exist, and the architecture converts (built on the meta device)."""
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"backbone {setting!r}: open_clip has no model {name!r} (open_clip.list_models() lists them)")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags and not os.path.isfile(pretrained):
        raise ValueError(
            f"backbone {setting!r}: {pretrained!r} is neither a pretrained tag of open_clip's {name} {tags} nor a file"
        )
    with _quiet_open_clip(), torch.device("meta"):
        skeleton = open_clip.create_model(name, pretrained=None, device="meta", force_quick_gelu=quick_gelu)
    check_convertible(skeleton, setting)


def build_open_clip(setting: str, image_size: int = 448, antialias: bool = True) -> ClipBackbone:
    """``build_clip``'s ``open_clip:`` settings: open_clip loads the model and its weights, which are converted.

    A pretrained tag trained with QuickGELU (open_clip's tag config) runs with QuickGELU even under a model name
    without ``-quickgelu`` (``open_clip:ViT-B-16/openai`` equals ``open_clip:ViT-B-16-quickgelu/openai``)."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(f"backbone {setting!r} needs open_clip: pip install 'grounding[openclip]'") from error
    from open_clip.pretrained import get_pretrained_cfg

    name, pretrained = parse_open_clip_setting(setting)
    quick_gelu = False
    if pretrained is not None:
        quick_gelu = bool((get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu", False))
        _check_named_model(setting, name, pretrained, quick_gelu)
    model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu, require_pretrained=True)
    return open_clip_backbone(model, open_clip.get_tokenizer(name), image_size, antialias, setting)
