"""Command lines of the entry points: LightningCLI over a method's LightningModule and its DataModule.

Every constructor argument of the module (``--model.*``) and the DataModule (``--data.*``) and every
Trainer setting (``--trainer.*``) is a command-line flag and a YAML key; ``--config FILE`` loads YAML.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI

from grounding.data.datamodule import CocoDetectionDataModule
from grounding.lightning.image_module import ImageGroundingModule

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE_CONFIG = REPO / "configs" / "image" / "synthetic.yaml"


class GroundingCLI(LightningCLI):
    """LightningCLI with the options of ``train.py`` / ``eval.py`` beside the model, data and trainer."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="checkpoint to resume (train) or evaluate (eval)")
        parser.add_argument("--validate_before_fit", type=bool, default=True, help="train: evaluate the untrained model first")
        parser.add_argument("--split", type=str, default="val", help="eval, IMAGE: which split to evaluate (val or test); MaskInversion evaluates --data.split")


def image_cli(args: list[str] | None = None) -> GroundingCLI:
    """The IMAGE command line, defaulting to the synthetic-dataset config."""
    defaults = [str(DEFAULT_IMAGE_CONFIG)] if DEFAULT_IMAGE_CONFIG.exists() else []
    return GroundingCLI(
        ImageGroundingModule,
        CocoDetectionDataModule,
        run=False,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_config_files": defaults},
    )


def _config_files(args: list[str] | None) -> list[Path]:
    args = sys.argv[1:] if args is None else args
    files = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            files.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def names_its_classes(args: list[str] | None) -> bool:
    """Does a ``--config`` file give the model as ``class_path`` (any method) rather than IMAGE's settings?"""
    for path in _config_files(args):
        if not path.is_file():
            continue  # LightningCLI reports the missing file
        with open(path, encoding="utf-8") as stream:
            content = yaml.safe_load(stream)
        if isinstance(content, dict) and isinstance(content.get("model"), dict) and "class_path" in content["model"]:
            return True
    return False


def grounding_cli(args: list[str] | None = None) -> GroundingCLI:
    """The command line of any method: configs that name their model and data classes (``class_path``,
    e.g. ``configs/maskinversion/*.yaml``) select them; otherwise IMAGE (``image_cli``)."""
    if not names_its_classes(args):
        return image_cli(args)
    return GroundingCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


def metrics_line(prefix: str, metrics: list[dict]) -> dict:
    """The ``split/AP..`` values of a Trainer.validate/test result, as plain floats."""
    merged = {k: float(v) for result in metrics for k, v in result.items()}
    return {k.split("/", 1)[1]: round(v, 4) for k, v in merged.items() if k.startswith(prefix)}


def finish_distributed() -> None:
    """End the process group that the DDP strategy left open (every rank calls this at the end of a run).

    Lightning keeps the group after ``fit``/``test``; left to interpreter shutdown, gloo's threads were
    sometimes destroyed while running ("terminate called without an active exception", exit -6).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print_json(payload: dict) -> None:
    print(json.dumps(payload), flush=True)
