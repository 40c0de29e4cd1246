"""Retrieval accuracy (Acc@1) of region embeddings, gathered across processes.

``top1_correct`` scores one image's regions: the cosine of each region embedding with every candidate
text embedding, the top-1 candidate, and whether it is one of the region's right answers.
``RetrievalAccuracy`` is a torchmetrics ``Metric`` summing right answers and scored regions over updates and
processes; every evaluation loader reads each image on exactly one process
(``grounding.data.sampling.evaluation_sampler``), so each region counts once.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def top1_correct(embeddings: torch.Tensor, candidates: torch.Tensor, targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """(R,) bool: is the candidate (C, P) with the highest cosine to region r's embedding (R, P) in targets[r]?"""
    if embeddings.shape[0] != len(targets):
        raise ValueError(f"{embeddings.shape[0]} embeddings for {len(targets)} target lists")
    scores = F.normalize(embeddings.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T
    best = scores.argmax(dim=-1).tolist()
    return torch.tensor([b in set(t) for b, t in zip(best, targets)], dtype=torch.bool)


class RetrievalAccuracy(Metric):
    """Mean of per-region correctness over all updates and processes; ``last_count``: the regions it averaged."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("right", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor) -> None:
        """``correct``: (R,) bool, one entry per scored region."""
        correct = torch.as_tensor(correct, device=self.device).flatten()
        self.right += int(correct.sum())
        self.total += correct.numel()

    def compute(self) -> torch.Tensor:
        self.last_count = int(self.total)  # on the synced state: all processes' regions
        if self.last_count == 0:
            return torch.tensor(float("nan"))
        return self.right.double() / self.total

    last_count: int = 0
    """Regions the last ``compute`` counted, over all processes."""
