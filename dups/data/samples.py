"""One sample: read, check, remap the label, compute the score maps, encode the tar members.

Members of a segmentation sample: ``img.jpg`` / ``img.png`` (the original bytes, never
re-encoded), ``seg.png`` (train ids, 255 = ignore), ``edge32.npy`` / ``edge16.npy`` /
``edge8.npy`` (float16 edge fractions from ``model.edges``, the function the score loss uses)
and ``json`` (size, source, the upsampling statistics). ImageNet: image, ``cls``, ``json``.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from dups.models.edges import SCORE_SCALES, edge_map, edge_scores
from dups.data.images import rgb

from dups.data.readers import SampleRef


class BadInput(Exception):
    """A sample that cannot be used: ``file`` is the culprit, the message says why."""

    def __init__(self, reason: str, file: str = ""):
        super().__init__(reason)
        self.file = file


def _read(path: str) -> bytes:
    """The file's bytes. An ``OSError`` (EIO, a mount missing on this node) is not the input's
    fault: it fails the shard's task, which is retried and never published without the sample."""
    return Path(path).read_bytes()


def check_image(data: bytes, path: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Fully decodes the image as training will read it (a truncated file fails here; EXIF
    orientation applied, 16-bit scaled); returns its (width, height) as shown."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            stored = im.size
            height, width = rgb(im).shape[:2]
    except Image.DecompressionBombError as err:
        raise BadInput(f"image too large ({err})", path) from err
    except ValueError as err:  # a mode rgb() does not read
        raise BadInput(f"unsupported image: {err}", path) from err
    except Exception as err:
        raise BadInput(f"corrupt or truncated image ({type(err).__name__}: {err})", path) from err
    return (width, height), stored


def read_label(data: bytes, path: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            label = np.array(im)
    except Exception as err:
        raise BadInput(f"corrupt or truncated label ({type(err).__name__}: {err})", path) from err
    if mode not in ("L", "P"):
        raise BadInput(f"label must be an 8-bit single-channel PNG (mode L or P), got mode {mode}", path)
    if label.ndim != 2:
        raise BadInput(f"label must be a single-channel PNG, got shape {label.shape}", path)
    return label


def upsampling_fractions(label: np.ndarray, ignore: int = 255) -> dict[int, float | None]:
    """Per image and scale s: the fraction of s-patches with more than one edge pixel among
    those whose parent (2s) patch needs upsampling (all patches at s = 32) (paper App. A)."""
    import torch

    edge = edge_map(torch.from_numpy(label.astype(np.int64)), ignore).float()[None, None]
    out: dict[int, float | None] = {}
    parent_needs = None
    for s in SCORE_SCALES:  # 32, 16, 8
        h, w = edge.shape[-2:]
        padded = torch.nn.functional.pad(edge, (0, -w % s, 0, -h % s))
        needs = torch.nn.functional.avg_pool2d(padded, s, divisor_override=1)[0, 0] > 1
        if parent_needs is None:
            candidates = torch.ones_like(needs)
        else:
            candidates = parent_needs.repeat_interleave(2, 0).repeat_interleave(2, 1)
            candidates = candidates[: needs.shape[0], : needs.shape[1]]
        n = int(candidates.sum())
        out[s] = float(needs[candidates].float().mean()) if n else None
        parent_needs = needs
    return out


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _png(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label, mode="L").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _image_member(path: str) -> str:
    return "img.png" if path.lower().endswith(".png") else "img.jpg"


def encode_segmentation(ref: SampleRef, table: np.ndarray, valid: np.ndarray) -> tuple[dict, dict]:
    """(tar members, statistics) of one segmentation sample, or BadInput."""
    image = _read(ref.image)
    (width, height), stored = check_image(image, ref.image)
    raw = read_label(_read(ref.label), ref.label)
    if raw.shape != (height, width):
        turned = (f" (it matches the image as stored, {stored[0]}x{stored[1]}; the image's EXIF "
                  "orientation turns it, and labels are read against the image as shown)"
                  if raw.shape == (stored[1], stored[0]) else "")
        raise BadInput(f"label size {raw.shape[1]}x{raw.shape[0]} differs from image size "
                       f"{width}x{height}{turned}", ref.label)
    bad = np.unique(raw[~valid[raw]])
    if bad.size:
        raise BadInput(f"label values out of range: {bad[:10].tolist()}", ref.label)
    label = table[raw]
    fractions = upsampling_fractions(label)
    meta = {"width": width, "height": height, "source": Path(ref.image).name,
            "upsampling_fractions": {str(k): v for k, v in fractions.items()}}
    members = {"__key__": ref.key, _image_member(ref.image): image, "seg.png": _png(label),
               "json": json.dumps(meta, sort_keys=True).encode()}
    for s, scores in edge_scores(label).items():
        members[f"edge{s}.npy"] = _npy(scores.numpy().astype(np.float16))
    return members, fractions


def encode_classification(ref: SampleRef) -> tuple[dict, dict]:
    image = _read(ref.image)
    (width, height), _ = check_image(image, ref.image)
    meta = {"width": width, "height": height, "source": Path(ref.image).name, "synset": ref.synset}
    members = {"__key__": ref.key, _image_member(ref.image): image, "cls": str(ref.cls).encode(),
               "json": json.dumps(meta, sort_keys=True).encode()}
    return members, {}
