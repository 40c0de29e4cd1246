"""GEM throughput: images per second of GEM and of plain CLIP (and MaskCLIP, CLIPSurgery) on the same batches.

    python bench/bench_gem.py --quick     # ViT-B/16 sizes, random weights, 224 px, batch 2 (CPU, < 1 minute)
    python bench/bench_gem.py             # ViT-B/16 at 448 px (the segmentation protocol), batch 2 on the CPU;
                                          # batch 32 in bf16 on a GPU

Each method computes the 20-class similarity maps at the input size (``grounding.models.gem.similarity_maps``,
the text embeddings computed once beforehand). The methods take turns on every round (gem, plain, maskclip,
clipsurgery, gem, ...) so that machine noise hits them alike; the figure per method is the median time of a
round. The paper (one A6000): GEM 37.24 fps vs MaskCLIP 42.43, CLIPSurgery 38.47 — GEM costs ~12 % over a
plain pass; the target here is GEM >= 0.9x plain CLIP. Each method's floating-point operations per image are
counted too (``torch.utils.flop_counter.FlopCounterMode``, attention run by the math backend so that its
products are counted): ``flops_plain_over_gem`` is the ratio a compute-bound device can reach at best.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grounding.models.clip import build_clip  # noqa: E402
from grounding.models.gem import METHODS, similarity_maps  # noqa: E402


def flops_per_image(backbone, image: torch.Tensor, text: torch.Tensor, method: str) -> int:
    """Floating-point operations of one image's similarity maps (a multiply-add counts 2)."""
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        similarity_maps(backbone, image, text, method)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="224 px, 2 rounds")
    parser.add_argument("--size", type=int, default=None, help="input side (default 448; 224 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default: 2 on the CPU, 32 on a GPU)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size or (224 if args.quick else 448)
    batch = args.batch or (32 if device == "cuda" else 2)
    rounds = args.rounds or (2 if args.quick else 3)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    backbone = build_clip("vit-b16-random", image_size=size).to(device=device, dtype=dtype).eval()
    text = torch.nn.functional.normalize(torch.randn(20, backbone.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    text = text.to(device=device, dtype=dtype)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    order = ["gem", "plain", "maskclip", "clipsurgery"]
    assert set(order) == set(METHODS)
    times: dict[str, list[float]] = {m: [] for m in order}
    with torch.inference_mode():
        for method in order:  # warm-up
            similarity_maps(backbone, images[:1], text, method)
        for _ in range(rounds):
            for method in order:
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                similarity_maps(backbone, images, text, method)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[method].append(time.perf_counter() - start)
    per_second = {m: batch / statistics.median(t) for m, t in times.items()}
    figures = {"device": device, "dtype": str(dtype).split(".")[-1], "image_px": size, "batch": batch, "rounds": rounds}
    figures.update({f"images_per_s_{m}": round(v, 3) for m, v in per_second.items()})
    figures["gem_vs_plain"] = round(per_second["gem"] / per_second["plain"], 3)
    flops = {m: flops_per_image(backbone, images[:1], text, m) for m in order}
    figures.update({f"gflops_per_image_{m}": round(v / 1e9, 2) for m, v in flops.items()})
    figures["flops_plain_over_gem"] = round(flops["plain"] / flops["gem"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
