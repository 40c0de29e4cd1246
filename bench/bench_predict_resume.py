"""grounding-predict on one and two processes, killed half-way and resumed: the same outputs every way.

    python bench/bench_predict_resume.py --quick   # 60 synthetic 96 px images
    python bench/bench_predict_resume.py           # 500 images (a few minutes on 2 CPU cores)

GEM (``configs/gem/synthetic.yaml``) over a folder of synthetic images, each run ``python predict.py`` in its
own process tree, each into a fresh ``--out`` folder:

(a) one process (``--trainer.devices 1``);
(b) two CPU processes (``--trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp_spawn``):
    predictions.json and every label map must equal (a)'s (pixel by pixel; identical bytes are counted too),
    and both must have written the same PNG files. Lightning gives each of the N processes cores / N torch
    threads; (a) gets as many (``--one_process_threads``), since another thread count sums the similarity
    maps in another order: with torch's own choice (0) about one heatmap picture in twenty differed from
    (b)'s by one grey level in a few pixels on 2 cores (the label maps did not);
(c) the command of (b) again, its whole process group killed (SIGKILL by default) once about half of the
    records exist (``records/`` polled); it must exit non-zero and every record it left must be complete
    (the record and every file it names). The same command then resumes: it must exit 0, predict exactly the
    images without a record, leave the records that existed untouched (their mtimes) and end with a
    predictions.json equal to (a)'s. The temporary files of writes the kill cut short (``.NAME.XXXX.tmp``) are
    counted (``stray_temp_files_*``), not checked: nothing removes them.

Prints one JSON line (images, seconds of each run, same_two_processes, killed_at, redone_after_kill,
resumed_predicted, final_equal, ...) and exits with status 1 when a check fails (``failed`` names them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from grounding.data.image_folder import complete_record  # noqa: E402
from grounding.data.synthetic import SyntheticConfig, generate  # noqa: E402

CLASSES = "background, red circle, blue square, green triangle"
TWO_PROCESSES = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"]


def command(folder: Path, out: Path, root: Path, devices: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "predict.py"), "--config", str(REPO / "configs" / "gem" / "synthetic.yaml"),
            "--inputs", str(folder), "--classes", CLASSES, "--out", str(out), "--trainer.logger", "false",
            "--progress.mode", "never", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
            *devices]


def environment() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def run(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, dict]:
    """Run to the end; (seconds, the summary line). A non-zero exit ends the bench with its log's tail."""
    start = time.perf_counter()
    with open(log, "w") as stderr:
        done = subprocess.run(cmd, cwd=REPO, env={**environment(), **(env or {})}, stdout=subprocess.PIPE, stderr=stderr,
                              text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{log.read_text()[-3000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def records(out: Path) -> list[Path]:
    folder = out / "records"
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def stray_files(out: Path) -> int:
    """Temporary files of interrupted atomic writes (``.NAME.XXXX.tmp``) anywhere in ``out``."""
    return sum(1 for path in out.rglob(".*.tmp") if path.is_file()) if out.is_dir() else 0


def kill_when(cmd: list[str], out: Path, log: Path, count: int, signum: int) -> tuple[float, int, int]:
    """Start ``cmd`` in its own process group, kill the group once ``count`` records exist; (seconds, records
    present when the signal was sent, exit status)."""
    start = time.perf_counter()
    with open(log, "w") as stderr:
        process = subprocess.Popen(cmd, cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=stderr,
                                   start_new_session=True)
    seen = 0
    while process.poll() is None:
        seen = len(records(out))
        if seen >= count:
            os.killpg(process.pid, signum)
            break
        time.sleep(0.05)
    status = process.wait(timeout=600)
    deadline = time.time() + 30
    while time.time() < deadline:  # every process of the group gone (the spawned workers too)
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(process.pid, signal.SIGKILL)
    return time.perf_counter() - start, seen, status


def compare_pngs(first: Path, second: Path) -> dict:
    """The PNGs of two output folders: how many are the same bytes; label maps also pixel by pixel; the largest
    pixel difference of the others (heatmaps, overlays)."""
    from PIL import Image

    def pixels(path: Path) -> np.ndarray:
        return np.array(Image.open(path)).astype(np.int64)

    pngs = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    present = [p for p in pngs if (second / p).is_file()]
    differ = [p for p in present if (first / p).read_bytes() != (second / p).read_bytes()]
    labels = [p for p in pngs if p.parts[0] == "labels"]
    return {
        "pngs": len(pngs),
        "pngs_byte_equal": len(present) - len(differ),
        "label_pngs": len(labels),
        "label_pngs_byte_equal": sum(1 for p in labels if p in present and p not in differ),
        "label_pngs_pixel_equal": sum(1 for p in labels
                                      if p in present and np.array_equal(pixels(first / p), pixels(second / p))),
        "other_pngs_max_pixel_diff": max((int(np.abs(pixels(first / p) - pixels(second / p)).max()) for p in differ
                                          if p.parts[0] != "labels"), default=0),
        "pngs_missing": len(pngs) - len(present),
        "pngs_extra": sum(1 for p in second.rglob("*.png") if not (first / p.relative_to(second)).is_file()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 images")
    parser.add_argument("--images", type=int, default=None, help="synthetic images (default 500; quick 60)")
    parser.add_argument("--size", type=int, default=96, help="side of the synthetic images in pixels (default 96)")
    parser.add_argument("--kill_fraction", type=float, default=0.5, help="kill (c) once this fraction of the records exists")
    parser.add_argument("--signal", choices=["KILL", "TERM", "INT"], default="KILL", help="sent to (c)'s process group")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="the runs are CPU processes (two on one machine)")
    parser.add_argument("--one_process_threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="OMP_NUM_THREADS of (a) (default: cores / 2, what Lightning gives each of the two "
                             "processes of (b) and (c); 0: torch's own choice)")
    parser.add_argument("--workdir", default=None, help="keep the images and outputs here (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="also write the JSON figures to this file")
    args = parser.parse_args()
    images = args.images or (60 if args.quick else 500)

    with tempfile.TemporaryDirectory(prefix="bench_predict_resume_") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        root = generate(work / "data", SyntheticConfig(image_size=args.size, num_train=0, num_val=images, num_test=0, seed=11),
                        overwrite=True)
        folder = root / "images" / "val"
        assert len(list(folder.glob("*.jpg"))) == images
        one, two, cut = work / "one", work / "two", work / "cut"
        for stale in (one, two, cut):  # a kept --workdir: earlier outputs would be skipped as done
            shutil.rmtree(stale, ignore_errors=True)
        figures: dict = {"images": images, "image_px": args.size, "one_process_threads": args.one_process_threads}
        failed: list[str] = []

        # (a) one process, (b) two processes
        one_process = ["--trainer.accelerator", args.device, "--trainer.devices", "1"]
        seconds, summary = run(command(folder, one, work / "root_one", one_process), work / "one.log",
                               {"OMP_NUM_THREADS": str(args.one_process_threads)} if args.one_process_threads else None)
        figures["seconds_one_process"] = round(seconds, 2)
        if summary["predicted"] != images:
            failed.append(f"one process predicted {summary['predicted']} of {images}")
        seconds, summary = run(command(folder, two, work / "root_two", TWO_PROCESSES), work / "two.log")
        figures["seconds_two_processes"] = round(seconds, 2)
        if summary["predicted"] != images:
            failed.append(f"two processes predicted {summary['predicted']} of {images}")
        reference = json.loads((one / "predictions.json").read_text())
        figures["same_two_processes"] = json.loads((two / "predictions.json").read_text()) == reference
        pngs = compare_pngs(one, two)
        figures.update(pngs)
        if not figures["same_two_processes"]:
            failed.append("predictions.json of two processes differs from one process's")
        if pngs["label_pngs_pixel_equal"] != pngs["label_pngs"] or pngs["label_pngs"] != images:
            failed.append("the label maps of two processes differ from one process's")
        if pngs["pngs_missing"] or pngs["pngs_extra"]:
            failed.append("two processes wrote other PNG files than one process")

        # (c) killed half-way, then resumed
        cmd = command(folder, cut, work / "root_cut", TWO_PROCESSES)
        target = max(1, round(images * args.kill_fraction))
        seconds, seen, status = kill_when(cmd, cut, work / "cut.log", target, getattr(signal, f"SIG{args.signal}"))
        present = records(cut)
        figures.update({"seconds_killed_run": round(seconds, 2), "kill_signal": args.signal, "kill_sent_at_records": seen,
                        "killed_exit_status": status, "killed_at": len(present), "stray_temp_files_after_kill": stray_files(cut)})
        if status == 0:
            failed.append("the killed run exited 0 (it ended before the kill)" if seen < target else "the killed run exited 0")
        incomplete = [p.stem for p in present if complete_record(cut, p.stem) is None]
        figures["incomplete_records_after_kill"] = len(incomplete)
        if incomplete:
            failed.append(f"records left incomplete by the kill: {incomplete[:5]}")
        before = {p.name: p.stat().st_mtime_ns for p in present}
        seconds, summary = run(cmd, work / "resumed.log")
        after = {p.name: p.stat().st_mtime_ns for p in records(cut)}
        redone = sorted(name for name, mtime in before.items() if after.get(name) != mtime)
        figures.update({"seconds_resumed": round(seconds, 2), "redone_after_kill": len(redone),
                        "resumed_predicted": summary["predicted"], "resumed_skipped_existing": summary["skipped_existing"],
                        "stray_temp_files_after_resume": stray_files(cut)})
        if redone:
            failed.append(f"records rewritten by the resumed run: {redone[:5]}")
        if (summary["predicted"], summary["skipped_existing"]) != (images - len(present), len(present)):
            failed.append(f"the resumed run predicted {summary['predicted']} and skipped {summary['skipped_existing']}, "
                          f"expected {images - len(present)} and {len(present)}")
        figures["final_equal"] = json.loads((cut / "predictions.json").read_text()) == reference
        if not figures["final_equal"]:
            failed.append("predictions.json after resuming differs from one process's")
        figures["failed"] = failed
    line = json.dumps(figures)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line, flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
