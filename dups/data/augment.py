"""Augmentations of the paper's recipe (App. A; Mask2Former's), in numpy + Pillow.

Training (segmentation): random resize to ``crop x [0.5, 2.0]`` on the short side, random
crop, horizontal flip, photometric distortion (Mask2Former's ColorAugSSD), normalisation and
padding to the crop (image 0 = the mean, label 255 = ignore). The score targets are recomputed
from the augmented label, so they describe the image the model sees. Evaluation: the short
side resized (or the image unchanged), and then the shard's precomputed score maps are used.
Every random draw comes from the generator passed in, so a sample's augmentation depends only
on (seed, epoch, stream, index) and replays exactly on resume.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from dups.models.edges import SCORE_SCALES, edge_scores
from dups.data.images import decode_rgb, resize, resize_short_side
from dups.data.images import normalise

from dups.data import classification_aug

IGNORE = 255


def decode_label(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness (+-32), contrast and saturation (x 0.5..1.5), hue (+-18), each with p = 0.5."""
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img = img + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    def contrast(x):
        return x * rng.uniform(0.5, 1.5) if rng.random() < 0.5 else x
    if contrast_first:
        img = contrast(img)
    hsv = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
    if rng.random() < 0.5:
        hsv[..., 1] *= rng.uniform(0.5, 1.5)
    if rng.random() < 0.5:
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18) * 256 / 180) % 256
    img = np.asarray(Image.fromarray(np.clip(hsv, 0, 255).astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first:
        img = contrast(img)
    return np.clip(img, 0, 255).astype(np.uint8)


def pad_to(image: torch.Tensor, label: torch.Tensor, height: int, width: int):
    h, w = label.shape
    image = torch.nn.functional.pad(image, (0, width - w, 0, height - h), value=0.0)
    label = torch.nn.functional.pad(label, (0, width - w, 0, height - h), value=IGNORE)
    return image, label


def train_segmentation(sample: dict, crop: int, rng: np.random.Generator,
                       scale_range=(0.5, 2.0), use_photometric: bool = True,
                       edge_radius: int = 0) -> dict:
    image = decode_rgb(sample["img"])
    label = decode_label(sample["seg.png"])
    image, label = resize_short_side(image, label, int(crop * rng.uniform(*scale_range)))
    h, w = label.shape
    top = int(rng.integers(0, max(h - crop, 0) + 1))
    left = int(rng.integers(0, max(w - crop, 0) + 1))
    image = image[top:top + crop, left:left + crop]
    label = label[top:top + crop, left:left + crop]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    if use_photometric:
        image = photometric(np.ascontiguousarray(image), rng)
    img, lab = pad_to(normalise(image), torch.from_numpy(label.astype(np.int64)), crop, crop)
    return {"image": img, "label": lab, "scores": edge_scores(lab, SCORE_SCALES, IGNORE, edge_radius),
            "key": sample["__key__"]}


def eval_segmentation(sample: dict, short_side: int, edge_radius: int = 0) -> dict:
    """Image resized to ``short_side`` (0 = unchanged) and padded to multiples of 32; the label
    stays at its original size (mIoU is measured there). Score maps: the shard's own when the
    image is unchanged and ``edge_radius`` is the shards' 0, else recomputed from the label."""
    image = decode_rgb(sample["img"])
    label = decode_label(sample["seg.png"])
    unchanged = short_side == 0 or min(label.shape) == short_side
    if unchanged and edge_radius == 0:
        seen = label
        scores = {s: torch.from_numpy(decode_npy(sample[f"edge{s}.npy"]).astype(np.float32)) for s in SCORE_SCALES}
    else:
        image, seen = (image, label) if unchanged else resize_short_side(image, label, short_side)
        scores = edge_scores(seen.astype(np.int64), SCORE_SCALES, IGNORE, edge_radius)
    h, w = seen.shape
    img = normalise(np.ascontiguousarray(image))
    ph, pw = -h % 32, -w % 32
    img = torch.nn.functional.pad(img, (0, pw, 0, ph))
    return {"image": img, "label": torch.from_numpy(label.astype(np.int64)), "scores": scores,
            "size": (h, w), "key": sample["__key__"]}


def train_classification(sample: dict, size: int, rng: np.random.Generator, rand_augment: dict | None = None,
                         random_erasing: float = 0.0) -> dict:
    """RandomResizedCrop (area 0.08..1, ratio 3/4..4/3), a horizontal flip, then optionally
    RandAugment (``rand_augment``: its keywords, ``classification_aug.parse_rand_augment`` of
    timm's notation) and random erasing with probability ``random_erasing``."""
    image = decode_rgb(sample["img"])
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(0.08, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:
        ch = cw = min(h, w)
        top, left = (h - ch) // 2, (w - cw) // 2
    image, _ = resize(image[top:top + ch, left:left + cw], None, size, size)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rand_augment:
        image = classification_aug.rand_augment(np.ascontiguousarray(image), rng, **rand_augment)
    tensor = normalise(np.ascontiguousarray(image))
    if random_erasing > 0:
        tensor = classification_aug.random_erasing(tensor, rng, random_erasing)
    return {"image": tensor, "label": torch.tensor(int(sample["cls"])), "key": sample["__key__"]}


def eval_classification(sample: dict, size: int) -> dict:
    image, _ = resize_short_side(decode_rgb(sample["img"]), None, round(size / 0.875))
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    image = image[top:top + size, left:left + size]
    return {"image": normalise(np.ascontiguousarray(image)), "label": torch.tensor(int(sample["cls"])),
            "key": sample["__key__"]}
