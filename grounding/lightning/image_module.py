"""IMAGE: Grounding DINO trained with adaptive masking of its multi-scale feature maps (docs/image.md).

The detector is transformers' Grounding DINO or MM-Grounding-DINO (also LLMDet's checkpoints): every hook
and setting below works on both (``grounding.models.grounding_dino``).

Training runs the detector with transformers' own loss while ``feature_masking`` masks the encoder's
input maps; the schedule's progress p = global step / total steps comes from the Trainer. Validation,
test and predict never mask. Evaluation scores every (query, category) pair (mean token probability of
the category's phrase), keeps the top ``num_detections`` per image across all prompts, and reports COCO
box AP through pycocotools on the original annotation file, or, with the data setting ``evaluator: lvis``,
LVIS box Fixed AP (``grounding.metrics.lvis_eval``); the evaluated detections are exported as a results
JSON in the run folder.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torchvision.ops import box_convert

from grounding.constants import IMAGENET_MEAN, IMAGENET_STD
from grounding.data.prompts import Prompt, build_prompts, category_scores
from grounding.lightning.guards import NonFiniteGuard
from grounding.metrics.coco_eval import CocoBoxMetric
from grounding.metrics.lvis_eval import LvisFixedAPMetric
from grounding.models.adaptive_masking import AdaptiveMasking, MaskingConfig
from grounding.models.checkpointing import set_gradient_checkpointing
from grounding.models.denoising import ContrastiveDenoising, DenoisingConfig, denoising_training
from grounding.models.freezing import FreezePart, freeze_parts, resolve_freeze
from grounding.models.grounding_dino import (
    TextFeatureCache,
    build_grounding_dino,
    cached_text_features,
    encoder_token_count,
    feature_masking,
    freeze_untrained,
    parameter_groups,
    shared_image_backbone,
    trained_proposals,
)
from grounding.models.lora import LoraSettings, apply_lora, log_parameter_counts, lora_settings
from grounding.utils import write_json_atomic
from grounding.visualize import denormalize, detection_panel, mask_panels, upscale

log = logging.getLogger(__name__)

#: the loss terms logged at every step (the last decoder layer's, the encoder's and the denoising ones)
LOGGED_TERMS = tuple(f"loss_{term}{part}" for part in ("", "_enc", "_dn") for term in ("ce", "bbox", "giou"))


class ImageGroundingModule(L.LightningModule):
    """Grounding DINO (or MM-Grounding-DINO) + IMAGE adaptive masking.

    Args:
        model: ``"tiny"`` (random tiny Grounding DINO, offline tokenizer), ``"tiny-mm"`` (the same sizes as a
            random MM-Grounding-DINO) or a hub id / local path of a Grounding DINO, MM-Grounding-DINO or LLMDet
            checkpoint (docs/image.md "Starting checkpoints"), e.g. ``IDEA-Research/grounding-dino-tiny``,
            ``openmmlab-community/mm_grounding_dino_tiny_o365v1_goldg_v3det``, ``iSEE-Laboratory/llmdet_tiny``.
        model_config: config overrides (tiny, tiny-mm: merged into ``TINY_CONFIG``; pretrained: ``from_pretrained``
            kwargs).
        masking: IMAGE settings (``MaskingConfig``: variant rf_gam/threshold/random/none, r0, r1, sigma, k0,
            progressive, tau, max_tokens); ``variant: none`` trains the plain detector.
        lr, lr_backbone, lr_text_encoder, weight_decay: AdamW groups (docs/image.md: 1e-4, 1e-5, 1e-5, 1e-4).
        freeze: the parts kept frozen (``grounding.models.freezing``): ``backbone``, ``backbone_stages:N`` (the patch
            embedding and the first N Swin stages), ``text_encoder``, ``input_projection``, ``encoder`` (alias
            ``feature_enhancer``), ``decoder``; None: ``[text_encoder]`` (the paper's default), ``[]``: nothing.
            Frozen parameters are in no optimizer group.
        freeze_text_encoder: deprecated, ``freeze: [text_encoder]`` (true) or ``freeze: []`` (false), with a warning.
        gradient_checkpointing: recompute the activations of Swin's blocks, BERT's, the encoder's and the decoder's
            layers in the backward pass instead of keeping them (``grounding.models.checkpointing``): less memory,
            one more forward pass per step, the same loss and gradients.
        lr_drop_epochs, lr_drop_factor: step decay of all groups at these epochs (``lr_schedule: step``).
        lr_schedule: ``step`` (the paper's step decay; constant without ``lr_drop_epochs``) or ``cosine``
            (per-step cosine decay from each group's lr to ``lr_min_factor`` × lr over the whole run).
        num_detections: detections kept per image at evaluation (top (query, category) pairs). LVIS Fixed AP
            has no per-image limit of its own, only 10,000 per category over the split: 300 (mmdetection's
            LVIS evaluation of Grounding DINO) keeps an image's detections over all 1,203 categories' prompts;
            raise it to cut fewer.
        log_images: TensorBoard pictures: ground truth | predictions of the first validation image, and the
            masks of each level over the first training image of every epoch.
        log_score_threshold: predictions drawn in the picture have at least this score.
        max_nonfinite_steps: a NaN/inf loss skips its optimizer step; this many in a row stop the run.
        proposal_loss: ``trained`` (default): the two-stage encoder loss scores the undetached top-k
            proposals, so the proposal head learns, as in the original Grounding DINO
            (``grounding.models.grounding_dino.trained_proposals``); ``detached``: transformers' loss as it
            is, which never trains that head (it is then frozen).
        denoising: contrastive denoising training (``DenoisingConfig``: number, label_noise, box_noise; DINO's
            CDN, ``grounding.models.denoising``); ``number: 0`` (the default) trains without it.
        lora: LoRA adapters through peft (``LoraSettings``: r, alpha, dropout, target_modules; ``grounding.models.lora``);
            ``r: 0`` (the default) trains without them. With them every base weight of the detector is frozen but
            the heads of ``grounding.models.lora.TRAINABLE_HEADS``; the trainable and total parameter counts are
            logged once (rank 0).

    The parameters that never receive a gradient are frozen
    (``grounding.models.grounding_dino.untrained_modules``), so DDP needs no ``find_unused_parameters``.
    Under DDP the loss is normalized by the number of boxes over all processes (as the original DETR
    training does), so that N processes with batch b take the same step as one with batch N·b.
    """

    def __init__(
        self,
        model: str = "tiny",
        model_config: dict | None = None,
        masking: MaskingConfig | None = None,
        lr: float = 1e-4,
        lr_backbone: float = 1e-5,
        lr_text_encoder: float = 1e-5,
        weight_decay: float = 1e-4,
        freeze_text_encoder: bool | None = None,
        freeze: list[FreezePart] | None = None,
        gradient_checkpointing: bool = False,
        lr_drop_epochs: list[int] | None = None,
        lr_drop_factor: float = 0.1,
        lr_schedule: Literal["step", "cosine"] = "step",
        lr_min_factor: float = 0.01,
        num_detections: int = 300,
        log_images: bool = True,
        log_score_threshold: float = 0.3,
        max_nonfinite_steps: int = 10,
        proposal_loss: Literal["trained", "detached"] = "trained",
        denoising: DenoisingConfig | None = None,
        lora: LoraSettings | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        for name in ("lr", "lr_backbone", "lr_text_encoder"):
            value = locals()[name]
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"model.{name} must be a finite number > 0, got {value!r}")
        for name, value in (("weight_decay", weight_decay), ("lr_min_factor", lr_min_factor)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"model.{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(lr_drop_factor, (int, float)) and 0 < lr_drop_factor <= 1):
            raise ValueError(f"model.lr_drop_factor must be in (0, 1], got {lr_drop_factor!r}")
        if isinstance(num_detections, bool) or not isinstance(num_detections, int) or num_detections < 1:
            raise ValueError(f"model.num_detections must be an integer >= 1 (detections kept per image), got {num_detections!r}")
        if proposal_loss not in ("trained", "detached"):
            raise ValueError(f"model.proposal_loss must be 'trained' or 'detached', got {proposal_loss!r}")
        if lr_schedule not in ("step", "cosine"):
            raise ValueError(f"model.lr_schedule must be 'step' or 'cosine', got {lr_schedule!r}")
        if lr_schedule == "cosine" and lr_drop_epochs:
            raise ValueError(f"model.lr_drop_epochs={lr_drop_epochs} has no effect with model.lr_schedule=cosine; set one or the other")
        if lr_drop_epochs and (sorted(lr_drop_epochs) != list(lr_drop_epochs) or min(lr_drop_epochs) < 1):
            raise ValueError(f"model.lr_drop_epochs must be increasing epochs >= 1, got {lr_drop_epochs!r}")
        self.masking_config = masking if masking is not None else MaskingConfig()
        self.detector, self.tokenizer = build_grounding_dino(model, model_config)
        self.masking_config.check_levels(self.detector.config.num_feature_levels)
        self.frozen_parts = resolve_freeze(freeze, freeze_text_encoder)
        freeze_parts(self.detector, self.frozen_parts)
        if not isinstance(gradient_checkpointing, bool):
            raise ValueError(f"model.gradient_checkpointing must be true or false, got {gradient_checkpointing!r}")
        if gradient_checkpointing:
            set_gradient_checkpointing(self.detector)
        self.frozen_untrained = freeze_untrained(self.detector, proposal_loss)
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.masking = AdaptiveMasking(self.masking_config)
        self.denoising_config = denoising if denoising is not None else DenoisingConfig()
        self.denoising = None
        if self.denoising_config.enabled:
            config = self.detector.config
            if not config.two_stage:
                raise ValueError("model.denoising needs a two-stage model (its decoder queries carry boxes)")
            self.denoising = ContrastiveDenoising(self.denoising_config, config.d_model, config.max_text_len)
        self.lora_settings = lora_settings(lora)  # LoRA last: it freezes the base weights left trainable above
        self.lora_layers = apply_lora(self.detector, self.lora_settings)
        log_parameter_counts(self, self.lora_layers)
        self.prompts: list[Prompt] = []
        self.categories: dict[int, str] = {}
        self.metrics = torch.nn.ModuleDict()  # split -> CocoBoxMetric or LvisFixedAPMetric, made in setup from the datamodule
        self.text_features = TextFeatureCache()  # the prompts' text encoder output, kept while its weights stay

    # ----------------------------------------------------------------------------------------- set-up
    def set_categories(self, categories: dict[int, str]) -> None:
        """Build the prompts of a dataset's categories (validated; split when they do not fit)."""
        self.categories = dict(categories)
        self.prompts = build_prompts(self.categories, self.tokenizer, self.detector.config.max_text_len)
        self.position = {cid: (k, i) for k, p in enumerate(self.prompts) for i, cid in enumerate(p.category_ids)}

    def check_input_size(self, height: int, width: int, what: str) -> None:
        """The two-stage head keeps the top ``num_queries`` encoder tokens: smaller inputs cannot be run."""
        config = self.detector.config
        tokens = encoder_token_count(config, height, width)
        if tokens < config.num_queries:
            raise ValueError(
                f"{what}: a {width}x{height} px input gives {tokens} encoder tokens, fewer than the model's"
                f" num_queries={config.num_queries}; raise data.image_size (or lower model.model_config.num_queries)"
            )

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if stage == "predict" and not hasattr(datamodule, "categories"):  # the user's images: GroundingDetector's prompt
            return
        self.set_categories(datamodule.categories)
        side = getattr(datamodule, "smallest_side", None)
        if side is not None:
            self.check_input_size(side, side, f"data.image_size / data.train_scales (smallest side {side})")
        splits = {"fit": ["val"], "validate": ["val"], "test": ["test"], "predict": []}.get(stage, ["val", "test"])
        for split in splits:
            source = "val" if split == "val" else datamodule.evaluation_split
            metric = self.box_metric(datamodule, source)
            if metric is not None:
                self.metrics[split] = metric

    @staticmethod
    def box_metric(datamodule, source: str) -> CocoBoxMetric | LvisFixedAPMetric | None:
        """The box metric of the datamodule's split ``source`` (None without its annotation file): COCOeval box
        AP, or LVIS Fixed AP when the datamodule's ``evaluator`` is ``lvis``; both on the ground truth the
        loader kept."""
        if getattr(datamodule, "evaluator", "coco") == "lvis":
            truth = datamodule.lvis_ground_truth(source)
            return None if truth is None else LvisFixedAPMetric(truth)  # 10,000 detections per category
        truth = datamodule.ground_truth(source)
        return None if truth is None else CocoBoxMetric(truth)

    def configure_optimizers(self):
        h = self.hparams
        groups = parameter_groups(self.detector, h.lr, h.lr_backbone, h.lr_text_encoder, h.weight_decay)
        if self.denoising is not None:
            groups.append({"params": list(self.denoising.parameters()), "lr": h.lr, "weight_decay": h.weight_decay, "name": "denoising"})
        # the fused kernel updates all tensors at once: 7x faster than the per-tensor loop on the CPU demo model;
        # Lightning's mixed precision cannot clip the gradients of an optimizer that unscales them itself (fused)
        mixed = "mixed" in str(getattr(self._trainer, "precision", "")) if self._trainer is not None else False
        fused = not mixed and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, fused=fused or None)
        if h.lr_schedule == "cosine":
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            floor = h.lr_min_factor

            def factor(step: int) -> float:
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if not h.lr_drop_epochs:
            return optimizer
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(h.lr_drop_epochs), gamma=h.lr_drop_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ----------------------------------------------------------------------------------------- training
    def progress(self) -> float:
        """Training progress p in [0, 1] that drives the masking schedule."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        if not total or total == float("inf"):
            return 0.0
        return min(self.global_step / total, 1.0)

    def _text_inputs(self, prompt: Prompt, batch_size: int) -> dict[str, torch.Tensor]:
        input_ids = prompt.input_ids.to(self.device).unsqueeze(0).expand(batch_size, -1)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def _labels(self, targets: list[dict], prompt_index: int) -> list[dict]:
        """Targets of one prompt: boxes of its categories, class_labels = phrase positions."""
        labels = []
        for target in targets:
            where = [self.position[int(c)] for c in target["category_ids"]]
            keep = torch.tensor([k == prompt_index for k, _ in where], dtype=torch.bool)
            positions = torch.tensor([i for _, i in where], dtype=torch.long)
            labels.append(
                {"class_labels": positions[keep].to(self.device), "boxes": target["boxes"][keep.to(target["boxes"].device)].to(self.device)}
            )
        return labels

    def _check_batch(self, pixel_values: torch.Tensor, targets: list[dict]) -> None:
        height, width = pixel_values.shape[-2:]
        if encoder_token_count(self.detector.config, height, width) < self.detector.config.num_queries:
            self.check_input_size(height, width, f"batch of image ids {[t['image_id'] for t in targets]}")

    def _global_box_normalization(self, labels: list[dict]) -> float:
        """Factor turning this process's loss (normalized by its own box count, as transformers does) into its
        share of the loss normalized by the box count of all processes (DDP averages the gradients)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return 1.0
        local = float(sum(len(label["boxes"]) for label in labels))
        total = float(self.trainer.strategy.reduce(torch.tensor(local, device=self.device), reduce_op="sum"))
        return max(local, 1.0) * world / max(total, 1.0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        # Several prompts: one per step, in turn; the library's loss expects one prompt per batch.
        prompt_index = self.global_step % len(self.prompts)
        prompt = self.prompts[prompt_index]
        pixel_values = batch["pixel_values"]
        self._check_batch(pixel_values, batch["targets"])
        labels = self._labels(batch["targets"], prompt_index)
        queries = None
        if self.denoising is not None:
            queries = self.denoising.build(labels, len(prompt.category_ids), self.detector.config.num_queries)
        outputs = self._training_forward(batch, labels, queries, **self._text_inputs(prompt, pixel_values.shape[0]))
        return self._training_loss(outputs, labels, queries, batch, batch_idx)

    def _training_forward(self, batch: dict, labels: list[dict], queries, **text_inputs):
        """The detector's training forward pass (with its loss) under IMAGE masking at the current progress, the
        trained proposal head (``proposal_loss: trained``) and the denoising queries (None: without)."""
        trained = self.hparams.get("proposal_loss", "trained") == "trained"
        with feature_masking(self.detector, self.masking, self.progress(), batch["pixel_mask"]), (
            trained_proposals(self.detector) if trained else contextlib.nullcontext()
        ), denoising_training(self.detector, queries):
            return self.detector(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=labels, **text_inputs)

    def _training_loss(self, outputs, labels: list[dict], queries, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """The step's loss from the forward pass's (DDP box normalization, the non-finite guard: None skips the
        step), with the loss terms, the masking statistics and, on the first batch, the mask pictures logged."""
        total = outputs.loss
        if self.denoising is not None and queries is None:
            total = total + self.denoising.unused_term()  # no box in this batch: DDP still sees every parameter
        loss = self.nonfinite(self, total * self._global_box_normalization(labels))
        if loss is None:
            return None
        batch_size = batch["pixel_values"].shape[0]
        self.log("train/loss", outputs.loss, prog_bar=True, batch_size=batch_size)
        for name, value in outputs.loss_dict.items():
            if name in LOGGED_TERMS:
                self.log(f"train/{name}", value, batch_size=batch_size)
        if self.masking.config.variant != "none":
            self.log("mask/strength_k", float(self.masking.last_strength), batch_size=batch_size)
            for level, ratio in sorted(self.masking.last_ratios.items()):
                self.log(f"mask/ratio_level{level}", float(ratio), batch_size=batch_size)
        if batch_idx == 0 and self.hparams.log_images:
            self._log_masks(batch)
        return loss

    # ----------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def detect(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, orig_sizes: torch.Tensor,
               share_backbone: bool = True, cache_text: bool = True) -> list[dict]:
        """Top ``num_detections`` detections per image over all prompts; the image backbone runs once for all
        of them (``shared_image_backbone``; ``share_backbone=False`` reruns it per prompt), and the text encoder
        once per prompt while its weights stay the same (``cached_text_features``: over the images of a batch and
        over batches; ``cache_text=False`` reruns it per image and prompt).

        pixel_values (B, 3, H, W), pixel_mask (B, H, W), orig_sizes (B, 2) as (h, w). Returns per image
        ``boxes`` (n, 4) xywh in original pixels, ``scores`` (n,), ``category_ids`` (n,) of the dataset.
        """
        b = pixel_values.shape[0]
        all_scores, all_boxes, all_categories = [], [], []
        with shared_image_backbone(self.detector) if share_backbone else contextlib.nullcontext():
            for prompt in self.prompts:
                token_ids = prompt.input_ids.cpu().unsqueeze(0).expand(b, -1)  # the rows' keys, read on the CPU
                with cached_text_features(self.detector, self.text_features, token_ids) if cache_text else contextlib.nullcontext():
                    outputs = self.detector(pixel_values=pixel_values, pixel_mask=pixel_mask, **self._text_inputs(prompt, b))
                scores = category_scores(outputs.logits.float(), prompt.positive_map.to(self.device))  # (B, Q, C)
                q, c = scores.shape[1:]
                all_scores.append(scores.reshape(b, q * c))
                all_boxes.append(outputs.pred_boxes.float().repeat_interleave(c, dim=1))  # (B, Q*C, 4)
                all_categories.append(torch.tensor(prompt.category_ids, device=self.device).repeat(q))
        scores, boxes = torch.cat(all_scores, 1), torch.cat(all_boxes, 1)
        categories = torch.cat(all_categories)
        top = scores.topk(min(self.hparams.num_detections, scores.shape[1]), dim=1)
        detections = []
        for i in range(b):
            height, width = orig_sizes[i].tolist()
            xyxy = box_convert(boxes[i, top.indices[i]], "cxcywh", "xyxy") * torch.tensor([width, height, width, height], device=self.device)
            detections.append(
                {"boxes": box_convert(xyxy, "xyxy", "xywh"), "scores": top.values[i], "category_ids": categories[top.indices[i]]}
            )
        return detections

    def _evaluation_step(self, batch: dict, batch_idx: int, split: str) -> list[dict]:
        targets = batch["targets"]
        self._check_batch(batch["pixel_values"], targets)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(self.device)
        detections = self.detect(batch["pixel_values"], batch["pixel_mask"], orig_sizes)
        if split in self.metrics:
            self.metrics[split].update(
                torch.tensor([t["image_id"] for t in targets]),
                [d["boxes"] for d in detections],
                [d["scores"] for d in detections],
                [d["category_ids"] for d in detections],
            )
        if split in ("val", "test") and batch_idx == 0 and self.hparams.log_images:
            self._log_predictions(batch, detections[0], split)
        return detections

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, "test")

    def predict_step(self, batch: dict | list[dict], batch_idx: int) -> list[dict]:
        """A COCO batch: its detections (as the test step's, with ``image_id``). A list of samples
        ``{"image_id", "image": uint8 (3, H, W), "path"}`` (``ImageFolderDataModule``): ``GroundingDetector``'s
        record of each image plus ``image_id`` and ``path``, with the settings of ``predict_settings``."""
        if isinstance(batch, list):
            return self.detect_images(batch)
        detections = self._evaluation_step(batch, batch_idx, "predict")
        for target, detection in zip(batch["targets"], detections):
            detection["image_id"] = target["image_id"]
        return detections

    #: ``detect_images``'s settings: ``classes`` or ``text``, ``box_threshold``, ``text_threshold``, ``top_k``,
    #: ``image_size``, ``max_size`` (grounding-predict sets them)
    predict_settings: dict | None = None

    def detect_images(self, samples: list[dict]) -> list[dict]:
        """``GroundingDetector`` over ``samples`` (``{"image_id", "image", "path"}``) with ``predict_settings``."""
        from grounding.models.detector import DEFAULT_IMAGE_SIZE, DEFAULT_MAX_SIZE, GroundingDetector, build_processor

        if not samples:
            return []
        settings = dict(self.predict_settings or {})
        size = (settings.pop("image_size", None) or DEFAULT_IMAGE_SIZE, settings.pop("max_size", DEFAULT_MAX_SIZE))
        if getattr(self, "_predict_detector", (None, None))[0] != size:
            self._predict_detector = (size, GroundingDetector(self.detector, build_processor(self.tokenizer, *size)))
        detector = self._predict_detector[1]
        records = detector([sample["image"] for sample in samples], **settings)
        return [{"image_id": sample["image_id"], "path": sample["path"], **record} for sample, record in zip(samples, records)]

    def _finish_evaluation(self, split: str) -> None:
        if split not in self.metrics:
            return
        metric = self.metrics[split]
        # COCOeval or LVISEval on rank 0; the same values on every rank (NaN where undefined)
        values = metric.compute()
        for name, value in values.items():
            self.log(f"{split}/{name}", value)
        image_ids, results = metric.last_results  # LVIS: the detections left by the cap per category, as evaluated
        log_dir = self.trainer.log_dir  # a collective call under DDP: every rank must make it
        if self.trainer.is_global_zero and log_dir and not self.trainer.sanity_checking:
            folder = Path(log_dir) / "predictions"
            source = self.trainer.datamodule.evaluation_split if split == "test" else split
            prefix = "lvis_" if isinstance(metric, LvisFixedAPMetric) else ""
            fn = self.trainer.state.fn
            if split == "val" and fn == "fit":
                name = f"{prefix}{source}_epoch{self.current_epoch:03d}.json"
            elif split == "val":  # a validation outside fit (before or after it): named by the weights' step
                name = f"{prefix}{source}_step{self.global_step:06d}.json"
            else:
                name = f"{prefix}{source}.json"
            write_json_atomic(folder / name, results)
        shown = " ".join(f"{name} {float(values[name]):.4f}" for name in ("AP", "AP50", "APr", "APc", "APf") if name in values)
        log.info("%s: %d images, %d detections, %s", split, len(image_ids), len(results), shown)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    # ----------------------------------------------------------------------------------------- logging
    def _experiment(self):
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or not self.trainer.is_global_zero:
            return None
        return experiment

    def _input_image(self, batch: dict) -> torch.Tensor:
        """The first image of a batch in its original colours, without padding: uint8 (3, h, w)."""
        height, width = batch["targets"][0]["size"].tolist()
        return denormalize(batch["pixel_values"][0, :, :height, :width].float().cpu(), IMAGENET_MEAN, IMAGENET_STD)

    def _log_predictions(self, batch: dict, detection: dict, split: str) -> None:
        """Ground truth | predictions (score >= log_score_threshold) of the batch's first image."""
        experiment = self._experiment()
        if experiment is None:
            return
        target = batch["targets"][0]
        image = self._input_image(batch)
        height, width = image.shape[-2:]
        orig_h, orig_w = target["orig_size"].tolist()
        scale = torch.tensor([width / orig_w, height / orig_h] * 2)
        gt = box_convert(target["boxes"].float().cpu(), "cxcywh", "xyxy") * torch.tensor([width, height] * 2)
        predictions = box_convert(detection["boxes"].float().cpu(), "xywh", "xyxy") * scale
        picture = detection_panel(
            image, gt, [self.categories[int(c)] for c in target["category_ids"]],
            predictions, [self.categories[int(c)] for c in detection["category_ids"].tolist()], detection["scores"].float().cpu(),
            score_threshold=self.hparams.log_score_threshold,
        )
        experiment.add_image(f"{split}/predictions", picture, self.global_step)

    def _log_masks(self, batch: dict) -> None:
        """The mask of every level over the batch's first training image (once per epoch)."""
        experiment = self._experiment()
        if experiment is None or not self.masking.last_masks:
            return
        image, _ = upscale(self._input_image(batch))
        height, width = batch["targets"][0]["size"].tolist()
        padded_h, padded_w = batch["pixel_values"].shape[-2:]
        masks, titles = [], []
        for level, mask in sorted(self.masking.last_masks.items()):
            rows = max(1, round(mask.shape[-2] * height / padded_h))
            columns = max(1, round(mask.shape[-1] * width / padded_w))
            masks.append(mask[0, :rows, :columns].float().cpu())  # the real pixels' part of the level's grid
            titles.append(f"level {level} (stride {8 * 2 ** level}), r={self.masking.last_ratios[level]:.2f}")
        experiment.add_image("train/masks", mask_panels(image, masks, titles), self.global_step)
