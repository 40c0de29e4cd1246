"""Zero-shot ODinW-13 in one command: ``grounding-eval`` on each of the 13 datasets, per-dataset AP and the mean.

    python -m grounding.protocols.odinw --root data/odinw -- --config configs/image/coco.yaml
    python -m grounding.protocols.odinw --root data/odinw --datasets Aquarium pothole -- \\
        --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt

Everything after ``--`` goes to ``grounding-eval`` for every dataset (model, checkpoint, trainer settings); the
driver adds ``--data.val_annotations`` / ``--data.val_images`` of the dataset, ``--data.synthetic_root null``
and a logger folder per dataset (``runs/odinw/<name>``). Each dataset's prompt is built from its own
category names, as GLIP's zero-shot protocol does. The layout under ``--root`` is the one of the public
ODinW release (GLIP / ELEVATER), the validation split with ``annotations_without_background.json``:
``ODINW13`` below lists the relative paths. A missing dataset is an error naming the file it looked for,
unless ``--skip-missing``. Prints a table and ends with one JSON line
``{"datasets": {name: {"AP": .., "AP50": ..}}, "evaluated": n, "mean_AP": .., "mean_AP_over": n, ...}``
(a dataset whose statistic is undefined, ``null``, is left out of that mean).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def run(root: str | Path, eval_args: list[str], datasets: list[str] | None = None, skip_missing: bool = False,
        save_dir: str = "runs/odinw") -> dict:
    """Evaluate every selected dataset with ``grounding.cli.evaluate`` and return the summary (see the module
    docstring). A statistic that is undefined on a dataset (``null``) is left out of the mean, which says over
    how many datasets it was taken."""
    from grounding.cli import evaluate

    unknown = sorted(set(datasets or []) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown ODinW-13 datasets {unknown}; choose from {list(NAMES)}")
    chosen = [entry for entry in ODINW13 if datasets is None or entry[0] in datasets]
    root = Path(root)
    results: dict[str, dict] = {}
    for name, annotations, images in chosen:
        annotation_file, image_dir = root / annotations, root / images
        if not annotation_file.is_file():
            if skip_missing:
                print(f"{name}: skipped, {annotation_file} not found", flush=True)
                continue
            raise FileNotFoundError(f"ODinW dataset {name}: annotation file not found: {annotation_file} (--skip-missing to go on)")
        metrics = evaluate([
            *eval_args, "--data.split", "val", "--data.synthetic_root", "null",
            "--data.val_annotations", str(annotation_file), "--data.val_images", str(image_dir),
            "--trainer.logger.init_args.save_dir", save_dir, "--trainer.logger.init_args.name", name,
        ])
        results[name] = {"AP": metrics["AP"], "AP50": metrics["AP50"]}
        print(f"{name:24s} AP {_shown(metrics['AP'])}  AP50 {_shown(metrics['AP50'])}", flush=True)
    if not results:
        raise FileNotFoundError(f"no ODinW-13 dataset found under {root}")
    summary: dict = {"datasets": results, "evaluated": len(results)}
    for key in ("AP", "AP50"):
        defined = [r[key] for r in results.values() if r[key] is not None]
        summary[f"mean_{key}"] = round(sum(defined) / len(defined), 4) if defined else None
        summary[f"mean_{key}_over"] = len(defined)
    if len(results) < len(chosen) or len(chosen) < len(NAMES):
        summary["note"] = f"mean over {len(results)} of the 13 datasets"
    return summary


def _shown(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ours, eval_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder holding the ODinW datasets")
    parser.add_argument("--datasets", nargs="+", default=None, help=f"a subset of {', '.join(NAMES)}")
    parser.add_argument("--skip-missing", action="store_true", help="leave out datasets that are not there")
    parser.add_argument("--save-dir", default="runs/odinw", help="logger folder; one run per dataset inside")
    args = parser.parse_args(ours)
    summary = run(args.root, eval_args, args.datasets, args.skip_missing, args.save_dir)
    print(f"{'mean':24s} AP {_shown(summary['mean_AP'])}  AP50 {_shown(summary['mean_AP50'])}")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
