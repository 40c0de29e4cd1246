"""Pictures for TensorBoard: one drawing helper shared by every method.

Detection results, segmentation label maps, soft masks / heat maps and synthesized images all go through the
same few functions, so that every logged picture reads the same way: the image at its original colours,
enlarged to a legible size, with titled panels side by side ("image | ground truth | prediction | ...").

All functions are pure: tensors in, tensors out. Images are ``uint8`` tensors of shape ``(3, H, W)``, ready for
``SummaryWriter.add_image``; boxes are ``(N, 4)`` float tensors in ``x0, y0, x1, y1`` pixel coordinates of the
image they are drawn on. Example (a detection module's validation step)::

    image = denormalize(batch["pixel_values"][0], IMAGENET_MEAN, IMAGENET_STD)
    picture = detection_panel(image, gt_boxes, gt_names, pred_boxes, pred_names, pred_scores)
    experiment.add_image("val/predictions", picture, step)
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor, ImageDraw, ImageFont
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2.functional import resize
from torchvision.utils import draw_bounding_boxes

from grounding.constants import IGNORE_INDEX
from grounding.data.label_maps import voc_palette

Color = str | tuple[int, int, int]

#: anchor colours of the viridis colormap at 0, 1/4, 1/2, 3/4, 1 (perceptually uniform, colour-blind safe)
_VIRIDIS_ANCHORS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_BACKGROUND = 255  # gaps and title strips are white
GT_COLOR = (0, 200, 0)
PRED_COLOR = (255, 140, 0)


# ----------------------------------------------------------------------------------------------- small helpers
@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # scalable bundled font (Pillow >= 10.1)


def _text_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def _as_rgb_uint8(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) or (H, W) image, uint8 or float in [0, 1], 1 or 3 channels -> uint8 (3, H, W)."""
    if image.dim() == 2:
        image = image[None]
    if image.is_floating_point():
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.cpu().contiguous()


def _default_font_size(image: torch.Tensor) -> int:
    return max(10, round(0.03 * max(image.shape[-2:])))


# ----------------------------------------------------------------------------------------------- conversions
def denormalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``(x - mean) / std``: a float image (3, H, W) -> uint8 (3, H, W) at its original colours (clamped)."""
    mean = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    image = pixels.detach().float().cpu() * std + mean
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def upscale(image: torch.Tensor, min_long_side: int = 512) -> tuple[torch.Tensor, float]:
    """Enlarge (never shrink) an image (C, H, W) so its longer side is ``min_long_side``; returns (image, scale).

    Bilinear with antialiasing; multiply box coordinates by ``scale`` to follow the image."""
    height, width = image.shape[-2:]
    long_side = max(height, width)
    if long_side >= min_long_side:
        return image, 1.0
    scale = min_long_side / long_side
    size = [min_long_side, max(1, round(width * scale))] if height >= width else [max(1, round(height * scale)), min_long_side]
    return resize(image, size, antialias=True), scale


# ----------------------------------------------------------------------------------------------- boxes
def _overlaps(a: Sequence[int], b: Sequence[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_tag(x0: int, y: int, x1: int, tag_height: int, image_height: int, placed: list) -> int:
    """Top of a tag spanning columns [x0, x1) near row ``y`` that overlaps no tag in ``placed``: shift down past
    the tags in the way, else up; if neither fits inside the image, keep ``y``."""
    for step in (+1, -1):
        top = y
        for _ in range(len(placed) + 1):
            hits = [t for t in placed if _overlaps((x0, top, x1, top + tag_height), t)]
            if not hits:
                return top
            top = max(t[3] for t in hits) if step > 0 else min(t[1] for t in hits) - tag_height
            if top < 0 or top + tag_height > image_height:
                break
    return y


def draw_boxes(image: torch.Tensor, boxes_xyxy: torch.Tensor, labels: Sequence[str] | None, color: Color | Sequence[Color],
               font_size: int | None = None, line_width: int | None = None, return_tags: bool = False):
    """Boxes (N, 4) in pixel coordinates of ``image`` uint8 (3, H, W), each with a legible label -> uint8 (3, H, W).

    A label is text on a filled tag of the box colour, inside the image: above the box when there is room, else
    just inside its top edge; a tag that would cover an earlier one is shifted down (or up). ``color`` is one
    colour or one per box. Font size and line width follow the image size unless given. With ``return_tags``
    also returns the tag rectangles as a list of (x0, y0, x1, y1), end-exclusive, in drawing order."""
    image = _as_rgb_uint8(image)
    height, width = image.shape[-2:]
    boxes = torch.as_tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4).cpu()
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], dim=1)
    single = isinstance(color, str) or (isinstance(color, tuple) and isinstance(color[0], int))
    colors = [color] * len(boxes) if single else list(color)
    colors = [ImageColor.getrgb(c) if isinstance(c, str) else tuple(c) for c in colors]
    line_width = line_width or max(1, round(max(height, width) / 250))
    tags: list[tuple[int, int, int, int]] = []
    if len(boxes):
        image = draw_bounding_boxes(image, boxes, colors=colors, width=line_width)
    if labels is not None and len(boxes):
        font = _font(font_size or _default_font_size(image))
        pad = max(1, font.size // 6)
        tag_height = _text_height(font) + 2 * pad
        canvas = _to_pil(image)
        draw = ImageDraw.Draw(canvas)
        for box, text, rgb in zip(boxes.tolist(), labels, colors):
            if not text:
                continue
            tag_width = round(font.getlength(text)) + 2 * pad
            x0 = int(min(max(box[0], 0), max(width - tag_width, 0)))
            above = round(box[1]) - tag_height
            y = above if above >= 0 else round(box[1])  # inside the box when there is no room above
            y = int(min(max(y, 0), max(height - tag_height, 0)))
            y = _place_tag(x0, y, x0 + tag_width, tag_height, height, tags)
            tags.append((x0, y, x0 + tag_width, y + tag_height))
            draw.rectangle((x0, y, x0 + tag_width - 1, y + tag_height - 1), fill=rgb)
            luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
            draw.text((x0 + pad, y + pad), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
        image = _from_pil(canvas)
    return (image, tags) if return_tags else image


def detection_panel(image: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: Sequence[str], pred_boxes: torch.Tensor,
                    pred_labels: Sequence[str], pred_scores: torch.Tensor, score_threshold: float = 0.3,
                    max_predictions: int = 20, min_long_side: int = 512) -> torch.Tensor:
    """Titled panels "ground truth" | "predictions" side by side -> uint8 (3, title + H', 2 W' + gap).

    ``image`` uint8 (3, H, W) is upscaled to ``min_long_side`` (H', W'); boxes (N, 4) xyxy are in pixels of
    ``image``; labels are category names. Predictions with score >= ``score_threshold`` are kept, at most
    ``max_predictions``, highest first, labelled "name 0.87"."""
    large, scale = upscale(_as_rgb_uint8(image), min_long_side)
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4).cpu() * scale
    truth = draw_boxes(large, gt_boxes, list(gt_labels), GT_COLOR)
    scores = torch.as_tensor(pred_scores, dtype=torch.float32).reshape(-1).cpu()
    keep = [i for i in scores.argsort(descending=True, stable=True).tolist() if scores[i] >= score_threshold][:max_predictions]
    pred_boxes = torch.as_tensor(pred_boxes, dtype=torch.float32).reshape(-1, 4).cpu()[keep] * scale
    names = [f"{pred_labels[i]} {scores[i]:.2f}" for i in keep]
    predicted = draw_boxes(large, pred_boxes, names, PRED_COLOR)
    titles = [f"ground truth ({len(gt_boxes)})", f"predictions >= {score_threshold:.2f} ({len(keep)})"]
    return panel_row([truth, predicted], titles)


# ----------------------------------------------------------------------------------------------- maps
@functools.lru_cache(maxsize=1)
def _colormap() -> torch.Tensor:
    """(256, 3) float lookup table, linear between the viridis anchor colours."""
    anchors = torch.tensor(_VIRIDIS_ANCHORS, dtype=torch.float32)
    position = torch.linspace(0, len(anchors) - 1, 256)
    low = position.floor().long().clamp(max=len(anchors) - 2)
    weight = (position - low)[:, None]
    return anchors[low] * (1 - weight) + anchors[low + 1] * weight


def overlay_heatmap(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend a (h, w) float map in [0, 1] (any size; resized bilinearly) in viridis over uint8 (3, H, W) -> uint8
    (3, H, W): ``(1 - alpha) * image + alpha * colour(heat)``."""
    image = _as_rgb_uint8(image)
    heat = heat.detach().float().cpu().reshape(heat.shape[-2:])
    heat = F.interpolate(heat[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    colored = _colormap()[(heat.clamp(0, 1) * 255).round().long()].permute(2, 0, 1)
    return ((1 - alpha) * image.float() + alpha * colored).round().clamp(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=8)
def _voc_palette(size: int) -> torch.Tensor:
    """(size, 3) uint8 PASCAL VOC palette (``grounding.data.label_maps.voc_palette``) as a tensor."""
    return torch.from_numpy(voc_palette(size))


def colorize_labels(labels: torch.Tensor, num_classes: int | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """A label map (H, W) of ints -> uint8 (3, H, W) in the PASCAL VOC palette, ``ignore_index`` pixels white.

    With ``num_classes``, a label outside [0, num_classes) other than ``ignore_index`` raises ValueError."""
    labels = labels.detach().long().cpu()
    ignored = labels == ignore_index
    valid = labels[~ignored]
    if valid.numel() and (valid.min() < 0 or (num_classes is not None and valid.max() >= num_classes)):
        raise ValueError(f"labels outside [0, {num_classes}): {valid.min().item()}..{valid.max().item()}")
    size = max(int(valid.max()) + 1 if valid.numel() else 1, num_classes or 0)
    image = _voc_palette(size)[labels.masked_fill(ignored, 0)]
    image[ignored] = 255  # white
    return image.permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------- layout
def panel_row(panels: Sequence[torch.Tensor], titles: Sequence[str] | None = None, height: int | None = None,
              gap: int = 4, nearest: bool | Sequence[bool] = False) -> torch.Tensor:
    """Panels (C, H_i, W_i) of any size (uint8, or float in [0, 1]; 1 or 3 channels) resized to a common
    ``height`` (default: the tallest) and concatenated with white gaps -> uint8 (3, strip + height, sum W_i' +
    gaps), where W_i' = round(W_i * height / H_i) and a white title strip is added above when ``titles`` is given.

    ``nearest`` (one flag, or one per panel) resizes without blending pixels: use it for label maps."""
    panels = [_as_rgb_uint8(panel) for panel in panels]
    flags = [nearest] * len(panels) if isinstance(nearest, bool) else list(nearest)
    height = height or max(panel.shape[-2] for panel in panels)
    resized = []
    for panel, flag in zip(panels, flags):
        if panel.shape[-2] != height:
            size = [height, max(1, round(panel.shape[-1] * height / panel.shape[-2]))]
            mode = InterpolationMode.NEAREST_EXACT if flag else InterpolationMode.BILINEAR
            panel = resize(panel, size, mode, antialias=not flag)
        resized.append(panel)
    spacer = torch.full((3, height, gap), _BACKGROUND, dtype=torch.uint8)
    pieces = [piece for panel in resized for piece in (panel, spacer)][:-1]
    row = torch.cat(pieces, dim=2)
    if not titles:
        return row
    font = _font(max(12, round(0.04 * height)))
    pad = max(2, font.size // 4)
    strip = Image.new("RGB", (row.shape[-1], _text_height(font) + 2 * pad), (_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(strip)
    left = 0
    for panel, title in zip(resized, titles):
        x = left + max(0, (panel.shape[-1] - font.getlength(title)) / 2)  # centred, left-aligned when too long
        draw.text((x, pad), title, fill=(0, 0, 0), font=font)
        left += panel.shape[-1] + gap
    return torch.cat([_from_pil(strip), row], dim=1)


def mask_panels(image: torch.Tensor, masks: Sequence[torch.Tensor], titles: Sequence[str] | None = None,
                min_long_side: int = 512) -> torch.Tensor:
    """Each float mask (h_l, w_l) in [0, 1] overlaid on ``image`` uint8 (3, H, W) upscaled to ``min_long_side``,
    one panel per mask, in a titled row (e.g. "level 0 (stride 8)") -> uint8 (3, strip + H', n W' + gaps)."""
    large, _ = upscale(_as_rgb_uint8(image), min_long_side)
    return panel_row([overlay_heatmap(large, mask) for mask in masks], titles)


def segmentation_panels(image: torch.Tensor, truth: torch.Tensor, prediction: torch.Tensor,
                        min_long_side: int = 512) -> list[torch.Tensor]:
    """[image, ground truth, prediction] at a readable size: uint8 (3, H', W') each, the label maps (H, W) in
    the VOC palette (``colorize_labels``) resized without blending labels. The first panel is the upscaled
    image the callers draw their maps over."""
    large, _ = upscale(_as_rgb_uint8(image), min_long_side)
    size = tuple(large.shape[-2:])

    def colored(labels: torch.Tensor) -> torch.Tensor:
        return F.interpolate(colorize_labels(labels)[None].float(), size=size, mode="nearest")[0].to(torch.uint8)

    return [large, colored(truth), colored(prediction)]


def panel_grid(panels: Sequence[torch.Tensor], titles: Sequence[str] | None = None, columns: int = 4,
               height: int | None = None, gap: int = 4, nearest: bool | Sequence[bool] = False) -> torch.Tensor:
    """Panels laid out ``columns`` to a row (``panel_row`` each, all at the same ``height``), the rows stacked
    with white gaps and padded on the right to the widest -> uint8 (3, H, W). Many panels stay readable this way
    where one row would be thousands of pixels wide."""
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    panels = [_as_rgb_uint8(panel) for panel in panels]
    flags = [nearest] * len(panels) if isinstance(nearest, bool) else list(nearest)
    height = height or max(panel.shape[-2] for panel in panels)
    rows = []
    for start in range(0, len(panels), columns):
        chunk = slice(start, start + columns)
        rows.append(panel_row(panels[chunk], titles[chunk] if titles else None, height, gap, flags[chunk]))
    width = max(row.shape[-1] for row in rows)
    padded = [F.pad(row, (0, width - row.shape[-1]), value=_BACKGROUND) for row in rows]
    spacer = torch.full((3, gap, width), _BACKGROUND, dtype=torch.uint8)
    return torch.cat([piece for row in padded for piece in (row, spacer)][:-1], dim=1)


def overlay_labels(image: torch.Tensor, labels: torch.Tensor, palette: torch.Tensor | np.ndarray | None = None,
                   alpha: float = 0.5, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The label map (H, W) in ``palette`` (N, 3) (default VOC's) blended over ``image`` (3, H, W) with weight
    ``alpha``; ``ignore_index`` pixels keep the image's colour -> uint8 (3, H, W)."""
    image = _as_rgb_uint8(image)
    labels = labels.detach().long().cpu()
    if labels.shape != image.shape[-2:]:
        raise ValueError(f"labels {tuple(labels.shape)} and image {tuple(image.shape[-2:])} differ in size")
    ignored = labels == ignore_index
    colours = torch.as_tensor(palette if palette is not None else _voc_palette(256).numpy(), dtype=torch.uint8)
    valid = labels[~ignored]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= colours.shape[0]):
        raise ValueError(f"labels outside the palette's 0..{colours.shape[0] - 1}: {int(valid.min())}..{int(valid.max())}")
    coloured = colours[labels.masked_fill(ignored, 0)].permute(2, 0, 1).float()
    blended = ((1 - alpha) * image.float() + alpha * coloured).round().clamp(0, 255).to(torch.uint8)
    return torch.where(ignored[None], image, blended)


def legend_panel(names: Sequence[str], colours: torch.Tensor | np.ndarray, font_size: int = 20) -> torch.Tensor:
    """A legend: one line per class, its colour swatch then its name -> uint8 (3, H, W) on white. ``colours``:
    (len(names), 3) uint8, the colour of each name."""
    colours = torch.as_tensor(colours, dtype=torch.uint8)
    if colours.shape != (len(names), 3):
        raise ValueError(f"colours must be ({len(names)}, 3), one per name; got {tuple(colours.shape)}")
    font = _font(font_size)
    line = _text_height(font) + font_size // 2
    pad = max(4, font_size // 2)
    width = 2 * pad + line + pad + max((int(font.getlength(n)) for n in names), default=0)
    picture = Image.new("RGB", (width, 2 * pad + line * max(1, len(names))), (_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(picture)
    for row, (name, colour) in enumerate(zip(names, colours.tolist())):
        top = pad + row * line
        draw.rectangle((pad, top + 2, pad + line - 4, top + line - 2), fill=tuple(colour), outline=(0, 0, 0))
        draw.text((2 * pad + line, top + 2), name, fill=(0, 0, 0), font=font)
    return _from_pil(picture)


def labelled_overlay(image: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                     palette: torch.Tensor | np.ndarray | None = None, min_long_side: int = 512,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The label map over the image, enlarged to a readable size, beside a legend of the classes it holds (name
    per colour) -> uint8 (3, H', W'). ``class_names[v]`` names label value v."""
    colours = torch.as_tensor(palette if palette is not None else _voc_palette(max(256, len(class_names))).numpy(),
                              dtype=torch.uint8)
    overlay = overlay_labels(image, labels, colours, ignore_index=ignore_index)
    large, _ = upscale(overlay, min_long_side)
    present = [int(v) for v in torch.unique(labels.cpu()).tolist() if v != ignore_index]
    names = [class_names[v] if 0 <= v < len(class_names) else str(v) for v in present]
    legend = legend_panel(names, colours[present] if present else torch.zeros(0, 3, dtype=torch.uint8),
                          font_size=max(14, round(0.035 * large.shape[-2])))
    return _beside(large, legend)


def _beside(left: torch.Tensor, right: torch.Tensor, gap: int = 4) -> torch.Tensor:
    """``right`` to the right of ``left`` at its own size, top-aligned, white below it -> uint8 (3, H, W)."""
    height = max(left.shape[-2], right.shape[-2])
    pieces = [F.pad(p, (0, 0, 0, height - p.shape[-2]), value=_BACKGROUND) for p in (left, right)]
    return torch.cat([pieces[0], torch.full((3, height, gap), _BACKGROUND, dtype=torch.uint8), pieces[1]], dim=2)
