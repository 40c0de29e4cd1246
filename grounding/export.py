"""``grounding-export``: a trained detector's Lightning checkpoint as a folder transformers loads by itself.

::

    grounding-export --ckpt_path RUN/checkpoints/last.ckpt --out exported/ [--overwrite]

reads the ``ImageGroundingModule`` checkpoint safely (``grounding.models.detector.read_checkpoint``: tensors,
plain values and the module's settings dataclasses only), rebuilds the detector and writes the model
(``model.safetensors``, ``config.json``) and its processor (tokenizer files, ``processor_config.json`` with
the image processor's resize) into ``--out`` atomically. A run trained with LoRA (``--model.lora.r``) is
exported with its adapters merged into the weights, ``W + (alpha / r) B A``: the folder holds transformers' own
keys and no adapter (loading it needs no peft); a run with a weight average (``WeightEMA``) is exported with the
averaged weights, which its checkpoints hold as their ``state_dict``. The folder then works without this package::

    AutoModelForZeroShotObjectDetection.from_pretrained("exported/"); AutoProcessor.from_pretrained("exported/")
    pipeline("zero-shot-object-detection", model="exported/")

stdout gets one JSON line, ``{"out": ..., "parameters": N, "checkpoint": ..., "image_size": ..., "max_size":
..., "files": [...]}``. Bad input (a missing checkpoint, one of another LightningModule or holding other
pickled objects, an existing non-empty ``--out`` without ``--overwrite``) is one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "grounding-export"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Export the detector of an ImageGroundingModule checkpoint as a transformers folder "
        "(model + processor) for AutoModelForZeroShotObjectDetection / pipeline('zero-shot-object-detection').",
    )
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint of ImageGroundingModule (RUN/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="folder to write (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    parser.add_argument("--image_size", type=int, default=None, help="shorter side of the resize (default: the checkpoint's data.image_size)")
    parser.add_argument("--max_size", type=int, default=None, help="cap of the longer side (default: the checkpoint's data.max_size)")
    return parser


def export(ckpt_path: str | Path, out: str | Path, overwrite: bool = False, image_size: int | None = None,
           max_size: int | None = None) -> dict:
    """Write the folder; returns what the command prints."""
    out = Path(out)
    # fail on the folder before the (slower) checkpoint reading; save_pretrained checks again before writing
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (--overwrite replaces it)")
    from grounding.models.detector import GroundingDetector

    detector = GroundingDetector.from_checkpoint(ckpt_path, image_size=image_size, max_size=max_size)
    detector.save_pretrained(out, overwrite=overwrite)
    size = detector.processor.image_processor.size
    return {
        "out": str(out),
        "parameters": detector.num_parameters,
        "checkpoint": str(ckpt_path),
        "image_size": size["shortest_edge"],
        "max_size": size["longest_edge"],
        "files": sorted(path.name for path in out.iterdir()),
    }


def main(argv: list[str] | None = None) -> int:
    """The command; returns the exit status (0, or 2 for bad input, argparse's included)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a bad command line (already reported on one line)
        return done.code if isinstance(done.code, int) else 2
    ckpt_path = Path(args.ckpt_path)
    if not ckpt_path.is_file():
        print(f"{PROG}: error: --ckpt_path {ckpt_path}: no such file", file=sys.stderr)
        return 2
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        summary = export(ckpt_path, args.out, args.overwrite, args.image_size, args.max_size)
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        message = " ".join(str(error).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
