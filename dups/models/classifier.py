"""The ImageNet pre-training model (paper App. A, C).

The upsampling blocks' scoring is off: tokens are split at random with a ratio that follows a
schedule (1.0 at the start, 0.5 at the end). The final coarse tokens (the descending path's
stage-1 output, which has attended to every finer scale) are mean-pooled into a linear
classifier. The encoder is the segmentation model's, under the same name ``encoder``, so its
state dict loads into the segmentor unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dups.models.config import encoder_config
from dups.models.encoder import DUPSEncoder
from dups.models.ratios import RatioPolicy, ratio_schedule


class DUPSClassifier(nn.Module):
    def __init__(self, encoder: DUPSEncoder, num_classes: int = 1000,
                 schedule: tuple[float, float, str] = (1.0, 0.5, "linear")):
        super().__init__()
        self.encoder = encoder
        width = encoder.cfg.dims[0]
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))
        self.schedule = schedule
        self.progress = 0.0

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1]; sets the random upsampling ratio."""
        self.progress = progress

    @property
    def upsampling_ratio(self) -> float:
        start, end, shape = self.schedule
        return ratio_schedule(self.progress, start, end, shape)

    def forward(self, images: Tensor, policy: RatioPolicy | None = None) -> Tensor:
        policy = policy or RatioPolicy("random", random_ratio=self.upsampling_ratio)
        out = self.encoder(images, policy)
        coarse = out.levels[-1].features  # patch 32, the descending path's last output
        return self.head(coarse.mean(1))


def build_classifier(name: str, num_classes: int = 1000, **encoder_overrides) -> DUPSClassifier:
    return DUPSClassifier(DUPSEncoder(encoder_config(name, **encoder_overrides)), num_classes)


# Encoder tensors of the score heads (and the pixel spread they read). Pre-training selects
# tokens at random and never runs them, so a pre-training checkpoint holds only their
# initialisation: one that lacks them (written before a head input existed) or holds another
# shape (another ``score_cells``) costs nothing, and fine-tuning starts them afresh.
SCORE_HEAD_PREFIXES = ("pixel_spread.",)
SCORE_HEAD_PARTS = (".score.", ".score_in.", ".spread_in.")


def is_score_head(name: str) -> bool:
    """Whether encoder tensor ``name`` (without ``encoder.``) belongs to a score head."""
    return name.startswith(SCORE_HEAD_PREFIXES) or (
        name.startswith("upsample.") and any(part in name for part in SCORE_HEAD_PARTS))


@dataclass
class LoadReport:
    loaded: list[str]
    missing: list[str]  # in the target model, not in the checkpoint
    unexpected: list[str]  # in the checkpoint, not in the target (or of another shape)
    fresh: list[str] = field(default_factory=list)  # score-head tensors left at their initialisation

    def __str__(self) -> str:
        fresh = f"; score-head tensors started afresh {len(self.fresh)}" if self.fresh else ""
        return (f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}"
                f"{': ' + ', '.join(self.missing[:8]) if self.missing else ''}; unexpected "
                f"{len(self.unexpected)}{': ' + ', '.join(self.unexpected[:8]) if self.unexpected else ''}"
                f"{fresh}")


def load_backbone(model: nn.Module, state: dict[str, Tensor]) -> LoadReport:
    """Loads the ``encoder.*`` tensors of a pre-training checkpoint into ``model.encoder``
    and reports what did not match (names or shapes). Score-head tensors that do not match
    are not mismatches: they go to ``fresh`` (see ``SCORE_HEAD_PREFIXES``)."""
    own = model.encoder.state_dict()
    src = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    fits = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    with torch.no_grad():
        for k, v in fits.items():
            own[k].copy_(v)
    missing = set(own) - set(fits)
    unexpected = set(src) - set(fits)
    fresh = {k for k in missing if is_score_head(k)}
    return LoadReport(sorted(fits), sorted(missing - fresh),
                      sorted(("encoder." + k) for k in unexpected if not is_score_head(k)), sorted(fresh))
