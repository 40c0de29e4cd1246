"""Weight-space ensembling (WiSE-FT) of a fine-tuned and a zero-shot model, evaluated on several benchmarks.

Fine-tuning trades zero-shot ability for in-domain accuracy; the interpolated weights

    θ(α) = (1 − α) · θ_zero-shot + α · θ_fine-tuned,   α in [0, 1]

trade between the two (α = 0: the zero-shot model, α = 1: the fine-tuned one). One command writes θ(α) for
every ratio as a checkpoint and evaluates it with ``grounding-eval`` on each benchmark::

    python -m grounding.protocols.weight_ensemble --finetuned RUN/checkpoints/last.ckpt --zero-shot init \\
        --ratios 0 0.25 0.5 0.75 1 --out ensembles/coco_odinw \\
        --eval coco -- --config RUN/config.yaml \\
        --eval aquarium -- --config RUN/config.yaml --data.synthetic_root null \\
            --data.val_annotations data/odinw/Aquarium/.../annotations_without_background.json --data.val_images ...

Syntax: the driver's own options come first; then one ``--eval NAME -- ARGS...`` group per benchmark. ARGS are
``grounding-eval`` arguments and run up to the next ``--eval`` (grounding-eval has no option of that name) or
the end of the line. Each benchmark is evaluated with its ARGS plus ``--ckpt_path <out>/alpha_<α>.ckpt`` and a
logger folder ``<out>/runs/<NAME>/alpha_<α>``; ARGS must not set ``--ckpt_path`` themselves.

``--zero-shot`` is a Lightning checkpoint of the same module (e.g. a pretrained starting point saved as a
.ckpt) or ``init``: the weights the module is built with from the first benchmark's ARGS (e.g. the hub
checkpoint of ``--model.model IDEA-Research/grounding-dino-tiny``). Only floating-point tensors are
interpolated; every other entry (integer / bool buffers) must be equal in both models and is copied.

A checkpoint trained with LoRA adapters (``--model.lora.r``) is read with its adapters merged into the weights,
``W + (alpha / r) B A`` (``grounding.models.detector.detector_state_dict``): θ(α) is then a plain detector's,
its ``hyper_parameters`` have ``lora: null``, and every benchmark is built with ``--model.lora null`` after its
ARGS (which may be the LoRA run's own config), as is ``init``.

Writes ``<out>/alpha_<α>.ckpt`` (``state_dict``, and the fine-tuned checkpoint's ``hyper_parameters``, so
``--ckpt_path`` and ``load_from_checkpoint`` read it), ``<out>/table.md`` and ``<out>/table.csv`` (one row per
α; AP and AP50 of each benchmark; rewritten after every α, so an interrupted run keeps its finished rows),
prints the table and ends with one JSON line ``{"rows": [{"alpha": .., NAME: {"AP": .., "AP50": ..}}], ...}``.
Benchmarks are evaluated in this process, one after the other (a bad argument is an error naming the benchmark).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from grounding.utils import write_atomic

DEFAULT_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: the metrics of every benchmark in the table
TABLE_METRICS = ("AP", "AP50")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Benchmark:
    """A named ``grounding-eval`` argument list."""

    name: str
    args: list[str]


# ------------------------------------------------------------------------------------------------ the math
def interpolate_state_dicts(zero_shot: Mapping[str, object], finetuned: Mapping[str, object], alpha: float) -> dict:
    """θ(α) = (1 − α) · θ_zero-shot + α · θ_fine-tuned for every floating-point tensor; every other entry
    (integer / bool buffers) must be equal in both and is copied. α = 0 and α = 1 return the two models'
    weights exactly. Half-precision tensors are interpolated in float32 and stored in their own dtype.

    Errors: keys that differ (naming them), a shape or dtype that differs, an unequal non-floating-point entry,
    α outside [0, 1].
    """
    check_ratio(alpha)
    check_compatible(zero_shot, finetuned)
    merged = {}
    for key, start in zero_shot.items():
        end = finetuned[key]
        if not isinstance(start, torch.Tensor) or not start.is_floating_point():
            merged[key] = start.clone() if isinstance(start, torch.Tensor) else start
            continue
        dtype = torch.promote_types(start.dtype, torch.float32)  # float16/bfloat16: interpolate in float32
        mixed = (1 - alpha) * start.to(dtype) + alpha * end.to(start.device, dtype)
        merged[key] = mixed.to(start.dtype)
    return merged


def check_compatible(zero_shot: Mapping[str, object], finetuned: Mapping[str, object]) -> None:
    """The two state dicts can be interpolated: the same keys, shapes and dtypes, equal non-floating-point entries."""
    missing, unexpected = sorted(set(zero_shot) - set(finetuned)), sorted(set(finetuned) - set(zero_shot))
    if missing or unexpected:
        raise ValueError(
            f"the zero-shot and fine-tuned state dicts have different keys: only in the zero-shot model {missing},"
            f" only in the fine-tuned model {unexpected}"
        )
    for key, start in zero_shot.items():
        end = finetuned[key]
        if not (isinstance(start, torch.Tensor) and isinstance(end, torch.Tensor)):
            if type(start) is not type(end) or start != end:
                raise ValueError(f"state dict entry {key!r}: not a tensor and not equal in both models ({start!r} vs {end!r})")
            continue
        if start.shape != end.shape:
            raise ValueError(f"state dict entry {key!r}: shape {tuple(start.shape)} in the zero-shot model,"
                             f" {tuple(end.shape)} in the fine-tuned model")
        if start.dtype != end.dtype:
            raise ValueError(f"state dict entry {key!r}: dtype {start.dtype} in the zero-shot model, {end.dtype} in the fine-tuned model")
        if not start.is_floating_point() and not torch.equal(start, end.to(start.device)):
            raise ValueError(f"state dict entry {key!r}: a {start.dtype} tensor that differs between the zero-shot and"
                             " fine-tuned models (only floating-point tensors are interpolated)")


def check_ratio(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"ratio alpha must be a number in [0, 1], got {alpha!r}")


def ratio_name(alpha: float) -> str:
    """The name of the checkpoint / run of a ratio: ``alpha_0``, ``alpha_0.25``, ``alpha_1``."""
    return f"alpha_{alpha:g}"


# ------------------------------------------------------------------------------------------------ checkpoints
def load_checkpoint(path: str | Path, what: str) -> dict:
    """A Lightning checkpoint on the CPU, read without unpickling anything but tensors, plain values and the
    package's settings classes (``grounding.checkpoints``); ``what`` names the option in errors."""
    from grounding.checkpoints import UnsafeCheckpointError, load_checkpoint as read_safely

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: checkpoint not found: {path}")
    try:
        checkpoint = read_safely(path)
    except UnsafeCheckpointError as error:
        raise ValueError(f"{what}: {error}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{what}: {path} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


#: what every evaluation of merged LoRA weights adds to its arguments: the module built without adapters
WITHOUT_LORA = ["--model.lora", "null"]


def merged_lora(checkpoint: dict, what: str) -> tuple[dict, bool]:
    """``checkpoint`` with its detector's LoRA adapters merged into the plain weights (its ``hyper_parameters``'
    ``lora`` then None) and whether it had any; a checkpoint without adapters is returned as it is."""
    from grounding.models.detector import DETECTOR_PREFIX, CheckpointError, detector_state_dict
    from grounding.models.lora import has_adapters

    state = checkpoint["state_dict"]
    if not has_adapters(state):
        return checkpoint, False
    try:
        detector = detector_state_dict(checkpoint)
    except CheckpointError as error:
        raise ValueError(f"{what}: {error}") from error
    merged = {key: value for key, value in state.items() if not key.startswith(DETECTOR_PREFIX)}  # the adapters are the detector's
    merged.update({DETECTOR_PREFIX + key: value for key, value in detector.items()})
    plain = {**checkpoint, "state_dict": merged}
    if isinstance(checkpoint.get("hyper_parameters"), dict):
        plain["hyper_parameters"] = {**checkpoint["hyper_parameters"], "lora": None}
    return plain, True


def init_state_dict(eval_args: list[str]) -> dict:
    """The weights the module is built with from ``eval_args`` (``grounding.cli.build_cli``), on the CPU."""
    from grounding.cli import build_cli

    model = build_cli(eval_args).model
    return {key: value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
            for key, value in model.state_dict().items()}


def save_weights(path: str | Path, state_dict: dict, template: dict, extra: dict | None = None) -> None:
    """A Lightning checkpoint of ``state_dict`` (written atomically) with the version and hyper-parameters of
    ``template`` (the fine-tuned checkpoint), which ``Trainer.test(ckpt_path=...)`` and ``load_from_checkpoint``
    read. No optimizer, loop or callback state: it is not a run to resume."""
    checkpoint = {"state_dict": state_dict, **(extra or {})}
    for key in ("pytorch-lightning_version", "hparams_name", "hyper_parameters", "datamodule_hparams_name",
                "datamodule_hyper_parameters"):
        if key in template:
            checkpoint[key] = template[key]
    if "pytorch-lightning_version" not in checkpoint:  # Lightning's loader requires it
        import lightning

        checkpoint["pytorch-lightning_version"] = lightning.__version__
    write_atomic(path, lambda temporary: torch.save(checkpoint, temporary))


# ------------------------------------------------------------------------------------------------ the table
def table_markdown(rows: list[dict], names: list[str]) -> str:
    """One row per α; AP / AP50 of every benchmark (``n/a`` where undefined or not yet evaluated)."""
    header = ["alpha", *(f"{name} {metric}" for name in names for metric in TABLE_METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    for row in rows:
        cells = [f"{row['alpha']:g}"]
        for name in names:
            for metric in TABLE_METRICS:
                value = row.get(name, {}).get(metric)
                cells.append("n/a" if value is None else f"{value:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict], names: list[str]) -> str:
    """The same table as CSV: columns ``alpha,<name>/AP,<name>/AP50,...``; an undefined value is empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["alpha", *(f"{name}/{metric}" for name in names for metric in TABLE_METRICS)])
    for row in rows:
        values = [row.get(name, {}).get(metric) for name in names for metric in TABLE_METRICS]
        writer.writerow([f"{row['alpha']:g}", *("" if value is None else value for value in values)])
    return buffer.getvalue()


def write_tables(out: Path, rows: list[dict], names: list[str]) -> str:
    """``table.md`` and ``table.csv`` in ``out`` (atomically); returns the markdown."""
    markdown = table_markdown(rows, names)
    for file, text in (("table.md", markdown), ("table.csv", table_csv(rows, names))):
        write_atomic(out / file, lambda temporary, text=text: Path(temporary).write_text(text))
    return markdown


# ------------------------------------------------------------------------------------------------ the protocol
def evaluate_benchmark(benchmark: Benchmark, checkpoint: Path, run_root: Path, version: str,
                       evaluate: Callable[[list[str]], dict] | None = None) -> dict:
    """``grounding.cli.evaluate`` of one benchmark on ``checkpoint``; its metrics."""
    if evaluate is None:
        from grounding.cli import evaluate
    args = [*benchmark.args, "--ckpt_path", str(checkpoint),
            "--trainer.logger.init_args.save_dir", str(run_root), "--trainer.logger.init_args.name", benchmark.name,
            "--trainer.logger.init_args.version", version]
    try:
        return evaluate(args)
    except SystemExit as exit:  # the CLI exits on a bad argument (after printing why); 128 + signal: interrupted
        if isinstance(exit.code, int) and exit.code >= 128:
            raise
        raise RuntimeError(f"grounding-eval of benchmark {benchmark.name!r} on {checkpoint} failed (exit status"
                           f" {exit.code!r}); its arguments: {benchmark.args}") from exit


def run(finetuned: str | Path, zero_shot: str, ratios: list[float], out: str | Path, benchmarks: list[Benchmark],
        evaluate: Callable[[list[str]], dict] | None = None) -> dict:
    """Write θ(α) for every ratio, evaluate it on every benchmark, write and return the table (module docstring).

    zero_shot: a checkpoint path or ``"init"`` (the module built from the first benchmark's arguments).
    evaluate: the evaluation entry point (default ``grounding.cli.evaluate``; tests pass a fake one).
    """
    check_benchmarks(benchmarks)
    ratios = check_ratios(ratios)
    out = Path(out)
    tuned, merged = merged_lora(load_checkpoint(finetuned, "--finetuned"), "--finetuned")
    start_checkpoint = None if zero_shot == "init" else load_checkpoint(zero_shot, "--zero-shot")
    if start_checkpoint is not None:
        start_checkpoint, start_merged = merged_lora(start_checkpoint, "--zero-shot")
        merged = merged or start_merged
    if merged:  # plain weights: every module is built without adapters
        benchmarks = [Benchmark(benchmark.name, [*benchmark.args, *WITHOUT_LORA]) for benchmark in benchmarks]
    start = init_state_dict(benchmarks[0].args) if start_checkpoint is None else start_checkpoint["state_dict"]
    check_compatible(start, tuned["state_dict"])  # before any checkpoint is written
    names = [benchmark.name for benchmark in benchmarks]
    rows: list[dict] = []
    for alpha in ratios:
        path = out / f"{ratio_name(alpha)}.ckpt"
        weights = interpolate_state_dicts(start, tuned["state_dict"], alpha)
        provenance = {"alpha": alpha, "finetuned": str(finetuned), "zero_shot": str(zero_shot)}
        save_weights(path, weights, tuned, {"weight_ensemble": provenance})
        del weights
        row: dict = {"alpha": alpha}
        for benchmark in benchmarks:
            metrics = evaluate_benchmark(benchmark, path, out / "runs", ratio_name(alpha), evaluate)
            row[benchmark.name] = {metric: metrics.get(metric) for metric in TABLE_METRICS}
        rows.append(row)
        write_tables(out, rows, names)
    return {"rows": rows, "benchmarks": names, "zero_shot": str(zero_shot), "finetuned": str(finetuned), "out": str(out)}


def check_ratios(ratios: list[float]) -> list[float]:
    """The ratios as floats; each in [0, 1], no two with the same checkpoint name."""
    if not ratios:
        raise ValueError("--ratios: give at least one ratio alpha in [0, 1]")
    for alpha in ratios:
        check_ratio(alpha)
    seen: dict[str, float] = {}
    for alpha in ratios:
        name = ratio_name(alpha)
        if name in seen:
            raise ValueError(f"--ratios: {seen[name]!r} and {alpha!r} are the same ratio ({name})")
        seen[name] = alpha
    return [float(alpha) for alpha in ratios]


def check_benchmarks(benchmarks: list[Benchmark]) -> None:
    if not benchmarks:
        raise ValueError("no benchmark: give at least one --eval NAME -- <grounding-eval arguments>")
    names = [benchmark.name for benchmark in benchmarks]
    for benchmark in benchmarks:
        if not _NAME.match(benchmark.name):
            raise ValueError(f"--eval {benchmark.name!r}: a benchmark name is letters, digits, '_', '.', '-' (it names a folder and a column)")
        if any(arg == "--ckpt_path" or arg.startswith("--ckpt_path=") for arg in benchmark.args):
            raise ValueError(f"--eval {benchmark.name}: do not set --ckpt_path, the driver sets it to each ratio's checkpoint")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--eval: benchmark names must differ, repeated: {repeated}")


# ------------------------------------------------------------------------------------------------ command line
def split_command_line(argv: list[str]) -> tuple[list[str], list[Benchmark]]:
    """The driver's own options and the ``--eval NAME -- ARGS...`` groups (module docstring)."""
    first = argv.index("--eval") if "--eval" in argv else len(argv)
    ours, rest = argv[:first], argv[first:]
    benchmarks = []
    while rest:
        following = rest[1:].index("--eval") + 1 if "--eval" in rest[1:] else len(rest)
        group, rest = rest[:following], rest[following:]
        if len(group) < 3 or group[2] != "--" or group[1].startswith("-"):
            raise ValueError(f"expected --eval NAME -- <grounding-eval arguments>, got {' '.join(group)!r}")
        benchmarks.append(Benchmark(group[1], group[3:]))
    return ours, benchmarks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grounding.protocols.weight_ensemble", description=__doc__.splitlines()[0],
        epilog="then one or more: --eval NAME -- <grounding-eval arguments>",
    )
    parser.add_argument("--finetuned", required=True, help="the fine-tuned Lightning checkpoint (RUN/checkpoints/last.ckpt)")
    parser.add_argument("--zero-shot", required=True, help="a checkpoint of the same module, or 'init': the weights it is built with")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS), help="the weights alpha of the fine-tuned model")
    parser.add_argument("--out", required=True, help="folder of the checkpoints, the evaluation runs and the table")
    # the usage argparse writes, with the benchmarks that follow the options
    parser.usage = (parser.format_usage().removeprefix("usage: ").rstrip().replace("%", "%%")
                    + " --eval NAME -- <grounding-eval arguments> [--eval NAME -- ...]")
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        ours, benchmarks = split_command_line(argv)
    except ValueError as error:
        parser.error(str(error))
    args = parser.parse_args(ours)
    if not benchmarks:
        parser.error("no benchmark: give at least one --eval NAME -- <grounding-eval arguments>")
    summary = run(args.finetuned, args.zero_shot, args.ratios, args.out, benchmarks)
    print(table_markdown(summary["rows"], summary["benchmarks"]), end="", flush=True)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
