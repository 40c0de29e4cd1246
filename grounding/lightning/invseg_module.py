"""InvSeg: test-time inversion of Stable Diffusion prompt embeddings for semantic segmentation (docs/invseg.md).

For every test image (``test_step`` / ``predict_step``; no training):

1. the image's categories (the dataset's list, the ground truth's "oracle" set, or a list of names; the
   dataset's background class always among them) are joined into one prompt, encoded once by the frozen
   text encoder; the output vectors at the categories' token positions are the only trainable values;
2. ``steps`` Adam steps: two random resized crops of the image (a batch of ``views``), a timestep
   t ~ U[t_min, t_max], one UNet pass on the noised crop latents that records attention at
   ``resolution`` only; the loss is Contrastive Soft Clustering + α · entropy of the views' maps pasted
   back into the image frame (``grounding.models.invseg``);
3. the category maps at t = ``t_inference`` with the adapted embeddings, upsampled to the image's own
   size and arg-maxed, are the prediction.

``method: diffsegmenter`` is the baseline on the same capture: no optimization, the maps of several
resolutions weighted (0.3 / 0.5 / 0.1 / 0.1 for 8 / 16 / 32 / 64) at t = ``baseline_t``.

Scores: mIoU, mAcc, pixel accuracy from an exact confusion matrix that counts every image once across
processes (``grounding.metrics.segmentation``); a per-class IoU table in the log, in TensorBoard and in
``<run>/predictions/invseg_<split>_iou.md``. ``test_step`` returns the predicted label maps so that
``grounding.lightning.label_writer.LabelMapWriter`` writes them as palette PNGs. Every random draw of an
image (crops, timesteps, noise) comes from a generator seeded by (``seed``, image id), so the result of
an image does not depend on the process it ran on or on the images before it.
"""

from __future__ import annotations

import logging
import zlib
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F

from grounding.lightning.segmentation_report import report_segmentation
from grounding.metrics.segmentation import SegmentationMetric
from grounding.models.category_filter import CaptionClipFilter
from grounding.models.invseg import (
    DIFFSEGMENTER_WEIGHTS,
    InvSegLoss,
    category_maps,
    crop_and_resize,
    invseg_loss,
    predict_labels,
    random_resized_crop_boxes,
    symmetric_kl_distance,
    weighted_resolution_maps,
)
from grounding.models.stable_diffusion import StableDiffusion, build_stable_diffusion, category_prompt
from grounding.visualize import overlay_heatmap, panel_row, segmentation_panels

log = logging.getLogger(__name__)

METHODS = ("invseg", "diffsegmenter")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class InvSegModule(L.LightningModule):
    """InvSeg (and the DiffSegmenter baseline) as a test-time LightningModule over ``SegmentationDataModule``.

    Args:
        model: ``"tiny"`` (random, offline; for tests and the synthetic demo) or a Stable Diffusion 2.x hub id
            / local folder in diffusers' layout (``stabilityai/stable-diffusion-2-1-base``).
        model_dtype: weights of the frozen model: float32, bfloat16 or float16 (the attention probabilities
            and the losses are computed in float32 either way).
        method: ``invseg`` or ``diffsegmenter``.
        categories: ``all`` (the dataset's classes), ``oracle`` (the classes present in the image's ground
            truth, the paper's ablation), ``filter`` (those ``category_filter`` finds in the image, the
            paper's setting), or a list of class names of the dataset. The dataset's background
            class (when it has one) is always added; a dataset without one (ADE20K, Context-59) assigns every
            pixel to a class.
        image_size: the image is resized to image_size × image_size for the model (512 for SD 2.1-base); the
            prediction is upsampled back to the image's own size.
        resolution: side of the attention grid InvSeg captures (16: the 16 × 16 layers of a 512-px input).
        steps, lr, views, min_scale: the adaptation: Adam steps, learning rate, crops per step, smallest crop
            area fraction.
        t_min, t_max, t_inference: timesteps drawn uniformly in [t_min, t_max] during adaptation; the one used
            for the prediction.
        alpha, sharpness: weight of the entropy term; s of the soft anchors.
        distance_grad: let gradients flow through the symmetric-KL distance of the self-attention (off by
            default [choice]: the distance is the image's structure the maps are pulled towards).
        baseline_t, baseline_weights: DiffSegmenter's timestep and resolution weights (resolutions the model
            lacks are left out and the rest renormalized).
        log_images: TensorBoard panels (image | ground truth | prediction | maps before | after) of this many
            images per run (rank 0).
        seed: with the image id, seeds every random draw of that image.
        category_filter: for ``categories: filter``: a callable (image (3, H, W) uint8, names) -> indices of
            the names present, e.g. ``grounding.models.category_filter.CaptionClipFilter`` (BLIP + CLIP).
    """

    def __init__(
        self,
        model: str = "tiny",
        model_dtype: str = "float32",
        method: str = "invseg",
        categories: str | list[str] = "all",
        image_size: int = 512,
        resolution: int = 16,
        steps: int = 15,
        lr: float = 0.01,
        views: int = 2,
        min_scale: float = 0.6,
        t_min: int = 5,
        t_max: int = 300,
        t_inference: int = 50,
        alpha: float = 1.0,
        sharpness: float = 4.0,
        distance_grad: bool = False,
        baseline_t: int = 100,
        baseline_weights: dict[int, float] | None = None,
        log_images: int = 4,
        seed: int = 0,
        category_filter: CaptionClipFilter | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["category_filter"])
        if method not in METHODS:
            raise ValueError(f"model.method must be one of {', '.join(METHODS)}, got {method!r}")
        if model_dtype not in DTYPES:
            raise ValueError(f"model.model_dtype must be one of {', '.join(DTYPES)}, got {model_dtype!r}")
        if isinstance(categories, str) and categories not in ("all", "oracle", "filter"):
            raise ValueError(f"model.categories must be 'all', 'oracle', 'filter' or a list of class names, got {categories!r}")
        if categories == "filter" and category_filter is None:
            raise ValueError("model.categories 'filter' needs model.category_filter (e.g. class_path "
                             "grounding.models.category_filter.CaptionClipFilter)")
        self.category_filter = category_filter
        if not isinstance(categories, str) and not categories:
            raise ValueError("model.categories is an empty list; give class names of the dataset, 'all' or 'oracle'")
        for name in ("steps", "views", "image_size", "resolution"):
            value = locals()[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
                raise ValueError(f"model.{name} must be an integer >= {0 if name == 'steps' else 1}, got {value!r}")
        if not (lr > 0):
            raise ValueError(f"model.lr must be > 0, got {lr!r}")
        if not 0 < min_scale <= 1:
            raise ValueError(f"model.min_scale must be in (0, 1], got {min_scale!r}")
        if not 0 <= t_min <= t_max:
            raise ValueError(f"model.t_min ({t_min}) and model.t_max ({t_max}) must satisfy 0 <= t_min <= t_max")
        self.diffusion: StableDiffusion = build_stable_diffusion(model, dtype=DTYPES[model_dtype])
        count = self.diffusion.scheduler.config.num_train_timesteps
        for name, value in (("t_max", t_max), ("t_inference", t_inference), ("baseline_t", baseline_t)):
            if not 0 <= value < count:
                raise ValueError(f"model.{name} must be a timestep in [0, {count - 1}], got {value}")
        multiple = self.diffusion.image_multiple
        if image_size % multiple:
            raise ValueError(
                f"model.image_size {image_size} must be a multiple of {multiple} for this model"
                f" (VAE factor x UNet downsampling), e.g. {max(multiple, round(image_size / multiple) * multiple)}"
            )
        latent = image_size // self.diffusion.vae_factor
        self.grids = sorted({latent >> level for level in range(len(self.diffusion.unet.down_blocks))})
        if resolution not in self.grids:
            raise ValueError(f"model.resolution {resolution} is not an attention grid of this model at image_size "
                             f"{image_size}; available: {self.grids}")
        weights = {int(k): float(v) for k, v in (baseline_weights or DIFFSEGMENTER_WEIGHTS).items()}
        self.baseline_weights = {r: w for r, w in weights.items() if r in self.grids}
        if method == "diffsegmenter" and not self.baseline_weights:
            raise ValueError(f"model.baseline_weights names no attention grid of this model ({self.grids}): {weights}")
        self.class_names: list[str] = []
        self.background: int | None = None
        self.metric: SegmentationMetric | None = None
        self._logged = 0

    # ------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.set_classes(datamodule.class_names, datamodule.background_index, datamodule.ignore_index)

    def set_classes(self, class_names: Sequence[str], background_index: int | None = 0, ignore_index: int = 255) -> None:
        """The dataset's classes (index = label value) and its background class (or None)."""
        self.class_names = list(class_names)
        self.background = background_index
        requested = self.hparams.categories
        if not isinstance(requested, str):
            unknown = [name for name in requested if name not in self.class_names]
            if unknown:
                raise ValueError(f"model.categories names {unknown} that are not classes of the dataset: {self.class_names}")
        self.metric = SegmentationMetric(len(self.class_names), ignore_index).to(self.device)

    def categories_of(self, sample: dict) -> list[int]:
        """Label values of the categories in this image's prompt (background first when the dataset has one)."""
        requested = self.hparams.categories
        if requested == "all":
            values = list(range(len(self.class_names)))
        elif requested == "oracle":
            values = list(sample["present"])
        elif requested == "filter":
            candidates = [v for v in range(len(self.class_names)) if v != self.background]
            kept = self.category_filter(sample["image"], [self.class_names[v] for v in candidates])
            values = [candidates[i] for i in kept]
        else:
            values = [self.class_names.index(name) for name in requested]
        if self.background is not None:
            values = [self.background] + [v for v in values if v != self.background]
        if not values:
            raise ValueError(f"image {sample['image_id']}: no category to segment (model.categories={requested!r})")
        return values

    # ------------------------------------------------------------------------------------- the method
    def _generator(self, image_id: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + zlib.crc32(str(image_id).encode()))

    def _noise(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=generator).to(self.diffusion.device, self.diffusion.dtype)

    def _maps(self, latents: torch.Tensor, t: int, embeddings: torch.Tensor, positions: list[list[int]],
              generator: torch.Generator) -> torch.Tensor:
        """(B, C, r, r) category maps of ``latents`` (B, 4, h, w) noised at t, at ``resolution``."""
        r = self.hparams.resolution
        noisy = self.diffusion.noised(latents, t, self._noise(latents.shape, generator))
        maps = self.diffusion.attention_maps(noisy, t, embeddings, (r,))[r]
        return category_maps(maps.self_attention, maps.cross_attention, positions).reshape(latents.shape[0], -1, r, r)

    def step_loss(self, image: torch.Tensor, embeddings: torch.Tensor, positions: list[list[int]],
                  generator: torch.Generator) -> InvSegLoss:
        """The InvSeg loss of one adaptation step: ``views`` random resized crops of ``image`` (3, S, S) in
        [0, 1], one timestep, one UNet pass conditioned on ``embeddings`` (1, K, D); draws from ``generator``."""
        h = self.hparams
        f = self.diffusion.vae_factor
        frame = (image.shape[-2] // f, image.shape[-1] // f)  # the views' boxes live in the latent frame
        boxes = random_resized_crop_boxes(frame[0], frame[1], h.views, h.min_scale, generator=generator)
        views = crop_and_resize(image, boxes * f, image.shape[-2:]).clamp(0, 1)
        latents = self.diffusion.encode_image(views)
        t = int(torch.randint(h.t_min, h.t_max + 1, (1,), generator=generator))
        noisy = self.diffusion.noised(latents, t, self._noise(latents.shape, generator))
        r = h.resolution
        maps = self.diffusion.attention_maps(noisy, t, embeddings, (r,))[r]
        view_maps = category_maps(maps.self_attention, maps.cross_attention, positions).reshape(h.views, -1, r, r)
        distances = symmetric_kl_distance(maps.self_attention if h.distance_grad else maps.self_attention.detach())
        return invseg_loss(view_maps, distances, boxes, frame, h.alpha, h.sharpness)

    def invert(self, image: torch.Tensor, embeddings: torch.Tensor, positions: list[list[int]],
               generator: torch.Generator) -> tuple[torch.Tensor, list[float]]:
        """Adapt the category tokens of ``embeddings`` (1, K, D) to ``image`` (3, S, S) in [0, 1]: ``steps``
        Adam steps on ``step_loss``. Returns the adapted (1, K, D) embeddings and the loss of every step."""
        with torch.inference_mode(False), torch.enable_grad():  # Lightning tests under inference mode
            rows = torch.tensor(sorted({p for group in positions for p in group}), device=embeddings.device)
            base, image = embeddings.clone(), image.clone()
            tokens = torch.nn.Parameter(base[0, rows].float().clone())  # (T, D) the only trainable values
            optimizer = torch.optim.Adam([tokens], lr=self.hparams.lr)
            losses = []
            for _ in range(self.hparams.steps):
                current = base.index_put((torch.zeros_like(rows), rows), tokens.to(base.dtype))
                loss = self.step_loss(image, current, positions, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.total.backward()
                optimizer.step()
                losses.append(float(loss.total.detach()))
            adapted = base.index_put((torch.zeros_like(rows), rows), tokens.detach().to(base.dtype))
        return adapted, losses

    def segment(self, sample: dict) -> dict:
        """Label map (H, W) of one sample (its own size), with the maps before / after for pictures."""
        h = self.hparams
        image = sample["image"].to(self.device)
        height, width = image.shape[-2:]
        values = self.categories_of(sample)
        names = [self.class_names[v] for v in values]
        try:
            positions = self.diffusion.category_token_positions(names)
        except ValueError as error:
            raise ValueError(f"image {sample['image_id']}: {error} (model.categories={h.categories!r})") from None
        embeddings, _ = self.diffusion.encode_prompt([category_prompt(names)])
        pixels = F.interpolate(image[None].float() / 255, size=(h.image_size, h.image_size), mode="bilinear",
                               antialias=True, align_corners=False).clamp(0, 1)
        latents = self.diffusion.encode_image(pixels)
        generator = self._generator(sample["image_id"])
        losses: list[float] = []
        if h.method == "diffsegmenter":
            noisy = self.diffusion.noised(latents, h.baseline_t, self._noise(latents.shape, generator))
            per_res = self.diffusion.attention_maps(noisy, h.baseline_t, embeddings, sorted(self.baseline_weights))
            before = after = weighted_resolution_maps(per_res, positions, max(self.baseline_weights), self.baseline_weights)[0]
        else:
            noise_seed = int(torch.randint(2**62, (1,), generator=generator))  # the same noise before and after
            before = self._maps(latents, h.t_inference, embeddings, positions, torch.Generator().manual_seed(noise_seed))[0]
            adapted, losses = self.invert(pixels[0], embeddings, positions, generator)
            after = self._maps(latents, h.t_inference, adapted, positions, torch.Generator().manual_seed(noise_seed))[0]
        index = predict_labels(after, (height, width))
        labels = torch.tensor(values, device=index.device)[index]
        return {"labels": labels, "names": names, "before": before.detach(), "after": after.detach(), "losses": losses}

    # ------------------------------------------------------------------------------------- loops
    def on_test_epoch_start(self) -> None:
        self._logged = 0
        if self.metric is not None:
            self.metric.reset()

    on_predict_epoch_start = on_test_epoch_start

    def _process(self, batch: list[dict], score: bool) -> dict:
        ids, label_maps = [], []
        for sample in batch:
            result = self.segment(sample)
            if score:
                if self.metric is None:
                    raise RuntimeError("InvSegModule needs the dataset's classes: run it with a SegmentationDataModule or call set_classes")
                self.metric.update(result["labels"], sample["labels"].to(result["labels"].device), [sample["image_id"]])
            if result["losses"]:
                self.log("test/loss_first", result["losses"][0], batch_size=1)
                self.log("test/loss_last", result["losses"][-1], batch_size=1)
            self._log_panels(sample, result)
            ids.append(sample["image_id"])
            label_maps.append(result["labels"].cpu())
        return {"image_ids": ids, "label_maps": label_maps}

    def test_step(self, batch: list[dict], batch_idx: int) -> dict:
        return self._process(batch, score=True)

    def predict_step(self, batch: list[dict], batch_idx: int) -> dict:
        return self._process(batch, score=False)

    def on_test_epoch_end(self) -> None:
        report_segmentation(self, self.metric, self.class_names, "invseg", self.hparams.method)

    # ------------------------------------------------------------------------------------- pictures
    def _log_panels(self, sample: dict, result: dict) -> None:
        """image | ground truth | prediction, then each category's map before and after the inversion."""
        if self._logged >= self.hparams.log_images or self._trainer is None or not self.trainer.is_global_zero:
            return
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        panels = segmentation_panels(sample["image"].cpu(), sample["labels"], result["labels"])
        image, titles = panels[0], ["image", "ground truth", "prediction"]
        for c, name in enumerate(result["names"]):
            panels += [overlay_heatmap(image, result["before"][c]), overlay_heatmap(image, result["after"][c])]
            titles += [f"{name}: before"[:30], f"{name}: after"[:30]]
        experiment.add_image(f"invseg/{sample['image_id']}", panel_row(panels, titles), self._logged)
        self._logged += 1
