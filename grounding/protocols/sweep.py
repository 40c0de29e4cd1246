"""Few-shot and low-data sweeps in one command: one training run per (k or fraction) × seed, then a table.

    python -m grounding.protocols.sweep --out sweeps/kshot --shots 1 3 5 10 --seeds 3 30 300 -- \\
        --config configs/image/coco.yaml --data.train_annotations A.json --data.train_images DIR ...
    python -m grounding.protocols.sweep --out sweeps/low --fractions 0.05 0.1 0.3 -- --config ...
    python -m grounding.protocols.sweep --out sweeps/kshot --shots 1 3 5 10 --slurm \\
        --slurm-args='--time=24:00:00 --partition=gpu' -- --config ...   # then: sbatch sweeps/kshot/sweep.sbatch
    python -m grounding.protocols.sweep --out sweeps/kshot --collect   # the table of what has finished

Everything after ``--`` goes to ``grounding-train`` for every cell; each cell adds
``--data.shots_per_category k`` (or ``--data.train_fraction f``), ``--data.subset_seed s``,
``--seed_everything s`` and ``--trainer.logger.init_args.save_dir OUT/<cell>`` (cells are named
``shots5_seed30``, ``fraction0.3_seed3``). The protocols are those of docs/image.md (GLIP k-shot with seeds
3, 30, 300, the default of ``--seeds``; low data).

- default: the cells run one after the other, each in its own process; a cell's printed summary is kept in
  ``OUT/<cell>/summary.json`` and a cell that has one is skipped, so an interrupted sweep resumes by running
  the same command again. The training output goes to ``OUT/<cell>/train.out`` / ``train.err``. A failing
  cell leaves ``OUT/<cell>/error.txt`` (exit code and the end of its stderr), the sweep goes on and exits
  with status 1 at the end.
- ``--slurm``: writes ``OUT/cells.json`` (every cell with its full argument list) and ``OUT/sweep.sbatch``,
  an array job of one task per cell (one GPU each unless ``--slurm-args`` has a ``--gres``); each task runs
  ``python -m grounding.protocols.sweep --out OUT --cell $SLURM_ARRAY_TASK_ID``, i.e. cell i of cells.json.
- ``--collect`` (also at the end of the default mode and of every ``--cell``): ``OUT/table.md`` and
  ``OUT/table.csv``, one row per k (or fraction) with AP, AP50, AP75 of the trained model as mean ± sample
  standard deviation (ddof = 1) over the seeds that finished (column n), and ``OUT/plot.png``: the three
  against k (or the fraction), mean ± std band and each seed's value. A value that is undefined for a
  seed (``null``) is left out of that mean and counted ("1 undefined").
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from grounding.utils import write_atomic

#: the GLIP k-shot seeds (docs/image.md)
DEFAULT_SEEDS = (3, 30, 300)
#: the trained model's statistics that the table shows
METRICS = ("AP", "AP50", "AP75")
#: what a cell sets, per setting (the user's train arguments must leave these to the sweep)
SETTING_FLAG = {"shots": "--data.shots_per_category", "fraction": "--data.train_fraction"}
STDERR_LINES = 40  # lines of a failed cell's stderr kept in error.txt

#: runs grounding-train with the given arguments, returns (exit code, stdout, end of stderr)
Runner = Callable[[list[str], Path], subprocess.CompletedProcess]


@dataclass(frozen=True)
class Cell:
    """One training run of the grid: ``setting`` is "shots" (value k) or "fraction" (value f)."""

    setting: str
    value: int | float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}{self.value}_seed{self.seed}"


def cells(shots: list[int] | None, fractions: list[float] | None, seeds: list[int]) -> list[Cell]:
    """The grid, value-major: every seed of the first k (or fraction), then of the next."""
    if shots and fractions:
        raise ValueError("give either --shots or --fractions, not both")
    if not shots and not fractions:
        raise ValueError("give --shots K [K ...] or --fractions F [F ...]")
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    for name, values in (("--shots", shots or []), ("--fractions", fractions or []), ("--seeds", seeds)):
        repeated = sorted({v for v in values if list(values).count(v) > 1})
        if repeated:
            raise ValueError(f"{name}: {repeated} given more than once")
    for k in shots or []:
        if k < 1:
            raise ValueError(f"--shots: k must be >= 1, got {k}")
    for f in fractions or []:
        if not 0 < f <= 1:
            raise ValueError(f"--fractions: f must be in (0, 1], got {f}")
    setting, values = ("shots", [int(k) for k in shots]) if shots else ("fraction", [float(f) for f in fractions])
    return [Cell(setting, value, int(seed)) for value in values for seed in seeds]


def cell_args(cell: Cell, base_args: list[str], out: str | Path) -> list[str]:
    """The grounding-train arguments of one cell: the user's, then the cell's own settings."""
    owned = (SETTING_FLAG[cell.setting], "--data.subset_seed", "--seed_everything", "--trainer.logger.init_args.save_dir")
    for flag in owned:
        alternatives = {flag, flag.replace("--data.", "--data.init_args.")}
        if any(arg in alternatives or arg.split("=", 1)[0] in alternatives for arg in base_args):
            raise ValueError(f"the train arguments set {flag}, which the sweep sets for every cell; leave it out")
    return [
        *base_args, SETTING_FLAG[cell.setting], str(cell.value), "--data.subset_seed", str(cell.seed),
        "--seed_everything", str(cell.seed), "--trainer.logger.init_args.save_dir", str(Path(out) / cell.name),
    ]


# ---------------------------------------------------------------------------------------------- running cells


def run_training(args: list[str], cell_dir: Path) -> subprocess.CompletedProcess:
    """grounding-train in a new process, its output in ``cell_dir/train.out`` and ``train.err``.

    [choice] The process is ``python -m grounding.protocols.sweep --train -- ARGS`` rather than ``python -c``:
    Lightning's DDP launcher restarts a module's command line as it is, so a cell may use several devices.
    """
    return run_module(["grounding.protocols.sweep", "--train"], args, cell_dir, "train")


def run_module(launcher: list[str], args: list[str], cell_dir: Path, log: str) -> subprocess.CompletedProcess:
    """``python -m LAUNCHER -- ARGS`` in a new process (``launcher``: a module and its flag that runs an entry
    point), its output in ``cell_dir/<log>.out`` and ``<log>.err``; returns the exit code, the stdout and the
    end of the stderr."""
    import grounding

    cell_dir.mkdir(parents=True, exist_ok=True)
    out_file, err_file = cell_dir / f"{log}.out", cell_dir / f"{log}.err"
    # the cell imports the same grounding as this process (not another copy that the environment may install)
    package_root = str(Path(grounding.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    with open(out_file, "w") as stdout, open(err_file, "w") as stderr:
        command = [sys.executable, "-m", *launcher, "--", *args]
        returncode = subprocess.run(command, stdout=stdout, stderr=stderr, env=env).returncode
    return subprocess.CompletedProcess(args, returncode, out_file.read_text(), _end_of(err_file))


def _end_of(path: Path, size: int = 65536) -> str:
    """The last ``size`` bytes of a (possibly long) log file, as text."""
    with open(path, "rb") as handle:
        handle.seek(max(0, handle.seek(0, 2) - size))
        return handle.read().decode(errors="replace")


def summary_line(stdout: str, key: str = "trained") -> dict | None:
    """The summary that an entry point prints last (a JSON object with ``key``: "trained" for grounding-train,
    "run_dir" for grounding-eval), None if there is none."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            payload = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(payload, dict) and key in payload:
            return payload
    return None


def _trained_scores(summary: dict) -> str:
    trained = summary.get("trained", {})
    return f"AP {_shown(trained.get('AP'))}  AP50 {_shown(trained.get('AP50'))}"


@dataclass(frozen=True)
class CellKind:
    """What a cell runs, for ``run_cell``: the words it prints, its log files, its summary line's key."""

    verb: str  # "training"
    log: str  # the log files' stem: <cell>/<log>.out, <log>.err
    summary_key: str  # a key that only the entry point's summary line has
    scores: Callable[[dict], str]  # the line printed from a finished cell's summary


TRAINING = CellKind("training", "train", "trained", _trained_scores)


def run_cell(entry: dict, out: str | Path, runner: Runner = run_training, kind: CellKind = TRAINING) -> str:
    """Run one entry of cells.json unless its summary.json exists; returns "skipped", "done" or "failed"."""
    cell_dir = Path(out) / entry["name"]
    summary_file, error_file = cell_dir / "summary.json", cell_dir / "error.txt"
    if summary_file.is_file():
        print(f"{entry['name']}: skipped, {summary_file} exists", flush=True)
        return "skipped"
    print(f"{entry['name']}: {kind.verb} (output in {cell_dir}/{kind.log}.out, {kind.log}.err)", flush=True)
    result = runner(entry["args"], cell_dir)
    summary = summary_line(result.stdout, kind.summary_key) if result.returncode == 0 else None
    if summary is None:
        reason = f"exit code {result.returncode}" if result.returncode else "exit code 0 but no summary line on stdout"
        stderr_tail = "\n".join((result.stderr or "").splitlines()[-STDERR_LINES:])
        text = f"cell {entry['name']} failed: {reason}\ncommand arguments: {shlex.join(entry['args'])}\n" \
               f"last lines of stderr:\n{stderr_tail}\n"
        write_atomic(error_file, lambda path: Path(path).write_text(text))
        print(f"{entry['name']}: FAILED ({reason}), see {error_file}", flush=True)
        return "failed"
    write_atomic(summary_file, lambda path: Path(path).write_text(json.dumps(summary, indent=1) + "\n"))
    error_file.unlink(missing_ok=True)  # an earlier failure of this cell is no longer the state
    print(f"{entry['name']}: {kind.scores(summary)}", flush=True)
    return "done"


def write_cells(cell_list: list[Cell], train_args: list[str], out: str | Path) -> list[dict]:
    """``OUT/cells.json``: every cell with its full argument list. A cell already there with other
    arguments (the same folder used for a different sweep) is an error: its summary would be reused."""
    entries = [{"name": c.name, "setting": c.setting, "value": c.value, "seed": c.seed,
                "args": cell_args(c, train_args, out)} for c in cell_list]
    return save_cells(entries, out, "train arguments")


def save_cells(entries: list[dict], out: str | Path, what: str = "arguments") -> list[dict]:
    """``OUT/cells.json``: ``entries`` (each with its "name" and full "args"), in order (``--cell i`` is the
    i-th). A cell already there with other arguments (the same folder used for another run) is an error saying
    its ``what`` differ: its summary would be reused."""
    path = Path(out) / "cells.json"
    if path.is_file():
        before = {e["name"]: e["args"] for e in json.loads(path.read_text())}
        for entry in entries:
            if entry["name"] in before and before[entry["name"]] != entry["args"]:
                raise ValueError(f"{path}: cell {entry['name']} was set up with other {what} "
                                 f"({shlex.join(before[entry['name']])}); use another --out")
    write_atomic(path, lambda p: Path(p).write_text(json.dumps(entries, indent=1) + "\n"))
    return entries


def read_cells(out: str | Path) -> list[dict]:
    path = Path(out) / "cells.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the sweep (or --slurm) with this --out first")
    return json.loads(path.read_text())


def run_sweep(cell_list: list[Cell], train_args: list[str], out: str | Path, runner: Runner = run_training) -> dict:
    """Every cell in turn (see the module docstring), then the table; returns the cell names by outcome."""
    outcome: dict[str, list[str]] = {"done": [], "skipped": [], "failed": []}
    for entry in write_cells(cell_list, train_args, out):
        outcome[run_cell(entry, out, runner)].append(entry["name"])
    collect(out)
    if outcome["failed"]:
        print(f"{len(outcome['failed'])} of {len(cell_list)} cells failed: {', '.join(outcome['failed'])}", flush=True)
    return outcome


def run_one(out: str | Path, index: int, runner: Runner = run_training) -> str:
    """Cell ``index`` of ``OUT/cells.json`` (a SLURM array task), then the table of what has finished."""
    entries = read_cells(out)
    if not 0 <= index < len(entries):
        raise IndexError(f"--cell {index} is out of range: {Path(out) / 'cells.json'} has {len(entries)} cells "
                         f"(0-{len(entries) - 1})")
    status = run_cell(entries[index], out, runner)
    collect(out)
    return status


def sbatch_script(out: str | Path, count: int, slurm_args: list[str], job_name: str | None = None) -> str:
    """An sbatch array script with one task per cell; ``slurm_args`` become ``#SBATCH`` lines."""
    out = Path(out).resolve()
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name or 'sweep-' + out.name}", f"#SBATCH --array=0-{count - 1}",
             f"#SBATCH --output={out}/slurm-%A_%a.out"]
    if not any(a.startswith("--gres") or a.startswith("--gpus") for a in slurm_args):
        lines.append("#SBATCH --gres=gpu:1")
    lines += [f"#SBATCH {arg}" for arg in slurm_args]
    lines += [
        "", "# one cell of OUT/cells.json per array task; a cell with a summary.json is skipped",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"{shlex.quote(sys.executable)} -m grounding.protocols.sweep --out {shlex.quote(str(out))} "
        "--cell $SLURM_ARRAY_TASK_ID", "",
    ]
    return "\n".join(lines)


def write_slurm(cell_list: list[Cell], train_args: list[str], out: str | Path, slurm_args: list[str]) -> Path:
    """``OUT/cells.json`` and ``OUT/sweep.sbatch``; returns the script's path."""
    entries = write_cells(cell_list, train_args, out)
    path = Path(out) / "sweep.sbatch"
    script = sbatch_script(out, len(entries), slurm_args)
    write_atomic(path, lambda p: Path(p).write_text(script))
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------- the table


def summarize(rows: list[dict]) -> list[dict]:
    """Table rows from per-run rows ``{"setting", "value", "seed", "summary"}`` (summary None: not finished).

    One row per (setting, value), ascending: ``n`` the seeds that finished and, per metric of METRICS,
    ``{"mean", "std", "over", "undefined"}`` over the finished seeds whose value is defined (std: sample
    standard deviation, ddof = 1, None below two values; mean None without any).
    """
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["value"]), []).append(row)
    table = []
    for (setting, value), group in sorted(groups.items()):
        finished = [r["summary"] for r in group if r["summary"] is not None]
        seeds = [r["seed"] for r in group if r["summary"] is not None]
        entry = {"setting": setting, "value": value, "n": len(finished), "seeds": seeds}
        for metric in METRICS:
            values = [(s.get("trained") or {}).get(metric) for s in finished]
            defined = [float(v) for v in values if v is not None]
            entry[metric] = {
                "mean": statistics.fmean(defined) if defined else None,
                "std": statistics.stdev(defined) if len(defined) > 1 else None,
                "over": len(defined), "undefined": len(values) - len(defined),
            }
        table.append(entry)
    return table


def _label(table: list[dict]) -> str:
    return table[0]["setting"] if len({r["setting"] for r in table}) == 1 else "setting"


def _row_name(row: dict, label: str) -> str:
    return str(row["value"]) if label == row["setting"] else f"{row['setting']} {row['value']}"


def _shown(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def markdown_table(table: list[dict]) -> str:
    """``| shots | n | AP | AP50 | AP75 |`` with ``mean ± std`` cells (4 decimals)."""
    label = _label(table) if table else "setting"
    lines = [f"| {label} | n | " + " | ".join(METRICS) + " |", "| ---: | ---: | " + " | ".join("---" for _ in METRICS) + " |"]
    for row in table:
        cells_text = []
        for metric in METRICS:
            stat = row[metric]
            text = _shown(stat["mean"]) + (f" ± {stat['std']:.4f}" if stat["std"] is not None else "")
            if stat["undefined"]:
                text += f" ({stat['undefined']} undefined)"
            cells_text.append(text)
        lines.append(f"| {_row_name(row, label)} | {row['n']} | " + " | ".join(cells_text) + " |")
    return "\n".join(lines) + "\n"


def csv_table(table: list[dict]) -> str:
    """One line per row: value, n, then ``<metric>_mean, _std, _undefined`` (empty where undefined)."""
    label = _label(table) if table else "setting"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([label, "n", *(f"{m}_{part}" for m in METRICS for part in ("mean", "std", "undefined"))])
    for row in table:
        numbers = []
        for metric in METRICS:
            stat = row[metric]
            numbers += ["" if stat["mean"] is None else round(stat["mean"], 6),
                        "" if stat["std"] is None else round(stat["std"], 6), stat["undefined"]]
        writer.writerow([_row_name(row, label), row["n"], *numbers])
    return buffer.getvalue()


def plot(table: list[dict], rows: list[dict], path: Path) -> None:
    """``path`` (PNG): each metric of METRICS against k (or the fraction), mean ± sample std over the seeds,
    each seed's value as a dot; k on a log axis."""
    from grounding.protocols.plots import curve_with_spread

    curves = {}
    for metric in METRICS:
        curves[metric] = [
            (row["value"], row[metric]["mean"], row[metric]["std"],
             [float(r["summary"]["trained"][metric]) for r in rows
              if r["value"] == row["value"] and r["setting"] == row["setting"] and r["summary"] is not None
              and (r["summary"].get("trained") or {}).get(metric) is not None])
            for row in table
        ]
    label = _label(table)
    name = {"shots": "k (training images per category)", "fraction": "fraction of the training images"}.get(label, label)
    curve_with_spread(curves, path, name, "box AP (val)", f"{label}: mean ± std over seeds",
                      log_x=len({row["value"] for row in table}) > 2)


def collect(out: str | Path) -> str:
    """Read the summaries of the cells of ``OUT/cells.json``, write table.md and table.csv, print and return
    the Markdown table."""
    out = Path(out)
    rows = []
    for entry in read_cells(out):
        summary_file = out / entry["name"] / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
        rows.append({"setting": entry["setting"], "value": entry["value"], "seed": entry["seed"], "summary": summary})
    table = summarize(rows)
    markdown, comma_separated = markdown_table(table), csv_table(table)
    write_atomic(out / "table.md", lambda p: Path(p).write_text(markdown))
    write_atomic(out / "table.csv", lambda p: Path(p).write_text(comma_separated))
    if table:
        plot(table, rows, out / "plot.png")
    print(markdown, end="", flush=True)
    return markdown


# ---------------------------------------------------------------------------------------------- command line


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options (before ``--``) and the train arguments (after it)."""
    ours, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m grounding.protocols.sweep", description=__doc__.splitlines()[0],
        epilog="Everything after -- goes to grounding-train for every cell, e.g. -- --config configs/image/coco.yaml "
               "--data.train_annotations A.json --data.train_images DIR",
    )
    parser.add_argument("--out", help="folder of the sweep: one subfolder per cell, cells.json, the tables")
    parser.add_argument("--shots", type=int, nargs="+", help="k of the k-shot cells")
    parser.add_argument("--fractions", type=float, nargs="+", help="fractions of the low-data cells")
    parser.add_argument("--seeds", type=int, nargs="*", default=list(DEFAULT_SEEDS),
                        help="one run per seed (subset and training seed); default %(default)s")
    parser.add_argument("--slurm", action="store_true", help="write cells.json and sweep.sbatch instead of running")
    parser.add_argument("--slurm-args", default="", help="#SBATCH options, e.g. --slurm-args='--time=24:00:00 --partition=gpu'")
    parser.add_argument("--cell", type=int, help="run cell i of OUT/cells.json (what each SLURM array task does)")
    parser.add_argument("--collect", action="store_true", help="only write and print the table of OUT")
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)  # one cell's training process
    # the usage argparse writes, with the arguments passed on after "--"
    parser.usage = parser.format_usage().removeprefix("usage: ").rstrip().replace("%", "%%") + " -- <grounding-train arguments>"
    args = parser.parse_args(ours)
    if not args.train and not args.out:
        parser.error("--out is required")
    return args, train_args


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse(sys.argv[1:] if argv is None else argv)
    if args.train:
        from grounding.cli import train

        train(train_args)
        return 0
    try:  # a setting the sweep rejects is one line naming it, not a traceback
        if args.collect:
            collect(args.out)
            return 0
        if args.cell is not None:
            return 0 if run_one(args.out, args.cell) != "failed" else 1
        cell_list = cells(args.shots, args.fractions, args.seeds)
        if args.slurm:
            path = write_slurm(cell_list, train_args, args.out, shlex.split(args.slurm_args))
            print(f"{len(cell_list)} cells in {Path(args.out) / 'cells.json'}; submit with: sbatch {path}", flush=True)
            return 0
        return 1 if run_sweep(cell_list, train_args, args.out)["failed"] else 0
    except (ValueError, IndexError, FileNotFoundError) as error:
        raise SystemExit(f"sweep: {error}") from None


if __name__ == "__main__":
    sys.exit(main())
