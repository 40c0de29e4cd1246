"""Concept targets for image-synthesis methods (MIMIC, docs/mimic.md): what the synthesized image should make a
vision-language model answer.

A target is ``{"id", "prompt", "target", "references", "verifier_class"}``: the question put to the model, the
answer wanted, an optional folder of reference images of the concept (L_base's target feature statistics) and
an optional class index of the verifier classifier. ``ConceptDataModule`` serves them as lists of samples:

- ``format: file``: a JSON or YAML file holding a list of targets (or ``{"targets": [...]}``); ``prompt``
  defaults to the DataModule's ``prompt``; relative ``references`` folders are relative to the file's folder.
- ``format: synthetic``: one target per category of the project's synthetic dataset (generated on first use):
  target text ``template.format(name)`` ("a red circle"), verifier class = the category's index, references =
  crops of the category's boxes in the split's images, written once under
  ``<synthetic_root>/mimic_references/<split>/<category>/`` by ``grounding.data.synthetic.write_synthetic_references``
  (a folder renamed into place, never rewritten, so the feature-statistics cache keeps hitting).

Bad input is an error naming the file and the target id. Under DDP every process gets its own share of the
targets, none repeated (like every evaluation DataModule), so every target is synthesized (and written) once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import yaml

from grounding.data.evaluation import EvaluationDataModule, RecordDataset
from grounding.data.synthetic import category_folder, load_meta, write_synthetic_references

FORMATS = ("file", "synthetic")
TARGET_KEYS = ("id", "prompt", "target", "references", "verifier_class")
DEFAULT_PROMPT = "What is in the image?"


def target_id(text: str) -> str:
    """The id (and output file name) of a target given as text alone: its words joined by "_", every character
    but letters, digits, "-" and "." replaced by "_" ("a red circle" -> "a_red_circle")."""
    name = re.sub(r"[^\w.-]+", "_", "_".join(str(text).split())).strip("_.")
    if not name:
        raise ValueError(f"target {text!r} gives no usable id (it needs a letter or a digit)")
    return name


def _target_id(entry: dict, index: int, path: Path) -> str:
    if "id" not in entry:
        raise ValueError(f"targets file {path}: target #{index} has no 'id'")
    value = entry["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise ValueError(f"targets file {path}: target #{index} has id {value!r}; an id is a non-empty string or an integer")
    name = str(value).strip()
    if name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"targets file {path}: target {name!r}: the id names the output file and must not hold a path separator")
    return name


def parse_targets(data: object, path: str | Path, default_prompt: str = DEFAULT_PROMPT) -> list[dict]:
    """Checked targets from the parsed content of the targets file ``path`` (see the module docstring)."""
    path = Path(path)
    if isinstance(data, dict) and "targets" in data:
        data = data["targets"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"targets file {path}: expected a non-empty list of targets (or {{'targets': [...]}}), got {type(data).__name__}")
    seen: set[str] = set()
    targets = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"targets file {path}: target #{index} is a {type(entry).__name__}, not a mapping")
        target_id = _target_id(entry, index, path)
        where = f"targets file {path}: target {target_id!r}"
        unknown = sorted(set(entry) - set(TARGET_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} (allowed: {', '.join(TARGET_KEYS)})")
        if target_id in seen:
            raise ValueError(f"{where}: the id is used twice")
        seen.add(target_id)
        text = entry.get("target")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: 'target' must be a non-empty text, got {text!r}")
        prompt = entry.get("prompt", default_prompt)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty text, got {prompt!r}")
        references = entry.get("references")
        if references is not None:
            if not isinstance(references, str) or not references.strip():
                raise ValueError(f"{where}: 'references' must be a folder path, got {references!r}")
            folder = Path(references)
            folder = folder if folder.is_absolute() else path.parent / folder
            if not folder.is_dir():
                raise ValueError(f"{where}: reference-image folder not found: {folder}")
            references = str(folder)
        verifier_class = entry.get("verifier_class")
        if verifier_class is not None and (isinstance(verifier_class, bool) or not isinstance(verifier_class, int) or verifier_class < 0):
            raise ValueError(f"{where}: 'verifier_class' must be an integer >= 0, got {verifier_class!r}")
        targets.append({"target_id": target_id, "prompt": " ".join(prompt.split()), "target": " ".join(text.split()),
                        "references": references, "verifier_class": verifier_class})
    return targets


def read_targets(path: str | Path, default_prompt: str = DEFAULT_PROMPT) -> list[dict]:
    """The targets of a JSON (``.json``) or YAML (any other suffix) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"targets file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"targets file {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {error}") from None
    return parse_targets(data, path, default_prompt)


def synthetic_targets(root: str | Path, split: str, prompt: str, template: str, per_category: int, size: int) -> list[dict]:
    """One target per synthetic category (index order = the verifier's class index)."""
    names = load_meta(root)["categories"]
    folder = write_synthetic_references(root, split, per_category, size)
    targets = []
    for index, name in enumerate(names):
        references = folder / category_folder(name)
        has_images = references.is_dir() and any(references.iterdir())
        targets.append({"target_id": category_folder(name), "prompt": prompt, "target": template.format(name),
                        "references": str(references) if has_images else None, "verifier_class": index})
    return targets


class ConceptDataset(RecordDataset):
    """The targets; ``dataset[i]`` is a copy of target i (``target_id``, ``prompt``, ``target``, ``references``,
    ``verifier_class``); class_names are the target texts."""

    def __getitem__(self, index: int) -> dict:
        return dict(self.records[index])


class ConceptDataModule(EvaluationDataModule):
    """MIMIC's targets (see the module docstring).

    Args:
        format: ``file`` or ``synthetic``.
        targets_file: file: the JSON / YAML list of targets.
        prompt: the prompt of targets that give none, and of every synthetic target.
        template: synthetic: the target text of a category name.
        synthetic_root, synthetic: synthetic: the dataset's folder, generated there if absent with the generator
            settings ``synthetic`` (as in the other DataModules).
        split: synthetic: the split whose categories and crops are used; file: a name for the outputs.
        references_per_concept, reference_size: synthetic: crops per category and their side in pixels.
        limit: only the first N targets.
        batch_size, num_workers: loaders (batches are lists of targets).
    """

    def __init__(
        self,
        format: Literal["file", "synthetic"] = "synthetic",
        targets_file: str | None = None,
        prompt: str = DEFAULT_PROMPT,
        template: str = "a {}",
        synthetic_root: str | None = "data/synthetic",
        synthetic: dict | None = None,
        split: str = "val",
        references_per_concept: int = 8,
        reference_size: int = 64,
        limit: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.check_format(format, FORMATS)
        if format == "file" and not targets_file:
            raise ValueError("format 'file' needs targets_file (a JSON or YAML list of targets)")
        if format == "synthetic" and not synthetic_root:
            raise ValueError("format 'synthetic' needs synthetic_root")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty text; got {prompt!r}")
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' for the category name; got {template!r}")
        for name, value in (("references_per_concept", references_per_concept), ("reference_size", reference_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        self.check_loader_settings(split, limit, batch_size, num_workers)
        self.dataset: ConceptDataset | None = None

    def prepare_data(self) -> None:
        super().prepare_data()
        h = self.hparams
        if self.uses_synthetic:
            write_synthetic_references(h.synthetic_root, h.split, h.references_per_concept, h.reference_size)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        h = self.hparams
        if h.format == "file":
            targets = read_targets(h.targets_file, h.prompt)
        else:
            self.prepare_data()
            targets = synthetic_targets(h.synthetic_root, h.split, h.prompt, h.template, h.references_per_concept, h.reference_size)
        if h.limit is not None:
            targets = targets[: h.limit]
        self.dataset = ConceptDataset(targets, [t["target"] for t in targets])
