"""The training-free segmentation protocol in one command: every dataset × method × preset, one Markdown table.

    python -m grounding.protocols.segmentation --root data --methods gem sclip clearclip naclip maskclip \\
        --table results/training_free.md --out runs/training_free
    python -m grounding.protocols.segmentation --root data --datasets voc21 context60 --methods naclip \\
        --presets sclip --pamr both --table results/naclip.md --out runs/naclip -- --trainer.devices 2
    python -m grounding.protocols.segmentation --datasets synthetic --methods gem maskclip --table synthetic.md \\
        --out runs/protocol_synthetic -- --model.backbone tiny --model.depth 3 --trainer.accelerator cpu

Every cell (``Cell``: a dataset, a method of ``grounding.models.gem.METHODS``, a preset of
``grounding.lightning.gem_module.PRESETS``, with or without PAMR) is one ``grounding-eval`` of the dataset's
config (``DATASETS``) in its own process, with, in this order:

1. ``--config configs/gem/<dataset>.yaml``;
2. the preset's settings for that dataset (``preset_settings``: ``PRESETS`` then the dataset's own values, e.g.
   Cityscapes' shorter side 560 and VOC21's logit scale, probability threshold and area threshold under ``sclip``),
   each written out (the dataset configs state GEM's values, which an explicit setting would keep);
3. the arguments after ``--`` (the backbone, ``--trainer.devices 2`` for DDP, ...): they may change the settings of
   step 2 (the report and the table then say what ran), not those of step 4;
4. the cell's own: ``--model.method``, ``--model.preset``, ``--model.pamr`` (with PAMR), the class words
   (``--data.synonyms``: the dataset's synonyms file under ``sclip``, plain class names under ``gem``, as each
   protocol prompts), the data paths (every path of the config's data section under ``data/`` moved under
   ``--root``) and the logger folder ``<--out>/<cell>``.

The cells run one after the other; ``<out>/cells.json`` lists them with their arguments. A cell's summary (the
JSON line grounding-eval prints) is kept in ``<out>/<cell>/summary.json`` and a cell that has one is skipped, so
the same command resumes an interrupted run; the output of a cell goes to ``<out>/<cell>/eval.out`` /
``eval.err``; a failing cell leaves ``<out>/<cell>/error.txt``, the others go on, and the command exits with
status 1 at the end (the machinery of ``grounding.protocols.sweep``).

The table (``table``; printed, written to ``<out>/table.md`` and, atomically, to ``--table``): one row per method ×
preset (× PAMR), one column per dataset, the mIoU in percent and its mean over the datasets the row finished;
under each method's rows the published ViT-B/16 figures of ``PUBLISHED`` (a dataset no source gives stays empty),
their sources and protocols named below the table. The last line printed is one JSON object: the cells with
their scores, the rows' means and the references.

``--datasets synthetic`` runs the project's synthetic segmentation set (``configs/gem/synthetic.yaml``,
``<root>/synthetic``, generated there on first use), the offline check of the whole command.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from grounding.protocols.sweep import CellKind, Runner, run_cell, run_module, save_cells
from grounding.utils import write_atomic

PRESET_NAMES: tuple[str, ...] = ("gem", "sclip")  # grounding.lightning.gem_module.PRESETS
PAMR_CHOICES: tuple[str, ...] = ("off", "on", "both")


@dataclass(frozen=True)
class ProtocolDataset:
    """One benchmark: its config, the built-in synonyms file of its classes (``data.synonyms``), and what it sets
    beyond each preset (``settings[preset]``: GEMSegmentationModule settings)."""

    title: str
    config: str  # relative to configs/
    synonyms: str | None
    settings: dict[str, dict] = field(default_factory=dict)


#: The eight benchmarks (in the order the papers' tables use) and the synthetic set. The ``sclip`` values are those
#: of SCLIP's configs (its ``configs/cfg_*.py``): a shorter side of 336 except Cityscapes (560) and COCO-Stuff
#: (448); on the datasets with background, ``logit_scale`` and ``prob_thd`` (VOC21 65 / 0.1 and ``area_thd`` 0.1,
#: Context-60 and COCO-Object 50 / 0.1), elsewhere its defaults (40, 0). NACLIP's configs differ only there (logit
#: scale 40 everywhere, no area threshold); docs/gem.md lists both.
DATASETS: dict[str, ProtocolDataset] = {
    "voc21": ProtocolDataset("VOC21", "gem/voc.yaml", "voc21",
                             {"sclip": {"logit_scale": 65.0, "background_threshold": 0.1, "background_area": 0.1}}),
    "context60": ProtocolDataset("Context60", "gem/context60.yaml", "context60",
                                 {"sclip": {"logit_scale": 50.0, "background_threshold": 0.1}}),
    "coco_object": ProtocolDataset("Object", "gem/coco_object_stuff.yaml", "coco_object",
                                   {"sclip": {"logit_scale": 50.0, "background_threshold": 0.1}}),
    "voc20": ProtocolDataset("VOC20", "gem/voc20.yaml", "voc20"),
    "context59": ProtocolDataset("Context59", "gem/context.yaml", "context59"),
    "coco_stuff": ProtocolDataset("Stuff", "gem/coco_stuff.yaml", "coco_stuff", {"sclip": {"short_side": 448}}),
    "cityscapes": ProtocolDataset("Cityscapes", "gem/cityscapes.yaml", "cityscapes", {"sclip": {"short_side": 560}}),
    "ade20k": ProtocolDataset("ADE20K", "gem/ade20k.yaml", "ade20k"),
    "synthetic": ProtocolDataset("synthetic", "gem/synthetic.yaml", None),
}
EIGHT: tuple[str, ...] = tuple(name for name in DATASETS if name != "synthetic")


# ------------------------------------------------------------------------------------------------ references
@dataclass(frozen=True)
class Published:
    """A method's published mIoU (percent, CLIP ViT-B/16) on the protocol; ``datasets`` holds the per-dataset
    figures a source gives (keys of ``DATASETS``), ``mean`` the published average over the eight."""

    method: str
    pamr: bool
    mean: float
    datasets: dict[str, float]
    source: str
    protocol: str


SCLIP_PROTOCOL = ("SCLIP's: shorter side 336 (Cityscapes 560, COCO-Stuff 448), 224 px windows at stride 112, "
                  "CLIP's 80 templates, synonyms, a probability threshold on VOC21 / Context60 / Object")
PUBLISHED: tuple[Published, ...] = (
    Published("maskclip", False, 30.3,
              {"voc21": 43.4, "context60": 23.2, "coco_object": 20.6, "voc20": 74.9, "context59": 26.4,
               "coco_stuff": 16.7, "cityscapes": 24.9, "ade20k": 11.9},
              "MaskCLIP as evaluated by SCLIP (Wang et al., ECCV 2024) and compared by NACLIP (Hajimiri et al., "
              "WACV 2025)", SCLIP_PROTOCOL),
    Published("gem", False, 38.3, {}, "GEM as compared by NACLIP (Hajimiri et al., WACV 2025); per-dataset figures "
              "not given here", SCLIP_PROTOCOL),
    Published("sclip", False, 38.2,
              {"voc21": 59.1, "context60": 30.4, "coco_object": 30.5, "voc20": 80.4, "context59": 34.2,
               "coco_stuff": 22.4, "cityscapes": 32.2, "ade20k": 16.1},
              "SCLIP (Wang et al., ECCV 2024)", SCLIP_PROTOCOL),
    Published("clearclip", False, 38.1,
              {"voc21": 51.8, "context60": 32.6, "coco_object": 33.0, "voc20": 80.9, "context59": 35.9,
               "coco_stuff": 23.9, "cityscapes": 30.0, "ade20k": 16.7},
              "ClearCLIP (Lan et al., ECCV 2024)",
              "ClearCLIP's: shorter side 448, 448 px windows at stride 224, CLIP's 80 templates, synonyms, logit "
              "scale 50, its own probability thresholds"),
    Published("naclip", False, 39.4,
              {"voc21": 58.9, "context60": 32.2, "coco_object": 33.2, "voc20": 79.7, "context59": 35.2,
               "coco_stuff": 23.3, "cityscapes": 35.5, "ade20k": 17.4},
              "NACLIP (Hajimiri et al., WACV 2025), without post-processing",
              SCLIP_PROTOCOL + " (NACLIP: logit scale 40 everywhere, no area threshold)"),
    Published("naclip", True, 42.5,
              {"voc21": 64.07, "context60": 34.99, "coco_object": 36.19, "voc20": 83.03, "context59": 38.35,
               "coco_stuff": 25.69, "cityscapes": 38.27, "ade20k": 19.05},
              "NACLIP (Hajimiri et al., WACV 2025) with PAMR: the mean from the paper, the per-dataset figures "
              "from its repository's README (default setup, mean 42.46)",
              SCLIP_PROTOCOL + " (NACLIP: logit scale 40 everywhere, no area threshold), PAMR 10 iterations"),
)


def published(method: str, pamr: bool) -> Published | None:
    """The published figures of ``method`` (with PAMR or not), None when there are none."""
    return next((p for p in PUBLISHED if p.method == method and p.pamr == pamr), None)


# ------------------------------------------------------------------------------------------------ the cells
@dataclass(frozen=True)
class Cell:
    """One grounding-eval run: ``dataset`` (a key of ``DATASETS``) × ``method`` × ``preset``, PAMR or not."""

    dataset: str
    method: str
    preset: str
    pamr: bool = False

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.method}-{self.preset}" + ("-pamr" if self.pamr else "")


def _repeated(option: str, values: list[str]) -> None:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{option}: {repeated} given more than once")


def cells(datasets: list[str], methods: list[str], presets: list[str], pamr: str = "off") -> list[Cell]:
    """The grid, dataset-major (then preset, method, PAMR off before on); an unknown or repeated name is an error
    naming its option."""
    from grounding.models.gem import METHODS

    for option, values, known in (("--datasets", datasets, tuple(DATASETS)), ("--methods", methods, METHODS),
                                  ("--presets", presets, PRESET_NAMES)):
        if not values:
            raise ValueError(f"{option}: give at least one of {', '.join(known)}")
        unknown = [v for v in values if v not in known]
        if unknown:
            raise ValueError(f"{option}: unknown {unknown}; choose from {', '.join(known)}")
        _repeated(option, list(values))
    if pamr not in PAMR_CHOICES:
        raise ValueError(f"--pamr: {pamr!r} is not one of {', '.join(PAMR_CHOICES)}")
    refinements = {"off": (False,), "on": (True,), "both": (False, True)}[pamr]
    return [Cell(d, m, p, r) for d in datasets for p in presets for m in methods for r in refinements]


def dataset_settings(preset: str, dataset: str) -> dict:
    """The GEMSegmentationModule settings of ``preset`` on ``dataset``: the preset's (``PRESETS``) with the
    dataset's own values over them; window 0 is the whole image."""
    from grounding.lightning.gem_module import PRESETS

    settings = asdict(PRESETS[preset])
    settings.pop("templates")  # left to the preset (None): 80 sentences do not belong on a command line
    settings.update(DATASETS[dataset].settings.get(preset, {}))
    return settings


def _flag_value(value) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)


def config_file(dataset: str) -> Path:
    """The dataset's config file (``configs/<config>``, shipped in the package as ``grounding/configs``)."""
    from grounding.cli import CONFIG_ROOT

    return CONFIG_ROOT / DATASETS[dataset].config


def data_paths(config: Path, root: str | Path) -> list[str]:
    """``--data.<key> <root>/<rest>`` for every setting of ``config``'s data section that is a path under ``data/``
    (the configs' layout; ``--root`` says where that folder is)."""
    try:
        document = yaml.safe_load(Path(config).read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset config not found: {config}") from None
    data = (document.get("data") or {}).get("init_args") or {}
    flags = []
    for key, value in data.items():
        if isinstance(value, str) and value.startswith("data/"):
            flags += [f"--data.{key}", str(Path(root) / value.removeprefix("data/"))]
    return flags


#: what a cell sets itself; the arguments after -- may not (a summary would then say less than what ran)
OWNED_FLAGS = ("--config", "-c", "--model.method", "--model.preset", "--model.pamr", "--data.synonyms",
               "--trainer.logger.init_args.save_dir")


def check_eval_args(eval_args: list[str]) -> None:
    """A ValueError naming the first argument that sets what every cell sets itself (``OWNED_FLAGS``)."""
    for arg in eval_args:
        flag = arg.split("=", 1)[0].replace("--model.init_args.", "--model.").replace("--data.init_args.", "--data.")
        if flag in OWNED_FLAGS:
            raise ValueError(f"the arguments after -- set {flag}, which the protocol sets for every cell; leave it out")


def cell_args(cell: Cell, root: str | Path, eval_args: list[str], out: str | Path) -> list[str]:
    """The grounding-eval arguments of one cell, in the order of the module docstring."""
    config = config_file(cell.dataset)
    preset_flags = [arg for key, value in dataset_settings(cell.preset, cell.dataset).items()
                    for arg in (f"--model.{key}", _flag_value(value))]
    own = ["--model.method", cell.method, "--model.preset", cell.preset]
    if cell.pamr:
        own += ["--model.pamr", "true"]
    synonyms = DATASETS[cell.dataset].synonyms
    if synonyms is not None:  # sclip prompts the published synonyms, gem the class names
        own += ["--data.synonyms", synonyms if cell.preset == "sclip" else "null"]
    own += [*data_paths(config, root), "--trainer.logger.init_args.save_dir", str(Path(out) / cell.name)]
    return ["--config", str(config), *preset_flags, *eval_args, *own]


# ------------------------------------------------------------------------------------------------ running
def run_evaluation(args: list[str], cell_dir: Path):
    """grounding-eval in a new process (``python -m grounding.protocols.segmentation --evaluate -- ARGS``, which
    Lightning's DDP launcher can restart as it is), its output in ``cell_dir/eval.out`` and ``eval.err``."""
    return run_module(["grounding.protocols.segmentation", "--evaluate"], args, cell_dir, "eval")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


EVALUATION = CellKind("evaluating", "eval", "run_dir", lambda summary: f"mIoU {_percent(summary.get('mIoU'))}")


def run_protocol(cell_list: list[Cell], root: str | Path, eval_args: list[str], out: str | Path,
                 runner: Runner = run_evaluation) -> dict:
    """Every cell in turn (skipped when finished), then the summary (``summarize``) and the table in
    ``<out>/table.md``; returns the summary, its "failed" the cells that failed."""
    check_eval_args(eval_args)
    entries = [{"name": c.name, **asdict(c), "args": cell_args(c, root, eval_args, out)} for c in cell_list]
    save_cells(entries, out)
    failed = [entry["name"] for entry in entries if run_cell(entry, out, runner, EVALUATION) == "failed"]
    summary = summarize(cell_list, out)
    summary["failed"] = failed
    markdown = table(summary)
    write_atomic(Path(out) / "table.md", lambda path: Path(path).write_text(markdown))
    return summary


# ------------------------------------------------------------------------------------------------ the table
def _row_key(cell: Cell) -> str:
    return f"{cell.method} | {cell.preset}" + (" | PAMR" if cell.pamr else "")


def summarize(cell_list: list[Cell], out: str | Path) -> dict:
    """The finished cells' scores: ``{"datasets": [...], "cells": [{cell, "mIoU", "mAcc", "run_dir"} or the
    cell with "mIoU" None when unfinished], "rows": [{"method", "preset", "pamr", "mIoU": {dataset: value},
    "mean", "over"}]}`` (values in [0, 1]; the mean over the datasets the row finished, ``over`` of them; rows by
    method, then without / with PAMR, then preset, in the order given)."""
    datasets = list(dict.fromkeys(c.dataset for c in cell_list))
    results, rows = [], {}
    for cell in cell_list:
        path = Path(out) / cell.name / "summary.json"
        scores = json.loads(path.read_text()) if path.is_file() else {}
        results.append({"name": cell.name, **asdict(cell), "mIoU": scores.get("mIoU"), "mAcc": scores.get("mAcc"),
                        "run_dir": scores.get("run_dir")})
        row = rows.setdefault(_row_key(cell), {"method": cell.method, "preset": cell.preset, "pamr": cell.pamr,
                                               "mIoU": {}})
        if scores.get("mIoU") is not None:
            row["mIoU"][cell.dataset] = scores["mIoU"]
    for row in rows.values():
        values = list(row["mIoU"].values())
        row["mean"] = round(sum(values) / len(values), 6) if values else None
        row["over"] = len(values)
    methods = list(dict.fromkeys(c.method for c in cell_list))
    presets = list(dict.fromkeys(c.preset for c in cell_list))
    ordered = sorted(rows.values(), key=lambda r: (methods.index(r["method"]), r["pamr"], presets.index(r["preset"])))
    return {"datasets": datasets, "cells": results, "rows": ordered}


def _published_cell(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def table(summary: dict) -> str:
    """The Markdown table of ``summarize``'s summary (module docstring): measured rows in percent (2 decimals,
    "—" where a cell did not finish), each method's published row under its rows, the sources below."""
    datasets = summary["datasets"]
    header = ["method", "preset", *(DATASETS[d].title for d in datasets), "mean"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(datasets) + 1)]
    cited: list[Published] = []
    rows = summary["rows"]
    for index, row in enumerate(rows):
        name = row["method"] + (" + PAMR" if row["pamr"] else "")
        values = [_percent(row["mIoU"][d]) if d in row["mIoU"] else "—" for d in datasets]
        mean = _percent(row["mean"]) + ("" if row["over"] in (0, len(datasets)) else f" (over {row['over']})")
        lines.append(f"| {name} | {row['preset']} | " + " | ".join(values) + f" | {mean if row['over'] else '—'} |")
        last_of_method = index + 1 == len(rows) or (rows[index + 1]["method"], rows[index + 1]["pamr"]) != (
            row["method"], row["pamr"])
        reference = published(row["method"], row["pamr"])
        if last_of_method and reference is not None:
            if reference not in cited:
                cited.append(reference)
            figures = [_published_cell(reference.datasets.get(d)) for d in datasets]
            lines.append(f"| published [{cited.index(reference) + 1}] | ViT-B/16 | " + " | ".join(figures)
                         + f" | {reference.mean:.1f} (eight) |")
    lines.append("")
    lines.append("mIoU in percent; each run row with the backbone and settings its cells ran with (their reports).")
    for number, reference in enumerate(cited, start=1):
        lines.append(f"[{number}] {reference.source}; protocol: {reference.protocol}.")
    if cited:
        lines.append("A published mean is over the eight benchmarks; an empty published cell is a figure not sourced here.")
    if summary.get("failed"):
        lines.append(f"Failed cells (see their error.txt): {', '.join(summary['failed'])}.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ command line
def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options (before ``--``) and the grounding-eval arguments (after it)."""
    ours, eval_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m grounding.protocols.segmentation", description=__doc__.splitlines()[0],
        epilog="Everything after -- goes to grounding-eval for every cell, e.g. -- --trainer.devices 2",
    )
    parser.add_argument("--root", default="data", help="the folder the configs' data/ paths are under (default data)")
    parser.add_argument("--datasets", nargs="+", default=list(EIGHT),
                        help=f"default: the eight ({' '.join(EIGHT)}); or synthetic")
    parser.add_argument("--methods", nargs="+", default=["gem"], help="methods of grounding.models.gem (default gem)")
    parser.add_argument("--presets", nargs="+", default=["sclip"], help="gem and / or sclip (default sclip)")
    parser.add_argument("--pamr", nargs="?", const="on", default="off", choices=PAMR_CHOICES,
                        help="refine the maps with PAMR: --pamr (on), --pamr both (a row without and one with)")
    parser.add_argument("--out", help="folder of the runs: one per cell, cells.json, table.md")
    parser.add_argument("--table", default=None, help="also write the Markdown table to this file")
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)  # one cell's process
    # the usage argparse writes, with the arguments passed on after "--"
    parser.usage = parser.format_usage().removeprefix("usage: ").rstrip().replace("%", "%%") + " -- <grounding-eval arguments>"
    args = parser.parse_args(ours)
    if not args.evaluate and not args.out:
        parser.error("--out is required")
    return args, eval_args


def main(argv: list[str] | None = None, runner: Runner = run_evaluation) -> int:
    """The command line (module docstring); returns the exit status, 1 when a cell failed. ``runner`` runs one
    cell's grounding-eval (a new process; tests pass another)."""
    args, eval_args = parse(sys.argv[1:] if argv is None else argv)
    if args.evaluate:
        from grounding.cli import evaluate

        evaluate(eval_args)
        return 0
    try:  # a setting the protocol rejects is one line naming it, not a traceback
        cell_list = cells(args.datasets, args.methods, args.presets, args.pamr)
        summary = run_protocol(cell_list, args.root, eval_args, args.out, runner)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"segmentation protocol: {error}") from None
    markdown = table(summary)
    print(markdown, flush=True)
    if args.table:
        write_atomic(args.table, lambda path: Path(path).write_text(markdown))
    if summary["failed"]:
        print(f"{len(summary['failed'])} of {len(cell_list)} cells failed: {', '.join(summary['failed'])}", flush=True)
    summary["references"] = [asdict(reference) for reference in PUBLISHED]
    print(json.dumps(summary), flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
