"""InvSeg's whole per-image computation on a Stable Diffusion wrapper, usable without Lightning (docs/invseg.md).

``InvSeg(diffusion, ...)(image, class_names, generator)`` segments one image into the given classes:

1. the class names are joined into one prompt, encoded once by the frozen text encoder; the output vectors at
   the classes' token positions are the only trainable values;
2. ``inversion.steps`` Adam steps: ``inversion.views`` random resized crops of the image, a timestep
   t ~ U[t_min, t_max], one UNet pass on the noised crop latents that records attention at ``resolution`` only;
   the loss is Contrastive Soft Clustering + α · entropy of the views' maps pasted back into the image frame
   (``grounding.models.invseg``);
3. the class maps at t = ``inversion.t_inference`` with the adapted embeddings, upsampled to the image's own
   size and arg-maxed, are the prediction.

``method="diffsegmenter"`` is the baseline on the same capture: no optimization, the maps of several resolutions
weighted (``baseline.weights``) at t = ``baseline.t``. Every random draw (crops, timesteps, noise) comes from the
``generator`` the caller passes, so an image's result depends only on that generator's seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

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
from grounding.models.stable_diffusion import StableDiffusion, category_prompt

Method = Literal["invseg", "diffsegmenter"]


@dataclass
class InversionSettings:
    """The test-time adaptation of the class tokens (docs/invseg.md).

    Attributes:
        steps: Adam steps per image (0: the maps of the unadapted prompt).
        lr: Adam's learning rate.
        views: random resized crops per step (the batch of one UNet pass).
        min_scale: smallest crop, as a fraction of the image area, in (0, 1].
        t_min: smallest timestep drawn during the adaptation.
        t_max: largest timestep drawn during the adaptation.
        t_inference: the timestep of the prediction's maps.
        alpha: weight of the entropy term.
        sharpness: s of the soft anchors sigmoid(s · (M − 0.5)).
        distance_grad: let gradients flow through the symmetric-KL distance of the self-attention (off by
            default **[choice]**: the distance is the image's structure the maps are pulled towards).
    """

    steps: NonNegativeInt = 15
    lr: PositiveFloat = 0.01
    views: PositiveInt = 2
    min_scale: PositiveFloat = 0.6
    t_min: NonNegativeInt = 5
    t_max: NonNegativeInt = 300
    t_inference: NonNegativeInt = 50
    alpha: float = 1.0
    sharpness: float = 4.0
    distance_grad: bool = False


@dataclass
class BaselineSettings:
    """DiffSegmenter, the training-free baseline on the same attention capture.

    Attributes:
        t: the timestep of the capture.
        weights: weight of each attention grid side (None: 0.3 / 0.5 / 0.1 / 0.1 for 8 / 16 / 32 / 64); grids the
            model lacks are left out.
    """

    t: NonNegativeInt = 100
    weights: dict[int, float] | None = None


@dataclass
class InvSegResult:
    """One image's segmentation.

    Attributes:
        index: (H, W) int64 index into the class names, at the image's own size.
        before: (C, r, r) class maps of the unadapted prompt (DiffSegmenter: its weighted maps).
        after: (C, r, r) class maps after the adaptation (DiffSegmenter: the same as ``before``).
        losses: the loss of every adaptation step.
    """

    index: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor
    losses: list[float] = field(default_factory=list)


class InvSeg:
    """InvSeg (or DiffSegmenter) on a frozen ``StableDiffusion`` wrapper (``build_stable_diffusion``).

    Args:
        diffusion: the frozen model.
        method: ``invseg`` or ``diffsegmenter``.
        image_size: the image is resized to image_size × image_size for the model (512 for SD 2.1-base); the
            prediction is upsampled back to the image's own size.
        resolution: side of the attention grid InvSeg captures (16: the 16 × 16 layers of a 512-px input).
        inversion: the adaptation's settings (``InversionSettings``).
        baseline: DiffSegmenter's settings (``BaselineSettings``).

    Raises ValueError, naming the setting, for a timestep outside the model's schedule, an image size that is not
    a multiple of the model's downsampling, or a resolution that is not one of its attention grids.
    """

    def __init__(self, diffusion: StableDiffusion, method: Method = "invseg", image_size: int = 512,
                 resolution: int = 16, inversion: InversionSettings | None = None,
                 baseline: BaselineSettings | None = None) -> None:
        self.diffusion = diffusion
        self.method = method
        self.image_size = int(image_size)
        self.resolution = int(resolution)
        self.inversion = inversion if inversion is not None else InversionSettings()
        self.baseline = baseline if baseline is not None else BaselineSettings()
        if method not in ("invseg", "diffsegmenter"):
            raise ValueError(f"method must be 'invseg' or 'diffsegmenter', got {method!r}")
        s = self.inversion
        if not 0 < s.min_scale <= 1:
            raise ValueError(f"inversion.min_scale must be in (0, 1], got {s.min_scale!r}")
        if not 0 <= s.t_min <= s.t_max:
            raise ValueError(f"inversion.t_min ({s.t_min}) and inversion.t_max ({s.t_max}) must satisfy 0 <= t_min <= t_max")
        count = diffusion.scheduler.config.num_train_timesteps
        for name, value in (("inversion.t_max", s.t_max), ("inversion.t_inference", s.t_inference),
                            ("baseline.t", self.baseline.t)):
            if not 0 <= value < count:
                raise ValueError(f"{name} must be a timestep in [0, {count - 1}], got {value}")
        multiple = diffusion.image_multiple
        if self.image_size < 1 or self.image_size % multiple:
            raise ValueError(
                f"image_size {image_size} must be a multiple of {multiple} for this model"
                f" (VAE factor x UNet downsampling), e.g. {max(multiple, round(image_size / multiple) * multiple)}"
            )
        latent = self.image_size // diffusion.vae_factor
        self.grids = sorted({latent >> level for level in range(len(diffusion.unet.down_blocks))})
        if self.resolution not in self.grids:
            raise ValueError(f"resolution {resolution} is not an attention grid of this model at image_size "
                             f"{image_size}; available: {self.grids}")
        weights = {int(k): float(v) for k, v in (self.baseline.weights or DIFFSEGMENTER_WEIGHTS).items()}
        self.baseline_weights = {r: w for r, w in weights.items() if r in self.grids}
        if method == "diffsegmenter" and not self.baseline_weights:
            raise ValueError(f"baseline.weights names no attention grid of this model ({self.grids}): {weights}")

    # ------------------------------------------------------------------------------------- pieces
    def _noise(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=generator).to(self.diffusion.device, self.diffusion.dtype)

    def maps(self, latents: torch.Tensor, t: int, embeddings: torch.Tensor, positions: list[list[int]],
             generator: torch.Generator) -> torch.Tensor:
        """(B, C, r, r) class maps of ``latents`` (B, 4, h, w) noised at t, at ``resolution``."""
        r = self.resolution
        noisy = self.diffusion.noised(latents, t, self._noise(latents.shape, generator))
        maps = self.diffusion.attention_maps(noisy, t, embeddings, (r,))[r]
        return category_maps(maps.self_attention, maps.cross_attention, positions).reshape(latents.shape[0], -1, r, r)

    def step_loss(self, image: torch.Tensor, embeddings: torch.Tensor, positions: list[list[int]],
                  generator: torch.Generator) -> InvSegLoss:
        """The loss of one adaptation step: ``views`` random resized crops of ``image`` (3, S, S) in [0, 1], one
        timestep, one UNet pass conditioned on ``embeddings`` (1, K, D); draws from ``generator``."""
        s = self.inversion
        f = self.diffusion.vae_factor
        frame = (image.shape[-2] // f, image.shape[-1] // f)  # the views' boxes live in the latent frame
        boxes = random_resized_crop_boxes(frame[0], frame[1], s.views, s.min_scale, generator=generator)
        views = crop_and_resize(image, boxes * f, image.shape[-2:]).clamp(0, 1)
        latents = self.diffusion.encode_image(views)
        t = int(torch.randint(s.t_min, s.t_max + 1, (1,), generator=generator))
        noisy = self.diffusion.noised(latents, t, self._noise(latents.shape, generator))
        r = self.resolution
        maps = self.diffusion.attention_maps(noisy, t, embeddings, (r,))[r]
        view_maps = category_maps(maps.self_attention, maps.cross_attention, positions).reshape(s.views, -1, r, r)
        distances = symmetric_kl_distance(maps.self_attention if s.distance_grad else maps.self_attention.detach())
        return invseg_loss(view_maps, distances, boxes, frame, s.alpha, s.sharpness)

    def invert(self, image: torch.Tensor, embeddings: torch.Tensor, positions: list[list[int]],
               generator: torch.Generator) -> tuple[torch.Tensor, list[float]]:
        """Adapt the class tokens of ``embeddings`` (1, K, D) to ``image`` (3, S, S) in [0, 1]: ``steps`` Adam steps
        on ``step_loss``. Returns the adapted (1, K, D) embeddings and the loss of every step."""
        with torch.inference_mode(False), torch.enable_grad():  # callers may run under inference mode
            rows = torch.tensor(sorted({p for group in positions for p in group}), device=embeddings.device)
            base, image = embeddings.clone(), image.clone()
            tokens = torch.nn.Parameter(base[0, rows].float().clone())  # (T, D) the only trainable values
            optimizer = torch.optim.Adam([tokens], lr=self.inversion.lr)
            losses = []
            for _ in range(self.inversion.steps):
                current = base.index_put((torch.zeros_like(rows), rows), tokens.to(base.dtype))
                loss = self.step_loss(image, current, positions, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.total.backward()
                optimizer.step()
                losses.append(float(loss.total.detach()))
            adapted = base.index_put((torch.zeros_like(rows), rows), tokens.detach().to(base.dtype))
        return adapted, losses

    # ------------------------------------------------------------------------------------- one image
    def __call__(self, image: torch.Tensor, class_names: Sequence[str],
                 generator: torch.Generator | int = 0) -> InvSegResult:
        """Segment ``image`` (3, H, W) uint8 into ``class_names`` (the first one is the background class when the
        data has one). ``generator``: a CPU generator or a seed for one. Returns ``InvSegResult``."""
        if isinstance(class_names, str) or not class_names:
            raise ValueError(f"class_names must be a non-empty list of names, got {class_names!r}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
        if not isinstance(generator, torch.Generator):
            generator = torch.Generator().manual_seed(int(generator))
        names = list(class_names)
        height, width = image.shape[-2:]
        positions = self.diffusion.category_token_positions(names)
        embeddings, _ = self.diffusion.encode_prompt([category_prompt(names)])
        image = image.to(self.diffusion.device)
        pixels = F.interpolate(image[None].float() / 255, size=(self.image_size, self.image_size), mode="bilinear",
                               antialias=True, align_corners=False).clamp(0, 1)
        latents = self.diffusion.encode_image(pixels)
        losses: list[float] = []
        if self.method == "diffsegmenter":
            t = self.baseline.t
            noisy = self.diffusion.noised(latents, t, self._noise(latents.shape, generator))
            per_res = self.diffusion.attention_maps(noisy, t, embeddings, sorted(self.baseline_weights))
            before = after = weighted_resolution_maps(per_res, positions, max(self.baseline_weights), self.baseline_weights)[0]
        else:
            t = self.inversion.t_inference
            noise_seed = int(torch.randint(2**62, (1,), generator=generator))  # the same noise before and after
            before = self.maps(latents, t, embeddings, positions, torch.Generator().manual_seed(noise_seed))[0]
            adapted, losses = self.invert(pixels[0], embeddings, positions, generator)
            after = self.maps(latents, t, adapted, positions, torch.Generator().manual_seed(noise_seed))[0]
        index = predict_labels(after, (height, width))
        return InvSegResult(index=index, before=before.detach(), after=after.detach(), losses=losses)
