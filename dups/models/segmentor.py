"""DUPS + point-based Mask2Former: the semantic segmentation model (paper Sec. 3.3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dups.models.config import decoder_config, encoder_config
from dups.models.decoder import MaskedTransformerDecoder, PointPixelDecoder, Prediction
from dups.models.attention import set_backend
from dups.models.encoder import DUPSEncoder
from dups.models.ratios import RatioPolicy
from dups.models.tokens import real_counts
from dups.models.upsampling import UpsampleRecord, eq1_painters

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

def build_segmentor(name: str, num_classes: int = 150, encoder: dict | None = None,
                    decoder: dict | None = None) -> DUPSSegmentor:
    """The named size (``dups_tiny`` ...) with optional encoder/decoder field overrides."""
    enc = DUPSEncoder(encoder_config(name, **(encoder or {})))
    seg = DUPSSegmentor(enc, num_classes, decoder_config(name, **(decoder or {})))
    return seg
