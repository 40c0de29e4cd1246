"""Command line: ``python -m grounding.data.synthetic --out DIR [--force] [--<setting> VALUE ...]``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Sequence

from .config import SyntheticConfig
from .writer import ensure_synthetic, generate, load_meta


def build_arg_parser() -> argparse.ArgumentParser:
    """Return the CLI parser: ``--out`` plus one flag per SyntheticConfig field and ``--force``."""
    parser = argparse.ArgumentParser(
        prog="python -m grounding.data.synthetic",
        description="Generate the synthetic coloured-shapes grounding dataset.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--force", action="store_true", help="delete an existing dataset and regenerate")
    defaults = SyntheticConfig()
    for config_field in dataclasses.fields(SyntheticConfig):
        flag = "--" + config_field.name.replace("_", "-")
        default = getattr(defaults, config_field.name)
        aliases = ["--colors"] if config_field.name == "colours" else []
        if isinstance(default, tuple):
            parser.add_argument(flag, *aliases, dest=config_field.name, type=str, default=",".join(default),
                                help=f"comma-separated (default: {','.join(default)})")
        else:
            parser.add_argument(flag, dest=config_field.name, type=type(default), default=default,
                                help=f"(default: {default})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (2 on invalid settings or a mismatch)."""
    args = build_arg_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)}
    try:
        config = SyntheticConfig(**values)
        start = time.perf_counter()
        if args.force:
            root = generate(args.out, config, overwrite=True)
        else:
            already = (Path(args.out) / "meta.json").exists()
            root = ensure_synthetic(args.out, config)
            if already:
                print(f"dataset already present at {root} (same settings); nothing to do")
                return 0
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    meta = load_meta(root)
    summary = ", ".join(f"{split}: {c['images']} images / {c['annotations']} objects / {c['sentences']} sentences"
                        for split, c in meta["counts"].items())
    print(f"wrote {root} in {time.perf_counter() - start:.1f}s ({summary})")
    return 0
