"""Command lines of the entry points: LightningCLI over a method's LightningModule and its DataModule.

Every constructor argument of the module (``--model.*``) and the DataModule (``--data.*``) and every
Trainer setting (``--trainer.*``) is a command-line flag and a YAML key; ``--config FILE`` loads YAML.
"""

from __future__ import annotations

import json
from pathlib import Path

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
        parser.add_argument("--split", type=str, default="val", help="eval: which split to evaluate (val or test)")


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


def metrics_line(prefix: str, metrics: list[dict]) -> dict:
    """The ``split/AP..`` values of a Trainer.validate/test result, as plain floats."""
    merged = {k: float(v) for result in metrics for k, v in result.items()}
    return {k.split("/", 1)[1]: round(v, 4) for k, v in merged.items() if k.startswith(prefix)}


def print_json(payload: dict) -> None:
    print(json.dumps(payload), flush=True)
