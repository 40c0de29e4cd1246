"""Shared by the benchmarks: peak memory of a block of work (``grounding.memory``, also used by the
training runs' ``grounding.lightning.step_stats.StepStats``)."""

from grounding.memory import MB, PeakMemory, _status_kib  # noqa: F401
