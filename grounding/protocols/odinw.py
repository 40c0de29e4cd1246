"""Zero-shot ODinW-13 (and optionally COCO val2017) in one command, one table with reference numbers beside it.

``grounding-eval`` on each dataset, then per-dataset AP, the ODinW-13 mean and COCO beside published figures:

    python -m grounding.protocols.odinw --root data/odinw -- --config configs/image/coco.yaml
    python -m grounding.protocols.odinw --root data/odinw --datasets Aquarium pothole -- \\
        --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt
    python -m grounding.protocols.odinw --root data/odinw \\
        --coco-annotations data/coco/annotations/instances_val2017.json --coco-images data/coco/val2017 \\
        --table results/zero_shot.md -- --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt

Everything after ``--`` goes to ``grounding-eval`` for every dataset (model, checkpoint, trainer settings); the
driver adds ``--data.val_annotations`` / ``--data.val_images`` of the dataset, ``--data.synthetic_root null``
and a logger folder per dataset (``runs/odinw/<name>``, ``runs/odinw/COCO`` for COCO). Each dataset's prompt
is built from its own category names, as GLIP's zero-shot protocol does. The layout under ``--root`` is the
one of the public ODinW release (GLIP / ELEVATER), the validation split with
``annotations_without_background.json``: ``ODINW13`` below lists the relative paths. ``--coco-annotations``
/ ``--coco-images`` (given together: ``instances_val2017.json`` and the ``val2017/`` folder) add COCO to the
same run. A missing dataset (ODinW or COCO) is an error naming the file it looked for, unless
``--skip-missing``; every file is looked for before the first evaluation.

Prints a Markdown table (``table``: AP / AP50 in percent per dataset, the ODinW-13 mean, COCO, and the
``REFERENCES`` where one exists), also written to ``--table PATH`` (atomically), and ends with one JSON line
``{"datasets": {name: {"AP": .., "AP50": ..}}, "evaluated": n, "mean_AP": .., "mean_AP_over": n, ...,
"coco": {"AP": .., "AP50": ..} or null, "references": REFERENCES}`` (values in [0, 1] as ``grounding-eval``
gives them; a dataset whose statistic is undefined, ``null``, is left out of that mean).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grounding.utils import write_atomic

#: (name, annotation file, image folder), relative to the ODinW root
ODINW13: tuple[tuple[str, str, str], ...] = (
    ("AerialMaritimeDrone", "AerialMaritimeDrone/large/valid/annotations_without_background.json", "AerialMaritimeDrone/large/valid"),
    ("Aquarium", "Aquarium/Aquarium Combined.v2-raw-1024.coco/valid/annotations_without_background.json",
     "Aquarium/Aquarium Combined.v2-raw-1024.coco/valid"),
    ("CottontailRabbits", "CottontailRabbits/valid/annotations_without_background.json", "CottontailRabbits/valid"),
    ("EgoHands", "EgoHands/generic/mini_val/annotations_without_background.json", "EgoHands/generic/mini_val"),
    ("NorthAmericaMushrooms", "NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco/valid/annotations_without_background.json",
     "NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco/valid"),
    ("Packages", "Packages/Raw/valid/annotations_without_background.json", "Packages/Raw/valid"),
    ("PascalVOC", "PascalVOC/valid/annotations_without_background.json", "PascalVOC/valid"),
    ("pistols", "pistols/export/val_annotations_without_background.json", "pistols/export"),
    ("pothole", "pothole/valid/annotations_without_background.json", "pothole/valid"),
    ("Raccoon", "Raccoon/Raccoon.v2-raw.coco/valid/annotations_without_background.json", "Raccoon/Raccoon.v2-raw.coco/valid"),
    ("ShellfishOpenImages", "ShellfishOpenImages/raw/valid/annotations_without_background.json", "ShellfishOpenImages/raw/valid"),
    ("thermalDogsAndPeople", "thermalDogsAndPeople/valid/annotations_without_background.json", "thermalDogsAndPeople/valid"),
    ("VehiclesOpenImages", "VehiclesOpenImages/416x416/mini_val/annotations_without_background.json",
     "VehiclesOpenImages/416x416/mini_val"),
)
NAMES = tuple(name for name, _, _ in ODINW13)
COCO_NAME = "COCO"  # logger name of the COCO run

#: Published zero-shot figures shown beside the results, AP in percent as published. The two sources use
#: different models, pretraining and setups: they are not comparable with each other, only each with a run of
#: the same setup. ``mmdetection``: the Swin-T Grounding DINO checkpoint pretrained on O365+GoldG+Cap4M,
#: evaluated zero-shot, as given in mmdetection's Grounding DINO model table (evaluating that checkpoint here
#: should come close: a check that the evaluation is set up right). ``IMAGE``: the zero-shot ODinW-13 figure
#: of the IMAGE paper (adaptive masking), its own model and pretraining, 4.3 points above its own baseline.
REFERENCES: dict[str, dict] = {
    "mmdetection": {
        "source": "mmdetection's Grounding DINO model table",
        "setup": "Swin-T Grounding DINO pretrained on O365+GoldG+Cap4M, zero-shot",
        "COCO_val2017_AP_percent": 48.4,
        "ODinW13_mean_AP_percent": 51.4,
    },
    "IMAGE": {
        "source": "the IMAGE paper (adaptive masking)",
        "setup": "zero-shot, the paper's own model and pretraining (not the mmdetection setup)",
        "ODinW13_mean_AP_percent": 25.1,
        "gain_over_own_baseline_percent": 4.3,
    },
}


def _evaluate_one(evaluate, eval_args: list[str], annotation_file: Path, image_dir: Path, save_dir: str, name: str) -> dict:
    metrics = evaluate([
        *eval_args, "--data.split", "val", "--data.synthetic_root", "null",
        "--data.val_annotations", str(annotation_file), "--data.val_images", str(image_dir),
        "--trainer.logger.init_args.save_dir", save_dir, "--trainer.logger.init_args.name", name,
    ])
    print(f"{name:24s} AP {_shown(metrics['AP'])}  AP50 {_shown(metrics['AP50'])}", flush=True)
    return {"AP": metrics["AP"], "AP50": metrics["AP50"]}


def run(root: str | Path, eval_args: list[str], datasets: list[str] | None = None, skip_missing: bool = False,
        save_dir: str = "runs/odinw", coco_annotations: str | Path | None = None,
        coco_images: str | Path | None = None) -> dict:
    """Evaluate every selected dataset (and COCO when ``coco_annotations`` / ``coco_images`` are given) with
    ``grounding.cli.evaluate`` and return the summary (see the module docstring). A statistic that is undefined
    on a dataset (``null``) is left out of the mean, which says over how many datasets it was taken."""
    from grounding.cli import evaluate

    unknown = sorted(set(datasets or []) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown ODinW-13 datasets {unknown}; choose from {list(NAMES)}")
    if (coco_annotations is None) != (coco_images is None):
        raise ValueError("COCO needs both the annotation file and the image folder (--coco-annotations, --coco-images)")
    chosen = [entry for entry in ODINW13 if datasets is None or entry[0] in datasets]
    root = Path(root)
    present = []  # every file is looked for before the first (long) evaluation
    for name, annotation_path, image_path in chosen:
        annotation_file, image_dir = root / annotation_path, root / image_path
        if not annotation_file.is_file():
            if skip_missing:
                print(f"{name}: skipped, {annotation_file} not found", flush=True)
                continue
            raise FileNotFoundError(f"ODinW dataset {name}: annotation file not found: {annotation_file} (--skip-missing to go on)")
        present.append((name, annotation_file, image_dir))
    if not present:
        raise FileNotFoundError(f"no ODinW-13 dataset found under {root}")
    coco = None
    if coco_annotations is not None:
        coco = (Path(coco_annotations), Path(coco_images))
        for kind, path, exists in (("annotation file", coco[0], coco[0].is_file()), ("image folder", coco[1], coco[1].is_dir())):
            if not exists:
                if not skip_missing:
                    raise FileNotFoundError(f"COCO: {kind} not found: {path} (--skip-missing to go on)")
                print(f"{COCO_NAME}: skipped, {path} not found", flush=True)
                coco = None
                break

    results = {name: _evaluate_one(evaluate, eval_args, annotation_file, image_dir, save_dir, name)
               for name, annotation_file, image_dir in present}
    summary: dict = {"datasets": results, "evaluated": len(results)}
    for key in ("AP", "AP50"):
        defined = [r[key] for r in results.values() if r[key] is not None]
        summary[f"mean_{key}"] = round(sum(defined) / len(defined), 4) if defined else None
        summary[f"mean_{key}_over"] = len(defined)
    if len(results) < len(chosen) or len(chosen) < len(NAMES):
        summary["note"] = f"mean over {len(results)} of the 13 datasets"
    summary["coco"] = None if coco is None else _evaluate_one(evaluate, eval_args, *coco, save_dir, COCO_NAME)
    summary["references"] = REFERENCES
    return summary


def _shown(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def table(summary: dict) -> str:
    """The Markdown table of a summary of ``run``: one row per evaluated ODinW dataset, the ODinW-13 mean, COCO
    (``not run`` when it was not evaluated); AP and AP50 in percent (``n/a`` where undefined); the reference AP
    of ``REFERENCES`` on the mean and COCO rows, with the sources below the table."""
    mmdet, image = REFERENCES["mmdetection"], REFERENCES["IMAGE"]
    rows = [(name, _percent(r["AP"]), _percent(r["AP50"]), "") for name, r in summary["datasets"].items()]
    over_ap, over_ap50 = summary["mean_AP_over"], summary["mean_AP50_over"]
    if over_ap == over_ap50 == len(NAMES):
        mean_label = "ODinW-13 mean"
    elif over_ap == over_ap50:
        mean_label = f"ODinW-13 mean (over {over_ap} datasets)"
    else:
        mean_label = f"ODinW-13 mean (AP over {over_ap}, AP50 over {over_ap50} datasets)"
    rows.append((mean_label, _percent(summary["mean_AP"]), _percent(summary["mean_AP50"]),
                 f"{mmdet['ODinW13_mean_AP_percent']:.1f} [1]; {image['ODinW13_mean_AP_percent']:.1f} [2]"))
    coco = summary.get("coco")
    rows.append(("COCO val2017", *((_percent(coco["AP"]), _percent(coco["AP50"])) if coco else ("not run", "not run")),
                 f"{mmdet['COCO_val2017_AP_percent']:.1f} [1]"))
    lines = ["| dataset | AP (%) | AP50 (%) | reference AP (%) |", "|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [
        "",
        f"[1] {mmdet['source']}: {mmdet['setup']}.",
        f"[2] {image['source']}: {image['setup']}; {image['gain_over_own_baseline_percent']:.1f} points above its own "
        "baseline.",
        "[1] and [2] come from different models and setups and are not comparable with each other.",
    ]
    if min(over_ap, over_ap50) < len(NAMES):
        lines.append(f"The mean here is not over all {len(NAMES)} datasets, the ODinW-13 references are.")
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
    parser.add_argument("--datasets", nargs="+", default=None, help=f"a subset of {', '.join(NAMES)}")
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
                  args.coco_annotations, args.coco_images)
    markdown = table(summary)
    print(markdown, flush=True)
    if args.table:
        write_atomic(args.table, lambda temporary: Path(temporary).write_text(markdown))
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
