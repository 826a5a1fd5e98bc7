"""Loading trained weights and segmenting images, as mmsegmentation's ``init_model`` and
``inference_model``."""
from dups.apis.inference import inference_model, init_model

__all__ = ["init_model", "inference_model"]
