"""Peak memory of a block of work, in this process (the benchmarks in ``bench/`` and ``StepStats``).

CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at ``start``. CPU: growth of the peak
resident set (VmHWM, reset to the current RSS through /proc/self/clear_refs; ru_maxrss growth where that
reset is unavailable, which only sees peaks above the process's earlier maximum). Run each measured
setting in a fresh process so that the peaks of different settings do not mix. MB = 10⁶ bytes.
"""

from __future__ import annotations

import resource

MB = 1e6


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakMemory:
    """``start()`` before the work, ``peak_mb()`` after it: the extra memory the work peaked at."""

    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")
        self.base = 0.0
        self.exact = False

    def start(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.exact = _reset_peak_rss()
            kib = _status_kib("VmRSS:") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.base = kib * 1024
        return self

    def peak_mb(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / MB
        kib = _status_kib("VmHWM:") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (kib * 1024 - self.base) / MB
