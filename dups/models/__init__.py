"""The DUPS network: no I/O, no distributed code."""
from dups.models.config import ENCODERS, EncoderConfig, encoder_config
from dups.models.encoder import DUPSEncoder, EncoderOutput, Level, build_encoder
from dups.models.ratios import PRESETS, RatioPolicy
from dups.models.tokens import TokenSet

__all__ = ["ENCODERS", "EncoderConfig", "encoder_config", "DUPSEncoder", "EncoderOutput",
           "Level", "build_encoder", "PRESETS", "RatioPolicy", "TokenSet"]
