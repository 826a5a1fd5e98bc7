"""Trained DUPS weights as an MLflow model (the pyfunc flavour): what ``mlflow models serve``,
``mlflow.pyfunc.load_model`` and the Model Registry take.

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
import logging
from pathlib import Path

import mlflow

log = logging.getLogger(__name__)

ARTIFACT = "model"  # the model's folder in its run's artifacts


class DUPSSegmentation(mlflow.pyfunc.PythonModel):
    """Segments encoded images into the label PNGs ``dups predict`` writes."""

    def load_context(self, context) -> None:
        import torch

        from .pretrained import load_pretrained
        from .predict import label_ids

        self.pre = load_pretrained(context.artifacts["weights"],
                                   "cuda" if torch.cuda.is_available() else "cpu")
        self.ids, _ = label_ids(self.pre, None)

    def predict(self, context, model_input, params: dict | None = None):
        import pandas as pd

        from model.images import decode_rgb

        from .predict import label_image

        short = (params or {}).get("short_side")
        short = self.pre.config.data.eval_short_side if short is None or short < 0 else int(short)
        images = [decode_rgb(_bytes(cell)) for cell in model_input["image"]]
        labels = self.pre.model.predict(images, short_side=short) if images else []
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


def log_segmentation_model(weights: str, register_as: str = "") -> str:
    """Logs exported weights (``.safetensors`` with its ``.json`` beside, local) as an MLflow
    model in the active run; ``register_as``: also a new version of that registered model.
    Returns the model's URI."""
    from .export import config_path

    info = mlflow.pyfunc.log_model(
        name=ARTIFACT, python_model=DUPSSegmentation(),
        artifacts={"weights": weights, "config": config_path(weights)}, signature=signature(),
        pip_requirements=_requirements(), registered_model_name=register_as or None)
    log.info("logged the MLflow model %s%s", info.model_uri,
             f" (registered as {register_as})" if register_as else "")
    return info.model_uri


def _requirements() -> list[str]:
    """What the model needs to load, pinned to what is installed here (dups itself included)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("dups", "torch", "numpy", "pillow", "safetensors", "pyyaml", "mlflow", "pandas"):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            out.append(package)
    return out


def log_exported(weights: str, source: str, uri: str = "", register_as: str = "") -> tuple[str, str]:
    """``dups export --mlflow``: exported weights (local or S3) as an MLflow model of the run
    that trained them (found by its ``last_checkpoint`` tag, ``source``), else of a new run
    ``export-<name>`` in experiment ``dups``. Returns (model URI, run id)."""
    import shutil
    import tempfile

    from .checkpoints import local_file
    from .export import config_path
    from .tracking import client_uri

    mlflow.set_tracking_uri(client_uri(uri))
    found = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                               filter_string=f"tags.last_checkpoint = '{source}'")
    with tempfile.TemporaryDirectory(prefix="dups-model-") as tmp:
        local = Path(tmp) / Path(weights).name
        for name, dest in ((weights, local), (config_path(weights), Path(config_path(str(local))))):
            with local_file(name) as got:
                shutil.copyfile(got, dest)
        if found:
            run = mlflow.start_run(run_id=found[0].info.run_id)
        else:
            from .tracking import experiment_id

            run = mlflow.start_run(experiment_id=experiment_id(mlflow.MlflowClient(), "dups", client_uri(uri)),
                                   run_name=f"export-{local.stem}",
                                   tags={"checkpoint": source})
        with run:
            model_uri = log_segmentation_model(str(local), register_as)
            mlflow.set_tag("mlflow_model", model_uri)
    return model_uri, run.info.run_id
