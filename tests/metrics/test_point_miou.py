"""p-mIoU: min-max scaling, point-to-pixel rounding, per-class point counts against hand counts, dataset-level
accumulation, classes without points ignored, and a 2-process gloo sync over the evaluation sampler's shares."""

import math
import re

import pytest
import torch

from grounding.data.sampling import evaluation_sampler
from grounding.metrics.point_miou import PointMIoU, min_max_scale, point_counts, point_pixels


# ------------------------------------------------------------------------------------- pure functions
def test_min_max_scale_maps_each_map_to_unit_range_and_constant_maps_to_zero():
    maps = torch.tensor([[[2.0, 4.0], [6.0, 10.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    scaled = min_max_scale(maps)
    # (v - 2) / 8 by hand
    assert torch.equal(scaled[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(scaled[1], torch.zeros(2, 2))


def test_point_pixels_floor_and_clamp_the_far_edge():
    points = torch.tensor([[0.0, 0.0], [2.99, 1.5], [4.0, 3.0], [0.5, 2.999]])  # (x, y) in a 4 wide, 3 high map
    assert point_pixels(points, 3, 4).tolist() == [[0, 0], [1, 2], [2, 3], [2, 0]]
    with pytest.raises(ValueError, match=re.escape("point (4.5, 1.0) lies outside the 4x3 map")):
        point_pixels(torch.tensor([[4.5, 1.0]]), 3, 4)
    with pytest.raises(ValueError, match=re.escape("point (1.0, -0.5) lies outside the 4x3 map")):
        point_pixels(torch.tensor([[1.0, -0.5]]), 3, 4)


def _image():
    """Two classes (7 and 2) on a 3x4 map; the masks after min-max scaling and > 0.5 are drawn by hand."""
    map7 = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 0.0, 0.0]]) * 3 + 5  # mask: rows 0-1, cols 2-3
    map2 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]])  # 0.5 at (2,3) is not > 0.5
    maps = torch.stack([map7, map2])
    points = torch.tensor([
        [2.5, 0.5], [3.5, 1.5], [0.5, 0.5],  # class 7: positive in, positive in, positive out
        [2.2, 1.9], [0.1, 2.1],               # class 7: negative in, negative out
        [0.7, 0.2], [3.5, 2.5], [1.5, 1.5],   # class 2: positive in, positive out (0.5 is not > 0.5), negative out
    ])
    point_classes = torch.tensor([7, 7, 7, 7, 7, 2, 2, 2])
    point_labels = torch.tensor([1, 1, 1, 0, 0, 1, 1, 0])
    return maps, [7, 2], points, point_classes, point_labels


def test_point_counts_match_a_hand_count():
    tp, fp, fn = point_counts(*_image())
    assert tp.tolist() == [2, 1] and fp.tolist() == [1, 0] and fn.tolist() == [1, 1]


def test_point_counts_are_invariant_to_an_affine_rescale_of_a_map():
    maps, classes, points, point_classes, point_labels = _image()
    rescaled = maps * torch.tensor([0.01, 300.0])[:, None, None] + torch.tensor([-4.0, 2.0])[:, None, None]
    expected = point_counts(maps, classes, points, point_classes, point_labels)
    for got, want in zip(point_counts(rescaled, classes, points, point_classes, point_labels), expected):
        assert torch.equal(got, want)


def test_point_counts_errors():
    maps, classes, points, point_classes, point_labels = _image()
    with pytest.raises(ValueError, match=re.escape("points of class [5] have no map (classes: [7, 2])")):
        point_counts(maps, classes, points, torch.tensor([7, 7, 7, 7, 7, 2, 2, 5]), point_labels)
    with pytest.raises(ValueError, match=re.escape("point_labels must be 1 (positive) or 0 (negative); got [2]")):
        point_counts(maps, classes, points, point_classes, torch.tensor([1, 1, 1, 0, 0, 1, 2, 0]))
    with pytest.raises(ValueError, match=re.escape("maps must be (C', H, W) with C' = 3 classes; got (2, 3, 4)")):
        point_counts(maps, [7, 2, 1], points, point_classes, point_labels)


# ------------------------------------------------------------------------------------- the metric
def test_metric_accumulates_counts_per_class_over_images_then_averages():
    metric = PointMIoU(10)
    metric.update(*_image())
    # a second image: class 2 only, a map of one hot pixel; one positive on it, one negative off it
    hot = torch.zeros(1, 3, 4)
    hot[0, 1, 1] = 1.0
    metric.update(hot, [2], torch.tensor([[1.5, 1.5], [3.0, 0.0]]), torch.tensor([2, 2]), torch.tensor([1, 0]))
    # a third: class 4 has a map but no point; class 9 has only a negative point outside its mask
    maps = torch.stack([torch.rand(3, 4), torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])])
    metric.update(maps, [4, 9], torch.tensor([[3.5, 2.5]]), torch.tensor([9]), torch.tensor([0]))
    scores = metric.compute()
    # class 7: TP 2, FP 1, FN 1 -> 2 / 4; class 2: TP 1 + 1, FP 0, FN 1 -> 2 / 3 (summed, not averaged per image)
    assert scores["TP"][[7, 2]].tolist() == [2, 2] and scores["FN"][[7, 2]].tolist() == [1, 1]
    assert scores["IoU"][7].item() == pytest.approx(0.5) and scores["IoU"][2].item() == pytest.approx(2 / 3)
    assert all(math.isnan(scores["IoU"][c].item()) for c in (0, 1, 3, 4, 5, 6, 8, 9))
    assert scores["p-mIoU"].item() == pytest.approx((0.5 + 2 / 3) / 2)


def test_every_update_counts_and_a_class_outside_the_range_is_named():
    metric = PointMIoU(8)
    for _ in range(3):
        metric.update(*_image())
    assert metric.compute()["TP"][7].item() == 6  # 2 per image
    with pytest.raises(ValueError, match=re.escape("class 7 is outside [0, 5)")):
        PointMIoU(5).update(*_image())


# ------------------------------------------------------------------------------------- 2 processes
def _random_image(seed):
    g = torch.Generator().manual_seed(seed)
    classes = [seed % 4, 4 + seed % 2]
    points = torch.rand(12, 2, generator=g) * torch.tensor([5.0, 4.0])
    point_classes = torch.tensor(classes)[torch.randint(0, 2, (12,), generator=g)]
    return torch.rand(2, 4, 5, generator=g), classes, points, point_classes, torch.randint(0, 2, (12,), generator=g)


IMAGES = {name: _random_image(seed) for seed, name in enumerate("abcde")}


def distributed_part(rank: int, folder) -> tuple:
    """This process's share under two gloo processes (``tests/metrics/test_two_processes.py`` runs it)."""
    names = list(IMAGES)
    metric = PointMIoU(6)
    for index in evaluation_sampler(names):  # what an evaluation loader gives this process
        metric.update(*IMAGES[names[index]])
    idle = PointMIoU(6)  # only rank 0 updates: rank 1's zero state must gather too
    if rank == 0:
        idle.update(*IMAGES["b"])
    return metric.compute(), idle.compute()


def check_distributed(results: tuple, folder) -> None:
    """Two processes over the evaluation shares equal one process over the union."""
    synced, idle = results
    union = PointMIoU(6)
    for name in "abcde":
        union.update(*IMAGES[name])
    expected = union.compute()
    for key in ("TP", "FP", "FN"):
        assert torch.equal(synced[key], expected[key])
    assert synced["p-mIoU"].item() == pytest.approx(expected["p-mIoU"].item())
    alone = PointMIoU(6)
    alone.update(*IMAGES["b"])
    assert torch.equal(idle["TP"], alone.compute()["TP"])
