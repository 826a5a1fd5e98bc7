"""`dups export`: a checkpoint's fp32 weights as one safetensors file, its config beside it.

The file is a plain state dict (no pickle), what fine-tuning (``train.pretrained``) and
evaluation read; ``<OUT>.json`` beside it holds the run's resolved config.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from dups.data.storage import open_storage

from dups.engine.checkpoints import find_checkpoint, weights_and_config


def config_path(weights: str) -> str:
    """Where the config of exported weights lives: ``x.safetensors`` -> ``x.json``."""
    return weights[: -len(".safetensors")] + ".json"


def export_weights(source: str, out: str, name: str | None = None) -> str:
    """Writes the newest complete checkpoint in ``source`` (a checkpoint, run folder or
    ``train.output``, local or S3) to ``out`` (``.safetensors``, local or S3). Returns the
    checkpoint it came from."""
    from safetensors.torch import save_file

    if not out.endswith(".safetensors"):
        raise ValueError(f"export: {out} must end in .safetensors")
    ref = find_checkpoint(source, name)
    weights, config = weights_and_config(ref)
    state = {k: v.contiguous().clone() for k, v in weights.items()}  # safetensors: no shared storage
    if "://" in out:
        parent, _, base = out.rpartition("/")
    else:
        parent, base = str(Path(out).resolve().parent), Path(out).name
    storage = open_storage(parent)
    storage.check()
    with tempfile.TemporaryDirectory(prefix="dups-export-") as tmp:
        local = Path(tmp) / base
        save_file(state, str(local), metadata={"source": ref.url, "step": str(ref.step)})
        storage.put_file(base, local)
        storage.put_bytes(Path(config_path(base)).name,
                          json.dumps({"source": ref.url, "step": ref.step, "config": config}, indent=1).encode())
    return ref.url
