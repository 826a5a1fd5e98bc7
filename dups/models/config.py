"""Named DUPS sizes (paper Table 1) as typed configs: the registry every CLI and test uses."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from dups.models.attention import check_backend


@dataclass(frozen=True)
class EncoderConfig:
    """Widths and depths per stage (stage 1 = 32x32 tokens ... stage 4 = 4x4 tokens).

    ``depths_right`` are the descending-path blocks of stages 1..3 (stage 4 has none).
    Heads default to width / 32 (head size 32, as AutoFocusFormer). ``mlp_ratio`` is chosen
    per size so the full segmentation model lands on the paper's parameter counts.
    """

    dims: tuple[int, int, int, int]
    depths_left: tuple[int, int, int, int]
    depths_right: tuple[int, int, int]
    mlp_ratio: float = 4.0
    head_dim: int = 32
    cluster_size: int = 8  # tokens per cluster along the Hilbert curve (AFF: 8)
    nbhd_size: int = 48  # keys per cluster (AFF: 48)
    # Stage 1 (32x32 tokens, both sides of the U): "global" attention over the whole grid
    # (the paper's "lightweight Vision Transformer") or a natten "window" of grid_kernel^2.
    stage1_attention: str = "global"
    grid_kernel: int = 7  # natten window on the stage-1 grid (7 x 7 = 49 keys)
    image_data: bool = True  # Table 5 "No aux data" turns it off
    # Score heads and children (the paper does not specify them; BENCHMARKS.md section 1b
    # measured these defaults): LayerNorm on the score MLP's input; predictions through a
    # sigmoid (in [0, 1], as the targets); LayerNorm on the children's image-data branch, so
    # children are not near-copies of their parent that the next head cannot tell apart.
    score_norm: bool = True
    score_sigmoid: bool = False
    child_norm: bool = True
    # Each head predicts the edge fractions of an m x m grid of cells of its token (m =
    # score_cells) and scores the token with their mean, which is the token's edge fraction:
    # eq. 1 and tau are unchanged, the loss says where in the token the edges are (1: the
    # paper's one fraction per token).
    score_cells: int = 1
    # The heads predict the square root of the edge fraction (their score is its square) and
    # the score loss compares square roots, so it weighs errors among the small fractions
    # where tau_s lies (0 against 0.03 costs 0.03, not 0.0009); the decision u > tau_s is
    # unchanged. Off: the paper's MSE on the fractions themselves.
    score_root: bool = False
    # Each head also sees how its patch's pixels vary: every 4 x 4-pixel cell -> Linear(48, w)
    # + GELU (w = the finest stage's width), the per-channel standard deviation over the
    # patch's cells -> LayerNorm + Linear(w, d), added to the head's input. A linear 32 x 32
    # stem and one attention block hardly tell a patch that holds two regions from a textured
    # one. Not in the paper (False: the paper's heads). On the demo's scenes, three seeds each
    # (BENCHMARKS.md 1b): block 1's AUC 0.92 -> 0.97; dynamic ratio after 300 / 600 / 1500
    # iterations 0.70 / 0.68 / 0.66x -> 0.67 / 0.65 / 0.635x full (the truth's: 0.63x); dynamic
    # mIoU -0.8 / +0.7 / +0.8. DUPS-Tiny 512^2: +0.11 GFLOPs (+0.15%), +0.06 M parameters.
    score_pixels: bool = True
    # Sinusoidal centre embeddings (not in the paper) on the stem's and the children's tokens:
    # off, as measured (BENCHMARKS.md section 1b: no gain; attention has its position bias)
    centre_embedding: bool = False
    unet: bool = True  # Table 5 "No U-Net": no descending path
    drop_path: float = 0.1
    # auto, torch, natten, xformers or fused (dups/models/attention.py): a preference that each stage
    # takes where its kernel applies; the segmentor's pixel decoder follows it too
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.score_cells not in (1, 2, 4):
            raise ValueError(f"score_cells must be 1, 2 or 4, got {self.score_cells}")
        check_backend(self.attention_backend)
        if self.stage1_attention not in ("global", "window"):
            raise ValueError(f"stage1_attention must be 'global' or 'window', got {self.stage1_attention!r}")
        for d in self.dims:
            if d % self.head_dim:
                raise ValueError(f"width {d} is not a multiple of head_dim {self.head_dim}")

    @property
    def heads(self) -> tuple[int, ...]:
        return tuple(d // self.head_dim for d in self.dims)


ENCODERS: dict[str, EncoderConfig] = {
    # Table 1, exactly.
    "dups_tiny": EncoderConfig(dims=(512, 256, 128, 64), depths_left=(1, 1, 1, 4),
                               depths_right=(4, 16, 4), mlp_ratio=3.0),
    "dups_small": EncoderConfig(dims=(512, 256, 128, 64), depths_left=(2, 2, 2, 2),
                                depths_right=(3, 24, 6), mlp_ratio=4.0),
    "dups_base": EncoderConfig(dims=(768, 384, 192, 96), depths_left=(2, 2, 2, 8),
                               depths_right=(4, 18, 6), mlp_ratio=4.0),
    # Not in the paper: a narrow, shallow model for CPU demos and tests.
    "dups_demo": EncoderConfig(dims=(128, 64, 32, 32), depths_left=(1, 1, 1, 1),
                               depths_right=(1, 1, 1), mlp_ratio=2.0, head_dim=16,
                               drop_path=0.0),
}


def _configured(registry: dict, name: str, kind: str, overrides: dict):
    """The named config with field overrides; an unknown name or field is a clear error."""
    if name not in registry:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(registry)}")
    base = registry[name]
    known = {f.name for f in fields(base)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown {kind} setting(s) {bad}; known: {sorted(known)}")
    # a saved config (JSON) gives tuples back as lists
    return replace(base, **{k: tuple(v) if isinstance(v, list) and isinstance(getattr(base, k), tuple) else v
                            for k, v in overrides.items()})


def resolved_fields(name: str, encoder: dict, decoder: dict) -> tuple[dict, dict]:
    """Every encoder and decoder field of the named model with these overrides, as plain
    dicts: what a checkpoint records, so later changes of a default leave its model as it was
    trained."""
    enc = asdict(encoder_config(name, **encoder))
    dec = asdict(decoder_config(name, **decoder)) if name in DECODERS else {}
    return enc, dec


def encoder_config(name: str, **overrides) -> EncoderConfig:
    return _configured(ENCODERS, name, "encoder", overrides)


@dataclass(frozen=True)
class DecoderConfig:
    """Point-based pixel decoder + Mask2Former transformer decoder (Mask2Former defaults:
    hidden 256, 6 pixel-decoder layers, 100 queries, 9 decoder layers, FFN 2048)."""

    dim: int = 256
    pixel_layers: int = 6
    pixel_heads: int = 8
    pixel_mlp_ratio: float = 4.0
    queries: int = 100
    layers: int = 9
    heads: int = 8
    ffn: int = 2048
    mask_dim: int = 256
    centre_embedding: bool = False  # sinusoidal centre embedding of the pixel decoder's tokens (not in the paper; off as measured)
    # Mask features of unsplit coarse tokens through the finest tokens' FPN step (an unsplit
    # token is its own parent: fuse(lateral + refined feature)), so every stride-4 cell's mask
    # feature comes from one layer. The paper does not say; False: the coarse token's refined
    # feature goes to the mask projection as it is (before 2026-11-30). On: +1.7 mIoU dynamic,
    # +1.9 full, averaged over three paired seeds (BENCHMARKS 1b)
    fuse_coarse: bool = True
    # Image data in the dense stride-4 mask features (the paper densifies after the pixel
    # decoder "for fine-grained correction" and gives split children their patch's pixels, but
    # not this): every 4 x 4 cell's pixels through Linear(48, mask_dim) + LayerNorm, added to
    # its mask feature, so a pixel painted by a coarse token (the inside of a small object no
    # head split) keeps its own appearance. +0.3% of DUPS-Tiny's GFLOPs. On: +3.0 mIoU full,
    # +5.5 dynamic on the demo's scenes (three seeds), and the oracle's choice then loses
    # nothing against full upsampling (BENCHMARKS 1b); False: the paper's literal reading.
    pixel_data: bool = True
    # The pixel data's embedding: Linear(48, h) + GELU + Linear(h, mask_dim) + LayerNorm with
    # h = pixel_data_hidden; 0: Linear(48, mask_dim) + LayerNorm (before 2026-12-01). Where one
    # coarse token paints a small object's inside, its cells differ only by their own pixels;
    # embedded linearly they barely moved the masks there (full upsampling painted as eq. 1
    # would lost as much as the whole dynamic run). With a hidden layer of 128, after the demo's
    # 300 iterations: dynamic +2.4 mIoU (five seeds, every one ahead), full +1.3, the gap
    # between them 2.1 -> 1.0 (BENCHMARKS 1b); +0.6% of DUPS-Tiny's GFLOPs at 512 x 512.
    pixel_data_hidden: int = 128


DECODERS: dict[str, DecoderConfig] = {
    "dups_tiny": DecoderConfig(),
    "dups_small": DecoderConfig(),
    "dups_base": DecoderConfig(),
    "dups_demo": DecoderConfig(dim=64, pixel_layers=2, pixel_heads=4, queries=16, layers=3,
                               heads=4, ffn=256, mask_dim=64),
}


def decoder_config(name: str, **overrides) -> DecoderConfig:
    return _configured(DECODERS, name, "decoder", overrides)
