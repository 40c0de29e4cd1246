"""What one training step costs: the median step time, the peak memory and the trainable parameter count of a
run, written to ``<run>/step_stats.json`` (docs/training.md "Parameter-efficient fine-tuning and weight
averaging").

    --trainer.callbacks+=grounding.lightning.step_stats.StepStats

- ``step_time_s``: the median wall time of a training batch (``on_train_batch_start`` to ``on_train_batch_end``:
  forward, backward and the optimizer step, the weight average's update included), over the batches after the
  first ``warmup`` ones (the first steps allocate the optimizer state and warm the kernels up). On CUDA the
  device is synchronized at both ends.
- ``peak_memory_mb``: from the start of ``fit`` to its end, ``grounding.memory.PeakMemory``: CUDA
  ``max_memory_allocated`` above what was allocated at the start (the weights are allocated before: the
  figure is what training adds, optimizer state and activations); on the CPU the growth of the peak
  resident set of the process. MB = 10⁶ bytes. Under several processes, the largest of theirs.
- ``trainable_parameters`` / ``total_parameters``: elements of the LightningModule's parameters at the start
  of ``fit`` (after freezing, LoRA's adapters counted as trainable).

The file is written at the end of ``fit`` by rank 0, atomically; figures are also logged as ``train/step_time_s``
and ``train/peak_memory_mb``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt

from grounding.memory import PeakMemory
from grounding.utils import write_atomic

#: the file a run's figures go to, in its log folder
STATS_FILE = "step_stats.json"


class StepStats(L.Callback):
    """Measures a run's training steps (module docstring).

    Args:
        warmup: batches left out of the median at the start of ``fit`` (the median needs at least one more).
    """

    def __init__(self, warmup: NonNegativeInt = 2) -> None:
        super().__init__()
        self.warmup = int(warmup)
        self.times: list[float] = []
        self._start: float | None = None
        self._memory: PeakMemory | None = None
        self.parameters: tuple[int, int] = (0, 0)
        self.stats: dict = {}

    def _synchronize(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times, self.stats = [], {}
        params = list(pl_module.parameters())
        self.parameters = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
        self._memory = PeakMemory(str(pl_module.device)).start()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._synchronize(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._start is None:
            return
        self._synchronize(pl_module)
        self.times.append(time.perf_counter() - self._start)
        self._start = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        measured = self.times[self.warmup:] or self.times  # a run shorter than the warm-up keeps every step
        peak = self._memory.peak_mb() if self._memory is not None else None
        step_time = statistics.median(measured) if measured else None
        figures = torch.tensor([peak or 0.0, step_time or 0.0], dtype=torch.float64, device=pl_module.device)
        figures = trainer.strategy.reduce(figures, reduce_op="max")  # the slowest and largest process
        self.stats = {
            "step_time_s": None if step_time is None else float(figures[1]),
            "steps_measured": len(measured),
            "peak_memory_mb": None if peak is None else round(float(figures[0]), 3),
            "memory": "cuda max_memory_allocated" if pl_module.device.type == "cuda" else "peak resident set growth",
            "trainable_parameters": self.parameters[0],
            "total_parameters": self.parameters[1],
            "device": str(pl_module.device),
            "world_size": trainer.world_size,
        }
        for logger in trainer.loggers:
            logger.log_metrics({f"train/{k}": v for k, v in self.stats.items() if k in ("step_time_s", "peak_memory_mb") and v is not None},
                               step=trainer.global_step)
        folder = trainer.log_dir
        if trainer.is_global_zero and folder is not None:
            path = Path(folder) / STATS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.stats, indent=1) + "\n"
            write_atomic(path, lambda temporary: Path(temporary).write_text(text))
