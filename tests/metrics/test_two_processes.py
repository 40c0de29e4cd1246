"""Every metric over two gloo processes equals the same metric over one: one pair of spawned processes runs
each metric's share (``distributed_part`` of its test module: the evaluation sampler's share of the samples,
and a metric only rank 0 updates), then each module's ``check_distributed`` compares with one process."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PARTS = {
    "segmentation": "tests.metrics.test_segmentation",
    "points": "tests.metrics.test_point_miou",
    "grounding": "tests.metrics.test_grounding_metrics",
}


def _worker(rank: int, init_file: str, out_file: str, folder) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {name: importlib.import_module(module).distributed_part(rank, folder) for name, module in PARTS.items()}
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_processes")
    for module in PARTS.values():
        prepare = getattr(importlib.import_module(module), "prepare_distributed", None)
        if prepare is not None:
            prepare(folder)
    # spawned, not forked: a fork of a process whose OpenMP / gloo threads already ran can deadlock (it did in
    # the full suite); one pair of processes for every metric, since each spawn imports torch afresh
    mp.start_processes(_worker, args=(str(folder / "init"), str(folder / "out.pt"), folder), nprocs=2, join=True,
                       start_method="spawn")
    return folder, torch.load(folder / "out.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PARTS))
def test_two_processes_equal_one(synced, name):
    folder, results = synced
    importlib.import_module(PARTS[name]).check_distributed(results[name], folder)
