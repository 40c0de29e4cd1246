"""GEM and the training-free baselines: images per second against plain CLIP, whole image and in sliding windows.

    python bench/bench_gem.py --quick     # ViT-B/16 sizes, random weights: whole 224 px images, batch 2, and
                                          # the 336 / 224 / 112 sliding preset on 1 image, 2 rounds (CPU, < 1 minute)
    python bench/bench_gem.py             # whole 448 px images (GEM's protocol) and the sliding preset; batch 2
                                          # and 1 image on the CPU, batch 32 and 8 images in bf16 on a GPU

Two settings in one run, each method computing the 20-class maps with the text embeddings made beforehand:
- ``whole``: ``grounding.models.gem.similarity_maps`` of a batch of ``--size`` px square images;
- ``slide``: ``sliding_window_maps`` of ``--slide-images`` images one at a time, as ``DenseSimilarity`` runs
  them, with the ``--slide SHORT WINDOW STRIDE`` preset (default 336 224 112, SCLIP's protocol: a 336 px square
  image, four 224 px windows at stride 112).
In each setting the methods take turns on every round (gem, plain, maskclip, ...) so that machine noise hits
them alike; a method's figure is its fastest round (machine noise only ever adds time). ``<method>_vs_plain``
(whole) and ``slide_<method>_vs_plain`` are its images/s over plain CLIP's. Expectations: GEM >= 0.9x plain
(the paper, one A6000: GEM 37.24 fps, CLIPSurgery 38.47, MaskCLIP 42.43); ClearCLIP and NACLIP drop the last
feed-forward, so >= 0.95x plain. Each method's floating-point operations per whole image are counted too
(``FlopCounterMode``, attention run by the math backend so that its products are counted):
``flops_plain_over_gem`` is the speed a compute-bound device can reach at best. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grounding.models.clip import build_clip  # noqa: E402
from grounding.models.gem import METHODS, similarity_maps, sliding_window_maps  # noqa: E402

ORDER = ("gem", "plain", "maskclip", "clipsurgery", "sclip", "clearclip", "naclip")


def flops_per_image(backbone, image: torch.Tensor, text: torch.Tensor, method: str) -> int:
    """Floating-point operations of one image's similarity maps (a multiply-add counts 2)."""
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        similarity_maps(backbone, image, text, method)
    return counter.get_total_flops()


def interleaved_seconds(run_method, rounds: int, device: str) -> dict[str, float]:
    """The fastest of ``rounds`` rounds of ``run_method(method)`` per method, in seconds, the methods taking turns."""
    times: dict[str, list[float]] = {m: [] for m in ORDER}
    for _ in range(rounds):
        for method in ORDER:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run_method(method)
            if device == "cuda":
                torch.cuda.synchronize()
            times[method].append(time.perf_counter() - start)
    return {m: min(t) for m, t in times.items()}


def ratios(per_second: dict[str, float], prefix: str) -> dict[str, float]:
    """``<prefix>images_per_s_<m>`` and ``<prefix><m>_vs_plain`` for every method."""
    figures = {f"{prefix}images_per_s_{m}": round(v, 3) for m, v in per_second.items()}
    figures.update({f"{prefix}{m}_vs_plain": round(v / per_second["plain"], 3) for m, v in per_second.items() if m != "plain"})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="whole images at 224 px, 2 rounds")
    parser.add_argument("--size", type=int, default=None, help="whole-image side (default 448; 224 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="whole images per batch (default: 2 on the CPU, 32 on a GPU)")
    parser.add_argument("--slide", type=int, nargs=3, default=(336, 224, 112), metavar=("SHORT", "WINDOW", "STRIDE"),
                        help="the sliding-window preset: image side, window, stride in px (default 336 224 112)")
    parser.add_argument("--slide-images", type=int, default=None, help="images per sliding round (default: 1 on the CPU, 8 on a GPU)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size or (224 if args.quick else 448)
    batch = args.batch or (32 if device == "cuda" else 2)
    short, window, stride = args.slide
    slide_images = args.slide_images or (8 if device == "cuda" else 1)
    rounds = args.rounds or (2 if args.quick else 3)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    assert set(ORDER) == set(METHODS), "every method is benchmarked"

    backbone = build_clip("vit-b16-random", image_size=size).to(device=device, dtype=dtype).eval()
    text = torch.nn.functional.normalize(torch.randn(20, backbone.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    text = text.to(device=device, dtype=dtype)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    slides = torch.randn(slide_images, 1, 3, short, short, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    with torch.inference_mode():
        for method in ORDER:  # warm-up at both input sizes (a window is one similarity_maps call)
            similarity_maps(backbone, images[:1], text, method)
            if window != size:
                similarity_maps(backbone, slides[0, ..., :window, :window], text, method)
        whole = interleaved_seconds(lambda m: similarity_maps(backbone, images, text, m), rounds, device)
        slide = interleaved_seconds(
            lambda m: [sliding_window_maps(backbone, image, text, m, window, stride) for image in slides], rounds, device)
    figures = {"device": device, "dtype": str(dtype).split(".")[-1], "image_px": size, "batch": batch, "rounds": rounds,
               "slide_short_side": short, "slide_window": window, "slide_stride": stride, "slide_images": slide_images}
    figures.update(ratios({m: batch / t for m, t in whole.items()}, ""))
    figures.update(ratios({m: slide_images / t for m, t in slide.items()}, "slide_"))
    flops = {m: flops_per_image(backbone, images[:1], text, m) for m in ORDER}
    figures.update({f"gflops_per_image_{m}": round(v / 1e9, 2) for m, v in flops.items()})
    figures["flops_plain_over_gem"] = round(flops["plain"] / flops["gem"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
