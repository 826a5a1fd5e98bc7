"""A trained model on a user's images, any size, on CPU or GPU: ``init_model`` and
``inference_model`` from Python, ``predict_images`` for `dups predict`.

Per image it writes the label PNG in the dataset's own ids (as its annotations are), a colour
overlay, and on request the token-selection picture and the image's GFLOPs and tokens per
stage. An unreadable image is reported by name (stderr and ``report.json``) and the others are
still processed.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from dups.apis.pretrained import Pretrained, load_pretrained
from dups.data.images import decode_rgb, resize_short_side, rgb, short_side_size, to_input
from dups.engine.progress import ProgressBar
from dups.evaluation.measure import flop_counter
from dups.evaluation.pictures import overlay, token_figure
from dups.models.ratios import RatioPolicy
from dups.models.segmentor import DUPSSegmentor

log = logging.getLogger(__name__)


def init_model(path: str, device: str | torch.device = "cpu") -> DUPSSegmentor:
    """The segmentation model of exported weights (``X.safetensors`` with ``X.json`` beside it,
    as ``dups export`` writes) or of a training checkpoint, local or ``s3://``, in eval mode,
    with its run's ratio policy as default. Nothing is unpickled beyond tensors."""
    model = load_pretrained(path, device).model
    if not isinstance(model, DUPSSegmentor):
        raise ValueError(f"{path}: these are ImageNet pre-training weights (a classifier), not a "
                         "segmentation model; fine-tune them first (train.pretrained=...)")
    return model


@torch.no_grad()
def inference_model(model: DUPSSegmentor, images, policy: RatioPolicy | None = None, short_side: int = 0):
    """Class ids (H, W) of one image, or a list of them for a list of images or a
    normalised (B, 3, H, W) batch. Images: RGB of any size (PIL, oriented as their EXIF
    says; H x W x 3 uint8 arrays) or normalised (3, H, W) tensors. Images of one size run
    as one batch (see ``DUPSSegmentor.probabilities``). ``short_side``: each image runs at that short
    side (resized as evaluation resizes) and its class probabilities are brought back to
    its own size before the argmax, a few classes at a time (memory stays bounded for a
    20-megapixel photo); 0 = as given."""
    single = isinstance(images, (Image.Image, np.ndarray)) or (isinstance(images, Tensor) and images.dim() == 3)
    given = [images] if single else list(images)
    sizes, inputs = [], []
    for im in given:
        if isinstance(im, Tensor):
            x = to_input(im)
            h, w = x.shape[-2:]
            if short_side and min(h, w) != short_side:
                x = F.interpolate(x[None], short_side_size(h, w, short_side), mode="bilinear",
                                  antialias=True, align_corners=False)[0]
        else:
            arr = rgb(im) if isinstance(im, Image.Image) else np.asarray(im)
            h, w = arr.shape[:2]
            if short_side and min(h, w) != short_side:  # uint8, as evaluation resizes
                arr = resize_short_side(arr, None, short_side)[0]
            x = to_input(arr)
        sizes.append((h, w))
        inputs.append(x)
    weight = next(model.parameters())  # bf16 weights (``model.to(torch.bfloat16)``) take bf16 inputs
    labels: list[Tensor | None] = [None] * len(inputs)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(inputs):
        by_size.setdefault(tuple(x.shape[-2:]), []).append(i)
    for idx in by_size.values():
        batch = torch.stack([inputs[i] for i in idx]).to(weight.device, weight.dtype)
        for i, probs in zip(idx, model.probabilities(batch, policy)):
            labels[i] = (probs.argmax(0) if tuple(probs.shape[-2:]) == sizes[i]
                         else _argmax_at(probs, sizes[i])).cpu()
    return labels[0] if single else labels


def _argmax_at(probs: Tensor, size: tuple[int, int], classes_at_once: int = 8) -> Tensor:
    """argmax over classes of ``probs`` (K, h, w) resized bilinearly to ``size``, as evaluation
    resizes them, without holding all K full-size maps at once."""
    best, arg = None, None
    for k in range(0, probs.shape[0], classes_at_once):
        up = F.interpolate(probs[None, k:k + classes_at_once].float(), size=size, mode="bilinear",
                           align_corners=False)[0]
        value, index = up.max(0)
        if best is None:
            best, arg = value, index
        else:
            better = value > best  # (ties: the lower class, as one argmax over all would)
            best, arg = torch.where(better, value, best), torch.where(better, index + k, arg)
    return arg


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(inputs: list[str]) -> list[tuple[Path, str]]:
    """(file, output name without suffix) of every image named, or found (recursively) in a
    folder: a file's own name, or its path inside the folder given, so that equal file names
    in subfolders do not collide. Two inputs that would write the same name are refused."""
    found = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            found += [(p, str(p.relative_to(path).with_suffix(""))) for p in files]
        elif path.is_file():
            found.append((path, path.stem))
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    seen: dict[str, Path] = {}
    for file, name in found:
        if name in seen and seen[name] != file:
            raise ValueError(f"{seen[name]} and {file} would both write labels/{name}.png: give them "
                             "in separate runs (or folders with different layouts)")
        seen[name] = file
    return found


_BYTES_IO = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")


def _reason(err: Exception) -> str:
    """An image's decoding error as one line (Pillow names the in-memory buffer, not the file)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image file Pillow can read (unknown format, or not an image at all)"
    text = _BYTES_IO.sub("", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


class _Images(torch.utils.data.Dataset):
    """Decodes in DataLoader workers; a file that does not decode becomes its error message."""

    def __init__(self, files: list[tuple[Path, str]]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:  # the decoder training and evaluation use: EXIF orientation, 16-bit scaled
            return i, decode_rgb(self.files[i][0].read_bytes()), None
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return i, None, _reason(err)


@dataclass
class PredictReport:
    out: str
    source: str
    images: int = 0
    failed: list[dict] = field(default_factory=list)  # {"file", "reason"}
    seconds: float = 0.0
    stats: list[dict] = field(default_factory=list)  # per image (``stats=True``)


def label_ids(pre: Pretrained, dataset: str | None) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """(train id -> the dataset's label value, class names) of the dataset the model was
    trained on (its upsampling preset unless ``dataset`` is given); (None, ()) if unknown."""
    from dups.data.labels import dataset_ids, remap_table

    dataset = dataset or pre.config.upsampling.preset
    try:
        ids, names = dataset_ids(dataset), remap_table(dataset)[1]
    except (ValueError, ImportError):
        return None, ()
    return (ids, names) if len(ids) == pre.config.model.num_classes else (None, ())


def label_image(label: np.ndarray, ids: np.ndarray | None, classes: int) -> Image.Image:
    """A label map (train ids) as the PNG ``dups predict`` writes: in the dataset's own ids
    (``label_ids``) when known, 8-bit (16 for more than 255 classes)."""
    return Image.fromarray((ids[label] if ids is not None else label).astype(np.uint8 if classes < 256 else np.uint16))


def predict_images(pre: Pretrained, inputs: list[str], out: str, batch_size: int = 4, workers: int = 2,
                   tokens: bool = False, stats: bool = False, dataset: str | None = None,
                   progress: bool = True, short_side: int | None = None) -> PredictReport:
    """Segments every image in ``inputs`` (files or folders) into ``out``: ``labels/NAME.png``,
    ``overlay/NAME.jpg``, with ``tokens`` ``tokens/NAME.png``, with ``stats`` a line per image
    in ``stats.jsonl``; ``report.json`` lists what failed. ``tokens`` and ``stats`` run each
    image on its own, so its FLOPs and chosen tokens are its own. ``short_side``: the size
    each image runs at, labels written at its own size (default: the weights' evaluation
    size, ``data.eval_short_side``; 0 = every image as it is)."""
    model: DUPSSegmentor = pre.model
    if not isinstance(model, DUPSSegmentor):
        raise ValueError(f"{pre.source}: these are ImageNet pre-training weights (a classifier); "
                         "fine-tune them on a segmentation dataset first (train.pretrained=...)")
    files = list_images(inputs)
    short = pre.config.data.eval_short_side if short_side is None else short_side
    ids, names = label_ids(pre, dataset)
    classes = model.num_classes
    root = Path(out)
    report = PredictReport(str(root), pre.source)
    loader = torch.utils.data.DataLoader(_Images(files), batch_size=1 if (tokens or stats) else batch_size,
                                         num_workers=workers, collate_fn=list)
    captured = []
    hook = model.register_forward_hook(lambda _m, _i, output: captured.append(output))
    start = time.perf_counter()
    try:
        bar = ProgressBar(len(files), "predict", "img", disable=not progress)
        for batch in loader:
            good = [(i, pixels) for i, pixels, _ in batch if pixels is not None]
            for i, _, reason in batch:
                if reason is not None:
                    report.failed.append({"file": str(files[i][0]), "reason": reason})
                    bar.write(f"dups predict: cannot read {files[i][0]}: {reason}")
            captured.clear()
            if tokens or stats:
                with flop_counter() as counter:
                    labels = inference_model(model, [pixels for _, pixels in good], short_side=short)
                gflops = counter.get_total_flops() / 2e9
            else:
                labels = inference_model(model, [pixels for _, pixels in good], short_side=short)
            for (i, pixels), lab in zip(good, labels):
                name = files[i][1]
                lab = lab.numpy()
                _save(root / "labels" / f"{name}.png", label_image(lab, ids, classes))
                _save(root / "overlay" / f"{name}.jpg", overlay(pixels, lab, classes), quality=90)
                if tokens:  # drawn at the size the model saw
                    seen, seen_lab = ((pixels, lab) if not short or min(lab.shape) == short
                                      else resize_short_side(pixels, lab.astype(np.uint16), short))
                    _save(root / "tokens" / f"{name}.png", token_figure(
                        to_input(seen), None, seen_lab.astype(np.int64), captured[-1].records, classes))
                if stats:
                    present = np.unique(lab).tolist()
                    report.stats.append({
                        "image": str(files[i][0]), "height": lab.shape[0], "width": lab.shape[1],
                        "gflops": gflops, "tokens_per_stage": captured[-1].tokens_per_stage,
                        "classes": [names[c] if names else int(c) for c in present]})
            report.images += len(good)
            bar.update(len(batch))
        bar.close()
    finally:
        hook.remove()
    report.seconds = time.perf_counter() - start
    root.mkdir(parents=True, exist_ok=True)
    if stats:
        (root / "stats.jsonl").write_text("".join(json.dumps(s) + "\n" for s in report.stats))
    (root / "report.json").write_text(json.dumps({k: v for k, v in asdict(report).items() if k != "stats"},
                                                 indent=1))
    log.info("predict: %d images in %.1f s (%.2f images/s), %d unreadable", report.images, report.seconds,
             report.images / max(report.seconds, 1e-9), len(report.failed))
    return report


def _save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
