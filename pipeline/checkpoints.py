"""Reading model weights out of checkpoints (files or DeepSpeed / Ray checkpoint folders)."""
from __future__ import annotations

import glob
import os
from pathlib import Path

import torch


def latest_checkpoint(directory: str | Path) -> str | None:
    """The directory itself if it holds a DeepSpeed 'latest' file, or the newest Ray checkpoint
    (``checkpoint_*``) inside a Ray run directory."""
    d = Path(directory)
    if (d / "latest").is_file():
        return str(d)
    ray_ckpts = sorted((p for p in d.glob("checkpoint_*") if (p / "latest").is_file()),
                       key=lambda p: p.name)
    return str(ray_ckpts[-1]) if ray_ckpts else None


def model_state(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, where it came from) of a ``.pt`` file or a checkpoint folder. ZeRO-3
    shards are consolidated with DeepSpeed's own tool."""
    path = Path(path)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
        return state.get("module", state), str(path)
    root = latest_checkpoint(path)
    if root is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")
    tag = Path(root, "latest").read_text().strip()
    files = sorted(glob.glob(os.path.join(root, tag, "*model_states.pt")))
    state = torch.load(files[0], map_location="cpu", weights_only=False) if files else {}
    module = state.get("module")
    if not module:  # ZeRO-3: parameters live in the partitioned optimizer shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        module = get_fp32_state_dict_from_zero_checkpoint(root, tag)
    return {k: v.float() for k, v in module.items()}, os.path.join(root, tag)
