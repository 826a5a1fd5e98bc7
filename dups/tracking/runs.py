"""MLflow tracking from rank 0 only; the other ranks get a tracker that does nothing.

The run id travels in the checkpoint, so a restarted or resumed run logs to the same run.
"""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import yaml

from dups.cluster.credentials import redact, redact_tree, split_userinfo

log = logging.getLogger(__name__)

SECRET_WORDS = ("secret", "password", "token", "access_key", "credential")


def _names_secret(key: str) -> bool:
    return any(w in key.lower() for w in SECRET_WORDS)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = redact(str(list(v) if isinstance(v, tuple) else v))[:6000]
    return {k: v for k, v in out.items() if not _names_secret(k)}


def _without_secrets(tree):
    """Tuples as lists (plain YAML) and no key that names a secret."""
    if isinstance(tree, dict):
        return {k: _without_secrets(v) for k, v in tree.items() if not _names_secret(k)}
    return [_without_secrets(v) for v in tree] if isinstance(tree, (list, tuple)) else tree


def git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


DEFAULT_URI = "sqlite:///mlruns.db"


def resolve_uri(uri: str = "") -> str:
    """The config's URI if set, else MLFLOW_TRACKING_URI, else a sqlite store in the cwd;
    ``none`` turns tracking off (a machine without MLflow)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def client_uri(uri: str = "") -> str:
    """The store's URI for MLflow's client. A ``user:password@`` in it moves to MLflow's own
    basic-auth variables, so MLflow never prints it (its "View run at" lines echo the URI)."""
    uri, user, password = split_userinfo(resolve_uri(uri))
    if password:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    return uri


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created if new. In a ``sqlite:///`` store its artifacts go beside
    the database (``<its folder>/mlruns/<name>``), not into whatever folder the run started in."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def config_tracker(cfg, run_id: str | None = None, run_name: str = "", tags: dict | None = None) -> Tracker:
    """The active tracker of a run of ``cfg`` (a pipeline Config): its store and experiment,
    the resolved config as params, the task and model as tags."""
    from dups.models.config import resolved_fields

    params = cfg.to_dict()  # the model's every encoder and decoder field, not the overrides ({} mostly)
    params["model"]["encoder"], params["model"]["decoder"] = resolved_fields(
        cfg.model.name, cfg.model.encoder, cfg.model.decoder)
    return Tracker(True, cfg.tracking.uri, cfg.tracking.experiment,
                   run_name or cfg.tracking.run_name or cfg.name, run_id=run_id, params=params,
                   tags={"task": cfg.train.task, "model": cfg.model.name, **(tags or {})})


class Tracker:
    """Thin wrapper over an MLflow run; ``active=False`` makes every call a no-op."""

    def __init__(self, active: bool, uri: str = "", experiment: str = "dups", run_name: str = "",
                 run_id: str | None = None, params: dict | None = None, tags: dict | None = None):
        self.active = active and resolve_uri(uri) != "none"
        self.run_id = run_id
        self.logged_until = -1  # steps up to here are in the run already (a restart replays them)
        if not self.active:
            return
        import mlflow

        self.mlflow = mlflow
        uri = client_uri(uri)
        mlflow.set_tracking_uri(uri)
        if run_id:
            mlflow.start_run(run_id=run_id)
            history = mlflow.MlflowClient(uri).get_metric_history(run_id, "train/loss")
            self.logged_until = max((m.step for m in history), default=-1)
        else:
            # by id, not mlflow.set_experiment: that caches the experiment of an earlier store
            client = mlflow.MlflowClient(uri)
            exp_id = experiment_id(client, experiment, uri)
            mlflow.start_run(experiment_id=exp_id, run_name=run_name or None)
            if params:  # searchable params, and the merged config (its _base_ files resolved) to read
                mlflow.log_params(flatten(params))
                mlflow.log_text(yaml.safe_dump(_without_secrets(redact_tree(params)), sort_keys=False),
                                "config.yaml")
            mlflow.set_tags({"git_revision": git_revision(), **(tags or {})})
        self.run_id = mlflow.active_run().info.run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.active and step > self.logged_until:
            self.mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.active:
            self.mlflow.log_artifact(str(path), artifact_path=folder)

    def pictures(self, images, names: list[str]) -> None:
        """PIL images as PNG artifacts ``pictures/<name>.png``."""
        if self.active:
            for image, name in zip(images, names):
                self.mlflow.log_image(image, artifact_file=f"pictures/{name}.png")

    def history(self, keys) -> dict[str, list[tuple[int, float]]]:
        """(step, value) of each metric logged to this run so far."""
        if not self.active:
            return {}
        client = self.mlflow.MlflowClient()
        found = {k: [(m.step, m.value) for m in client.get_metric_history(self.run_id, k)] for k in keys}
        return {k: v for k, v in found.items() if v}

    def plot_curves(self) -> None:
        """``plots/curves.png``: the run's curves so far (``dups.tracking.plots``), replaced each time."""
        if self.active:
            from dups.tracking.plots import CURVE_KEYS, curves_figure

            self.mlflow.log_figure(curves_figure(self.history(CURVE_KEYS)), "plots/curves.png")

    def text(self, text: str, name: str) -> None:
        if self.active:
            self.mlflow.log_text(text, name)

    def tag(self, key: str, value: str) -> None:
        if self.active:
            self.mlflow.set_tag(key, value)

    def log_model(self, weights: str, register_as: str = "") -> None:
        """Exported weights (local) as this run's MLflow model, tagged ``mlflow_model``."""
        if self.active:
            self.tag("mlflow_model", log_segmentation_model(weights, register_as))

    def close(self, status: str = "FINISHED") -> None:
        if self.active and self.mlflow.active_run() is not None:
            self.mlflow.end_run(status=status)


# --- trained weights as an MLflow model (``dups.apis.serving`` loads it) -----------------
MODEL_ARTIFACT = "model"  # the model's folder in its run's artifacts


def log_segmentation_model(weights: str, register_as: str = "") -> str:
    """Logs exported weights (``.safetensors`` with its ``.json`` beside, local) as an MLflow
    model in the active run; ``register_as``: also a new version of that registered model.
    Returns the model's URI."""
    import mlflow

    from dups.apis.serving import DUPSSegmentation, signature
    from dups.engine.export import config_path

    info = mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT, python_model=DUPSSegmentation(),
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

    import mlflow

    from dups.engine.checkpoints import local_file
    from dups.engine.export import config_path

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
            run = mlflow.start_run(experiment_id=experiment_id(mlflow.MlflowClient(), "dups", client_uri(uri)),
                                   run_name=f"export-{local.stem}",
                                   tags={"checkpoint": source})
        with run:
            model_uri = log_segmentation_model(str(local), register_as)
            mlflow.set_tag("mlflow_model", model_uri)
    return model_uri, run.info.run_id
