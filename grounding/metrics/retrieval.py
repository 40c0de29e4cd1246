"""Retrieval accuracy (Acc@1) of region embeddings, gathered across processes.

``top1_correct`` scores one image's regions: the cosine of each region embedding with every candidate
text embedding, the top-1 candidate, and whether it is one of the region's right answers.
``RetrievalAccuracy`` is a torchmetrics ``Metric`` over (region key, correct) pairs: ``compute`` gathers
all processes' pairs, drops the copies of regions that a distributed sampler evaluated twice (it pads the
last batch by repeating samples), and returns the mean.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def region_key(image_id: str | int, region_id: str | int) -> int:
    """A stable signed 64-bit key of ``"image_id/region_id"`` (the same on every process and run)."""
    digest = hashlib.blake2b(f"{image_id}/{region_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def top1_correct(embeddings: torch.Tensor, candidates: torch.Tensor, targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """(R,) bool: is the candidate (C, P) with the highest cosine to region r's embedding (R, P) in targets[r]?"""
    if embeddings.shape[0] != len(targets):
        raise ValueError(f"{embeddings.shape[0]} embeddings for {len(targets)} target lists")
    scores = F.normalize(embeddings.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T
    best = scores.argmax(dim=-1).tolist()
    return torch.tensor([b in set(t) for b, t in zip(best, targets)], dtype=torch.bool)


class RetrievalAccuracy(Metric):
    """Mean of per-region correctness, each region counted once across processes (by its key)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("keys", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, keys: Sequence[int] | torch.Tensor, correct: torch.Tensor) -> None:
        keys = torch.as_tensor(keys, dtype=torch.long, device=self.device).flatten()
        correct = torch.as_tensor(correct, device=self.device).flatten()
        if keys.numel() != correct.numel():
            raise ValueError(f"{keys.numel()} keys for {correct.numel()} results")
        self.keys.append(keys)
        self.correct.append(correct.to(torch.float32))

    def _unique(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.keys if isinstance(self.keys, torch.Tensor) else torch.cat(self.keys) if self.keys else torch.zeros(0, dtype=torch.long)
        correct = self.correct if isinstance(self.correct, torch.Tensor) else torch.cat(self.correct) if self.correct else torch.zeros(0)
        seen: set[int] = set()
        first = []
        for index, key in enumerate(keys.tolist()):
            if key not in seen:
                seen.add(key)
                first.append(index)
        first = torch.tensor(first, dtype=torch.long, device=correct.device)
        return keys[first], correct[first]

    def compute(self) -> torch.Tensor:
        _, correct = self._unique()
        self.last_count = int(correct.numel())  # on the synced state: all processes' regions
        if correct.numel() == 0:
            return torch.tensor(float("nan"))
        return correct.mean()

    last_count: int = 0
    """Regions the last ``compute`` counted, over all processes (duplicates dropped)."""
