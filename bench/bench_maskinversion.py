"""MaskInversion wall time and peak memory: gradient decomposition vs naive second-order autograd.

    python bench/bench_maskinversion.py --quick   # ViT-B/16 size (random weights), 224 px, 5 and 20 masks, 3 iterations
    python bench/bench_maskinversion.py           # 224 and 448 px, 5 / 20 / 100 masks, 10 iterations

One timed figure = one whole ``MaskInversion(...)(image, masks)`` call: the image's forward pass, the
decomposition's per-image part (and its basis when chosen), and every iteration — the time a user
waits per image. Both modes run the same settings on the same random image and masks (rectangles and
ellipses of random size), each (size, masks, mode) in a fresh process, after an untimed warm-up call,
so that the peak-memory figures (``bench/common.py``) do not mix. ``--naive-iterations K`` times the
naive mode for K < iterations and scales the iteration part linearly (every naive iteration runs the
same operations on the same shapes); the JSON line then says ``"naive_scaled_from": K``.

Ends with one JSON line: ``{mode}_s_{size}_{masks}``, ``speedup_{size}_{masks}`` (naive / decomposed),
``peak_mb_{mode}_{size}_{masks}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PeakMemory  # noqa: E402


def random_masks(count: int, size: int, seed: int = 0):
    """``count`` masks (size × size): rectangles and ellipses covering 5-40 % of the side each way."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    for i in range(count):
        h, w = (torch.rand(2, generator=generator) * 0.35 + 0.05) * size
        cy, cx = torch.rand(2, generator=generator) * size
        if i % 2:
            masks[i] = ((ys - cy) / h) ** 2 + ((xs - cx) / w) ** 2 <= 1
        else:
            masks[i] = ((ys - cy).abs() <= h) & ((xs - cx).abs() <= w)
        masks[i, int(cy.clamp(0, size - 1)), int(cx.clamp(0, size - 1))] = True  # never empty
    return masks


def worker(args: argparse.Namespace) -> dict:
    import torch

    from grounding.models.clip import build_clip
    from grounding.models.maskinversion import MaskInversion

    device = torch.device(args.device)
    backbone = build_clip(args.model, image_size=args.size).to(device)
    if args.bf16:
        backbone = backbone.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, args.size, args.size), generator=generator, dtype=torch.uint8).to(device)
    masks = random_masks(args.masks, args.size).to(device)
    iterations = args.iterations
    if args.mode == "naive" and args.naive_iterations:
        iterations = min(iterations, args.naive_iterations)
    inverter = MaskInversion(backbone, iterations=iterations, mode=args.mode, chunk_size=args.chunk_size)
    MaskInversion(backbone, iterations=1, mode=args.mode, chunk_size=args.chunk_size)(image, masks[:2])  # warm-up

    def timed(run_iterations: int) -> float:
        inverter.iterations = run_iterations
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        inverter(image, masks)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    memory = PeakMemory(device.type).start()
    seconds = timed(iterations)
    peak = memory.peak_mb()
    for _ in range(args.repeats - 1):
        seconds = min(seconds, timed(iterations))
    result = {"seconds": seconds, "peak_mb": round(peak, 1)}
    if iterations < args.iterations:  # scale the iteration part: (t_K - t_0) per K iterations
        fixed = timed(0)
        result["seconds"] = fixed + (seconds - fixed) * args.iterations / iterations
        result["scaled_from"] = iterations
    return result


def measure(args: argparse.Namespace, size: int, masks: int, mode: str) -> dict:
    command = [
        sys.executable, __file__, "--worker", "--device", args.device, "--model", args.model,
        "--size", str(size), "--masks", str(masks), "--mode", mode, "--iterations", str(args.iterations),
        "--naive-iterations", str(args.naive_iterations or 0), "--repeats", str(args.repeats),
        "--chunk-size", str(args.chunk_size),
    ] + (["--bf16"] if args.bf16 else [])  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} at {size} px with {masks} masks failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="224 px, 5 and 20 masks, 3 iterations")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default 224 448)")
    parser.add_argument("--mask-counts", type=int, nargs="+", default=None, help="default 5 20 100")
    parser.add_argument("--iterations", type=int, default=None, help="default 10 (quick: 3)")
    parser.add_argument("--naive-iterations", type=int, default=None, help="time naive for fewer iterations and scale")
    parser.add_argument("--model", default="vit-b16-random", help="'vit-b16-random', 'tiny' or a CLIP checkpoint")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per setting (the minimum is kept)")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="run the backbone in bfloat16 (GPU)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--masks", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.iterations = args.iterations or (3 if args.quick else 10)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = args.sizes or ([224] if args.quick else [224, 448])
    counts = args.mask_counts or ([5, 20] if args.quick else [5, 20, 100])
    summary = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}",
        "model": args.model, "iterations": args.iterations, "dtype": "bf16" if args.bf16 else "fp32",
    }
    print(f"MaskInversion, {args.model}, {args.iterations} iterations, {summary['device']}")
    for size in sizes:
        for count in counts:
            row = {mode: measure(args, size, count, mode) for mode in ("decomposed", "naive")}
            for mode, r in row.items():
                summary[f"{mode}_s_{size}_{count}"] = round(r["seconds"], 3)
                summary[f"peak_mb_{mode}_{size}_{count}"] = r["peak_mb"]
                if "scaled_from" in r:
                    summary["naive_scaled_from"] = r["scaled_from"]
            speedup = row["naive"]["seconds"] / row["decomposed"]["seconds"]
            summary[f"speedup_{size}_{count}"] = round(speedup, 2)
            print(f"  {size} px, {count:3d} masks: naive {row['naive']['seconds']:8.2f} s "
                  f"(+{row['naive']['peak_mb']:.0f} MB)  decomposed {row['decomposed']['seconds']:7.2f} s "
                  f"(+{row['decomposed']['peak_mb']:.0f} MB)  speed-up {speedup:.1f}x", flush=True)  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
