"""A frozen Stable Diffusion (diffusers) that records attention probabilities only where asked (docs/invseg.md).

    from grounding.models.stable_diffusion import build_stable_diffusion, category_prompt

    sd = build_stable_diffusion("stabilityai/stable-diffusion-2-1-base", device="cuda")
    names = ["background", "cat", "dining table"]
    embeddings, _ = sd.encode_prompt([category_prompt(names)])      # (1, 77, D), no grad
    positions = sd.category_token_positions(names)                    # [[1], [3], [5, 6]] say
    latents = sd.encode_image(images)                                 # (B, 3, 512, 512) in [0, 1] -> (B, 4, 64, 64)
    noisy = sd.noised(latents, 50)
    maps = sd.attention_maps(noisy, 50, embeddings.requires_grad_())  # {16: AttentionMaps(self, cross)}
    maps[16].self_attention    # (B, 256, 256)
    maps[16].cross_attention   # (B, 256, 77): differentiable w.r.t. the embeddings

InvSeg optimises the text-encoder OUTPUT vectors and needs, for one UNet pass on a noised image latent,
S = softmax(QKᵀ/√d) of the attention layers at one latent resolution (16×16 for 512 px), averaged over heads
and layers: A_self (HW × HW) and A_cross (HW × 77). ``capture_attention`` replaces the diffusers
``AttnProcessor2_0`` (fused SDPA, which never forms S) by ``CapturingAttnProcessor`` in exactly the layers of
the requested resolutions, for the duration of the pass; every other layer keeps the fused kernel, so speed
and memory stay those of a plain pass. The capturing processor returns what the fused one returns (tested)
and keeps S in the autograd graph, so gradients flow from the maps to the embeddings.

Resolution of a layer: ``down_blocks[i]`` attends at latent/2^i, ``up_blocks[j]`` at latent/2^(n-1-j) (the
mirror), ``mid_block`` at the lowest, latent/2^(n-1), with n the number of down blocks (each block but the
last halves the size). A resolution is named by the height of the attention grid (its side for square
latents). ``build_stable_diffusion("tiny")`` builds a small random model offline for tests and demos.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import nn
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

#: the random test / demo UNet: three levels (×1, ×2, ×4 down), attention at the first two and the mid block,
#: laid out like SD 2.x (cross-attention blocks first on the way down, last on the way up, linear projections)
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 2,  # diffusers' UNet reads it as the number of heads (as SD 2.x's config does)
    "norm_num_groups": 8,
    "use_linear_projection": True,
}

#: the random test / demo VAE: 4 latent channels, three levels (downsampling ×4)
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (8, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}

#: the random test / demo text encoder; its width is the UNet's cross-attention dim
TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
}

#: Stable Diffusion's training noise schedule (the tiny model's; checkpoints bring their own)
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}

CATEGORY_SEPARATOR = ", "


class AttentionMaps(NamedTuple):
    """Head- and layer-averaged attention probabilities of one resolution (B batch, HW pixels, K tokens)."""

    self_attention: torch.Tensor   # (B, HW, HW), rows sum to 1
    cross_attention: torch.Tensor  # (B, HW, K), rows sum to 1


class CaptureComplete(Exception):
    """Raised by the last capturing layer of a pass when the rest of the UNet is not needed (``stop_early``)."""


class AttentionCapture:
    """Running sums of head-averaged attention probabilities per (resolution, self/cross), and layer counts.

    Each capturing layer adds its (B, HW, S) head mean; no per-layer or per-head copy is kept here (autograd
    still saves what the backward pass needs). expected_calls: the number of capturing layers; with
    ``stop_early`` the last of them raises ``CaptureComplete`` instead of returning.
    """

    def __init__(self, expected_calls: int, stop_early: bool = False) -> None:
        self.expected_calls = expected_calls
        self.stop_early = stop_early
        self.calls = 0
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.counts: dict[tuple[int, str], int] = {}

    def add(self, resolution: int, kind: str, probabilities: torch.Tensor) -> None:
        """probabilities: (B, HW, S) of one layer, averaged over its heads; kind "self" or "cross"."""
        key = (resolution, kind)
        self.sums[key] = probabilities if key not in self.sums else self.sums[key] + probabilities
        self.counts[key] = self.counts.get(key, 0) + 1
        self.calls += 1
        if self.stop_early and self.calls == self.expected_calls:
            raise CaptureComplete

    def maps(self) -> dict[int, AttentionMaps]:
        """Resolution -> layer means of the self- and cross-attention sums."""
        resolutions = sorted({resolution for resolution, _ in self.sums})
        out = {}
        for resolution in resolutions:
            means = {}
            for kind in ("self", "cross"):
                key = (resolution, kind)
                if key not in self.sums:
                    raise RuntimeError(f"no {kind}-attention layer was captured at resolution {resolution}")
                means[kind] = self.sums[key] / self.counts[key]
            out[resolution] = AttentionMaps(means["self"], means["cross"])
        return out


class CapturingAttnProcessor:
    """diffusers attention processor that computes S = softmax(QKᵀ·scale) explicitly and records its head mean.

    Mirrors ``AttnProcessor2_0`` step by step (spatial norm, 4-D input, attention mask, group norm, cross
    norm, q/k norms, output projection, residual, rescale factor) with the ``Attention`` module's own weights,
    so it returns what the fused processor returns. ``attn.scale`` is SDPA's default 1/√d for every SD UNet.
    The scores and softmax run in float32 (float64 for a float64 model) with autocast off, because bf16 maps
    would be too coarse to optimise; S then multiplies V in V's dtype, as the fused kernel would.
    resolution: the key the maps are stored under; grid: (h, w) the layer must see (checked every call).
    """

    def __init__(self, capture: AttentionCapture, resolution: int, grid: tuple[int, int], name: str) -> None:
        self.capture = capture
        self.resolution = resolution
        self.grid = grid
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, pixels, _ = hidden_states.shape
        if pixels != self.grid[0] * self.grid[1]:
            # the level arithmetic of attention_layer_grids does not hold for this UNet
            raise RuntimeError(
                f"attention layer {self.name} sees {pixels} positions, expected a {self.grid[0]}x{self.grid[1]} grid"
            )
        is_cross = encoder_hidden_states is not None
        sequence_length = (encoder_hidden_states if is_cross else hidden_states).shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, N, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)      # (B, h, S, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, S, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        work = torch.promote_types(query.dtype, torch.float32)
        with torch.autocast(device_type=query.device.type, enabled=False):
            scores = torch.matmul(query.to(work), key.to(work).transpose(-1, -2)) * attn.scale  # (B, h, N, S)
            if attention_mask is not None:
                scores = scores + attention_mask.to(work)
            probabilities = scores.softmax(dim=-1)
        self.capture.add(self.resolution, "cross" if is_cross else "self", probabilities.mean(dim=1))

        hidden_states = torch.matmul(probabilities.to(value.dtype), value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def unet_downsampling(unet: UNet2DConditionModel) -> int:
    """How many times the UNet halves its input: 2^(number of down blocks − 1)."""
    return 2 ** (len(unet.down_blocks) - 1)


def attention_layer_grids(unet: UNet2DConditionModel, latent_size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Processor name (a key of ``unet.attn_processors``) -> (h, w) grid it attends over for these latents.

    latent_size: (H, W) of the UNet input, a multiple of ``unet_downsampling(unet)``. down_blocks[i] is at
    level i, up_blocks[j] at level n−1−j, mid_block at level n−1 (n down blocks); level l is (H/2^l, W/2^l).
    """
    height, width = (int(size) for size in latent_size)
    factor = unet_downsampling(unet)
    if height % factor or width % factor:
        raise ValueError(f"latent size {height}x{width} is not a multiple of the UNet's downsampling {factor}")
    count = len(unet.down_blocks)
    grids = {}
    for name in unet.attn_processors:
        block, index = name.split(".")[:2]
        if block == "down_blocks":
            level = int(index)
        elif block == "up_blocks":
            level = len(unet.up_blocks) - 1 - int(index)
        elif block == "mid_block":
            level = count - 1
        else:
            raise ValueError(f"cannot tell the resolution of attention layer {name}")
        grids[name] = (height >> level, width >> level)
    return grids


@contextlib.contextmanager
def capture_attention(
    unet: UNet2DConditionModel,
    latent_size: tuple[int, int],
    resolutions: Sequence[int] | str = (16,),
    stop_early: bool = False,
) -> Iterator[AttentionCapture]:
    """Install ``CapturingAttnProcessor`` in the layers of ``resolutions`` only, yield the capture, restore.

    latent_size: (H, W) of the latents the UNet will get; resolutions: grid heights (16: the 16×16 layers of
    64×64 latents) or ``"all"`` (every attention layer: the naive baseline). The previous processors come
    back on exit, also when the pass raises. stop_early: the last capturing layer raises ``CaptureComplete``
    (the caller catches it) so the layers after it do not run.
    """
    grids = attention_layer_grids(unet, latent_size)
    available = sorted({grid[0] for grid in grids.values()})
    if resolutions == "all":
        wanted = set(available)
    elif isinstance(resolutions, str):
        raise ValueError(f"resolutions must be a list of grid sizes or 'all', got {resolutions!r}")
    else:
        wanted = {int(resolution) for resolution in resolutions}
        missing = sorted(wanted - set(available))
        if missing or not wanted:
            height, width = (int(size) for size in latent_size)
            raise ValueError(
                f"no attention layer at resolution(s) {missing or list(resolutions)} for {height}x{width} latents;"
                f" available: {available}"
            )
    previous = unet.attn_processors
    selected = [name for name, grid in grids.items() if grid[0] in wanted]
    capture = AttentionCapture(len(selected), stop_early)
    processors = dict(previous)
    for name in selected:
        processors[name] = CapturingAttnProcessor(capture, grids[name][0], grids[name], name)
    unet.set_attn_processor(processors)
    try:
        yield capture
    finally:
        unet.set_attn_processor(dict(previous))


def category_prompt(categories: Sequence[str]) -> str:
    """The prompt of a category list: the names joined by ", " ("background, cat, dining table").

    A plain list rather than a template sentence: every token but the separators belongs to a category.
    """
    return CATEGORY_SEPARATOR.join(categories)


class StableDiffusion(nn.Module):
    """A frozen Stable Diffusion: UNet, VAE, CLIP text encoder and tokenizer, DDPM noise schedule.

    Always in eval mode; nothing requires grad. The prompt embeddings (text-encoder outputs) are the
    differentiable input of ``attention_maps``.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDPMScheduler,
    ) -> None:
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.train(False)

    def train(self, mode: bool = True) -> "StableDiffusion":
        """Stays in eval mode: the model is frozen whatever the surrounding LightningModule does."""
        return super().train(False)

    # -- sizes ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def max_tokens(self) -> int:
        """K: the text encoder's context length (77)."""
        return int(self.tokenizer.model_max_length)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell: 2^(number of VAE blocks − 1) (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_multiple(self) -> int:
        """Image sides must be multiples of this: VAE factor × UNet downsampling (64 for SD 2.x)."""
        return self.vae_factor * unet_downsampling(self.unet)

    # -- text ----------------------------------------------------------------------------------------
    def _check_length(self, text: str, count: int) -> None:
        if count > self.max_tokens:
            raise ValueError(
                f"prompt {text!r} has {count} tokens with its start and end tokens;"
                f" the text encoder takes at most {self.max_tokens}"
            )

    @torch.no_grad()
    def encode_prompt(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, D) text-encoder outputs (last hidden state, as diffusers' SD pipeline) and (B, K) input ids.

        Padded to K = 77 with the tokenizer's pad token; a longer prompt is an error (never truncated).
        """
        texts = list(texts)
        for text in texts:
            self._check_length(text, len(self.tokenizer(text).input_ids))
        ids = self.tokenizer(
            texts, padding="max_length", max_length=self.max_tokens, truncation=False, return_tensors="pt"
        ).input_ids.to(self.text_encoder.device)
        embeddings = self.text_encoder(ids)[0]
        return embeddings.to(self.dtype), ids

    def category_token_positions(self, categories: Sequence[str]) -> list[list[int]]:
        """For each category, the positions of its tokens in the K-token sequence of ``category_prompt``.

        Position 0 is the start token; the ", " separators, the end token and the padding after it belong to
        no category (they are still K columns of the cross-attention). A multi-token name has several
        positions. Tokens are assigned by their character spans in the prompt (the tokenizer's offsets).
        Errors: an empty list, a name that gives no token, a prompt longer than K tokens.
        """
        categories = list(categories)
        if not categories:
            raise ValueError("categories is empty: the prompt needs at least one category name")
        prompt = category_prompt(categories)
        spans, start = [], 0
        for name in categories:
            spans.append((start, start + len(name)))
            start += len(name) + len(CATEGORY_SEPARATOR)
        encoding = self.tokenizer(prompt, return_offsets_mapping=True)
        self._check_length(prompt, len(encoding.input_ids))
        positions: list[list[int]] = [[] for _ in categories]
        for position, (begin, end) in enumerate(encoding.offset_mapping):
            if end <= begin:
                continue  # special tokens have an empty span
            for index, (first, last) in enumerate(spans):
                if begin < last and end > first:
                    positions[index].append(position)
        for name, found in zip(categories, positions):
            if not found:
                raise ValueError(f"category {name!r} gives no token; give it a non-empty name")
        return positions

    # -- images --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float images in [0, 1] -> (B, C, H/f, W/f) latents: the VAE posterior MEAN (no
        sampling, so a given image always has the same latent) × the VAE's scaling factor (0.18215 for SD).

        H and W must be multiples of ``image_multiple`` (VAE factor f × UNet downsampling).
        """
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        height, width = images.shape[-2:]
        multiple = self.image_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of {multiple}"
                f" (VAE factor {self.vae_factor} x UNet downsampling {unet_downsampling(self.unet)})"
            )
        low, high = images.min().item(), images.max().item()
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(f"images must be in [0, 1], got values in [{low:.3g}, {high:.3g}]")
        pixels = (images.clamp(0, 1) * 2 - 1).to(device=self.vae.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def timesteps(self, t: int | torch.Tensor, batch: int) -> torch.Tensor:
        """t (an int, a 0-d tensor or (B,)) -> (B,) long timesteps on the model's device, checked in range."""
        steps = torch.as_tensor(t, device=self.device).long()
        if steps.dim() == 0:
            steps = steps.expand(batch)
        if steps.shape != (batch,):
            raise ValueError(f"t must be an int or a ({batch},) tensor, got shape {tuple(steps.shape)}")
        count = self.scheduler.config.num_train_timesteps
        if steps.min() < 0 or steps.max() >= count:
            raise ValueError(f"timesteps must be in [0, {count - 1}], got {steps.tolist()}")
        return steps

    def noised(
        self,
        latents: torch.Tensor,
        t: int | torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, C, h, w) latents at timestep t: √ᾱ_t·latents + √(1−ᾱ_t)·noise (the scheduler's ``add_noise``).

        noise: (B, C, h, w), or None for standard normal noise drawn with ``generator``.
        """
        if noise is None:
            noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        elif noise.shape != latents.shape:
            raise ValueError(
                f"noise {tuple(noise.shape)} must have the latents' shape {tuple(latents.shape)}"
            )
        return self.scheduler.add_noise(latents, noise, self.timesteps(t, latents.shape[0]))

    # -- attention -----------------------------------------------------------------------------------
    def attention_maps(
        self,
        noisy_latents: torch.Tensor,
        t: int | torch.Tensor,
        embeddings: torch.Tensor,
        resolutions: Sequence[int] | str = (16,),
        stop_early: bool = True,
    ) -> dict[int, AttentionMaps]:
        """One UNet pass; resolution -> head- and layer-averaged self (B, HW, HW) and cross (B, HW, K) maps.

        noisy_latents: (B, C, h, w); embeddings: (B, K, D) or (1, K, D) shared by the batch. The maps are in
        the autograd graph of the embeddings (float32, float64 for a float64 model). resolutions: grid
        heights, or "all" (capture in every attention layer). stop_early: skip the layers after the last
        captured one; the maps do not depend on them.
        """
        batch = noisy_latents.shape[0]
        if embeddings.dim() != 3 or embeddings.shape[0] not in (1, batch):
            raise ValueError(f"embeddings must be (B, K, D) or (1, K, D), got {tuple(embeddings.shape)} for B={batch}")
        embeddings = embeddings.expand(batch, -1, -1).to(self.dtype)  # casts stay in the graph
        noisy_latents = noisy_latents.to(device=self.device, dtype=self.dtype)
        steps = self.timesteps(t, batch)
        with capture_attention(self.unet, noisy_latents.shape[-2:], resolutions, stop_early) as capture:
            try:
                self.unet(noisy_latents, steps, encoder_hidden_states=embeddings)
            except CaptureComplete:
                pass
        return capture.maps()

    # -- persistence ---------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Write diffusers' layout: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` subfolders."""
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet")
        self.vae.save_pretrained(folder / "vae")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        self.scheduler.save_pretrained(folder / "scheduler")


def _tiny_components(seed: int) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    from grounding.models.clip_tokenizer import build_clip_tokenizer, clip_token_ids

    tokenizer = build_clip_tokenizer()
    text_config = CLIPTextConfig(**TINY_TEXT_CONFIG, **clip_token_ids(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        text_encoder = CLIPTextModel(text_config)
    return unet, vae, text_encoder, tokenizer


def build_stable_diffusion(
    name_or_path: str | Path = "tiny",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> StableDiffusion:
    """A frozen ``StableDiffusion``.

    name_or_path: ``"tiny"`` (random ``TINY_*_CONFIG`` models seeded with ``seed``, the offline CLIP
    tokenizer, SD's DDPM schedule), or a hub id (``stabilityai/stable-diffusion-2-1-base``,
    ``stabilityai/stable-diffusion-2-1``) or local folder in diffusers' layout (``unet``, ``vae``,
    ``text_encoder``, ``tokenizer``, ``scheduler`` subfolders, as written by ``save_pretrained``).
    The scheduler is always a ``DDPMScheduler`` built from the checkpoint's schedule (only ``add_noise`` and
    the alphas are used). dtype: of every weight; device: where the models go (None: where they load).
    """
    if str(name_or_path) == "tiny":
        unet, vae, text_encoder, tokenizer = _tiny_components(seed)
        scheduler = DDPMScheduler(**SD_SCHEDULER_CONFIG)
    else:
        path = str(name_or_path)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    model = StableDiffusion(unet, vae, text_encoder, tokenizer, scheduler)
    return model.to(device=device, dtype=dtype)
