"""Time and peak memory of the IMAGE importance prior (docs/image.md) at the stride-8 level.

The stride-8 level of an 800×1333 image is a 100×167 grid (N = 16,700 tokens, D = 256); a dense
N×N float32 attention matrix would need N²·4 bytes ≈ 1.1 GB per image. Two settings are measured,
each in a fresh subprocess so that their peaks do not mix:

- chunked: the exact prior on the full grid (max_tokens >= N), rows in chunks of 1024;
- pooled: the default, prior on an average-pooled grid of at most 1024 tokens, upsampled.

The input is spatially correlated (a random 1/8-resolution field upsampled bilinearly, plus
noise), and the chunked run also reports how close the pooled prior is to the exact one on it:
the Pearson correlation of the two maps and the IoU of their top-30% patches.

Peak memory is the extra over the memory held after the input was created: on CPU the peak
resident set size (VmHWM, reset through /proc/self/clear_refs; ru_maxrss delta as a fallback),
on CUDA ``torch.cuda.max_memory_allocated``. MB = 10⁶ bytes.

    python bench/bench_importance_prior.py [--quick] [--cpu-only | --cuda-only]

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MB, PeakMemory  # noqa: E402

CHUNK_SIZE = 1024
POOLED_MAX_TOKENS = 1024


def worker(args: argparse.Namespace) -> dict:
    """Measure one setting in this (fresh) process and return its figures."""
    import torch
    import torch.nn.functional as F

    from grounding.models.adaptive_masking import importance_prior, pooled_size, top_ratio_points

    device = torch.device(args.device)
    n = args.height * args.width
    max_tokens = n if args.worker == "chunked" else POOLED_MAX_TOKENS
    torch.manual_seed(0)
    # spatially correlated features, like a backbone's: a coarse random field upsampled, plus noise
    coarse = torch.randn(args.batch, args.dim, args.height // 8 + 1, args.width // 8 + 1, device=device)
    x = F.interpolate(coarse, size=(args.height, args.width), mode="bilinear", align_corners=False)
    x += 0.5 * torch.randn_like(x)

    def run():
        out = importance_prior(x, max_tokens=max_tokens, chunk_size=CHUNK_SIZE)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    importance_prior(torch.randn(1, args.dim, 8, 8, device=device))  # load kernels, thread pools
    memory = PeakMemory(device.type).start()

    start = time.perf_counter()
    imp = run()
    times = [time.perf_counter() - start]

    peak = memory.peak_mb() * MB

    for _ in range(args.repeats - 1):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)

    result = {
        "setting": args.worker,
        "device": device.type,
        "peak_mb": round(peak / MB, 1),
        "ms": round(1000 * statistics.median(times), 1),
        "grid": list(pooled_size(args.height, args.width, max_tokens)),
    }
    if args.worker == "chunked":  # how close the default pooled prior is to the exact one
        pooled = importance_prior(x, max_tokens=POOLED_MAX_TOKENS, chunk_size=CHUNK_SIZE)
        a, b = imp.flatten(1), pooled.flatten(1)
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        top_full, top_pooled = top_ratio_points(imp, 0.3), top_ratio_points(pooled, 0.3)
        iou = (top_full & top_pooled).sum((1, 2)) / (top_full | top_pooled).sum((1, 2))
        result["pooled_vs_full_corr"] = round(corr.mean().item(), 4)
        result["pooled_vs_full_top30_iou"] = round(iou.float().mean().item(), 4)
    return result


def measure(setting: str, device: str, args: argparse.Namespace) -> dict:
    """Run one setting in a fresh subprocess and parse its JSON line."""
    cmd = [
        sys.executable, __file__, "--worker", setting, "--device", device,
        "--height", str(args.height), "--width", str(args.width), "--dim", str(args.dim),
        "--batch", str(args.batch), "--repeats", str(args.repeats),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{setting} on {device} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50×84 grid, one repetition")
    parser.add_argument("--height", type=int, default=None, help="grid rows (default 100, quick 50)")
    parser.add_argument("--width", type=int, default=None, help="grid columns (default 167, quick 84)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 3, quick 1)")
    parser.add_argument("--cpu-only", action="store_true", help="skip CUDA even when available")
    parser.add_argument("--cuda-only", action="store_true", help="skip the CPU settings when CUDA is available")
    parser.add_argument("--worker", choices=["chunked", "pooled"], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.height = args.height or (50 if args.quick else 100)
    args.width = args.width or (84 if args.quick else 167)
    args.repeats = args.repeats or (1 if args.quick else 3)

    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    if args.cpu_only and args.cuda_only:
        parser.error("--cpu-only and --cuda-only exclude each other")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    if args.cuda_only and "cuda" in devices:
        devices.remove("cpu")
    n = args.height * args.width
    summary = {
        "grid": [args.height, args.width],
        "tokens": n,
        "dim": args.dim,
        "batch": args.batch,
        "chunk_size": CHUNK_SIZE,
        "dense_nxn_mb": round(n * n * 4 / MB, 1),
        "chunk_block_mb": round(min(CHUNK_SIZE, n) * n * 4 / MB, 1),
        "input_mb": round(args.batch * args.dim * n * 4 / MB, 1),
        "threads": torch.get_num_threads(),
    }
    print(f"importance prior, grid {args.height}×{args.width} (N={n}), D={args.dim}, batch {args.batch}")
    print(f"dense N×N float32 per image: {summary['dense_nxn_mb']} MB")
    for device in devices:
        prefix = "" if device == "cpu" else "cuda_"
        for setting in ("chunked", "pooled"):
            r = measure(setting, device, args)
            print(f"  {device:4s} {setting:7s} grid {r['grid'][0]}×{r['grid'][1]}: "
                  f"{r['ms']:9.1f} ms  peak +{r['peak_mb']:.1f} MB")  # fmt: skip
            summary[f"{prefix}peak_mb_{setting}"] = r["peak_mb"]
            summary[f"{prefix}ms_{setting}"] = r["ms"]
            if setting == "pooled":
                summary["pooled_grid"] = r["grid"]
            else:
                summary[f"{prefix}pooled_vs_full_corr"] = r["pooled_vs_full_corr"]
                summary[f"{prefix}pooled_vs_full_top30_iou"] = r["pooled_vs_full_top30_iou"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
