"""Point-based Mask2Former: pixel decoder on sparse tokens, sparse -> dense, masked decoder."""
from .mask2former import MaskedTransformerDecoder, Prediction
from .pixel_decoder import PixelDecoderOutput, PointPixelDecoder

__all__ = ["MaskedTransformerDecoder", "Prediction", "PixelDecoderOutput", "PointPixelDecoder"]
