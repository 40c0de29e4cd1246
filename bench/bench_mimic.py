"""MIMIC: the cost of each loss term per optimization step, and seconds per iteration of a 7B LLaVA on a GPU.

    python bench/bench_mimic.py --quick   # tiny random LLaVA (64 px), tiny BatchNorm CNN, 10 timed steps (< 1 min, CPU)
    python bench/bench_mimic.py           # the same with 40 timed steps; on a CUDA machine also the 7B part

CPU part (always): one whole step (jitter, every loss term, backward, Adam, clamp) and each term on its own
(its forward and backward only); all settings take turns in every repetition (after 2 warm-up calls each)
and the fastest repetition of each is kept (the least disturbed on a shared machine; ``step_median_ms`` too). Two figures per
term: ``<term>_ms`` (the term alone; L_SCE includes the whole VLM forward, L_base alone the vision tower
forward, R_V the CNN) and ``<term>_marginal_ms`` (the full step minus the step without that term: what the term
adds to a real step, where L_base rides on L_SCE's vision-tower forward). ``<term>_share`` = marginal / step
(the cheap image priors: alone / step).

CUDA part (only when CUDA is available; ``--no-cuda`` skips it): a random LLaVA of LLaVA-1.5-7B's sizes in
bfloat16 at 336 px, ResNet-50 (random weights) for R_V, L_base against random reference statistics, bf16
autocast, transformers' gradient checkpointing; seconds per iteration over ``--cuda-iterations`` after one
warm-up iteration, and the peak GPU memory.

Ends with one JSON line: ``step_ms``, ``<term>_ms``, ``<term>_marginal_ms``, ``<term>_share`` and, on CUDA,
``cuda_7b_s_per_iter`` and ``cuda_7b_peak_mb``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PeakMemory  # noqa: E402

PROMPT, TARGET = "What is in the image?", "a red circle"
TERM_GROUPS = {"sce": ("sce",), "base": ("base",), "bn": ("bn",), "patch": ("patch",), "tv": ("tv_l1", "tv_l2"), "l2": ("l2",)}


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cpu_figures(repeats: int) -> dict:
    """Per-term cost on the tiny model (see the module docstring)."""
    import torch

    from grounding.models import mimic

    torch.manual_seed(0)
    vlm = mimic.build_vlm("tiny")
    prior = mimic.BatchNormPrior(mimic.build_cnn("tiny"))
    objective = mimic.MimicObjective(vlm, mimic.MimicWeights(), prior)
    references = torch.rand(4, 3, vlm.image_size, vlm.image_size)
    target_stats = mimic.compute_reference_statistics(vlm, references)
    ids, labels = vlm.sequence(PROMPT, TARGET)
    ids, labels = ids[None], labels[None]
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.Parameter(mimic.clamp_pixels(torch.randn(1, 3, vlm.image_size, vlm.image_size), vlm.mean, vlm.std))
    optimizer = torch.optim.Adam([images], lr=0.25, betas=(0.5, 0.9))

    def step(terms) -> None:
        view, _ = mimic.jitter_flip(images, 8, True, generator)
        losses = objective.losses(view, ids, labels, target_stats, terms=terms)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        mimic.clamp_pixels(images.data, vlm.mean, vlm.std)

    def term_only(terms) -> None:
        losses = objective.losses(images, ids, labels, target_stats, terms=terms)
        images.grad = None
        losses["total"].backward()

    everything = mimic.TERMS
    settings = {"step": (step, everything)}
    for group, names in TERM_GROUPS.items():
        settings[f"{group}_alone"] = (term_only, names)
        settings[f"{group}_without"] = (step, [t for t in everything if t not in names])
    for run, terms in settings.values():  # warm-up
        run(terms)
        run(terms)
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):  # the settings take turns, so that a slow spell of a shared machine hits them alike
        for name, (run, terms) in settings.items():
            start = time.perf_counter()
            run(terms)
            times[name].append(time.perf_counter() - start)
    best = {name: min(values) * 1000 for name, values in times.items()}  # the least disturbed repetition

    figures: dict[str, float] = {}
    step_ms = best["step"]
    figures["step_ms"] = round(step_ms, 3)
    figures["step_median_ms"] = round(statistics.median(times["step"]) * 1000, 3)
    for group in TERM_GROUPS:
        alone, marginal = best[f"{group}_alone"], step_ms - best[f"{group}_without"]
        figures[f"{group}_ms"] = round(alone, 3)
        figures[f"{group}_marginal_ms"] = round(marginal, 3)
        figures[f"{group}_share"] = round((marginal if group in ("sce", "base", "bn") else alone) / step_ms, 3)
    return figures


def cuda_figures(iterations: int) -> dict:
    """Seconds per iteration of a 7B-sized random LLaVA in bf16 at 336 px with gradient checkpointing."""
    import torch

    from grounding.models import mimic

    device = torch.device("cuda")
    vlm = mimic.build_random_llava(mimic.LLAVA_7B_VLM, dtype=torch.bfloat16, device=device, name="llava-7b-random")
    mimic.enable_checkpointing(vlm.model)
    prior = mimic.BatchNormPrior(mimic.build_cnn("resnet50").to(device))
    objective = mimic.MimicObjective(vlm, mimic.MimicWeights(), prior)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        target_stats = mimic.compute_reference_statistics(vlm, torch.rand(4, 3, vlm.image_size, vlm.image_size), batch_size=4)

    def run(count: int) -> float:
        settings = mimic.SynthesisSettings(iterations=count)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16), mimic.train_mode(vlm.model, True):
            mimic.synthesize(objective, PROMPT, TARGET, settings, target_stats, torch.Generator().manual_seed(0), device)
        _sync(device)
        return time.perf_counter() - start

    run(1)  # warm-up
    memory = PeakMemory("cuda").start()
    seconds = run(iterations)
    return {"cuda_7b_s_per_iter": round(seconds / iterations, 4), "cuda_7b_peak_mb": round(memory.peak_mb(), 1),
            "cuda_device": torch.cuda.get_device_name(), "cuda_iterations": iterations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 timed repetitions per setting (under a minute on a CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per setting (default 40; quick: 10)")
    parser.add_argument("--cuda-iterations", type=int, default=None, help="timed 7B iterations (default 10; quick: 3)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the 7B GPU part")
    args = parser.parse_args()

    import torch

    repeats = args.repeats or (10 if args.quick else 40)
    summary = {"device": f"cpu x{torch.get_num_threads()}", "model": "tiny", "repeats": repeats}
    figures = cpu_figures(repeats)
    summary.update(figures)
    print(f"MIMIC step on the tiny model: {figures['step_ms']:.1f} ms")
    for group in TERM_GROUPS:
        print(f"  {group:6s} alone {figures[f'{group}_ms']:8.2f} ms   adds {figures[f'{group}_marginal_ms']:8.2f} ms"
              f"   share {figures[f'{group}_share']:6.1%}", flush=True)
    if torch.cuda.is_available() and not args.no_cuda:
        cuda = cuda_figures(args.cuda_iterations or (3 if args.quick else 10))
        summary.update(cuda)
        print(f"7B LLaVA (random, bf16, 336 px, checkpointing): {cuda['cuda_7b_s_per_iter']:.3f} s / iteration, "
              f"peak {cuda['cuda_7b_peak_mb']:.0f} MB", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
