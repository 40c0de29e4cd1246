"""MIMIC under the Trainer: test-time synthesis of an image per concept target, scored by the VLM's own answer.

``test_step`` / ``predict_step`` take a batch of ``grounding.data.concepts.ConceptDataModule`` targets and, for
each, optimize ``synthesis.samples_per_target`` images (``grounding.models.mimic.synthesize``, docs/mimic.md) from
a generator seeded by (``seed``, target id), so a target's images do not depend on the process it ran on. The
L_base target statistics come from the target's reference folder (cached on disk under ``cache_dir``); a target
without references runs without L_base.

The settings come in groups (nested dataclasses; ``--model.<group>.<field>`` on the command line):
``vlm`` (``VLMSettings``), ``prior`` (``PriorSettings``, R_V's CNN), ``synthesis`` (``SynthesisSettings``),
``weights`` (``MimicWeights``), ``scoring`` (``ScoringSettings``: verifier, CLIP, answer length, LPIPS) and
``logging`` (``LoggingSettings``: TensorBoard), plus ``cache_dir`` and ``seed``.

Metrics (every target counted once, gathered across processes with ``all_gather_object``):

- semantic: ``test/exact_match`` and ``test/token_f1`` of the VLM's greedy answer to the prompt on the
  synthesized image against the target text (SQuAD-style normalization, ``grounding.metrics.answers``),
  ``test/clip_score`` (100 · max(cos, 0) of a CLIP image and text embedding; ``scoring.clip: null`` skips it);
- visual quality: ``test/verifier_acc1``, top-1 accuracy of a classifier (``scoring.verifier``) on the targets
  with a ``verifier_class``; ``test/lpips_diversity``, the mean pairwise LPIPS distance between the samples of
  one target (``scoring.lpips_diversity: true``, ``synthesis.samples_per_target >= 2``; the optional ``lpips``
  package);
- the answer loss L_SCE at the first and the last iteration (``test/sce_first``, ``test/sce_last``) and
  ``test/targets`` (and ``test/syntheses``, the targets synthesized over all processes: equal to
  ``test/targets`` when none ran twice).

The final loss terms of each target go to the progress bar (``mimic/<term>``); TensorBoard gets, for the first
``logging.targets`` targets of the main process, the image grid and the loss terms every ``logging.every``
iterations. ``test_step`` returns ``{"image_ids", "images"}`` that the shared ``RGBImageWriter`` writes as RGB
PNGs (``<run>/predictions/mimic/<id>.png``, ``<id>_<k>.png`` for several samples), atomically, each once; the
answers and per-target scores go to ``<run>/predictions/mimic_<split>.json``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from grounding.constants import IMAGENET_MEAN, IMAGENET_STD
from grounding.data.image_folder import PredictionDataModule
from grounding.lightning.test_time import TestTimeModule, plain_settings
from grounding.metrics.answers import exact_match, token_f1
from grounding.metrics.image_scores import clip_score, load_lpips, lpips_diversity
from grounding.models.mimic import (
    TERMS,
    BatchNormPrior,
    MimicObjective,
    MimicWeights,
    PriorSettings,
    SynthesisSettings,
    VLMSettings,
    build_cnn,
    check_prompt_template,
    from_unit,
    generate_answers,
    reference_statistics,
    synthesize,
    to_unit,
    train_mode,
)
from grounding.utils import write_json_atomic
from grounding.visualize import upscale

log = logging.getLogger(__name__)

METRICS = ("exact_match", "token_f1", "clip_score", "verifier_acc1", "lpips_diversity", "sce_first", "sce_last")


@dataclass(frozen=True)
class ScoringSettings:
    """How the synthesized images are scored (docs/mimic.md "Metrics").

    Attributes:
        verifier: the classifier of test/verifier_acc1 (``grounding.models.mimic.build_cnn``: "tiny", a torchvision
            name such as "resnet50", or "timm:<name>"); null: not scored. The same name and weights as
            ``prior`` reuse R_V's CNN.
        verifier_weights: the verifier's weights (a torchvision weights name such as "DEFAULT"); null: random.
        clip: the CLIP of test/clip_score (``grounding.models.clip.build_clip``: "tiny" or a hub id such as
            "openai/clip-vit-large-patch14"); null: skipped.
        clip_image_size: CLIP's input size in pixels.
        max_new_tokens: the length of the VLM's greedy answer, in tokens.
        lpips_diversity: score test/lpips_diversity, the mean LPIPS distance between the samples of a target
            (needs synthesis.samples_per_target >= 2 and ``pip install lpips``).
        lpips_net: LPIPS's backbone.
        lpips_pretrained_backbone: false: a random LPIPS backbone (offline tests).
    """

    verifier: str | None = None
    verifier_weights: str | None = None
    clip: str | None = "tiny"
    clip_image_size: PositiveInt = 224
    max_new_tokens: PositiveInt = 16
    lpips_diversity: bool = False
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    lpips_pretrained_backbone: bool = True


@dataclass(frozen=True)
class LoggingSettings:
    """What goes to TensorBoard while a target is synthesized.

    Attributes:
        every: the image grid and the loss terms every this many iterations (and at the last one).
        targets: for this many targets, the first ones of the main process (0: none).
    """

    every: PositiveInt = 100
    targets: NonNegativeInt = 4


class MimicModule(TestTimeModule):
    """MIMIC as a test-time LightningModule over ``ConceptDataModule``.

    Args:
        vlm: the VLM to invert (``VLMSettings``).
        prior: R_V's BatchNorm CNN (``PriorSettings``).
        synthesis: the optimization (``SynthesisSettings``).
        weights: the weights of the loss terms, γ1, β1, γ2, β2 and R_prior's (``MimicWeights``).
        scoring: how the images are scored: verifier, CLIP, answer length, LPIPS (``ScoringSettings``).
        logging: TensorBoard image grids and loss curves (``LoggingSettings``).
        cache_dir: where the reference feature statistics are cached (``~`` expanded); null: not cached.
        seed: with the target id, seeds every random draw of that target.
    """

    def __init__(
        self,
        vlm: VLMSettings = VLMSettings(),
        prior: PriorSettings = PriorSettings(),
        synthesis: SynthesisSettings = SynthesisSettings(),
        weights: MimicWeights = MimicWeights(),
        scoring: ScoringSettings = ScoringSettings(),
        logging: LoggingSettings = LoggingSettings(),
        cache_dir: str | None = "~/.cache/grounding/mimic",
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        try:
            synthesis.check()
            if vlm.prompt_template is not None:
                check_prompt_template(vlm.prompt_template, "vlm.prompt_template")
        except ValueError as error:
            raise ValueError(f"model.{error}") from None
        if scoring.lpips_diversity and synthesis.samples_per_target < 2:
            raise ValueError(f"model.scoring.lpips_diversity needs model.synthesis.samples_per_target >= 2 (the "
                             f"distance between samples of one target), got {synthesis.samples_per_target}")
        self.vlm_settings, self.prior_settings, self.settings, self.weights = vlm, prior, synthesis, weights
        self.scoring, self.logging_settings = scoring, logging
        self.cache_dir, self.seed = cache_dir, seed
        self.vlm = None  # built by configure_model in every process (a transformers VLM does not survive ddp_spawn's pickling)
        self.vlm_model = None
        self.prior_cnn = prior.build_cnn() if weights.bn > 0 else None
        self.prior = BatchNormPrior(self.prior_cnn, prior.first_bn_multiplier) if self.prior_cnn is not None else None
        if scoring.verifier is None:
            self.verifier = None
        elif self.prior_cnn is not None and (scoring.verifier, scoring.verifier_weights) == (prior.cnn, prior.weights):
            self.verifier = self.prior_cnn
        else:
            self.verifier = build_cnn(scoring.verifier, scoring.verifier_weights)
        if scoring.clip is not None:
            from grounding.models.clip import build_clip

            self.clip = build_clip(scoring.clip, image_size=scoring.clip_image_size)
        else:
            self.clip = None
        self.lpips = (load_lpips(scoring.lpips_net, scoring.lpips_pretrained_backbone) if scoring.lpips_diversity
                      else None)
        self.objective: MimicObjective | None = None
        self._records: list[dict] = []
        self.syntheses = 0

    # ------------------------------------------------------------------------------------- set-up
    def configure_model(self) -> None:
        """Build the VLM (once per process; Lightning calls this before moving the module to its device)."""
        if self.vlm is not None:
            return
        self.vlm = self.vlm_settings.build()  # checkpointed blocks when vlm.gradient_checkpointing
        self.vlm_model = self.vlm.model  # registered, so Lightning moves it
        self.objective = MimicObjective(self.vlm, self.weights, self.prior)

    @property
    def picture_limit(self) -> int:
        return self.logging_settings.targets

    # ------------------------------------------------------------------------------------- one target
    def _target_statistics(self, sample: dict) -> list | None:
        if sample.get("references") is None or self.weights.base == 0:
            return None
        try:
            with torch.autocast(self.device.type, enabled=False):
                statistics = reference_statistics(self.vlm, sample["references"], self.cache_dir)
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"target {sample['target_id']!r}: {error}") from None
        return [(m.to(self.device), v.to(self.device)) for m, v in statistics]

    def _tensorboard_callback(self, sample: dict):
        """Image grid and loss terms every ``logging.every`` iterations (the first ``logging.targets`` targets of
        the main process only)."""
        experiment = self.picture_logger()
        if experiment is None:
            return None
        self._logged += 1
        every, last = self.logging_settings.every, self.settings.iterations - 1
        tag = f"mimic/{sample['target_id']}"

        def callback(iteration: int, images: torch.Tensor, losses: dict[str, float]) -> None:
            if iteration % every and iteration != last:
                return
            from torchvision.utils import make_grid

            grid = make_grid(to_unit(images.float(), self.vlm.mean, self.vlm.std).cpu(), nrow=4, pad_value=1.0)
            experiment.add_image(tag, upscale(grid, 512)[0].clamp(0, 1), iteration)  # small images enlarged to read
            for name, value in losses.items():
                experiment.add_scalar(f"{tag}/{name}", value, iteration)

        return callback

    def synthesize_target(self, sample: dict) -> dict:
        """Synthesize and score the images of one target; returns its record and its uint8 images."""
        self.configure_model()
        target_id = sample["target_id"]
        statistics = self._target_statistics(sample)
        with train_mode(self.vlm_model, self.vlm_settings.gradient_checkpointing):
            result = synthesize(self.objective, sample["prompt"], sample["target"], self.settings, statistics,
                                generator=self.sample_generator(target_id), device=self.device,
                                callback=self._tensorboard_callback(sample))
        images = result.images  # (B, 3, S, S) in [0, 1]
        normalized = from_unit(images, self.vlm.mean, self.vlm.std)  # the written pixels, as the VLM sees them
        answers = generate_answers(self.vlm, normalized, sample["prompt"], self.scoring.max_new_tokens)
        record: dict[str, Any] = {
            "target_id": target_id, "prompt": sample["prompt"], "target": sample["target"], "answers": answers,
            "exact_match": float(np.mean([exact_match(a, sample["target"]) for a in answers])),
            "token_f1": float(np.mean([token_f1(a, sample["target"]) for a in answers])),
            "sce_first": result.history[0]["sce"] if result.history and "sce" in result.history[0] else math.nan,
            "sce_last": result.history[-1]["sce"] if result.history and "sce" in result.history[-1] else math.nan,
            "final_losses": result.history[-1] if result.history else {},
        }
        if self.clip is not None:
            record["clip_score"] = float(clip_score(self.clip, images, [sample["target"]] * images.shape[0]).mean())
        if self.verifier is not None and sample.get("verifier_class") is not None:
            with torch.no_grad():
                logits = self.verifier(from_unit(images, IMAGENET_MEAN, IMAGENET_STD))
            if sample["verifier_class"] >= logits.shape[-1]:
                raise ValueError(f"target {target_id!r}: verifier_class {sample['verifier_class']} but the verifier has "
                                 f"{logits.shape[-1]} classes")
            record["verifier_acc1"] = float((logits.argmax(-1) == sample["verifier_class"]).float().mean())
        if self.lpips is not None:
            record["lpips_diversity"] = lpips_diversity(self.lpips, images)
        uint8 = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu()
        return {"record": record, "images": list(uint8)}

    # ------------------------------------------------------------------------------------- loops
    def reset_epoch(self) -> None:
        super().reset_epoch()
        self._records = []

    def process(self, batch: list[dict], score: bool) -> dict:
        ids, images = [], []
        for sample in batch:
            out = self.synthesize_target(sample)
            record = out["record"]
            self._records.append(record)
            for name in TERMS:
                if name in record["final_losses"]:
                    self.log(f"mimic/{name}", record["final_losses"][name], prog_bar=name in ("sce", "bn", "base"), batch_size=1)
            count = len(out["images"])
            names = [sample["target_id"]] if count == 1 else [f"{sample['target_id']}_{k}" for k in range(count)]
            ids += names
            images += out["images"]
        return {"image_ids": ids, "images": images}

    def predict_step(self, batch: list[dict], batch_idx: int) -> Any:
        """Concept targets: as ``test_step`` without the epoch's scores. The user's target texts
        (``TargetTextDataModule``, samples with an ``image_id``): per target its record with ``image_id`` and its
        uint8 ``images``, which ``grounding-predict``'s writer saves."""
        if batch and "image_id" in batch[0]:
            records = []
            for sample in batch:
                out = self.synthesize_target(sample)
                records.append({"image_id": sample["image_id"], **out["record"], "images": out["images"]})
            return records
        return self.process(batch, score=False)

    def _gather_records(self) -> list[dict]:
        """Every process's records, sorted by target id (a collective call under DDP); ``self.syntheses`` counts
        them (each target is read by one process only, so it equals the target count)."""
        records = self.gather(self._records)
        self.syntheses = len(records)
        return sorted(records, key=lambda record: str(record["target_id"]))

    @staticmethod
    def summarize(records: list[dict]) -> dict[str, float]:
        """Mean of every metric over the targets that have it (NaN when none has it), and the target count."""
        summary = {}
        for name in METRICS:
            values = [r[name] for r in records if name in r and not math.isnan(r[name])]
            summary[name] = float(np.mean(values)) if values else math.nan
        summary["targets"] = float(len(records))
        return summary

    def on_test_epoch_end(self) -> None:
        records = self._gather_records()  # collective under DDP: every rank calls it and logs the same values
        summary = self.summarize(records)
        summary["syntheses"] = float(self.syntheses)
        for name, value in summary.items():
            self.log(f"test/{name}", value)
        log.info("MIMIC over %d targets: %s", len(records), {k: round(v, 4) for k, v in summary.items()})
        self._write_records(records, summary)

    def on_predict_epoch_end(self) -> None:
        if isinstance(self.trainer.datamodule, PredictionDataModule):  # grounding-predict's writer has the user's
            return
        records = self._gather_records()
        self._write_records(records, self.summarize(records))

    def _write_records(self, records: list[dict], summary: dict) -> None:
        log_dir = self.trainer.log_dir  # a collective call under DDP: every rank makes it
        if not self.trainer.is_global_zero or not log_dir:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        split = getattr(datamodule, "evaluation_split", "test") if datamodule is not None else "test"
        payload = {"summary": {k: (None if math.isnan(v) else v) for k, v in summary.items()}, "targets": records,
                   "settings": dict(self.hparams)}
        path = Path(log_dir) / "predictions" / f"mimic_{split}.json"
        write_json_atomic(path, plain_settings(payload), indent=1, default=str)

