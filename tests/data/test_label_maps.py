"""Label maps: the one VOC palette every writer and drawing uses, and the layering the data layer keeps (models
import nothing from it)."""

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from grounding.constants import IGNORE_INDEX
from grounding.data.label_maps import read_label_png, voc_palette
from grounding.data.segmentation import SegmentationDataModule
from grounding.visualize import _voc_palette, colorize_labels


def reference_voc_palette(size):
    """The colour map of the VOC development kit (``labelcolormap``), written out independently."""
    colours = []
    for index in range(size):
        red = green = blue = 0
        code = index
        for bit in range(8):
            red |= ((code >> 0) & 1) << (7 - bit)
            green |= ((code >> 1) & 1) << (7 - bit)
            blue |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        colours.append((red, green, blue))
    return np.array(colours, dtype=np.uint8)


def test_the_voc_palette_is_vocs_and_the_drawing_helper_uses_it():
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert np.array_equal(palette, reference_voc_palette(256))
    assert palette[1].tolist() == [128, 0, 0] and palette[15].tolist() == [192, 128, 128]
    assert palette[IGNORE_INDEX].tolist() == [224, 224, 192]  # VOC's border colour
    assert np.array_equal(voc_palette(300)[:256], palette) and voc_palette(300)[256].tolist() == [0, 0, 32]
    assert torch.equal(_voc_palette(300), torch.from_numpy(voc_palette(300)))
    assert colorize_labels(torch.tensor([[15]]))[:, 0, 0].tolist() == [192, 128, 128]


def test_synthetic_label_pngs_and_the_segmentation_datamodule_use_the_same_palette(synthetic_root):
    png = next((synthetic_root / "semantic" / "val").glob("*.png"))
    with Image.open(png) as image:
        assert image.mode == "P"
        assert image.getpalette()[: 3 * 256] == voc_palette().ravel().tolist()
    assert IGNORE_INDEX in np.unique(read_label_png(png))  # the boundary band
    data = SegmentationDataModule(synthetic_root=str(synthetic_root))
    assert torch.equal(data.palette, torch.from_numpy(voc_palette()))


def test_the_clip_models_import_nothing_from_the_data_layer():
    code = ("import sys, grounding.models.clip, grounding.models.clip_tokenizer; "
            "print(sorted(m for m in sys.modules if m.startswith('grounding.data')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
