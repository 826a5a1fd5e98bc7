"""The DUPS network: no I/O, no distributed code."""
from .config import ENCODERS, EncoderConfig, encoder_config
from .encoder import DUPSEncoder, EncoderOutput, Level, build_encoder
from .ratios import PRESETS, RatioPolicy
from .tokens import TokenSet

__all__ = ["ENCODERS", "EncoderConfig", "encoder_config", "DUPSEncoder", "EncoderOutput",
           "Level", "build_encoder", "PRESETS", "RatioPolicy", "TokenSet"]
