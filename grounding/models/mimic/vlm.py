"""The vision-language model MIMIC inverts (docs/mimic.md): the ``VLM`` wrapper (tokens, prompt, normalization),
``build_vlm`` (a hub id, a local folder, or ``"tiny"``: a random LLaVA with an offline tokenizer), its logits and
greedy answers, and transformers' gradient checkpointing of its blocks. ``VLMSettings`` is the setting group."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from grounding.constants import CLIP_MEAN, CLIP_STD
from grounding.models.dtypes import DtypeName, torch_dtype

from .sequence import LLAVA_PROMPT_TEMPLATE, build_sequence, check_prompt_template, expand_image_tokens


@dataclass
class VLM:
    """An image-text-to-text model with what MIMIC needs around it.

    image_token_id: the placeholder the prompt holds once; num_image_tokens: how many tokens it expands into
    (patches, plus the CLS token when the model keeps it); mean / std: the model's pixel normalization.
    """

    model: nn.Module
    tokenizer: Any
    name: str
    image_token: str
    image_token_id: int
    image_size: int
    patch_size: int
    num_image_tokens: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    prompt_template: str = LLAVA_PROMPT_TEMPLATE
    extra: dict = field(default_factory=dict)

    def prompt_text(self, prompt: str) -> str:
        return self.prompt_template.replace("<image>", self.image_token).format(prompt=prompt)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the formatted prompt, with the tokenizer's begin-of-sequence token, unexpanded."""
        return list(self.tokenizer(self.prompt_text(prompt), add_special_tokens=True)["input_ids"])

    def answer_ids(self, target: str, prompt: str | None = None) -> list[int]:
        """Token ids of the answer " " + target followed by end-of-sequence.

        With ``prompt``: the ids that tokenizing prompt and answer together adds after the prompt's own ids, so
        that a SentencePiece tokenizer splits the answer as it would in the whole conversation; the answer
        tokenized alone (no special tokens) when the prompt's ids are not a prefix of the whole.
        """
        ids = None
        if prompt is not None:
            prompt_ids = self.prompt_ids(prompt)
            whole = list(self.tokenizer(self.prompt_text(prompt) + " " + target.strip(), add_special_tokens=True)["input_ids"])
            if whole[:len(prompt_ids)] == prompt_ids and len(whole) > len(prompt_ids):
                ids = whole[len(prompt_ids):]
        if ids is None:
            ids = list(self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and ids and ids[-1] == eos:  # a tokenizer that appends it itself
            ids = ids[:-1]
        return ids + ([eos] if eos is not None else [])

    def sequence(self, prompt: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of (prompt, target), the image expanded (``build_sequence``)."""
        return build_sequence(self.prompt_ids(prompt), self.answer_ids(target, prompt), self.image_token_id,
                              self.num_image_tokens)


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision encoder of an image-text-to-text model (``model.model.vision_tower`` in transformers' LLaVA)."""
    for owner in (model, getattr(model, "model", None)):
        for name in ("vision_tower", "vision_model", "visual"):
            tower = getattr(owner, name, None) if owner is not None else None
            if isinstance(tower, nn.Module):
                return tower
    raise ValueError(f"{type(model).__name__} has no vision tower attribute (vision_tower / vision_model / visual)")


# ============================================================================ building the model
TINY_WORDS = (
    "what", "is", "in", "the", "image", "a", "an", "this", "describe", "user", "assistant", "goldfish", "photo",
    "of", "shape", "colour", "color", "which", "there", "red", "blue", "green", "yellow", "purple", "orange",
    "circle", "square", "triangle", "star", "diamond", "?", ":", ".",
)


def build_tiny_tokenizer(words: Sequence[str] = TINY_WORDS):
    """An offline lower-casing WordPiece tokenizer for the tiny VLM, built in memory.

    The vocabulary is ``grounding.models.tokenizer.wordpiece_vocabulary`` (any lower-case word falls back to
    single-character pieces) plus ``<pad>``, ``<s>`` (added in front of every sequence), ``</s>`` and the
    image placeholder ``<image>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from grounding.models.tokenizer import DEFAULT_WORDS, wordpiece_vocabulary

    vocabulary = wordpiece_vocabulary(tuple(dict.fromkeys(tuple(DEFAULT_WORDS) + tuple(words))))
    specials = ["<pad>", "<s>", "</s>", "<image>"]
    vocab = {token: index for index, token in enumerate(vocabulary + specials)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="[UNK]")


#: the tiny random LLaVA: a 64-px CLIP vision tower with 8-px patches (64 image tokens) and a 2-block Llama
TINY_VLM = {
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 64, "patch_size": 8},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2, "max_position_embeddings": 512},
}

#: LLaVA-1.5-7B sizes (CLIP ViT-L/14 at 336 px, Llama-2-7B / Vicuna), random weights, for the GPU benchmark
LLAVA_7B_VLM = {
    "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "image_size": 336, "patch_size": 14, "projection_dim": 768},
    "text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "vocab_size": 32064},
}


def build_random_llava(sizes: dict = TINY_VLM, seed: int | None = 0, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", name: str = "tiny") -> VLM:
    """A random ``LlavaForConditionalGeneration`` of ``sizes`` with the offline tiny tokenizer (a text vocabulary
    larger than the tokenizer's, as in ``LLAVA_7B_VLM``, just leaves ids unused)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = dict(sizes["text"])
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    text_config = LlamaConfig(**text, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    vision_config = CLIPVisionConfig(**sizes["vision"])
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2)
    context = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with context:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                model = LlavaForConditionalGeneration(config)
            finally:
                torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval().requires_grad_(False)
    side = vision_config.image_size // vision_config.patch_size
    return VLM(model, tokenizer, name, "<image>", image_token_id, vision_config.image_size, vision_config.patch_size,
               side * side, CLIP_MEAN, CLIP_STD)


def build_vlm(name_or_path: str = "tiny", dtype: torch.dtype | None = None, prompt_template: str | None = None) -> VLM:
    """The VLM to invert: ``"tiny"`` (``build_random_llava``), else a hub id or local folder of a transformers
    image-text-to-text model with its processor (``llava-hf/llava-1.5-7b-hf``: ``LlavaForConditionalGeneration``;
    other architectures through ``AutoModelForImageTextToText``). prompt_template: the conversation format with
    ``<image>`` and ``{prompt}`` (default LLaVA-1.5's)."""
    if name_or_path == "tiny":
        vlm = build_random_llava(dtype=dtype or torch.float32)
    else:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

        config = AutoConfig.from_pretrained(name_or_path)
        loader = LlavaForConditionalGeneration if config.model_type == "llava" else AutoModelForImageTextToText
        model = loader.from_pretrained(name_or_path, dtype=dtype or torch.float32).eval().requires_grad_(False)
        processor = AutoProcessor.from_pretrained(name_or_path)
        tokenizer = processor.tokenizer
        image_token = getattr(processor, "image_token", None) or "<image>"
        image_token_id = getattr(config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_index", None)
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        count = side * side + (0 if strategy == "default" else 1)
        image_processor = processor.image_processor
        mean = tuple(getattr(image_processor, "image_mean", None) or CLIP_MEAN)
        std = tuple(getattr(image_processor, "image_std", None) or CLIP_STD)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        vlm = VLM(model, tokenizer, str(name_or_path), image_token, int(image_token_id), vision.image_size,
                  vision.patch_size, count, mean, std)
    if prompt_template is not None:
        vlm.prompt_template = check_prompt_template(prompt_template)
    return vlm


# ============================================================================ running the model
def vlm_logits(vlm: VLM, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, L, V) of the VLM on normalized ``pixel_values`` (B, 3, S, S) and expanded ``input_ids`` (B, L)."""
    dtype = next(vision_tower(vlm.model).parameters()).dtype
    out = vlm.model(input_ids=input_ids, pixel_values=pixel_values.to(dtype), attention_mask=torch.ones_like(input_ids),
                    use_cache=False)
    return out.logits


def generate_answers(vlm: VLM, pixel_values: torch.Tensor, prompt: str, max_new_tokens: int = 16) -> list[str]:
    """The VLM's greedy answers to ``prompt`` on each normalized image of ``pixel_values`` (B, 3, S, S)."""
    ids, _ = expand_image_tokens(torch.tensor(vlm.prompt_ids(prompt)), vlm.image_token_id, vlm.num_image_tokens)
    ids = ids[None].expand(pixel_values.shape[0], -1).to(pixel_values.device)
    dtype = next(vision_tower(vlm.model).parameters()).dtype
    with torch.no_grad():
        out = vlm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values.to(dtype),
                                 max_new_tokens=max_new_tokens, do_sample=False)
    return [vlm.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' (non-reentrant) activation checkpointing of the model's blocks (``gradient_checkpointing_enable``
    before transformers 5.x renamed it). It runs in training mode only: see ``train_mode``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def train_mode(module: nn.Module, enabled: bool) -> Iterator[None]:
    """``module.train()`` inside the block when ``enabled`` (transformers' gradient checkpointing runs only in
    training mode; the VLMs have no dropout at inference settings), restored after."""
    if not enabled:
        yield
        return
    was = module.training
    module.train()
    try:
        yield
    finally:
        module.train(was)


# ============================================================================ the setting group
@dataclass(frozen=True)
class VLMSettings:
    """The VLM to invert (docs/mimic.md "Reference settings").

    Attributes:
        name: "tiny" (a random LLaVA: 64-px CLIP tower with 8-px patches, 2-block Llama, offline tokenizer) or a
            hub id / local folder of a transformers image-text-to-text model ("llava-hf/llava-1.5-7b-hf").
        dtype: the dtype of the weights (the losses are computed in float32 either way).
        prompt_template: the conversation format, holding "<image>" and "{prompt}"; null: LLaVA-1.5's
            "USER: <image>\\n{prompt} ASSISTANT:".
        gradient_checkpointing: transformers' gradient checkpointing of the VLM's blocks (large models on one GPU).
    """

    name: str = "tiny"
    dtype: DtypeName = "float32"
    prompt_template: str | None = None
    gradient_checkpointing: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def build(self) -> VLM:
        """The VLM (``build_vlm``), its blocks checkpointed when ``gradient_checkpointing`` (run the synthesis
        inside ``train_mode(vlm.model, True)`` then)."""
        vlm = build_vlm(self.name, dtype=self.torch_dtype, prompt_template=self.prompt_template)
        if self.gradient_checkpointing:
            enable_checkpointing(vlm.model)
        return vlm
