"""Evaluation cost against the vocabulary: images per second of the detector's evaluation (``detect``) at 80
and at 1,203 category names (COCO's and LVIS's counts), with the image backbone run once per batch for all
the prompts a vocabulary is split over (``shared_image_backbone``) against rerunning it for every prompt, and
with the text encoder run once per prompt for the whole evaluation (``cached_text_features``) against
rerunning it for every image and prompt (``*_text_rerun``; the image backbone shared in both).

    python bench/bench_vocabulary.py --quick    # tiny model (64-token prompts), 128 px, batch 1 (CPU, < 1 minute)
    python bench/bench_vocabulary.py            # Swin-T size Grounding DINO (random weights); 800x1333 batch 2
                                                # on CUDA, 400x667 batch 1 on CPU

The paths in one process on the same inputs, interleaved (shared, rerun, shared, ...), so that machine noise
hits both alike; figures are medians. The names are distinct made-up words ("category 17 ..."); what counts is
how many prompts the vocabulary needs. Checks that every path gives the same detections. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_masking_overhead import SWIN_T  # noqa: E402

from grounding.lightning.image_module import ImageGroundingModule  # noqa: E402

WORDS = ("red", "blue", "small", "large", "round", "striped", "wooden", "metal", "glass", "paper")


def vocabulary(count: int) -> dict[int, str]:
    """``count`` distinct names of two to three words."""
    return {i + 1: f"{WORDS[i % 10]} {WORDS[(i // 10) % 10]} thing{i // 100}" for i in range(count)}


def setting(quick: bool, device: str) -> dict:
    if quick:
        return {"model": {}, "height": 128, "width": 128, "batch": 1, "batches": 1, "warmup": 1}
    if device == "cuda":
        return {"model": SWIN_T, "height": 800, "width": 1333, "batch": 2, "batches": 3, "warmup": 1}
    return {"model": SWIN_T, "height": 400, "width": 667, "batch": 1, "batches": 2, "warmup": 1}


#: the paths timed: (share_backbone, cache_text) of ``detect``
PATHS = {"shared": (True, True), "rerun": (False, True), "text_rerun": (True, False)}


def timed(module, inputs, path: str, device: str) -> tuple[float, list[dict]]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        share, cache = PATHS[path]
        detections = module.detect(*inputs, share_backbone=share, cache_text=cache)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, detections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 128 px, batch 1, one timed batch")
    parser.add_argument("--counts", type=int, nargs="+", default=[80, 1203], help="vocabulary sizes (default 80 1203)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = setting(args.quick, device)
    torch.manual_seed(0)
    module = ImageGroundingModule(model="tiny", model_config=s["model"], log_images=False).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(s["batch"], 3, s["height"], s["width"], generator=generator).to(device)
    pixel_mask = torch.ones(s["batch"], s["height"], s["width"], dtype=torch.long, device=device)
    sizes = torch.tensor([[s["height"], s["width"]]] * s["batch"], device=device)
    inputs = (pixel_values, pixel_mask, sizes)

    figures: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}",
                     "image": [s["height"], s["width"]], "batch": s["batch"], "model": "tiny" if args.quick else "swin-t"}
    for count in args.counts:
        module.set_categories(vocabulary(count))
        module.text_features.clear()  # the first timed call of the cached paths encodes the prompts afresh
        times: dict[str, list[float]] = {path: [] for path in PATHS}
        same = True
        for step in range(s["warmup"] + s["batches"]):
            results = {}
            order = list(PATHS)[step % len(PATHS):] + list(PATHS)[:step % len(PATHS)]  # each path first in turn
            for path in order:
                elapsed, results[path] = timed(module, inputs, path, device)
                if step >= s["warmup"]:
                    times[path].append(elapsed)
            for path in ("rerun", "text_rerun"):
                same &= all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for a, b in zip(results["shared"], results[path])
                            for k in ("boxes", "scores")) and all(torch.equal(a["category_ids"], b["category_ids"])
                                                                 for a, b in zip(results["shared"], results[path]))
        rates = {path: s["batch"] / statistics.median(times[path]) for path in PATHS}
        figures[f"prompts_{count}"] = len(module.prompts)
        for path, rate in rates.items():
            figures[f"images_per_s_{count}_{path}"] = round(rate, 3)
        figures[f"speedup_{count}"] = round(rates["shared"] / rates["rerun"], 3)
        figures[f"text_speedup_{count}"] = round(rates["shared"] / rates["text_rerun"], 3)
        figures[f"same_detections_{count}"] = bool(same)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
