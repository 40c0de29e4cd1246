"""How much a fine-tuning method forgets: novel AP50 gained against base AP50 kept, one table and one plot.

    python -m grounding.protocols.forgetting --out forgetting/synthetic            # the synthetic split, 3 seeds
    python -m grounding.protocols.forgetting --out forgetting/coco --pretrained IDEA-Research/grounding-dino-tiny \\
        --novel-train A.json IMAGES --novel-val B.json IMAGES --base odinw C.json IMAGES -- --config image/coco.yaml

A detector that detects the *base* categories (the stand-in for a pretrained zero-shot model) is fine-tuned on
*novel* categories by each method; every fine-tuned model is scored on the novel validation set (what
fine-tuning is for) and on the base one (what it forgets). Methods (``--methods``):

- ``full``: every part trains (``--model.freeze []``);
- ``lora``: LoRA adapters (``--model.lora.r 8``, the heads trainable; ``grounding.models.lora``);
- ``frozen_backbone``: the image backbone frozen (``--model.freeze [backbone]``);
- ``frozen_backbone_text`` (only when named): the image backbone and the text encoder frozen, so that the base
  categories' names keep their features (``--model.freeze [backbone, text_encoder]``);
- ``ema``: ``full`` with a moving average of the weights (``grounding.lightning.ema.WeightEMA``, ``--ema-decay``),
  which is what is evaluated;
- ``wise``: WiSE-FT, the weights ``(1 − α) θ_base + α θ_full`` of each seed's ``full`` run (``--wise-alpha``,
  0.5 by default, or several values: one row each; ``grounding.protocols.weight_ensemble``): no training of its own;
- ``wise_frozen_backbone``: the same interpolation of each seed's ``frozen_backbone`` run (the backbone, frozen,
  stays the base model's; the rest moves a share α of the way).

Default (no ``--pretrained``): the synthetic set (``--synthetic-root``, generated when absent) split by category:
every second category id is *novel*, the others *base* (``--novel-categories`` to choose). ``OUT/data/`` gets
four COCO files (base / novel × train / val): each keeps the images holding at least one object of its half and
only that half's objects and categories (so a model is prompted with its half's names only). The base objects in
the novel training images are then unannotated, as in real fine-tuning data, and fine-tuning learns them as
background; ``--novel-images novel-only`` keeps only the novel training images without any base object, so that
what is forgotten comes from the weights' drift alone. The base model is
the tiny detector trained on the base half (``--base-epochs``) and exported (``grounding-export``) to
``OUT/base/model``, which every fine-tune starts from (``--model.model``).

With ``--pretrained MODEL`` (a hub id or a folder ``--model.model`` takes, or a Lightning ``.ckpt`` of the
detector, exported first) the novel set is ``--novel-train`` / ``--novel-val`` (COCO file and image folder each)
and the base sets one or more ``--base NAME FILE IMAGES`` (e.g. ODinW or COCO val); base AP50 is their mean.

Every training is ``grounding-train`` in its own process (``--seeds``: one fine-tune per method and seed, seed
also the data order's), with the arguments after ``--``, then the protocol's own (data files, epochs, the method's
flags, ``grounding.lightning.step_stats.StepStats``, the run folder). A finished cell leaves ``OUT/<cell>/result.json``
and is skipped on the next run (an interrupted protocol resumes); a failed one leaves ``error.txt``, the others go
on and the exit status is 1.

Output: ``OUT/table.md`` / ``table.csv`` (one row per method: novel AP50 and base AP50 as mean ± sample std over
the seeds, the base AP50 kept relative to the base model, the novel AP50 relative to ``full``, trainable
parameters, median step time and peak memory of training; the base model's row first), ``OUT/forgetting.png``
(novel AP50 against base AP50, one point per method with its seed spread as error bars, dashed lines at the
goal's thresholds below), one JSON line at the
end with every figure and ``meets_goal``: the methods that keep ≥ 80 % of the base model's base AP50 while
reaching ≥ 90 % of full fine-tuning's novel AP50.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from grounding.protocols.sweep import run_training, summary_line
from grounding.utils import write_atomic, write_json_atomic

METHODS = ("full", "lora", "frozen_backbone", "frozen_backbone_text", "ema", "wise", "wise_frozen_backbone")
#: what runs without --methods (frozen_backbone_text on demand)
DEFAULT_METHODS = ("full", "lora", "frozen_backbone", "ema", "wise", "wise_frozen_backbone")
#: each weight-space ensemble and the fine-tune whose weights it interpolates with the base model's
WISE_SOURCES = {"wise": "full", "wise_frozen_backbone": "frozen_backbone"}
#: each trained method's own grounding-train flags
METHOD_FLAGS = {
    "full": ["--model.freeze", "[]"],
    "lora": ["--model.lora.r", "8", "--model.lora.alpha", "16"],
    "frozen_backbone": ["--model.freeze", "[backbone]"],
    "frozen_backbone_text": ["--model.freeze", "[backbone, text_encoder]"],
    "ema": ["--model.freeze", "[]", "--trainer.callbacks+=grounding.lightning.ema.WeightEMA"],
}
DEFAULT_SEEDS = (0, 1, 2)
#: the goal: a method keeping this much of the base AP50 while reaching this much of full fine-tuning's novel AP50
GOAL_BASE_KEPT, GOAL_NOVEL_OF_FULL = 0.80, 0.90
STDERR_LINES = 40
#: (train args, cell folder) -> the finished process (stdout: the summary line); tests pass a fake one
Runner = Callable[[list[str], Path], subprocess.CompletedProcess]
#: grounding-eval arguments -> its metrics
Evaluator = Callable[[list[str]], dict]


@dataclass(frozen=True)
class Split:
    """One evaluation or training set: a COCO instances file and its image folder."""

    annotations: str
    images: str

    def train_flags(self) -> list[str]:
        return ["--data.train_annotations", self.annotations, "--data.train_images", self.images]

    def val_flags(self) -> list[str]:
        return ["--data.val_annotations", self.annotations, "--data.val_images", self.images]


# ------------------------------------------------------------------------------------------ the category split
def split_by_category(coco: dict, keep: set[int]) -> dict:
    """A COCO instances dict reduced to the categories ``keep``: their annotations, the images holding at least
    one of them, those categories only (ids and names unchanged)."""
    annotations = [a for a in coco["annotations"] if a["category_id"] in keep]
    image_ids = {a["image_id"] for a in annotations}
    reduced = {key: value for key, value in coco.items() if key not in ("images", "annotations", "categories")}
    reduced["images"] = [image for image in coco["images"] if image["id"] in image_ids]
    reduced["annotations"] = annotations
    reduced["categories"] = [c for c in coco["categories"] if c["id"] in keep]
    return reduced


def without_images_of(reduced: dict, coco: dict, categories: set[int]) -> dict:
    """``reduced`` without the images that hold an object of ``categories`` in the full ``coco``."""
    holding = {a["image_id"] for a in coco["annotations"] if a["category_id"] in categories}
    return {**reduced, "images": [i for i in reduced["images"] if i["id"] not in holding],
            "annotations": [a for a in reduced["annotations"] if a["image_id"] not in holding]}


def novel_categories(categories: Sequence[dict], chosen: Sequence[str] | None) -> set[int]:
    """Ids of the novel categories: the named ones, or every second id in id order (the 2nd, 4th, ...)."""
    by_name = {c["name"]: c["id"] for c in categories}
    if chosen:
        unknown = [name for name in chosen if name not in by_name]
        if unknown:
            raise ValueError(f"--novel-categories: {unknown} are not categories of the dataset ({sorted(by_name)})")
        novel = {by_name[name] for name in chosen}
    else:
        novel = {c["id"] for i, c in enumerate(sorted(categories, key=lambda c: c["id"])) if i % 2 == 1}
    if not novel or len(novel) == len(categories):
        raise ValueError(f"--novel-categories must leave both halves non-empty (categories: {sorted(by_name)})")
    return novel


def write_synthetic_split(root: str | Path, out: Path, chosen: Sequence[str] | None,
                          novel_images: str = "all") -> dict[str, Split]:
    """``out/{base,novel}_{train,val}.json`` from the synthetic set at ``root`` (generated when absent).

    novel_images: ``all``: the novel training set has every image holding a novel object, base objects in them
    unannotated (as in real fine-tuning data: the model learns them as background); ``novel-only``: only the
    images without any base object (forgetting by the weights' drift alone)."""
    from grounding.data.synthetic import prepare_synthetic

    prepare_synthetic(root)  # generated with the default settings when absent, used as it is otherwise
    root = Path(root)
    splits: dict[str, Split] = {}
    novel = None
    for split in ("train", "val"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        novel = novel_categories(coco["categories"], chosen) if novel is None else novel
        base = {c["id"] for c in coco["categories"]} - novel
        for half, keep in (("base", base), ("novel", novel)):
            path = out / f"{half}_{split}.json"
            reduced = split_by_category(coco, keep)
            if half == "novel" and split == "train" and novel_images == "novel-only":
                reduced = without_images_of(reduced, coco, base)
            write_json_atomic(path, reduced)
            splits[f"{half}_{split}"] = Split(str(path), str(root / "images" / split))
    return splits


# ------------------------------------------------------------------------------------------ cells
def run_cell(name: str, out: Path, work: Callable[[Path], dict]) -> dict | None:
    """``work(cell folder)`` unless ``out/name/result.json`` exists; the result, or None when it failed
    (``error.txt`` says why)."""
    cell = out / name
    result_file, error_file = cell / "result.json", cell / "error.txt"
    if result_file.is_file():
        print(f"{name}: done before, {result_file}", flush=True)
        return json.loads(result_file.read_text())
    cell.mkdir(parents=True, exist_ok=True)
    try:
        result = work(cell)
    except CellFailed as error:
        text = f"{error}\n"
        write_atomic(error_file, lambda path: Path(path).write_text(text))
        print(f"{name}: FAILED, see {error_file}", flush=True)
        return None
    write_json_atomic(result_file, result, indent=1)
    error_file.unlink(missing_ok=True)
    print(f"{name}: novel AP50 {_shown(result['novel']['AP50'])}, base AP50 {_shown(result['base']['AP50'])}", flush=True)
    return result


class CellFailed(RuntimeError):
    """A training or evaluation of a cell failed; the message has the command and the end of its stderr."""


def train_cell(args: list[str], cell: Path, runner: Runner) -> dict:
    """grounding-train ``args`` in its own process; its summary line (``CellFailed`` otherwise)."""
    result = runner(args, cell)
    summary = summary_line(result.stdout) if result.returncode == 0 else None
    if summary is None:
        reason = f"exit code {result.returncode}" if result.returncode else "no summary line on stdout"
        tail = "\n".join((result.stderr or "").splitlines()[-STDERR_LINES:])
        raise CellFailed(f"training failed: {reason}\narguments: {shlex.join(args)}\nlast lines of stderr:\n{tail}")
    return summary


def evaluate_on(evaluate: Evaluator, args: list[str], split: Split, checkpoint: Path | None, log_dir: Path,
                name: str) -> dict:
    """AP / AP50 of ``checkpoint`` (None: the module as built) on ``split`` by grounding-eval."""
    # the training files go: a DataModule's splits must share their categories, and only val is read here
    flags = [*args, "--data.train_annotations", "null", "--data.train_images", "null", *split.val_flags(),
             "--data.split", "val", "--trainer.logger.init_args.save_dir", str(log_dir),
             "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "eval"]
    if checkpoint is not None:
        flags += ["--ckpt_path", str(checkpoint)]
    try:
        metrics = evaluate(flags)
    except SystemExit as exit:
        if isinstance(exit.code, int) and exit.code >= 128:  # interrupted: stop the protocol
            raise
        raise CellFailed(f"evaluation on {split.annotations} failed (exit status {exit.code!r}); arguments: "
                         f"{shlex.join(flags)}") from exit
    return {"AP": metrics.get("AP"), "AP50": metrics.get("AP50")}


def mean_of(results: list[dict]) -> dict:
    """The mean AP / AP50 over several base sets (None where one is undefined)."""
    out = {}
    for metric in ("AP", "AP50"):
        values = [r[metric] for r in results]
        out[metric] = None if any(v is None for v in values) else statistics.fmean(values)
    return out


@dataclass
class Setup:
    """What every cell needs: the user's train arguments, the starting model, the data."""

    train_args: list[str]
    model: str  # --model.model of every fine-tune
    novel_train: Split
    novel_val: Split
    base: dict[str, Split]
    epochs: int
    ema_decay: float


def finetune_args(setup: Setup, method: str, seed: int, cell: Path) -> list[str]:
    """The grounding-train arguments of one fine-tune."""
    return [*setup.train_args, "--model.model", setup.model, "--data.synthetic_root", "null",
            *setup.novel_train.train_flags(), *setup.novel_val.val_flags(), "--trainer.max_epochs", str(setup.epochs),
            "--trainer.check_val_every_n_epoch", str(setup.epochs), *METHOD_FLAGS[method],
            *(["--trainer.callbacks.decay", str(setup.ema_decay)] if method == "ema" else []),
            "--trainer.callbacks+=grounding.lightning.step_stats.StepStats",
            "--seed_everything", str(seed), "--data.seed", str(seed),
            "--trainer.logger.init_args.save_dir", str(cell), "--trainer.logger.init_args.name", "train",
            "--trainer.logger.init_args.version", "run"]


def score_base(evaluate: Evaluator, eval_args: list[str], setup: Setup, checkpoint: Path | None, cell: Path) -> dict:
    per_set = {name: evaluate_on(evaluate, eval_args, split, checkpoint, cell, f"base_{name}")
               for name, split in setup.base.items()}
    return {**mean_of(list(per_set.values())), "sets": per_set}


def trained_cell(setup: Setup, method: str, seed: int, runner: Runner, evaluate: Evaluator) -> Callable[[Path], dict]:
    def work(cell: Path) -> dict:
        summary = train_cell(finetune_args(setup, method, seed, cell), cell, runner)
        run_dir = Path(summary.get("run_dir") or cell / "train" / "run")
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            raise CellFailed(f"training wrote no {checkpoint}")
        eval_args = ["--config", str(run_dir / "config.yaml")]
        # the novel figure is the one of the run's last validation (the same weights as last.ckpt)
        trained = summary.get("trained") or {}
        novel = {"AP": trained.get("AP"), "AP50": trained.get("AP50")}
        stats_file = run_dir / "step_stats.json"
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        return {"method": method, "seed": seed, "novel": novel,
                "base": score_base(evaluate, eval_args, setup, checkpoint, cell), "stats": stats,
                "checkpoint": str(checkpoint), "config": str(run_dir / "config.yaml")}
    return work


def wise_cell(setup: Setup, method: str, tuned_result: dict, alpha: float, seed: int,
              evaluate: Evaluator) -> Callable[[Path], dict]:
    """``method`` (``WISE_SOURCES``): the base model's weights and a share ``alpha`` of the way to those of the
    fine-tune ``tuned_result`` (a trained cell's result), scored as a trained cell is."""
    from grounding.protocols.weight_ensemble import (
        WITHOUT_LORA,
        init_state_dict,
        interpolate_state_dicts,
        load_checkpoint,
        merged_lora,
        save_weights,
    )

    def work(cell: Path) -> dict:
        what = f"the {WISE_SOURCES[method]} fine-tune"
        tuned, merged = merged_lora(load_checkpoint(tuned_result["checkpoint"], what), what)
        eval_args = ["--config", tuned_result["config"], *(WITHOUT_LORA if merged else [])]
        start = init_state_dict([*eval_args, "--trainer.logger", "false"])  # the pretrained model, as built
        path = cell / f"alpha_{alpha:g}.ckpt"
        save_weights(path, interpolate_state_dicts(start, tuned["state_dict"], alpha), tuned,
                     {"weight_ensemble": {"alpha": alpha, "finetuned": tuned_result["checkpoint"], "zero_shot": setup.model}})
        stats = dict(tuned_result.get("stats") or {})  # WiSE-FT trains nothing more: the fine-tune's cost
        return {"method": method, "seed": seed, "alpha": alpha,
                "novel": evaluate_on(evaluate, eval_args, setup.novel_val, path, cell, "novel"),
                "base": score_base(evaluate, eval_args, setup, path, cell), "stats": stats}
    return work


def pretrained_cell(setup: Setup, evaluate: Evaluator) -> Callable[[Path], dict]:
    """The starting model itself: its base AP50 is what the methods' is compared with."""
    def work(cell: Path) -> dict:
        args = [*setup.train_args, "--model.model", setup.model, "--data.synthetic_root", "null"]
        return {"method": "pretrained", "seed": None,
                "novel": evaluate_on(evaluate, args, setup.novel_val, None, cell, "novel"),
                "base": score_base(evaluate, args, setup, None, cell), "stats": {}}
    return work


# ------------------------------------------------------------------------------------------ the table
def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    defined = [float(v) for v in values if v is not None]
    return (statistics.fmean(defined) if defined else None, statistics.stdev(defined) if len(defined) > 1 else None)


def summarize(results: list[dict]) -> list[dict]:
    """One row per method (the pretrained model first, then ``METHODS`` order): novel / base AP50 mean and std
    over seeds, base kept (mean base AP50 / the pretrained model's), novel of full (mean novel AP50 / full's),
    trainable and total parameters, median step time and peak memory (means over seeds)."""
    by_method: dict[tuple[str, float | None], list[dict]] = {}
    for result in results:
        by_method.setdefault((result["method"], result.get("alpha")), []).append(result)
    pretrained = (by_method.get(("pretrained", None)) or [None])[0]
    base_reference = pretrained["base"]["AP50"] if pretrained else None
    rows = []
    order = {method: index for index, method in enumerate(("pretrained", *METHODS))}
    for (method, alpha), group in sorted(by_method.items(), key=lambda item: (order[item[0][0]], item[0][1] or 0)):
        novel, novel_std = _mean_std([r["novel"]["AP50"] for r in group])
        base, base_std = _mean_std([r["base"]["AP50"] for r in group])
        stats = [r.get("stats") or {} for r in group]
        row = {"method": method, "n": len(group), "novel_AP50": novel, "novel_AP50_std": novel_std,
               "base_AP50": base, "base_AP50_std": base_std,
               "trainable_parameters": stats[0].get("trainable_parameters"),
               "total_parameters": stats[0].get("total_parameters"),
               "step_time_s": _mean_std([s.get("step_time_s") for s in stats])[0],
               "peak_memory_mb": _mean_std([s.get("peak_memory_mb") for s in stats])[0]}
        if alpha is not None:
            row["alpha"] = alpha
        row["base_kept"] = base / base_reference if base is not None and base_reference else None
        rows.append(row)
    full = next((r for r in rows if r["method"] == "full"), None)
    for row in rows:
        full_novel = full["novel_AP50"] if full else None
        row["novel_of_full"] = row["novel_AP50"] / full_novel if row["novel_AP50"] is not None and full_novel else None
        row["meets_goal"] = (row["method"] not in ("pretrained", "full") and row["base_kept"] is not None
                             and row["novel_of_full"] is not None and row["base_kept"] >= GOAL_BASE_KEPT
                             and row["novel_of_full"] >= GOAL_NOVEL_OF_FULL)
    return rows


def row_label(row: dict) -> str:
    """A row's name in the table, the plot and ``meets_goal``: the method, with its α for a WiSE-FT row."""
    return f"{row['method']} (α = {row['alpha']:g})" if row.get("alpha") is not None else row["method"]


def _shown(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_std(mean: float | None, std: float | None) -> str:
    return _shown(mean) + (f" ± {std:.3f}" if std is not None else "")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def _parameters(row: dict) -> str:
    trainable, total = row["trainable_parameters"], row["total_parameters"]
    if trainable is None or not total:
        return "n/a"
    return f"{trainable:,} ({100 * trainable / total:.1f} %)"


COLUMNS = ("method", "seeds", "novel AP50", "base AP50", "base kept", "novel / full", "trainable parameters",
           "step time (s)", "peak memory (MB)")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for row in rows:
        cells = [row_label(row) + (" ✓" if row["meets_goal"] else ""), str(row["n"]),
                 _with_std(row["novel_AP50"], row["novel_AP50_std"]), _with_std(row["base_AP50"], row["base_AP50_std"]),
                 _percent(row["base_kept"]), _percent(row["novel_of_full"]), _parameters(row),
                 _shown(row["step_time_s"]), _shown(row["peak_memory_mb"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\n✓: keeps ≥ {GOAL_BASE_KEPT:.0%} of the pretrained model's base AP50 while reaching ≥ "
            f"{GOAL_NOVEL_OF_FULL:.0%} of full fine-tuning's novel AP50. Mean ± sample std over the seeds.\n")
    return "\n".join(lines) + "\n" + note


def csv_table(rows: list[dict]) -> str:
    fields = ["method", "n", "novel_AP50", "novel_AP50_std", "base_AP50", "base_AP50_std", "base_kept",
              "novel_of_full", "trainable_parameters", "total_parameters", "step_time_s", "peak_memory_mb", "meets_goal"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    return buffer.getvalue()


def plot(rows: list[dict], results: list[dict], path: Path) -> None:
    """``path`` (PNG): novel AP50 (x) against base AP50 (y), a point per method at its seed mean with ±1 std
    bars, each seed's result as a small dot."""
    from grounding.protocols.plots import scatter_with_spread

    points = [(row_label(row), row["novel_AP50"], row["novel_AP50_std"], row["base_AP50"], row["base_AP50_std"],
               [(r["novel"]["AP50"], r["base"]["AP50"]) for r in results
                if r["method"] == row["method"] and r.get("alpha") == row.get("alpha")])
              for row in rows if row["novel_AP50"] is not None and row["base_AP50"] is not None]
    reference = {row["method"]: row for row in rows}
    guides = []
    if reference.get("full") and reference["full"]["novel_AP50"]:
        guides.append(("x", GOAL_NOVEL_OF_FULL * reference["full"]["novel_AP50"], f"{GOAL_NOVEL_OF_FULL:.0%} of full's novel AP50"))
    if reference.get("pretrained") and reference["pretrained"]["base_AP50"]:
        guides.append(("y", GOAL_BASE_KEPT * reference["pretrained"]["base_AP50"], f"{GOAL_BASE_KEPT:.0%} of the base AP50"))
    scatter_with_spread(points, path, "novel AP50 (fine-tuned categories)", "base AP50 (kept categories)",
                        "Fine-tuning: gained against forgotten", guides)


def write_outputs(out: Path, results: list[dict], with_plot: bool = True) -> list[dict]:
    """table.md, table.csv and (``with_plot``) forgetting.png of the results so far; the table's rows."""
    rows = summarize(results)
    for name, text in (("table.md", markdown_table(rows)), ("table.csv", csv_table(rows))):
        write_atomic(out / name, lambda temporary, text=text: Path(temporary).write_text(text))
    if with_plot:
        plot(rows, results, out / "forgetting.png")
    return rows


# ------------------------------------------------------------------------------------------ the protocol
def synthetic_base(args: argparse.Namespace, out: Path, runner: Runner) -> tuple[str, dict[str, Split]] | None:
    """Train the base model on the synthetic base half and export it; (its folder, the four splits)."""
    splits = write_synthetic_split(args.synthetic_root, out / "data", args.novel_categories, args.novel_images)
    model_dir = out / "base" / "model"

    def work(cell: Path) -> dict:
        train_args = [*args.train_args, "--data.synthetic_root", "null", *splits["base_train"].train_flags(),
                      *splits["base_val"].val_flags(), "--trainer.max_epochs", str(args.base_epochs),
                      "--seed_everything", "0", "--trainer.logger.init_args.save_dir", str(cell),
                      "--trainer.logger.init_args.name", "train", "--trainer.logger.init_args.version", "run"]
        summary = train_cell(train_args, cell, runner)
        checkpoint = Path(summary.get("run_dir") or cell / "train" / "run") / "checkpoints" / "last.ckpt"
        export_model(checkpoint, model_dir)
        trained = summary.get("trained") or {}
        return {"method": "base_training", "model": str(model_dir), "novel": {"AP": None, "AP50": None},
                "base": {"AP": trained.get("AP"), "AP50": trained.get("AP50")}}

    if run_cell("base", out, work) is None:
        return None
    return str(model_dir), splits


def export_model(checkpoint: Path, folder: Path) -> None:
    """``grounding-export`` of a detector checkpoint (its LoRA merged, its average used) to ``folder``."""
    from grounding.export import export

    if not checkpoint.is_file():
        raise CellFailed(f"no checkpoint to export: {checkpoint}")
    try:
        export(checkpoint, folder, True, None, None)
    except (OSError, ValueError) as error:
        raise CellFailed(f"grounding-export of {checkpoint} failed: {error}") from error


def run(args: argparse.Namespace, runner: Runner = run_training, evaluate: Evaluator | None = None) -> dict:
    """The protocol (module docstring); returns the printed JSON line's payload."""
    if evaluate is None:
        from grounding.cli import evaluate
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.pretrained is None:
        prepared = synthetic_base(args, out, runner)
        if prepared is None:
            return {"failed": ["base"], "out": str(out)}
        model, splits = prepared
        base = {"synthetic": splits["base_val"]}
        novel_train, novel_val = splits["novel_train"], splits["novel_val"]
    else:
        model = args.pretrained
        if model.endswith(".ckpt"):
            export_model(Path(model), out / "pretrained")
            model = str(out / "pretrained")
        novel_train, novel_val = Split(*args.novel_train), Split(*args.novel_val)
        base = {name: Split(annotations, images) for name, annotations, images in args.base}
    setup = Setup(args.train_args, model, novel_train, novel_val, base, args.epochs, args.ema_decay)
    results, failed = [], []

    def record(name: str, result: dict | None) -> dict | None:
        (results.append(result) if result is not None else failed.append(name))
        return result

    record("pretrained", run_cell("pretrained", out, pretrained_cell(setup, evaluate)))
    for seed in args.seeds:
        trained: dict[str, dict | None] = {}  # this seed's fine-tunes, each run once

        def fine_tune(method: str) -> dict | None:
            if method not in trained:
                trained[method] = run_cell(f"{method}_seed{seed}", out, trained_cell(setup, method, seed, runner, evaluate))
            return trained[method]

        for method in args.methods:
            if method not in WISE_SOURCES:
                record(f"{method}_seed{seed}", fine_tune(method))
                continue
            source = fine_tune(WISE_SOURCES[method])
            for alpha in args.wise_alpha:
                name = f"{method}_a{alpha:g}_seed{seed}"
                if source is None:
                    failed.append(name)
                else:
                    record(name, run_cell(name, out, wise_cell(setup, method, source, alpha, seed, evaluate)))
        write_outputs(out, results, with_plot=False)  # the finished seeds' table, should the protocol stop
    rows = write_outputs(out, results)
    print((out / "table.md").read_text(), end="", flush=True)
    return {"rows": rows, "meets_goal": [row_label(r) for r in rows if r["meets_goal"]], "failed": failed,
            "table": str(out / "table.md"), "plot": str(out / "forgetting.png")}


def parse(argv: list[str]) -> argparse.Namespace:
    ours, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m grounding.protocols.forgetting", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder: one subfolder per cell, data/, base/, the table and plot")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                        help="default: %(default)s")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="default %(default)s")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every fine-tune (default %(default)s)")
    parser.add_argument("--ema-decay", type=float, default=0.99, help="WeightEMA's decay for `ema` (default %(default)s)")
    parser.add_argument("--wise-alpha", type=float, nargs="+", default=[0.5],
                        help="WiSE-FT's weight of the fine-tuned model, one row per value (default %(default)s)")
    synthetic = parser.add_argument_group("the synthetic split (without --pretrained)")
    synthetic.add_argument("--synthetic-root", default="data/synthetic")
    synthetic.add_argument("--novel-categories", nargs="+", help="names of the novel categories (default: every second id)")
    synthetic.add_argument("--novel-images", choices=("all", "novel-only"), default="all",
                           help="the novel training images: all that hold a novel object (base objects in them "
                                "unannotated, the default) or only those without any base object")
    synthetic.add_argument("--base-epochs", type=int, default=10, help="epochs of the base model (default %(default)s)")
    real = parser.add_argument_group("a pretrained model on real data")
    real.add_argument("--pretrained", help="--model.model of the fine-tunes (hub id, folder) or a detector .ckpt")
    real.add_argument("--novel-train", nargs=2, metavar=("FILE", "IMAGES"))
    real.add_argument("--novel-val", nargs=2, metavar=("FILE", "IMAGES"))
    real.add_argument("--base", nargs=3, action="append", metavar=("NAME", "FILE", "IMAGES"), default=[])
    parser.usage = parser.format_usage().removeprefix("usage: ").rstrip().replace("%", "%%") + " -- <grounding-train arguments>"
    args = parser.parse_args(ours)
    args.train_args = train_args or ["--config", "image/synthetic.yaml"]
    if args.pretrained is not None and not (args.novel_train and args.novel_val and args.base):
        parser.error("--pretrained needs --novel-train, --novel-val and at least one --base")
    if args.pretrained is None and (args.novel_train or args.novel_val or args.base):
        parser.error("--novel-train / --novel-val / --base go with --pretrained (without it: the synthetic split)")
    for alpha in args.wise_alpha:
        if not 0 <= alpha <= 1:
            parser.error(f"--wise-alpha must be in [0, 1], got {alpha:g}")
    if not 0 < args.ema_decay < 1:
        parser.error(f"--ema-decay must be in (0, 1), got {args.ema_decay}")
    for flag in ("epochs", "base_epochs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    for split in filter(None, [args.novel_train, args.novel_val, *[b[1:] for b in args.base]]):
        for path in split:
            if not Path(path).exists():
                parser.error(f"{path}: no such file or folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        payload = run(args)
    except (ValueError, FileNotFoundError, CellFailed) as error:
        raise SystemExit(f"forgetting: {error}") from None
    print(json.dumps(payload), flush=True)
    return 1 if payload["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
