"""Every benchmark's CUDA path in one command, within 8 minutes on one H100 / H200 (random weights throughout).

    python bench/gpu_suite.py                        # on a CUDA machine: the GPU figures (< 8 minutes)
    python bench/gpu_suite.py --dry-run              # the same wiring on the CPU at --quick or smaller sizes
    python bench/gpu_suite.py --only gem mimic       # a subset (names below); --list prints the plan
    python bench/gpu_suite.py --out DIR/gpu_suite.json

Each entry runs as its own subprocess (its own process group, so that a bench and the fresh processes it starts
for its memory figures end together) under its own time limit. The limits add up to 465 s; what an entry leaves
unused passes on to the next ones, and none can run past the sum. After every entry the suite rewrites, each
atomically, ``bench_results/gpu_suite.json`` (the machine, the command, the git commit, the date, and per entry
its command, status, seconds, limit and figures: the last JSON line of its stdout; for a failure its exit code
and the last lines of its stderr; for a timeout what it had printed, and as ``partial_figures`` its last JSON
line, from a bench that prints its figures as it goes) and ``gpu_suite.md`` beside it (one section
per entry, ready to paste into BENCHMARKS.md). A failed or timed-out entry is recorded and the suite goes on.
stdout: one JSON line per entry, then the suite's summary line; progress goes to stderr.

Entries, in run order (GPU settings; limit in seconds):

=======================  =====  ==========================================================================
entry                    limit  what it measures
=======================  =====  ==========================================================================
masking_overhead           50   IMAGE: Grounding DINO at Swin-T sizes, 800x1333, batch 2, bf16 autocast:
                                median training-step time with RF-GAM masking vs without (20 interleaved
                                steps after 3 warm-up; target <= 5 %) and each variant's peak
                                ``max_memory_allocated`` in a fresh process (target <= 50 MB extra).
training_throughput_b2     70   IMAGE: images/s of plain / IMAGE / CDN (number 100) / IMAGE + CDN training
                                steps, same model and input, batch 2 (8 timed steps each, interleaved) and
                                the peak memory of each in a fresh process (target <= 8.5 GB).
training_throughput_b8     70   the same at batch 8 (5 timed steps; peak memory of plain and IMAGE + CDN
                                only; target >= 10 images/s). Its own entry, so that batch 2 is kept
                                should batch 8 fail or run out of time.
maskinversion              45   ViT-B/16 sizes, 448 px, 5 and 100 masks, 10 iterations, fp32: one whole
                                ``MaskInversion`` call, gradient decomposition vs naive second-order
                                autograd (naive timed over 2 iterations, scaled to 10), each setting in a
                                fresh process, best of 3 calls (targets: <= 0.15 s at 100 masks; >= 5x
                                naive at 100 masks, not slower at 5).
gem                        25   ViT-B/16, bf16: images/s of GEM, plain CLIP, MaskCLIP, CLIPSurgery, SCLIP,
                                ClearCLIP and NACLIP, whole 448 px images at batch 32 and the 336 / 224 /
                                112 sliding-window preset on 8 images (best of 3 rounds), each over plain
                                CLIP's, and FLOPs per image (target: GEM >= 150 images/s).
mimic                      45   the tiny model's per-term CPU costs (10 repetitions), then a random LLaVA
                                of LLaVA-1.5-7B's sizes at full depth (32 language layers of width 4096,
                                24 vision layers), bf16, 336 px, gradient checkpointing, ResNet-50 for R_V:
                                seconds per synthesis iteration over 10 iterations after one warm-up, and
                                the peak memory (target: 500 iterations in <= 2 minutes, 0.24 s each).
invseg                     55   InvSeg at Stable Diffusion 2.1-base's sizes (UNet 866 M, VAE 84 M, ViT-H
                                text encoder 340 M parameters), bf16, 512 px: the 15-step adaptation of
                                one image with attention captured at 16x16 only vs in every layer (median
                                of 2 after a one-step warm-up, each variant in a fresh process) and their
                                peak memory (the paper: 7.9 s per image on an H100).
predict                    25   the tiny detector and GEM of the synthetic configs on 128 synthetic 320 px
                                images: images/s of grounding-predict against transformers' own loop, the
                                public GEM code's loop (gem_torch, where installed) and the plain
                                DenseSimilarity loop (target: ratio >= 1).
vocabulary                 25   Swin-T sizes, 800x1333, batch 2, bf16: evaluation images/s at 80 and 1,203
                                category names, the image backbone once per batch vs once per prompt, the
                                text encoder once per prompt vs once per image and prompt.
importance_prior           25   IMAGE's importance prior on the stride-8 grid of 800x1333 (100x167 =
                                16,700 tokens, D 256, batch 2) on CUDA: exact chunked vs pooled (default),
                                median time of 3 and peak memory, each in a fresh process.
finetune_memory            30   IMAGE at Swin-T sizes, 800x1333, bf16 autocast, batch 2, 4 and 8: peak
                                ``max_memory_allocated`` and time of one training step (IMAGE masking, CDN
                                100, AdamW) with full fine-tuning, a frozen backbone, gradient
                                checkpointing and LoRA r 16 (when present), one process, ratios to full
                                fine-tuning (goal: checkpointing <= 0.6x its peak).
=======================  =====  ==========================================================================

Why these sizes fit (estimates from the arithmetic, the figures above are what measures them). Each process
spends a few seconds importing and building its model, so the entries are bounded by process starts as much as
by arithmetic: the two throughput entries start 4 and 2 memory
processes (about 10 s each: import, a Swin-T Grounding DINO built on the CPU, a warm-up step) besides their
timed steps (a bf16 Swin-T step at 800x1333 is a fraction of a second at batch 2, about a second at batch 8).
MIMIC's 7B model holds 7.1 B frozen parameters, about 14 GB in bf16, built directly on the GPU; no weight
gradients are kept and checkpointing keeps its activations small, so it fits an 80 GB H100 with room. One
iteration is a forward and a backward to the pixels through every layer plus the recomputation, about four
forwards of ~600 tokens (576 image tokens and the prompt): ~35 TFLOP, a fraction of a second, so all 32
layers run and 11 iterations take seconds. An InvSeg step at SD 2.1-base's sizes (one UNet pass on 2 views at
512 px and its backward) is a fraction of a second, so the 31 steps of a variant take seconds; its "every layer"
variant keeps the 64x64 self-attention probabilities in float32 for the backward pass (a few GB).

``--dry-run`` runs every entry on the CPU (``CUDA_VISIBLE_DEVICES`` emptied; one thread per process unless
``OMP_NUM_THREADS`` says otherwise) with the GPU arguments followed by ``--quick`` and smaller sizes (argparse
keeps the last value of an option, so the GPU arguments are parsed and checked too): 2.5 to 3 minutes on a busy
2-core CPU (about 130 CPU seconds, mostly the 20 process start-ups). Its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a plain checkout

from grounding.utils import write_atomic  # noqa: E402

DEFAULT_OUT = REPO / "bench_results" / "gpu_suite.json"
TOTAL_LIMIT_S = 480  # the suite's bound; the entries' limits add up to less, for start-up and the last kill
KILL_GRACE_S = 3.0  # between SIGTERM and SIGKILL of a timed-out entry's process group
DRY_LIMIT_S = 240.0  # per entry in a dry run: a safety net only
TAIL_LINES = 20


@dataclass(frozen=True)
class Bench:
    """One entry of the suite: ``script`` run with ``gpu_args`` (then ``dry_args`` in a dry run)."""

    name: str
    title: str
    script: str
    gpu_args: tuple[str, ...]
    dry_args: tuple[str, ...]
    limit_s: float
    measures: str


BENCHES: tuple[Bench, ...] = (
    Bench("masking_overhead", "IMAGE: masking overhead", "bench_masking_overhead.py",
          ("--batch", "2", "--steps", "20", "--warmup", "3"),
          ("--quick", "--batch", "1", "--steps", "1", "--warmup", "0"), 50,
          "Grounding DINO at Swin-T sizes (random weights), 800×1333, batch 2, bf16 autocast: median training-step "
          "time with RF-GAM masking vs without (20 interleaved steps; target ≤ 5 %), peak memory of each in a fresh "
          "process (target ≤ 50 MB extra)."),
    Bench("training_throughput_b2", "IMAGE: training throughput, batch 2", "bench_training_throughput.py",
          ("--batches", "2", "--steps", "8", "--warmup", "2"),
          ("--quick", "--batches", "1", "--steps", "1", "--warmup", "0", "--memory-variants", "plain"), 70,
          "Images/s of plain / IMAGE / CDN (number 100) / IMAGE + CDN training steps at Swin-T sizes, 800×1333, "
          "bf16 autocast, batch 2 (8 timed steps each, interleaved); peak memory of each in a fresh process "
          "(target ≤ 8.5 GB)."),
    Bench("training_throughput_b8", "IMAGE: training throughput, batch 8", "bench_training_throughput.py",
          ("--batches", "8", "--steps", "5", "--warmup", "2", "--memory-variants", "plain", "image_cdn"),
          ("--quick", "--batches", "1", "--steps", "1", "--warmup", "0", "--memory-variants", "plain"), 70,
          "The same at batch 8 (5 timed steps; peak memory of plain and IMAGE + CDN only; target ≥ 10 images/s)."),
    Bench("maskinversion", "MaskInversion: decomposition vs naive", "bench_maskinversion.py",
          ("--sizes", "448", "--mask-counts", "5", "100", "--iterations", "10", "--naive-iterations", "2",
           "--repeats", "3"),
          ("--quick", "--model", "tiny", "--sizes", "64", "--mask-counts", "5", "--iterations", "2",
           "--naive-iterations", "1", "--repeats", "1"), 45,
          "ViT-B/16 sizes (random weights), 448 px, 5 and 100 masks, 10 iterations, fp32: one whole MaskInversion "
          "call, decomposed vs naive (naive timed over 2 iterations and scaled to 10), each in a fresh process, "
          "best of 3 (targets: ≤ 0.15 s at 100 masks; ≥ 5× naive at 100 masks, not slower at 5)."),
    Bench("gem", "GEM: throughput", "bench_gem.py",
          ("--size", "448", "--batch", "32", "--rounds", "3"),
          ("--quick", "--size", "64", "--batch", "1", "--rounds", "1", "--slide", "96", "64", "32"), 25,
          "ViT-B/16 (random weights), bf16: images/s of GEM, plain CLIP, MaskCLIP, CLIPSurgery, SCLIP, ClearCLIP and "
          "NACLIP, whole 448 px images at batch 32 and the 336 / 224 / 112 sliding-window preset on 8 images (best "
          "of 3 rounds), each over plain CLIP's (<method>_vs_plain, slide_<method>_vs_plain), and FLOPs per image "
          "(target: GEM ≥ 150 images/s)."),
    Bench("mimic", "MIMIC: 7B LLaVA seconds per iteration", "bench_mimic.py",
          ("--repeats", "10", "--cuda-iterations", "10"),
          ("--quick", "--repeats", "2"), 45,
          "Per-term costs on the tiny model (CPU, 10 repetitions), then a random LLaVA of LLaVA-1.5-7B's sizes "
          "(all 32 language layers), bf16, 336 px, gradient checkpointing, ResNet-50 for R_V: seconds per "
          "iteration over 10 after one warm-up, peak memory (target: 500 iterations in ≤ 2 minutes)."),
    Bench("invseg", "InvSeg: attention capture at SD 2.1-base sizes", "bench_invseg_capture.py",
          ("--model", "sd21-base", "--dtype", "bfloat16"),
          ("--quick", "--model", "reduced", "--image-size", "128", "--steps", "1", "--repeats", "1"), 55,
          "Stable Diffusion 2.1-base's sizes (random weights), bf16, 512 px: seconds of the 15-step adaptation of "
          "one image, capture at 16×16 only vs in every layer (median of 2, each variant in a fresh process), "
          "peak memory of each (the paper: 7.9 s per image on an H100)."),
    Bench("predict", "grounding-predict against transformers' own loop", "bench_predict.py",
          ("--images", "128", "--size", "320", "--rounds", "1", "--batch_size", "8", "--also_batch", "1", "--top_k", "10",
           "--threads", "0", "--num_workers", "4", "--paired_passes", "0"),
          ("--quick", "--images", "8", "--size", "96", "--rounds", "1"), 25,
          "The tiny detector and GEM of the synthetic configs on 128 synthetic 320 px images (one round; the "
          "detector's figures are printed before GEM's, so a timeout keeps them): images/s of "
          "grounding-predict (batch 8 and 1, 4 loader workers, every output written) against transformers' processor + model + "
          "post-processing loop, the public GEM code's loop (gem_torch's GEMWrapper, where installed) and the plain "
          "DenseSimilarity loop, one image at a time (target: ratio ≥ 1)."),
    Bench("vocabulary", "IMAGE: evaluation cost against the vocabulary", "bench_vocabulary.py",
          (), ("--quick", "--counts", "80"), 25,
          "Grounding DINO at Swin-T sizes (random weights), 800×1333, batch 2, bf16: evaluation images/s at 80 and "
          "1,203 category names (2 and about 25 prompts of 256 tokens), the image backbone once per batch vs once "
          "per prompt, the text encoder once per prompt vs once per image and prompt (3 batches each, interleaved), "
          "and that every path gives the same detections."),
    Bench("importance_prior", "IMAGE: importance prior at the stride-8 grid", "bench_importance_prior.py",
          ("--cuda-only",),
          ("--quick", "--height", "25", "--width", "42"), 25,
          "The importance prior on the stride-8 grid of 800×1333 (16,700 tokens, D 256, batch 2) on CUDA: exact "
          "chunked vs pooled (default), median time of 3 and peak memory, each in a fresh process."),
    Bench("finetune_memory", "IMAGE: fine-tuning memory (frozen backbone, checkpointing, LoRA)", "bench_finetune_memory.py",
          ("--batches", "2", "4", "8", "--steps", "1", "--warmup", "1"),
          ("--quick", "--batches", "1", "--steps", "1", "--warmup", "0", "--variants", "full", "checkpointing"), 30,
          "Grounding DINO at Swin-T sizes (random weights), 800×1333, bf16 autocast, batch 2, 4 and 8: peak "
          "max_memory_allocated and time of one training step (IMAGE masking, CDN 100, AdamW) with full fine-tuning, "
          "a frozen backbone, gradient checkpointing and LoRA r 16 (when present), ratios to full fine-tuning "
          "(goal: checkpointing ≤ 0.6× the peak of full fine-tuning)."),
)
NAMES = [bench.name for bench in BENCHES]
assert sum(bench.limit_s for bench in BENCHES) <= TOTAL_LIMIT_S - 15


@dataclass(frozen=True)
class Entry:
    """What ``run_suite`` runs: a command line, its time limit and the words that describe it."""

    name: str
    title: str
    command: tuple[str, ...]
    display: str  # the command as a user would type it
    limit_s: float
    measures: str = ""


def plan(names: Sequence[str] | None = None, dry_run: bool = False) -> list[Entry]:
    """The entries to run, in the suite's order: all, or those named."""
    entries = []
    for bench in BENCHES:
        if names and bench.name not in names:
            continue
        args = bench.gpu_args + (bench.dry_args if dry_run else ())
        display = shlex.join(["python", f"bench/{bench.script}", *args])
        entries.append(Entry(bench.name, bench.title, (sys.executable, str(REPO / "bench" / bench.script), *args),
                             display, DRY_LIMIT_S if dry_run else bench.limit_s, bench.measures))
    return entries


# ------------------------------------------------------------------------------------------ the machine
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def git_commit() -> dict:
    """``git rev-parse --short HEAD`` and whether tracked files differ from it (None when git is unavailable)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "uncommitted_changes": None if status is None else bool(status)}


def machine(dry_run: bool) -> dict:
    """The GPU (``torch.cuda.get_device_name``), library versions and the CPU."""
    info = {"gpu": None, "gpu_count": 0, "cuda": None}
    if not dry_run:
        import torch

        info.update(gpu=torch.cuda.get_device_name(), gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda)
    info.update({"torch": _version("torch"), "transformers": _version("transformers"), "diffusers": _version("diffusers"),
                 "python": platform.python_version(), "cpu": _cpu_model(), "cpu_count": os.cpu_count()})
    return info


# ------------------------------------------------------------------------------------------ running
def _tail(text: str, lines: int = TAIL_LINES) -> list[str]:
    return [line[:400] for line in text.strip().splitlines()[-lines:]] if text.strip() else []


def last_json(stdout: str) -> dict | None:
    """The last line of ``stdout`` that is a JSON object (the benches end with one)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of the finished processes this one waited for, theirs included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_entry(entry: Entry, limit_s: float, env: dict | None = None) -> dict:
    """Run one entry in its own process group; its record (status ok / failed / timeout, seconds, figures...)."""
    start, used = time.monotonic(), _children_cpu_s()
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    process = subprocess.Popen(entry.command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, errors="replace", **group)
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=max(limit_s, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal_group(process, signal.SIGTERM)  # the bench and the processes it started
        try:
            stdout, stderr = process.communicate(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            stdout = stderr = None
        _signal_group(process, signal.SIGKILL)  # whatever of the group outlived the grace
        if stdout is None:
            try:
                stdout, stderr = process.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # a process outside the group holds its pipes: give up on them
                process.kill()
                stdout, stderr = "", "(its output pipes stayed open after the kill)"
    except BaseException:  # interrupted: leave nothing of this entry running
        _signal_group(process, signal.SIGKILL)
        process.wait()
        raise
    seconds = round(time.monotonic() - start, 1)
    figures = last_json(stdout)
    record: dict = {"status": "ok", "seconds": seconds, "cpu_s": round(_children_cpu_s() - used, 1),
                    "allowed_s": round(limit_s, 1), "returncode": process.returncode}
    if timed_out:
        record.update(status="timeout", error=f"no result within its limit of {limit_s:.0f} s")
    elif process.returncode != 0:
        record.update(status="failed", error=f"exit code {process.returncode}")
    elif figures is None:
        record.update(status="failed", error="exit code 0 but no JSON line on stdout")
    if figures is not None and record["status"] == "ok":
        record["figures"] = figures
    else:
        if figures is not None:  # a bench that prints its figures as it goes: what it had when it stopped
            record["partial_figures"] = figures
        record["stdout_tail"] = _tail(stdout, 10)
        record["stderr_tail"] = _tail(stderr)
    return record


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` through ``grounding.utils.write_atomic``, readable as a plain new file would be."""
    umask = os.umask(0)
    os.umask(umask)

    def write(temporary: str) -> None:
        with open(temporary, "w") as f:
            f.write(text)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's files are private

    write_atomic(path, write)


def run_suite(entries: Sequence[Entry], out: str | Path, mode: str = "gpu", info: dict | None = None,
              invocation: str = "python bench/gpu_suite.py", env: dict | None = None,
              emit: Callable[[str], None] | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Run ``entries`` one after another; rewrite ``out`` (JSON) and its ``.md`` beside it after each.

    Entry i may run until the sum of the limits of entries 0..i has passed since the start (its ``allowed_s``),
    so that time an entry leaves unused passes on and the suite never runs past the sum (plus the last kill's
    grace). A failure or timeout is recorded and the next entry runs. ``emit`` receives one JSON line per entry,
    then the summary line (default: stdout); ``progress`` a line of news before and after each (default: stderr).
    """
    emit = emit or (lambda line: print(line, flush=True))
    progress = progress or (lambda line: print(f"[gpu_suite] {line}", file=sys.stderr, flush=True))
    out = Path(out)
    markdown = out.with_suffix(".md")
    document = {
        "suite": "bench/gpu_suite.py", "mode": mode, "command": invocation, **git_commit(),
        "started": _now(), "finished": None, "machine": info or {},
        "total_limit_s": round(sum(e.limit_s for e in entries), 1),
        "benches": {e.name: {"title": e.title, "measures": e.measures, "command": e.display, "status": "pending",
                             "limit_s": e.limit_s} for e in entries},
    }

    def save() -> None:
        _write_text(out, json.dumps(document, indent=1) + "\n")
        _write_text(markdown, render_markdown(document))

    save()
    start = time.monotonic()
    deadline = start
    for entry in entries:
        deadline += entry.limit_s
        limit = deadline - time.monotonic()
        record = document["benches"][entry.name]
        if limit < 1:
            record.update(status="skipped", error="no time left in the suite's budget")
        else:
            record.update(status="running", started=_now())
            save()
            progress(f"{entry.name}: running, limit {limit:.0f} s: {entry.display}")
            try:
                record.update(run_entry(entry, limit, env))
            except BaseException:  # SIGTERM or Ctrl-C: the entry was ended; say so, then stop
                record.update(status="interrupted", error="the suite was interrupted")
                save()
                raise
            record.pop("started", None)
        progress(f"{entry.name}: {record['status']} in {record.get('seconds', 0)} s ({record.get('cpu_s', 0)} CPU s)"
                 + (f" ({record['error']})" if "error" in record else ""))
        if record["status"] != "ok" and record.get("stderr_tail"):
            progress(f"{entry.name}: stderr ends: " + " | ".join(record["stderr_tail"][-3:])[-600:])
        save()
        line = {"bench": entry.name, "status": record["status"], "seconds": record.get("seconds"),
                "cpu_s": record.get("cpu_s")}
        line.update({"figures": record["figures"]} if "figures" in record else
                    {"returncode": record.get("returncode"), "error": record.get("error")})
        emit(json.dumps(line))
    benches = document["benches"]
    document["finished"] = _now()
    document["seconds"] = round(time.monotonic() - start, 1)
    save()
    summary = {"suite": "gpu_suite", "mode": mode, "gpu": (info or {}).get("gpu"), "commit": document["commit"],
               "seconds": document["seconds"]}
    for status in ("ok", "failed", "timeout", "skipped"):
        summary[status] = [name for name, r in benches.items() if r["status"] == status]
    summary.update(json=str(out), markdown=str(markdown))
    emit(json.dumps(summary))
    return document


# ------------------------------------------------------------------------------------------ Markdown
def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|")


def render_markdown(document: dict) -> str:
    """The results as a BENCHMARKS.md section: the machine, the command, the commit, the date, then per entry its
    command, status and a table of its figures (or why it has none)."""
    info = document.get("machine", {})
    dry = document["mode"] == "dry-run"
    where = "CPU dry run (`--dry-run`: wiring only, not GPU figures)" if dry else (info.get("gpu") or "GPU")
    date = (document.get("started") or "")[:10]
    lines = [f"## GPU suite: `{document['command']}` — {where}, {date}", ""]
    device = f"{info['gpu']} ({info.get('gpu_count')} visible, CUDA {info.get('cuda')})" if info.get("gpu") else "no GPU"
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "transformers", "diffusers", "python") if info.get(k))
    lines.append(f"Machine: {device}; CPU: {info.get('cpu')} × {info.get('cpu_count')}; {versions}.")
    commit = document.get("commit") or "unknown"
    if document.get("uncommitted_changes"):
        commit += " (with uncommitted changes)"
    finished = f", finished {document['finished']} ({document['seconds']} s)" if document.get("finished") else " (running)"
    lines += [f"Commit {commit}; started {document.get('started')}{finished}. Random weights throughout; each "
              "bench in its own process under its own time limit.", ""]
    lines += ["| bench | status | seconds | CPU seconds | limit (s) |", "| --- | --- | ---: | ---: | ---: |"]
    for name, r in document["benches"].items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {r.get('cpu_s', '')} | {r.get('limit_s', '')} |")
    for name, record in document["benches"].items():
        lines += ["", f"### {name}: {record['title']}", ""]
        if record.get("measures"):
            lines += [record["measures"], ""]
        lines.append(f"Command: `{record['command']}`: **{record['status']}**"
                     + (f" in {record['seconds']} s" if "seconds" in record else "")
                     + (f" ({record['error']})" if record.get("error") else "") + ".")
        for key, heading in (("figures", ""), ("partial_figures", "Its last JSON line before it stopped (partial):")):
            if key in record:
                lines += ["", heading] if heading else []
                lines += ["", "| figure | value |", "| --- | ---: |"]
                lines += [f"| {_cell(name)} | {_cell(value)} |" for name, value in record[key].items()]
                lines += ["", f"JSON line: `{json.dumps(record[key])}`"]
        for key, label in (("stdout_tail", "stdout"), ("stderr_tail", "stderr")):
            if record.get(key):
                lines += ["", f"Last lines of {label}:", "", "```", *record[key], "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="entries: " + ", ".join(NAMES))
    parser.add_argument("--dry-run", action="store_true",
                        help="run the same wiring on the CPU at --quick or smaller sizes (figures meaningless)")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help="run only these entries")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="the JSON file (the Markdown goes beside it, .md); default bench_results/gpu_suite.json")
    parser.add_argument("--list", action="store_true", help="print the plan (commands, limits) and exit")
    args = parser.parse_args(argv)
    entries = plan(args.only, args.dry_run)
    if args.list:
        for entry in entries:
            print(json.dumps({"bench": entry.name, "limit_s": entry.limit_s, "command": entry.display}))
        return 0

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths, even on a GPU machine
        env.setdefault("OMP_NUM_THREADS", "1")  # its figures are not the point; threads on a busy CPU only spin
    else:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here: the GPU suite needs one (--dry-run runs the wiring on the CPU)")
    invocation = shlex.join(["python", "bench/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)])
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run_entry's cleanup runs on SIGTERM too
    try:
        document = run_suite(entries, args.out, "dry-run" if args.dry_run else "gpu", machine(args.dry_run),
                             invocation, env)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if all(r["status"] == "ok" for r in document["benches"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
