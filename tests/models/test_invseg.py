"""InvSeg math against direct loop / numpy computations on tiny random attention tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import entropy as scipy_kl
from torchvision.transforms import RandomResizedCrop

from grounding.models.invseg import (
    anchor_distances,
    category_maps,
    contrastive_soft_clustering_loss,
    crop_and_resize,
    distance_to_map,
    entropy_loss,
    invseg_loss,
    paste_back,
    pixel_class_distribution,
    predict_labels,
    random_resized_crop_boxes,
    soft_anchors,
    symmetric_kl_distance,
    weighted_resolution_maps,
)


def _attention(batch, pixels, tokens, seed=0, dtype=torch.float64):
    """Random softmax rows: self (B, N, N), cross (B, N, K)."""
    generator = torch.Generator().manual_seed(seed)
    self_attn = torch.randn(batch, pixels, pixels, generator=generator, dtype=torch.float64).softmax(-1)
    cross_attn = torch.randn(batch, pixels, tokens, generator=generator, dtype=torch.float64).softmax(-1)
    return self_attn.to(dtype), cross_attn.to(dtype)


def _np_minmax(values):
    return (values - values.min()) / (values.max() - values.min())


def _np_distance_to_map(s, m):
    """D(a, M) by loops over a and b."""
    n = len(m)
    return np.array([sum(s[a, b] * m[b] for b in range(n)) / m.sum() for a in range(n)])


def _np_anchor_distance(s, anchor, m):
    d = _np_distance_to_map(s, m)
    return sum(anchor[a] * d[a] for a in range(len(m))) / anchor.sum()


def _np_cluster_loss(s, maps, sharpness=4.0):
    """L_cluster of one image from the paper's sums, with numpy loops."""
    count = len(maps)
    anchors = [1.0 / (1.0 + np.exp(-sharpness * (m - 0.5))) for m in maps]
    intra = sum(_np_anchor_distance(s, anchors[c], maps[c]) for c in range(count))
    inter = sum(
        _np_anchor_distance(s, anchors[c], maps[c_prime]) for c_prime in range(count) for c in range(c_prime + 1, count)
    )
    return intra / count - (2 * inter / (count * (count - 1)) if count > 1 else 0.0)


# ---------------------------------------------------------------- category maps

def test_category_maps_equal_a_loop_over_images_and_categories():
    self_attn, cross_attn = _attention(2, 6, 5)
    groups = [[1], [2, 4], [0]]
    maps = category_maps(self_attn, cross_attn, groups)
    assert maps.shape == (2, 3, 6)
    for b in range(2):
        a_self, a_cross = self_attn[b].numpy(), cross_attn[b].numpy()
        for c, tokens in enumerate(groups):
            column = a_cross[:, tokens].mean(1)
            np.testing.assert_allclose(maps[b, c].numpy(), _np_minmax(a_self @ column), rtol=0, atol=1e-12)


def test_constant_category_map_becomes_zeros_not_nan():
    self_attn, _ = _attention(1, 4, 3)
    cross_attn = torch.full((1, 4, 3), 1 / 3, dtype=torch.float64)   # every pixel the same -> A_self·col constant
    maps = category_maps(self_attn, cross_attn, [[0], [1, 2]])
    torch.testing.assert_close(maps, torch.zeros_like(maps), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "groups, message",
    [
        ([], "token_groups must give the token positions of at least one category"),
        ([[0], []], "token_groups[1] is empty: every category needs at least one token position"),
        ([[0], [5]], "token_groups[1] has token position 5 outside [0, 5)"),
    ],
)
def test_bad_token_groups_are_named(groups, message):
    self_attn, cross_attn = _attention(1, 3, 5)
    with pytest.raises(ValueError) as error:
        category_maps(self_attn, cross_attn, groups)
    assert str(error.value) == message


def test_mismatched_attention_shapes_are_rejected():
    self_attn, cross_attn = _attention(1, 4, 3)
    with pytest.raises(ValueError, match=r"cross_attn must be \(B, N, K\) with the \(B, N\) of self_attn \(1, 4, 4\)"):
        category_maps(self_attn, cross_attn[:, :3], [[0]])


# ---------------------------------------------------------------- distance

def test_symmetric_kl_equals_the_direct_sum_of_two_kl_divergences():
    self_attn, _ = _attention(2, 7, 2, seed=1)
    distances = symmetric_kl_distance(self_attn)
    for b in range(2):
        rows = self_attn[b].numpy()
        expected = np.array([[scipy_kl(p, q) + scipy_kl(q, p) for q in rows] for p in rows])
        np.testing.assert_allclose(distances[b].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_symmetric_kl_with_zero_probabilities_equals_the_clamped_n_cubed_sum():
    self_attn, _ = _attention(1, 6, 2, seed=2)
    self_attn = self_attn.clone()
    self_attn[0, :3, 0] = 0.0       # probabilities that underflowed: the log is clamped at eps
    eps = 1e-6
    distances = symmetric_kl_distance(self_attn, eps)
    p = self_attn[0][:, None, :]     # (N, 1, N) rows a
    q = self_attn[0][None, :, :]     # (1, N, N) rows b
    direct = ((p - q) * (p.clamp_min(eps).log() - q.clamp_min(eps).log())).sum(-1)   # (N, N, N) summed
    torch.testing.assert_close(distances[0], direct, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(distances).all()


def test_symmetric_kl_is_symmetric_non_negative_with_zero_diagonal():
    self_attn, _ = _attention(3, 9, 2, seed=3, dtype=torch.float32)
    distances = symmetric_kl_distance(self_attn)
    assert torch.equal(distances, distances.transpose(1, 2))
    assert (distances >= 0).all()
    assert torch.equal(distances.diagonal(dim1=1, dim2=2), torch.zeros(3, 9))
    assert (distances + torch.eye(9) > 0).all()   # distinct rows: strictly positive off the diagonal


# ---------------------------------------------------------------- anchors and clustering

def test_soft_anchors_formula():
    maps = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    expected = [1 / (1 + math.exp(-4.0 * (m - 0.5))) for m in maps.tolist()]
    torch.testing.assert_close(soft_anchors(maps), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    assert soft_anchors(maps, sharpness=1e4)[[0, 3]].tolist() == [0.0, 1.0]   # large scale: a binary selection


def _random_problem(batch=2, pixels=6, categories=3, seed=4):
    self_attn, cross_attn = _attention(batch, pixels, categories + 2, seed=seed)
    maps = category_maps(self_attn, cross_attn, [[k] for k in range(categories)])
    return symmetric_kl_distance(self_attn), maps


def test_distance_to_map_and_anchor_distances_equal_loops():
    distances, maps = _random_problem()
    anchors = soft_anchors(maps)
    to_maps = distance_to_map(distances, maps)
    pairwise = anchor_distances(distances, maps, anchors)
    assert to_maps.shape == (2, 3, 6) and pairwise.shape == (2, 3, 3)
    for b in range(2):
        s = distances[b].numpy()
        for c in range(3):
            np.testing.assert_allclose(to_maps[b, c].numpy(), _np_distance_to_map(s, maps[b, c].numpy()), atol=1e-12)
            for c_prime in range(3):
                expected = _np_anchor_distance(s, anchors[b, c].numpy(), maps[b, c_prime].numpy())
                assert pairwise[b, c, c_prime].item() == pytest.approx(expected, rel=1e-12)


def test_cluster_loss_equals_the_paper_sums():
    distances, maps = _random_problem(categories=4)
    loss = contrastive_soft_clustering_loss(distances, maps)
    assert loss.shape == (2,)
    for b in range(2):
        expected = _np_cluster_loss(distances[b].numpy(), maps[b].numpy())
        assert loss[b].item() == pytest.approx(expected, rel=1e-12)


def test_cluster_loss_with_one_category_is_the_intra_distance():
    distances, maps = _random_problem(categories=1)
    loss = contrastive_soft_clustering_loss(distances, maps, sharpness=2.0)
    for b in range(2):
        s, m = distances[b].numpy(), maps[b, 0].numpy()
        anchor = 1.0 / (1.0 + np.exp(-2.0 * (m - 0.5)))
        assert loss[b].item() == pytest.approx(_np_anchor_distance(s, anchor, m), rel=1e-12)


def test_maps_aligned_with_the_self_attention_clusters_have_a_lower_cluster_loss():
    # two clusters of 4 pixels: each pixel attends mostly inside its own cluster
    cluster = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    same = (cluster[:, None] == cluster[None, :]).double()
    noise = 0.1 * torch.randn(8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    distances = symmetric_kl_distance((4.0 * same + noise).softmax(-1)[None])
    first = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float64)
    aligned = torch.stack([first, 1 - first])[None]
    crossing_first = torch.tensor([1.0, 1, 0, 0, 1, 1, 0, 0], dtype=torch.float64)
    crossing = torch.stack([crossing_first, 1 - crossing_first])[None]
    aligned_loss = contrastive_soft_clustering_loss(distances, aligned)
    crossing_loss = contrastive_soft_clustering_loss(distances, crossing)
    assert aligned_loss.item() < crossing_loss.item()
    assert aligned_loss.item() < 0   # inter-cluster distances dominate the intra ones


def test_cluster_loss_rejects_mismatched_shapes():
    distances, maps = _random_problem()
    message = r"needs distances \(B, N, N\) and maps \(B, C, N\), got \(2, 6, 6\) and \(2, 3, 5\)"
    with pytest.raises(ValueError, match=message):
        contrastive_soft_clustering_loss(distances, maps[..., :5])


# ---------------------------------------------------------------- views

def test_random_resized_crop_boxes_are_valid_and_reproducible():
    boxes = random_resized_crop_boxes(40, 60, 50, min_scale=0.6, generator=torch.Generator().manual_seed(0))
    again = random_resized_crop_boxes(40, 60, 50, min_scale=0.6, generator=torch.Generator().manual_seed(0))
    other = random_resized_crop_boxes(40, 60, 50, min_scale=0.6, generator=torch.Generator().manual_seed(1))
    assert boxes.dtype == torch.long and boxes.shape == (50, 4)
    assert torch.equal(boxes, again) and not torch.equal(boxes, other)
    top, left, height, width = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 40).all() and (left + width <= 60).all()
    area = (height * width).double() / (40 * 60)
    assert area.min() > 0.6 - 0.06 and area.max() <= 1.0   # rounding the sides moves the area a little
    aspect = width.double() / height.double()
    assert aspect.min() > 3 / 4 - 0.1 and aspect.max() < 4 / 3 + 0.1


def test_random_resized_crop_boxes_fall_back_to_torchvision_s_centered_crop():
    # a 1x100 strip: no crop of 60-100% of the area has a ratio in [3/4, 4/3], every try fails
    boxes = random_resized_crop_boxes(1, 100, 3, generator=torch.Generator().manual_seed(0))
    expected = RandomResizedCrop.get_params(torch.empty(1, 1, 100), [0.6, 1.0], [3 / 4, 4 / 3])
    assert boxes.tolist() == [list(expected)] * 3


def test_random_resized_crop_boxes_rejects_bad_scale():
    with pytest.raises(ValueError, match=r"min_scale must be in \(0, 1\], got 1.5"):
        random_resized_crop_boxes(8, 8, 2, min_scale=1.5)


def test_crop_and_resize_with_the_box_size_is_a_slice():
    image = torch.rand(3, 10, 12, dtype=torch.float64)
    boxes = torch.tensor([[2, 3, 5, 4], [0, 0, 10, 12]])
    same_size = crop_and_resize(image, boxes[:1], (5, 4))
    torch.testing.assert_close(same_size[0], image[:, 2:7, 3:7])
    views = crop_and_resize(image, boxes, 6)
    assert views.shape == (2, 3, 6, 6)
    message = r"box 0 \(top, left, h, w\) = \(8, 0, 5, 4\) is empty or leaves the 10x12 frame"
    with pytest.raises(ValueError, match=message):
        crop_and_resize(image, torch.tensor([[8, 0, 5, 4]]), 6)


def test_paste_back_of_a_full_image_box_is_the_resized_map():
    maps = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    mean, coverage = paste_back(maps, torch.tensor([[0, 0, 12, 10]]), (12, 10))
    torch.testing.assert_close(mean, F.interpolate(maps, size=(12, 10), mode="bilinear", align_corners=False)[0])
    assert torch.equal(coverage, torch.ones(12, 10, dtype=torch.long))


def test_paste_back_averages_the_views_covering_each_pixel():
    maps = torch.stack([torch.full((2, 3, 3), 1.0), torch.full((2, 3, 3), 3.0)])
    boxes = torch.tensor([[0, 0, 4, 4], [2, 2, 3, 4]])
    mean, coverage = paste_back(maps, boxes, (6, 7))
    first = np.zeros((6, 7), dtype=int)
    first[0:4, 0:4] = 1
    second = np.zeros((6, 7), dtype=int)
    second[2:5, 2:6] = 1
    np.testing.assert_array_equal(coverage.numpy(), first + second)
    expected = np.where(first + second > 0, (1.0 * first + 3.0 * second) / np.maximum(first + second, 1), 0.0)
    for c in range(2):
        np.testing.assert_allclose(mean[c].numpy(), expected, atol=1e-6)


# ---------------------------------------------------------------- entropy

def test_class_distribution_sums_to_one_over_categories():
    maps = torch.rand(4, 3, 5, dtype=torch.float64) + 0.1
    probs = pixel_class_distribution(maps)
    torch.testing.assert_close(probs.sum(0), torch.ones(3, 5, dtype=torch.float64))
    torch.testing.assert_close(probs[2], maps[2] / maps.sum(0))


def test_entropy_of_uniform_is_log_c_and_of_one_hot_is_zero():
    uniform = torch.full((5, 3, 4), 0.7, dtype=torch.float64)
    assert entropy_loss(uniform).item() == pytest.approx(math.log(5), rel=1e-12)
    one_hot = F.one_hot(torch.randint(0, 5, (3, 4)), 5).permute(2, 0, 1).double()
    assert entropy_loss(one_hot).item() == pytest.approx(0.0, abs=1e-12)
    # only the valid pixels count: one-hot on the valid ones, uniform elsewhere
    mixed = torch.where(torch.arange(4)[None, None, :] < 2, one_hot, uniform)
    valid = (torch.arange(4) < 2)[None, :].expand(3, 4)
    assert entropy_loss(mixed, valid).item() == pytest.approx(0.0, abs=1e-12)
    assert entropy_loss(mixed, ~valid).item() == pytest.approx(math.log(5), rel=1e-12)
    with pytest.raises(ValueError, match="entropy_loss: valid_mask selects no pixel"):
        entropy_loss(mixed, torch.zeros(3, 4, dtype=torch.bool))


def test_entropy_equals_numpy_on_random_maps():
    maps = torch.rand(3, 4, 5, dtype=torch.float64)
    p = maps.numpy() / maps.numpy().sum(0, keepdims=True)
    assert entropy_loss(maps).item() == pytest.approx(float(-(p * np.log(p)).sum(0).mean()), rel=1e-12)


# ---------------------------------------------------------------- total loss and prediction

def test_invseg_loss_is_cluster_mean_plus_alpha_entropy():
    self_attn, cross_attn = _attention(2, 9, 4, seed=6)
    maps = category_maps(self_attn, cross_attn, [[0], [1, 2], [3]]).reshape(2, 3, 3, 3)
    distances = symmetric_kl_distance(self_attn)
    boxes = torch.tensor([[0, 0, 3, 3], [0, 0, 3, 3]])   # both views are the full 3x3 frame
    loss = invseg_loss(maps, distances, boxes, (3, 3), alpha=0.5)
    cluster = np.mean([_np_cluster_loss(distances[v].numpy(), maps[v].reshape(3, 9).numpy()) for v in range(2)])
    mean_maps = maps.mean(0).numpy()
    p = mean_maps / mean_maps.sum(0, keepdims=True)
    entropy = float(-(p * np.log(np.maximum(p, 1e-8))).sum(0).mean())
    assert loss.cluster.item() == pytest.approx(cluster, rel=1e-10)
    assert loss.entropy.item() == pytest.approx(entropy, rel=1e-10)
    assert loss.total.item() == pytest.approx(cluster + 0.5 * entropy, rel=1e-10)
    with pytest.raises(ValueError, match=r"view_distances must be \(V, h·w, h·w\) = \(2, 9, 9\)"):
        invseg_loss(maps, distances[:, :4, :4], boxes, (3, 3))


def test_predict_labels_upsamples_then_takes_the_argmax():
    left = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    maps = torch.stack([left, 1 - left])                 # category 0 on the left column, 1 on the right
    labels = predict_labels(maps, (4, 4))
    assert labels.dtype == torch.long
    assert labels.tolist() == [[0, 0, 1, 1]] * 4
    assert predict_labels(maps[None], 4).shape == (1, 4, 4)


# ---------------------------------------------------------------- DiffSegmenter aggregation

def test_weighted_resolution_maps_of_one_resolution_are_its_category_maps():
    self_attn, cross_attn = _attention(2, 16, 5, seed=7)
    groups = [[0], [1, 3]]
    maps = weighted_resolution_maps({4: (self_attn, cross_attn)}, groups, out_res=4, weights={4: 0.2})
    torch.testing.assert_close(maps, category_maps(self_attn, cross_attn, groups).reshape(2, 2, 4, 4))


def test_weighted_resolution_maps_weigh_the_upsampled_refinements():
    coarse = _attention(1, 4, 3, seed=8)
    fine = _attention(1, 16, 3, seed=9)
    groups = [[0, 1], [2]]
    maps = weighted_resolution_maps({2: coarse, 4: fine}, groups, out_res=4, weights={2: 1.0, 4: 3.0, 8: 5.0})
    expected = np.zeros((2, 16))
    for (a_self, a_cross), side, weight in ((coarse, 2, 0.25), (fine, 4, 0.75)):
        for c, tokens in enumerate(groups):
            refined = a_self[0].numpy() @ a_cross[0].numpy()[:, tokens].mean(1)
            grid = torch.from_numpy(refined).reshape(1, 1, side, side)
            upsampled = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
            expected[c] += weight * upsampled.flatten().numpy()
    for c in range(2):
        np.testing.assert_allclose(maps[0, c].flatten().numpy(), _np_minmax(expected[c]), atol=1e-12)
    with pytest.raises(ValueError, match=r"no weight for resolution\(s\) \[2\]; weights has \[8, 16, 32, 64\]"):
        weighted_resolution_maps({2: coarse}, groups, out_res=4)


# ---------------------------------------------------------------- gradients and precision

def test_cluster_loss_gradcheck_through_both_attention_tensors():
    generator = torch.Generator().manual_seed(10)
    self_logits = torch.randn(1, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    cross_logits = torch.randn(1, 4, 3, generator=generator, dtype=torch.float64, requires_grad=True)

    def loss(self_logits, cross_logits):
        self_attn, cross_attn = self_logits.softmax(-1), cross_logits.softmax(-1)
        maps = category_maps(self_attn, cross_attn, [[0], [1, 2]])
        return contrastive_soft_clustering_loss(symmetric_kl_distance(self_attn), maps)

    assert torch.autograd.gradcheck(loss, (self_logits, cross_logits))
    loss(self_logits, cross_logits).sum().backward()
    assert self_logits.grad.abs().sum() > 0 and cross_logits.grad.abs().sum() > 0


def test_entropy_gradcheck_through_paste_back():
    view_maps = torch.rand(2, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(11)) + 0.1
    view_maps.requires_grad_(True)
    boxes = torch.tensor([[0, 0, 4, 5], [1, 2, 4, 4]])

    def loss(view_maps):
        mean, coverage = paste_back(view_maps, boxes, (5, 6))
        return entropy_loss(mean, coverage > 0)

    assert torch.autograd.gradcheck(loss, (view_maps,))


def test_bf16_attention_gives_float32_results():
    self_attn, cross_attn = _attention(1, 16, 4, seed=12, dtype=torch.float32)
    low_self, low_cross = self_attn.bfloat16(), cross_attn.bfloat16()
    groups = [[0], [1, 3]]
    maps = category_maps(low_self, low_cross, groups)
    distances = symmetric_kl_distance(low_self)
    loss = contrastive_soft_clustering_loss(distances, maps)
    assert maps.dtype == distances.dtype == loss.dtype == torch.float32
    # computed in float32 from the bf16 values: the same as casting them first
    reference_maps = category_maps(low_self.float(), low_cross.float(), groups)
    reference_distances = symmetric_kl_distance(low_self.float())
    torch.testing.assert_close(maps, reference_maps, rtol=0, atol=0)
    torch.testing.assert_close(distances, reference_distances, rtol=0, atol=0)
    # and close to the float32 computation of the unrounded attention
    torch.testing.assert_close(loss, contrastive_soft_clustering_loss(symmetric_kl_distance(self_attn),
                                                                      category_maps(self_attn, cross_attn, groups)),
                               rtol=0.05, atol=0.02)


def test_optimizing_the_cluster_loss_shrinks_the_intra_and_grows_the_inter_distance():
    """The sign of each term: maps of two categories over a two-region self-attention, started random and
    optimized by the cluster loss alone, end with a smaller D_intra and a larger D_inter (both recomputed
    with the loops of this file)."""
    cluster = torch.tensor([0] * 6 + [1] * 6)
    same = (cluster[:, None] == cluster[None, :]).double()
    noise = 0.1 * torch.randn(12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    distances = symmetric_kl_distance((4.0 * same + noise).softmax(-1)[None])
    logits = torch.randn(1, 2, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=0.1)

    def terms():
        maps = logits.detach().sigmoid()[0].numpy()
        s = distances[0].numpy()
        anchors = [1.0 / (1.0 + np.exp(-4.0 * (m - 0.5))) for m in maps]
        intra = sum(_np_anchor_distance(s, anchors[c], maps[c]) for c in range(2))
        inter = _np_anchor_distance(s, anchors[1], maps[0])
        return intra, inter

    intra_before, inter_before = terms()
    for _ in range(100):
        optimizer.zero_grad()
        contrastive_soft_clustering_loss(distances, logits.sigmoid()).sum().backward()
        optimizer.step()
    intra_after, inter_after = terms()
    assert intra_after < intra_before and inter_after > inter_before
