"""Training order that a resumed run or another number of processes reproduces exactly.

``EpochSampler`` is a ``DistributedSampler`` (so Lightning keeps it under DDP instead of wrapping it): the
order of an epoch is a permutation drawn from (seed, epoch) alone, each process takes its share
(``order[rank::world_size]``), and it yields ``(index, epoch)`` so that the dataset can seed a sample's
augmentation from (seed, epoch, index) (``CocoDetection``). One process with batch 2b and two processes
with batch b therefore see the same images, augmented the same way, at every step.

``ResumableDataLoader`` adds Lightning's ``state_dict`` / ``load_state_dict`` interface: a checkpoint saved
in the middle of an epoch records (epoch, batches already given out), and the resumed run starts that
epoch at the next batch instead of replaying its first batches. Its ``on_batch`` sees each batch in the main
process as it is given out (the detection DataModule counts unreadable training images there).

``evaluation_sampler`` is the one way every evaluation, test and prediction loader splits its samples across
processes: each sample on exactly one process, none repeated (Lightning's default ``DistributedSampler`` pads
the last batches with copies), so every metric, prediction file and written image counts each sample once
without any deduplication downstream.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def evaluation_sampler(dataset: Dataset) -> DistributedSampler | None:
    """The evaluation share of this process: under an initialized process group of N > 1 processes, rank r
    reads samples r, r + N, r + 2N, ... in order and no sample twice (Lightning's ``UnrepeatedDistributedSampler``,
    a ``DistributedSampler``, so Lightning keeps it); None with one process (every sample, in order)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    world = torch.distributed.get_world_size()
    if world < 2:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=torch.distributed.get_rank(), shuffle=False)


class EpochSampler(DistributedSampler):
    """Shuffled (or sequential) indices of one process, as ``(index, epoch)`` pairs; see the module docstring.

    num_replicas / rank: the processes; None = the initialized process group's, or 1 / 0 without one.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None, drop_last: bool = False):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.resume_epoch: int | None = None
        self.resume_skip = 0

    def resume(self, epoch: int, skip: int) -> None:
        """In ``epoch``, leave out the first ``skip`` indices of this process (already trained on)."""
        self.resume_epoch, self.resume_skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())  # a function of (seed, epoch) alone; this rank's share
        if self.resume_epoch == self.epoch:
            indices = indices[self.resume_skip:]
        return iter([(index, self.epoch) for index in indices])


class ResumableDataLoader(DataLoader):
    """A DataLoader over an ``EpochSampler`` that Lightning can checkpoint in the middle of an epoch.

    The state is (epoch, batches given out in this epoch); loading it makes the sampler skip those batches'
    indices in that epoch. The length stays the whole epoch's, as Lightning's progress counters expect.

    on_batch: called in the main process with each batch the workers collated; it returns the batch to give
        out, or None to leave it out (it still counts as consumed, so a resume skips it too).
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, batch_size: int,
                 on_batch: Callable[[object], object | None] | None = None, **kwargs):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.on_batch = on_batch
        self._given = 0
        self._skipped_batches = 0

    def __iter__(self):
        sampler: EpochSampler = self.sampler
        self._skipped_batches = sampler.resume_skip // self.batch_size if sampler.resume_epoch == sampler.epoch else 0
        self._given = 0
        for batch in super().__iter__():
            self._given += 1
            if self.on_batch is not None:
                batch = self.on_batch(batch)
                if batch is None:
                    continue
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self._skipped_batches + self._given}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume(int(state["epoch"]), int(state["batches"]) * self.batch_size)
