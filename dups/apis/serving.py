"""Trained DUPS weights served as an MLflow model (the pyfunc flavour): what ``mlflow models
serve``, ``mlflow.pyfunc.load_model`` and the Model Registry load (``dups.tracking.runs``
logs it).

Input: a table with one column ``image``, each cell an encoded image file (JPEG, PNG ...;
base64 in a served request's JSON). Output: a column ``label``, each cell the PNG that
``dups predict`` writes for that image (the dataset's own ids, at the image's own size). The
param ``short_side`` is ``dups predict --short-side`` (default: the weights'
``data.eval_short_side``). It loads where the ``dups`` package is installed (its requirement,
as an mmsegmentation model needs mmseg): the model folder carries weights and config, not a
copy of the code, which MLflow would put ahead of the installed package in the loading
process's ``sys.path``.
"""
from __future__ import annotations

import io

import mlflow


class DUPSSegmentation(mlflow.pyfunc.PythonModel):
    """Segments encoded images into the label PNGs ``dups predict`` writes."""

    def load_context(self, context) -> None:
        import torch

        from dups.apis.inference import label_ids
        from dups.apis.pretrained import load_pretrained

        self.pre = load_pretrained(context.artifacts["weights"],
                                   "cuda" if torch.cuda.is_available() else "cpu")
        self.ids, _ = label_ids(self.pre, None)

    def predict(self, context, model_input, params: dict | None = None):
        import pandas as pd

        from dups.apis.inference import inference_model, label_image
        from dups.data.images import decode_rgb

        short = (params or {}).get("short_side")
        short = self.pre.config.data.eval_short_side if short is None or short < 0 else int(short)
        images = [decode_rgb(_bytes(cell)) for cell in model_input["image"]]
        labels = inference_model(self.pre.model, images, short_side=short) if images else []
        out = []
        for label in labels:
            buffer = io.BytesIO()
            label_image(label.numpy(), self.ids, self.pre.model.num_classes).save(buffer, format="PNG")
            out.append(buffer.getvalue())
        return pd.DataFrame({"label": out})


def _bytes(cell) -> bytes:
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, str):  # base64, as JSON carries bytes
        import base64

        return base64.b64decode(cell)
    raise ValueError(f"image cells must be the bytes of an encoded image, got {type(cell).__name__}")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]), outputs=Schema([ColSpec("binary", "label")]),
                          params=ParamSchema([ParamSpec("short_side", "long", -1)]))
