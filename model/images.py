"""Photos as cameras and tools write them, turned into the RGB arrays the model reads: the
EXIF orientation applied (what every viewer shows, and what labels drawn on the photo follow,
as detectron2 and OpenCV read them), 16-bit samples scaled to 8 bits (``convert("RGB")``
would clip them to white), grey, palette, CMYK and alpha converted."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def oriented(image: Image.Image) -> Image.Image:
    """The image as shown: its EXIF orientation applied (itself if it has none)."""
    return ImageOps.exif_transpose(image) or image


def rgb(image: Image.Image) -> np.ndarray:
    """H x W x 3 uint8 RGB of a PIL image, oriented as shown. A 16-bit image is scaled to 8
    bits (65535 -> 255); a floating-point one, or 32-bit values beyond 16 bits, is a ValueError."""
    image = oriented(image)
    if image.mode in SIXTEEN_BIT:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{image.mode} image with values {values.min()}..{values.max()}: only 8- and "
                             "16-bit images are read")
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        raise ValueError("floating-point image (mode F): save it as an 8- or 16-bit image")
    return np.asarray(image.convert("RGB"))


def decode_rgb(data: bytes) -> np.ndarray:
    """H x W x 3 uint8 RGB of an encoded image (JPEG, PNG, ...), oriented as shown."""
    with Image.open(io.BytesIO(data)) as image:
        return rgb(image)


def resize(image: np.ndarray, label: np.ndarray | None, height: int, width: int):
    """An RGB array resized bilinearly (Pillow's, antialiased when shrinking) and its label by
    nearest neighbour."""
    img = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    lab = None if label is None else np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
    return img, lab


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    s = short / min(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def resize_short_side(image: np.ndarray, label: np.ndarray | None, short: int):
    """``resize`` to a short side of ``short`` pixels, the aspect ratio kept."""
    return resize(image, label, *short_side_size(*image.shape[:2], short))
