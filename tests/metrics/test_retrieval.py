"""Retrieval Acc@1 on hand-made cases."""

import pytest
import torch

from grounding.metrics.retrieval import RetrievalAccuracy, region_key, top1_correct


def test_top1_correct_on_a_hand_made_case():
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    embeddings = torch.tensor([[2.0, 0.1], [0.2, 3.0], [-1.0, -0.5], [0.0, 1.0]])
    # closest candidates: 0, 1, 2, 1
    correct = top1_correct(embeddings, candidates, [[0], [0], [2, 1], [1]])
    assert correct.tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="4 embeddings for 3 target lists"):
        top1_correct(embeddings, candidates, [[0], [0], [1]])


def test_accuracy_counts_each_region_once():
    metric = RetrievalAccuracy()
    keys = [region_key(1, "a"), region_key(1, "b"), region_key(2, "a")]
    metric.update(keys, torch.tensor([True, False, True]))
    metric.update(keys[2:], torch.tensor([True]))  # a repeated region (distributed sampler padding)
    assert metric.compute().item() == pytest.approx(2 / 3)
    assert metric.last_count == 3
    assert region_key(1, "a") == region_key("1", "a") != region_key(1, "b")
