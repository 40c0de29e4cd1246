"""InvSeg math on attention tensors: category maps, contrastive soft clustering, multi-view entropy (docs/invseg.md).

No diffusion model here: every function takes the attention probabilities captured from the UNet and
returns maps or losses, differentiable with respect to both attention tensors.

    category_maps                      M^c = minmax(A_self · mean_{k ∈ tokens(c)} A_cross[:, k])
    symmetric_kl_distance              S[a, b] = KL(A_self[a] ‖ A_self[b]) + KL(A_self[b] ‖ A_self[a])
    soft_anchors                       Anchor^c = sigmoid(s · (M^c − 0.5)),  s = 4
    distance_to_map                    D(a, M) = Σ_b S[a, b] M[b] / Σ_b M[b]
    anchor_distances                   D(Anchor^c, M^c') = Σ_a Anchor^c[a] D(a, M^c') / Σ_a Anchor^c[a]
    contrastive_soft_clustering_loss   L_cluster = D_intra / C − 2 · D_inter / (C (C − 1))
    paste_back                         M̄: the views' maps pasted back into the image frame and averaged
    entropy_loss                       P^c = M̄^c / Σ_c M̄^c,  L_etrp = −mean_pixels Σ_c P^c log P^c
    invseg_loss                        L = L_cluster + α · L_etrp
    predict_labels                     argmax_c of M^c upsampled to the image size

Shapes: B images (or views), N = h·w pixels of the capture resolution (row-major), K text tokens (77),
C categories, V augmented views, H×W the frame the views were cut from. Logs, KL terms and the matrix
products run in float32 (float64 stays float64) with autocast off, so bf16 attention (or a bf16 autocast
region) gives float32 results.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, NamedTuple, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

#: DiffSegmenter's aggregation weights over the UNet resolutions (side of the attention grid)
DIFFSEGMENTER_WEIGHTS: Mapping[int, float] = {8: 0.3, 16: 0.5, 32: 0.1, 64: 0.1}


_F = TypeVar("_F", bound=Callable)


def _without_autocast(function: _F) -> _F:
    """Run ``function`` with autocast off (CPU and CUDA): under bf16 autocast the matrix products of the
    KL expansion and the maps would run in bf16, whatever dtype the inputs are cast to."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return function(*args, **kwargs)

    return wrapper


def _working(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in float32, or float64 if it already is (bf16/fp16 logs and sums lose too much)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _check_attention(self_attn: torch.Tensor, cross_attn: torch.Tensor | None = None) -> None:
    if self_attn.dim() != 3 or self_attn.shape[1] != self_attn.shape[2]:
        raise ValueError(f"self_attn must be (B, N, N), got {tuple(self_attn.shape)}")
    if cross_attn is not None and (cross_attn.dim() != 3 or cross_attn.shape[:2] != self_attn.shape[:2]):
        raise ValueError(
            f"cross_attn must be (B, N, K) with the (B, N) of self_attn {tuple(self_attn.shape)},"
            f" got {tuple(cross_attn.shape)}"
        )


def token_group_matrix(
    token_groups: Sequence[Sequence[int]], num_tokens: int, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(K, C) matrix whose column c averages the token columns of category c: W[k, c] = 1/|tokens(c)|.

    token_groups: for each of the C categories, its token positions in the prompt (a name of several
    tokens is the mean of their columns [choice], docs/invseg.md).
    """
    if len(token_groups) == 0:
        raise ValueError("token_groups must give the token positions of at least one category")
    weights = torch.zeros(num_tokens, len(token_groups), dtype=dtype, device=device)
    for category, positions in enumerate(token_groups):
        positions = list(positions)
        if not positions:
            raise ValueError(f"token_groups[{category}] is empty: every category needs at least one token position")
        for position in positions:
            if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < num_tokens:
                raise ValueError(
                    f"token_groups[{category}] has token position {position!r} outside [0, {num_tokens})"
                )
            weights[position, category] += 1.0 / len(positions)
    return weights


def minmax_normalize(values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(..., N) -> (..., N): (x − min) / (max − min) over the last dim.

    A constant map has max − min = 0: the range is clamped at ``eps`` [choice], so it becomes all zeros
    (no category evidence anywhere) instead of NaN.
    """
    low = values.amin(dim=-1, keepdim=True)
    high = values.amax(dim=-1, keepdim=True)
    return (values - low) / (high - low).clamp_min(eps)


@_without_autocast
def refined_cross_attention(
    self_attn: torch.Tensor, cross_attn: torch.Tensor, token_groups: Sequence[Sequence[int]]
) -> torch.Tensor:
    """A_self · A_cross[:, tokens of c] averaged over c's tokens, before normalization: (B, C, N).

    self_attn: (B, N, N) rows are softmax distributions over pixels.
    cross_attn: (B, N, K) rows are softmax distributions over the K text tokens.
    """
    _check_attention(self_attn, cross_attn)
    self_attn, cross_attn = _working(self_attn), _working(cross_attn)
    groups = token_group_matrix(token_groups, cross_attn.shape[-1], cross_attn.dtype, cross_attn.device)
    # averaging the token columns first is the same linear map and keeps the product at (N, N)·(N, C)
    return (self_attn @ (cross_attn @ groups)).transpose(1, 2)


@_without_autocast
def category_maps(
    self_attn: torch.Tensor, cross_attn: torch.Tensor, token_groups: Sequence[Sequence[int]], eps: float = 1e-8
) -> torch.Tensor:
    """M^c = minmax(A_self · mean_{k ∈ tokens(c)} A_cross[:, k]) per image and category (docs/invseg.md).

    self_attn: (B, N, N), cross_attn: (B, N, K), token_groups: C lists of token positions.
    Returns (B, C, N) in [0, 1], float32 (float64 inputs stay float64). ``eps``: see ``minmax_normalize``.
    """
    return minmax_normalize(refined_cross_attention(self_attn, cross_attn, token_groups), eps)


@_without_autocast
def symmetric_kl_distance(self_attn: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """S[a, b] = KL(A[a] ‖ A[b]) + KL(A[b] ‖ A[a]) for the self-attention rows of all pixel pairs (docs/invseg.md).

    self_attn: (B, N, N), rows are distributions. Returns (B, N, N) float32 (float64 stays float64),
    symmetric, ≥ 0, zero on the diagonal.

    The sum expands as Σ_j (p_j − q_j)(log p_j − log q_j) = h_a + h_b − X[a, b] − X[b, a] with
    h_a = Σ_j p_aj log p_aj and X = P · (log P)ᵀ: one matrix product, peak memory O(B·N²) (a few N×N
    buffers per image) instead of the O(B·N³) of the direct sum. Probabilities are clamped at ``eps``
    inside the log only [choice], which keeps every term (p − q)(log p' − log q') ≥ 0 and finite when an
    attention probability underflows to 0.
    """
    _check_attention(self_attn)
    probs = _working(self_attn)
    logs = probs.clamp_min(eps).log()
    self_terms = (probs * logs).sum(-1)                                     # (B, N)
    cross = probs @ logs.transpose(1, 2)                                     # (B, N, N)
    distances = self_terms[:, :, None] + self_terms[:, None, :] - cross - cross.transpose(1, 2)
    # rounding leaves ±1e-7 where the math gives exactly 0 (the diagonal) or ≥ 0 (everywhere)
    eye = torch.eye(distances.shape[-1], dtype=torch.bool, device=distances.device)
    return torch.where(eye, torch.zeros((), dtype=distances.dtype, device=distances.device), distances.clamp_min(0))


def soft_anchors(maps: torch.Tensor, sharpness: float = 4.0) -> torch.Tensor:
    """Anchor^c = sigmoid(s · (M^c − 0.5)): soft selection of the confident pixels of each map (docs/invseg.md).

    maps: (..., N) in [0, 1]; centering at 0.5 [choice], s = 4 (the paper's best scale). Same shape out.
    """
    return torch.sigmoid(sharpness * (maps - 0.5))


@_without_autocast
def distance_to_map(distances: torch.Tensor, maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """D(a, M^c) = Σ_b S[a, b] M^c[b] / Σ_b M^c[b], for every pixel a and category c (docs/invseg.md).

    distances: (B, N, N) S; maps: (B, C, N). Returns (B, C, N) indexed [image, c, a]. The mass Σ_b M^c[b]
    is clamped at ``eps`` (an all-zero map, from a constant one, then has distance 0).
    """
    maps = _working(maps)
    weighted = maps @ _working(distances).transpose(1, 2)                  # Σ_b M^c[b] S[a, b]: (B, C, N)
    return weighted / maps.sum(-1, keepdim=True).clamp_min(eps)


@_without_autocast
def anchor_distances(
    distances: torch.Tensor, maps: torch.Tensor, anchors: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """D(Anchor^c, M^c') = Σ_a Anchor^c[a] D(a, M^c') / Σ_a Anchor^c[a] (docs/invseg.md).

    distances: (B, N, N); maps: (B, C, N); anchors: (B, C, N). Returns (B, C, C) with row c = the anchors'
    category and column c' = the map's category.
    """
    anchors = _working(anchors)
    to_maps = distance_to_map(distances, maps, eps)                        # (B, C', N)
    return (anchors @ to_maps.transpose(1, 2)) / anchors.sum(-1)[:, :, None].clamp_min(eps)


@_without_autocast
def contrastive_soft_clustering_loss(
    distances: torch.Tensor, maps: torch.Tensor, sharpness: float = 4.0, eps: float = 1e-8
) -> torch.Tensor:
    """L_cluster = D_intra / C − 2 · D_inter / (C (C − 1)) per image (docs/invseg.md).

    distances: (B, N, N) S; maps: (B, C, N) category maps in [0, 1]. Returns (B,).
    D_intra = Σ_c D(Anchor^c, M^c). D_inter = Σ_{c' < c} D(Anchor^c, M^c'), implemented literally as
    written: only the pairs whose anchors belong to the larger category index (the strict lower triangle
    of ``anchor_distances``), not the symmetric sum over both orders. With C = 1 there is no pair and
    the inter term is defined as 0.
    """
    if maps.dim() != 3 or distances.dim() != 3 or maps.shape[0] != distances.shape[0] \
            or maps.shape[-1] != distances.shape[-1] or distances.shape[1] != distances.shape[2]:
        raise ValueError(
            f"contrastive_soft_clustering_loss needs distances (B, N, N) and maps (B, C, N),"
            f" got {tuple(distances.shape)} and {tuple(maps.shape)}"
        )
    categories = maps.shape[1]
    pairwise = anchor_distances(distances, maps, soft_anchors(maps, sharpness), eps)   # (B, C, C)
    intra = pairwise.diagonal(dim1=1, dim2=2).sum(-1)
    if categories == 1:
        return intra
    inter = pairwise.tril(diagonal=-1).sum(dim=(1, 2))
    return intra / categories - 2.0 * inter / (categories * (categories - 1))


def random_resized_crop_boxes(
    height: int, width: int, n: int, min_scale: float = 0.6, ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(n, 4) long boxes (top, left, h, w) of random resized crops of an H×W image (docs/invseg.md).

    The sampling of torchvision's ``RandomResizedCrop`` (area fraction uniform in [min_scale, 1], aspect
    ratio log-uniform in ``ratio``, 10 tries, then the largest centered crop of a valid ratio), written
    here because its ``get_params`` draws from the global RNG and takes no ``generator``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"random_resized_crop_boxes: n must be an integer >= 1, got {n!r}")
    if height < 1 or width < 1:
        raise ValueError(f"random_resized_crop_boxes: image size must be positive, got {height}x{width}")
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"random_resized_crop_boxes: min_scale must be in (0, 1], got {min_scale!r}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"random_resized_crop_boxes: ratio must be (low, high) with 0 < low <= high, got {ratio!r}")
    boxes = [_one_crop(height, width, min_scale, ratio, generator) for _ in range(n)]
    return torch.tensor(boxes, dtype=torch.long)


def _one_crop(
    height: int, width: int, min_scale: float, ratio: tuple[float, float], generator: torch.Generator | None
) -> tuple[int, int, int, int]:
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        scale, log_ratio = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (min_scale + (1.0 - min_scale) * scale)
        aspect = math.exp(log_low + (log_high - log_low) * log_ratio)
        crop_w = int(round(math.sqrt(target * aspect)))
        crop_h = int(round(math.sqrt(target / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
            return top, left, crop_h, crop_w
    aspect = width / height
    crop_h, crop_w = height, width
    if aspect < ratio[0]:
        crop_h = int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        crop_w = int(round(height * ratio[1]))
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _check_boxes(boxes: torch.Tensor, frame: tuple[int, int], name: str) -> list[list[int]]:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: boxes must be (V, 4) as (top, left, h, w), got {tuple(boxes.shape)}")
    rows = boxes.tolist()
    for index, (top, left, box_h, box_w) in enumerate(rows):
        if box_h < 1 or box_w < 1 or top < 0 or left < 0 or top + box_h > frame[0] or left + box_w > frame[1]:
            raise ValueError(
                f"{name}: box {index} (top, left, h, w) = {(top, left, box_h, box_w)} is empty or leaves the"
                f" {frame[0]}x{frame[1]} frame"
            )
    return [[int(value) for value in row] for row in rows]


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def crop_and_resize(image: torch.Tensor, boxes: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """The views of one image: each box cropped and resized (bilinear, antialiased) to ``size``.

    image: (..., H, W), e.g. (3, H, W) pixels or (4, h, w) latents; boxes: (V, 4) (top, left, h, w).
    Returns (V, ..., size_h, size_w).
    """
    out_size = list(_size(size))
    rows = _check_boxes(boxes, tuple(image.shape[-2:]), "crop_and_resize")
    return torch.stack([TF.resized_crop(image, *row, out_size, antialias=True) for row in rows])


@_without_autocast
def paste_back(
    view_maps: torch.Tensor, boxes: torch.Tensor, out_size: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo the crops: each view's maps resized to its box, placed in the frame, averaged over the views.

    view_maps: (V, C, h, w); boxes: (V, 4) (top, left, h, w) in the H×W frame ``out_size``.
    Returns M̄ (C, H, W), the mean over the views covering each pixel (0 where none does), and the
    coverage (H, W) long: the number of views covering each pixel. The entropy ignores uncovered pixels
    (``coverage > 0`` as its mask) [choice], instead of inventing maps there.
    """
    if view_maps.dim() != 4 or view_maps.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"paste_back: view_maps must be (V, C, h, w) with one box per view, got {tuple(view_maps.shape)}"
            f" for {boxes.shape[0]} boxes"
        )
    frame_h, frame_w = _size(out_size)
    rows = _check_boxes(boxes, (frame_h, frame_w), "paste_back")
    total = view_maps.new_zeros(view_maps.shape[1], frame_h, frame_w)
    coverage = torch.zeros(frame_h, frame_w, dtype=torch.long, device=view_maps.device)
    for maps, (top, left, box_h, box_w) in zip(view_maps, rows):
        resized = F.interpolate(maps[None], size=(box_h, box_w), mode="bilinear", align_corners=False, antialias=True)
        # padding instead of an in-place slice assignment keeps the sum differentiable
        total = total + F.pad(resized[0], (left, frame_w - left - box_w, top, frame_h - top - box_h))
        coverage[top:top + box_h, left:left + box_w] += 1
    return total / coverage.clamp_min(1).to(total.dtype), coverage


@_without_autocast
def pixel_class_distribution(mean_maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """P^c = M̄^c / Σ_c M̄^c at every pixel (docs/invseg.md): (C, ...) -> (C, ...) float32 (float64 stays).

    The sum is clamped at ``eps`` [choice]: a pixel where every map is 0 gets P = 0 (entropy 0, no
    gradient blow-up) rather than a uniform distribution.
    """
    mean_maps = _working(mean_maps)
    return mean_maps / mean_maps.sum(0, keepdim=True).clamp_min(eps)


@_without_autocast
def entropy_loss(mean_maps: torch.Tensor, valid_mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """L_etrp = −mean over valid pixels of Σ_c P^c log P^c (docs/invseg.md): a scalar.

    mean_maps: (C, ...) M̄ (the views' maps averaged in the image frame); valid_mask: (...) bool, the pixels
    covered by at least one view (None: all). P is clamped at ``eps`` inside the log only, so P = 0
    contributes 0 with a finite gradient.
    """
    probs = pixel_class_distribution(mean_maps, eps)
    entropy = -(probs * probs.clamp_min(eps).log()).sum(0)                 # (...)
    if valid_mask is None:
        return entropy.mean()
    if valid_mask.shape != entropy.shape:
        raise ValueError(
            f"entropy_loss: valid_mask {tuple(valid_mask.shape)} must match the pixels of mean_maps"
            f" {tuple(mean_maps.shape)}"
        )
    if not valid_mask.any():
        raise ValueError("entropy_loss: valid_mask selects no pixel")
    return entropy[valid_mask.bool()].mean()


class InvSegLoss(NamedTuple):
    total: torch.Tensor     # () L_cluster + α · L_etrp
    cluster: torch.Tensor   # () L_cluster averaged over the views
    entropy: torch.Tensor   # () L_etrp of the views' maps averaged in the image frame


@_without_autocast
def invseg_loss(
    view_maps: torch.Tensor, view_distances: torch.Tensor, boxes: torch.Tensor, image_size: int | Sequence[int],
    alpha: float = 1.0, sharpness: float = 4.0, eps: float = 1e-8,
) -> InvSegLoss:
    """L = L_cluster + α · L_etrp for one image seen through V augmented views (docs/invseg.md).

    view_maps: (V, C, h, w) category maps M^c of each view at the capture resolution (``category_maps``
        of the view's attention, reshaped to the grid).
    view_distances: (V, N, N), N = h·w: ``symmetric_kl_distance`` of each view's OWN self-attention
        [choice]: one UNet pass per step runs the views only (no un-augmented pass), and a view's maps
        live on that view's pixels. Pass it detached to stop gradients through S.
    boxes: (V, 4) (top, left, h, w) of the views in the ``image_size`` frame (``random_resized_crop_boxes``).
    L_cluster is averaged over the views [choice]; L_etrp is the entropy of the maps pasted back into the
    frame and averaged over the views, on the pixels covered by at least one view.
    """
    if view_maps.dim() != 4:
        raise ValueError(f"invseg_loss: view_maps must be (V, C, h, w), got {tuple(view_maps.shape)}")
    views, categories, grid_h, grid_w = view_maps.shape
    if view_distances.shape != (views, grid_h * grid_w, grid_h * grid_w):
        raise ValueError(
            f"invseg_loss: view_distances must be (V, h·w, h·w) = {(views, grid_h * grid_w, grid_h * grid_w)}"
            f" for view_maps {tuple(view_maps.shape)}, got {tuple(view_distances.shape)}"
        )
    cluster = contrastive_soft_clustering_loss(
        view_distances, view_maps.reshape(views, categories, grid_h * grid_w), sharpness, eps
    ).mean()
    mean_maps, coverage = paste_back(_working(view_maps), boxes, image_size)
    entropy = entropy_loss(mean_maps, coverage > 0, eps)
    return InvSegLoss(cluster + alpha * entropy, cluster, entropy)


@_without_autocast
def predict_labels(maps: torch.Tensor, out_size: int | Sequence[int]) -> torch.Tensor:
    """Category index per pixel: argmax_c of the maps upsampled (bilinear) to the image size [choice: upsample
    the maps, then argmax, rather than upsampling the labels] (docs/invseg.md).

    maps: (C, h, w) or (B, C, h, w). Returns (H, W) or (B, H, W) long.
    """
    if maps.dim() not in (3, 4):
        raise ValueError(f"predict_labels: maps must be (C, h, w) or (B, C, h, w), got {tuple(maps.shape)}")
    batched = maps if maps.dim() == 4 else maps[None]
    upsampled = F.interpolate(_working(batched), size=_size(out_size), mode="bilinear", align_corners=False)
    labels = upsampled.max(1).indices
    return labels if maps.dim() == 4 else labels[0]


@_without_autocast
def weighted_resolution_maps(
    per_res: Mapping[int, tuple[torch.Tensor, torch.Tensor]], token_groups: Sequence[Sequence[int]],
    out_res: int = 64, weights: Mapping[int, float] = DIFFSEGMENTER_WEIGHTS, eps: float = 1e-8,
) -> torch.Tensor:
    """DiffSegmenter baseline maps: the resolutions' refined cross-attention, weighted, summed, min-max normalized.

    per_res: {r: (self_attn (B, r², r²), cross_attn (B, r², K))}, the head- and layer-averaged attention of
        each UNet resolution r (square grids, row-major); any (self, cross) pair unpacks, e.g. the
        ``AttentionMaps`` of ``grounding.models.stable_diffusion``.
    Per resolution the refinement A_self · A_cross (``refined_cross_attention``) runs on its own r×r grid,
    is resized (bilinear, antialiased) to out_res × out_res and weighted [choice]: this never builds the
    (out_res², out_res²) self-attention that upsampling A_self itself would need. The weights are
    renormalized over the resolutions present [choice] (the min-max normalization makes only their
    ratios matter). Returns (B, C, out_res, out_res) in [0, 1].
    """
    if not per_res:
        raise ValueError("weighted_resolution_maps: per_res holds no resolution")
    missing = sorted(set(per_res) - set(weights))
    if missing:
        raise ValueError(
            f"weighted_resolution_maps: no weight for resolution(s) {missing}; weights has {sorted(weights)}"
        )
    total_weight = sum(weights[res] for res in per_res)
    if total_weight <= 0:
        raise ValueError(
            f"weighted_resolution_maps: the weights of resolutions {sorted(per_res)} sum to {total_weight}"
        )
    combined = None
    for res, (self_attn, cross_attn) in sorted(per_res.items()):
        if self_attn.dim() != 3 or self_attn.shape[1] != res * res:
            raise ValueError(
                f"weighted_resolution_maps: resolution {res} needs self_attn (B, {res * res}, {res * res}),"
                f" got {tuple(self_attn.shape)}"
            )
        refined = refined_cross_attention(self_attn, cross_attn, token_groups)
        grid = refined.reshape(refined.shape[0], refined.shape[1], res, res)
        resized = F.interpolate(grid, size=(out_res, out_res), mode="bilinear", align_corners=False, antialias=True)
        term = (weights[res] / total_weight) * resized
        combined = term if combined is None else combined + term
    flat = combined.reshape(combined.shape[0], combined.shape[1], -1)
    return minmax_normalize(flat, eps).reshape(combined.shape)
