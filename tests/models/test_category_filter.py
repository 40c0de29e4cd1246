"""The captioner + CLIP category filter: the rule on hand-made embeddings, caption phrases, the tiny models."""

import pytest
import torch

from grounding.models.category_filter import CaptionClipFilter, caption_phrases, keep_categories


def test_caption_phrases_drop_stop_words_and_pair_neighbours():
    assert caption_phrases("A cat sitting on the dining table, next to a cat.") == [
        "cat", "cat sitting", "sitting", "dining", "dining table", "table",
    ]
    assert caption_phrases("the of a") == []


def unit(*values):
    vector = torch.tensor(values, dtype=torch.float32)
    return vector / vector.norm()


def test_keep_categories_text_rule_uses_the_closest_phrase():
    """c is kept when some phrase has cosine >= 0.8 with it: here cos 0.87 for category 0, 0.49 for 1."""
    categories = torch.stack([unit(1, 0, 0), unit(0, 1, 0)])
    phrase = unit(0.9, 0.5, 0)
    cosines = (torch.nn.functional.normalize(categories, dim=-1) @ phrase).tolist()
    image = unit(0, 0, 1)  # orthogonal to both categories: the image rule keeps nothing
    kept = keep_categories(categories, phrase[None], image, text_threshold=0.8)
    assert kept == [i for i, c in enumerate(cosines) if c >= 0.8] == [0]


def test_keep_categories_image_rule_is_relative_to_the_best_category():
    """cos(image, c) / max_c' cos(image, c') >= 0.97 keeps c: cosines 0.30, 0.295, 0.20 -> ratios 1, 0.983, 0.667."""
    image = unit(1, 0, 0, 0)
    cosines = [0.30, 0.295, 0.20]
    categories = torch.stack([torch.tensor([c, (1 - c * c) ** 0.5, 0, 0]) if i == 0 else
                              torch.tensor([c, 0, (1 - c * c) ** 0.5, 0]) if i == 1 else
                              torch.tensor([c, 0, 0, (1 - c * c) ** 0.5]) for i, c in enumerate(cosines)])
    no_phrases = torch.zeros(0, 4)
    assert keep_categories(categories, no_phrases, image, image_threshold=0.97) == [0, 1]
    assert keep_categories(categories, no_phrases, image, image_threshold=0.6) == [0, 1, 2]
    # both rules: a phrase equal to category 2 adds it
    assert keep_categories(categories, categories[2:], image, image_threshold=0.97) == [0, 1, 2]


def test_keep_categories_names_bad_shapes():
    with pytest.raises(ValueError, match=r"keep_categories needs category_text \(C, P\) and image \(P,\), got \(3, 4\) and \(5,\)"):
        keep_categories(torch.zeros(3, 4), torch.zeros(0, 4), torch.zeros(5))


def test_tiny_filter_runs_end_to_end_and_agrees_with_the_rule():
    """BLIP + CLIP on tiny random models: the kept indices are those of keep_categories on the embeddings
    computed here from the caption the filter produced."""
    category_filter = CaptionClipFilter(captioner="tiny", clip="tiny", clip_image_size=64)
    image = (torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    names = ["red circle", "blue square", "red triangle"]
    kept = category_filter(image, names)
    caption = category_filter.caption(image)
    clip = category_filter.clip
    phrases = caption_phrases(caption)
    with torch.no_grad():
        text = clip.encode_text([f"a photo of a {n}." for n in names])
        phrase_text = clip.encode_text(phrases) if phrases else torch.zeros(0, text.shape[1])
        image_embedding = clip.encode_image(clip.preprocess(image))[0]
    assert kept == keep_categories(text, phrase_text, image_embedding)
    assert kept and set(kept) <= {0, 1, 2}  # the best image match is always kept


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_threshold": 0.0}, r"image_threshold must be in \(0, 1\], got 0.0"),
        ({"text_threshold": 2.0}, r"text_threshold must be a cosine in \[-1, 1\], got 2.0"),
        ({"template": "a photo"}, r"template must hold '\{\}' where the category name goes"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CaptionClipFilter(captioner="tiny", clip="tiny", **kwargs)
