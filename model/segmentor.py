"""DUPS + point-based Mask2Former: the semantic segmentation model (paper Sec. 3.3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import decoder_config, encoder_config
from .decoder import MaskedTransformerDecoder, PointPixelDecoder, Prediction
from .edges import SCORE_SCALES, edge_scores
from .encoder import DUPSEncoder
from .ratios import RatioPolicy
from .upsampling import UpsampleRecord


@dataclass
class SegmentationOutput:
    predictions: list[Prediction]  # deep supervision; the last one is the model's answer
    records: list[UpsampleRecord]  # what each upsampling block scored and chose
    tokens_per_stage: list[int]

    @property
    def final(self) -> Prediction:
        return self.predictions[-1]


def semantic_probabilities(pred: Prediction, size: tuple[int, int]) -> Tensor:
    """sum_q softmax(class)[:-1] * sigmoid(mask), upsampled to ``size``: (B, K, H, W)."""
    masks = F.interpolate(pred.masks, size=size, mode="bilinear", align_corners=False)
    classes = pred.logits.softmax(-1)[..., :-1]
    return torch.einsum("bqk,bqhw->bkhw", classes, masks.sigmoid())


def oracle_maps(labels: Tensor, rate: float, generator: torch.Generator | None = None,
                ignore_index: int = 255) -> dict[int, Tensor] | None:
    """Table 7's oracle: with probability ``rate`` a batch's tokens are chosen by the
    ground-truth edge fractions (returned for ``forward(oracle_maps=...)``), else None."""
    if rate <= 0 or float(torch.rand((), generator=generator)) >= rate:
        return None
    return edge_scores(labels, SCORE_SCALES, ignore_index)


class DUPSSegmentor(nn.Module):
    def __init__(self, encoder: DUPSEncoder, num_classes: int, decoder_cfg):
        super().__init__()
        self.num_classes = num_classes
        self.encoder = encoder
        d = decoder_cfg
        self.pixel_decoder = PointPixelDecoder(
            tuple(reversed(encoder.cfg.dims)), d.dim, d.pixel_layers, d.pixel_heads,
            d.pixel_mlp_ratio, d.mask_dim, encoder.cfg.cluster_size, encoder.cfg.nbhd_size,
            d.centre_embedding)
        self.decoder = MaskedTransformerDecoder(num_classes, d.dim, d.queries, d.layers,
                                                d.heads, d.ffn, d.mask_dim)

    def forward(self, images: Tensor, policy: RatioPolicy | None = None,
                oracle_maps: dict[int, Tensor] | None = None) -> SegmentationOutput:
        enc = self.encoder(images, policy, oracle_maps)
        h, w = images.shape[-2:]
        pix = self.pixel_decoder(enc.levels, h, w)
        preds = self.decoder(pix.maps, pix.mask_features)
        return SegmentationOutput(preds, enc.records, enc.tokens_per_stage)

    @torch.no_grad()
    def predict(self, images: Tensor, policy: RatioPolicy | None = None) -> Tensor:
        """Class probabilities (B, K, H, W) for images of any size: each image is padded to
        multiples of 32 (zeros: the normalised mean) and run on its own, so per-image
        ratios (eq. 1) apply; the padding is cropped away."""
        h, w = images.shape[-2:]
        ph, pw = -h % 32, -w % 32
        out = []
        for image in images:
            padded = F.pad(image[None], (0, pw, 0, ph))
            pred = self(padded, policy).final
            out.append(semantic_probabilities(pred, (h + ph, w + pw))[..., :h, :w])
        return torch.cat(out)


def build_segmentor(name: str, num_classes: int = 150, encoder: dict | None = None,
                    decoder: dict | None = None) -> DUPSSegmentor:
    """The named size (``dups_tiny`` ...) with optional encoder/decoder field overrides."""
    enc = DUPSEncoder(encoder_config(name, **(encoder or {})))
    seg = DUPSSegmentor(enc, num_classes, decoder_config(name, **(decoder or {})))
    return seg
