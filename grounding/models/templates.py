"""Prompt templates: the sentences a class name is put in before CLIP's text encoder embeds it (docs/gem.md).

``IMAGENET_TEMPLATES`` are the 80 sentences of CLIP's ImageNet zero-shot classifier (Radford et al. 2021), which
the training-free segmentation protocol of SCLIP (Wang et al. 2024) and its successors average per class;
``GEM_TEMPLATE`` is the single sentence of GEM's own protocol. ``checked_templates`` is the one place a template
setting is validated.
"""

from __future__ import annotations

from typing import Sequence

GEM_TEMPLATE = "a photo of a {}."

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
"""CLIP's 80 ImageNet prompt templates, in CLIP's order ("itap": "I took a picture")."""


def checked_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """``templates`` (one template or several) as a tuple; a ValueError naming ``templates`` when there is none
    or one lacks the ``{}`` where the class name goes."""
    listed = (templates,) if isinstance(templates, str) else tuple(templates)
    if not listed:
        raise ValueError("templates is empty: give at least one sentence with '{}' where the class name goes")
    for template in listed:
        if not isinstance(template, str) or "{}" not in template:
            raise ValueError(f"templates: {template!r} has no '{{}}' where the class name goes")
    return listed
