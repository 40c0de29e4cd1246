import pytest
import torch
from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

from grounding.data.prompts import build_prompts, category_scores, phrase_positions
from grounding.models.tokenizer import build_wordpiece_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_wordpiece_tokenizer(tmp_path_factory.mktemp("tok"))


CATEGORIES = {7: "Red Circle", 3: "blue  square", 11: "zebra", 5: "green triangle"}


def test_positive_map_equals_the_models_own_label_maps(tokenizer):
    (prompt,) = build_prompts(CATEGORIES, tokenizer, max_text_len=32)
    assert prompt.text == "red circle . blue square . zebra . green triangle ."
    assert prompt.category_ids == [7, 3, 11, 5]
    # transformers' loss builds its label maps from the delimiters: they must match ours row by row
    (label_map,) = build_label_maps(torch.zeros(1, 1, 32), prompt.input_ids[None])
    assert torch.equal(label_map.float(), prompt.positive_map)
    tokens = tokenizer.convert_ids_to_tokens(prompt.input_ids)
    assert [tokens[i] for i in prompt.positive_map[2].nonzero().flatten()] == ["z", "##e", "##b", "##r", "##a"]


def test_categories_that_do_not_fit_are_split_into_several_prompts(tokenizer):
    categories = {i: f"{c} {s}" for i, (c, s) in enumerate(((c, s) for c in ("red", "blue", "green") for s in ("circle", "square", "star")), 1)}
    prompts = build_prompts(categories, tokenizer, max_text_len=12)  # 3 tokens each + [CLS]/[SEP]: 3 per prompt
    assert [p.category_ids for p in prompts] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for prompt in prompts:
        assert len(prompt.input_ids) <= 12
        (label_map,) = build_label_maps(torch.zeros(1, 1, 12), prompt.input_ids[None])
        assert torch.equal(label_map.float(), prompt.positive_map)


@pytest.mark.parametrize(
    "categories, message",
    [
        ({1: "cat", 2: "  "}, r"category id 2 has an empty name"),
        ({1: "cat", 4: None}, r"category id 4 has an empty name"),
        ({1: "st. bernard"}, r"category id 1 name 'st. bernard' does not form phrase 0"),
        ({1: "what?"}, r"category id 1 name 'what\?' does not form phrase 0"),
        ({}, r"no categories"),
        ({9: "a b c d e f g h i j"}, r"category id 9 name 'a b c d e f g h i j' alone needs 13 tokens > max_text_len=8"),
    ],
)
def test_bad_category_names_fail_loudly(tokenizer, categories, message):
    with pytest.raises(ValueError, match=message):
        build_prompts(categories, tokenizer, max_text_len=8 if 9 in categories else 32)


def test_phrase_positions_counts_runs_between_delimiters():
    ids = torch.tensor([101, 5, 6, 1012, 7, 1012, 8, 9, 1029, 102, 0, 0])
    assert phrase_positions(ids).tolist() == [-1, 0, 0, -1, 1, -1, 2, 2, -1, -1, -1, -1]


def test_category_scores_is_the_mean_token_probability():
    logits = torch.randn(2, 3, 6)
    positive_map = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0.0]])
    scores = category_scores(logits, positive_map)
    p = logits.sigmoid()
    assert torch.allclose(scores[..., 0], (p[..., 1] + p[..., 2]) / 2)
    assert torch.allclose(scores[..., 1], p[..., 4])
