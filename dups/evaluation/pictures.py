"""Figure 3 pictures: image, ground truth, tokens chosen at 32/16/8, prediction, in one row."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dups.data.images import PIXEL_MEAN, PIXEL_STD
from dups.models.upsampling import UpsampleRecord



def palette(classes: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    colours = rng.integers(40, 255, size=(max(classes, 1) + 1, 3), dtype=np.uint8)
    return colours


def colourise(label: np.ndarray, classes: int) -> np.ndarray:
    pal = palette(classes)
    out = pal[np.clip(label, 0, classes - 1)]
    out[label == 255] = 0  # unlabelled: black, as the paper's figure
    return out


def denormalise(image) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8."""
    arr = image.float().cpu().numpy().transpose(1, 2, 0) * PIXEL_STD + PIXEL_MEAN
    return np.clip(arr, 0, 255).astype(np.uint8)


def selection_panel(rgb: np.ndarray, record: UpsampleRecord, sample: int = 0) -> np.ndarray:
    """The image dimmed, with the patches chosen for upsampling outlined and tinted."""
    im = Image.fromarray((rgb * 0.5).astype(np.uint8))
    draw = ImageDraw.Draw(im, "RGBA")
    p = record.patch
    centres, _, selected = record.of_image(sample)
    chosen = centres[selected].cpu().numpy()
    for cx, cy in chosen:
        box = (cx - p / 2, cy - p / 2, cx + p / 2 - 1, cy + p / 2 - 1)
        draw.rectangle(box, fill=(255, 80, 0, 90), outline=(255, 200, 0, 255))
    return np.asarray(im)


def token_figure(image, label: np.ndarray | None, prediction: np.ndarray, records: list[UpsampleRecord],
                 classes: int) -> Image.Image:
    """One row: image | ground truth (when given) | chosen at 32 | 16 | 8 | prediction (sample 0)."""
    rgb = denormalise(image)
    h, w = prediction.shape
    rgb = rgb[:h, :w]
    panels = [rgb] + ([colourise(label, classes)] if label is not None else [])
    panels += [selection_panel(rgb, r)[:h, :w] for r in records]
    panels.append(colourise(prediction, classes))
    gap = np.full((h, 4, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    return Image.fromarray(np.concatenate(row, axis=1))


def overlay(rgb: np.ndarray, prediction: np.ndarray, classes: int, alpha: float = 0.5) -> Image.Image:
    """The prediction's colours blended over the image."""
    blend = rgb.astype(np.float32) * (1 - alpha) + colourise(prediction, classes).astype(np.float32) * alpha
    return Image.fromarray(blend.round().astype(np.uint8))
