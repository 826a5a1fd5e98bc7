"""Training checkpoints on local disk or S3: publishing, finding, fetching, pruning, weights.

A checkpoint is one folder ``step<NNNNNNNN>`` holding DeepSpeed's files for that tag, every
rank's ``rng_rank<r>.pt`` (and with them the step, data position and MLflow run id in
DeepSpeed's client state), and ``complete.json``, written last, once every part is stored.
Only folders with ``complete.json`` count: a crash or an interrupted upload mid-save leaves
the previous checkpoint the newest usable one.

Where they live: every launch of ``dups train`` writes into a folder of its own, named by its
UTC start (``new_launch_id``): ``<train.output>/<name>/checkpoints/<launch>/``
(``launch.launcher=local``) and ``<train.output>/ray/<name>/<launch>/`` (Ray Train's storage),
so a fresh launch never continues, nor prunes, an earlier one. Every reader (``--resume``,
``dups eval``, ``dups export``, ``train.pretrained``) takes a checkpoint, a launch's folder, a
run's folder or a ``train.output``, local or ``s3://``, and picks the newest complete
checkpoint of the newest launch in it.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from dups.data.storage import open_storage

COMPLETE = "complete.json"
_STEP = re.compile(r"step(\d{8})$")
_LAUNCH = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")


def new_launch_id() -> str:
    """The name of one launch's checkpoint folder: its UTC start (so names sort by age) and
    six random hex digits (two launches in one second)."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def step_of(url: str) -> int:
    """The step of a checkpoint folder named ``step<N>``; -1 for any other name."""
    match = _STEP.search(url.rstrip("/"))
    return int(match.group(1)) if match else -1


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else str(Path(root) / name)


@dataclass(frozen=True)
class CheckpointRef:
    url: str  # the step folder, a local path or s3://bucket/key
    step: int

    @property
    def run(self) -> str:
        """The folder holding this run's checkpoints."""
        return self.url.rstrip("/").rsplit("/", 1)[0]


def complete_checkpoints(location: str, max_depth: int = 4) -> list[CheckpointRef]:
    """Every complete checkpoint at or below ``location`` (at most ``max_depth`` folders
    down), oldest first."""
    storage = open_storage(location)
    refs = []
    for name in storage.list():
        parts = name.split("/")
        if parts[-1] != COMPLETE or len(parts) - 1 > max_depth or any(p.startswith(".") for p in parts):
            continue  # (a ".staging-*" folder is a save that never finished)
        folder = "/".join(parts[:-1])
        match = _STEP.search(folder or location.rstrip("/"))
        if match:
            refs.append(CheckpointRef(join(location, folder) if folder else location.rstrip("/"),
                                      int(match.group(1))))
    return sorted(refs, key=lambda r: (r.run, r.step))


def _launches_of(run: str) -> str:
    """The folder holding a run's launches: the parent of a launch's folder; a folder of the
    layout before launch folders is its own."""
    parent, _, base = run.rstrip("/").rpartition("/")
    return parent if _LAUNCH.fullmatch(base) else run


def find_checkpoint(location: str, name: str | None = None) -> CheckpointRef:
    """The newest complete checkpoint in ``location`` (a checkpoint, a launch's or a run's
    folder, or a ``train.output``): of several launches of one run, the newest launch's.
    ``name``: the run's name, which picks among several runs."""
    refs = complete_checkpoints(location)
    if name and len({r.run for r in refs}) > 1:
        mine = [r for r in refs if f"/{name}/" in r.url.replace(os.sep, "/")]
        refs = mine or refs
    if not refs:
        raise FileNotFoundError(f"no complete checkpoint (a step<N> folder with {COMPLETE}) under {location}")
    if len({_launches_of(r.run) for r in refs}) == 1:  # launches of one run: the newest
        newest = max(r.run for r in refs)  # (launch names sort by age, after their parent's)
        refs = [r for r in refs if r.run == newest]
    runs = sorted({r.run for r in refs})
    if len(runs) > 1:
        raise ValueError(f"{location} holds checkpoints of {len(runs)} runs ({', '.join(runs)}): "
                         "name one of those folders")
    return max(refs, key=lambda r: r.step)


@contextlib.contextmanager
def local_copy(ref: CheckpointRef | str) -> Iterator[Path]:
    """The checkpoint's folder on local disk: itself, or a temporary download of an S3 one
    (removed afterwards). The folder keeps its ``step<N>`` name."""
    url = ref.url if isinstance(ref, CheckpointRef) else ref
    if "://" not in url:
        yield Path(url)
        return
    storage = open_storage(url)
    with tempfile.TemporaryDirectory(prefix="dups-ckpt-") as tmp:
        local = Path(tmp) / url.rstrip("/").rsplit("/", 1)[1]
        for name in storage.list():
            storage.get_file(name, local / name)
        yield local


def _complete_record(step: int, world: int, files: list[str]) -> str:
    return json.dumps({"step": step, "world_size": world, "files": sorted(files)})


def publish(staged: Path, dest: str, step: int, world: int) -> str:
    """Moves a fully written local checkpoint folder to ``dest`` (local or S3), the
    ``complete.json`` marker last, and removes the staged copy. Returns ``dest``."""
    if "://" not in dest:
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        files = [str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()]
        if target.exists():  # a partial folder of an earlier attempt at this step
            shutil.rmtree(target)
        os.replace(staged, target)  # staged next to it: one rename on the same filesystem
        (target / COMPLETE).write_text(_complete_record(step, world, files))  # after: a crash
        return str(target)  # in between leaves a folder without it, which no reader takes
    storage = open_storage(dest)
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        storage.put_file(str(path.relative_to(staged)), path)
    mark_complete(dest, step, world)
    shutil.rmtree(staged)
    return dest


def mark_complete(dest: str, step: int, world: int) -> None:
    """Writes ``complete.json`` into an already stored checkpoint folder (Ray's uploads)."""
    storage = open_storage(dest)
    files = [n for n in storage.list() if n != COMPLETE]
    storage.put_bytes(COMPLETE, _complete_record(step, world, files).encode())


def newest_complete(folder: str) -> CheckpointRef | None:
    """The newest complete checkpoint directly in one launch's ``folder``, or None."""
    refs = complete_checkpoints(folder, max_depth=1)
    return refs[-1] if refs else None


def prune(run: str, keep: int) -> list[str]:
    """Removes all but the newest ``keep`` complete checkpoints directly in the run folder
    ``run``, and unfinished ``step<N>`` folders older than the newest complete one."""
    if keep <= 0:
        return []
    storage = open_storage(run)
    names = storage.list()
    folders = {n.split("/", 1)[0] for n in names if "/" in n and _STEP.fullmatch(n.split("/", 1)[0])}
    complete = sorted(f for f in folders if f"{f}/{COMPLETE}" in names)
    if not complete:
        return []
    newest = complete[-1]
    doomed = complete[:-keep] + sorted(f for f in folders if f not in complete and f < newest)
    for folder in doomed:
        storage.delete_prefix(folder)
    return doomed


class UnsafeFileError(ValueError):
    """A file that would run code when loaded (a pickle that is not weights only)."""


@contextlib.contextmanager
def weights_only_loads(path, allowed: tuple = ()) -> Iterator[None]:
    """Every ``torch.load`` inside reads weights only: tensors, plain containers and the plain
    types in ``allowed`` (DeepSpeed's consolidation asks for full pickle loading, which would
    run any code a foreign checkpoint carries)."""
    real = torch.load

    def load(*args, **kwargs):
        return real(*args, **{**kwargs, "weights_only": True})

    torch.load = load
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    except pickle.UnpicklingError as err:
        why = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), str(err))
        raise UnsafeFileError(f"{path}: refused, not a weights-only file (loading it would run code "
                              f"it carries): {why[:200]}") from err
    finally:
        torch.load = real


def _deepspeed_types() -> tuple:
    """The plain DeepSpeed types its checkpoint files hold besides tensors."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def fp32_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The model's fp32 weights in a local checkpoint folder: ZeRO's fp32 master copies
    (consolidated with DeepSpeed's own tool) when there are any, else the module's tensors."""
    with weights_only_loads(folder, _deepspeed_types()):
        if list(folder.glob("*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(io.StringIO()):  # its progress prints, not ours to show
                state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), folder.name)
        else:
            files = sorted(folder.glob("*model_states.pt"))
            if not files:
                raise FileNotFoundError(f"{folder}: no DeepSpeed model states in this checkpoint")
            state = torch.load(files[0], map_location="cpu")["module"]
    return {k: v.float() for k, v in state.items()}


def saved_config(url: str) -> dict:
    """The ``config.json`` a complete checkpoint was saved with ({} if none), read alone
    (no copy of the weights)."""
    storage = open_storage(url)
    return json.loads(storage.get_bytes("config.json")) if storage.exists("config.json") else {}


def weights_and_config(ref: CheckpointRef) -> tuple[dict[str, torch.Tensor], dict]:
    """The fp32 weights and the saved ``config.json`` ({} if none) of a complete checkpoint,
    from one local copy of it."""
    with local_copy(ref) as folder:
        return fp32_state_dict(folder), saved_config(str(folder))


def model_state(path: str, name: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(fp32 state dict, where it came from) of exported weights (``.safetensors``), a
    weights-only ``.pt`` file, or the newest complete checkpoint in a folder (local or S3).
    Nothing is unpickled beyond tensors and plain data."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        with local_file(path) as local:
            return load_file(str(local)), path
    if path.endswith(".pt"):
        with local_file(path) as local, weights_only_loads(path):
            state = torch.load(local, map_location="cpu")
        return state.get("module", state), path
    ref = find_checkpoint(path, name)
    with local_copy(ref) as folder:
        return fp32_state_dict(folder), ref.url


@contextlib.contextmanager
def local_file(url: str) -> Iterator[Path]:
    """A file on local disk: itself, or a temporary download of an S3 object."""
    if "://" not in url:
        if not Path(url).is_file():
            raise FileNotFoundError(f"no such file {url}")
        yield Path(url)
        return
    parent, _, base = url.rstrip("/").rpartition("/")
    storage = open_storage(parent)
    if not storage.exists(base):
        raise FileNotFoundError(f"no such object {url}")
    with tempfile.TemporaryDirectory(prefix="dups-file-") as tmp:
        storage.get_file(base, Path(tmp) / base)
        yield Path(tmp) / base
