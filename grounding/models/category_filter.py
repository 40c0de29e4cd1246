"""Which of a dataset's categories are in an image: a captioner + CLIP filter (docs/invseg.md, "Categories").

Open-vocabulary segmentation with a diffusion model prompts only the categories an image shows. Without
the ground truth, DiffSegmenter's recipe guesses them: caption the image with BLIP, then keep a category
when CLIP finds its name close to a word of the caption, or finds the image close to the category.

    keep_categories      the rule, on embeddings (a pure function)
    caption_phrases      the words and two-word phrases of a caption that can name a category
    CaptionClipFilter    BLIP (transformers) + the project's CLIP backbone; ``filter(image, names)``

The thresholds are DiffSegmenter's (text 0.8, image 0.97); how the image one is read is this project's
**choice**: a category's image–text cosine divided by the best category's (so 0.97 keeps the categories
within 3 % of the best match; raw CLIP image–text cosines are about 0.2–0.35, never near 0.97).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: words of a caption that never name a category
STOPWORDS = frozenset(
    "a an the of on in at to and or with without its it is are was were be been this that there these those "
    "some two three four many several his her their our your my by for from into onto over under near next "
    "while as up down out off very small large big little front back top side other another each one".split()
)


def caption_phrases(caption: str) -> list[str]:
    """The words of ``caption`` that are not stop words, and each pair of adjacent such words ("dining
    table") [choice], lower case, in order of appearance, without repeats."""
    words = re.findall(r"[a-z]+", caption.lower())
    phrases: list[str] = []
    for index, word in enumerate(words):
        if word in STOPWORDS:
            continue
        phrases.append(word)
        if index + 1 < len(words) and words[index + 1] not in STOPWORDS:
            phrases.append(f"{word} {words[index + 1]}")
    return list(dict.fromkeys(phrases))


def keep_categories(
    category_text: torch.Tensor, phrase_text: torch.Tensor, image: torch.Tensor,
    text_threshold: float = 0.8, image_threshold: float = 0.97,
) -> list[int]:
    """Indices of the categories to keep.

    category_text: (C, P) CLIP text embeddings of the category names; phrase_text: (W, P) of the caption's
    phrases (W may be 0); image: (P,) CLIP image embedding (none need be normalized). Category c is kept
    when max_w cos(category_c, phrase_w) >= text_threshold, or when cos(image, category_c) divided by the
    largest cos(image, category_c') is >= image_threshold (the best category is always kept when its
    cosine is positive).
    """
    if category_text.dim() != 2 or image.dim() != 1 or category_text.shape[1] != image.shape[0]:
        raise ValueError(
            f"keep_categories needs category_text (C, P) and image (P,), got {tuple(category_text.shape)} and {tuple(image.shape)}"
        )
    categories = F.normalize(category_text.float(), dim=-1)
    keep = torch.zeros(categories.shape[0], dtype=torch.bool, device=categories.device)
    if phrase_text.numel():
        phrases = F.normalize(phrase_text.float(), dim=-1)
        keep |= (categories @ phrases.T).amax(dim=1) >= text_threshold
    similarity = categories @ F.normalize(image.float(), dim=0)
    best = similarity.max()
    if best > 0:
        keep |= similarity / best >= image_threshold
    return keep.nonzero().flatten().tolist()


class CaptionClipFilter(nn.Module):
    """BLIP captions the image; the project's CLIP backbone embeds the caption's phrases, the category names
    (with ``template``) and the image; ``keep_categories`` decides.

    Args:
        captioner: a BLIP captioning checkpoint (hub id or folder), e.g.
            ``Salesforce/blip-image-captioning-large``, or ``"tiny"`` (random, offline: tests).
        clip: a CLIP checkpoint for ``grounding.models.clip.build_clip`` (``openai/clip-vit-large-patch14``),
            or ``"tiny"``.
        text_threshold, image_threshold: see ``keep_categories``.
        template: the sentence a category name is put in for the image–text similarity.
        max_caption_tokens: the caption's length limit.
    """

    def __init__(
        self,
        captioner: str = "Salesforce/blip-image-captioning-large",
        clip: str = "openai/clip-vit-large-patch14",
        text_threshold: float = 0.8,
        image_threshold: float = 0.97,
        template: str = "a photo of a {}.",
        max_caption_tokens: int = 30,
        clip_image_size: int = 224,
    ) -> None:
        super().__init__()
        from grounding.models.clip import build_clip

        if not 0 < image_threshold <= 1:
            raise ValueError(f"image_threshold must be in (0, 1], got {image_threshold!r}")
        if not -1 <= text_threshold <= 1:
            raise ValueError(f"text_threshold must be a cosine in [-1, 1], got {text_threshold!r}")
        if "{}" not in template:
            raise ValueError(f"template must hold '{{}}' where the category name goes, got {template!r}")
        self.captioner, self.processor = build_captioner(captioner)
        self.clip = build_clip(clip, image_size=clip_image_size)
        self.clip.requires_grad_(False).eval()
        self.text_threshold, self.image_threshold = text_threshold, image_threshold
        self.template, self.max_caption_tokens = template, max_caption_tokens

    @torch.no_grad()
    def caption(self, image: torch.Tensor) -> str:
        """The BLIP caption of ``image`` (3, H, W) uint8."""
        inputs = self.processor(images=image.cpu(), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.captioner.device, self.captioner.dtype)
        tokens = self.captioner.generate(pixel_values=pixels, max_new_tokens=self.max_caption_tokens)
        return self.processor.decode(tokens[0], skip_special_tokens=True)

    @torch.no_grad()
    def forward(self, image: torch.Tensor, names: Sequence[str]) -> list[int]:
        """Indices into ``names`` of the categories judged present in ``image`` (3, H, W) uint8."""
        if not names:
            return []
        phrases = caption_phrases(self.caption(image))
        category_text = self.clip.encode_text([self.template.format(name) for name in names])
        phrase_text = self.clip.encode_text(phrases) if phrases else category_text.new_zeros(0, category_text.shape[1])
        image_embedding = self.clip.encode_image(self.clip.preprocess(image))[0]
        return keep_categories(category_text, phrase_text, image_embedding, self.text_threshold, self.image_threshold)


def build_captioner(name_or_path: str) -> tuple[nn.Module, object]:
    """(BlipForConditionalGeneration, BlipProcessor), frozen: a checkpoint, or ``"tiny"`` (random, built offline
    with the project's WordPiece tokenizer)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    if name_or_path == "tiny":
        from grounding.models.tokenizer import build_wordpiece_tokenizer

        tokenizer = build_wordpiece_tokenizer()
        ids = {"bos_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id,
               "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}
        config = BlipConfig(
            text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "encoder_hidden_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64, **ids},
            vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                           "image_size": 64, "patch_size": 16},
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = BlipForConditionalGeneration(config)
        processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer)
    else:
        model = BlipForConditionalGeneration.from_pretrained(name_or_path)
        processor = BlipProcessor.from_pretrained(name_or_path)
    return model.requires_grad_(False).eval(), processor
