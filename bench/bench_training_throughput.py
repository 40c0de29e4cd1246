"""Training throughput and peak memory of Grounding DINO with and without IMAGE masking and contrastive
denoising (CDN), at several batch sizes.

    python bench/bench_training_throughput.py --quick   # tiny model, 160 px, batch 4 (CPU, < 1 minute)
    python bench/bench_training_throughput.py           # Swin-T size (random weights): on CUDA 800x1333 bf16,
                                                        # batch 2, 4, 8; on the CPU 400x667, batch 1 and 2
    (--batches, --steps, --warmup change the batch sizes and step counts; --memory-variants measures the
    peak memory of only some variants)

Per batch size the four variants (plain, IMAGE, CDN, IMAGE + CDN) run in one process with their steps
interleaved, so machine noise hits all alike; images/s = batch / median step time (forward, backward,
AdamW step). Peak memory: each (variant, batch) in a fresh subprocess (CUDA ``max_memory_allocated``; CPU:
growth of the peak resident set). The labels have 3 boxes per image, so CDN adds 2 · 3 · (100 // 3) = 198
queries. Ends with one JSON line; the figures the issue asks for on a GPU are ``images_per_s`` and
``peak_mb`` at batch 8 and 2.
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

from bench_masking_overhead import SWIN_T, make_inputs  # noqa: E402
from common import PeakMemory  # noqa: E402

from grounding.models.adaptive_masking import AdaptiveMasking, MaskingConfig  # noqa: E402
from grounding.models.denoising import ContrastiveDenoising, DenoisingConfig, denoising_training  # noqa: E402
from grounding.models.grounding_dino import build_grounding_dino, feature_masking, trained_proposals  # noqa: E402

VARIANTS = {"plain": ("none", 0), "image": ("rf_gam", 0), "cdn": ("none", 100), "image_cdn": ("rf_gam", 100)}


def setting(quick: bool, device: str) -> dict:
    if quick:
        return {"model": {}, "height": 160, "width": 160, "batches": [4], "steps": 5, "warmup": 1}
    if device == "cuda":
        return {"model": SWIN_T, "height": 800, "width": 1333, "batches": [2, 4, 8], "steps": 10, "warmup": 3}
    return {"model": SWIN_T, "height": 400, "width": 667, "batches": [1, 2], "steps": 3, "warmup": 1}


class Runner:
    """One model, its optimizer and a batch's inputs; ``step(variant)`` times one training step."""

    def __init__(self, s: dict, batch: int, device: str):
        torch.manual_seed(0)
        self.device = device
        self.model, tokenizer = build_grounding_dino("tiny", s["model"])
        self.model.to(device).train()
        config = self.model.config
        self.denoiser = ContrastiveDenoising(DenoisingConfig(number=100), config.d_model, config.max_text_len).to(device)
        self.optimizer = torch.optim.AdamW([*self.model.parameters(), *self.denoiser.parameters()], lr=1e-5)
        self.inputs = make_inputs(self.model, tokenizer, dict(s, batch=batch), device)
        self.maskers = {v: AdaptiveMasking(MaskingConfig(variant=v)).train() for v in ("none", "rf_gam")}

    def step(self, variant: str) -> float:
        masking, number = VARIANTS[variant]
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        queries = self.denoiser.build(self.inputs["labels"], 6, self.model.config.num_queries) if number else None
        with feature_masking(self.model, self.maskers[masking], 0.5, self.inputs["pixel_mask"]), trained_proposals(self.model), \
                denoising_training(self.model, queries), torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            loss = self.model(**self.inputs).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def peak_memory_mb(s: dict, batch: int, device: str, variant: str) -> float:
    runner = Runner(s, batch, device)
    runner.step("plain")  # the optimizer state exists before the measurement
    memory = PeakMemory(device).start()
    for _ in range(2):
        runner.step(variant)
    return memory.peak_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 160 px, batch 4")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default: 4 quick, 2 4 8 CUDA, 1 2 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 5 quick, 10 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default: 1 quick, 3 CUDA, 1 CPU)")
    parser.add_argument("--memory-variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants whose peak memory is measured (a fresh process each; default: all)")
    parser.add_argument("--memory-of", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = setting(args.quick, device)
    s.update({key: getattr(args, key) for key in ("batches", "steps", "warmup") if getattr(args, key) is not None})
    if min(s["batches"]) < 1 or s["steps"] < 1 or s["warmup"] < 0:
        parser.error("need --batches >= 1, --steps >= 1 and --warmup >= 0")
    if args.memory_of:
        variant, batch = args.memory_of
        print(json.dumps({"peak_mb": peak_memory_mb(s, int(batch), device, variant)}))
        return

    figures: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}",
        "image": [s["height"], s["width"]], "model": "tiny" if args.quick else "swin-t",
        "precision": "bf16-autocast" if device == "cuda" else "fp32",
    }
    for batch in s["batches"]:
        runner = Runner(s, batch, device)
        times = {v: [] for v in VARIANTS}
        order = list(VARIANTS)
        for step in range(s["warmup"] + s["steps"]):
            for variant in order[step % len(order):] + order[: step % len(order)]:  # rotate the order each step
                elapsed = runner.step(variant)
                if step >= s["warmup"]:
                    times[variant].append(elapsed)
        del runner
        for variant, measured in times.items():
            figures[f"images_per_s_{variant}_b{batch}"] = round(batch / statistics.median(measured), 2)
            if variant not in args.memory_variants:
                continue
            command = [sys.executable, __file__, "--memory-of", variant, str(batch)] + (["--quick"] if args.quick else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            figures[f"peak_mb_{variant}_b{batch}"] = round(json.loads(out)["peak_mb"], 1)
        plain = figures[f"images_per_s_plain_b{batch}"]
        for variant in ("image", "cdn", "image_cdn"):
            figures[f"time_ratio_{variant}_b{batch}"] = round(plain / figures[f"images_per_s_{variant}_b{batch}"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
