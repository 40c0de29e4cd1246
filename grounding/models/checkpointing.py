"""Activation checkpointing of Grounding DINO / MM-Grounding-DINO for training: ``--model.gradient_checkpointing``
(docs/image.md "Freezing and gradient checkpointing").

A checkpointed layer keeps only its inputs during the forward pass and runs its forward again when the backward
pass reaches it, so at most one layer's activations exist at a time besides the layers' inputs, at the cost of
about one more forward pass per step. What is checkpointed, layer by layer:

- Swin's blocks (``SwinLayer``, 2 + 2 + 6 + 2 in Swin-T) and BERT's layers (``BertLayer``): transformers 5
  supports checkpointing for these (``GradientCheckpointingLayer``); they get the library's own switch, with
  this module's checkpoint function. Only the innermost checkpointable layers are switched on (Swin's blocks,
  not also the stages around them, which would compute every block three times).
- the encoder's layers (text enhancer + fusion + deformable attention) and the decoder's layers: transformers'
  Grounding DINO supports no checkpointing here (``supports_gradient_checkpointing`` is False, and the decoder's
  own ``gradient_checkpointing`` branch passes its arguments to the layer in the wrong order). Their classes'
  ``forward`` is wrapped once (``_checkpointable``) and the wrapper checkpoints an instance whose
  ``checkpoint_activations`` attribute is true, in training with gradients enabled; any other call runs the
  original forward unchanged.

Every checkpoint is ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False, preserve_rng_state=True)``:
non-reentrant (keyword arguments pass through, DDP and frozen parameters need no special care, the inputs need
not require gradients) and with the random state of the first run restored for the recomputation, so dropout,
drop path and anything else drawn inside a layer draws the same numbers twice: the loss and every gradient equal
those of the plain model. Only ``forward`` is recomputed, never ``__call__``: forward hooks on a checkpointed
layer run once per step. The hooks this project attaches all sit outside the checkpointed layers: IMAGE's
masking on ``model.input_proj_vision`` (its masks, including the random variant's draws, are made once, in the
forward pass), ``trained_proposals`` and the denoising hooks on ``model.model`` and ``model.model.decoder`` (the
decoder module runs once; only its layers are recomputed, and they do not read ``config.num_queries``, which the
denoising hook changes while the decoder runs), ``batch_label_maps`` in the loss.
"""

from __future__ import annotations

from functools import wraps
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

#: the attribute of an encoder / decoder layer that turns its checkpointing on
FLAG = "checkpoint_activations"
#: the mark of a wrapped ``forward``
_MARK = "_grounding_checkpointable"


def checkpoint_function(function: Callable, *args, **kwargs):
    """``function(*args, **kwargs)`` checkpointed: non-reentrant, random state preserved for the recomputation."""
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def _checkpointable(forward: Callable) -> Callable:
    @wraps(forward)
    def checkpointable_forward(self, *args, **kwargs):
        if getattr(self, FLAG, False) and self.training and torch.is_grad_enabled():
            return checkpoint_function(forward, self, *args, **kwargs)
        return forward(self, *args, **kwargs)

    setattr(checkpointable_forward, _MARK, True)
    return checkpointable_forward


def _make_checkpointable(cls: type) -> None:
    """Wrap ``cls.forward`` once (a subclass that inherits a wrapped forward is left as it is)."""
    if not getattr(cls.forward, _MARK, False):
        cls.forward = _checkpointable(cls.forward)


def _innermost_library_layers(module: nn.Module) -> list[nn.Module]:
    """The ``GradientCheckpointingLayer`` modules under ``module`` that hold no other one."""
    found = []
    for layer in module.modules():
        if isinstance(layer, GradientCheckpointingLayer) and not any(
            isinstance(inner, GradientCheckpointingLayer) for inner in layer.modules() if inner is not layer
        ):
            found.append(layer)
    return found


def checkpointed_layers(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The layers ``set_gradient_checkpointing`` switches, by part: ``backbone`` (Swin's blocks), ``text_encoder``
    (BERT's layers), ``encoder`` and ``decoder`` (their layers)."""
    inner = model.model
    return {
        "backbone": _innermost_library_layers(inner.backbone),
        "text_encoder": _innermost_library_layers(inner.text_backbone),
        "encoder": list(inner.encoder.layers),
        "decoder": list(inner.decoder.layers),
    }


def set_gradient_checkpointing(model: nn.Module, enable: bool = True) -> int:
    """Turn activation checkpointing of the detector's layers (``checkpointed_layers``) on or off; returns the
    number of layers switched. It acts in training only (``model.training`` and gradients enabled)."""
    count = 0
    for part, layers in checkpointed_layers(model).items():
        for layer in layers:
            if part in ("backbone", "text_encoder"):
                layer.gradient_checkpointing = enable
                layer._gradient_checkpointing_func = checkpoint_function
            else:
                if enable:
                    _make_checkpointable(type(layer))
                setattr(layer, FLAG, enable)
            count += 1
    return count


def gradient_checkpointing_enabled(model: nn.Module) -> dict[str, bool]:
    """Per part, whether all its layers are switched on."""
    state = {}
    for part, layers in checkpointed_layers(model).items():
        if part in ("backbone", "text_encoder"):
            state[part] = bool(layers) and all(layer.gradient_checkpointing for layer in layers)
        else:
            state[part] = bool(layers) and all(getattr(layer, FLAG, False) for layer in layers)
    return state
