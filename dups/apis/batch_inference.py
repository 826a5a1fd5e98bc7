"""`dups predict --ray`: the same outputs as `dups predict`, from a cluster. Ray Data reads the
list of images (a folder or an ``s3://`` prefix), ``map_batches`` runs one model actor per GPU
(or CPU slot) that reads, decodes, segments and writes each image (``labels/NAME.png``,
``overlay/NAME.jpg``, local or S3); the driver writes ``report.json``. A file that does not
decode is named in the report and skipped; the others go on."""
from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path

from dups.data.storage import open_storage

from dups.apis.inference import IMAGE_SUFFIXES, PredictReport, inference_model, list_images

log = logging.getLogger(__name__)


def list_sources(inputs: list[str]) -> list[dict]:
    """{"url", "name"} of every image: files and folders on this machine (as ``dups
    predict`` names them), ``s3://`` objects and prefixes (names relative to the prefix)."""
    local = [i for i in inputs if "://" not in i]
    rows = [{"url": str(path.resolve()), "name": name} for path, name in list_images(local)] if local else []
    for prefix in (i for i in inputs if i.startswith("s3://")):
        names = [n for n in open_storage(prefix).list() if Path(n).suffix.lower() in IMAGE_SUFFIXES]
        if names:
            rows += [{"url": f"{prefix.rstrip('/')}/{n}", "name": str(Path(n).with_suffix(""))} for n in names]
        else:  # one object
            parent, _, base = prefix.rstrip("/").rpartition("/")
            if not open_storage(parent).exists(base):
                raise FileNotFoundError(f"no image or images under {prefix}")
            rows.append({"url": prefix, "name": Path(base).stem})
    clash = len({r["name"] for r in rows}) < len(rows)
    if clash:
        raise ValueError("two inputs would write the same labels/NAME.png: give them in separate runs")
    return rows


def _read(url: str) -> bytes:
    if url.startswith("s3://"):
        parent, _, base = url.rpartition("/")
        return open_storage(parent).get_bytes(base)
    return Path(url).read_bytes()


class Segmenter:
    """One Ray Data actor: the model loaded once, then batches of {"url", "name"} rows."""

    def __init__(self, weights: str, out: str, short_side: int | None, dataset: str | None):
        import torch

        from dups.apis.inference import label_ids
        from dups.apis.pretrained import load_pretrained

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.pre = load_pretrained(weights, "cuda" if torch.cuda.is_available() else "cpu")
        self.short = self.pre.config.data.eval_short_side if short_side is None else short_side
        self.ids, _ = label_ids(self.pre, dataset)
        self.out = open_storage(out)

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        from dups.data.images import decode_rgb

        from dups.evaluation.pictures import overlay
        from dups.apis.inference import _reason, label_image

        errors, good = [], []
        for url in batch["url"]:
            try:
                good.append(decode_rgb(_read(url)))
                errors.append("")
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                good.append(None)
                errors.append(_reason(err))
        images = [im for im in good if im is not None]
        labels = iter(inference_model(self.pre.model, images, short_side=self.short) if images else [])
        classes = self.pre.model.num_classes
        for name, rgb in zip(batch["name"], good):
            if rgb is None:
                continue
            lab = next(labels).numpy()
            for folder, picture, kind in (("labels", label_image(lab, self.ids, classes), "PNG"),
                                          ("overlay", overlay(rgb, lab, classes), "JPEG")):
                buffer = io.BytesIO()
                picture.save(buffer, format=kind, **({"quality": 90} if kind == "JPEG" else {}))
                self.out.put_bytes(f"{folder}/{name}.{'png' if kind == 'PNG' else 'jpg'}", buffer.getvalue())
        return {"url": list(batch["url"]), "error": errors}


def predict_on_ray(weights: str, inputs: list[str], out: str, batch_size: int = 4, actors: int | None = None,
                   short_side: int | None = None, dataset: str | None = None, address: str | None = None,
                   use_gpu: bool | None = None) -> PredictReport:
    """Segments every image of ``inputs`` with ``actors`` model actors on Ray (default: one per
    GPU of the cluster, else one per CPU); outputs as ``dups predict``'s, in ``out`` (local or S3)."""
    import ray

    from dups.cluster.local_ray import init_ray
    from dups.cluster.credentials import forwarded_env

    def absolute(path: str) -> str:  # the actors run in other working directories
        return path if "://" in path else str(Path(path).resolve())

    weights, out = absolute(weights), absolute(out)
    rows = list_sources(inputs)
    started = not ray.is_initialized()
    if started:
        init_ray(address, include_dashboard=False, log_to_driver=True)
    start = time.perf_counter()
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        use_gpu = gpus > 0 if use_gpu is None else use_gpu
        actors = actors or (gpus if use_gpu else max(1, int(resources.get("CPU", 1))))
        env = {"env_vars": {**forwarded_env(False), "OMP_NUM_THREADS": "1"}}
        results = ray.data.from_items(rows).map_batches(
            Segmenter, fn_constructor_kwargs={"weights": weights, "out": out, "short_side": short_side,
                                              "dataset": dataset},
            batch_size=batch_size, concurrency=actors, num_gpus=1 if use_gpu else 0, num_cpus=1,
            runtime_env=env).take_all()
    finally:
        if started:
            ray.shutdown()
    report = PredictReport(out, weights, seconds=time.perf_counter() - start)
    report.failed = [{"file": r["url"], "reason": r["error"]} for r in results if r["error"]]
    report.images = sum(not r["error"] for r in results)
    for bad in report.failed:
        log.error("dups predict: cannot read %s: %s", bad["file"], bad["reason"])
    open_storage(out).put_bytes("report.json", json.dumps(
        {"out": report.out, "source": report.source, "images": report.images, "failed": report.failed,
         "seconds": report.seconds, "actors": actors}, indent=1).encode())
    log.info("predict --ray: %d images in %.1f s (%.2f images/s) on %d actor(s), %d unreadable", report.images,
             report.seconds, report.images / max(report.seconds, 1e-9), actors, len(report.failed))
    return report
