"""Retrieval Acc@1 on hand-made cases."""

import math

import pytest
import torch

from grounding.metrics.retrieval import RetrievalAccuracy, top1_correct


def test_top1_correct_on_a_hand_made_case():
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    embeddings = torch.tensor([[2.0, 0.1], [0.2, 3.0], [-1.0, -0.5], [0.0, 1.0]])
    # closest candidates: 0, 1, 2, 1
    correct = top1_correct(embeddings, candidates, [[0], [0], [2, 1], [1]])
    assert correct.tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="4 embeddings for 3 target lists"):
        top1_correct(embeddings, candidates, [[0], [0], [1]])


def test_accuracy_is_the_share_of_right_regions_over_every_update():
    metric = RetrievalAccuracy()
    metric.update(torch.tensor([True, False, True]))
    metric.update(torch.tensor([False]))
    assert metric.compute().item() == pytest.approx(2 / 4) and metric.last_count == 4
    assert math.isnan(RetrievalAccuracy().compute().item())
