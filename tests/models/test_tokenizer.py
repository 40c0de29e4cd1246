from grounding.models.tokenizer import BERT_SPECIAL_IDS, build_wordpiece_tokenizer, wordpiece_vocabulary


def test_special_ids_sit_where_grounding_dino_expects_them(tmp_path):
    tokenizer = build_wordpiece_tokenizer(tmp_path)
    for token, index in {"[PAD]": 0, "[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}.items():
        assert tokenizer.convert_tokens_to_ids(token) == index
    ids = tokenizer("red circle . blue square ?")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and ids[3] == 1012 and ids[-2] == 1029


def test_any_lowercase_word_tokenizes_without_unknowns(tmp_path):
    tokenizer = build_wordpiece_tokenizer(tmp_path)
    tokens = tokenizer.tokenize("Zebra crossing 42")
    assert "[UNK]" not in tokens
    assert "".join(t.removeprefix("##") if t.startswith("##") else " " + t for t in tokens).strip() == "zebra crossing 42"
    assert tokenizer.tokenize("red circle") == ["red", "circle"]  # whole words of the vocabulary stay whole


def test_vocabulary_has_no_duplicates_and_keeps_every_special_id():
    vocab = wordpiece_vocabulary()
    assert len(vocab) == len(set(vocab))
    for token, index in BERT_SPECIAL_IDS.items():
        assert vocab[index] == token


def test_built_in_memory_writes_nothing_and_equals_the_saved_tokenizer(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from grounding.models.grounding_dino import build_grounding_dino

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    in_memory = build_wordpiece_tokenizer()
    _, model_tokenizer = build_grounding_dino("tiny", {"num_queries": 10})
    assert list((tmp_path / "tmp").iterdir()) == []  # no folder left behind per run
    saved = AutoTokenizer.from_pretrained(str(build_wordpiece_tokenizer(tmp_path / "saved") and tmp_path / "saved"))
    texts = ["red circle . blue square .", "Zebra crossing 42 ?", "the leftmost one"]
    for tokenizer in (model_tokenizer, saved):
        assert tokenizer(texts)["input_ids"] == in_memory(texts)["input_ids"]
