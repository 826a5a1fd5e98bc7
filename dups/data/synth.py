"""Synthetic scenes, the one generator of demos, tests and benchmarks: in the ADE20K layout
on disk (so they run the real reader) or as tensors.

Two styles: ``rooms`` (the demo's: large regions, a sky band, a wall or building, a floor,
and a few small objects) and ``shapes`` (overlapping rectangles and discs on a background;
on disk classes 1..8 as well, the background 1).
Every class has its own colour and texture, so the boundaries are real and a model can learn
them. On disk, labels follow ADE20K's convention: 0 = "other" (ignored), classes 1..K.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SYNTH_CLASSES = 8  # classes 1..8 (0 is ADE20K's "other")


def _palette(rng: np.random.Generator, k: int):
    colours = rng.uniform(30, 225, size=(k + 1, 3))
    freqs = rng.uniform(0.05, 0.6, size=(k + 1, 2))
    return colours, freqs


def _rooms(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A label map of large regions (a sky band, a wall or building, a floor) and a few small
    objects (boxes, discs, thin poles) of other classes; 0 ("other") on a few rows."""
    label = np.zeros((height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    horizon = int(rng.uniform(0.25, 0.55) * height)
    floor = int(rng.uniform(0.7, 0.9) * height)
    wavy = (horizon + 6 * np.sin(xx / rng.uniform(15, 40))).astype(int)
    label[yy < wavy] = 1  # sky
    label[(yy >= wavy) & (yy < floor)] = rng.choice([2, 3])  # wall or building
    label[yy >= floor] = 4  # floor
    for _ in range(int(rng.integers(3, 8))):  # small objects
        cls = int(rng.integers(5, SYNTH_CLASSES + 1))
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        r = int(rng.integers(4, max(6, min(height, width) // 8)))
        kind = rng.integers(0, 3)
        if kind == 0:
            region = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < int(r * rng.uniform(0.5, 1.5)))
        elif kind == 1:
            region = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:  # a thin pole
            region = (np.abs(xx - cx) < 2) & (yy > cy - 4 * r) & (yy < cy)
        label[region] = cls
    if rng.random() < 0.5:  # a few unlabelled pixels, as real annotations have
        label[rng.integers(0, height), :] = 0
    return label


def _shapes(rng: np.random.Generator, height: int, width: int, classes: int = SYNTH_CLASSES, first: int = 1) -> np.ndarray:
    """A label map of five overlapping rectangles and discs of classes first+1 .. first+classes-1
    on a background of class ``first``: objects of every size from 8 px to a third of the
    image, no layout to learn."""
    label = np.full((height, width), first, dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(5):
        cls = first + int(rng.integers(1, classes))
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        r = int(rng.integers(8, max(9, min(height, width) // 3)))
        if rng.random() < 0.5:
            region = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r * 3 // 4)
        else:
            region = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        label[region] = cls
    return label


STYLES = {"rooms": _rooms, "shapes": _shapes}


def scene(rng: np.random.Generator, height: int, width: int, palette, style: str = "rooms"):
    """(RGB uint8 image, uint8 label) of one scene of ``style`` (``STYLES``): every class its
    own colour and texture, plus noise."""
    colours, freqs = palette
    label = STYLES[style](rng, height, width)
    yy, xx = np.mgrid[0:height, 0:width]
    f = freqs[label]
    texture = np.sin(xx * f[..., 0] + yy * f[..., 1]) * 25
    image = colours[label] + texture[..., None] + rng.normal(0, 6, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def tensor_scenes(n: int, size: int = 128, classes: int = 5, seed: int = 0):
    """(images (n, 3, size, size) normalised as the model reads them, labels (n, size, size)
    in [0, classes)): ``shapes`` scenes for tests and benchmarks that need no files."""
    import torch

    from dups.data.images import normalise

    rng = np.random.default_rng(seed)
    colours, freqs = _palette(rng, classes - 1)
    images, labels = [], []
    for _ in range(n):
        label = _shapes(rng, size, size, classes, first=0)
        yy, xx = np.mgrid[0:size, 0:size]
        f = freqs[label]
        texture = np.sin(xx * f[..., 0] + yy * f[..., 1]) * 25
        image = np.clip(colours[label] + texture[..., None] + rng.normal(0, 6, size=(size, size, 3)), 0, 255)
        images.append(normalise(image.astype(np.uint8)))
        labels.append(torch.from_numpy(label.astype(np.int64)))
    return torch.stack(images), torch.stack(labels)


def write_ade20k_layout(out: str | Path, train: int = 32, val: int = 8, size: tuple[int, int] = (256, 320),
                        seed: int = 0, style: str = "rooms") -> Path:
    """Writes ``out/images/{training,validation}/*.jpg`` and ``out/annotations/.../*.png``:
    scenes of ``style`` (``STYLES``)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    palette = _palette(rng, SYNTH_CLASSES)
    for split, n, tag in (("training", train, "train"), ("validation", val, "val")):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            # Sizes vary by any pixel count, as in ADE20K (multiples of 32 once hid an evaluation
            # crash on padded images).
            h = int(size[0] + rng.integers(-32, 33))
            w = int(size[1] + rng.integers(-32, 33))
            image, label = scene(rng, h, w, palette, style)
            stem = f"SYN_{tag}_{i + 1:08d}"
            Image.fromarray(image).save(out / "images" / split / f"{stem}.jpg", quality=92)
            Image.fromarray(label).save(out / "annotations" / split / f"{stem}.png")
    return out


def write_imagenet_layout(out: str | Path, classes: int = 8, train_per_class: int = 32,
                          val_per_class: int = 8, size: tuple[int, int] = (256, 320), seed: int = 0) -> Path:
    """Writes ``out/train/<wnid>/*.JPEG`` and ``out/val/<wnid>/*.JPEG``: each class a colour
    and texture of its own (learnable), for rehearsals of pre-training."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    colours, freqs = _palette(rng, classes)
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            wnid = f"n{c:08d}"
            (out / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                texture = np.sin(xx * freqs[c, 0] + yy * freqs[c, 1] + rng.uniform(0, 6)) * 25
                image = colours[c] + texture[..., None] + rng.normal(0, 10, size=(*size, 3))
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                    out / split / wnid / f"{wnid}_{split}_{i:05d}.JPEG", quality=90)
    return out
