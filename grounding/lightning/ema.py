"""An exponential moving average (EMA) of the weights, evaluated and checkpointed in their place
(docs/training.md "Parameter-efficient fine-tuning and weight averaging").

``WeightEMA`` is Lightning's ``EMAWeightAveraging`` (``lightning.pytorch.callbacks``, Lightning >= 2.6), which is
used because it does what a run needs of an average without any change to the modules: it keeps a copy of the
LightningModule (``torch.optim.swa_utils.AveragedModel``) updated after every optimizer step, swaps the averaged
weights in for every validation (so the logged metrics, the ``ModelCheckpoint`` monitor and the best checkpoints
are the average's), saves the average as the checkpoint's ``state_dict`` (the training weights go under
``current_model_state``, the average's step count under ``averaging_state``) and restores both when a run is
resumed. Evaluation (``grounding-eval``), ``GroundingDetector.from_checkpoint`` and ``grounding-export`` read
``state_dict``, so they all use the average. After ``fit`` the module holds the average.

What it averages: every parameter and buffer of the LightningModule (the detector, the denoising label table),
trainable or not. A frozen weight (LoRA's base weights, a frozen text encoder) never changes, so its average is
itself, and only the trainable ones (adapters, heads) move. With LoRA the adapters' factors A and B are
averaged separately: the average adapter is avg(B)·avg(A), not the average of the products B·A.

What this subclass changes, each one a case where the stock callback gives wrong or slow results here:

- the update is ``torch._foreach_lerp_`` (``avg + (1 - decay)(w - avg)``, as ``get_ema_multi_avg_fn``) instead of
  ``decay·avg + (1 - decay)·w``: the latter moves a constant weight by a rounding error at every step (frozen base
  weights would drift by about one float32 ulp, about 15% of them per step); a lerp towards an equal value
  leaves it exactly as it is. Integer buffers (Swin's relative position index, BERT's position ids) are copied,
  never averaged;
- the average lives on the module's device: the stock callback builds it in ``setup``, before the strategy moves
  the module to the GPU (and gives it the precision's dtype), so it would stay on the CPU and every step would
  copy all weights across; here it moves at the start of fit (unless ``device`` is given), and takes the
  module's dtype where that is wider (``64-true``); under ``bf16-true`` / ``16-true`` it stays in float32, where
  small updates ``(1 - decay)(w - avg)`` are not lost to rounding, and is not rounded by the swaps;
- a checkpoint written while the average is swapped in (a SIGTERM during validation, on which
  ``grounding.lightning.callbacks.LastCheckpoint`` saves ``last.ckpt``; any save during validation) or after
  ``fit`` has put the average in the module stores the average as ``state_dict`` and the training weights as
  ``current_model_state``, as one written at any other time (the stock callback would store them the other way
  round, or the average twice);
- a checkpoint written at the end of a step before the callback's own update of that step (``LastCheckpoint``'s
  every-N-steps or SIGTERM saves when it comes first in the callback list) first brings the average up to date,
  so that a run resumed from it averages exactly the same weights as the uninterrupted one.

``ModelCheckpoint(save_weights_only=True)`` skips the callbacks' checkpoint hooks: such files hold the training
weights, not the average (a warning says so).

From the command line (the settings are ``EMAWeightAveraging``'s)::

    grounding-train --config image/coco.yaml --trainer.callbacks+=grounding.lightning.ema.WeightEMA \\
        --trainer.callbacks.decay 0.999
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, WeightAveraging
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


def ema_update(decay: float):
    """The ``multi_avg_fn`` of an ``AveragedModel``: floating tensors move by ``lerp(avg, w, 1 - decay)`` (exact
    for a constant ``w``; ``w`` taken in the average's dtype), the others take the current value."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], _count: Any) -> None:
        floating = [i for i, tensor in enumerate(averaged) if tensor.is_floating_point() or tensor.is_complex()]
        if floating:
            torch._foreach_lerp_([averaged[i] for i in floating],
                                 [current[i].to(averaged[i].dtype) for i in floating], 1.0 - decay)
        chosen = set(floating)
        for i, tensor in enumerate(averaged):
            if i not in chosen:
                tensor.copy_(current[i])

    return update


class WeightEMA(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` with the changes listed in the module docstring.

    Args:
        decay: weight of the previous average at each update (0.999: an average over about the last 1,000 steps).
        update_every_n_steps, update_starting_at_step, update_starting_at_epoch: when to update (Lightning's
            ``EMAWeightAveraging``: every step by default; ``update_starting_at_step: N`` starts the average at
            step N, the first update copying the weights).
        device: where the average lives (default: the module's device once fit starts; ``"cpu"`` saves GPU memory
            at the cost of a copy per step).
        use_buffers: average (copy, for integer ones) the buffers too (Lightning's default).
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        device: str | int | None = None,
        use_buffers: bool = True,
    ):
        if isinstance(decay, bool) or not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
            raise ValueError(f"WeightEMA decay must be in [0, 1], got {decay!r}")
        if isinstance(update_every_n_steps, bool) or not isinstance(update_every_n_steps, int) or update_every_n_steps < 1:
            raise ValueError(f"WeightEMA update_every_n_steps must be an integer >= 1, got {update_every_n_steps!r}")
        # EMAWeightAveraging.__init__ would set avg_fn (decay·avg + (1 - decay)·w); the lerp goes in its place
        WeightAveraging.__init__(self, device=device, use_buffers=use_buffers, multi_avg_fn=ema_update(float(decay)))
        self.decay = float(decay)
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch
        self._swapped = False  # the module holds the average and the AveragedModel the training weights
        self._swapped_for_validation = False
        self._wide: dict[int, torch.Tensor] = {}  # while swapped: the averages wider than the module's weights
        self._trainer: L.Trainer | None = None
        self._module: L.LightningModule | None = None

    # ------------------------------------------------------------------------------------- set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._trainer, self._module = trainer, pl_module
            self._swapped = self._swapped_for_validation = False
            self._wide = {}
            if any(isinstance(c, ModelCheckpoint) and c.save_weights_only for c in trainer.callbacks):
                rank_zero_warn("WeightEMA: a ModelCheckpoint with save_weights_only=True writes the training weights,"
                               " not their average (the callbacks' checkpoint hooks are skipped for such files)")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the strategy has moved the module to its device and given it the precision's dtype by now
        average = self._average_model
        if average is None:
            return
        if self._device is None:
            average.to(pl_module.device)
        pairs = zip(itertools.chain(average.module.parameters(), average.module.buffers()),
                    itertools.chain(pl_module.parameters(), pl_module.buffers()))
        for averaged, current in pairs:  # a wider dtype (64-true) is followed; a narrower one (bf16-true) is not
            if averaged.is_floating_point() and current.is_floating_point() and (
                torch.finfo(current.dtype).bits > torch.finfo(averaged.dtype).bits
            ):
                averaged.data = averaged.data.to(current.dtype)

    # ------------------------------------------------------------------------------------- swapping
    def _swap_models(self, pl_module: L.LightningModule) -> None:
        """Lightning's swap of the module's and the average's values. Where the average is wider than the module's
        tensor (float32 under ``bf16-true``), the module gets it rounded while it is swapped in, and the full
        average is kept aside and comes back on the swap back (Lightning's swap would round it each time)."""
        average = self._average_model
        pairs = zip(itertools.chain(average.module.parameters(), average.module.buffers()),
                    itertools.chain(pl_module.parameters(), pl_module.buffers()))
        back = self._swapped
        for index, (averaged, current) in enumerate(pairs):
            held = averaged.data.clone()
            averaged.data.copy_(current.data)
            current.data.copy_(held)
            if averaged.dtype != current.dtype:
                if back:
                    averaged.data.copy_(self._wide.pop(index))
                else:
                    self._wide[index] = held

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None and not self._swapped:
            self._swap_models(pl_module)
            self._swapped = self._swapped_for_validation = True

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped_for_validation:
            self._swap_models(pl_module)
            self._swapped = self._swapped_for_validation = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the module takes the average, as with the stock callback; the training weights stay in the AveragedModel
        # (a swap, not a copy), so that a checkpoint written from here on still holds both
        if self._average_model is not None and not self._swapped:
            self._swap_models(pl_module)
            self._swapped = True

    # ------------------------------------------------------------------------------------- checkpoints
    def _pending_update(self) -> bool:
        trainer = self._trainer
        if trainer is None or self._average_model is None or self._swapped:
            return False
        training = trainer.state.fn == TrainerFn.FITTING and trainer.state.stage == RunningStage.TRAINING
        step = trainer.global_step
        return training and step > self._latest_update_step and self.should_update(step_idx=step - 1)

    def state_dict(self) -> dict[str, Any]:
        # called first when a full checkpoint is written: the update due for the step just taken comes before it
        if self._pending_update():
            self._average_model.update_parameters(self._module)
            self._latest_update_step = self._trainer.global_step
        return super().state_dict()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is None or not self._swapped:
            return super().on_save_checkpoint(trainer, pl_module, checkpoint)
        # swapped: the module (hence checkpoint["state_dict"]) holds the average, the AveragedModel the training
        # weights; copies, as the swap back after validation changes these tensors before the file is written
        averaged_state = self._average_model.state_dict()
        checkpoint["current_model_state"] = {
            name[len("module."):]: value.detach().clone() for name, value in averaged_state.items() if name.startswith("module.")
        }
        checkpoint["state_dict"] = {name: value.detach().clone() for name, value in checkpoint["state_dict"].items()}
        checkpoint["averaging_state"] = {name: value for name, value in averaged_state.items() if not name.startswith("module.")}
