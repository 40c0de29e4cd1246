"""MIMIC under the Trainer: test-time synthesis of an image per concept target, scored by the VLM's own answer.

``test_step`` / ``predict_step`` take a batch of ``grounding.data.concepts.ConceptDataModule`` targets and, for
each, optimize ``samples_per_target`` images (``grounding.models.mimic.synthesize``, docs/mimic.md) from a
generator seeded by (``seed``, target id), so a target's images do not depend on the process it ran on. The
L_base target statistics come from the target's reference folder (cached on disk under ``cache_dir``); a target
without references runs without L_base.

Metrics (every target counted once, gathered across processes with ``all_gather_object``):

- semantic: ``test/exact_match`` and ``test/token_f1`` of the VLM's greedy answer to the prompt on the
  synthesized image against the target text (SQuAD-style normalization), ``test/clip_score``
  (100 · max(cos, 0) of a CLIP image and text embedding; ``clip: null`` skips it);
- visual quality: ``test/verifier_acc1``, top-1 accuracy of a classifier (``verifier``) on the targets with a
  ``verifier_class``; ``test/lpips_diversity``, the mean pairwise LPIPS distance between the samples of one
  target (``lpips_diversity: true``, ``samples_per_target >= 2``; the optional ``lpips`` package);
- the answer loss L_SCE at the first and the last iteration (``test/sce_first``, ``test/sce_last``) and
  ``test/targets`` (and ``test/syntheses``, the targets synthesized over all processes: equal to
  ``test/targets`` when none ran twice).

The final loss terms of each target go to the progress bar (``mimic/<term>``); TensorBoard gets, for the first
``log_targets`` targets of the main process, the image grid and the loss terms every ``log_every`` iterations.
``test_step`` returns ``{"image_ids", "images"}`` that the shared ``RGBImageWriter`` writes as RGB PNGs
(``<run>/predictions/mimic/<id>.png``, ``<id>_<k>.png`` for several samples), atomically, each once; the answers
and per-target scores go to ``<run>/predictions/mimic_<split>.json``.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from grounding.models.mimic import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TERMS,
    BatchNormPrior,
    MimicObjective,
    MimicWeights,
    SynthesisSettings,
    build_cnn,
    build_vlm,
    clip_score,
    enable_checkpointing,
    exact_match,
    from_unit,
    generate_answers,
    load_lpips,
    lpips_diversity,
    reference_statistics,
    synthesize,
    to_unit,
    token_f1,
    train_mode,
)
from grounding.utils import write_atomic

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METRICS = ("exact_match", "token_f1", "clip_score", "verifier_acc1", "lpips_diversity", "sce_first", "sce_last")


def _plain(value: Any) -> Any:
    """``value`` with NaN floats as None (strict JSON)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


class MimicModule(L.LightningModule):
    """MIMIC as a test-time LightningModule over ``ConceptDataModule``.

    Args:
        vlm: ``"tiny"`` (random LLaVA, offline; tests and the CPU demo) or a hub id / local folder of a transformers
            image-text-to-text model (``llava-hf/llava-1.5-7b-hf``).
        vlm_dtype: float32, bfloat16 or float16 weights (losses are computed in float32 either way).
        prompt_template: the conversation format with ``<image>`` and ``{prompt}``; None: LLaVA-1.5's.
        prior_cnn, prior_cnn_weights: the R_V CNN (``grounding.models.mimic.build_cnn``: "tiny", a torchvision
            name such as "resnet50" with weights "DEFAULT", or "timm:<name>"); null: no R_V.
        verifier, verifier_weights: the classifier of ``test/verifier_acc1`` (same names); null: not scored.
        clip: CLIP of ``test/clip_score`` (``grounding.models.clip.build_clip``: "tiny" or a hub id); null: skipped.
        clip_image_size: CLIP's input size.
        iterations, lr, lr_min, betas, jitter, flip: the optimization (reference: 3000, 0.25, 0.005, (0.5, 0.9), 8, true).
        samples_per_target: images optimized together per target (LPIPS diversity needs >= 2).
        main_weight, bn_weight, base_weight, patch_weight, tv_l1_weight, tv_l2_weight, l2_weight: γ1 (L_SCE),
            β1 (R_V), γ2 (L_base), β2 (R_patch) and the R_prior weights.
        first_bn_multiplier: the weight of R_V's first BatchNorm layer.
        cache_dir: where the reference feature statistics are cached (``~`` expanded); null: not cached.
        max_new_tokens: length of the greedy answer.
        lpips_diversity, lpips_net, lpips_pretrained_backbone: the LPIPS metric (needs ``pip install lpips``).
        log_every, log_targets: TensorBoard image grids and loss curves every N iterations, for this many targets.
        gradient_checkpointing: transformers' gradient checkpointing of the VLM (large models on one GPU).
        seed: with the target id, seeds every random draw of that target.
    """

    def __init__(
        self,
        vlm: str = "tiny",
        vlm_dtype: str = "float32",
        prompt_template: str | None = None,
        prior_cnn: str | None = "tiny",
        prior_cnn_weights: str | None = None,
        verifier: str | None = None,
        verifier_weights: str | None = None,
        clip: str | None = "tiny",
        clip_image_size: int = 224,
        iterations: int = 3000,
        lr: float = 0.25,
        lr_min: float = 0.005,
        betas: tuple[float, float] = (0.5, 0.9),
        jitter: int = 8,
        flip: bool = True,
        samples_per_target: int = 1,
        main_weight: float = 0.05,
        bn_weight: float = 0.005,
        base_weight: float = 1e-4,
        patch_weight: float = 1e-5,
        tv_l1_weight: float = 1e-4,
        tv_l2_weight: float = 1e-6,
        l2_weight: float = 1e-6,
        first_bn_multiplier: float = 10.0,
        cache_dir: str | None = "~/.cache/grounding/mimic",
        max_new_tokens: int = 16,
        lpips_diversity: bool = False,
        lpips_net: str = "alex",
        lpips_pretrained_backbone: bool = True,
        log_every: int = 100,
        log_targets: int = 4,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if vlm_dtype not in DTYPES:
            raise ValueError(f"model.vlm_dtype must be one of {', '.join(DTYPES)}, got {vlm_dtype!r}")
        self.settings = SynthesisSettings(iterations, lr, lr_min, tuple(betas), jitter, flip, samples_per_target)
        self.weights = MimicWeights(main_weight, bn_weight, base_weight, patch_weight, tv_l1_weight, tv_l2_weight, l2_weight)
        for name in ("log_every", "max_new_tokens"):
            value = locals()[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if lpips_diversity and samples_per_target < 2:
            raise ValueError(f"model.lpips_diversity needs model.samples_per_target >= 2 (the distance between samples of one "
                             f"target), got {samples_per_target}")
        if prompt_template is not None and ("<image>" not in prompt_template or "{prompt}" not in prompt_template):
            raise ValueError(f"model.prompt_template must hold '<image>' and '{{prompt}}', got {prompt_template!r}")
        self.vlm = None  # built by configure_model in every process (a transformers VLM does not survive ddp_spawn's pickling)
        self.vlm_model = None
        self.prior_cnn = build_cnn(prior_cnn, prior_cnn_weights) if prior_cnn is not None and bn_weight > 0 else None
        self.prior = BatchNormPrior(self.prior_cnn, first_bn_multiplier) if self.prior_cnn is not None else None
        if verifier is None:
            self.verifier = None
        elif self.prior_cnn is not None and (verifier, verifier_weights) == (prior_cnn, prior_cnn_weights):
            self.verifier = self.prior_cnn
        else:
            self.verifier = build_cnn(verifier, verifier_weights)
        if clip is not None:
            from grounding.models.clip import build_clip

            self.clip = build_clip(clip, image_size=clip_image_size)
        else:
            self.clip = None
        self.lpips = load_lpips(lpips_net, lpips_pretrained_backbone) if lpips_diversity else None
        self.objective: MimicObjective | None = None
        self._records: list[dict] = []
        self._logged = 0
        self.syntheses = 0

    # ------------------------------------------------------------------------------------- set-up
    def configure_model(self) -> None:
        """Build the VLM (once per process; Lightning calls this before moving the module to its device)."""
        if self.vlm is not None:
            return
        h = self.hparams
        self.vlm = build_vlm(h.vlm, dtype=DTYPES[h.vlm_dtype], prompt_template=h.prompt_template)
        self.vlm_model = self.vlm.model  # registered, so Lightning moves it
        if h.gradient_checkpointing:
            enable_checkpointing(self.vlm_model)
        self.objective = MimicObjective(self.vlm, self.weights, self.prior)

    # ------------------------------------------------------------------------------------- one target
    def _generator(self, target_id: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + zlib.crc32(str(target_id).encode()))

    def _target_statistics(self, sample: dict) -> list | None:
        if sample.get("references") is None or self.weights.base == 0:
            return None
        try:
            with torch.autocast(self.device.type, enabled=False):
                statistics = reference_statistics(self.vlm, sample["references"], self.hparams.cache_dir)
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"target {sample['target_id']!r}: {error}") from None
        return [(m.to(self.device), v.to(self.device)) for m, v in statistics]

    def _tensorboard_callback(self, sample: dict):
        """Image grid and loss terms every ``log_every`` iterations (first targets of the main process only)."""
        experiment = getattr(self.logger, "experiment", None) if self._trainer is not None else None
        if (experiment is None or not hasattr(experiment, "add_image") or self._logged >= self.hparams.log_targets
                or not self.trainer.is_global_zero):
            return None
        self._logged += 1
        every, last = self.hparams.log_every, self.settings.iterations - 1
        tag = f"mimic/{sample['target_id']}"

        def callback(iteration: int, images: torch.Tensor, losses: dict[str, float]) -> None:
            if iteration % every and iteration != last:
                return
            from torchvision.utils import make_grid

            experiment.add_image(tag, make_grid(to_unit(images.float(), self.vlm.mean, self.vlm.std).cpu(), nrow=4), iteration)
            for name, value in losses.items():
                experiment.add_scalar(f"{tag}/{name}", value, iteration)

        return callback

    def synthesize_target(self, sample: dict) -> dict:
        """Synthesize and score the images of one target; returns its record and its uint8 images."""
        self.configure_model()
        target_id = sample["target_id"]
        statistics = self._target_statistics(sample)
        with train_mode(self.vlm_model, self.hparams.gradient_checkpointing):
            result = synthesize(self.objective, sample["prompt"], sample["target"], self.settings, statistics,
                                generator=self._generator(target_id), device=self.device,
                                callback=self._tensorboard_callback(sample))
        images = result.images  # (B, 3, S, S) in [0, 1]
        normalized = from_unit(images, self.vlm.mean, self.vlm.std)  # the written pixels, as the VLM sees them
        answers = generate_answers(self.vlm, normalized, sample["prompt"], self.hparams.max_new_tokens)
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
    def on_test_epoch_start(self) -> None:
        self._records, self._logged = [], 0

    on_predict_epoch_start = on_test_epoch_start

    def _process(self, batch: list[dict]) -> dict:
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

    def test_step(self, batch: list[dict], batch_idx: int) -> dict:
        return self._process(batch)

    def predict_step(self, batch: list[dict], batch_idx: int) -> dict:
        return self._process(batch)

    def _gather_records(self) -> list[dict]:
        """Every process's records (a collective call under DDP), one per target id; ``self.syntheses`` is the
        count before removing repeats (equal to the target count when no target ran twice)."""
        records = list(self._records)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.trainer.world_size > 1:
            gathered: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        self.syntheses = len(records)
        unique: dict[str, dict] = {}
        for record in records:
            unique.setdefault(record["target_id"], record)  # a target met twice (a padding copy) counts once
        return [unique[k] for k in sorted(unique)]

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
        records = self._gather_records()
        self._write_records(records, self.summarize(records))

    def _write_records(self, records: list[dict], summary: dict) -> None:
        log_dir = self.trainer.log_dir  # a collective call under DDP: every rank makes it
        if not self.trainer.is_global_zero or not log_dir:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        split = getattr(datamodule, "evaluation_split", "test") if datamodule is not None else "test"
        payload = {"summary": {k: (None if math.isnan(v) else v) for k, v in summary.items()}, "targets": records,
                   "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hparams.items()}}
        path = Path(log_dir) / "predictions" / f"mimic_{split}.json"
        text = json.dumps(_plain(payload), indent=1, default=str)
        write_atomic(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))

    def configure_optimizers(self) -> None:  # test-time only
        return None

