"""MIMIC's concept targets: the JSON / YAML list, the synthetic concepts, and bad input named."""

import json

import pytest
import yaml

from grounding.data.concepts import ConceptDataModule, parse_targets, read_targets
from grounding.data.synthetic import load_meta, write_synthetic_references


def _write(path, data, as_json=False):
    path.write_text(json.dumps(data) if as_json else yaml.safe_dump(data))
    return path


def test_a_yaml_and_a_json_list_give_the_same_targets(tmp_path):
    (tmp_path / "refs" / "fish").mkdir(parents=True)
    data = [{"id": "fish", "target": "a  goldfish", "references": "refs/fish", "verifier_class": 1},
            {"id": 7, "prompt": "Which shape is it?", "target": "a red circle"}]
    from_yaml = read_targets(_write(tmp_path / "t.yaml", data), "Describe it.")
    from_json = read_targets(_write(tmp_path / "t.json", {"targets": data}, as_json=True), "Describe it.")
    assert from_yaml == from_json == [
        {"target_id": "fish", "prompt": "Describe it.", "target": "a goldfish", "references": str(tmp_path / "refs" / "fish"),
         "verifier_class": 1},
        {"target_id": "7", "prompt": "Which shape is it?", "target": "a red circle", "references": None, "verifier_class": None},
    ]
    module = ConceptDataModule(format="file", targets_file=str(tmp_path / "t.yaml"), limit=1)
    module.setup()
    batches = list(module.test_dataloader())
    assert [[s["target_id"] for s in b] for b in batches] == [["fish"]] and module.class_names == ["a goldfish"]


@pytest.mark.parametrize("data, message", [
    ({"a": 1}, r"targets file {f}: expected a non-empty list of targets \(or {{'targets': \[...\]}}\), got dict$"),
    ([{"target": "x"}], r"targets file {f}: target #0 has no 'id'$"),
    ([{"id": "a/b", "target": "x"}], r"targets file {f}: target 'a/b': the id names the output file and must not hold a path separator$"),
    ([{"id": "a", "target": "x"}, {"id": "a", "target": "y"}], r"targets file {f}: target 'a': the id is used twice$"),
    ([{"id": "a", "target": ""}], r"targets file {f}: target 'a': 'target' must be a non-empty text, got ''$"),
    ([{"id": "a", "target": "x", "colour": "red"}],
     r"targets file {f}: target 'a': unknown keys \['colour'\] \(allowed: id, prompt, target, references, verifier_class\)$"),
    ([{"id": "a", "target": "x", "references": "missing"}], r"targets file {f}: target 'a': reference-image folder not found: {d}/missing$"),
    ([{"id": "a", "target": "x", "verifier_class": -1}], r"targets file {f}: target 'a': 'verifier_class' must be an integer >= 0, got -1$"),
    ([{"id": "a", "target": "x", "prompt": 3}], r"targets file {f}: target 'a': 'prompt' must be a non-empty text, got 3$"),
])
def test_bad_targets_are_named_with_the_file_and_the_id(tmp_path, data, message):
    path = _write(tmp_path / "targets.yaml", data)
    with pytest.raises(ValueError, match="^" + message.format(f=str(path), d=str(tmp_path))):
        read_targets(path)


def test_unreadable_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match=rf"^targets file {bad} is not valid JSON: "):
        read_targets(bad)
    with pytest.raises(FileNotFoundError, match=rf"^targets file not found: {tmp_path}/none.yaml$"):
        read_targets(tmp_path / "none.yaml")
    with pytest.raises(ValueError, match=r"^format 'file' needs targets_file \(a JSON or YAML list of targets\)$"):
        ConceptDataModule(format="file")
    with pytest.raises(ValueError, match=r"^format must be one of file, synthetic; got 'csv'$"):
        ConceptDataModule(format="csv")
    with pytest.raises(ValueError, match=r"^targets file x.yaml: target #0 is a str, not a mapping$"):
        parse_targets(["a"], "x.yaml")


def test_synthetic_concepts_have_crops_of_their_category_written_once(synthetic_root, tmp_path):
    module = ConceptDataModule(format="synthetic", synthetic_root=str(synthetic_root), split="train", template="a {}",
                               references_per_concept=2, reference_size=16)
    module.setup()
    names = load_meta(synthetic_root)["categories"]
    samples = [module.dataset[i] for i in range(len(module.dataset))]
    assert [s["target"] for s in samples] == [f"a {n}" for n in names]
    assert [s["verifier_class"] for s in samples] == list(range(len(names)))
    assert all(s["prompt"] == "What is in the image?" for s in samples)
    from PIL import Image

    from grounding.data.coco_file import read_coco

    coco = read_coco(synthetic_root / "annotations" / "instances_train.json")
    for sample, name in zip(samples, names):
        category = next(c for c, n in coco.categories.items() if n == name)
        count = sum(a["category_id"] == category for a in coco.annotations)
        files = sorted((synthetic_root / "mimic_references" / "train" / "_".join(name.split())).glob("*.png"))
        assert len(files) == min(2, count)
        if files:
            assert sample["references"] == str(files[0].parent)
            assert Image.open(files[0]).size == (16, 16)
    stamps = {p: p.stat().st_mtime_ns for p in (synthetic_root / "mimic_references").rglob("*.png")}
    write_synthetic_references(synthetic_root, "train", 5, 32)  # the folder exists: kept as it is
    assert {p: p.stat().st_mtime_ns for p in (synthetic_root / "mimic_references").rglob("*.png")} == stamps
