"""The grounding benchmarks in one command: one Markdown table of the results beside the published figures.

    python -m grounding.protocols.benchmarks \\
        --refcoco-dir data/refcoco_odvg --refcoco-images data/coco/train2014 \\
        --flickr30k-dir data/flickr30k_odvg --flickr30k-images data/flickr30k/flickr30k-images \\
        --lvis-annotations data/lvis/lvis_v1_minival.json --lvis-images data/coco \\
        --odinw-root data/odinw --coco-annotations data/coco/annotations/instances_val2017.json \\
        --coco-images data/coco/val2017 --table results/benchmarks.md \\
        -- --config configs/image/coco.yaml
    python -m grounding.protocols.benchmarks --benchmarks refcoco refcocog --refcoco-dir data/refcoco_odvg \\
        --refcoco-images data/coco/train2014 -- --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt

Everything after ``--`` goes to ``grounding-eval`` (``grounding.cli.evaluate``) for every benchmark: the config,
``--ckpt_path``, model and trainer settings. The driver adds the data of each benchmark and a logger folder
``<--save-dir>/<benchmark>`` (default ``runs/benchmarks``):

- **REC** (``refcoco``, ``refcoco+``, ``refcocog``): ``--refcoco-dir`` holds the ODVG grounding files that
  ``grounding-convert refcoco --split S --out <dataset>_<S>.jsonl`` writes, ``refcoco_val.jsonl``,
  ``refcoco_testA.jsonl``, ``refcoco_testB.jsonl``, ``refcoco+_val.jsonl`` ..., ``refcocog_val.jsonl``,
  ``refcocog_test.jsonl``; ``--refcoco-images`` is the COCO train2014 folder. One evaluation per dataset, its
  splits as named test sources, with ``GroundingModule`` and ``GroundingDataModule`` (``format: odvg``): acc@1,
  acc@5, acc@10 per split.
- **Phrase grounding** (``flickr30k``): ``--flickr30k-dir`` holds ``flickr30k_val.jsonl`` and
  ``flickr30k_test.jsonl`` (``grounding-convert flickr30k --ids val.txt --out flickr30k_val.jsonl``),
  ``--flickr30k-images`` the image folder; the same evaluation with ``"protocol": "phrase"`` sources: R@1, R@5,
  R@10 per split.
- **LVIS** (``lvis``): ``--lvis-annotations`` (an LVIS v1 file; ``--lvis-split minival`` (default) or ``val``
  says which the references are of) and ``--lvis-images`` (the folder the images' paths are relative to: the
  COCO root holding ``train2017/`` and ``val2017/`` for LVIS's ``coco_url`` paths); ``CocoDetectionDataModule``
  with ``evaluator: lvis``: Fixed AP, AP50, APr, APc, APf. Needs the optional ``lvis`` package.
- **ODinW** (``odinw13``, ``odinw35``): ``--odinw-root`` and ``--odinw-split-variant`` as
  ``grounding.protocols.odinw`` (``--suite``, ``--split-variant``), whose ``find_datasets`` and
  ``evaluate_datasets`` these rows use: the suite's mean AP (the per-dataset AP are in the JSON line).
- **COCO** (``coco``): ``--coco-annotations`` (``instances_val2017.json``) and ``--coco-images`` (``val2017/``),
  box AP as ``grounding.protocols.odinw`` evaluates it.

``--benchmarks`` chooses among ``BENCHMARKS`` (default: every benchmark whose data options are given); a chosen
benchmark without its options is an error naming them. Every file is looked for before the first evaluation: a
missing one is an error naming it, unless ``--skip-missing``, which leaves that split or benchmark out ("not run"
in the table, the reason below it). The benchmarks run in the order of ``BENCHMARKS``, REC and phrase grounding
first: ``grounding-eval`` checks ``--ckpt_path`` against the class it builds before loading anything, so a
checkpoint those rows cannot use is refused before the long detection evaluations. They build
``GroundingModule``, which takes the checkpoints of its parent ``ImageGroundingModule`` (an IMAGE detection run)
as well as its own.

One config serves every row, a detection config (``configs/image/coco.yaml``) as well as a grounding one: the REC
and phrase evaluations switch ``--model.class_path`` to ``GroundingModule`` and ``--data.class_path`` to
``GroundingDataModule``, the detection evaluations ``--data.class_path`` to ``CocoDetectionDataModule``; the
settings both classes take (``image_size``, ``max_size``, ``eval_batch_size``, ``num_workers``, the model's) carry
over from the config, the others are dropped (jsonargparse's behaviour on a new ``class_path``).

Output: the Markdown table (``table``: one row per split and metric, the result in percent, the published
figures of ``PUBLISHED`` beside it, each marked with its ``REFERENCES`` entry: model, setup and source), printed
and written atomically to ``--table PATH``, then one JSON line of everything (results in [0, 1] as
``grounding-eval`` gives them, references in percent as published).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

from grounding.protocols import odinw
from grounding.utils import write_atomic

BENCHMARKS: tuple[str, ...] = ("refcoco", "refcoco+", "refcocog", "flickr30k", "lvis", "odinw13", "odinw35", "coco")
TITLES = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg", "flickr30k": "Flickr30k Entities",
          "lvis": "LVIS", "odinw13": "ODinW-13", "odinw35": "ODinW-35", "coco": "COCO"}
#: the splits of each grounding benchmark, one ODVG file each, ``<benchmark>_<split>.jsonl``
GROUNDING_SPLITS = {"refcoco": ("val", "testA", "testB"), "refcoco+": ("val", "testA", "testB"),
                    "refcocog": ("val", "test"), "flickr30k": ("val", "test")}
LVIS_SPLITS = ("minival", "val")
#: what each grounding protocol reports (keys ``<protocol prefix><statistic>``, per source ``<name>/...``)
GROUNDING_STATISTICS = {"rec": ("acc@1", "acc@5", "acc@10", "count"), "phrase": ("R@1", "R@5", "R@10", "count")}
LVIS_STATISTICS = ("AP", "AP50", "APr", "APc", "APf")
GROUNDING_MODULE = "grounding.lightning.grounding_module.GroundingModule"
GROUNDING_DATA = "grounding.data.grounding_data.GroundingDataModule"


@dataclass
class BenchmarkData:
    """Where each benchmark's files are (None: not given); on the command line each field is an option with
    dashes (``refcoco_dir`` is ``--refcoco-dir``)."""

    refcoco_dir: str | None = None  # refcoco_val.jsonl, ..., refcocog_test.jsonl (grounding-convert refcoco)
    refcoco_images: str | None = None  # COCO train2014/
    flickr30k_dir: str | None = None  # flickr30k_val.jsonl, flickr30k_test.jsonl (grounding-convert flickr30k)
    flickr30k_images: str | None = None
    lvis_annotations: str | None = None  # an LVIS v1 annotation file
    lvis_images: str | None = None  # the COCO root (train2017/, val2017/) its images' paths are relative to
    odinw_root: str | None = None  # the public ODinW release
    coco_annotations: str | None = None  # instances_val2017.json
    coco_images: str | None = None  # val2017/


#: the data options each benchmark needs (fields of ``BenchmarkData``)
NEEDS = {
    "refcoco": ("refcoco_dir", "refcoco_images"), "refcoco+": ("refcoco_dir", "refcoco_images"),
    "refcocog": ("refcoco_dir", "refcoco_images"), "flickr30k": ("flickr30k_dir", "flickr30k_images"),
    "lvis": ("lvis_annotations", "lvis_images"), "odinw13": ("odinw_root",), "odinw35": ("odinw_root",),
    "coco": ("coco_annotations", "coco_images"),
}


def option(field: str) -> str:
    """The command-line option of a ``BenchmarkData`` field."""
    return "--" + field.replace("_", "-")


# ------------------------------------------------------------------------------------------------ references
@dataclass(frozen=True)
class Reference:
    """Who published a figure, for which model and setup."""

    model: str
    setup: str
    source: str


MMDET_MM_GROUNDING_DINO = "mmdetection, configs/mm_grounding_dino/README.md"
REFERENCES: dict[str, Reference] = {
    "gd_t": Reference(
        "Grounding DINO-T", "Swin-T, the official checkpoint pretrained on O365, GoldG, Cap4M, not fine-tuned "
        "(zero-shot)", f"{MMDET_MM_GROUNDING_DINO} (its tables of that checkpoint)"),
    "mm_gd_t": Reference(
        "MM-Grounding-DINO-T", "Swin-T pretrained on O365, GoldG, GRIT, V3Det, not fine-tuned (zero-shot)",
        MMDET_MM_GROUNDING_DINO),
    "gd_t_finetuned": Reference(
        "Grounding DINO-T", "fine-tuned on the benchmark's training split (schedule not given)",
        f"As reported by {MMDET_MM_GROUNDING_DINO} (RefEXP tables)"),
    "mm_gd_t_finetuned": Reference(
        "MM-Grounding-DINO-T", "fine-tuned on the benchmark's training split (RefCOCO/+/g: 5 epochs; LVIS, COCO: 1x)",
        MMDET_MM_GROUNDING_DINO),
    "gd_t_official_finetuned": Reference(
        "Grounding DINO-T", "Swin-T pretrained on O365, GoldG, Cap4M, fine-tuned on COCO train2017",
        "IDEA-Research/GroundingDINO README, checkpoint table (48.4 zero-shot / 57.2 fine-tuned)"),
    "gd_t_mmdet_finetuned": Reference(
        "Grounding DINO-T", "the official checkpoint fine-tuned on COCO train2017 by mmdetection (1x; its own "
        "initialization and log scaler, +0.9 over the official figure)", "mmdetection, configs/grounding_dino/README.md"),
    "image_zero_shot": Reference(
        "IMAGE", "zero-shot, the paper's own model and pretraining (not the mmdetection setup); 4.3 points above "
        "its own baseline", "The IMAGE paper (adaptive masking)"),
    "image_close_set": Reference(
        "IMAGE", "close-set: Grounding DINO (Swin-T) fine-tuned on COCO train2017 with adaptive masking; its own "
        "baseline reaches 45.4 (48.1 - 2.7), about 12 points below the 57.2 of the official checkpoint fine-tuned "
        "on COCO: a different, weaker setup, comparable only with a run of the same setup",
        "The IMAGE paper (adaptive masking)"),
}

#: Published figures in percent: (benchmark, split, metric) -> ((reference, value), ...), in table order. REC:
#: acc@1 (IoU >= 0.5); Flickr30k: R@1; LVIS: Fixed AP; ODinW: mean AP over the suite (mmdetection: valid
#: splits); COCO: box AP on val2017. The RefCOCO testA figure of Grounding DINO-T is 57.4 in the README's REC
#: table and 57.5 in its RefEXP table.
PUBLISHED: dict[tuple[str, str, str], tuple[tuple[str, float], ...]] = {
    ("refcoco", "val", "acc@1"): (("gd_t", 50.8), ("mm_gd_t", 53.1), ("gd_t_finetuned", 89.2), ("mm_gd_t_finetuned", 89.5)),
    ("refcoco", "testA", "acc@1"): (("gd_t", 57.4), ("mm_gd_t", 59.1), ("gd_t_finetuned", 91.9), ("mm_gd_t_finetuned", 91.4)),
    ("refcoco", "testB", "acc@1"): (("gd_t", 45.0), ("mm_gd_t", 46.8), ("gd_t_finetuned", 86.0), ("mm_gd_t_finetuned", 86.6)),
    ("refcoco+", "val", "acc@1"): (("gd_t", 51.6), ("mm_gd_t", 52.7), ("gd_t_finetuned", 81.1), ("mm_gd_t_finetuned", 82.1)),
    ("refcoco+", "testA", "acc@1"): (("gd_t", 57.3), ("mm_gd_t", 58.7), ("gd_t_finetuned", 87.4), ("mm_gd_t_finetuned", 87.5)),
    ("refcoco+", "testB", "acc@1"): (("gd_t", 46.4), ("mm_gd_t", 48.4), ("gd_t_finetuned", 74.7), ("mm_gd_t_finetuned", 74.0)),
    ("refcocog", "val", "acc@1"): (("gd_t", 60.4), ("mm_gd_t", 62.9), ("gd_t_finetuned", 84.2), ("mm_gd_t_finetuned", 85.5)),
    ("refcocog", "test", "acc@1"): (("gd_t", 59.7), ("mm_gd_t", 62.9), ("gd_t_finetuned", 84.9), ("mm_gd_t_finetuned", 85.8)),
    ("flickr30k", "val", "R@1"): (("gd_t", 87.8), ("mm_gd_t", 86.7)),
    ("flickr30k", "test", "R@1"): (("gd_t", 88.1), ("mm_gd_t", 87.2)),
    ("lvis", "minival", "AP"): (("gd_t", 28.8), ("mm_gd_t", 41.4), ("mm_gd_t_finetuned", 58.7)),
    ("lvis", "minival", "APr"): (("gd_t", 18.8), ("mm_gd_t", 34.2), ("mm_gd_t_finetuned", 50.7)),
    ("lvis", "minival", "APc"): (("gd_t", 24.2), ("mm_gd_t", 37.4), ("mm_gd_t_finetuned", 58.8)),
    ("lvis", "minival", "APf"): (("gd_t", 34.7), ("mm_gd_t", 46.2), ("mm_gd_t_finetuned", 60.1)),
    ("lvis", "val", "AP"): (("gd_t", 20.1), ("mm_gd_t", 31.9), ("mm_gd_t_finetuned", 51.7)),
    ("lvis", "val", "APr"): (("gd_t", 10.1), ("mm_gd_t", 23.6), ("mm_gd_t_finetuned", 45.2)),
    ("lvis", "val", "APc"): (("gd_t", 15.3), ("mm_gd_t", 27.6), ("mm_gd_t_finetuned", 50.2)),
    ("lvis", "val", "APf"): (("gd_t", 29.9), ("mm_gd_t", 40.5), ("mm_gd_t_finetuned", 56.1)),
    ("odinw13", "", "mean AP"): (("gd_t", 51.4), ("mm_gd_t", 53.3), ("image_zero_shot", 25.1)),
    ("odinw35", "", "mean AP"): (("gd_t", 22.7), ("mm_gd_t", 28.4)),
    ("coco", "val2017", "AP"): (("gd_t", 48.4), ("mm_gd_t", 50.4), ("gd_t_official_finetuned", 57.2),
                                ("gd_t_mmdet_finetuned", 58.1), ("mm_gd_t_finetuned", 58.2), ("image_close_set", 48.1)),
}


def references_json() -> dict:
    """``REFERENCES`` and ``PUBLISHED`` as JSON: ``{"sources": {id: {model, setup, source}}, "published": [...]}``."""
    return {
        "sources": {key: asdict(reference) for key, reference in REFERENCES.items()},
        "published": [{"benchmark": b, "split": s, "metric": m, "reference": key, "percent": value}
                      for (b, s, m), values in PUBLISHED.items() for key, value in values],
    }


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """What the run evaluates (``inputs``: per benchmark what its evaluation reads) and what it leaves out
    (``skipped``: ``benchmark`` or ``benchmark/split`` -> why), settled before the first evaluation."""

    inputs: dict[str, object]
    skipped: dict[str, str]


def _missing(message: str) -> FileNotFoundError:
    return FileNotFoundError(f"{message} (--skip-missing to go on)")


def _grounding_inputs(benchmark: str, folder: str, images: str, skipped: dict[str, str],
                      skip_missing: bool) -> dict[str, tuple[Path, Path]]:
    """{split: (ODVG file, image folder)} of the split files there; a missing one is an error or skipped."""
    title, converter = TITLES[benchmark], "flickr30k" if benchmark == "flickr30k" else "refcoco"
    if not Path(images).is_dir():
        raise _missing(f"{title}: image folder not found: {images}")
    found = {}
    for split in GROUNDING_SPLITS[benchmark]:
        file = Path(folder) / f"{benchmark}_{split}.jsonl"
        if file.is_file():
            found[split] = (file, Path(images))
            continue
        message = f"{title}: split file not found: {file} (grounding-convert {converter} --out writes it)"
        if not skip_missing:
            raise _missing(message)
        skipped[f"{benchmark}/{split}"] = message
        print(f"{message}: skipped", flush=True)
    if not found:
        raise _missing(f"{title}: no split file found in {folder}")
    return found


def _inputs(benchmark: str, data: BenchmarkData, odinw_split_variant: str, skipped: dict[str, str],
            skip_missing: bool) -> object:
    if benchmark in GROUNDING_SPLITS:
        folder, images = ((data.flickr30k_dir, data.flickr30k_images) if benchmark == "flickr30k"
                          else (data.refcoco_dir, data.refcoco_images))
        return _grounding_inputs(benchmark, folder, images, skipped, skip_missing)
    if benchmark == "lvis":
        if not Path(data.lvis_annotations).is_file():
            raise _missing(f"LVIS: annotation file not found: {data.lvis_annotations}")
        if not Path(data.lvis_images).is_dir():
            raise _missing(f"LVIS: image folder not found: {data.lvis_images}")
        if importlib.util.find_spec("lvis") is None:
            raise ImportError("LVIS: Fixed AP needs the optional lvis package: pip install 'grounding[lvis]' "
                              "(--skip-missing to go on)")
        return Path(data.lvis_annotations), Path(data.lvis_images)
    if benchmark in odinw.SUITES:
        return odinw.find_datasets(data.odinw_root, benchmark, None, odinw_split_variant, skip_missing)
    problem = odinw.missing_coco_file(Path(data.coco_annotations), Path(data.coco_images))
    if problem:
        raise _missing(problem)
    return Path(data.coco_annotations), Path(data.coco_images)


def plan(benchmarks: Sequence[str], data: BenchmarkData, odinw_split_variant: str = "mini_val",
         skip_missing: bool = False) -> Plan:
    """Look for every file of ``benchmarks`` (before any evaluation), in the order they run. A benchmark without its
    data options is a ``ValueError`` naming them; a missing file a ``FileNotFoundError`` naming it (LVIS without
    the ``lvis`` package: ``ImportError``), or with ``skip_missing`` that split or benchmark is left out
    (``Plan.skipped``)."""
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
    benchmarks = [b for b in BENCHMARKS if b in benchmarks]  # the order they run in
    for benchmark in benchmarks:
        lacking = [option(field) for field in NEEDS[benchmark] if getattr(data, field) is None]
        if lacking:
            raise ValueError(f"{benchmark} needs {' and '.join(lacking)}")
    inputs, skipped = {}, {}
    for benchmark in benchmarks:
        try:
            inputs[benchmark] = _inputs(benchmark, data, odinw_split_variant, skipped, skip_missing)
        except (FileNotFoundError, ImportError) as error:
            if not skip_missing:
                raise
            reason = str(error).removesuffix(" (--skip-missing to go on)")
            skipped[benchmark] = reason
            print(f"{benchmark}: skipped, {reason}", flush=True)
    return Plan(inputs, skipped)


# ---------------------------------------------------------------------------------------------- evaluation
def _logger(save_dir: str, name: str) -> list[str]:
    return ["--trainer.logger.init_args.save_dir", save_dir, "--trainer.logger.init_args.name", name]


def grounding_arguments(sources: list[dict]) -> list[str]:
    """The arguments that make ``grounding-eval`` score ``sources`` (ODVG grounding files, test split) with
    ``GroundingModule`` and ``GroundingDataModule``, whatever the passed config builds. The data module's
    synthetic set, its box-AP loader and ``detection_eval`` are switched off: a grounding run config may set
    them, and they belong to other data."""
    return [
        "--model.class_path", GROUNDING_MODULE, "--data.class_path", GROUNDING_DATA,
        "--data.init_args.format", "odvg", "--data.init_args.split", "test",
        "--data.init_args.test", json.dumps(sources), "--data.init_args.synthetic_root", "null",
        "--data.init_args.detection_eval", "false", "--data.init_args.test_detection", "null",
    ]


def evaluate_grounding(evaluate: Callable[[list[str]], dict], eval_args: list[str], benchmark: str,
                       files: dict[str, tuple[Path, Path]], save_dir: str) -> dict:
    """One evaluation of a grounding benchmark's splits, each a test source named ``<benchmark>_<split>``:
    ``{"splits": {split: {"acc@1": .., "acc@5": .., "acc@10": .., "count": ..}}, "run_dir": ..}`` for REC,
    ``R@k`` for Flickr30k (phrase grounding)."""
    protocol = "phrase" if benchmark == "flickr30k" else "rec"
    names = {split: f"{benchmark}_{split}" for split in files}
    sources = [{"anno": str(file), "image_root": str(images), "name": names[split],
                **({"protocol": "phrase"} if protocol == "phrase" else {})} for split, (file, images) in files.items()]
    metrics = evaluate([*eval_args, *grounding_arguments(sources), *_logger(save_dir, benchmark)])
    prefix = f"{protocol}_"
    splits = {}
    for split, name in names.items():
        values = {stat: metrics.get(f"{name}/{prefix}{stat}") for stat in GROUNDING_STATISTICS[protocol]}
        if len(names) == 1 and all(value is None for value in values.values()):  # one source: the overall keys
            values = {stat: metrics.get(f"{prefix}{stat}") for stat in GROUNDING_STATISTICS[protocol]}
        splits[split] = values
        first = GROUNDING_STATISTICS[protocol][0]
        print(f"{name:28s} {first} {odinw._shown(values[first])}", flush=True)
    return {"splits": splits, "run_dir": metrics.get("run_dir")}


def evaluate_lvis(evaluate: Callable[[list[str]], dict], eval_args: list[str], annotations: Path, images: Path,
                  save_dir: str) -> dict:
    """LVIS Fixed AP of one annotation file with ``CocoDetectionDataModule`` (``evaluator: lvis``)."""
    metrics = evaluate([
        *eval_args, "--data.class_path", odinw.DETECTION_DATA, "--data.init_args.split", "val",
        "--data.init_args.synthetic_root", "null", "--data.init_args.val_annotations", str(annotations),
        "--data.init_args.val_images", str(images), "--data.init_args.evaluator", "lvis", *_logger(save_dir, "lvis"),
    ])
    print(f"{'lvis':28s} AP {odinw._shown(metrics.get('AP'))}", flush=True)
    return {key: metrics.get(key) for key in LVIS_STATISTICS}


def run(benchmarks: Sequence[str], data: BenchmarkData, eval_args: list[str], skip_missing: bool = False,
        save_dir: str = "runs/benchmarks", odinw_split_variant: str = "mini_val", lvis_split: str = "minival") -> dict:
    """Evaluate ``benchmarks`` (in the order of ``BENCHMARKS``) with ``grounding.cli.evaluate`` and return the
    summary: ``{"benchmarks": {benchmark: results}, "skipped": {...}, "settings": {...}, "references": ...}``."""
    from grounding.cli import evaluate

    if lvis_split not in LVIS_SPLITS:
        raise ValueError(f"unknown LVIS split {lvis_split!r}; choose from {list(LVIS_SPLITS)}")
    planned = plan(benchmarks, data, odinw_split_variant, skip_missing)  # every file, before any evaluation
    chosen = [b for b in BENCHMARKS if b in benchmarks]
    results = {}
    for benchmark in chosen:
        given = planned.inputs.get(benchmark)
        if given is None:
            continue
        if benchmark in GROUNDING_SPLITS:
            results[benchmark] = evaluate_grounding(evaluate, eval_args, benchmark, given, save_dir)
        elif benchmark == "lvis":
            results[benchmark] = evaluate_lvis(evaluate, eval_args, *given, save_dir)
        elif benchmark in odinw.SUITES:
            results[benchmark] = odinw.evaluate_datasets(given, eval_args, str(Path(save_dir) / benchmark), benchmark,
                                                         odinw_split_variant)
        else:
            results[benchmark] = odinw.evaluate_detection(evaluate, eval_args, *given, save_dir, odinw.COCO_NAME)
    return {"benchmarks": results, "chosen": chosen, "skipped": planned.skipped,
            "settings": {"odinw_split_variant": odinw_split_variant, "lvis_split": lvis_split},
            "references": references_json()}


# ---------------------------------------------------------------------------------------------- the table
def rows(summary: dict) -> list[tuple[str, str, str, float | None | str, tuple[tuple[str, float], ...]]]:
    """(benchmark title, split, metric, result in [0, 1] / None (undefined) / "not run", published figures) of
    every row of the table, in order."""
    settings = summary["settings"]
    found = []
    for benchmark in summary["chosen"]:
        result = summary["benchmarks"].get(benchmark)
        title = TITLES[benchmark]
        if benchmark in GROUNDING_SPLITS:
            metric = "R@1" if benchmark == "flickr30k" else "acc@1"
            for split in GROUNDING_SPLITS[benchmark]:
                values = (result or {}).get("splits", {}).get(split)
                found.append((title, split, metric, "not run" if values is None else values[metric],
                              PUBLISHED[(benchmark, split, metric)]))
        elif benchmark == "lvis":
            split = settings["lvis_split"]
            for metric in ("AP", "APr", "APc", "APf"):
                found.append((title, split, "AP (Fixed)" if metric == "AP" else metric,
                              "not run" if result is None else result[metric], PUBLISHED[("lvis", split, metric)]))
        elif benchmark in odinw.SUITES:
            size = len(odinw.SUITE_DATASETS[benchmark])
            over = size if result is None else result["mean_AP_over"]
            metric = "mean AP" if over == size else f"mean AP (over {over} of {size})"
            found.append((title, f"{settings['odinw_split_variant']} variant", metric,
                          "not run" if result is None else result["mean_AP"], PUBLISHED[(benchmark, "", "mean AP")]))
        else:
            found.append((title, "val2017", "AP", "not run" if result is None else result["AP"],
                          PUBLISHED[("coco", "val2017", "AP")]))
    return found


def _shown(result: float | None | str) -> str:
    return result if isinstance(result, str) else odinw._percent(result)


def table(summary: dict) -> str:
    """The Markdown table of a summary of ``run``: a row per split and metric with the result in percent
    (``n/a`` where undefined, ``not run`` where left out) and the published figures, each marked ``[n]``; below
    it the references (model, setup, source) in order of first use and the notes the rows need."""
    numbers: dict[str, int] = {}
    lines = ["| benchmark | split | metric | result (%) | published (%) |", "|---|---|---|---:|---|"]
    for title, split, metric, result, published in rows(summary):
        cited = "; ".join(f"{value:.1f} [{numbers.setdefault(key, len(numbers) + 1)}]" for key, value in published)
        lines.append(f"| {title} | {split} | {metric} | {_shown(result)} | {cited} |")
    lines.append("")
    for key, number in numbers.items():
        reference = REFERENCES[key]
        lines.append(f"[{number}] {reference.model}: {reference.setup}. {reference.source}.")
    chosen = summary["chosen"]
    if "refcoco" in chosen:
        lines.append(f"RefCOCO testA of [{numbers['gd_t']}]: 57.4 in the README's REC table, 57.5 in its RefEXP table.")
    if "coco" in chosen and "gd_t" in numbers:
        lines.append(f"COCO of [{numbers['gd_t']}]: 48.4 in that README and in the official one; mmdetection's own "
                     "evaluation of the converted checkpoint gives 48.5 (configs/grounding_dino/README.md).")
    if "flickr30k" in chosen:
        lines.append("Flickr30k Entities: GoldG, in the pretraining of both models, holds its training annotations.")
    odinw_chosen = [b for b in chosen if b in odinw.SUITES]
    if odinw_chosen:
        variant = summary["settings"]["odinw_split_variant"]
        glip = sorted({d.name for suite in odinw_chosen for d in odinw.SUITE_DATASETS[suite] if d.glip_mini_val})
        ours = (f"mini_val for {', '.join(glip)}, valid for the rest (as GLIP)" if variant == "mini_val"
                else "valid for every dataset (as mmdetection)")
        lines.append(f"ODinW splits here: {ours}; the mmdetection figures used valid for every dataset, the IMAGE "
                     "paper does not say. Per-dataset AP: the JSON line, or python -m grounding.protocols.odinw.")
    for what, why in summary["skipped"].items():
        lines.append(f"Not run: {what}: {why}.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ours, eval_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m grounding.protocols.benchmarks", description=__doc__.splitlines()[0],
        epilog="Everything after -- goes to grounding-eval for every benchmark, e.g. -- --config configs/image/coco.yaml "
               "or -- --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt",
    )
    parser.add_argument("--benchmarks", nargs="+", choices=BENCHMARKS, default=None, metavar="NAME",
                        help=f"which to run, among {', '.join(BENCHMARKS)} (default: every benchmark whose data "
                             "options are given)")
    help_of = {
        "refcoco_dir": "folder of refcoco_val.jsonl ... refcocog_test.jsonl (grounding-convert refcoco)",
        "refcoco_images": "the COCO train2014/ folder",
        "flickr30k_dir": "folder of flickr30k_val.jsonl and flickr30k_test.jsonl (grounding-convert flickr30k)",
        "flickr30k_images": "the Flickr30k image folder",
        "lvis_annotations": "an LVIS v1 annotation file (minival by default, see --lvis-split)",
        "lvis_images": "the folder its images' paths are relative to (the COCO root with train2017/, val2017/)",
        "odinw_root": "the public ODinW release (odinw13, odinw35)",
        "coco_annotations": "COCO instances_val2017.json",
        "coco_images": "the COCO val2017/ folder",
    }
    for field in fields(BenchmarkData):
        metavar = "FILE" if field.name.endswith("annotations") else "DIR"
        parser.add_argument(option(field.name), dest=field.name, default=None, metavar=metavar, help=help_of[field.name])
    parser.add_argument("--odinw-split-variant", choices=odinw.SPLIT_VARIANTS, default="mini_val",
                        help="mini_val: the datasets GLIP evaluates on mini_val are read from it (default); "
                             "valid: every dataset from valid, as mmdetection")
    parser.add_argument("--lvis-split", choices=LVIS_SPLITS, default="minival",
                        help="which LVIS split --lvis-annotations is, for the published figures beside it")
    parser.add_argument("--skip-missing", action="store_true", help="leave out splits and benchmarks whose files are not there")
    parser.add_argument("--save-dir", default="runs/benchmarks", help="logger folder; one run per benchmark inside")
    parser.add_argument("--table", default=None, help="also write the Markdown table to this file")
    parser.usage = parser.format_usage().removeprefix("usage: ").rstrip().replace("%", "%%") + " -- <grounding-eval arguments>"
    args = parser.parse_args(ours)
    data = BenchmarkData(**{field.name: getattr(args, field.name) for field in fields(BenchmarkData)})
    benchmarks = args.benchmarks
    if benchmarks is None:  # every benchmark with one of its options given (and then all of them needed)
        benchmarks = [b for b in BENCHMARKS if any(getattr(data, field) is not None for field in NEEDS[b])]
        if not benchmarks:
            parser.error("no benchmark: give the data options of at least one (--refcoco-dir ..., --odinw-root ...)")
    for benchmark in benchmarks:
        lacking = [option(field) for field in NEEDS[benchmark] if getattr(data, field) is None]
        if lacking:
            parser.error(f"{benchmark} needs {' and '.join(lacking)}")
    summary = run(benchmarks, data, eval_args, args.skip_missing, args.save_dir, args.odinw_split_variant, args.lvis_split)
    markdown = table(summary)
    print(markdown, flush=True)
    if args.table:
        write_atomic(args.table, lambda temporary: Path(temporary).write_text(markdown))
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
