"""Readers for the datasets' published layouts: which samples exist, in a fixed order.

A reader only lists files; decoding and checking happen in the shard tasks. An image without
its label (or a label without its image) is reported as a rejected input, never dropped.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("imagenet", "ade20k", "cocostuff", "cityscapes")
SPLITS = ("train", "val")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class SampleRef:
    key: str  # unique within the split, safe as a WebDataset key (no dots)
    image: str  # path of the image file
    label: str | None = None  # path of the raw label PNG (segmentation)
    cls: int | None = None  # class index (classification)
    synset: str | None = None


@dataclass(frozen=True)
class Rejected:
    key: str
    file: str
    reason: str

    def as_dict(self) -> dict:
        return {"key": self.key, "file": self.file, "reason": self.reason}


@dataclass
class Listing:
    samples: list[SampleRef]
    rejected: list[Rejected]
    classes: tuple[str, ...] = ()


def safe_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def _pair(images: dict[str, Path], labels: dict[str, Path], label_of) -> Listing:
    """Matches image stems to label stems (``label_of(image_stem) -> label_stem``)."""
    samples, rejected = [], []
    used = set()
    for stem, img in sorted(images.items()):
        lab = labels.get(label_of(stem))
        if lab is None:
            rejected.append(Rejected(safe_key(stem), str(img), "missing pair: no label for this image"))
            continue
        used.add(label_of(stem))
        samples.append(SampleRef(safe_key(stem), str(img), str(lab)))
    for stem in sorted(set(labels) - used):
        rejected.append(Rejected(safe_key(stem), str(labels[stem]), "missing pair: no image for this label"))
    return Listing(samples, rejected)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def list_ade20k(src: Path, split: str) -> Listing:
    sub = {"train": "training", "val": "validation"}[split]
    images = _images(_require_dir(src / "images" / sub, "ADE20K image folder"))
    labels = {p.stem: p for p in sorted(_require_dir(src / "annotations" / sub, "ADE20K annotation folder").glob("*.png"))}
    return _pair(images, labels, lambda s: s)


def list_cocostuff(src: Path, split: str) -> Listing:
    sub = f"{split}2017"
    image_dir = next((d for d in (src / sub, src / "images" / sub) if d.is_dir()), src / sub)
    label_dir = next((d for d in (src / "stuffthingmaps_trainval2017" / sub, src / "stuffthingmaps" / sub)
                      if d.is_dir()), src / "stuffthingmaps_trainval2017" / sub)
    images = _images(_require_dir(image_dir, "COCO-Stuff image folder"))
    labels = {p.stem: p for p in sorted(_require_dir(label_dir, "COCO-Stuff stuffthingmaps folder").glob("*.png"))}
    return _pair(images, labels, lambda s: s)


def list_cityscapes(src: Path, split: str) -> Listing:
    img_root = _require_dir(src / "leftImg8bit" / split, "Cityscapes leftImg8bit folder")
    lab_root = _require_dir(src / "gtFine" / split, "Cityscapes gtFine folder")
    images = {p.name[: -len("_leftImg8bit.png")]: p for p in sorted(img_root.glob("*/*_leftImg8bit.png"))}
    labels = {p.name[: -len("_gtFine_labelIds.png")]: p for p in sorted(lab_root.glob("*/*_gtFine_labelIds.png"))}
    return _pair(images, labels, lambda s: s)


def _synset_names(src: Path) -> dict[str, str]:
    mapping = src / "LOC_synset_mapping.txt"  # "n01440764 tench, Tinca tinca"
    if not mapping.is_file():
        return {}
    return dict(line.strip().split(" ", 1) for line in mapping.read_text().splitlines() if line.strip())


def _val_labels(src: Path) -> dict[str, str]:
    """image stem -> wnid, from LOC_val_solution.csv or val_labels.txt ("file wnid")."""
    csv_file, txt_file = src / "LOC_val_solution.csv", src / "val_labels.txt"
    if csv_file.is_file():
        with csv_file.open() as f:
            return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    if txt_file.is_file():
        pairs = (line.split() for line in txt_file.read_text().splitlines() if line.strip())
        return {Path(name).stem: wnid for name, wnid in pairs}
    return {}


def list_imagenet(src: Path, split: str) -> Listing:
    """ILSVRC2012: ``train/<wnid>/*.JPEG``; val either in ``val/<wnid>/`` folders or flat in
    ``val/`` with ``LOC_val_solution.csv`` / ``val_labels.txt``. Classes = sorted train wnids."""
    train = _require_dir(src / "train", "ImageNet train folder")
    wnids = sorted(d.name for d in train.iterdir() if d.is_dir())
    index = {w: i for i, w in enumerate(wnids)}
    names = _synset_names(src)
    classes = tuple(f"{w} {names[w]}" if w in names else w for w in wnids)
    folder = _require_dir(src / split, f"ImageNet {split} folder")
    samples, rejected = [], []
    subdirs = [d for d in sorted(folder.iterdir()) if d.is_dir()]
    if subdirs:
        files = [(p, d.name) for d in subdirs for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        labels = _val_labels(src)
        files = [(p, labels.get(p.stem)) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    for path, wnid in files:
        key = safe_key(path.stem)
        if wnid is None:
            rejected.append(Rejected(key, str(path), "missing pair: no class label for this image"))
        elif wnid not in index:
            rejected.append(Rejected(key, str(path), f"unknown synset {wnid!r} (not a train class)"))
        else:
            samples.append(SampleRef(key, str(path), cls=index[wnid], synset=wnid))
    return Listing(samples, rejected, classes)


_LISTERS = {"imagenet": list_imagenet, "ade20k": list_ade20k, "cocostuff": list_cocostuff,
            "cityscapes": list_cityscapes}


def list_split(dataset: str, src: str | Path, split: str) -> Listing:
    if dataset not in _LISTERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source directory does not exist: {src}")
    listing = _LISTERS[dataset](src, split)
    keys = [s.key for s in listing.samples]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"two {dataset} {split} samples share the key {dup!r}")
    if not listing.samples and not listing.rejected:
        raise FileNotFoundError(f"no {dataset} {split} samples found under {src}")
    return listing
