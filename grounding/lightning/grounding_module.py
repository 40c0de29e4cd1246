"""The detector trained on grounding data (per-image text) and evaluated on referring expressions (REC).

``GroundingModule`` is ``ImageGroundingModule`` (the same detector building, IMAGE masking, contrastive
denoising, optimizer, schedules and guards) with two things changed (docs/image.md "Training on grounding
data"):

- **training**: every image of a batch has its own text (``GroundingDataModule``: a caption, or a detection
  prompt with sampled negatives). The model receives ``input_ids`` (B, T) padded with [PAD] and their
  ``attention_mask``; the loss is transformers' own, but with the batch's label maps in place of the ones the
  library derives from "." delimiters (``grounding.models.grounding_dino.batch_label_maps``). Contrastive
  denoising builds its queries from the same labels (label noise draws among the batch's largest row count:
  a drawn row an image does not have is still a wrong label, which is what the noise is for); masking and the
  DDP box normalization are the parent's.
- **evaluation**: each expression is run with itself as the text. A query's score is the **mean** of its
  token probabilities over the expression's tokens, as ``grounding.data.prompts.category_scores`` scores a
  category's phrase, (I-12) of docs/image.md (``rec_score: max`` takes the largest instead); the queries are
  ranked by that score and the best ``rec_top_k`` (10) kept, boxes in the original image's pixels. They feed
  ``ReferringExpressionAccuracy`` (acc@1/5/10 at IoU >= 0.5), logged as ``val/rec_acc@k`` (``test/...``), per
  split name as ``val/<name>/rec_acc@k``. With a COCO detection loader beside (``val_detection``) the parent's
  box AP is computed and logged too. The REC predictions of every evaluation are written atomically to
  ``RUN/predictions/rec_<split>_epochNNN.json`` (``_stepNNNNNN`` outside fit), one record per expression.

With a plain ``CocoDetectionDataModule`` the module behaves as its parent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from torchvision.ops import box_convert

from grounding.lightning.image_module import ImageGroundingModule
from grounding.metrics.phrase_grounding import PhraseGroundingRecall
from grounding.metrics.rec import ReferringExpressionAccuracy, ranking
from grounding.models.adaptive_masking import MaskingConfig
from grounding.models.denoising import DenoisingConfig
from grounding.models.freezing import FreezePart
from grounding.models.grounding_dino import batch_label_maps, offset_class_labels
from grounding.models.lora import LoraSettings
from grounding.utils import write_json_atomic
from grounding.visualize import detection_panel

log = logging.getLogger(__name__)

REC_SCORES = ("mean", "max")


def expression_scores(logits: torch.Tensor, token_mask: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """(B, Q) score of every query for its expression: the mean (or max) over the expression's tokens of the
    token probabilities. logits (B, Q, L) token logits; token_mask (B, L) bool, True on the expression's tokens
    (an expression without any token scores 0)."""
    if reduce not in REC_SCORES:
        raise ValueError(f"reduce must be one of {REC_SCORES}, got {reduce!r}")
    probabilities = logits.float().sigmoid() * token_mask[:, None, :].to(torch.float32)
    if reduce == "max":
        return probabilities.amax(-1)
    return probabilities.sum(-1) / token_mask.sum(-1, keepdim=True).clamp(min=1).to(torch.float32)


def rec_predictions(logits: torch.Tensor, pred_boxes: torch.Tensor, token_mask: torch.Tensor, orig_sizes: torch.Tensor,
                    top_k: int = 10, reduce: str = "mean") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per expression, the ``top_k`` best queries: (boxes (k, 4) xyxy in original pixels, scores (k,)), best first.

    logits (B, Q, L); pred_boxes (B, Q, 4) normalized cxcywh; token_mask (B, L); orig_sizes (B, 2) as (h, w).
    Equal scores keep the model's query order (a stable sort, as ``ReferringExpressionAccuracy`` ranks).
    """
    scores = expression_scores(logits, token_mask, reduce)
    results = []
    for i in range(scores.shape[0]):
        order = ranking(scores[i])[:top_k]
        height, width = (float(v) for v in orig_sizes[i].tolist())
        scale = torch.tensor([width, height, width, height], device=pred_boxes.device)
        boxes = box_convert(pred_boxes[i, order].float(), "cxcywh", "xyxy") * scale
        results.append((boxes, scores[i, order]))
    return results


class GroundingModule(ImageGroundingModule):
    """Grounding DINO (or MM-Grounding-DINO) + IMAGE trained on grounding data, evaluated by REC accuracy.

    Args: those of ``ImageGroundingModule``, and
        rec_top_k: boxes kept per expression at evaluation (acc@k needs k <= rec_top_k).
        rec_score: ``mean`` (default) or ``max`` of the token probabilities over the expression's tokens.
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
        rec_top_k: int = 10,
        rec_score: Literal["mean", "max"] = "mean",
        lora: LoraSettings | None = None,
    ):
        if isinstance(rec_top_k, bool) or not isinstance(rec_top_k, int) or rec_top_k < 1:
            raise ValueError(f"model.rec_top_k must be an integer >= 1, got {rec_top_k!r}")
        if rec_score not in REC_SCORES:
            raise ValueError(f"model.rec_score must be one of {REC_SCORES}, got {rec_score!r}")
        super().__init__(
            model=model, model_config=model_config, masking=masking, lr=lr, lr_backbone=lr_backbone,
            lr_text_encoder=lr_text_encoder, weight_decay=weight_decay, freeze_text_encoder=freeze_text_encoder,
            freeze=freeze, gradient_checkpointing=gradient_checkpointing,
            lr_drop_epochs=lr_drop_epochs, lr_drop_factor=lr_drop_factor, lr_schedule=lr_schedule,
            lr_min_factor=lr_min_factor, num_detections=num_detections, log_images=log_images,
            log_score_threshold=log_score_threshold, max_nonfinite_steps=max_nonfinite_steps,
            proposal_loss=proposal_loss, denoising=denoising, lora=lora,
        )
        self.rec_metrics = torch.nn.ModuleDict()  # split -> ReferringExpressionAccuracy, made in setup
        self.phrase_metrics = torch.nn.ModuleDict()  # split -> PhraseGroundingRecall, made in setup
        self.rec_records: dict[str, list[dict]] = {}  # "<split>" (REC) / "<split>:phrase" -> records of this process

    # ----------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "rec_split_names"):  # COCO detection data, or the user's images: the parent's
            return super().setup(stage)
        datamodule.use_tokenizer(self.tokenizer, self.detector.config.max_text_len)
        side = datamodule.smallest_side
        self.check_input_size(side, side, f"data.image_size / data.train_scales (smallest side {side})")
        categories = datamodule.categories
        if categories:
            self.set_categories(categories)
        splits = {"fit": ["val"], "validate": ["val"], "test": ["test"], "predict": []}.get(stage, ["val", "test"])
        for split in splits:
            source = "val" if split == "val" else datamodule.evaluation_split
            if datamodule.sources(source, "rec"):
                self.rec_metrics[split] = ReferringExpressionAccuracy(splits=datamodule.rec_split_names(source))
            if datamodule.sources(source, "phrase"):
                self.phrase_metrics[split] = PhraseGroundingRecall(phrase_types=datamodule.phrase_split_names(source))
            metric = self.box_metric(datamodule, source)
            if metric is not None:
                self.metrics[split] = metric

    # ----------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if "label_maps" not in batch:  # a COCO batch with the dataset's prompts
            return super().training_step(batch, batch_idx)
        targets = batch["targets"]
        self._check_batch(batch["pixel_values"], targets)
        labels = [{"class_labels": t["class_labels"].to(self.device), "boxes": t["boxes"].to(self.device)} for t in targets]
        label_maps = [m.to(self.device) for m in batch["label_maps"]]
        queries = None
        if self.denoising is not None:
            rows = max(m.shape[0] for m in label_maps)
            queries = self.denoising.build(labels, max(rows, 1), self.detector.config.num_queries)
        with batch_label_maps(label_maps) as offsets:
            model_labels = offset_class_labels(labels, offsets)
            if queries is not None:  # the denoising loss reads the same stacked maps
                queries.targets = offset_class_labels(queries.targets, offsets)
            outputs = self._training_forward(batch, model_labels, queries, input_ids=batch["input_ids"].to(self.device),
                                             attention_mask=batch["attention_mask"].to(self.device))
        return self._training_loss(outputs, labels, queries, batch, batch_idx)

    # ----------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def locate(self, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ranked boxes of every expression of a REC batch (``rec_predictions``)."""
        outputs = self.detector(
            pixel_values=batch["pixel_values"],
            pixel_mask=batch["pixel_mask"],
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
        )
        orig_sizes = torch.stack([t["orig_size"] for t in batch["targets"]])
        return rec_predictions(outputs.logits, outputs.pred_boxes, batch["token_mask"].to(self.device), orig_sizes,
                               self.hparams.rec_top_k, self.hparams.rec_score)

    def _rec_step(self, batch: dict, batch_idx: int, split: str) -> list[dict]:
        targets = batch["targets"]
        self._check_batch(batch["pixel_values"], targets)
        ranked = self.locate(batch)
        metric = self.rec_metrics[split] if split in self.rec_metrics else None
        records = []
        for target, (boxes, scores) in zip(targets, ranked):
            if metric is not None:
                names = None if target["split"] is None else [target["split"]]
                metric.update([boxes], [scores], [target["gt_boxes"]], names)
            records.append({
                "expression_id": int(target["expression_id"]),
                "image_id": target["image_id"],
                "text": target["text"],
                "split": target["split"],
                "boxes": [[round(v, 2) for v in box] for box in boxes.tolist()],
                "scores": [round(v, 5) for v in scores.tolist()],
                "gt_boxes": target["gt_boxes"].tolist(),
            })
        self.rec_records.setdefault(split, []).extend(records)
        if split in ("val", "test") and batch_idx == 0 and self.hparams.log_images:
            self._log_expression(batch, ranked[0], split)
        return records

    @torch.no_grad()
    def locate_phrases(self, batch: dict) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per caption of a phrase batch, per phrase, its ranked boxes (``rec_predictions`` with the phrase's
        tokens as the token mask): the model runs once per caption, every phrase is scored in it."""
        outputs = self.detector(
            pixel_values=batch["pixel_values"],
            pixel_mask=batch["pixel_mask"],
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
        )
        results = []
        for i, target in enumerate(batch["targets"]):
            masks = target["phrase_masks"].to(self.device)
            count = masks.shape[0]
            results.append(rec_predictions(
                outputs.logits[i:i + 1].expand(count, -1, -1), outputs.pred_boxes[i:i + 1].expand(count, -1, -1), masks,
                target["orig_size"].reshape(1, 2).expand(count, 2), self.hparams.rec_top_k, self.hparams.rec_score,
            ))
        return results

    def _phrase_step(self, batch: dict, batch_idx: int, split: str) -> list[dict]:
        targets = batch["targets"]
        self._check_batch(batch["pixel_values"], targets)
        metric = self.phrase_metrics[split] if split in self.phrase_metrics else None
        records = []
        for target, ranked in zip(targets, self.locate_phrases(batch)):
            boxes, scores = [b for b, _ in ranked], [s for _, s in ranked]
            if metric is not None:
                names = None if target["split"] is None else [[target["split"]]] * len(ranked)
                metric.update(boxes, scores, target["gt_boxes"], names)
            for phrase_id, phrase, phrase_boxes, phrase_scores, gt in zip(
                    target["phrase_ids"].tolist(), target["phrases"], boxes, scores, target["gt_boxes"]):
                records.append({
                    "phrase_id": int(phrase_id),
                    "sentence_id": int(target["sentence_id"]),
                    "image_id": target["image_id"],
                    "text": target["text"],
                    "phrase": phrase,
                    "split": target["split"],
                    "boxes": [[round(v, 2) for v in box] for box in phrase_boxes.tolist()],
                    "scores": [round(v, 5) for v in phrase_scores.tolist()],
                    "gt_boxes": gt.tolist(),
                })
        self.rec_records.setdefault(f"{split}:phrase", []).extend(records)
        return records

    def _step(self, batch: dict, batch_idx: int, split: str):
        if batch.get("task") == "rec":
            return self._rec_step(batch, batch_idx, split)
        if batch.get("task") == "phrase":
            return self._phrase_step(batch, batch_idx, split)
        return self._evaluation_step(batch, batch_idx, split)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, batch_idx, "test")

    def predict_step(self, batch: dict | list[dict], batch_idx: int, dataloader_idx: int = 0):
        """A REC batch: its ranked boxes per expression; otherwise the parent's (COCO batch, user images)."""
        if isinstance(batch, dict) and batch.get("task") in ("rec", "phrase"):
            records = self._step(batch, batch_idx, "predict")
            self.rec_records.pop("predict", None)
            self.rec_records.pop("predict:phrase", None)
            return records
        return super().predict_step(batch, batch_idx)

    def _gathered(self, records: list[dict], key: str = "expression_id") -> list[dict]:
        """Every process's records (each expression is evaluated on one process), sorted by ``key``."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            shares: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shares, records)
            records = [record for share in shares for record in share]
        return sorted(records, key=lambda record: record[key])

    def _finish_rec(self, split: str, protocol: str = "rec") -> None:
        """Log ``split``'s REC accuracy (``protocol="rec"``: ``<split>/rec_acc@k``) or phrase-grounding recall
        (``"phrase"``: ``<split>/phrase_R@k``), per named split too, and write every process's records to
        ``RUN/predictions/<protocol>_<source>[_epochNNN | _stepNNNNNN].json`` (atomically, on rank 0)."""
        metrics = self.rec_metrics if protocol == "rec" else self.phrase_metrics
        if split not in metrics:
            return
        metric = metrics[split]
        values = {name: float(value) for name, value in metric.compute().items()}  # summed over processes
        prefix = "rec_" if protocol == "rec" else "phrase_"
        for name, value in values.items():
            group, _, statistic = name.rpartition("/")
            self.log(f"{split}/{group + '/' if group else ''}{prefix}{statistic}", value)
        key = "expression_id" if protocol == "rec" else "phrase_id"
        records = self._gathered(self.rec_records.pop(split if protocol == "rec" else f"{split}:phrase", []), key)
        log_dir = self.trainer.log_dir  # a collective call under DDP: every rank must make it
        if self.trainer.is_global_zero and log_dir and not self.trainer.sanity_checking:
            source = self.trainer.datamodule.evaluation_split if split == "test" else split
            if split == "val" and self.trainer.state.fn == "fit":
                name = f"{protocol}_{source}_epoch{self.current_epoch:03d}.json"
            elif split == "val":
                name = f"{protocol}_{source}_step{self.global_step:06d}.json"
            else:
                name = f"{protocol}_{source}.json"
            write_json_atomic(Path(log_dir) / "predictions" / name, records)
        if protocol == "rec":
            log.info("%s: %d expressions, REC acc@1 %.4f acc@5 %.4f acc@10 %.4f", split, int(values.get("count", 0)),
                     values.get("acc@1", float("nan")), values.get("acc@5", float("nan")), values.get("acc@10", float("nan")))
        else:
            log.info("%s: %d phrases, phrase grounding R@1 %.4f R@5 %.4f R@10 %.4f", split, int(values.get("count", 0)),
                     values.get("R@1", float("nan")), values.get("R@5", float("nan")), values.get("R@10", float("nan")))
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._finish_rec("val")
        self._finish_rec("val", "phrase")
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_rec("test")
        self._finish_rec("test", "phrase")
        self._finish_evaluation("test")

    # ----------------------------------------------------------------------------------------- logging
    def _log_expression(self, batch: dict, ranked: tuple[torch.Tensor, torch.Tensor], split: str) -> None:
        """The first expression of a batch: its ground truth | its best box, labelled with the expression."""
        experiment = self._experiment()
        if experiment is None:
            return
        target = batch["targets"][0]
        image = self._input_image(batch)
        height, width = image.shape[-2:]
        orig_h, orig_w = target["orig_size"].tolist()
        scale = torch.tensor([width / orig_w, height / orig_h] * 2)
        boxes, scores = ranked
        text = target["text"]
        picture = detection_panel(
            image, target["gt_boxes"].float().cpu() * scale, [text] * len(target["gt_boxes"]),
            boxes[:1].float().cpu() * scale, [text], scores[:1].float().cpu(), score_threshold=0.0, max_predictions=1,
        )
        experiment.add_image(f"{split}/expressions", picture, self.global_step)
