"""Callbacks every run gets from the command line: runs that survive, and logs a cluster user can read.

- ``LastCheckpoint``: ``last.ckpt`` always holds the newest weights. It is written at the end of every
  training epoch, at the end of ``fit``, every ``every_n_train_steps`` steps if asked, and when the run is
  interrupted by SIGTERM or SIGUSR1 (the checkpoint is written at the end of the current step, then the
  process exits with status 128 + signal). It also saves the random-number states, so that a run resumed
  from it (``--ckpt_path .../last.ckpt``, also mid-epoch) continues exactly as the uninterrupted run would
  have. Under SLURM with Lightning's auto-requeue, SIGUSR1 is left to Lightning (it saves an ``hpc_ckpt``
  and requeues the job).
- ``TextProgress``: when the output is not a terminal (``python train.py > run.log 2>&1``, a SLURM log),
  plain lines every ``every_n_steps`` steps: step, epoch, loss, images/s, elapsed and remaining time,
  and the metrics at the end of each evaluation.
- ``AtomicCheckpointIO``: every checkpoint (also the best-k ones of ``ModelCheckpoint``) is written to a
  temporary file beside its destination and renamed over it: an interrupted write never leaves a
  truncated checkpoint nor destroys the previous one. Lightning's loads (``--ckpt_path``) go through
  ``torch.load(weights_only=True)`` with the package's settings classes allowed (``grounding.checkpoints``):
  a checkpoint's pickle runs no code.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from grounding.checkpoints import safe_loading
from grounding.utils import write_atomic

#: the signal that interrupted this process, if any (SIGTERM unless SIGUSR1 was seen)
_received: dict[str, int | None] = {"signum": None}


class RunInterrupted(SystemExit):
    """Raised once the interruption checkpoint is written: the process exits with 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + int(signum))
        self.signum = int(signum)


def interruption_exit_code() -> int:
    """Exit status of a run stopped by a signal (143 for SIGTERM, 138 for SIGUSR1)."""
    return 128 + int(_received["signum"] or signal.SIGTERM)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes go to a temporary file renamed over the destination."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomic(path, lambda temporary: torch.save(checkpoint, temporary))

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, with ``weights_only=True`` unless the caller passes False, and the classes of
        ``grounding.checkpoints.SAFE_CLASS_PATHS`` allowed; a refused file is an ``UnsafeCheckpointError``."""
        with safe_loading(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only is not False)


def _rng_state() -> dict:
    """The global random states, in types a ``weights_only`` checkpoint load accepts (tensors, numbers, tuples)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LastCheckpoint(Callback):
    """See the module docstring.

    dirpath: where ``last.ckpt`` goes (default: ``<run folder>/checkpoints``).
    every_n_train_steps: also write it every N optimizer steps (0: only at epoch ends, the end of fit
        and interruptions).
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0):
        if isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int) or every_n_train_steps < 0:
            raise ValueError(f"checkpoint.every_n_train_steps must be an integer >= 0, got {every_n_train_steps!r}")
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self._saved_at: tuple[int, int] | None = None  # (global step, batches seen) of the last save
        self._gather_rng = False
        self._rng_to_restore: list[dict] | None = None
        self._loader_to_restore: dict | None = None
        self._trainer: L.Trainer | None = None
        self._previous_usr1: Any = None

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / "last.ckpt"

    # ------------------------------------------------------------------------------------- set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit" and self.dirpath is None:
            root = trainer.log_dir or trainer.default_root_dir  # a collective call under DDP: every rank makes it
            self.dirpath = str(Path(root) / "checkpoints")
        # the environment Lightning's own signal handling looks at (also for a single device under SLURM)
        environment = getattr(trainer.strategy, "cluster_environment", None) or getattr(
            getattr(trainer, "_accelerator_connector", None), "cluster_environment", None
        )
        slurm_requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        if hasattr(signal, "SIGUSR1") and not slurm_requeue and threading.current_thread() is threading.main_thread():
            self._previous_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_usr1 is not None and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGUSR1) == self._on_usr1:
                signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None

    @staticmethod
    def _on_usr1(signum, frame) -> None:
        """SIGUSR1 is handled as SIGTERM (Lightning's handler: flag the trainer, forward to child processes)."""
        _received["signum"] = signum
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):
            handler(signum, frame)
        else:  # no trainer is running: behave as the default action, but with a clear status
            raise RunInterrupted(signum)

    # ------------------------------------------------------------------------------------- saving
    def save(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` (every rank calls this; rank 0 writes), once per step and position."""
        where = (trainer.global_step, trainer.fit_loop.epoch_loop.batch_progress.total.ready)
        if self._saved_at == where:
            return
        self._gather_rng = True
        try:
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state: resuming needs it
        finally:
            self._gather_rng = False
        self._saved_at = where

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        stop = bool(trainer.received_sigterm)
        if trainer.world_size > 1:  # every process stops at the same step, or the collective save would hang
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.save(trainer)
            rank_zero_info(f"interrupted at step {trainer.global_step}: wrote {self.path}; resume with --ckpt_path {self.path}")
            raise RunInterrupted(_received["signum"] or signal.SIGTERM)
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A signal seen outside a training step (e.g. during validation): with one process the weights of the
        # last step can still be written; with several, the processes may be at different places (no save).
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and not trainer.sanity_checking:
            if trainer.world_size == 1:
                self.save(trainer)
                rank_zero_info(f"interrupted: wrote {self.path}")
            else:
                rank_zero_warn(f"interrupted outside a training step: {self.path} is from step {self._saved_at}")

    # ------------------------------------------------------------------------------------- resumable state
    def state_dict(self) -> dict:
        states = [_rng_state()]
        if self._gather_rng and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        state = {"rng_states": states}
        loader = self._train_loader()
        if loader is not None:
            state["train_loader"] = loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._rng_to_restore = state_dict.get("rng_states")
        self._loader_to_restore = state_dict.get("train_loader")

    def _train_loader(self):
        """The training loader when it can resume mid-epoch (``ResumableDataLoader``), else None."""
        from grounding.data.sampling import ResumableDataLoader

        loader = getattr(self._trainer, "train_dataloader", None) if self._trainer is not None else None
        return loader if isinstance(loader, ResumableDataLoader) else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning restores a loader's state only if the loader was first built after the checkpoint's loop
        # state was read; a module asking for ``trainer.estimated_stepping_batches`` in configure_optimizers
        # (a cosine schedule) builds it earlier, and the resumed epoch would replay its first batches.
        loader = self._train_loader()
        if self._loader_to_restore is not None and loader is not None:
            loader.load_state_dict(self._loader_to_restore)
        self._loader_to_restore = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # restored here, after everything between the checkpoint and the first resumed step that an
        # uninterrupted run would not have done (sanity check, loader start-up) has consumed random numbers
        if self._rng_to_restore:
            states = self._rng_to_restore
            rank = trainer.global_rank
            if len(states) != trainer.world_size:
                rank_zero_warn(
                    f"the checkpoint holds the random states of {len(states)} process(es), this run has"
                    f" {trainer.world_size}: every process continues from rank 0's"
                )
            _set_rng_state(states[rank] if len(states) == trainer.world_size else states[0])
            self._rng_to_restore = None


def _batch_size(batch: Any) -> int:
    """Images in a batch: a list of samples, a dict holding a per-image list (``targets``) or an image tensor."""
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], dict):
        return len(batch)  # lists of samples (region data)
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() > 0):
                return len(value)
    return 1


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class TextProgress(Callback):
    """Plain progress lines on stderr; see the module docstring.

    every_n_steps: a line every N training steps (and every N evaluation batches).
    mode: ``auto`` (only when stderr is not a terminal), ``always`` or ``never``.
    """

    MODES = ("auto", "always", "never")

    def __init__(self, every_n_steps: int = 50, mode: Literal["auto", "always", "never"] = "auto"):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"progress.every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if mode not in self.MODES:
            raise ValueError(f"progress.mode must be one of {self.MODES}, got {mode!r}")
        self.every_n_steps, self.mode = every_n_steps, mode
        self._start = 0.0
        self._images = 0
        self._first_step = 0
        self._eval_start = 0.0

    @property
    def enabled(self) -> bool:
        return self.mode == "always" or (self.mode == "auto" and not sys.stderr.isatty())

    def _print(self, trainer: L.Trainer, line: str) -> None:
        if self.enabled and trainer.is_global_zero:
            print(line, file=sys.stderr, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._images, self._first_step = time.monotonic(), 0, trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self._images += _batch_size(batch) * trainer.world_size
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or not self.enabled:
            return
        elapsed = time.monotonic() - self._start
        total = trainer.estimated_stepping_batches
        done = max(step - self._first_step, 1)
        left = (total - step) * elapsed / done if total != float("inf") else float("nan")
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss_text = f"{float(loss):.4f}" if isinstance(loss, torch.Tensor) else "skipped"
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        total_text = f"/{int(total)}" if total != float("inf") else ""
        self._print(
            trainer,
            f"[train] step {step}{total_text} epoch {trainer.current_epoch + 1}{epochs} loss {loss_text}"
            f" {self._images / max(elapsed, 1e-9):.1f} img/s elapsed {_duration(elapsed)}"
            + (f" left {_duration(left)}" if left == left else ""),
        )

    def _evaluation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start = time.monotonic()

    def _evaluation_batch(self, trainer: L.Trainer, stage: str, batch_idx: int, total: Any) -> None:
        if (batch_idx + 1) % self.every_n_steps:
            return
        total = sum(total) if isinstance(total, list) else total
        elapsed = time.monotonic() - self._eval_start
        left = (total - batch_idx - 1) * elapsed / (batch_idx + 1) if total != float("inf") else float("nan")
        self._print(trainer, f"[{stage}] batch {batch_idx + 1}/{total} elapsed {_duration(elapsed)}"
                             + (f" left {_duration(left)}" if left == left else ""))

    def _evaluation_end(self, trainer: L.Trainer, prefix: str) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        shown = " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in sorted(metrics.items()))
        self._print(trainer, f"[{prefix.rstrip('/')}] step {trainer.global_step} done in"
                             f" {_duration(time.monotonic() - self._eval_start)}: {shown}")

    on_validation_start = _evaluation_start
    on_test_start = _evaluation_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._evaluation_batch(trainer, "val", batch_idx, trainer.num_val_batches)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._evaluation_batch(trainer, "test", batch_idx, trainer.num_test_batches)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluation_end(trainer, "val/")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluation_end(trainer, "test/")

    on_predict_start = _evaluation_start

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._evaluation_batch(trainer, "predict", batch_idx, trainer.num_predict_batches)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, f"[predict] done in {_duration(time.monotonic() - self._eval_start)}")
