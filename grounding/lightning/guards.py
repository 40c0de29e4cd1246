"""Training-step guards shared by the trainable methods.

``NonFiniteGuard``: a NaN or infinite loss on any process skips the optimizer step on every process
(``training_step`` returns None everywhere, so DDP's gradient all-reduce stays in step), is counted and
logged (``train/nonfinite_skipped``), and a run with ``limit`` such losses in a row stops with
``NonFiniteLossError`` naming the setting, instead of training on garbage or diverging silently.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


class NonFiniteGuard:
    """See the module docstring. limit: non-finite losses in a row that stop the run (>= 1)."""

    def __init__(self, limit: int = 10, setting: str = "model.max_nonfinite_steps"):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"{setting} must be an integer >= 1, got {limit!r}")
        self.limit, self.setting = limit, setting
        self.skipped = 0
        self.in_row = 0

    def __call__(self, module: L.LightningModule, loss: torch.Tensor) -> torch.Tensor | None:
        """``loss`` when it is finite on every process, else None (skip this step)."""
        finite = bool(torch.isfinite(loss.detach()).all())
        trainer = module._trainer
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.in_row = 0
            return loss
        self.skipped += 1
        self.in_row += 1
        step = module.global_step
        if trainer is not None:
            module.log("train/nonfinite_skipped", float(self.skipped), rank_zero_only=True)
        log.warning("step %d: non-finite loss on at least one process; optimizer step skipped (%d in a row, %d in all)",
                    step, self.in_row, self.skipped)
        if self.in_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_row} non-finite (NaN/inf) losses in a row at step {step} ({self.skipped} skipped in all);"
                f" stopping ({self.setting}={self.limit}). Lower the learning rate, enable gradient clipping,"
                " or check the data for broken boxes."
            )
        return None
