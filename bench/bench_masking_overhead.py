"""IMAGE masking overhead: training step time and peak memory with RF-GAM masking vs the same model without.

    python bench/bench_masking_overhead.py --quick      # tiny model, 160 px, batch 4 (CPU, < 1 minute)
    python bench/bench_masking_overhead.py              # Swin-T size Grounding DINO (random weights);
                                                        # 800x1333 batch 2 on CUDA, 400x667 batch 1 on CPU
    (--batch, --steps, --warmup change the batch and the step counts of either setting)

Step time: both variants in one process, steps interleaved (none, rf_gam, none, ...) so that machine
noise hits both alike; the figure is the ratio of medians. Peak memory: each variant in a fresh
subprocess (CUDA: ``max_memory_allocated``; CPU: growth of the peak resident set over the model's
own footprint). Ends with one JSON line.
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

from grounding.data.prompts import build_prompts  # noqa: E402
from grounding.models.adaptive_masking import AdaptiveMasking, MaskingConfig  # noqa: E402
from grounding.models.grounding_dino import build_grounding_dino, feature_masking  # noqa: E402

CATEGORIES = {1: "red circle", 2: "red square", 3: "red triangle", 4: "blue circle", 5: "blue square", 6: "blue triangle"}
SWIN_T = {  # IDEA-Research/grounding-dino-tiny's architecture (Swin-T, BERT-base, d_model 256, 900 queries)
    "backbone_config": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
    "text_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "d_model": 256, "encoder_layers": 6, "decoder_layers": 6, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048,
    "encoder_attention_heads": 8, "decoder_attention_heads": 8, "num_queries": 900, "max_text_len": 256,
    "auxiliary_loss": True,
}


def setting(quick: bool, device: str) -> dict:
    if quick:
        return {"model": {}, "height": 160, "width": 160, "batch": 4, "steps": 12, "warmup": 2}
    if device == "cuda":
        return {"model": SWIN_T, "height": 800, "width": 1333, "batch": 2, "steps": 20, "warmup": 3}
    return {"model": SWIN_T, "height": 400, "width": 667, "batch": 1, "steps": 4, "warmup": 1}


def make_inputs(model, tokenizer, s: dict, device: str):
    prompt = build_prompts(CATEGORIES, tokenizer, model.config.max_text_len)[0]
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(s["batch"], 3, s["height"], s["width"], generator=generator).to(device)
    pixel_mask = torch.ones(s["batch"], s["height"], s["width"], dtype=torch.long, device=device)
    input_ids = prompt.input_ids[None].expand(s["batch"], -1).to(device)
    labels = [
        {"class_labels": torch.tensor([0, 3, 5], device=device), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.7, 0.8, 0.1, 0.1]], device=device)}
        for _ in range(s["batch"])
    ]
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def train_step(model, optimizer, masker, inputs, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with feature_masking(model, masker, 0.5, inputs["pixel_mask"]), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def build(s: dict, device: str):
    torch.manual_seed(0)
    model, tokenizer = build_grounding_dino("tiny", s["model"])
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return model, optimizer, make_inputs(model, tokenizer, s, device)


def peak_memory_mb(s: dict, device: str, variant: str) -> float:
    """Peak memory of training steps of one variant (run in a fresh process by ``main``)."""
    model, optimizer, inputs = build(s, device)
    masker = AdaptiveMasking(MaskingConfig(variant=variant)).train()
    train_step(model, optimizer, AdaptiveMasking(MaskingConfig(variant="none")), inputs, device)  # optimizer state exists
    memory = PeakMemory(device).start()
    for _ in range(2):
        train_step(model, optimizer, masker, inputs, device)
    return memory.peak_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 160 px, batch 4")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 4 quick, 2 CUDA, 1 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 12 quick, 20 CUDA, 4 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default: 2 quick, 3 CUDA, 1 CPU)")
    parser.add_argument("--memory-of", choices=["none", "rf_gam"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = setting(args.quick, device)
    s.update({key: getattr(args, key) for key in ("batch", "steps", "warmup") if getattr(args, key) is not None})
    if s["batch"] < 1 or s["steps"] < 1 or s["warmup"] < 0:
        parser.error("need --batch >= 1, --steps >= 1 and --warmup >= 0")
    if args.memory_of:
        print(json.dumps({"peak_mb": peak_memory_mb(s, device, args.memory_of)}))
        return

    model, optimizer, inputs = build(s, device)
    maskers = {v: AdaptiveMasking(MaskingConfig(variant=v)).train() for v in ("none", "rf_gam")}
    times = {v: [] for v in maskers}
    for step in range(s["warmup"] + s["steps"]):
        for variant in (("none", "rf_gam") if step % 2 == 0 else ("rf_gam", "none")):
            elapsed = train_step(model, optimizer, maskers[variant], inputs, device)
            if step >= s["warmup"]:
                times[variant].append(elapsed)
    median = {v: statistics.median(t) for v, t in times.items()}

    peaks = {}
    for variant in maskers:
        command = [sys.executable, __file__, "--memory-of", variant, "--batch", str(s["batch"])] + (["--quick"] if args.quick else [])
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[variant] = json.loads(out)["peak_mb"]

    print(json.dumps({
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}",
        "image": [s["height"], s["width"]], "batch": s["batch"], "model": "tiny" if args.quick else "swin-t",
        "step_ms_none": round(1000 * median["none"], 1), "step_ms_rf_gam": round(1000 * median["rf_gam"], 1),
        "time_overhead_pct": round(100 * (median["rf_gam"] / median["none"] - 1), 2),
        "peak_mb_none": round(peaks["none"], 1), "peak_mb_rf_gam": round(peaks["rf_gam"], 1),
        "extra_mb": round(peaks["rf_gam"] - peaks["none"], 1),
    }))


if __name__ == "__main__":
    main()
