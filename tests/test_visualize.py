"""The TensorBoard drawing helpers: values checked against independent computations or by construction."""

from __future__ import annotations

import pytest
import torch

from grounding.visualize import (colorize_labels, denormalize, detection_panel, draw_boxes, mask_panels,
                                 overlay_heatmap, panel_row, segmentation_panels, upscale)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def random_image(height: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def gray(height: int = 200, width: int = 300, value: int = 128) -> torch.Tensor:
    return torch.full((3, height, width), value, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------- conversions
def test_denormalize_inverts_normalization():
    image = random_image()
    normalized = (image.float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    restored = denormalize(normalized, MEAN, STD)
    assert restored.dtype == torch.uint8 and restored.shape == image.shape
    assert (restored.int() - image.int()).abs().max() <= 1


def test_denormalize_clamps_out_of_range_values():
    pixels = torch.stack([torch.full((2, 2), 100.0), torch.full((2, 2), -100.0), torch.zeros(2, 2)])
    restored = denormalize(pixels, MEAN, STD)
    assert (restored[0] == 255).all() and (restored[1] == 0).all()
    assert (restored[2] == round(MEAN[2] * 255)).all()


@pytest.mark.parametrize("size, expected", [((100, 50), (512, 256)), ((50, 100), (256, 512)), ((37, 101), (188, 512))])
def test_upscale_gives_exact_size_and_scale(size, expected):
    image = random_image(*size)
    large, scale = upscale(image, 512)
    assert tuple(large.shape) == (3, *expected) and large.dtype == torch.uint8
    assert scale == pytest.approx(512 / max(size))


def test_upscale_never_shrinks():
    image = random_image(600, 300)
    large, scale = upscale(image, 512)
    assert scale == 1.0 and torch.equal(large, image)


# ----------------------------------------------------------------------------------------------- maps
def test_overlay_alpha_zero_returns_the_image_exactly():
    image = random_image()
    assert torch.equal(overlay_heatmap(image, torch.rand(7, 5), alpha=0.0), image)


def test_overlay_alpha_one_keeps_no_trace_of_the_image():
    heat = torch.rand(12, 16)
    first, second = overlay_heatmap(random_image(seed=1), heat, 1.0), overlay_heatmap(random_image(seed=2), heat, 1.0)
    assert torch.equal(first, second)


def test_overlay_colormap_ends_are_viridis_ends():
    image = random_image(20, 30)
    low = overlay_heatmap(image, torch.zeros(4, 4), alpha=1.0)
    high = overlay_heatmap(image, torch.ones(3, 9), alpha=1.0)
    assert low.shape == image.shape
    assert (low == torch.tensor([68, 1, 84], dtype=torch.uint8)[:, None, None]).all()
    assert (high == torch.tensor([253, 231, 37], dtype=torch.uint8)[:, None, None]).all()


def test_overlay_half_alpha_is_the_mean_of_image_and_colour():
    image = random_image(10, 10)
    blended = overlay_heatmap(image, torch.zeros(2, 2), alpha=0.5)
    expected = ((image.float() + torch.tensor([68.0, 1.0, 84.0])[:, None, None]) / 2).round()
    assert (blended.float() - expected).abs().max() <= 1


def test_colorize_labels_uses_the_voc_palette_and_white_for_ignore():
    labels = torch.tensor([[0, 1, 2], [3, 15, 255]])
    image = colorize_labels(labels)
    assert image.shape == (3, 2, 3) and image.dtype == torch.uint8
    pixels = image.permute(1, 2, 0).reshape(-1, 3).tolist()
    # VOC: background, aeroplane, bicycle, bird, person
    assert pixels == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [192, 128, 128], [255, 255, 255]]


def test_colorize_labels_rejects_labels_beyond_num_classes():
    colorize_labels(torch.tensor([[0, 20, 255]]), num_classes=21)
    with pytest.raises(ValueError):
        colorize_labels(torch.tensor([[0, 21]]), num_classes=21)


# ----------------------------------------------------------------------------------------------- boxes
def test_draw_boxes_changes_the_outline_and_nothing_far_away():
    image = gray()
    drawn, tags = draw_boxes(image, torch.tensor([[100.0, 80.0, 200.0, 160.0]]), ["cat"], "red", return_tags=True)
    assert drawn.shape == image.shape and torch.equal(image, gray())  # input untouched
    for y, x in [(80, 150), (160, 150), (120, 100), (120, 200)]:  # the four sides (corners inclusive)
        assert drawn[:, y, x].tolist() == [255, 0, 0]
    (x0, y0, x1, y1), = tags
    assert y1 <= 80 and x0 == 100  # above the box, at its left edge
    assert (drawn[:, y0:y1, x0:x1] != image[:, y0:y1, x0:x1]).any()  # tag is drawn
    changed = (drawn != image).any(0)
    changed[80:161, 100:201] = False
    changed[y0:y1, x0:x1] = False
    assert not changed.any()  # nothing outside box and tag


@pytest.mark.parametrize("box", [[250.0, 0.0, 320.0, 50.0], [-40.0, -30.0, 60.0, 40.0], [280.0, 1.0, 299.0, 199.0]])
def test_tag_stays_inside_the_image_for_a_box_at_the_top_edge(box):
    image = gray()
    _, tags = draw_boxes(image, torch.tensor([box]), ["a long label"], "yellow", return_tags=True)
    (x0, y0, x1, y1), = tags
    assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 200
    assert y0 == max(0, int(box[1]))  # inside the box as there is no room above


def test_overlapping_boxes_get_tags_that_do_not_overlap():
    boxes = torch.tensor([[50.0, 60.0, 150.0, 150.0], [55.0, 62.0, 160.0, 140.0], [52.0, 58.0, 140.0, 190.0]])
    _, tags = draw_boxes(gray(), boxes, ["person 0.9", "person 0.5", "dog 0.4"], "orange", return_tags=True)
    assert len(tags) == 3
    for i in range(3):
        for j in range(i + 1, 3):
            a, b = tags[i], tags[j]
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_font_and_lines_scale_with_the_image():
    box = torch.tensor([[10.0, 40.0, 60.0, 90.0]])
    _, small = draw_boxes(gray(128, 128), box, ["x"], "red", return_tags=True)
    _, large = draw_boxes(gray(1024, 1024), box * 8, ["x"], "red", return_tags=True)
    assert large[0][3] - large[0][1] > 2 * (small[0][3] - small[0][1])


# ----------------------------------------------------------------------------------------------- panels
def detection_inputs():
    image = random_image(128, 96)
    gt_boxes = torch.tensor([[10.0, 10.0, 60.0, 70.0], [40.0, 50.0, 90.0, 120.0]])
    pred_boxes = torch.tensor([[12.0, 8.0, 58.0, 72.0], [38.0, 52.0, 92.0, 118.0], [5.0, 5.0, 90.0, 120.0]])
    return image, gt_boxes, ["cat", "dog"], pred_boxes, ["cat", "dog", "bird"], torch.tensor([0.9, 0.6, 0.8])


def test_detection_panel_width_is_two_panels_plus_gap():
    image, *rest = detection_inputs()
    panel = detection_panel(image, *rest, min_long_side=512)
    large, _ = upscale(image, 512)
    assert panel.dtype == torch.uint8 and panel.shape[0] == 3
    assert panel.shape[2] == 2 * large.shape[2] + 4
    assert panel.shape[1] > large.shape[1]  # title strip above


def test_detection_panel_drops_predictions_under_the_threshold():
    image, gt_boxes, gt_labels, pred_boxes, pred_labels, scores = detection_inputs()
    reference = detection_panel(image, gt_boxes, gt_labels, pred_boxes, pred_labels, scores)
    with_low = detection_panel(image, gt_boxes, gt_labels, torch.cat([pred_boxes, torch.tensor([[0.0, 0.0, 50.0, 50.0]])]),
                               pred_labels + ["fish"], torch.cat([scores, torch.tensor([0.1])]))
    assert torch.equal(reference, with_low)
    kept_none = detection_panel(image, gt_boxes, gt_labels, pred_boxes, pred_labels, scores, score_threshold=0.95)
    assert not torch.equal(reference, kept_none)


def test_detection_panel_keeps_the_highest_predictions_whatever_the_input_order():
    image, gt_boxes, gt_labels, pred_boxes, pred_labels, scores = detection_inputs()
    top_two = detection_panel(image, gt_boxes, gt_labels, pred_boxes, pred_labels, scores, max_predictions=2)
    only_two = detection_panel(image, gt_boxes, gt_labels, pred_boxes[[0, 2]], ["cat", "bird"], scores[[0, 2]])
    order = [2, 0, 1]
    shuffled = detection_panel(image, gt_boxes, gt_labels, pred_boxes[order], [pred_labels[i] for i in order],
                               scores[order], max_predictions=2)
    assert torch.equal(top_two, shuffled)
    assert torch.equal(top_two, only_two)


def test_panel_row_sizes_and_title_strip():
    panels = [random_image(100, 50), random_image(30, 90), torch.rand(1, 8, 8)]
    plain = panel_row(panels, height=200, gap=6)
    widths = [100, 600, 200]
    assert tuple(plain.shape) == (3, 200, sum(widths) + 2 * 6)
    assert (plain[:, :, 100:106] == 255).all() and (plain[:, :, 706:712] == 255).all()  # gaps
    titled = panel_row(panels, ["image", "ground truth", "map"], height=200, gap=6)
    strip = titled.shape[1] - 200
    assert strip > 0 and titled.shape[2] == plain.shape[2]
    assert torch.equal(titled[:, strip:], plain)
    assert (titled[:, :strip] != 255).any()  # some title text


def test_panel_row_nearest_keeps_label_colours():
    labels = colorize_labels(torch.tensor([[0, 1], [2, 3]]))
    row = panel_row([labels], height=64, nearest=True)
    colours = {tuple(c) for c in row.permute(1, 2, 0).reshape(-1, 3).tolist()}
    assert colours == {(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)}


def test_mask_panels_one_overlay_per_mask():
    image = random_image(64, 48)
    masks = [torch.rand(16, 12), torch.rand(8, 6), torch.rand(4, 3)]
    row = mask_panels(image, masks, ["level 0 (stride 8)", "level 1 (stride 16)", "level 2 (stride 32)"], min_long_side=256)
    large, _ = upscale(image, 256)
    assert row.shape[2] == 3 * large.shape[2] + 2 * 4
    strip = row.shape[1] - large.shape[1]
    assert torch.equal(row[:, strip:, large.shape[2] + 4:2 * large.shape[2] + 4], overlay_heatmap(large, masks[1]))


def test_segmentation_panels_are_readable_and_keep_the_labels_colours():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    truth = torch.zeros(40, 60, dtype=torch.long)
    truth[:, 30:] = 2
    truth[0, 0] = 255
    prediction = torch.ones(40, 60, dtype=torch.long)
    large, truth_panel, prediction_panel = segmentation_panels(image, truth, prediction)
    assert large.shape == truth_panel.shape == prediction_panel.shape and max(large.shape[-2:]) >= 512
    scale = large.shape[-1] // 60
    palette = colorize_labels(torch.tensor([[0, 1, 2, 255]]))[:, 0].T  # (4, 3) colours of 0, 1, 2, ignore
    assert truth_panel[:, -1, -1].tolist() == palette[2].tolist() and truth_panel[:, 0, 0].tolist() == palette[3].tolist()
    assert truth_panel[:, scale * 20, scale * 10].tolist() == palette[0].tolist()
    assert (prediction_panel == palette[1][:, None, None]).all()


def test_panel_grid_lays_rows_of_columns_and_pads_the_last():
    from grounding.visualize import panel_grid

    panels = [torch.full((3, 10, 20), v, dtype=torch.uint8) for v in (10, 20, 30, 40, 50)]
    grid = panel_grid(panels, columns=2, gap=4)
    assert grid.shape == (3, 3 * 10 + 2 * 4, 2 * 20 + 4)
    assert int(grid[0, 0, 0]) == 10 and int(grid[0, 0, 24]) == 20 and int(grid[0, 14, 0]) == 30
    assert int(grid[0, 28, 0]) == 50 and int(grid[0, 28, 30]) == 255  # the last row padded with white
    with pytest.raises(ValueError, match="columns must be >= 1, got 0"):
        panel_grid(panels, columns=0)


def test_overlay_labels_blends_the_palette_colour_and_keeps_ignored_pixels():
    from grounding.visualize import overlay_labels

    image = torch.full((3, 2, 2), 100, dtype=torch.uint8)
    labels = torch.tensor([[0, 1], [255, 1]])
    palette = torch.tensor([[0, 0, 0], [200, 0, 50]], dtype=torch.uint8)
    out = overlay_labels(image, labels, palette, alpha=0.5)
    assert out[:, 0, 0].tolist() == [50, 50, 50] and out[:, 0, 1].tolist() == [150, 50, 75]
    assert out[:, 1, 0].tolist() == [100, 100, 100]
    with pytest.raises(ValueError, match=r"labels outside the palette's 0..1: 0..2"):
        overlay_labels(image, torch.tensor([[0, 2], [1, 1]]), palette)


def test_labelled_overlay_has_a_legend_row_per_present_class():
    from grounding.visualize import labelled_overlay

    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    labels = torch.zeros(40, 40, dtype=torch.long)
    labels[10:20, 10:20] = 2
    palette = torch.tensor([[0, 0, 0], [0, 255, 0], [255, 0, 0]], dtype=torch.uint8)
    out = labelled_overlay(image, labels, ["background", "grass", "car"], palette, min_long_side=100)
    assert out.shape[-2] >= 100 and out.shape[-1] > 100  # the overlay enlarged to 100 px, the legend beside it
    legend = out[:, :, 104:]
    red = (legend[0] == 255) & (legend[1] == 0) & (legend[2] == 0)
    green = (legend[0] == 0) & (legend[1] == 255) & (legend[2] == 0)
    assert red.sum() > 20 and green.sum() == 0  # a swatch for "car", none for the absent "grass"
