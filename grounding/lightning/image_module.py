"""IMAGE: Grounding DINO trained with adaptive masking of its multi-scale feature maps (SPEC §1).

Training runs the detector with transformers' own loss while ``feature_masking`` masks the encoder's
input maps; the schedule's progress p = global step / total steps comes from the Trainer. Validation,
test and predict never mask. Evaluation scores every (query, category) pair (mean token probability of
the category's phrase), keeps the top ``num_detections`` per image across all prompts, and reports COCO
box AP through pycocotools on the original annotation file; detections are exported as COCO results
JSON in the run folder.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes

from grounding.data.coco import IMAGENET_MEAN, IMAGENET_STD
from grounding.data.prompts import Prompt, build_prompts, category_scores
from grounding.metrics.coco_eval import CocoBoxMetric, write_json_atomic
from grounding.models.adaptive_masking import AdaptiveMasking, MaskingConfig
from grounding.models.grounding_dino import build_grounding_dino, feature_masking, parameter_groups

log = logging.getLogger(__name__)


class ImageGroundingModule(L.LightningModule):
    """Grounding DINO + IMAGE adaptive masking.

    Args:
        model: ``"tiny"`` (random tiny model, offline tokenizer) or a hub id / local path of a checkpoint,
            e.g. ``IDEA-Research/grounding-dino-tiny``.
        model_config: config overrides (tiny: merged into ``TINY_CONFIG``; pretrained: ``from_pretrained`` kwargs).
        masking: IMAGE settings (``MaskingConfig``: variant rf_gam/threshold/random/none, r0, r1, sigma, k0,
            progressive, tau, max_tokens); ``variant: none`` trains the plain detector.
        lr, lr_backbone, lr_text_encoder, weight_decay: AdamW groups (SPEC §1: 1e-4, 1e-5, 1e-5, 1e-4).
        freeze_text_encoder: keep BERT frozen (SPEC default).
        lr_drop_epochs, lr_drop_factor: step decay of all groups at these epochs (``lr_schedule: step``).
        lr_schedule: ``step`` (the SPEC's step decay; constant without ``lr_drop_epochs``) or ``cosine``
            (per-step cosine decay from each group's lr to ``lr_min_factor`` × lr over the whole run).
        num_detections: detections kept per image at evaluation (top (query, category) pairs).
        log_images: log an image with its predicted boxes and the masks of each level at each validation.
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
        freeze_text_encoder: bool = True,
        lr_drop_epochs: list[int] | None = None,
        lr_drop_factor: float = 0.1,
        lr_schedule: str = "step",
        lr_min_factor: float = 0.01,
        num_detections: int = 300,
        log_images: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        if lr_schedule not in ("step", "cosine"):
            raise ValueError(f"model.lr_schedule must be 'step' or 'cosine', got {lr_schedule!r}")
        if lr_schedule == "cosine" and lr_drop_epochs:
            raise ValueError(f"model.lr_drop_epochs={lr_drop_epochs} has no effect with model.lr_schedule=cosine; set one or the other")
        self.detector, self.tokenizer = build_grounding_dino(model, model_config)
        if freeze_text_encoder:
            self.detector.model.text_backbone.requires_grad_(False)
        self.masking = AdaptiveMasking(masking if masking is not None else MaskingConfig())
        self.prompts: list[Prompt] = []
        self.categories: dict[int, str] = {}
        self.metrics = torch.nn.ModuleDict()  # split -> CocoBoxMetric, made in setup from the datamodule

    # ----------------------------------------------------------------------------------------- set-up
    def set_categories(self, categories: dict[int, str]) -> None:
        """Build the prompts of a dataset's categories (validated; split when they do not fit)."""
        self.categories = dict(categories)
        self.prompts = build_prompts(self.categories, self.tokenizer, self.detector.config.max_text_len)
        self.position = {cid: (k, i) for k, p in enumerate(self.prompts) for i, cid in enumerate(p.category_ids)}

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        self.set_categories(datamodule.categories)
        for split in ("val", "test"):
            annotations = datamodule.paths[split][0]
            if annotations and Path(annotations).exists():
                self.metrics[split] = CocoBoxMetric(annotations)

    def configure_optimizers(self):
        h = self.hparams
        optimizer = torch.optim.AdamW(parameter_groups(self.detector, h.lr, h.lr_backbone, h.lr_text_encoder, h.weight_decay))
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

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Several prompts: one per step, in turn; the library's loss expects one prompt per batch.
        prompt_index = self.global_step % len(self.prompts)
        prompt = self.prompts[prompt_index]
        pixel_values, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
        p = self.progress()
        with feature_masking(self.detector, self.masking, p, pixel_mask):
            outputs = self.detector(
                pixel_values=pixel_values,
                pixel_mask=pixel_mask,
                labels=self._labels(batch["targets"], prompt_index),
                **self._text_inputs(prompt, pixel_values.shape[0]),
            )
        batch_size = pixel_values.shape[0]
        self.log("train/loss", outputs.loss, prog_bar=True, batch_size=batch_size)
        for name, value in outputs.loss_dict.items():
            if name in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"):
                self.log(f"train/{name}", value, batch_size=batch_size)
        if self.masking.config.variant != "none":
            self.log("mask/strength_k", float(self.masking.last_strength), batch_size=batch_size)
            for level, ratio in sorted(self.masking.last_ratios.items()):
                self.log(f"mask/ratio_level{level}", float(ratio), batch_size=batch_size)
        return outputs.loss

    # ----------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def detect(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, orig_sizes: torch.Tensor) -> list[dict]:
        """Top ``num_detections`` detections per image over all prompts.

        pixel_values (B, 3, H, W), pixel_mask (B, H, W), orig_sizes (B, 2) as (h, w). Returns per image
        ``boxes`` (n, 4) xywh in original pixels, ``scores`` (n,), ``category_ids`` (n,) of the dataset.
        """
        b = pixel_values.shape[0]
        all_scores, all_boxes, all_categories = [], [], []
        for prompt in self.prompts:
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
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(self.device)
        detections = self.detect(batch["pixel_values"], batch["pixel_mask"], orig_sizes)
        if split in self.metrics:
            self.metrics[split].update(
                torch.tensor([t["image_id"] for t in targets]),
                [d["boxes"] for d in detections],
                [d["scores"] for d in detections],
                [d["category_ids"] for d in detections],
            )
        if split == "val" and batch_idx == 0 and self.hparams.log_images:
            self._log_images(batch, detections[0])
        return detections

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        detections = self._evaluation_step(batch, batch_idx, "predict")
        for target, detection in zip(batch["targets"], detections):
            detection["image_id"] = target["image_id"]
        return detections

    def _finish_evaluation(self, split: str) -> None:
        if split not in self.metrics:
            return
        metric = self.metrics[split]
        values = metric.compute()
        for name, value in values.items():
            self.log(f"{split}/{name}", value, rank_zero_only=True)
        image_ids, results = metric.last_results
        log_dir = self.trainer.log_dir  # a collective call under DDP: every rank must make it
        if self.trainer.is_global_zero and log_dir and not self.trainer.sanity_checking:
            folder = Path(log_dir) / "predictions"
            name = f"{split}_epoch{self.current_epoch:03d}.json" if split == "val" and self.trainer.state.fn == "fit" else f"{split}.json"
            write_json_atomic(folder / name, results)
        log.info("%s: %d images, %d detections, AP %.4f AP50 %.4f", split, len(image_ids), len(results), values["AP"], values["AP50"])
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    # ----------------------------------------------------------------------------------------- logging
    def _log_images(self, batch: dict, detection: dict, top: int = 8) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or not self.trainer.is_global_zero:
            return
        height, width = batch["targets"][0]["size"].tolist()
        image = batch["pixel_values"][0, :, :height, :width].float().cpu()
        image = image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
        image = (image.clamp(0, 1) * 255).to(torch.uint8)
        orig_h, orig_w = batch["targets"][0]["orig_size"].tolist()
        # detections come sorted by score
        boxes = box_convert(detection["boxes"][:top].cpu(), "xywh", "xyxy") * torch.tensor([width / orig_w, height / orig_h] * 2)
        names = [f"{self.categories[int(c)]} {s:.2f}" for c, s in zip(detection["category_ids"][:top].tolist(), detection["scores"][:top].tolist())]
        drawn = draw_bounding_boxes(image, boxes, labels=names, colors="yellow")
        experiment.add_image("val/predictions", drawn, self.global_step)
        for level, mask in sorted(self.masking.last_masks.items()):
            experiment.add_image(f"mask/level{level}", mask[0].float().cpu().clamp(0, 1)[None], self.global_step)
