"""Shared fixtures: a tiny synthetic dataset generated once per session, tiny models; ``run_in_process``, the
1-process reference run of the DDP comparisons."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from grounding.data.synthetic import SyntheticConfig, generate

TINY_DATA = {"image_size": 96, "num_train": 12, "num_val": 5, "num_test": 4, "max_objects": 3, "seed": 3}

#: a smaller Grounding DINO than the demo model, for fast tests
TEST_MODEL_CONFIG = {
    "backbone_config": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 3},
    "text_config": {"hidden_size": 32, "intermediate_size": 64},
    "d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "num_queries": 30, "max_text_len": 32,
}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """Folder of a tiny synthetic dataset (96 px, 12/5/4 images)."""
    return generate(tmp_path_factory.mktemp("synthetic") / "data", SyntheticConfig(**TINY_DATA))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained_detector(synthetic_root, tmp_path_factory):
    """Two training steps of the test-sized detector, saved by the Trainer (``train_checkpoint``): ``.module``,
    ``.data``, ``.path``."""
    from .models.test_detector import train_checkpoint

    return train_checkpoint(synthetic_root, tmp_path_factory.mktemp("detector_run"))


#: the root scripts' entry points (``python SCRIPT`` calls ``grounding.cli.<name>`` with the command line)
SCRIPT_ENTRY_POINTS = {"train.py": "train", "eval.py": "evaluate", "predict.py": "predict"}


def run_in_process(script: str, args: list[str], cwd: Path, threads: int | None = None) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` run in this process through its ``grounding.cli`` entry point: what
    ``subprocess.run(..., cwd=cwd, capture_output=True, text=True)`` gives, without a subprocess's ~10 s of imports.

    threads: torch threads during the run (a subprocess's ``OMP_NUM_THREADS``), else this process's. The log
    records go to the captured stderr, as a subprocess's do. Afterwards the working folder, thread count,
    environment (Lightning's ``seed_everything`` sets ``PL_GLOBAL_SEED``) and random states are restored: later
    tests see the process as before. An error is raised here, not returned as an exit status.
    """
    from grounding import cli

    entry = getattr(cli, SCRIPT_ENTRY_POINTS[script])
    stdout, stderr = io.StringIO(), io.StringIO()
    records = logging.StreamHandler(stderr)
    # Lightning's loggers stop at their own handler when the root logger had none when lightning was imported
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")
                                       if not logging.getLogger(name).propagate]
    folder, environment, num_threads = os.getcwd(), dict(os.environ), torch.get_num_threads()
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    for logger in loggers:
        logger.addHandler(records)
    try:
        os.chdir(cwd)
        if threads is not None:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            entry(list(args))
    finally:
        for logger in loggers:
            logger.removeHandler(records)
        os.chdir(folder)
        os.environ.clear()
        os.environ.update(environment)
        torch.set_num_threads(num_threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
    return subprocess.CompletedProcess([script, *args], 0, stdout.getvalue(), stderr.getvalue())
