"""Zero-shot ODinW-13 or ODinW-35 (and optionally COCO val2017) in one command, one table with reference numbers.

``grounding-eval`` on each dataset, then per-dataset AP, the suite's mean and COCO beside published figures:

    python -m grounding.protocols.odinw --root data/odinw -- --config configs/image/coco.yaml
    python -m grounding.protocols.odinw --root data/odinw --suite odinw35 --split-variant valid -- \\
        --config configs/image/coco.yaml
    python -m grounding.protocols.odinw --root data/odinw --datasets Aquarium pothole -- \\
        --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt
    python -m grounding.protocols.odinw --root data/odinw \\
        --coco-annotations data/coco/annotations/instances_val2017.json --coco-images data/coco/val2017 \\
        --table results/zero_shot.md -- --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt

Everything after ``--`` goes to ``grounding-eval`` for every dataset (model, checkpoint, trainer settings); the
driver adds ``--data.class_path`` (``CocoDetectionDataModule``, so a run config of the grounding data works too),
``--data.val_annotations`` / ``--data.val_images`` of the dataset, ``--data.synthetic_root null`` and a logger
folder per dataset (``runs/odinw/<name>``, ``runs/odinw/COCO`` for COCO). Each dataset's prompt is built from
its own category names, as GLIP's zero-shot protocol does.

**Suites.** ``--suite odinw13`` (default) or ``odinw35``: the 13 or 35 datasets of the public ODinW release
(GLIP / ELEVATER) under ``--root``, in that release's layout, the validation split with
``annotations_without_background.json`` (``ODINW13_DATASETS``, ``ODINW35_DATASETS`` list the relative paths).
The table's mean row is named after the suite ("ODinW-35 mean").

**Split setting.** For some datasets GLIP evaluates ``mini_val`` (a subset of ``valid`` in the same release) while
mmdetection's configs, whose numbers are the references here, evaluate ``valid``: EgoHands and
VehiclesOpenImages in ODinW-13, and in ODinW-35 also brackishUnderwater, DroneControl, EgoHands_specific,
openPoetryVision, both OxfordPets, PKLot, UnoCards and websiteScreenshots (``OdinwDataset.glip_mini_val``).
``--split-variant mini_val`` (default, as GLIP) reads their ``mini_val`` folder, ``valid`` (as mmdetection) their
``valid`` one; every other dataset is read from ``valid`` either way. The table says which datasets were read
from ``mini_val`` and which split each reference used.

``--coco-annotations`` / ``--coco-images`` (given together: ``instances_val2017.json`` and the ``val2017/``
folder) add COCO to the same run. A missing dataset (ODinW or COCO) is an error naming the file it looked for,
unless ``--skip-missing``; every file is looked for before the first evaluation.

Prints a Markdown table (``table``: AP / AP50 in percent per dataset, the suite's mean, COCO, and the
``REFERENCES`` where one exists), also written to ``--table PATH`` (atomically), and ends with one JSON line
``{"suite": .., "split_variant": .., "datasets": {name: {"AP": .., "AP50": ..}}, "splits": {name: "valid" |
"mini_val"}, "evaluated": n, "mean_AP": .., "mean_AP_over": n, ..., "coco": {"AP": .., "AP50": ..} or null,
"references": REFERENCES}`` (values in [0, 1] as ``grounding-eval`` gives them; a dataset whose statistic is
undefined, ``null``, is left out of that mean). ``grounding.protocols.benchmarks`` puts the suite's mean into
one table with the other grounding benchmarks.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Literal

from grounding.utils import write_atomic

SplitVariant = Literal["mini_val", "valid"]
SPLIT_VARIANTS: tuple[str, ...] = ("mini_val", "valid")
SUITES: tuple[str, ...] = ("odinw13", "odinw35")
SUITE_TITLES = {"odinw13": "ODinW-13", "odinw35": "ODinW-35"}
COCO_NAME = "COCO"  # logger name of the COCO run
#: the data module every ODinW / COCO evaluation builds (whatever data class the passed config names)
DETECTION_DATA = "grounding.data.detection.CocoDetectionDataModule"


@dataclass(frozen=True)
class OdinwDataset:
    """One dataset of the public ODinW release; paths relative to the release's root."""

    name: str
    annotations: str  # the annotation file of the ``valid`` split
    images: str  # the folder its images' ``file_name`` are relative to
    glip_mini_val: bool = False  # GLIP evaluates the ``mini_val`` folder beside ``valid`` instead

    def split(self, variant: SplitVariant) -> str:
        """The split read under ``variant``: ``mini_val`` only for a dataset GLIP evaluates there."""
        return "mini_val" if variant == "mini_val" and self.glip_mini_val else "valid"

    def files(self, variant: SplitVariant) -> tuple[str, str]:
        """(annotation file, image folder) of the split read under ``variant``."""
        if self.split(variant) == "valid":
            return self.annotations, self.images
        return _in_mini_val(self.annotations), _in_mini_val(self.images)


def _in_mini_val(path: str) -> str:
    """``path`` with its ``valid`` folder replaced by ``mini_val`` (the release keeps both side by side)."""
    parts = PurePosixPath(path).parts
    return str(PurePosixPath(*("mini_val" if part == "valid" else part for part in parts)))


def _valid(folder: str, annotations: str = "valid/annotations_without_background.json", images: str = "valid",
           glip_mini_val: bool = False, name: str | None = None) -> OdinwDataset:
    """The usual layout: ``<folder>/valid/annotations_without_background.json`` with the images beside it."""
    return OdinwDataset(name or folder.split("/")[0], f"{folder}/{annotations}", f"{folder}/{images}".rstrip("/"),
                        glip_mini_val)


def _export(folder: str, name: str | None = None) -> OdinwDataset:
    """The Roboflow ``export`` layout: ``<folder>/val_annotations_without_background.json``, images in ``<folder>``."""
    return _valid(folder, "val_annotations_without_background.json", "", name=name)


#: GLIP's ODinW-13 (configs/odinw_13), names as in its tables
ODINW13_DATASETS: tuple[OdinwDataset, ...] = (
    _valid("AerialMaritimeDrone/large"),
    _valid("Aquarium/Aquarium Combined.v2-raw-1024.coco"),
    _valid("CottontailRabbits"),
    _valid("EgoHands/generic", glip_mini_val=True),
    _valid("NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco"),
    _valid("Packages/Raw"),
    _valid("PascalVOC"),
    _export("pistols/export"),
    _valid("pothole"),
    _valid("Raccoon/Raccoon.v2-raw.coco"),
    _valid("ShellfishOpenImages/raw"),
    _valid("thermalDogsAndPeople"),
    _valid("VehiclesOpenImages/416x416", glip_mini_val=True),
)

#: the 35 datasets of GLIP's configs/odinw_35 and mmdetection's grounding_dino_swin-t_pretrain_odinw35.py, names as
#: in mmdetection's ODinW-35 table (Raccoon written as in ODinW-13)
ODINW35_DATASETS: tuple[OdinwDataset, ...] = (
    _valid("AerialMaritimeDrone/large", name="AerialMaritimeDrone_large"),
    _valid("AerialMaritimeDrone/tiled", name="AerialMaritimeDrone_tiled"),
    _valid("AmericanSignLanguageLetters/American Sign Language Letters.v1-v1.coco"),
    _valid("Aquarium/Aquarium Combined.v2-raw-1024.coco"),
    _valid("BCCD/BCCD.v3-raw.coco"),
    _export("boggleBoards/416x416AutoOrient/export"),
    _valid("brackishUnderwater/960x540", glip_mini_val=True),
    _valid("ChessPieces/Chess Pieces.v23-raw.coco"),
    _valid("CottontailRabbits"),
    _export("dice/mediumColor/export"),
    _valid("DroneControl/Drone Control.v3-raw.coco", glip_mini_val=True),
    _valid("EgoHands/generic", glip_mini_val=True, name="EgoHands_generic"),
    _valid("EgoHands/specific", glip_mini_val=True, name="EgoHands_specific"),
    _valid("HardHatWorkers/raw"),
    _valid("MaskWearing/raw"),
    _valid("MountainDewCommercial"),
    _valid("NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco"),
    _valid("openPoetryVision/512x512", glip_mini_val=True),
    _valid("OxfordPets/by-breed", glip_mini_val=True, name="OxfordPets_by_breed"),
    _valid("OxfordPets/by-species", glip_mini_val=True, name="OxfordPets_by_species"),
    _valid("PKLot/640", glip_mini_val=True),
    _valid("Packages/Raw"),
    _valid("PascalVOC"),
    _export("pistols/export"),
    _valid("plantdoc/416x416"),
    _valid("pothole"),
    _valid("Raccoon/Raccoon.v2-raw.coco"),
    _export("selfdrivingCar/fixedLarge/export"),
    _valid("ShellfishOpenImages/raw"),
    _valid("ThermalCheetah"),
    _valid("thermalDogsAndPeople"),
    _valid("UnoCards/raw", glip_mini_val=True),
    _valid("VehiclesOpenImages/416x416", glip_mini_val=True),
    _valid("WildfireSmoke"),
    _valid("websiteScreenshots", glip_mini_val=True),
)
SUITE_DATASETS = {"odinw13": ODINW13_DATASETS, "odinw35": ODINW35_DATASETS}

#: (name, annotation file, image folder) of ODinW-13 as GLIP evaluates it (``--split-variant mini_val``)
ODINW13: tuple[tuple[str, str, str], ...] = tuple((d.name, *d.files("mini_val")) for d in ODINW13_DATASETS)
NAMES = tuple(d.name for d in ODINW13_DATASETS)
ODINW35_NAMES = tuple(d.name for d in ODINW35_DATASETS)

#: Published zero-shot figures shown beside the results, AP in percent as published; ``split``: the ODinW split
#: the figure was measured on (None: not stated). The sources use different models, pretraining and setups: a
#: figure is comparable with a run of the same setup, not necessarily with the other sources. ``mmdetection``: the
#: Swin-T Grounding DINO checkpoint pretrained on O365+GoldG+Cap4M, evaluated zero-shot by mmdetection (its
#: Grounding DINO, ODinW and MM-Grounding-DINO tables; evaluating that checkpoint here should come close: a check
#: that the evaluation is set up right). ``MM-Grounding-DINO``: mmdetection's Swin-T MM-Grounding-DINO pretrained
#: on O365+GoldG+GRIT+V3Det, zero-shot (configs/mm_grounding_dino/README.md, ODinW-35 average 0.284).
#: ``IMAGE``: the zero-shot ODinW-13 figure of the IMAGE paper (adaptive masking), its own model and pretraining,
#: 4.3 points above its own baseline.
REFERENCES: dict[str, dict] = {
    "mmdetection": {
        "source": "mmdetection's Grounding DINO model table",
        "setup": "Swin-T Grounding DINO pretrained on O365+GoldG+Cap4M, zero-shot",
        "split": "valid",
        "COCO_val2017_AP_percent": 48.4,
        "ODinW13_mean_AP_percent": 51.4,
        "ODinW35_mean_AP_percent": 22.7,
    },
    "MM-Grounding-DINO": {
        "source": "mmdetection's MM-Grounding-DINO model table",
        "setup": "Swin-T MM-Grounding-DINO pretrained on O365+GoldG+GRIT+V3Det, zero-shot",
        "split": "valid",
        "ODinW35_mean_AP_percent": 28.4,
    },
    "IMAGE": {
        "source": "the IMAGE paper (adaptive masking)",
        "setup": "zero-shot, the paper's own model and pretraining (not the mmdetection setup)",
        "split": None,
        "ODinW13_mean_AP_percent": 25.1,
        "gain_over_own_baseline_percent": 4.3,
    },
}
#: the references of each suite's mean, in the order the table cites them
SUITE_REFERENCES = {"odinw13": ("mmdetection", "IMAGE"), "odinw35": ("mmdetection", "MM-Grounding-DINO")}


def reference_mean(suite: str, key: str) -> float | None:
    """The published mean AP (percent) of ``suite`` by the reference ``key``, or None where it gives none."""
    return REFERENCES[key].get(f"{SUITE_TITLES[suite].replace('-', '')}_mean_AP_percent")


# ------------------------------------------------------------------------------------------------ the run
@dataclass(frozen=True)
class FoundDataset:
    """A dataset whose annotation file is there: what one evaluation reads."""

    name: str
    annotations: Path
    images: Path
    split: str  # "valid" or "mini_val"


def find_datasets(root: str | Path, suite: str = "odinw13", datasets: list[str] | None = None,
                  split_variant: SplitVariant = "mini_val", skip_missing: bool = False) -> list[FoundDataset]:
    """The selected datasets of ``suite`` under ``root`` (all when ``datasets`` is None), in the suite's order.
    Every annotation file is looked for: a missing one is a ``FileNotFoundError`` naming it, or, with
    ``skip_missing``, left out (one line on stdout); none found at all is an error either way."""
    if suite not in SUITES:
        raise ValueError(f"unknown ODinW suite {suite!r}; choose from {list(SUITES)}")
    if split_variant not in SPLIT_VARIANTS:
        raise ValueError(f"unknown split variant {split_variant!r}; choose from {list(SPLIT_VARIANTS)}")
    title, members = SUITE_TITLES[suite], SUITE_DATASETS[suite]
    unknown = sorted(set(datasets or []) - {d.name for d in members})
    if unknown:
        raise ValueError(f"unknown {title} datasets {unknown}; choose from {[d.name for d in members]}")
    root = Path(root)
    found = []
    for dataset in members:
        if datasets is not None and dataset.name not in datasets:
            continue
        annotations, images = (root / path for path in dataset.files(split_variant))
        if not annotations.is_file():
            if skip_missing:
                print(f"{dataset.name}: skipped, {annotations} not found", flush=True)
                continue
            raise FileNotFoundError(f"ODinW dataset {dataset.name}: annotation file not found: {annotations} "
                                    "(--skip-missing to go on)")
        found.append(FoundDataset(dataset.name, annotations, images, dataset.split(split_variant)))
    if not found:
        raise FileNotFoundError(f"no {title} dataset found under {root}")
    return found


def evaluate_detection(evaluate: Callable[[list[str]], dict], eval_args: list[str], annotation_file: Path,
                       image_dir: Path, save_dir: str, name: str) -> dict:
    """Box AP / AP50 of one COCO-format dataset: ``evaluate`` (``grounding.cli.evaluate``) with ``eval_args`` and
    the dataset's files, logged to ``save_dir/name``."""
    metrics = evaluate([
        *eval_args, "--data.class_path", DETECTION_DATA, "--data.split", "val", "--data.synthetic_root", "null",
        "--data.val_annotations", str(annotation_file), "--data.val_images", str(image_dir),
        "--trainer.logger.init_args.save_dir", save_dir, "--trainer.logger.init_args.name", name,
    ])
    print(f"{name:28s} AP {_shown(metrics['AP'])}  AP50 {_shown(metrics['AP50'])}", flush=True)
    return {"AP": metrics["AP"], "AP50": metrics["AP50"]}


def evaluate_datasets(found: list[FoundDataset], eval_args: list[str], save_dir: str, suite: str = "odinw13",
                      split_variant: SplitVariant = "mini_val") -> dict:
    """Evaluate the datasets ``find_datasets`` found and return the summary (module docstring) without COCO and
    the references."""
    from grounding.cli import evaluate

    size = len(SUITE_DATASETS[suite])
    results = {d.name: evaluate_detection(evaluate, eval_args, d.annotations, d.images, save_dir, d.name) for d in found}
    summary: dict = {"suite": suite, "split_variant": split_variant, "datasets": results,
                     "splits": {d.name: d.split for d in found}, "evaluated": len(results)}
    for key in ("AP", "AP50"):
        defined = [r[key] for r in results.values() if r[key] is not None]
        summary[f"mean_{key}"] = round(sum(defined) / len(defined), 4) if defined else None
        summary[f"mean_{key}_over"] = len(defined)
    if len(results) < size:
        summary["note"] = f"mean over {len(results)} of the {size} datasets"
    return summary


def run(root: str | Path, eval_args: list[str], datasets: list[str] | None = None, skip_missing: bool = False,
        save_dir: str = "runs/odinw", coco_annotations: str | Path | None = None,
        coco_images: str | Path | None = None, suite: str = "odinw13", split_variant: SplitVariant = "mini_val") -> dict:
    """Evaluate every selected dataset of ``suite`` (and COCO when ``coco_annotations`` / ``coco_images`` are
    given) with ``grounding.cli.evaluate`` and return the summary (see the module docstring). A statistic that is
    undefined on a dataset (``null``) is left out of the mean, which says over how many datasets it was taken."""
    from grounding.cli import evaluate

    if (coco_annotations is None) != (coco_images is None):
        raise ValueError("COCO needs both the annotation file and the image folder (--coco-annotations, --coco-images)")
    found = find_datasets(root, suite, datasets, split_variant, skip_missing)  # before the first (long) evaluation
    coco = None
    if coco_annotations is not None:
        coco = (Path(coco_annotations), Path(coco_images))
        problem = missing_coco_file(*coco)
        if problem:
            if not skip_missing:
                raise FileNotFoundError(f"{problem} (--skip-missing to go on)")
            print(f"{problem}: skipped", flush=True)
            coco = None
    summary = evaluate_datasets(found, eval_args, save_dir, suite, split_variant)
    summary["coco"] = None if coco is None else evaluate_detection(evaluate, eval_args, *coco, save_dir, COCO_NAME)
    summary["references"] = REFERENCES
    return summary


def missing_coco_file(annotations: Path, images: Path) -> str | None:
    """``COCO: annotation file not found: PATH`` (or the image folder) when one of the two is missing, else None."""
    if not Path(annotations).is_file():
        return f"COCO: annotation file not found: {annotations}"
    if not Path(images).is_dir():
        return f"COCO: image folder not found: {images}"
    return None


# ---------------------------------------------------------------------------------------------- the table
def _shown(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def mean_label(suite: str, over_ap: int, over_ap50: int) -> str:
    """The mean row's name: ``ODinW-13 mean``, with over how many datasets when fewer than the suite."""
    title, size = SUITE_TITLES[suite], len(SUITE_DATASETS[suite])
    if over_ap == over_ap50 == size:
        return f"{title} mean"
    if over_ap == over_ap50:
        return f"{title} mean (over {over_ap} datasets)"
    return f"{title} mean (AP over {over_ap}, AP50 over {over_ap50} datasets)"


def split_note(suite: str, splits: dict[str, str], references: tuple[str, ...]) -> str:
    """One line: which datasets were read from ``mini_val`` and which split each cited reference used."""
    mini_val = [name for name, split in splits.items() if split == "mini_val"]
    glip = [d.name for d in SUITE_DATASETS[suite] if d.glip_mini_val and d.name in splits]
    if mini_val:
        ours = (f"Splits: mini_val for {', '.join(mini_val)} (--split-variant mini_val, as GLIP evaluates them), "
                "valid for the rest")
    elif glip:
        ours = f"Splits: valid for every dataset (--split-variant valid; GLIP evaluates {', '.join(glip)} on mini_val)"
    else:
        ours = "Splits: valid for every dataset"
    theirs = "; ".join(f"[{number}] {'valid for every dataset' if REFERENCES[key]['split'] == 'valid' else 'does not say'}"
                       for number, key in enumerate(references, start=1))
    return f"{ours}; references: {theirs}."


def table(summary: dict) -> str:
    """The Markdown table of a summary of ``run``: one row per evaluated ODinW dataset, the suite's mean, COCO
    (``not run`` when it was not evaluated); AP and AP50 in percent (``n/a`` where undefined); the reference AP
    of ``REFERENCES`` on the mean and COCO rows, with the sources and the splits below the table."""
    suite = summary.get("suite", "odinw13")
    size = len(SUITE_DATASETS[suite])
    cited = SUITE_REFERENCES[suite]
    variant = summary.get("split_variant", "mini_val")
    splits = summary.get("splits") or {d.name: d.split(variant) for d in SUITE_DATASETS[suite] if d.name in summary["datasets"]}
    rows = [(name, _percent(r["AP"]), _percent(r["AP50"]), "") for name, r in summary["datasets"].items()]
    over_ap, over_ap50 = summary["mean_AP_over"], summary["mean_AP50_over"]
    mean_references = "; ".join(f"{reference_mean(suite, key):.1f} [{number}]" for number, key in enumerate(cited, start=1))
    rows.append((mean_label(suite, over_ap, over_ap50), _percent(summary["mean_AP"]), _percent(summary["mean_AP50"]),
                 mean_references))
    coco = summary.get("coco")
    rows.append(("COCO val2017", *((_percent(coco["AP"]), _percent(coco["AP50"])) if coco else ("not run", "not run")),
                 f"{REFERENCES['mmdetection']['COCO_val2017_AP_percent']:.1f} [1]"))
    lines = ["| dataset | AP (%) | AP50 (%) | reference AP (%) |", "|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    for number, key in enumerate(cited, start=1):
        reference = REFERENCES[key]
        gain = reference.get("gain_over_own_baseline_percent")
        lines.append(f"[{number}] {reference['source']}: {reference['setup']}"
                     + (f"; {gain:.1f} points above its own baseline." if gain is not None else "."))
    if suite == "odinw13":
        lines.append("[1] and [2] come from different models and setups and are not comparable with each other.")
    else:
        lines.append("[1] and [2] are different models and pretraining data, both evaluated by mmdetection.")
    lines.append(split_note(suite, splits, cited))
    if min(over_ap, over_ap50) < size:
        lines.append(f"The mean here is not over all {size} datasets, the {SUITE_TITLES[suite]} references are.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ours, eval_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m grounding.protocols.odinw", description=__doc__.splitlines()[0],
        epilog="Everything after -- goes to grounding-eval for every dataset, e.g. -- --config configs/image/coco.yaml "
               "or -- --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt",
    )
    parser.add_argument("--root", required=True, help="folder holding the ODinW datasets")
    parser.add_argument("--suite", choices=SUITES, default="odinw13", help="the 13 or the 35 datasets (default odinw13)")
    parser.add_argument("--split-variant", choices=SPLIT_VARIANTS, default="mini_val",
                        help="mini_val: the datasets GLIP evaluates on mini_val are read from it (default); valid: "
                             "every dataset from valid, as mmdetection (whose numbers are the references)")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help=f"a subset of the suite's datasets, e.g. {' '.join(NAMES[:2])}")
    parser.add_argument("--skip-missing", action="store_true", help="leave out datasets that are not there")
    parser.add_argument("--save-dir", default="runs/odinw", help="logger folder; one run per dataset inside")
    parser.add_argument("--coco-annotations", default=None, help="COCO instances_val2017.json: evaluate COCO too")
    parser.add_argument("--coco-images", default=None, help="the COCO val2017/ image folder")
    parser.add_argument("--table", default=None, help="also write the Markdown table to this file")
    # the usage argparse writes, with the arguments passed on after "--"
    parser.usage = parser.format_usage().removeprefix("usage: ").rstrip().replace("%", "%%") + " -- <grounding-eval arguments>"
    args = parser.parse_args(ours)
    if (args.coco_annotations is None) != (args.coco_images is None):
        parser.error("--coco-annotations and --coco-images go together")
    summary = run(args.root, eval_args, args.datasets, args.skip_missing, args.save_dir,
                  args.coco_annotations, args.coco_images, args.suite, args.split_variant)
    markdown = table(summary)
    print(markdown, flush=True)
    if args.table:
        write_atomic(args.table, lambda temporary: Path(temporary).write_text(markdown))
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
