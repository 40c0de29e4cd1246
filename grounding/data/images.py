"""Reading images the way annotation files expect them: RGB, 8 bit, in the orientation of the annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(RuntimeError):
    """An image file that exists but cannot be decoded, or whose size contradicts its annotations."""


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB uint8. 16-bit and float images are rescaled, alpha is composited onto black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        brightest = array.max(initial=0.0)
        if image.mode == "F":  # floats: [0, 1] images, else their own range
            peak = 1.0 if brightest <= 1.0 else brightest
        else:  # integers: 16-bit range unless the values are 8-bit ones stored wide
            peak = 65535.0 if image.mode.startswith("I;16") or brightest > 255 else 255.0
        array = np.clip(np.round(array / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def read_rgb_image(path: str | Path, expected_size: tuple[int, int] | None = None, image_id: int | None = None) -> Image.Image:
    """Load an image as 8-bit RGB.

    expected_size: (width, height) from the annotation file. EXIF orientation is applied when the oriented
    image has that size and the stored one does not (or both match: a flip or 180° turn); the stored pixels
    are used when only they match. Neither matching is an error naming the file and image id, since boxes
    would land in the wrong place.
    """
    where = f"{path}" + (f" (image id {image_id})" if image_id is not None else "")
    try:
        with Image.open(path) as opened:
            opened.load()
            stored = opened.copy()
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"cannot read image {where}: {error}") from error
    oriented = ImageOps.exif_transpose(stored)
    if expected_size is not None:
        expected = tuple(int(v) for v in expected_size)
        if oriented.size == expected:
            stored = oriented
        elif stored.size != expected:
            raise ImageReadError(
                f"image {where} is {stored.size[0]}x{stored.size[1]} (EXIF-oriented {oriented.size[0]}x"
                f"{oriented.size[1]}) but the annotation file says {expected[0]}x{expected[1]}"
            )
    else:
        stored = oriented
    return _to_8bit_rgb(stored)
