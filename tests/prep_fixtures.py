"""Tiny datasets in their published layouts, made by the tests, with bad inputs on demand."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from dups.data.synth import write_ade20k_layout


def jpeg(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def ade20k_with_bad_inputs(root: Path, train: int = 6, val: int = 2) -> dict[str, str]:
    """Synthetic ADE20K plus one bad input of each kind; returns {file name: expected reason}."""
    write_ade20k_layout(root, train, val, size=(96, 128), seed=1)
    img, ann = root / "images" / "training", root / "annotations" / "training"
    bad = {}
    (img / "BAD_corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 20)
    png(ann / "BAD_corrupt.png", np.ones((64, 64)))
    bad["BAD_corrupt.jpg"] = "corrupt or truncated image"
    data = (img / "SYN_train_00000001.jpg").read_bytes()
    (img / "BAD_truncated.jpg").write_bytes(data[: len(data) // 2])
    png(ann / "BAD_truncated.png", np.ones((96, 128)))
    bad["BAD_truncated.jpg"] = "corrupt or truncated image"
    jpeg(img / "BAD_size.jpg", 64, 96)
    png(ann / "BAD_size.png", np.ones((64, 80)))
    bad["BAD_size.png"] = "label size 80x64 differs from image size 96x64"
    jpeg(img / "BAD_values.jpg", 64, 64)
    lab = np.ones((64, 64))
    lab[10, 10] = 200
    png(ann / "BAD_values.png", lab)
    bad["BAD_values.png"] = "label values out of range: [200]"
    jpeg(img / "BAD_16bit.jpg", 64, 64)  # 16-bit and 1-bit labels index past the value tables
    Image.fromarray(np.full((64, 64), 300, dtype=np.uint16)).save(ann / "BAD_16bit.png")
    bad["BAD_16bit.png"] = "label must be an 8-bit single-channel PNG (mode L or P), got mode I;16"
    jpeg(img / "BAD_1bit.jpg", 64, 64)
    Image.fromarray(np.eye(64, dtype=bool)).save(ann / "BAD_1bit.png")
    bad["BAD_1bit.png"] = "label must be an 8-bit single-channel PNG (mode L or P), got mode 1"
    jpeg(img / "BAD_nolabel.jpg", 64, 64)
    bad["BAD_nolabel.jpg"] = "missing pair: no label for this image"
    png(ann / "BAD_noimage.png", np.ones((64, 64)))
    bad["BAD_noimage.png"] = "missing pair: no image for this label"
    return bad


def cocostuff(root: Path) -> None:
    lab = np.full((48, 64), 255)
    lab[:20] = 0  # person -> 0
    lab[20:, :30] = 91  # category id 92 "banner" -> first stuff class, 80
    lab[20:, 30:] = 181  # id 182 "wood" -> 170
    for split in ("train2017", "val2017"):
        jpeg(root / split / "000000000009.jpg", 48, 64)
        png(root / "stuffthingmaps_trainval2017" / split / "000000000009.png", lab)


def cityscapes(root: Path) -> None:
    lab = np.zeros((64, 128))  # id 0 "unlabeled" -> ignore
    lab[32:] = 7  # road -> 0
    lab[:32, 64:] = 26  # car -> 13
    for split in ("train", "val"):
        name = "aachen_000000_000019"
        img = root / "leftImg8bit" / split / "aachen" / f"{name}_leftImg8bit.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((64, 128, 3), dtype=np.uint8)).save(img)
        png(root / "gtFine" / split / "aachen" / f"{name}_gtFine_labelIds.png", lab)


def imagenet(root: Path) -> None:
    for i, wnid in enumerate(("n01440764", "n01443537")):
        for j in range(2):
            jpeg(root / "train" / wnid / f"{wnid}_{j}.JPEG", 40, 50, seed=i * 10 + j)
    rows = [("ILSVRC2012_val_00000001", "n01443537 1 2 3 4"), ("ILSVRC2012_val_00000002", "n01440764 1 2 3 4")]
    for name, _ in rows:
        jpeg(root / "val" / f"{name}.JPEG", 40, 50, seed=99)
    jpeg(root / "val" / "ILSVRC2012_val_00000003.JPEG", 40, 50)  # no label row
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        w.writerows(rows)
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")


def decode_png(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))
