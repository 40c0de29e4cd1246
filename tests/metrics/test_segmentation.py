"""mIoU / mAcc: the confusion matrix and scores against numpy loops, the ignore index, NaN classes,
images counted once, and a 2-process gloo sync equal to one process over the union."""

import math
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist

from grounding.data.sampling import evaluation_sampler
from grounding.metrics.segmentation import (
    SegmentationMetric,
    accuracy_from_confusion,
    confusion_matrix,
    format_iou_table,
    iou_from_confusion,
)

C = 4


def random_maps(seed, batch=None, size=(7, 9), classes=C, ignore_share=0.2):
    """(pred, target) int64 maps; about ``ignore_share`` of the target pixels are 255."""
    rng = np.random.default_rng(seed)
    shape = size if batch is None else (batch, *size)
    pred = rng.integers(0, classes, shape)
    target = rng.integers(0, classes, shape)
    target[rng.random(shape) < ignore_share] = 255
    return torch.from_numpy(pred), torch.from_numpy(target)


def loop_confusion(pred, target, classes=C, ignore=255):
    matrix = np.zeros((classes, classes), dtype=np.int64)
    for p, t in zip(pred.reshape(-1).tolist(), target.reshape(-1).tolist()):
        if t != ignore:
            matrix[t, p] += 1
    return matrix


def loop_scores(matrix):
    """Per-class IoU and Acc by counting, NaN for 0 / 0, and the means over the classes that are not NaN."""
    iou, acc = [], []
    for c in range(matrix.shape[0]):
        tp = matrix[c, c]
        fn = sum(matrix[c, k] for k in range(matrix.shape[0]) if k != c)
        fp = sum(matrix[k, c] for k in range(matrix.shape[0]) if k != c)
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        acc.append(tp / (tp + fn) if tp + fn else math.nan)
    mean = lambda values: sum(v for v in values if not math.isnan(v)) / sum(1 for v in values if not math.isnan(v))  # noqa: E731
    return iou, acc, mean(iou), mean(acc), np.trace(matrix) / matrix.sum()


def test_confusion_matrix_equals_a_pixel_loop_and_ignores_255():
    pred, target = random_maps(0, batch=3)
    matrix = confusion_matrix(pred, target, C)
    assert matrix.dtype == torch.int64
    assert np.array_equal(matrix.numpy(), loop_confusion(pred.numpy(), target.numpy()))
    assert matrix.sum().item() == (target != 255).sum().item()
    changed = pred.clone()
    changed[target == 255] = (changed[target == 255] + 1) % C  # predictions on ignored pixels do not count
    assert torch.equal(confusion_matrix(changed, target, C), matrix)


def test_scores_equal_loops_and_absent_classes_are_nan():
    pred, target = random_maps(1, classes=3)  # class 3 never occurs: IoU and Acc NaN
    target[0, 0], pred[0, 0] = 2, 3  # ... except one prediction: IoU 0, Acc NaN (not in the truth)
    matrix = confusion_matrix(pred, target, C + 1)  # class 4 in neither
    iou, acc, miou, macc, aacc = loop_scores(matrix.numpy())
    assert math.isnan(iou[4]) and math.isnan(acc[4]) and iou[3] == 0 and math.isnan(acc[3])
    np.testing.assert_allclose(iou_from_confusion(matrix).numpy(), iou, equal_nan=True)
    np.testing.assert_allclose(accuracy_from_confusion(matrix).numpy(), acc, equal_nan=True)
    metric = SegmentationMetric(C + 1)
    metric.update(pred, target)
    scores = metric.compute()
    assert scores["mIoU"].item() == pytest.approx(miou) and scores["mAcc"].item() == pytest.approx(macc)
    assert scores["aAcc"].item() == pytest.approx(aacc)
    assert not math.isnan(scores["mIoU"].item())  # the NaN classes are left out of the means


def test_metric_sums_the_images_and_batches_equal_single_updates():
    maps = [random_maps(seed) for seed in range(4)]
    union = sum(loop_confusion(p.numpy(), t.numpy()) for p, t in maps)
    batched = SegmentationMetric(C)
    batched.update(torch.stack([p for p, _ in maps[:2]]), torch.stack([t for _, t in maps[:2]]))
    for pred, target in maps[2:]:
        batched.update(pred, target)
    assert np.array_equal(batched.confusion().numpy(), union)
    _, _, miou, _, _ = loop_scores(union)
    assert batched.compute()["mIoU"].item() == pytest.approx(miou)


def test_bad_inputs_are_clear_errors():
    pred, target = random_maps(2)
    with pytest.raises(ValueError, match=re.escape("prediction (7, 9) and ground truth (7, 8) differ in shape")):
        confusion_matrix(pred, target[:, :8], C)
    bad = target.clone()
    bad[0, 0] = 9
    with pytest.raises(ValueError, match=re.escape("ground truth holds label 9, outside [0, 4) (ignore_index 255 excepted)")):
        confusion_matrix(pred, bad, C)
    with pytest.raises(ValueError, match=re.escape("prediction holds label 4, outside [0, 4)")):
        confusion_matrix(torch.where(target == 255, 0, 4), target, C)
    with pytest.raises(ValueError, match=re.escape("label maps must hold integer class indices; got torch.float32 and torch.int64")):
        confusion_matrix(pred.float(), target, C)
    with pytest.raises(ValueError, match=re.escape("label maps must be (H, W) or (B, H, W); got (9,) and (9,)")):
        SegmentationMetric(C).update(pred[0], target[0])


def test_format_iou_table():
    table = format_iou_table(["background", "cat", "dog"], torch.tensor([0.5, 0.25, math.nan]), torch.tensor([1.0, 0.5, math.nan]))
    assert table == (
        "| class | IoU | Acc |\n| --- | ---: | ---: |\n"
        "| background | 50.00 | 100.00 |\n| cat | 25.00 | 50.00 |\n| dog | - | - |\n| mean | 37.50 | 75.00 |"
    )
    with pytest.raises(ValueError, match=re.escape("2 class names for 3 IoU and 3 Acc values")):
        format_iou_table(["a", "b"], torch.zeros(3), torch.zeros(3))


# ------------------------------------------------------------------------------------- 2 processes
IMAGES = {name: random_maps(seed) for seed, name in enumerate("abcde")}


def distributed_part(rank: int, folder) -> tuple:
    """This process's share under two gloo processes (``tests/metrics/test_two_processes.py`` runs it)."""
    names = list(IMAGES)
    share = [names[i] for i in evaluation_sampler(names)]  # what an evaluation loader gives this process
    metric = SegmentationMetric(C)
    for name in share:
        metric.update(*IMAGES[name])
    idle = SegmentationMetric(C)  # only rank 0 updates: rank 1's zero state must gather too
    if rank == 0:
        idle.update(*IMAGES["b"])
    results = (metric.compute(), idle.compute())
    shares = [None, None]
    dist.all_gather_object(shares, share)
    return (*results, shares)


def check_distributed(results: tuple, folder) -> None:
    """Two processes over the evaluation shares equal one process over the union."""
    synced, idle, shares = results
    assert shares == [["a", "c", "e"], ["b", "d"]]  # every image on one process, none repeated
    union = sum(loop_confusion(IMAGES[n][0].numpy(), IMAGES[n][1].numpy()) for n in "abcde")
    iou, acc, miou, macc, aacc = loop_scores(union)
    np.testing.assert_allclose(synced["IoU"].numpy(), iou)
    np.testing.assert_allclose(synced["Acc"].numpy(), acc)
    assert synced["mIoU"].item() == pytest.approx(miou) and synced["mAcc"].item() == pytest.approx(macc)
    assert synced["aAcc"].item() == pytest.approx(aacc)
    alone = loop_scores(loop_confusion(IMAGES["b"][0].numpy(), IMAGES["b"][1].numpy()))
    assert idle["mIoU"].item() == pytest.approx(alone[2])
