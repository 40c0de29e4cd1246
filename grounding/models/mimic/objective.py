"""The MIMIC objective and its optimization (docs/mimic.md "The objective", "The optimization").

``MimicWeights`` weighs the terms, ``MimicObjective`` computes them on a batch of images for one (prompt, target)
pair, and ``synthesize`` optimizes the pixels under ``SynthesisSettings``: a plain function of the objective, no
Trainer involved.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, restricted_number_type
from torch import nn

from .priors import BatchNormPrior, clamp_pixels, jitter_flip, l2_loss, patch_border_loss, to_unit, tv_losses
from .sequence import answer_loss
from .statistics import FeatureStatistics, feature_statistics_loss
from .vlm import VLM, vision_tower, vlm_logits

#: the loss terms, in the order they are reported
TERMS = ("sce", "base", "bn", "patch", "tv_l1", "tv_l2", "l2")

AdamBeta = restricted_number_type("AdamBeta", float, [(">=", 0), ("<", 1)])
"""A number in [0, 1): one of Adam's betas."""


@dataclass(frozen=True)
class MimicWeights:
    """The weights of the loss terms (defaults: the reference settings, docs/mimic.md); a weight of 0 skips the
    term's computation.

    Attributes:
        sce: γ1, the answer loss L_SCE.
        bn: β1, the BatchNorm prior R_V.
        base: γ2, the feature-statistics alignment L_base.
        patch: β2, the patch-border prior R_patch.
        tv_l1: the L1 total variation of R_prior.
        tv_l2: the L2 total variation of R_prior.
        l2: the ℓ2 norm of the image (R_prior).
    """

    sce: NonNegativeFloat = 0.05
    bn: NonNegativeFloat = 0.005
    base: NonNegativeFloat = 1e-4
    patch: NonNegativeFloat = 1e-5
    tv_l1: NonNegativeFloat = 1e-4
    tv_l2: NonNegativeFloat = 1e-6
    l2: NonNegativeFloat = 1e-6


class MimicObjective:
    """The MIMIC loss of a batch of images for one (prompt, target) pair.

    vlm: the model; prior: the R_V prior (None: R_V left out); weights: ``MimicWeights``.
    ``losses`` returns every computed term (unweighted, float32) and ``total`` (weighted sum); a term whose
    weight is 0 is not computed, and L_base needs target statistics.
    """

    def __init__(self, vlm: VLM, weights: MimicWeights, prior: BatchNormPrior | None = None) -> None:
        self.vlm, self.weights, self.prior = vlm, weights, prior
        self._recorder: FeatureStatistics | None = None

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """Keep L_base's hooks on the vision tower for a whole block of forward AND backward passes (removed on
        exit). Needed under gradient checkpointing: the backward pass re-runs the blocks' forward, hooks
        included, and must find the same hooks as the first pass did."""
        if self._recorder is not None:
            yield
            return
        with FeatureStatistics(vision_tower(self.vlm.model)) as recorder:
            self._recorder = recorder
            try:
                yield
            finally:
                self._recorder = None

    def losses(self, images: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
               target_statistics: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
               terms: Sequence[str] = TERMS) -> dict[str, torch.Tensor]:
        """images: normalized (B, 3, S, S) (the jittered view); input_ids / labels: (B, L)."""
        w = self.weights
        wanted = {t for t in terms if getattr(w, t) > 0}
        if target_statistics is None:
            wanted.discard("base")
        if self.prior is None:
            wanted.discard("bn")
        out: dict[str, torch.Tensor] = {}
        tower = vision_tower(self.vlm.model)
        recorder = None
        if "base" in wanted:
            recorder = self._recorder if self._recorder is not None else FeatureStatistics(tower)
        own_hooks = recorder is not None and recorder is not self._recorder
        with recorder if own_hooks else contextlib.nullcontext():
            if "sce" in wanted:
                out["sce"] = answer_loss(vlm_logits(self.vlm, images, input_ids), labels)
            elif recorder is not None:  # L_base alone: the vision tower is enough
                tower(images.to(next(tower.parameters()).dtype))
            if recorder is not None:
                out["base"] = feature_statistics_loss(recorder.current(), target_statistics)
        pixels = None
        if "bn" in wanted:
            pixels = to_unit(images.float(), self.vlm.mean, self.vlm.std)
            out["bn"], _ = self.prior(pixels)
        if "patch" in wanted:
            out["patch"] = patch_border_loss(images.float(), self.vlm.patch_size)
        if "tv_l1" in wanted or "tv_l2" in wanted:
            l1, l2 = tv_losses(images.float())
            if "tv_l1" in wanted:
                out["tv_l1"] = l1
            if "tv_l2" in wanted:
                out["tv_l2"] = l2
        if "l2" in wanted:
            out["l2"] = l2_loss(images.float())
        out = {name: value.float() for name, value in out.items()}
        total = images.new_zeros((), dtype=torch.float32)
        for name, value in out.items():
            total = total + getattr(w, name) * value
        out["total"] = total
        return out


@dataclass(frozen=True)
class SynthesisSettings:
    """The optimization (defaults: the reference settings, docs/mimic.md "The optimization").

    Attributes:
        iterations: Adam steps per target (0: the random start).
        lr: the learning rate at the first step.
        lr_min: the learning rate the cosine reaches at the last step (at most lr).
        betas: Adam's betas, each in [0, 1).
        jitter: the random roll of every iteration, in pixels, in each direction.
        flip: a random horizontal flip (probability 1/2) every iteration.
        samples_per_target: images optimized together for one target (a batch).
    """

    iterations: NonNegativeInt = 3000
    lr: PositiveFloat = 0.25
    lr_min: NonNegativeFloat = 0.005
    betas: tuple[AdamBeta, AdamBeta] = (0.5, 0.9)
    jitter: NonNegativeInt = 8
    flip: bool = True
    samples_per_target: PositiveInt = 1

    def check(self) -> "SynthesisSettings":
        """The settings, when their fields agree (the types check each field alone); else a ValueError naming
        the setting. ``synthesize`` calls it."""
        if self.lr_min > self.lr:
            raise ValueError(f"synthesis.lr_min must be at most the starting lr (the cosine runs from lr down to "
                             f"lr_min), got lr={self.lr!r}, lr_min={self.lr_min!r}")
        return self


@dataclass
class SynthesisResult:
    """images: (B, 3, S, S) in [0, 1]; normalized: the optimized normalized values; history: per iteration,
    {term: unweighted value} (plus ``total``)."""

    images: torch.Tensor
    normalized: torch.Tensor
    history: list[dict[str, float]]


def synthesize(
    objective: MimicObjective, prompt: str, target: str, settings: SynthesisSettings | None = None,
    target_statistics: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
    callback: Callable[[int, torch.Tensor, dict[str, float]], None] | None = None,
) -> SynthesisResult:
    """Optimize ``settings.samples_per_target`` images so that the VLM answers ``prompt`` with ``target``.

    Random init N(0, 1) in the normalized space (clamped), Adam(betas), cosine learning rate from lr to lr_min
    over the iterations, a random roll ± jitter and flip per iteration (the same for the batch), clamp to the
    valid pixel range after every step. settings: None, the reference settings (``SynthesisSettings()``).
    target_statistics: L_base's reference statistics (``reference_statistics``); None: no L_base. Every draw
    comes from ``generator`` (a CPU generator). callback(iteration, normalized images (detached), losses) is
    called after every step.
    """
    settings = (settings if settings is not None else SynthesisSettings()).check()
    vlm = objective.vlm
    size = vlm.image_size
    samples = settings.samples_per_target
    ids, labels = vlm.sequence(prompt, target)
    ids = ids[None].expand(samples, -1).to(device)
    labels = labels[None].expand(samples, -1).to(device)
    hooks = objective.hooked() if target_statistics is not None and objective.weights.base > 0 else contextlib.nullcontext()
    with torch.inference_mode(False), torch.enable_grad(), hooks:  # Lightning tests under inference mode
        ids, labels = ids.clone(), labels.clone()
        init = torch.randn((samples, 3, size, size), generator=generator)
        images = nn.Parameter(clamp_pixels(init, vlm.mean, vlm.std).to(device))
        optimizer = torch.optim.Adam([images], lr=settings.lr, betas=tuple(settings.betas))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(settings.iterations, 1), eta_min=settings.lr_min)
        history: list[dict[str, float]] = []
        for iteration in range(settings.iterations):
            view, _ = jitter_flip(images, settings.jitter, settings.flip, generator)
            losses = objective.losses(view, ids, labels, target_statistics)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            schedule.step()
            clamp_pixels(images.data, vlm.mean, vlm.std)
            values = {k: float(v.detach()) for k, v in losses.items()}
            history.append(values)
            if callback is not None:
                callback(iteration, images.detach(), values)
    normalized = images.detach()
    return SynthesisResult(to_unit(normalized.float(), vlm.mean, vlm.std), normalized, history)
