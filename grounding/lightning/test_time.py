"""The base of the test-time LightningModules (MaskInversion, InvSeg, GEM, MIMIC): the glue they share.

A test-time module trains nothing; ``Trainer.test`` scores a split and ``Trainer.predict`` runs the same
per-sample computation without scoring. The base does, once for all of them:

- reading the DataModule's classes at ``setup`` (``classes_from``, a subclass hook);
- the epoch-start reset (picture count, the subclass's metrics and collected outputs: ``reset_epoch``);
- ``test_step`` / ``predict_step`` = ``process(batch, score=True / False)``;
- when a picture goes to TensorBoard (``picture_logger``: the main process, a logger that takes images, fewer
  than the module's budget so far);
- per-sample random generators seeded by (seed, sample id), so a sample's result does not depend on the
  process it ran on or on the samples before it (``sample_generator``);
- gathering each process's records of the epoch to every process (``gather``);
- the names of the model dtypes a setting may take (``DtypeName``, ``torch_dtype`` of ``grounding.models.dtypes``).

The method's own computation lives in ``grounding.models``; a subclass only feeds it samples, scores, logs and
writes.
"""

from __future__ import annotations

import dataclasses
import zlib
import math
from typing import Any

import lightning as L
import torch
from torchmetrics import Metric

from grounding.models.dtypes import DtypeName, torch_dtype

__all__ = ["DtypeName", "TestTimeModule", "plain_settings", "sample_seed", "torch_dtype"]


def sample_seed(seed: int, sample_id: Any) -> int:
    """The seed of one sample: the run's ``seed`` combined with the crc32 of the sample id's text."""
    return int(seed) * 1_000_003 + zlib.crc32(str(sample_id).encode())


def plain_settings(value: Any) -> Any:
    """``value`` as plain Python values (dataclasses as dicts, tuples as lists, NaN floats as None), for strict
    JSON files and for ``torch.load(weights_only=True)``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_settings(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain_settings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_settings(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


class TestTimeModule(L.LightningModule):
    """Subclasses define ``process(batch, score)`` and, as they need, ``classes_from(datamodule)``,
    ``reset_epoch()``, ``picture_limit`` and the epoch-end hooks; ``hparams.seed`` (when there is one) seeds
    ``sample_generator``."""

    def __init__(self) -> None:
        super().__init__()
        self._logged = 0

    # ------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.classes_from(datamodule)

    def classes_from(self, datamodule: L.LightningDataModule) -> None:
        """Take what the method needs of the DataModule (class names, background class, ignore label)."""

    # ------------------------------------------------------------------------------------- loops
    def reset_epoch(self) -> None:
        """Forget the previous epoch: every torchmetrics attribute is reset (subclasses add their own state)."""
        for module in self.children():
            if isinstance(module, Metric):
                module.reset()
            elif isinstance(module, torch.nn.ModuleDict):
                for value in module.values():
                    if isinstance(value, Metric):
                        value.reset()

    def on_test_epoch_start(self) -> None:
        self._logged = 0
        self.reset_epoch()

    def on_predict_epoch_start(self) -> None:
        self._logged = 0
        self.reset_epoch()

    def process(self, batch: list[dict], score: bool) -> Any:
        """Run the method on every sample of ``batch``; update the metrics when ``score``."""
        raise NotImplementedError

    def test_step(self, batch: list[dict], batch_idx: int) -> Any:
        return self.process(batch, score=True)

    def predict_step(self, batch: list[dict], batch_idx: int) -> Any:
        return self.process(batch, score=False)

    def configure_optimizers(self) -> None:  # nothing is trained
        return None

    # ------------------------------------------------------------------------------------- helpers
    def gather(self, items: list) -> list:
        """Every process's ``items``, concatenated in rank order (a collective call under DDP: every process
        makes it); the items themselves with one process."""
        if (self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_available()
                and torch.distributed.is_initialized()):
            gathered: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, list(items))
            return [item for part in gathered for item in part]
        return list(items)

    @property
    def picture_limit(self) -> int:
        """How many pictures an epoch logs (the ``log_images`` setting unless a subclass says otherwise)."""
        return int(self.hparams.get("log_images", 0))

    def sample_generator(self, sample_id: Any) -> torch.Generator:
        """A CPU generator seeded by (``hparams.seed``, ``sample_id``)."""
        return torch.Generator().manual_seed(sample_seed(self.hparams.get("seed", 0), sample_id))

    def picture_logger(self) -> Any | None:
        """TensorBoard's writer when this process logs pictures and the epoch's budget is not spent, else None.
        The caller counts each picture it logs in ``self._logged``."""
        if self._trainer is None or not self.trainer.is_global_zero:
            return None
        if self._logged >= self.picture_limit:
            return None
        experiment = getattr(self.logger, "experiment", None)
        return experiment if experiment is not None and hasattr(experiment, "add_image") else None
