"""The command line of every method: ``grounding-train`` and ``grounding-eval`` (``train.py`` / ``eval.py``).

One subclass-mode LightningCLI: a config names its LightningModule and its LightningDataModule
(``model: {class_path: ..., init_args: ...}``, the same for ``data``), so a new method plugs in by its
config alone. Every constructor argument is a flag (``--model.lr 1e-4``, ``--data.batch_size 4``,
``--trainer.devices 2``); ``--config FILE`` loads YAML. Without any ``--config`` the demo config
``configs/image/synthetic.yaml`` is used; with one, only the files given apply. A config is looked up as
given, then among the configs shipped inside the package (``--config image/coco.yaml`` or
``--config configs/image/coco.yaml`` work from any folder, also with a non-editable install).

Every run also gets ``--checkpoint.*`` (``LastCheckpoint``: last.ckpt at every epoch end, at the end of fit
and on SIGTERM/SIGUSR1), ``--progress.*`` (plain progress lines when the output is not a terminal) and
atomic checkpoint writes (``grounding.lightning.callbacks``).

- ``train``: evaluates the untrained model (``--validate_before_fit``), fits, evaluates the trained model
  (the validation of fit's last step when there was one: the same weights), prints one JSON line
  ``{"untrained": {...}, "trained": {...}, "run_dir": ..., "steps": ...}``.
- ``evaluate``: ``Trainer.test`` of any method on its DataModule's evaluation split (``--data.split``),
  prints ``{"split": ..., <metrics>, "run_dir": ...}``. Undefined metrics are printed as ``null``.

A run interrupted by SIGTERM/SIGUSR1 exits with status 128 + signal (143 / 138) after writing last.ckpt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden

from grounding.lightning.callbacks import AtomicCheckpointIO, LastCheckpoint, TextProgress, interruption_exit_code

log = logging.getLogger(__name__)

#: the configs shipped with the package (in a checkout, the repository's configs/ folder)
CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "image/synthetic.yaml"


def find_config(name: str) -> str:
    """``name`` if it is a file, else the packaged config of that name (with or without "configs/")."""
    path = Path(name)
    if path.is_file():
        return name
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    for candidate in (CONFIG_ROOT / name, CONFIG_ROOT.joinpath(*parts) if parts else None):
        if candidate is not None and candidate.is_file():
            return str(candidate)
    return name  # the parser reports the missing file


def resolve_arguments(args: list[str] | None) -> list[str]:
    """The command line with every ``--config`` resolved, and the demo config first when none is given."""
    args = list(sys.argv[1:] if args is None else args)
    resolved, given = [], False
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--config" and index + 1 < len(args):
            resolved += ["--config", find_config(args[index + 1])]
            given, index = True, index + 2
            continue
        if arg.startswith("--config="):
            resolved.append("--config=" + find_config(arg.split("=", 1)[1]))
            given = True
        else:
            resolved.append(arg)
        index += 1
    return resolved if given else ["--config", str(CONFIG_ROOT / DEFAULT_CONFIG), *resolved]


class GroundingCLI(LightningCLI):
    """LightningCLI with the entry points' own options and the callbacks every run gets."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="checkpoint to resume (train) or evaluate (eval)")
        parser.add_argument("--validate_before_fit", type=bool, default=True, help="train: evaluate the untrained model first")
        parser.add_lightning_class_args(LastCheckpoint, "checkpoint")
        parser.add_lightning_class_args(TextProgress, "progress")

    def instantiate_trainer(self, **kwargs):
        trainer_config = self._get(self.config_init, "trainer", default={})
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):  # atomic writes unless the user chose
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        callbacks = trainer_config.get("callbacks") or []
        if trainer_config.get("logger") is False and any(isinstance(c, LearningRateMonitor) for c in callbacks):
            # Lightning refuses a LearningRateMonitor without a logger; --trainer.logger false means "log nothing"
            trainer_config["callbacks"] = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
            log.info("--trainer.logger false: the config's LearningRateMonitor is left out")
        if trainer_config.get("enable_progress_bar") is None:  # a bar only on a terminal; TextProgress otherwise
            kwargs.setdefault("enable_progress_bar", sys.stderr.isatty())
        return super().instantiate_trainer(**kwargs)


def build_cli(args: list[str] | None = None) -> GroundingCLI:
    """The parsed command line with model, data module and trainer instantiated (nothing run yet).

    args: the arguments (default: the command line's). From the command line, ``sys.argv`` itself gets the
    resolved arguments: Lightning's DDP launcher starts the other processes with it.
    """
    if args is None:
        sys.argv[1:] = resolve_arguments(None)
    # CPU arithmetic on denormal floats (|x| < 1.2e-38, e.g. softmax tails of sharpening attention) can be
    # many times slower; flushing them to zero changes no result that matters (BENCHMARKS.md). GPUs: no effect.
    torch.set_flush_denormal(True)
    return GroundingCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=None if args is None else resolve_arguments(args),
        save_config_kwargs={"overwrite": True},
    )


def metrics_line(prefix: str, metrics: list[dict]) -> dict:
    """The ``split/AP..`` values of a Trainer.validate/test result, as plain floats (None where undefined)."""
    merged = {k: float(v) for result in metrics for k, v in result.items()}
    return {k.split("/", 1)[1]: (None if math.isnan(v) else round(v, 4)) for k, v in merged.items() if k.startswith(prefix)}


def finish_distributed(barrier: bool = True) -> None:
    """End the process group that the DDP strategy left open (every rank calls this at the end of a run).

    Lightning keeps the group after ``fit``/``test``; left to interpreter shutdown, gloo's threads were
    sometimes destroyed while running ("terminate called without an active exception", exit -6).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def _run() -> Iterator[None]:
    """An interrupted run exits non-zero (128 + signal); the process group is always closed."""
    try:
        yield
    except SIGTERMException:  # Lightning's own stop on SIGTERM is a SystemExit with status 0
        finish_distributed(barrier=False)
        raise SystemExit(interruption_exit_code()) from None
    except BaseException:
        with contextlib.suppress(Exception):
            finish_distributed(barrier=False)
        raise
    finish_distributed()


class _LastValidation(L.Callback):
    """The metrics of the last validation inside ``fit`` and the step it ran at."""

    def __init__(self):
        self.step, self.metrics = None, {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step
            self.metrics = metrics_line("val/", [{k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}])


def print_json(payload: dict) -> None:
    print(json.dumps(payload), flush=True)


def fix_logger_versions(trainer: L.Trainer) -> None:
    """Resolve the loggers' versions before a spawning strategy (``ddp_spawn``) copies them into its workers.

    A TensorBoard logger picks its version (the next free ``version_N``) the first time it is asked. Under
    ``ddp_spawn`` the workers ask first and write to ``version_N``; the main process, asked afterwards for
    ``trainer.log_dir``, would see that folder and answer ``version_N+1``, an empty folder. Asking here, in the
    main process before the spawn, gives the workers and the main process the same version. Launchers that
    start the script once per process (``ddp``) already agree through rank 0 and are left alone.
    """
    if getattr(trainer.strategy, "_start_method", None) in ("spawn", "fork", "forkserver"):
        for logger in trainer.loggers:
            _ = logger.version


def train(args: list[str] | None = None) -> dict:
    """Fit a method (see the module docstring); returns the printed summary."""
    cli = build_cli(args)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    fix_logger_versions(trainer)
    if not is_overridden("training_step", model):
        raise SystemExit(f"{type(model).__name__} has no training step (a test-time method): run grounding-eval with this config")
    validates = is_overridden("validation_step", model)
    with _run():
        before = {}
        if validates and cli.config.validate_before_fit and cli.config.ckpt_path is None:
            before = metrics_line("val/", trainer.validate(model, datamodule=data, verbose=False))
        last_validation = _LastValidation()
        trainer.callbacks.append(last_validation)
        trainer.fit(model, datamodule=data, ckpt_path=cli.config.ckpt_path)
        after = {}
        if validates and last_validation.step == trainer.global_step:  # fit ended with a validation: same weights
            after = last_validation.metrics
        elif validates:
            after = metrics_line("val/", trainer.validate(model, datamodule=data, verbose=False))
        run_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        summary = {"untrained": before, "trained": after, "run_dir": run_dir, "steps": trainer.global_step}
        if trainer.is_global_zero:
            print_json(summary)
    return summary


def evaluate(args: list[str] | None = None) -> dict:
    """``Trainer.test`` of any method on its evaluation split; returns the printed metrics."""
    cli = build_cli(args)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    fix_logger_versions(trainer)
    with _run():
        metrics = metrics_line("test/", trainer.test(model, datamodule=data, ckpt_path=cli.config.ckpt_path, verbose=False))
        run_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        split = getattr(data, "evaluation_split", None)
        if trainer.is_global_zero:
            print_json({"split": split, **metrics, "run_dir": run_dir})
    return {"split": split, **metrics, "run_dir": run_dir}


def train_main() -> None:
    """Console script ``grounding-train``."""
    train()


def eval_main() -> None:
    """Console script ``grounding-eval``."""
    evaluate()
