import json

import pytest
import torch
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from grounding.data.synthetic import COLOUR_RGB, REFERRING_WORDS, SHAPE_NAMES, vocabulary_words
from grounding.models.clip_tokenizer import (
    COMMON_WORDS,
    DEFAULT_WORDS,
    PROMPT_TEMPLATES,
    SYNTHETIC_WORDS,
    bpe_vocabulary,
    build_clip_tokenizer,
    bytes_to_unicode,
    clip_token_ids,
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    build_clip_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(clip_dir):
    return AutoTokenizer.from_pretrained(str(clip_dir))


def test_default_words_cover_the_synthetic_dataset_and_prompts():
    for word in (*COLOUR_RGB, *SHAPE_NAMES, *REFERRING_WORDS, "a", "photo", "of", ".", "an", "image", "background"):
        assert word in DEFAULT_WORDS


def test_every_default_word_is_a_single_token(tokenizer):
    assert tokenizer.tokenize("red") == ["red</w>"]
    for word in DEFAULT_WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    assert tokenizer.tokenize("A Photo of a RED circle.") == ["a</w>", "photo</w>", "of</w>", "a</w>", "red</w>",
                                                              "circle</w>", ".</w>"]


def test_words_stay_whole_whatever_other_words_share_their_substrings(tmp_path):
    # "ab" and "ca" are merges that could fire first inside "cab" and "abc"; the substring closure still ends whole
    words = ["ab", "ca", "bc", "cab", "abc", "abcab", "bca"]
    tokenizer = build_clip_tokenizer(tmp_path, words)
    for word in words:
        assert tokenizer.tokenize(word) == [word + "</w>"]


def test_files_are_in_openai_clip_format(clip_dir):
    vocab = json.loads((clip_dir / "vocab.json").read_text(encoding="utf-8"))
    symbols = list(bytes_to_unicode().values())
    assert len(set(symbols)) == 256
    assert [token for token, index in sorted(vocab.items(), key=lambda item: item[1])][:512] == symbols + [
        s + "</w>" for s in symbols
    ]
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    lines = (clip_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    assert "re d</w>" in lines[1:] or "r ed</w>" in lines[1:]
    for line in lines[1:]:
        left, right = line.split(" ")
        assert left + right in vocab and left in vocab and right in vocab


def test_byte_symbols_match_the_tokenizers_byte_level_alphabet():
    from tokenizers import pre_tokenizers

    assert set(bytes_to_unicode().values()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_unseen_text_round_trips_without_unknown_tokens(tokenizer):
    unk = tokenizer.convert_tokens_to_ids(tokenizer.unk_token)
    for text in ("zebra", "a zebra crossing", "café ☃!"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids and ids
        assert tokenizer.decode(ids) == text
    # CLIP splits digits one by one (as OpenAI's does), so numbers decode digit-spaced, still without unknowns
    assert tokenizer.tokenize("42") == ["4</w>", "2</w>"]
    assert len(tokenizer.tokenize("zebra")) > 1  # not in the vocabulary: built from smaller pieces


def test_special_tokens_padding_and_max_length(tokenizer):
    ids = clip_token_ids(tokenizer)
    assert ids["pad_token_id"] == ids["eos_token_id"] != ids["bos_token_id"]
    assert tokenizer.model_max_length == 77
    encoded = tokenizer("a photo of a red circle.")["input_ids"]
    assert encoded[0] == ids["bos_token_id"] and encoded[-1] == ids["eos_token_id"]
    assert tokenizer.convert_ids_to_tokens(encoded[1:-1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "red</w>",
                                                              "circle</w>", ".</w>"]
    padded = tokenizer("a photo of a red circle.", padding="max_length", max_length=77)
    assert len(padded["input_ids"]) == 77
    assert padded["input_ids"][: len(encoded)] == encoded
    assert set(padded["input_ids"][len(encoded):]) == {ids["pad_token_id"]}
    assert padded["attention_mask"] == [1] * len(encoded) + [0] * (77 - len(encoded))


def test_auto_tokenizer_gives_the_same_ids(tmp_path):
    built = build_clip_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == type(built).__name__ == "CLIPTokenizer"
    texts = ["a photo of a red circle.", "the second largest blue star", "zebra café", "x" * 200]
    assert loaded(texts, padding=True, truncation=True)["input_ids"] == built(texts, padding=True, truncation=True)[
        "input_ids"
    ]
    assert clip_token_ids(loaded) == clip_token_ids(built)
    assert clip_token_ids(built)["vocab_size"] == len(bpe_vocabulary()[0])


def test_clip_token_ids_rejects_a_legacy_eos_id_that_is_not_the_largest(tokenizer):
    class Fake:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

        def __len__(self):
            return 10

    with pytest.raises(ValueError, match="argmax"):
        clip_token_ids(Fake())
    assert clip_token_ids(tokenizer)["eos_token_id"] != 2


def test_tiny_clip_text_model_pools_at_the_eos_token(tokenizer):
    torch.manual_seed(0)
    config = CLIPTextConfig(
        **clip_token_ids(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=77,
    )
    model = CLIPTextModel(config).eval()
    texts = ["a photo of a red circle.", "a photo of the second largest blue triangle on the left.", "zebra"]
    batch = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    # the eos closes the real tokens: position = number of attended tokens - 1 (independent of the ids)
    eos_index = batch["attention_mask"].sum(dim=1) - 1
    assert (batch["input_ids"][torch.arange(3), eos_index] == tokenizer.eos_token_id).all()
    expected = out.last_hidden_state[torch.arange(3), eos_index]
    torch.testing.assert_close(out.pooler_output, expected)
    # the check can fail: the last (padding) position holds a different state for the shorter texts
    assert not torch.allclose(out.pooler_output[0], out.last_hidden_state[0, -1])


def test_built_in_memory_writes_nothing_and_equals_the_saved_one(tmp_path, monkeypatch, tokenizer):
    import tempfile

    from grounding.models.clip import build_clip

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    in_memory = build_clip_tokenizer()
    backbone = build_clip("tiny", image_size=32)
    assert list(tmp_path.iterdir()) == []
    texts = ["a photo of a red circle.", "zebra café", "the second largest blue star"]
    assert in_memory(texts, padding=True)["input_ids"] == tokenizer(texts, padding=True)["input_ids"]
    assert backbone.tokenizer(texts, padding=True)["input_ids"] == tokenizer(texts, padding=True)["input_ids"]


def test_the_written_out_synthetic_words_are_the_datasets_and_cover_what_it_writes(synthetic_root):
    assert SYNTHETIC_WORDS == vocabulary_words()
    refs = json.loads((synthetic_root / "refs_val.json").read_text())
    categories = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())["categories"]
    written = {word for ref in refs for sentence in ref["sentences"] for word in sentence["sent"].split()}
    written |= {word for category in categories for word in category["name"].split()}
    assert written and written <= set(SYNTHETIC_WORDS)


def test_the_tiny_clip_keeps_its_vocabulary_token_ids_and_random_weights():
    """The values of the tiny model as the configs and benchmarks have always built it: a change of its words
    would move token ids and, through the vocabulary size, every random weight drawn after the embedding."""
    from grounding.models.clip import build_clip

    backbone = build_clip("tiny", image_size=32)
    tokenizer = backbone.tokenizer
    assert len(tokenizer) == 1231
    assert tokenizer("the second largest blue star left of a photo")["input_ids"] == [
        1229, 1054, 1199, 1211, 1071, 1120, 1092, 958, 320, 1160, 1230]
    supplied = build_clip_tokenizer(words=vocabulary_words() + PROMPT_TEMPLATES + COMMON_WORDS)
    assert supplied.get_vocab() == tokenizer.get_vocab()
    embedding = backbone.model.text_model.embeddings.token_embedding.weight
    red = tokenizer.get_vocab()["red</w>"]
    assert red == 1044
    torch.testing.assert_close(embedding[red, :4], torch.tensor([0.0089230603, 0.0048075700, 0.0119362492, 0.0375802778]))
    torch.testing.assert_close(backbone.model.visual_projection.weight[0, :3], torch.tensor([-0.1024862230, -0.1151559055, -0.2365349233]))
