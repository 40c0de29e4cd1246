"""InvSeg attention capture: the 15-step adaptation with capture only at 16x16 vs capture in every layer.

    python bench/bench_invseg_capture.py --quick   # 256 px, 3 steps (CPU, < 1 minute)
    python bench/bench_invseg_capture.py           # 512 px, 15 steps (the paper's setting)
    python bench/bench_invseg_capture.py --model sd21-base --dtype bfloat16   # SD 2.1-base's sizes (GPU)
    (--image-size, --steps, --repeats change the input side, the adaptation's steps and the timed repeats)

The model is a reduced Stable Diffusion 2.1 (random weights): the same four UNet levels, block types,
linear projections and VAE factor 8, with fewer channels and one layer per block, so that a CPU runs it.
``--model sd21-base``: the sizes of Stable Diffusion 2.1-base instead (its UNet, VAE and OpenCLIP ViT-H text
encoder; random weights, built on the device), ``--dtype`` their weights' type.
``only``: ``InvSeg.invert`` (grounding.models.invseg_inversion) as it runs (capture in the 16x16 layers, fused SDPA elsewhere, the pass
stops after the last captured layer). ``every``: the same adaptation with capture installed in every
attention layer and the full UNet run (what a straightforward implementation does: it records all maps
and keeps the 16x16 ones). Each variant runs in its own process (peak memory = growth of the peak
resident set, CUDA: max_memory_allocated); the time is the median of 2 adaptations after a
one-step warm-up.
Also: peak memory of the symmetric-KL distance matrix at the 16x16 and 32x32 grids. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PeakMemory  # noqa: E402

#: SD 2.1's UNet layout, narrower and with one layer per block
REDUCED_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (64, 128, 128, 128),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 64, "attention_head_dim": (2, 4, 4, 4), "use_linear_projection": True,
}
REDUCED_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (16, 32, 64, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 512, "scaling_factor": 0.18215,
}
REDUCED_TEXT = {"hidden_size": 64, "intermediate_size": 128}
#: stabilityai/stable-diffusion-2-1-base's sizes (UNet ~866 M, VAE ~84 M, text encoder ~340 M parameters)
SD21_BASE_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True,
}
SD21_BASE_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 768, "scaling_factor": 0.18215,
}
SD21_BASE_TEXT = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
                  "hidden_act": "gelu", "projection_dim": 512}
MODELS = {"reduced": (REDUCED_UNET, REDUCED_VAE, REDUCED_TEXT), "sd21-base": (SD21_BASE_UNET, SD21_BASE_VAE, SD21_BASE_TEXT)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_invseg(image_size: int, steps: int, device: str, model: str = "reduced", dtype: str = "float32"):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from grounding.models.clip_tokenizer import build_clip_tokenizer, clip_token_ids
    from grounding.models.stable_diffusion import SD_SCHEDULER_CONFIG, TINY_TEXT_CONFIG, StableDiffusion

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()
    unet_config, vae_config, text_config = MODELS[model]
    with torch.device(device if model == "sd21-base" else "cpu"):  # the full sizes are built where they run
        text = CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT_CONFIG, **text_config}, **clip_token_ids(tokenizer)))
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
    diffusion = StableDiffusion(unet, vae, text, tokenizer, DDPMScheduler(**SD_SCHEDULER_CONFIG))
    diffusion = diffusion.to(device=device, dtype=DTYPES[dtype])
    from grounding.models.invseg_inversion import InversionSettings, InvSeg

    return InvSeg(diffusion, image_size=image_size, resolution=16, inversion=InversionSettings(steps=steps))


def capture_everywhere(diffusion) -> None:
    """The naive way: every attention layer records its maps and the whole UNet runs."""
    original = diffusion.attention_maps

    def attention_maps(noisy, t, embeddings, resolutions=(16,), stop_early=True):
        maps = original(noisy, t, embeddings, "all", stop_early=False)
        return {r: maps[r] for r in resolutions}

    diffusion.attention_maps = attention_maps


def run_variant(variant: str, image_size: int, steps: int, repeats: int, device: str, model: str = "reduced",
                dtype: str = "float32") -> dict:
    from grounding.models.stable_diffusion import category_prompt

    invseg = build_invseg(image_size, steps, device, model, dtype)
    if variant == "every":
        capture_everywhere(invseg.diffusion)
    names = ["background", "cat", "dining table", "person"]
    embeddings, _ = invseg.diffusion.encode_prompt([category_prompt(names)])
    positions = invseg.diffusion.category_token_positions(names)
    image = torch.rand(3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    invseg.inversion.steps = 1
    invseg.invert(image, embeddings, positions, torch.Generator().manual_seed(0))  # warm-up: one step
    invseg.inversion.steps = steps
    times = []
    memory = PeakMemory(device).start()
    for repeat in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _, losses = invseg.invert(image, embeddings, positions, torch.Generator().manual_seed(repeat))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mb": memory.peak_mb(), "final_loss": losses[-1]}


def distance_peak(grid: int, device: str) -> float:
    from grounding.models.invseg import symmetric_kl_distance

    attention = torch.rand(1, grid * grid, grid * grid, device=device).softmax(-1)
    memory = PeakMemory(device).start()
    symmetric_kl_distance(attention)
    return memory.peak_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 px, 3 steps")
    parser.add_argument("--model", choices=list(MODELS), default="reduced", help="the model's sizes (default reduced)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the model's weights (default float32)")
    parser.add_argument("--image-size", type=int, default=None, help="input side (default 512; quick 256)")
    parser.add_argument("--steps", type=int, default=None, help="adaptation steps (default 15; quick 3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed adaptations per variant (default 2)")
    parser.add_argument("--variant", choices=["only", "every", "distance"], help=argparse.SUPPRESS)
    parser.add_argument("--grid", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    image_size, steps, repeats = (256, 3, 2) if args.quick else (512, 15, 2)
    image_size, steps, repeats = args.image_size or image_size, args.steps or steps, args.repeats or repeats
    if args.variant == "distance":
        print(json.dumps({"peak_mb": distance_peak(args.grid, device)}))
        return
    if args.variant:
        print(json.dumps(run_variant(args.variant, image_size, steps, repeats, device, args.model, args.dtype)))
        return

    def child(*extra: str) -> dict:
        command = [sys.executable, __file__, *extra, "--model", args.model, "--dtype", args.dtype, "--image-size",
                   str(image_size), "--steps", str(steps), "--repeats", str(repeats)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])

    only, every = child("--variant", "only"), child("--variant", "every")
    figures = {
        "device": device, "model": args.model, "dtype": args.dtype, "image_px": image_size, "steps": steps,
        "seconds_capture_16": round(only["seconds"], 3), "seconds_capture_every_layer": round(every["seconds"], 3),
        "speedup": round(every["seconds"] / only["seconds"], 2),
        "peak_mb_capture_16": round(only["peak_mb"], 1), "peak_mb_capture_every_layer": round(every["peak_mb"], 1),
        "memory_ratio": round(every["peak_mb"] / max(only["peak_mb"], 1e-6), 2),
        "same_final_loss": abs(only["final_loss"] - every["final_loss"]) < 1e-4 * max(1.0, abs(only["final_loss"])),
        "peak_mb_distance_16x16": round(child("--variant", "distance", "--grid", "16")["peak_mb"], 2),
        "peak_mb_distance_32x32": round(child("--variant", "distance", "--grid", "32")["peak_mb"], 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
