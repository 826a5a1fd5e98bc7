"""The preparation job: a dataset in its published layout -> WebDataset shards + manifest.

Ray tasks, one per shard (not Ray Data): a shard is the unit of determinism, idempotence
and failure. The plan (which sample goes to which shard, in which order) is made up front from
the listing (sorted; the training split then put in a seeded order) and the source file sizes,
so the shards' names, order and bytes do not depend on how many workers run them. Each task
checks and encodes its samples, writes the tar with fixed metadata (mtime 0) under a temporary
name, publishes it whole, and writes a ``.json`` sidecar with its sha256, plan digest, counts,
statistics and rejected inputs. A re-run skips every shard whose sidecar matches its plan and
whose bytes still hash to it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dups.cluster.credentials import forwarded_env

from dups.cluster.local_ray import init_ray
from dups.data.readers import DATASETS, Listing, Rejected, SampleRef, list_split
from dups.data.samples import BadInput, encode_classification, encode_segmentation
from dups.data.storage import open_storage, sha256_file

log = logging.getLogger("dups.prep")
DEFAULT_SHARD_BYTES = 1 << 30  # about 1 GB of source files per shard
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
INDEX_EVERY = 64  # a shard's index: the byte offset of every 64th sample (readers seek, not read through)


@dataclass(frozen=True)
class ShardPlan:
    name: str
    split: str
    samples: tuple[SampleRef, ...]


def plan_shards(prefix: str, split: str, samples: list[SampleRef], shard_bytes: int) -> list[ShardPlan]:
    """Consecutive samples until their source files reach ``shard_bytes``. The training split
    is first put in a seeded order (the listing is sorted, ImageNet's by class: a shard of it
    would hold one or two classes), the same on every run."""
    if split == "train":
        samples = list(samples)
        random.Random(f"{prefix}-{split}-order").shuffle(samples)
    plans, current, size = [], [], 0
    for ref in samples:
        nbytes = os.path.getsize(ref.image) + (os.path.getsize(ref.label) if ref.label else 0)
        if current and size + nbytes > shard_bytes:
            plans.append(current)
            current, size = [], 0
        current.append(ref)
        size += nbytes
    if current:
        plans.append(current)
    return [ShardPlan(f"{prefix}-{split}-{i:06d}.tar", split, tuple(p)) for i, p in enumerate(plans)]


def plan_digest(plan: ShardPlan) -> str:
    """Which samples, in which order: a re-run skips a shard only if its plan is unchanged."""
    return hashlib.sha256("\n".join(ref.key for ref in plan.samples).encode()).hexdigest()


def _quarantine(storage, split: str, ref_key: str, path: str) -> str:
    """Copies a rejected input next to the shards; returns where it went (or why not)."""
    name = f"quarantine/{split}/{ref_key}{Path(path).suffix}"
    try:
        storage.put_file(name, path)
        return name
    except OSError as err:
        return f"not copied: {err}"


TEMP_PREFIX = "dups-prep-"  # + the writing process's id: a killed task's folder is known by it


def sample_offsets(tar: str | Path, every: int = INDEX_EVERY) -> list[int]:
    """Byte offsets of samples 0, every, 2 * every ... in a shard: where their first member's
    header starts (a tar read from there is a tar of the samples from there on). Only the
    headers are read."""
    import tarfile

    offsets, key, n = [], None, -1
    with tarfile.open(tar, "r:") as archive:
        for member in archive:
            base = member.name.rsplit("/", 1)[-1]
            sample = member.name[:len(member.name) - len(base)] + base.split(".", 1)[0]  # webdataset's key
            if sample != key:
                key, n = sample, n + 1
                if n % every == 0:
                    offsets.append(member.offset)
    return offsets


def remove_leftovers(tmp: str | None = None) -> list[str]:
    """Removes the temporary folders of shard writers that were killed (their process is gone)."""
    removed = []
    for folder in Path(tmp or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid = folder.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
        except PermissionError:  # alive, someone else's
            pass
    return removed


def write_shard(dataset: str, plan: ShardPlan, out_url: str) -> dict:
    """Runs in a Ray task: writes one shard (or verifies the existing one); returns its sidecar."""
    import webdataset as wds

    from dups.data.labels import remap_table, valid_raw_values

    storage = open_storage(out_url)
    sidecar_name = plan.name + ".json"
    if storage.exists(plan.name) and storage.exists(sidecar_name):
        sidecar = json.loads(storage.get_bytes(sidecar_name))
        if sidecar.get("plan") == plan_digest(plan) and storage.holds(plan.name, sidecar.get("sha256", ""),
                                                                      sidecar.get("bytes", -1)):
            return {**sidecar, "skipped": True}
    segmentation = dataset != "imagenet"
    if segmentation:
        table, valid = remap_table(dataset)[0], valid_raw_values(dataset)
    rejected, fractions = [], {}
    start = time.perf_counter()
    remove_leftovers()
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        local = Path(tmp) / plan.name
        with open(local, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0.0)
            count = 0
            for ref in plan.samples:
                try:
                    members, frac = (encode_segmentation(ref, table, valid) if segmentation
                                     else encode_classification(ref))
                except BadInput as err:
                    bad_file = err.file or ref.image
                    rejected.append({**Rejected(ref.key, bad_file, str(err)).as_dict(),
                                     "quarantined": _quarantine(storage, plan.split, ref.key, bad_file)})
                    continue
                writer.write(members)
                fractions[ref.key] = frac
                count += 1
            writer.close()
        digest = sha256_file(local)
        nbytes = local.stat().st_size
        index = {"every": INDEX_EVERY, "offsets": sample_offsets(local, INDEX_EVERY)}
        storage.put_file(plan.name, local, sha256=digest)
    sidecar = {"name": plan.name, "split": plan.split, "samples": count, "sha256": digest,
               "plan": plan_digest(plan), "bytes": nbytes, "index": index, "rejected": rejected,
               "fractions": {k: {str(s): v for s, v in f.items()} for k, f in fractions.items()},
               "seconds": round(time.perf_counter() - start, 3)}
    storage.put_bytes(sidecar_name, json.dumps(sidecar, sort_keys=True).encode())
    return {**sidecar, "skipped": False}


def beta_statistics(sidecars: list[dict]) -> dict:
    """beta_s = 99th percentile over images of the per-image fractions + 0.05 (App. A),
    capped at 1. Also the percentiles themselves, for inspection."""
    out = {}
    for s in ("32", "16", "8"):
        values = [f[s] for sc in sidecars for f in sc["fractions"].values() if f.get(s) is not None]
        if not values:
            out[s] = None
            continue
        p99 = float(np.percentile(values, 99))
        out[s] = {"images": len(values), "p50": float(np.percentile(values, 50)), "p99": p99,
                  "beta": min(1.0, round(p99 + 0.05, 4))}
    return out


def _shard_task(dataset: str, plan: ShardPlan, out_url: str) -> dict:
    import ray

    return {**write_shard(dataset, plan, out_url), "node": ray.get_runtime_context().get_node_id()}


class ShardsFailed(RuntimeError):
    """Shards whose tasks failed for good (an I/O error on every try): nothing of them is
    published, every other shard is; a re-run writes only these."""


def _failed(failures: dict[str, str]) -> ShardsFailed:
    shown = "; ".join(f"{name}: {why}" for name, why in list(failures.items())[:5])
    more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
    return ShardsFailed(f"{len(failures)} shard(s) not written, run `dups prep` again for them (the "
                        f"finished ones are kept): {shown}{more}")


def _run_tasks(dataset: str, plans: list[ShardPlan], out_url: str, progress: bool,
               forward_credentials: bool = False) -> list[dict]:
    import ray
    from tqdm import tqdm

    task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError])(_shard_task)
    # S3 settings travel to the workers in their environment; keys only when asked (Ray's API
    # shows a task's runtime env to anyone who can reach it): on a cluster the instance role serves
    env = forwarded_env(forward_credentials)
    if env:
        task = task.options(runtime_env={"env_vars": env})
    pending = {task.remote(dataset, p, out_url): p for p in plans}
    results, failures = {}, {}
    images = 0
    start = time.perf_counter()
    with tqdm(total=len(plans), unit="shard", desc=f"prep {dataset}", disable=not progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                plan = pending.pop(ref)
                try:
                    results[plan.name] = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # the others go on; named at the end
                    cause = err.cause if isinstance(err.cause, Exception) else err
                    failures[plan.name] = f"{type(cause).__name__}: {cause}".splitlines()[0]
                    log.error("prep %s: shard %s failed: %s", dataset, plan.name, failures[plan.name])
                images += len(plan.samples)
                bar.update(1)
                bar.set_postfix(images_per_s=f"{images / (time.perf_counter() - start):.1f}")
    if failures:
        raise _failed(failures)
    return [results[p.name] for p in plans]


def prepare(dataset: str, src: str, out: str, splits=("train", "val"),
            shard_bytes: int = DEFAULT_SHARD_BYTES, address: str | None = None,
            num_cpus: int | None = None, progress: bool = True, use_ray: bool = True,
            forward_credentials: bool = False) -> dict:
    """Runs the whole job and returns the manifest (also written to ``out/manifest.json``).
    ``use_ray=False`` writes the shards one after another in this process (small sets, and
    machines without Ray). ``forward_credentials``: also pass AWS keys to Ray's tasks (by
    default only settings travel; the nodes' instance role serves S3)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    if not Path(src).is_dir():
        raise FileNotFoundError(f"source directory does not exist: {src}")
    storage = open_storage(out)
    storage.check()
    listings: dict[str, Listing] = {split: list_split(dataset, src, split) for split in splits}
    plans = [p for split, lst in listings.items()
             for p in plan_shards(dataset, split, lst.samples, shard_bytes)]
    started_ray = False
    if use_ray:
        import ray
    if use_ray and not ray.is_initialized():
        init_ray(address, num_cpus=None if address else num_cpus, include_dashboard=False, log_to_driver=False)
        started_ray = True
    start = time.perf_counter()
    try:
        if use_ray:
            sidecars = _run_tasks(dataset, plans, storage.url, progress, forward_credentials)
        else:
            sidecars = _write_here(dataset, plans, storage.url)
    finally:
        if started_ray:
            ray.shutdown()
    seconds = time.perf_counter() - start
    manifest = _manifest(dataset, listings, sidecars)
    manifest["run"] = {"seconds": round(seconds, 2), "nodes": len({s["node"] for s in sidecars}),
                       "shards_written": sum(not s["skipped"] for s in sidecars),
                       "shards_skipped": sum(s["skipped"] for s in sidecars)}
    storage.put_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    total = sum(s["samples"] for s in sidecars)
    rejected = len(manifest["rejected"])
    skipped = sum(s["skipped"] for s in sidecars)
    log.info("prep %s: %d samples in %d shards (%d already complete), %d rejected, %.1f images/s",
             dataset, total, len(sidecars), skipped, rejected, (total + rejected) / max(seconds, 1e-9))
    return manifest


def _write_here(dataset: str, plans: list[ShardPlan], out_url: str) -> list[dict]:
    """The shards one after another in this process; an I/O error fails its shard only."""
    sidecars, failures = [], {}
    for plan in plans:
        try:
            sidecars.append({**write_shard(dataset, plan, out_url), "node": "local"})
        except OSError as err:
            failures[plan.name] = f"{type(err).__name__}: {err}"
            log.error("prep %s: shard %s failed: %s", dataset, plan.name, failures[plan.name])
    if failures:
        raise _failed(failures)
    return sidecars


def _manifest(dataset: str, listings: dict[str, Listing], sidecars: list[dict]) -> dict:
    if dataset == "imagenet":
        classes = list(next(iter(listings.values())).classes)
    else:
        from dups.data.labels import remap_table
        classes = list(remap_table(dataset)[1])
    splits = {}
    rejected = [dict(r.as_dict(), split=split) for split, lst in listings.items() for r in lst.rejected]
    for split in listings:
        own = [s for s in sidecars if s["split"] == split]
        splits[split] = {
            "samples": sum(s["samples"] for s in own),
            "shards": [{"name": s["name"], "samples": s["samples"], "sha256": s["sha256"],
                        "bytes": s["bytes"], **({"index": s["index"]} if "index" in s else {})}
                       for s in own],
        }
        rejected += [dict(r, split=split) for s in own for r in s["rejected"]]
    train = [s for s in sidecars if s["split"] == "train"] or sidecars
    manifest = {"format_version": FORMAT_VERSION, "dataset": dataset, "classes": classes,
                "num_classes": len(classes), "ignore_index": 255, "splits": splits,
                "rejected": rejected}
    if dataset != "imagenet":
        manifest["statistics"] = {"upsampling_fraction": beta_statistics(train)}
    return manifest
