"""StepStats: the median step time after the warm-up, the parameter counts, the file it writes."""

from __future__ import annotations

import json
import statistics

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from grounding.lightning.step_stats import STATS_FILE, StepStats


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(4, 8).requires_grad_(False)  # 40 parameters, none trainable
        self.head = torch.nn.Linear(8, 1)  # 9 trainable

    def training_step(self, batch, _index):
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.head(self.frozen(inputs)).squeeze(-1), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def test_step_stats_of_a_run(tmp_path):
    data = TensorDataset(torch.randn(12, 4), torch.randn(12))
    stats = StepStats(warmup=2)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", callbacks=[stats], logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Tiny(), DataLoader(data, batch_size=2))
    assert len(stats.times) == 6
    written = json.loads((tmp_path / "lightning_logs" / "version_0" / STATS_FILE).read_text())
    assert written["steps_measured"] == 4
    assert written["step_time_s"] == statistics.median(stats.times[2:])
    assert (written["trainable_parameters"], written["total_parameters"]) == (9, 49)
    assert written["peak_memory_mb"] is not None and written["peak_memory_mb"] >= 0
    assert written["memory"] == "peak resident set growth" and written["world_size"] == 1
