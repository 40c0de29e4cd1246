"""Reading images the way annotation files expect them: RGB, 8 bit, in the orientation of the annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

#: the suffixes of the image files a folder of images is read for (compared in lower case)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_EXIF_ORIENTATION = 0x0112
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


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


def _header(path: str | Path, where: str) -> tuple[tuple[int, int], tuple[int, int], str | None]:
    """(stored, EXIF-oriented) (width, height) and the format of an image file, from its header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            image_format = image.format
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"cannot read image {where}: {error}") from error
    return (width, height), ((height, width) if orientation in (5, 6, 7, 8) else (width, height)), image_format


def image_sizes(path: str | Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """(stored, EXIF-oriented) (width, height) of an image file, from its header only."""
    stored, oriented, _ = _header(path, str(path))
    return stored, oriented


def _looks_truncated(path: Path, image_format: str | None) -> bool:
    """A JPEG without its end-of-image marker or a PNG without its IEND chunk near the end of the file.

    Entropy-coded JPEG data never holds FF D9 (0xFF bytes are stuffed), so the marker in the last KiB
    means the file was written to the end; files with trailing bytes after it stay valid.
    """
    if image_format not in ("JPEG", "PNG"):
        return False
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(size - 1024, 0))
        tail = handle.read()
    return (b"\xff\xd9" if image_format == "JPEG" else _PNG_END) not in tail


def check_image(path: str | Path, expected_size: tuple[int, int] | None = None, image_id: object = None) -> None:
    """The quick pass over an image before training or evaluation reads it: the header decodes, the size
    (stored or EXIF-oriented) is the annotation file's (width, height), and a JPEG/PNG is not cut short.

    Raises ``ImageReadError`` naming the file and image id; ``FileNotFoundError`` when it is absent.
    """
    where = f"{path}" + (f" (image id {image_id})" if image_id is not None else "")
    stored, oriented, image_format = _header(path, where)
    if expected_size is not None:
        expected = tuple(int(v) for v in expected_size)
        if expected not in (stored, oriented):
            raise ImageReadError(
                f"image {where} is {stored[0]}x{stored[1]} (EXIF-oriented {oriented[0]}x{oriented[1]})"
                f" but the annotation file says {expected[0]}x{expected[1]}"
            )
    if _looks_truncated(Path(path), image_format):
        raise ImageReadError(f"image {where} is truncated: the {image_format} file ends before its end marker")


def image_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image (``read_rgb_image``'s) as a uint8 (3, H, W) tensor."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
