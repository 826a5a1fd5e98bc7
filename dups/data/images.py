"""Photos as cameras and tools write them, turned into the RGB arrays the model reads: the
EXIF orientation applied (what every viewer shows, and what labels drawn on the photo follow,
as detectron2 and OpenCV read them), 16-bit samples scaled to 8 bits (``convert("RGB")``
would clip them to white), grey, palette, CMYK and alpha converted."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

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


# The ImageNet statistics every DUPS model is trained with (RGB, 0..255), as mmsegmentation.
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def normalise(image: np.ndarray) -> Tensor:
    """An H x W x 3 RGB array (0..255) as the model's normalised (3, H, W) float input: the one
    normalisation of training, evaluation and ``predict``."""
    return torch.from_numpy(((image.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1).copy())


def to_input(image) -> Tensor:
    """An RGB image (PIL image, oriented as its EXIF says, or H x W x 3 uint8 array / tensor)
    as the model's normalised (3, H, W) float input; a (3, H, W) float tensor is taken as
    normalised already."""
    if isinstance(image, Tensor) and image.dim() == 3 and image.shape[0] == 3 and image.is_floating_point():
        return image
    arr = rgb(image) if isinstance(image, Image.Image) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H x W x 3), got shape {tuple(arr.shape)}")
    return normalise(arr)
