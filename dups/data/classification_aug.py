"""ImageNet pre-training's regularisation (the DeiT / Swin / AutoFocusFormer recipe that the
paper's pre-training follows): RandAugment and random erasing per sample, Mixup / CutMix
with label smoothing per batch. timm has them but needs torchvision, which would pull a CUDA
torch into every install; these are small re-implementations of the same definitions.

Per-sample draws come from the sample's own generator (so they replay exactly on resume),
the batch mixing from a generator seeded by (seed, step, rank).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL = (124, 116, 104)  # the ImageNet mean: what geometric ops uncover


def _signed(value: float, rng: np.random.Generator) -> float:
    return value if rng.random() < 0.5 else -value


# RandAugment's operations, timm's "increasing" set (inc1): a larger magnitude is always a
# stronger distortion. Each takes (PIL image, magnitude in [0, 1], rng).
def _shear(axis: int):
    def op(img, m, rng):
        s = _signed(0.3 * m, rng)
        coeffs = (1, s, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, s, 1, 0)
        return img.transform(img.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=FILL)
    return op


def _translate(axis: int):
    def op(img, m, rng):
        t = _signed(0.45 * m, rng) * img.size[axis]
        coeffs = (1, 0, t, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, t)
        return img.transform(img.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=FILL)
    return op


def _enhance(kind):
    return lambda img, m, rng: kind(img).enhance(1.0 + _signed(0.9 * m, rng))


OPS = {
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "Rotate": lambda img, m, rng: img.rotate(_signed(30 * m, rng), Image.BILINEAR, fillcolor=FILL),
    "Posterize": lambda img, m, rng: ImageOps.posterize(img, 8 - int(round(4 * m))),
    "Solarize": lambda img, m, rng: ImageOps.solarize(img, 256 - int(round(256 * m))),
    "SolarizeAdd": lambda img, m, rng: Image.fromarray(np.where(
        np.asarray(img) < 128, np.minimum(np.asarray(img).astype(np.int16) + int(110 * m), 255),
        np.asarray(img)).astype(np.uint8)),
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear(0), "ShearY": _shear(1),
    "TranslateXRel": _translate(0), "TranslateYRel": _translate(1),
}


def rand_augment(image: np.ndarray, rng: np.random.Generator, ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5) -> np.ndarray:
    """RandAugment (timm's rand-m9-mstd0.5-inc1 by default): ``ops`` operations drawn
    uniformly, each applied with probability 0.5 at a magnitude drawn around ``magnitude``
    (normal, std ``magnitude_std``, clipped to [0, 10])."""
    img = Image.fromarray(image)
    names = list(OPS)
    for name in rng.choice(names, size=ops):
        if rng.random() < 0.5:
            continue
        m = magnitude if magnitude_std <= 0 else rng.normal(magnitude, magnitude_std)
        img = OPS[str(name)](img, min(max(m, 0.0), MAX_LEVEL) / MAX_LEVEL, rng)
    return np.asarray(img.convert("RGB"))


def parse_rand_augment(spec: str) -> dict:
    """timm's notation "rand-m9-n2-mstd0.5-inc1" -> rand_augment's keywords (n defaults to 2;
    only the increasing operation set, inc1, is implemented)."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"data.rand_augment {spec!r}: expected timm's notation, e.g. 'rand-m9-mstd0.5-inc1'")
    out = {"ops": 2, "magnitude": 9.0, "magnitude_std": 0.0}
    for part in parts[1:]:
        key = part.rstrip("0123456789.")
        value = part[len(key):]
        if key == "m":
            out["magnitude"] = float(value)
        elif key == "n":
            out["ops"] = int(value)
        elif key == "mstd":
            out["magnitude_std"] = float(value)
        elif key == "inc" and value == "1":
            continue
        else:
            raise ValueError(f"data.rand_augment {spec!r}: unknown or unsupported part {part!r} "
                             "(known: m<magnitude>, n<ops>, mstd<std>, inc1)")
    return out


def random_erasing(image: torch.Tensor, rng: np.random.Generator, probability: float = 0.25,
                   area=(0.02, 1 / 3), aspect=(0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al.; timm's mode "pixel"): with ``probability`` one rectangle of
    the normalised image (3, H, W) is replaced by standard-normal noise."""
    if rng.random() >= probability:
        return image
    _, h, w = image.shape
    for _ in range(10):
        target = rng.uniform(*area) * h * w
        ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
        eh, ew = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < eh < h and 0 < ew < w:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            image = image.clone()
            noise = rng.standard_normal((3, eh, ew)).astype(np.float32)
            image[:, top:top + eh, left:left + ew] = torch.from_numpy(noise)
            return image
    return image


def smooth_one_hot(labels: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / classes
    return torch.full((len(labels), classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, classes: int, generator: torch.Generator,
              mixup: float = 0.0, cutmix: float = 0.0, switch_prob: float = 0.5,
              smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (``mixup``: Beta alpha) or CutMix (``cutmix``: Beta alpha; chosen with
    ``switch_prob`` when both are on) of the batch with itself reversed, as timm's Mixup in
    batch mode. Returns the mixed images and soft targets (B, classes), label-smoothed.
    CutMix's weight is the box's actual share of the image after clipping."""
    targets = smooth_one_hot(labels, classes, smoothing)
    if mixup <= 0 and cutmix <= 0:
        return images, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or float(torch.rand((), generator=generator)) < switch_prob)
    alpha = cutmix if use_cutmix else mixup
    lam = _beta(alpha, generator)
    flipped = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(torch.randint(h, (), generator=generator)), int(torch.randint(w, (), generator=generator))
        top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images = images.clone()
        images[..., top:bottom, left:right] = flipped[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (h * w)
    else:
        images = images * lam + flipped * (1 - lam)
    return images, targets * lam + targets.flip(0) * (1 - lam)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw decided by ``generator`` (torch.distributions takes none)."""
    seed = int(torch.randint(2 ** 62, (), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * torch.log_softmax(logits.float(), -1), -1).mean()
