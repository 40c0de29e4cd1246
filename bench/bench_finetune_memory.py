"""Fine-tuning memory: peak memory and time of one training step of Grounding DINO, full fine-tuning against a
frozen backbone, gradient checkpointing and LoRA (when ``grounding.models.lora`` exists).

    python bench/bench_finetune_memory.py --quick   # the demo's tiny model at 400x667, batch 1, fp32 (CPU: 4 processes
                                                    # of ~10 s each, mostly imports; 85 s on the loaded 2-core sandbox)
    python bench/bench_finetune_memory.py           # Swin-T sizes (random weights): CPU 800x1333 batch 1 fp32 (one step
                                                    # per variant, minutes each); CUDA 800x1333 bf16 autocast, batch 2, 4, 8
    (--batches, --steps, --warmup, --variants change the batch sizes, the step counts and the variants)

The model: ``GroundingDinoConfig()``'s architecture (Swin-T backbone, BERT-base-sized text encoder with the offline
word-piece vocabulary, d_model 256, 6 + 6 layers, 900 queries, 256 text tokens; ``SWIN_T`` of
bench_masking_overhead.py), built through ``ImageGroundingModule`` as a training run builds it: IMAGE masking (RF-GAM),
contrastive denoising (number 100; 3 boxes per image, so 198 denoising queries), the trained proposal head. A step is
``training_step``, ``backward`` and the module's own AdamW ``step`` (``configure_optimizers``: frozen parameters are in
no group), after the optimizer's state exists (made by one step on zero gradients, so no warm-up forward pass is
needed on the CPU). Variants (``ImageGroundingModule`` settings):

- ``full``: ``freeze: []``, everything trains (the anchor of the ratios);
- ``frozen_backbone``: ``freeze: [backbone]``;
- ``checkpointing``: ``freeze: []`` and ``gradient_checkpointing: true``;
- ``lora``: ``lora: {r: 16}`` (peft adapters on the encoder's and decoder's projections, base weights frozen), only
  when this checkout has ``grounding.models.lora`` and peft is installed (else listed in ``skipped``).

Memory. CPU: each variant in its own process (``--variant``), which reports its own figures from /proc/self/status:
``peak_mb`` = VmHWM, the peak resident set of the whole process (libraries, weights, optimizer state, the step), and
``step_mb`` = the growth of that peak during the measured steps over the resident set just before them (VmHWM reset
through /proc/self/clear_refs, ``bench/common.py``): gradients, activations and temporaries. No tracemalloc (it does
not see torch's allocations). CUDA: all variants in one process, each variant's tensors freed before the next;
``peak_mb`` = ``torch.cuda.max_memory_allocated`` over the measured steps (weights, optimizer state and the step),
``step_mb`` = that peak above what was allocated before them. Times: the median of ``--steps`` steps, each after
``--warmup`` untimed ones. Ends with one JSON line; ratios are to ``full`` at the same batch size.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MB, PeakMemory, _status_kib  # noqa: E402

# the model's modules are imported where a model is built: the parent process of a CPU run only starts the others

VARIANTS = ("full", "frozen_backbone", "checkpointing", "lora")
BOXES = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.7, 0.8, 0.1, 0.1]])
LABELS = torch.tensor([1, 4, 6])  # categories of CATEGORIES


def lora_available() -> bool:
    """This checkout has ``grounding.models.lora`` and peft (an optional dependency) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("grounding.models.lora", "peft"))


def variant_settings(name: str) -> dict:
    """The ``ImageGroundingModule`` settings of a variant."""
    if name == "full":
        return {"freeze": []}
    if name == "frozen_backbone":
        return {"freeze": ["backbone"]}
    if name == "checkpointing":
        return {"freeze": [], "gradient_checkpointing": True}
    if name == "lora":
        from grounding.models.lora import LoraSettings

        return {"freeze": [], "lora": LoraSettings(r=16)}
    raise ValueError(f"unknown variant {name!r}; known: {VARIANTS}")


def setting(quick: bool, device: str) -> dict:
    if quick:
        return {"model": {}, "height": 400, "width": 667, "batches": [1], "steps": 1, "warmup": 0}
    from bench_masking_overhead import SWIN_T

    if device == "cuda":
        return {"model": SWIN_T, "height": 800, "width": 1333, "batches": [2, 4, 8], "steps": 1, "warmup": 1}
    return {"model": SWIN_T, "height": 800, "width": 1333, "batches": [1], "steps": 1, "warmup": 0}


def build(s: dict, variant: str, device: str):
    """The module of a variant, in training mode on ``device``, and its optimizer with its state made."""
    from bench_masking_overhead import CATEGORIES

    from grounding.lightning.image_module import ImageGroundingModule
    from grounding.models.adaptive_masking import MaskingConfig
    from grounding.models.denoising import DenoisingConfig

    if "lora" in variant and "lora" not in inspect.signature(ImageGroundingModule).parameters:
        raise SystemExit("this checkout's ImageGroundingModule takes no lora setting")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = ImageGroundingModule(model="tiny", model_config=s["model"], masking=MaskingConfig(variant="rf_gam"),
                                      denoising=DenoisingConfig(number=100), log_images=False, **variant_settings(variant))
    module.set_categories(CATEGORIES)
    module.to(device).train()
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    for group in optimizer.param_groups:  # one step on zero gradients: the optimizer's state exists before measuring
        for parameter in group["params"]:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return module, optimizer


def make_batch(s: dict, batch: int, device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch, 3, s["height"], s["width"], generator=generator).to(device)
    return {
        "pixel_values": pixel_values,
        "pixel_mask": torch.ones(batch, s["height"], s["width"], dtype=torch.long, device=device),
        "targets": [{"image_id": i, "boxes": BOXES.clone(), "category_ids": LABELS.clone()} for i in range(batch)],
    }


def train_step(module, optimizer, batch: dict, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(s: dict, variant: str, device: str) -> dict:
    """Per batch size: peak_mb, step_mb, step_s of the variant; and its trainable parameter count."""
    module, optimizer = build(s, variant, device)
    figures = {"trainable": sum(p.numel() for g in optimizer.param_groups for p in g["params"])}
    for size in s["batches"]:
        batch = make_batch(s, size, device)
        for _ in range(s["warmup"]):
            train_step(module, optimizer, batch, device)
        gc.collect()
        memory = PeakMemory(device).start()
        times = [train_step(module, optimizer, batch, device) for _ in range(s["steps"])]
        step_mb = memory.peak_mb()
        if device == "cuda":
            peak_mb = torch.cuda.max_memory_allocated() / MB
        else:
            kib = _status_kib("VmHWM:")
            peak_mb = kib * 1024 / MB if kib is not None else float("nan")
        figures[size] = {"peak_mb": round(peak_mb, 1), "step_mb": round(step_mb, 1), "step_s": round(statistics.median(times), 3)}
        del batch
    del module, optimizer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny demo model at 400x667, batch 1")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default: 1; CUDA 2 4 8)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per batch size (default 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 0; CUDA 1)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="default: all")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = setting(args.quick, device)
    s.update({key: getattr(args, key) for key in ("batches", "steps", "warmup") if getattr(args, key) is not None})
    if min(s["batches"]) < 1 or s["steps"] < 1 or s["warmup"] < 0:
        parser.error("need --batches >= 1, --steps >= 1 and --warmup >= 0")
    if "full" not in args.variants:
        parser.error("--variants needs full: the ratios are to it")
    torch.set_flush_denormal(True)  # as grounding-train does
    if args.variant:
        print(json.dumps(measure(s, args.variant, device)))
        return

    variants = [v for v in args.variants if v != "lora" or lora_available()]
    results: dict = {}
    for variant in variants:
        if device == "cuda":  # exact allocation counts: one process for all
            results[variant] = json.loads(json.dumps(measure(s, variant, device)))
            continue
        command = [sys.executable, __file__, "--variant", variant, "--batches", *map(str, s["batches"]),
                   "--steps", str(s["steps"]), "--warmup", str(s["warmup"])] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"variant {variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])

    figures: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}",
        "model": "tiny" if args.quick else "swin-t", "image": [s["height"], s["width"]],
        "precision": "bf16-autocast" if device == "cuda" else "fp32", "steps": s["steps"], "warmup": s["warmup"],
        "memory": "cuda max_memory_allocated" if device == "cuda" else "VmHWM of each variant's own process",
        "skipped": [v for v in args.variants if v not in variants],
    }
    for variant in variants:
        figures[f"trainable_{variant}"] = results[variant]["trainable"]
    for size in s["batches"]:
        anchor = results["full"][str(size)]
        for variant in variants:
            mine = results[variant][str(size)]
            for key in ("peak_mb", "step_mb", "step_s"):
                figures[f"{key}_{variant}_b{size}"] = mine[key]
            if variant != "full":
                figures[f"peak_ratio_{variant}_b{size}"] = round(mine["peak_mb"] / anchor["peak_mb"], 3)
                figures[f"step_mb_ratio_{variant}_b{size}"] = round(mine["step_mb"] / anchor["step_mb"], 3)
                figures[f"time_ratio_{variant}_b{size}"] = round(mine["step_s"] / anchor["step_s"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
