import math

import pytest
import torch

from grounding.constants import CLIP_MEAN
from grounding.data.region_views import (
    crop_box,
    crop_view,
    default_thickness,
    mask_box,
    masked_crop_view,
    red_circle_view,
)

H, W = 10, 14


def l_shaped_mask() -> torch.Tensor:
    """An L of pixels whose box is x 3..9, y 2..7 (exclusive ends): not a rectangle, so masking shows."""
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[2:7, 3:5] = True  # vertical bar, rows 2..6
    mask[5:7, 3:9] = True  # foot, columns 3..8
    return mask


def hand_made_image(dtype=torch.uint8) -> torch.Tensor:
    """Every pixel distinct: value encodes channel, row and column."""
    c, y, x = torch.meshgrid(torch.arange(3), torch.arange(H), torch.arange(W), indexing="ij")
    values = (c * 40 + y * W + x) % 256  # distinct within each channel (H × W = 140 < 256)
    return values.to(torch.uint8) if dtype == torch.uint8 else (values.to(dtype) / 255.0)


def test_mask_box_is_the_exclusive_pixel_box():
    assert mask_box(l_shaped_mask()) == (3, 2, 9, 7)
    single = torch.zeros(5, 6, dtype=torch.bool)
    single[4, 0] = True
    assert mask_box(single) == (0, 4, 1, 5)
    assert mask_box(torch.ones(5, 6, dtype=torch.bool)) == (0, 0, 6, 5)


def test_empty_mask_is_an_error_with_a_clear_message():
    image, empty = hand_made_image(), torch.zeros(H, W, dtype=torch.bool)
    for call in (lambda: mask_box(empty), lambda: crop_view(image, empty), lambda: masked_crop_view(image, empty),
                 lambda: red_circle_view(image, empty)):
        with pytest.raises(ValueError, match=r"^empty mask: no region to crop$"):
            call()


def test_crop_equals_direct_slicing():
    image = hand_made_image()
    view = crop_view(image, l_shaped_mask())
    assert view.dtype == torch.uint8
    assert torch.equal(view, image[:, 2:7, 3:9])
    view[:] = 0  # a copy, not a view of the input
    assert image[:, 2:7, 3:9].any()


def test_margin_enlarges_the_box_and_clips_at_the_border():
    image, mask = hand_made_image(), l_shaped_mask()  # box w 6, h 5
    # 0.25: 1.5 -> 2 px left/right, 1.25 -> 1 px top/bottom
    assert crop_box(mask, 0.25) == (1, 1, 11, 8)
    assert torch.equal(crop_view(image, mask, margin=0.25), image[:, 1:8, 1:11])
    # 0.5: 3 px left/right (x 0..12), 2.5 -> 3 px top/bottom: y -1 clipped to 0, 10 = H
    assert crop_box(mask, 0.5) == (0, 0, 12, 10)
    assert torch.equal(crop_view(image, mask, margin=0.5), image[:, 0:10, 0:12])
    assert torch.equal(crop_view(image, mask, margin=10.0), image)
    with pytest.raises(ValueError, match="margin"):
        crop_view(image, mask, margin=-0.1)


def test_masked_crop_keeps_the_mask_and_fills_the_rest_uint8():
    image, mask = hand_made_image(), l_shaped_mask()
    view = masked_crop_view(image, mask, margin=0.25)
    assert view.dtype == torch.uint8 and view.shape == (3, 7, 10)
    inside = mask[1:8, 1:11]
    crop = image[:, 1:8, 1:11]
    assert torch.equal(view[:, inside], crop[:, inside])
    expected_fill = torch.tensor([123, 117, 104], dtype=torch.uint8)  # round(255 × CLIP mean)
    assert torch.equal(view[:, ~inside], expected_fill.view(3, 1).expand(3, int((~inside).sum())))
    assert (~inside).sum() > 0 and inside.sum() == mask.sum()


def test_masked_crop_float_uses_the_fill_as_given():
    image, mask = hand_made_image(torch.float32), l_shaped_mask()
    view = masked_crop_view(image, mask)
    assert view.dtype == torch.float32 and view.shape == (3, 5, 6)
    inside = mask[2:7, 3:9]
    assert torch.equal(view[:, inside], image[:, 2:7, 3:9][:, inside])
    fill = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1)
    assert torch.equal(view[:, ~inside], fill.expand(3, int((~inside).sum())))
    # after CLIP normalisation the blanked pixels are exactly 0
    normalized = (view - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / 0.27
    assert torch.equal(normalized[:, ~inside], torch.zeros(3, int((~inside).sum())))
    custom = masked_crop_view(image, mask, fill=(0.0, 1.0, 0.5))
    assert torch.equal(custom[:, ~inside][:, 0], torch.tensor([0.0, 1.0, 0.5]))


# ----------------------------------------------------------------------------------------------------------
# red circle
# ----------------------------------------------------------------------------------------------------------


def true_distance_to_ellipse(height, width, box, coarse=360, newton_steps=6):
    """Euclidean distance from every pixel centre to the circumscribed ellipse (coarse search + Newton)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    a, b = math.sqrt(2) * (x1 - x0) / 2, math.sqrt(2) * (y1 - y0) / 2
    qy, qx = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5 - cy,
                            torch.arange(width, dtype=torch.float64) + 0.5 - cx, indexing="ij")
    qx, qy = qx.flatten(), qy.flatten()
    grid = torch.linspace(0, 2 * math.pi, coarse + 1, dtype=torch.float64)[:-1]
    coarse_distance = torch.hypot(a * torch.cos(grid)[None] - qx[:, None], b * torch.sin(grid)[None] - qy[:, None])
    t = grid[coarse_distance.argmin(dim=1)]
    for _ in range(newton_steps):  # minimise |P(t) - q|² / 2, P(t) = (a cos t, b sin t)
        ex, ey = a * torch.cos(t) - qx, b * torch.sin(t) - qy
        first = ex * -a * torch.sin(t) + ey * b * torch.cos(t)
        second = (a * torch.sin(t)) ** 2 + (b * torch.cos(t)) ** 2 - ex * a * torch.cos(t) - ey * b * torch.sin(t)
        t = torch.where(second > 0, t - first / second.clamp_min(1e-12), t)
    refined = torch.hypot(a * torch.cos(t) - qx, b * torch.sin(t) - qy)
    return torch.minimum(refined, coarse_distance.min(dim=1).values).view(height, width)


def noisy_image(height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, 200, (3, height, width), dtype=torch.uint8, generator=generator)  # never pure red


def box_mask(height, width, box):
    x0, y0, x1, y1 = box
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def is_red(image):
    return (image[0] == 255) & (image[1] == 0) & (image[2] == 0)


@pytest.mark.parametrize("box", [(20, 25, 44, 41), (30, 30, 31, 31), (12, 8, 20, 40)])
@pytest.mark.parametrize("thickness", [1, 3])
def test_red_circle_draws_the_circumscribed_ellipse(box, thickness):
    height, width = 64, 80
    image = noisy_image(height, width)
    view = red_circle_view(image, box_mask(height, width, box), thickness=thickness)
    assert view.dtype == torch.uint8 and view.shape == image.shape
    distance = true_distance_to_ellipse(height, width, box)
    red = is_red(view)
    # on the ellipse: red; far from it: untouched (0.25 px of slack for the first-order distance)
    assert red[distance <= thickness / 2 - 0.25].all()
    far = distance > thickness / 2 + 0.25
    assert torch.equal(view[:, far], image[:, far])
    assert not red[far].any()
    assert red.sum() >= 4  # something was drawn


def test_red_circle_passes_through_the_box_corners():
    height, width, box, thickness = 64, 80, (20, 25, 44, 41), 2
    view = red_circle_view(noisy_image(height, width), box_mask(height, width, box), thickness=thickness)
    red = is_red(view)
    x0, y0, x1, y1 = box
    for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1)):  # corners of the continuous box
        assert red[y - thickness:y + thickness, x - thickness:x + thickness].any(), (x, y)
    # the box's own inside and the box edges' midpoints are not on the outline
    assert not red[y0 + 3:y1 - 3, x0 + 3:x1 - 3].any()
    assert not red[(y0 + y1) // 2, x0] and not red[y0, (x0 + x1) // 2]


def test_red_circle_is_clipped_by_the_image_border():
    height, width, box = 40, 50, (0, 0, 12, 10)  # the ellipse leaves the image at the top left
    image = noisy_image(height, width, seed=1)
    view = red_circle_view(image, box_mask(height, width, box), thickness=2)
    distance = true_distance_to_ellipse(height, width, box)
    assert is_red(view)[distance <= 0.75].all()
    far = distance > 1.25
    assert torch.equal(view[:, far], image[:, far])


def test_red_circle_float_image_default_thickness_and_colour():
    height, width, box = 300, 200, (50, 60, 150, 160)
    assert default_thickness(height, width) == 3 and default_thickness(20, 30) == 1
    image = noisy_image(height, width).float() / 255.0
    view = red_circle_view(image, box_mask(height, width, box))
    assert view.dtype == torch.float32
    distance = true_distance_to_ellipse(height, width, box)
    on = distance <= 1.5 - 0.25
    assert torch.equal(view[:, on], torch.tensor([1.0, 0.0, 0.0]).view(3, 1).expand(3, int(on.sum())))
    far = distance > 1.5 + 0.25
    assert torch.equal(view[:, far], image[:, far])
    green = red_circle_view(image, box_mask(height, width, box), colour=(0, 255, 0))
    assert torch.equal(green[:, on][:, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(image, noisy_image(height, width).float() / 255.0)  # the input is left alone


def test_inputs_are_validated():
    image, mask = hand_made_image(), l_shaped_mask()
    with pytest.raises(ValueError, match="does not match"):
        crop_view(image, mask[:, :-1])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        crop_view(image[:2], mask)
    with pytest.raises(TypeError, match="uint8 or floating"):
        crop_view(image.long(), mask)
    assert torch.equal(crop_view(image, mask.to(torch.uint8)), crop_view(image, mask))
