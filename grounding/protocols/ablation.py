"""IMAGE's ablation table in one command (docs/image.md, "Ablations").

    python -m grounding.protocols.ablation --out ablations/synthetic --seeds 0 1 2
    python -m grounding.protocols.ablation --out ablations/coco --rows rf_gam threshold -- --config configs/image/coco.yaml

Every (row, seed) is a normal ``grounding-train`` run (the demo config when no ``--config`` follows ``--``) in
``<out>/<row>_seed<seed>``, with the row's settings and ``--seed_everything seed``; a run whose
``summary.json`` exists is not run again, a failed one is reported and the others go on. At the end
``<out>/table.md`` and ``table.csv`` give AP / AP50 / AP75 (of the trained model) as mean ± sample standard
deviation over the seeds, one row per setting. The rows (``ROWS``): the default RF-GAM masking, random masks
(importance prior replaced by chance), threshold (binary) masks, a static schedule (r0 and k0 throughout),
the paper's two other mask-ratio sets, and no masking.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grounding.protocols.sweep import Runner, csv_table, markdown_table, run_cell, run_training, summarize
from grounding.utils import write_atomic

#: row name -> the grounding-train arguments that make it (the rest is the base configuration)
ROWS: dict[str, list[str]] = {
    "rf_gam": [],
    "random": ["--model.masking.variant", "random"],
    "threshold": ["--model.masking.variant", "threshold"],
    "static": ["--model.masking.progressive", "false"],
    "ratios_20_50": ["--model.masking.r0", "[0.2, 0.3, 0.4, 0.5]"],
    "ratios_30_60": ["--model.masking.r0", "[0.3, 0.4, 0.5, 0.6]"],
    "no_masking": ["--model.masking.variant", "none"],
}


def run_name(row: str, seed: int) -> str:
    return f"{row}_seed{seed}"


def row_args(row: str, seed: int, base_args: list[str], out: str | Path) -> list[str]:
    """The grounding-train arguments of one run: the base, the row's settings, the seed and the run folder."""
    if row not in ROWS:
        raise ValueError(f"unknown ablation row {row!r}; rows: {', '.join(ROWS)}")
    for flag in ("--seed_everything", "--trainer.logger.init_args.save_dir"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in base_args):
            raise ValueError(f"the train arguments set {flag}, which the ablation sets for every run; leave it out")
    return [*base_args, *ROWS[row], "--seed_everything", str(seed),
            "--trainer.logger.init_args.save_dir", str(Path(out) / run_name(row, seed))]


def run_ablation(rows: list[str], seeds: list[int], base_args: list[str], out: str | Path,
                 runner: Runner = run_training) -> tuple[str, list[str]]:
    """Run what has not finished (``grounding.protocols.sweep.run_cell``: summary.json, error.txt, skips);
    returns the Markdown table (rows in the order asked) and the names of the runs that failed."""
    if not rows or not seeds:
        raise ValueError("give at least one row and one seed")
    for name, values in (("rows", rows), ("seeds", seeds)):
        repeated = sorted({v for v in values if list(values).count(v) > 1})
        if repeated:
            raise ValueError(f"{name} {repeated} given more than once")
    entries = [{"name": run_name(row, seed), "row": row, "seed": seed, "args": row_args(row, seed, base_args, out)}
               for row in rows for seed in seeds]  # every row checked before anything runs
    failed = [entry["name"] for entry in entries if run_cell(entry, out, runner) == "failed"]
    table_rows = []
    for entry in entries:
        done = Path(out) / entry["name"] / "summary.json"
        summary = json.loads(done.read_text()) if done.is_file() else None
        table_rows.append({"setting": "row", "value": entry["row"], "seed": entry["seed"], "summary": summary})
    table = sorted(summarize(table_rows), key=lambda line: list(rows).index(line["value"]))
    markdown = markdown_table(table)
    write_atomic(Path(out) / "table.md", lambda p: Path(p).write_text(markdown))
    write_atomic(Path(out) / "table.csv", lambda p: Path(p).write_text(csv_table(table)))
    return markdown, failed


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, base = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m grounding.protocols.ablation", description=__doc__.splitlines()[0],
        epilog="Everything after -- goes to grounding-train for every run (the demo config when it has no --config), "
               "e.g. -- --config configs/image/coco.yaml",
    )
    parser.add_argument("--out", required=True, help="folder of the runs and the table")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows of the table (default: all of {', '.join(ROWS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    # the usage argparse writes, with the arguments passed on after "--"
    parser.usage = parser.format_usage().removeprefix("usage: ").rstrip().replace("%", "%%") + " -- <grounding-train arguments>"
    args = parser.parse_args(own)
    try:
        markdown, failed = run_ablation(args.rows, args.seeds, base, args.out)
    except ValueError as error:
        print(f"ablation: {error}", file=sys.stderr)
        return 2
    print(markdown, end="")
    if failed:
        print(f"ablation: {len(failed)} run(s) failed: {', '.join(failed)} (see their error.txt)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
