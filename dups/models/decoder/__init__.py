"""Point-based Mask2Former: pixel decoder on sparse tokens, sparse -> dense, masked decoder."""
from dups.models.decoder.mask2former import MaskedTransformerDecoder, Prediction
from dups.models.decoder.pixel_decoder import PixelDecoderOutput, PointPixelDecoder

__all__ = ["MaskedTransformerDecoder", "Prediction", "PixelDecoderOutput", "PointPixelDecoder"]
