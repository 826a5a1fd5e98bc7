"""DUPS + point-based Mask2Former: the semantic segmentation model (paper Sec. 3.3)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .config import decoder_config, encoder_config
from .images import resize_short_side, rgb, short_side_size
from .decoder import MaskedTransformerDecoder, PointPixelDecoder, Prediction
from .attention import set_backend
from .encoder import DUPSEncoder
from .ratios import RatioPolicy
from .tokens import real_counts
from .upsampling import UpsampleRecord, eq1_painters

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


@dataclass
class SegmentationOutput:
    predictions: list[Prediction]  # deep supervision; the last one is the model's answer
    records: list[UpsampleRecord]  # what each upsampling block scored and chose
    token_offsets: list[int]  # the stages' prefix sizes in the final token set
    token_valid: Tensor | None = None  # (B, N) its real rows, for a packed batch

    @property
    def final(self) -> Prediction:
        return self.predictions[-1]

    @property
    def tokens_per_stage(self) -> list[int | float]:
        """Real tokens per stage (a packed batch's mean): read from the device when asked, so
        the forward itself has no host read for it."""
        return real_counts(self.token_offsets, self.token_valid)


def semantic_probabilities(pred: Prediction, size: tuple[int, int]) -> Tensor:
    """sum_q softmax(class)[:-1] * sigmoid(mask), upsampled to ``size``: (B, K, H, W)."""
    masks = F.interpolate(pred.masks, size=size, mode="bilinear", align_corners=False)
    classes = pred.logits.softmax(-1)[..., :-1]
    return torch.einsum("bqk,bqhw->bkhw", classes, masks.sigmoid())


def oracle_maps(maps: dict[int, Tensor], rate: float,
                generator: torch.Generator | None = None) -> dict[int, Tensor] | None:
    """Table 7's oracle: with probability ``rate`` a batch's tokens are chosen by its
    ground-truth edge fractions ``maps`` (the score loss's targets; returned for
    ``forward(oracle_maps=...)``), else None."""
    if rate <= 0 or float(torch.rand((), generator=generator)) >= rate:
        return None
    return maps


class DUPSSegmentor(nn.Module):
    def __init__(self, encoder: DUPSEncoder, num_classes: int, decoder_cfg):
        super().__init__()
        self.num_classes = num_classes
        self.encoder = encoder
        d = decoder_cfg
        self.pixel_decoder = PointPixelDecoder(
            tuple(reversed(encoder.cfg.dims)), d.dim, d.pixel_layers, d.pixel_heads,
            d.pixel_mlp_ratio, d.mask_dim, encoder.cfg.cluster_size, encoder.cfg.nbhd_size,
            d.centre_embedding, d.fuse_coarse, d.pixel_data, d.pixel_data_hidden)
        self.decoder = MaskedTransformerDecoder(num_classes, d.dim, d.queries, d.layers,
                                                d.heads, d.ffn, d.mask_dim)
        set_backend(self.pixel_decoder, encoder.cfg.attention_backend)  # one setting for the model

    def forward(self, images: Tensor, policy: RatioPolicy | None = None,
                oracle_maps: dict[int, Tensor] | None = None, eq1_masks: bool = False) -> SegmentationOutput:
        """``eq1_masks``: paint the mask features with the tokens eq. 1 would keep (the heads'
        scores over ``policy.tau``) rather than with every token of the run's selection, so a
        training step under eq. 2 trains the coarse tokens that inference leaves in place."""
        enc = self.encoder(images, policy, oracle_maps)
        h, w = images.shape[-2:]
        paint = None
        if eq1_masks:
            policy = policy or self.encoder.ratio_policy
            paint = eq1_painters(enc.records, policy.tau)
        pix = self.pixel_decoder(enc.levels, h, w, images, paint)
        preds = self.decoder(pix.maps, pix.mask_features)
        return SegmentationOutput(preds, enc.records, enc.tokens.offsets, enc.tokens.valid)

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu") -> DUPSSegmentor:
        """The model of exported weights (``X.safetensors`` with ``X.json`` beside it, as
        ``dups export`` writes) or of a training checkpoint, local or ``s3://``, in eval mode,
        with its run's ratio policy as default. Nothing is unpickled beyond tensors. (Reading
        files is the pipeline's job: ``pipeline.pretrained``.)"""
        from pipeline.pretrained import load_pretrained

        model = load_pretrained(path, device).model
        if not isinstance(model, cls):
            raise ValueError(f"{path}: these are ImageNet pre-training weights (a classifier), not a "
                             "segmentation model; fine-tune them first (train.pretrained=...)")
        return model

    @torch.no_grad()
    def probabilities(self, images: Tensor, policy: RatioPolicy | None = None) -> Tensor:
        """Class probabilities (B, K, H, W) of a normalised batch of any size: padded to
        multiples of 32 (zeros: the normalised mean) and cropped back. One forward; under
        eq. 1 (per-image budgets) a packed one, which gives each image what it gets alone."""
        policy = policy or self.encoder.ratio_policy
        h, w = images.shape[-2:]
        ph, pw = -h % 32, -w % 32
        out = self(F.pad(images, (0, pw, 0, ph)), policy).final
        return semantic_probabilities(out, (h + ph, w + pw))[..., :h, :w]

    @torch.no_grad()
    def predict(self, images, policy: RatioPolicy | None = None, short_side: int = 0):
        """Class ids (H, W) of one image, or a list of them for a list of images or a
        normalised (B, 3, H, W) batch. Images: RGB of any size (PIL, oriented as their EXIF
        says; H x W x 3 uint8 arrays) or normalised (3, H, W) tensors. Images of one size run
        as one batch (see ``probabilities``). ``short_side``: each image runs at that short
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
        weight = next(self.parameters())  # bf16 weights (``model.to(torch.bfloat16)``) take bf16 inputs
        labels: list[Tensor | None] = [None] * len(inputs)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(inputs):
            by_size.setdefault(tuple(x.shape[-2:]), []).append(i)
        for idx in by_size.values():
            batch = torch.stack([inputs[i] for i in idx]).to(weight.device, weight.dtype)
            for i, probs in zip(idx, self.probabilities(batch, policy)):
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


def build_segmentor(name: str, num_classes: int = 150, encoder: dict | None = None,
                    decoder: dict | None = None) -> DUPSSegmentor:
    """The named size (``dups_tiny`` ...) with optional encoder/decoder field overrides."""
    enc = DUPSEncoder(encoder_config(name, **(encoder or {})))
    seg = DUPSSegmentor(enc, num_classes, decoder_config(name, **(decoder or {})))
    return seg
