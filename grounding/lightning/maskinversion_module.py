"""MaskInversion under the Trainer: localized embeddings per region, retrieval protocols and baselines.

``test_step`` / ``predict_step`` take a batch of ``RegionDataModule`` samples (one image with its region
masks each) and embed every region with each method of ``methods``:

- ``maskinversion``: the LETs of ``grounding.models.maskinversion.MaskInversion`` (docs/maskinversion.md);
- ``global``: the image's global CLIP embedding (the same for all its regions);
- ``crop``: CLIP embedding of the crop to the mask's box;
- ``masked_crop``: the same crop with the pixels outside the mask set to the CLIP mean colour;
- ``red_circle``: the whole image with a red ellipse drawn around the region.

Protocols (Acc@1, docs/maskinversion.md): ``class`` — cosine with "a photo of a {class}." for every class of the
dataset (``RegionDataModule.class_names``), right when the top-1 class is the region's; ``referring`` —
cosine with every referring expression of the image, right when the top-1 is one of the region's own.
Metrics are logged as ``test/acc1_<method>`` (torchmetrics, gathered across processes; each image is read by
one process only). The LETs (and the baselines' embeddings) are written to
``RUN/predictions/maskinversion_<split>.pt``: ``{"keys": ["<image_id>/<region_id>", ...], "image_ids",
"region_ids", "embeddings": (R, P) LETs, "baselines": {method: (R, P)}, "settings": {...}}``, loadable
with ``torch.load`` for downstream use (captioning, retrieval). TensorBoard gets, for the first
``log_regions`` regions, the image, the mask and the LeGrad map before and after the inversion.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt

from grounding.data.region_views import crop_view, masked_crop_view, red_circle_view
from grounding.data.image_folder import PredictionDataModule
from grounding.lightning.test_time import TestTimeModule, plain_settings
from grounding.metrics.retrieval import RetrievalAccuracy, top1_correct
from grounding.models.clip import build_clip
from grounding.models.maskinversion import MaskInversion, MaskInversionSettings
from grounding.utils import write_atomic
from grounding.visualize import overlay_heatmap, panel_row, upscale

log = logging.getLogger(__name__)

METHODS = ("maskinversion", "global", "crop", "masked_crop", "red_circle")
Method = Literal["maskinversion", "global", "crop", "masked_crop", "red_circle"]


class MaskInversionModule(TestTimeModule):
    """Region embeddings by MaskInversion and baselines, evaluated by retrieval.

    Args:
        backbone: ``"tiny"`` (random tiny CLIP, offline tokenizer), ``"vit-b16-random"``, or a hub id /
            local folder of a CLIP checkpoint in HF format (``openai/clip-vit-base-patch16``, LAION, MetaCLIP).
        backbone_config: config overrides of the random backbones.
        image_size: CLIP input size (position embeddings resampled; the paper: 448).
        antialias: antialiased bicubic resampling of the position embeddings (as the references do), else transformers' plain one.
        protocol: ``class`` or ``referring`` retrieval.
        methods: which of maskinversion, global, crop, masked_crop, red_circle to run (None: all).
        inversion: the optimization of the LETs (``MaskInversionSettings``: iterations, lr, weight_decay,
            optimizer, mode, layers, chunk_size).
        alpha: the regularizer's weight; None = the protocol's default (0 for class, 5 for referring).
        template: class prompt, ``{}`` is replaced by the class name.
        crop_margin: box margin of the crop baselines (fraction of the box size on each side).
        save_predictions: write the embeddings file at the end of test / predict.
        log_regions: regions per evaluation whose maps go to TensorBoard.
    """

    def __init__(
        self,
        backbone: str = "tiny",
        backbone_config: dict | None = None,
        image_size: PositiveInt = 448,
        antialias: bool = True,
        protocol: Literal["class", "referring"] = "class",
        methods: list[Method] | None = None,
        inversion: MaskInversionSettings = MaskInversionSettings(),
        alpha: NonNegativeFloat | None = None,
        template: str = "a photo of a {}.",
        crop_margin: NonNegativeFloat = 0.0,
        save_predictions: bool = True,
        log_regions: NonNegativeInt = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        methods = list(METHODS if methods is None else methods)
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"model.methods must be a non-empty list of {METHODS}, got {methods}")
        if "{}" not in template:
            raise ValueError(f"model.template must contain '{{}}' for the class name, got {template!r}")
        self.methods = methods
        self.backbone = build_clip(backbone, image_size=image_size, antialias=antialias, overrides=backbone_config)
        self.alpha = (5.0 if protocol == "referring" else 0.0) if alpha is None else float(alpha)
        try:
            self.inverter = MaskInversion(self.backbone, alpha=self.alpha, **asdict(inversion))
        except ValueError as error:
            raise ValueError(f"model.inversion.{error}") from None
        self.metrics = torch.nn.ModuleDict({m: RetrievalAccuracy() for m in methods})
        self.class_names: list[str] = []
        self._class_text: torch.Tensor | None = None
        self._outputs: list[dict] = []

    @property
    def picture_limit(self) -> int:
        return int(self.hparams.log_regions)

    # ------------------------------------------------------------------------------------- set-up
    def classes_from(self, datamodule) -> None:
        if getattr(datamodule, "mask_source", None) is not None:  # the user's regions: classes only when given
            self.class_names, self._class_text = list(datamodule.class_names), None
        elif self.hparams.protocol == "class":
            self.set_classes(list(datamodule.class_names))

    def set_classes(self, class_names: list[str]) -> None:
        """The class list of the class-retrieval protocol."""
        if not class_names:
            raise ValueError("class retrieval needs the dataset's class names; the data module gave none")
        self.class_names = list(class_names)
        self._class_text = None

    def _class_embeddings(self) -> torch.Tensor:
        if self._class_text is None or self._class_text.device != self.device:
            prompts = [self.hparams.template.format(name) for name in self.class_names]
            with torch.no_grad():
                self._class_text = self.backbone.encode_text(prompts)
        return self._class_text

    # ------------------------------------------------------------------------------------- embedding
    def _embed_views(self, views: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone.encode_image(self.backbone.preprocess([v.to(self.device) for v in views]))

    def embed_regions(self, image: torch.Tensor, masks: torch.Tensor, want_maps: bool = False) -> tuple[dict, object]:
        """{method: (R, P) embeddings} of the regions ``masks`` (R, H, W) of ``image`` (3, H, W)."""
        out, inversion = {}, None
        count = masks.shape[0]
        margin = self.hparams.crop_margin
        if "maskinversion" in self.methods:
            inversion = self.inverter(image, masks, return_maps=want_maps)
            out["maskinversion"] = inversion.embeddings
        if "global" in self.methods:  # MaskInversion's forward pass already gave it
            glob = inversion.global_embedding[None] if inversion is not None else self._embed_views([image])
            out["global"] = glob.expand(count, -1)
        if "crop" in self.methods:
            out["crop"] = self._embed_views([crop_view(image, m, margin) for m in masks])
        if "masked_crop" in self.methods:
            out["masked_crop"] = self._embed_views([masked_crop_view(image, m, margin) for m in masks])
        if "red_circle" in self.methods:
            out["red_circle"] = self._embed_views([red_circle_view(image, m) for m in masks])
        return out, inversion

    def _targets(self, sample: dict) -> tuple[list[int], torch.Tensor | None, list[list[int]]]:
        """Indices of the regions that the protocol can score, the candidate text embeddings, the right
        candidates of each scored region."""
        if self.hparams.protocol == "class":
            index = {name: i for i, name in enumerate(self.class_names)}
            rows = [r for r, name in enumerate(sample["class_names"]) if name in index]
            missing = {n for n in sample["class_names"] if n is not None and n not in index}
            if missing:
                log.warning("image %s: classes %s are not in the class list; those regions are not scored", sample["image_id"], sorted(missing))
            return rows, self._class_embeddings(), [[index[sample["class_names"][r]]] for r in rows]
        candidates = sorted({e for expressions in sample["expressions"] for e in expressions})
        if not candidates:
            return [], None, []
        position = {e: i for i, e in enumerate(candidates)}
        rows = [r for r, expressions in enumerate(sample["expressions"]) if expressions]
        with torch.no_grad():
            text = self.backbone.encode_text(candidates)
        return rows, text, [[position[e] for e in sample["expressions"][r]] for r in rows]

    def describe_regions(self, samples: list[dict], classes: list[str] | None = None) -> list[dict]:
        """The user's regions (``samples``: ``{"image_id", "image", "path", "region_ids", "masks"}``) -> per image
        ``{"image_id", "path", "method", "regions": [{"region_id", "box", "area"[, "label", "score"]}],
        "embeddings": (R, P), "maps": (R, H, W) | None}``: the embeddings of the first of ``methods``
        (MaskInversion's LETs by default) and the LeGrad maps of its last iteration; with ``classes`` each region's
        best-matching class by cosine with ``template`` (``score``: that cosine)."""
        from grounding.data.user_masks import mask_box

        method = self.methods[0]
        text = None
        if classes:
            with torch.no_grad():
                text = torch.nn.functional.normalize(self.backbone.encode_text([self.hparams.template.format(c) for c in classes]).float(), dim=-1)
        records = []
        for sample in samples:
            masks = sample["masks"]
            embeddings, inversion = self.embed_regions(sample["image"], masks, want_maps=method == "maskinversion")
            values = embeddings[method].detach().float().cpu()
            regions = [{"region_id": str(region), "box": mask_box(mask), "area": int(mask.sum())}
                       for region, mask in zip(sample["region_ids"], masks)]
            if text is not None:
                cosine = torch.nn.functional.normalize(values, dim=-1) @ text.cpu().T
                best = cosine.max(-1)
                for region, index, value in zip(regions, best.indices.tolist(), best.values.tolist()):
                    region.update(label=classes[index], score=float(value))
            maps = inversion.maps.detach().float().cpu() if inversion is not None and inversion.maps is not None else None
            records.append({"image_id": str(sample["image_id"]), "path": sample.get("path"), "method": method,
                            "regions": regions, "embeddings": values, "maps": maps})
        return records

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        """A ``RegionDataModule`` batch: as ``test_step`` without scoring (embeddings written at the epoch's end).
        The user's images with their regions (``ImageFolderDataModule`` with masks or boxes): ``describe_regions``
        with the DataModule's classes."""
        if batch and "class_names" not in batch[0]:
            return self.describe_regions(batch, self.class_names or None)
        return self.process(batch, score=False)

    def process(self, batch: list[dict], score: bool) -> list[dict]:
        results = []
        for sample in batch:
            masks = sample["masks"]
            if masks.shape[0] == 0:
                continue
            want_maps = self.picture_logger() is not None and "maskinversion" in self.methods
            embeddings, inversion = self.embed_regions(sample["image"], masks, want_maps)
            rows, candidates, targets = self._targets(sample)
            if rows and score:
                row_index = torch.tensor(rows, dtype=torch.long)
                for method, values in embeddings.items():
                    correct = top1_correct(values[row_index.to(values.device)], candidates, targets)
                    self.metrics[method].update(correct.to(self.device))
            if want_maps and inversion is not None and inversion.maps is not None:
                self._log_maps(sample, inversion)
            results.append({
                "image_id": sample["image_id"], "region_ids": list(sample["region_ids"]),
                "embeddings": {m: v.detach().float().cpu() for m, v in embeddings.items()},
            })
        self._outputs.extend(results)
        return results

    # ------------------------------------------------------------------------------------- loops
    def reset_epoch(self) -> None:
        super().reset_epoch()
        self._outputs = []

    def test_step(self, batch: list[dict], batch_idx: int) -> None:
        self.process(batch, score=True)  # the embeddings are written at the epoch's end, not returned

    def on_test_epoch_end(self) -> None:
        for method, metric in self.metrics.items():
            value = metric.compute()
            self.log(f"test/acc1_{method}", value, rank_zero_only=True)
            log.info("Acc@1 %s: %.4f over %d regions", method, float(value), metric.last_count)
            if method == self.methods[0]:
                self.log("test/regions", float(metric.last_count), rank_zero_only=True)
            metric.reset()
        self._write_predictions("test")

    def on_predict_epoch_end(self) -> None:
        if not isinstance(self.trainer.datamodule, PredictionDataModule):  # grounding-predict's writer has the user's
            self._write_predictions("predict")

    def _write_predictions(self, stage: str) -> None:
        outputs = self.gather(self._outputs)  # a collective call under DDP: every rank makes it
        log_dir = self.trainer.log_dir  # likewise
        if not self.hparams.save_predictions or not self.trainer.is_global_zero or not log_dir:
            return
        keys, image_ids, region_ids, rows = [], [], [], {m: [] for m in self.methods}
        for output in outputs:
            for index, region in enumerate(output["region_ids"]):
                keys.append(f"{output['image_id']}/{region}")
                image_ids.append(output["image_id"])
                region_ids.append(region)
                for method in self.methods:
                    rows[method].append(output["embeddings"][method][index])
        stacked = {m: torch.stack(v) if v else torch.zeros(0, self.backbone.embed_dim) for m, v in rows.items()}
        datamodule = getattr(self.trainer, "datamodule", None)
        split = getattr(getattr(datamodule, "hparams", None), "split", stage) if datamodule is not None else stage
        payload = {
            "keys": keys, "image_ids": image_ids, "region_ids": region_ids,
            "embeddings": stacked.get("maskinversion"),
            "baselines": {m: v for m, v in stacked.items() if m != "maskinversion"},
            "settings": plain_settings(dict(self.hparams)),
        }
        path = Path(log_dir) / "predictions" / f"maskinversion_{split}.pt"
        write_atomic(path, lambda temporary: torch.save(payload, temporary))
        log.info("wrote %d region embeddings to %s", len(keys), path)

    # ------------------------------------------------------------------------------------- logging
    def _log_maps(self, sample: dict, inversion) -> None:
        """image | mask | LeGrad map before | after the inversion, maps over the image, at a readable size."""
        experiment = self.picture_logger()
        if experiment is None:
            return
        image, _ = upscale(sample["image"].cpu())
        for r in range(min(sample["masks"].shape[0], self.hparams.log_regions - self._logged)):
            mask = sample["masks"][r].float().cpu()
            panels = [image, overlay_heatmap(image, mask), overlay_heatmap(image, inversion.initial_maps[r].float().cpu()),
                      overlay_heatmap(image, inversion.maps[r].float().cpu())]
            name = sample["class_names"][r] or (sample["expressions"][r][0] if sample["expressions"][r] else "")
            titles = ["image", f"mask: {name}"[:40], "LeGrad before", "LeGrad after"]
            tag = f"maskinversion/{sample['image_id']}_{sample['region_ids'][r]}"
            experiment.add_image(tag, panel_row(panels, titles), self._logged)
            self._logged += 1
