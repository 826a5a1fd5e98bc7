"""Typed experiment configs: YAML files under ``dups/configs/`` plus ``key=value`` overrides.

Defaults are the paper's fine-tuning recipe (Sec. 4.2, App. A). A file may start from others
with ``_base_: path`` (or a list of paths, relative to the file; later ones win, the file
itself wins over all), as mmsegmentation configs do; mappings merge key by key. Every problem
(unknown key, wrong type, missing file) is one ``ConfigError`` that names the key and the file
(or override) it came from, raised before anything starts.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    name: str = "dups_tiny"
    num_classes: int = 150
    encoder: dict = field(default_factory=dict)  # model.config.EncoderConfig fields over the named model's
    decoder: dict = field(default_factory=dict)  # model.config.DecoderConfig fields over the named model's


@dataclass
class DataConfig:
    train: str = ""  # directory or s3:// prefix holding manifest.json and the shards
    val: str = ""  # defaults to ``train`` (the manifest's val split)
    crop: int = 512  # 512 ADE20K / COCO-Stuff, 1024 Cityscapes
    image_size: int = 224  # classification crop
    batch_size: int = 8  # per worker (GPU)
    workers: int = 2  # DataLoader processes per rank
    shuffle_buffer: int = 256
    scale_range: tuple[float, float] = (0.5, 2.0)
    photometric: bool = True
    eval_short_side: int = 512  # 0 = full size (Cityscapes)
    # Classification (pre-training) regularisation, all off unless set (dups/data/classification_aug.py):
    rand_augment: str = ""  # timm's notation, e.g. "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.0  # probability per image
    mixup: float = 0.0  # Beta alpha (0 = off)
    cutmix: float = 0.0  # Beta alpha (0 = off)
    mix_switch_prob: float = 0.5  # CutMix instead of Mixup, when both are on
    max_eval_images: int = 0  # 0 = all


@dataclass
class OptimConfig:
    lr: float = 4e-5  # backbone
    head_lr_mult: float = 10.0  # decoder and upsampling blocks
    weight_decay: float = 0.05  # none on norms, biases, embeddings
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "poly"  # WarmupPolyLR; "cosine" for pre-training
    warmup_iters: int = 2500
    warmup_factor: float = 0.001
    poly_power: float = 0.9
    clip_grad: float = 0.01  # Mask2Former: full-model L2 norm clipping at 0.01


@dataclass
class UpsamplingConfig:
    policy: str = "dynamic"  # eq. 2 in training, eq. 1 at evaluation
    preset: str = "ade20k"  # Table 8 tau_s / beta_s
    # The score heads' MSE weight (the paper states none). Their targets are edge fractions
    # (~0.003 variance), so at 1 (or 10) the score loss is ~1e-4 of the mask losses and the
    # shared features never learn where edges are; at 1000 it is comparable to one decoder
    # layer's mask loss and the heads become selective (BENCHMARKS.md section 1b).
    score_weight: float = 1000.0
    oracle_rate: float = 0.0  # Table 7
    # Fraction of the iterations trained with full upsampling before ``policy`` takes over
    # (0: the paper's, the policy from the first step). The score heads learn either way.
    full_warmup: float = 0.0
    random_start: float = 1.0  # pre-training schedule (App. A)
    random_end: float = 0.5
    random_shape: str = "linear"
    # Inference under eq. 1: pad each block's budget up to a multiple of ceil(bucket * N_s), so
    # a compiled forward meets few shapes (0: exact budgets; results are the same either way).
    bucket: float = 0.0
    # Table 8's thresholds tau_s times this (1: the paper's). Lower splits more tokens; on the
    # demo's scenes 0.5 helped with one seed and hurt with another (BENCHMARKS.md 1b).
    tau_scale: float = 1.0
    # Score targets: pixels within this many pixels of a semantic edge count as edge pixels
    # (0: the paper's, a pixel with a 4-neighbour of another class), in training and in
    # evaluation's targets. On the demo's scenes r = 2 (score weight 150: its targets vary 7x
    # more) trades mIoU for GFLOPs as lower thresholds do, no better (BENCHMARKS.md 1b).
    edge_radius: int = 0
    # Share of training steps (under a selecting policy) whose mask features are painted with
    # the tokens eq. 1 would keep, the heads' scores over tau_s, rather than with eq. 2's whole
    # selection, which the encoder still runs (0: the paper's). Under eq. 2 the coarse tokens
    # inside small objects are nearly always split in training, so inference, which leaves
    # them whole, paints them with a path that rarely learnt. Measured on the demo's scenes
    # after 300 iterations: full and dynamic both gain ~1.4, the gap between them does not
    # shrink (BENCHMARKS.md 1b, "the demo's length").
    eq1_mask_rate: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.eq1_mask_rate <= 1.0:
            raise ValueError(f"upsampling.eq1_mask_rate must lie in [0, 1], got {self.eq1_mask_rate}")

    def ratio_policy(self, kind: str | None = None):
        """The run's ``RatioPolicy`` (``kind`` instead of ``policy`` if given)."""
        from dups.models.ratios import RatioPolicy, preset

        table = preset(self.preset)
        tau = tuple(t * self.tau_scale for t in table["tau"])
        return RatioPolicy(kind or self.policy, tau, table["beta"], bucket=self.bucket)


@dataclass
class TrainConfig:
    task: str = "finetune"  # or "pretrain"
    label_smoothing: float = 0.0  # classification targets (pre-training)
    iters: int = 80000
    log_every: int = 20
    eval_every: int = 5000
    checkpoint_every: int = 5000
    seed: int = 0
    pretrained: str = ""  # exported weights (.safetensors) or a checkpoint whose encoder.* tensors are loaded
    pretrained_partial: bool = False  # allow missing / unexpected encoder keys (else an error naming them)
    max_nonfinite_steps: int = 5  # steps in a row with a non-finite loss (skipped) before the run stops; 0 = never
    keep_checkpoints: int = 3  # the newest N complete checkpoints are kept (local and S3)
    output: str = "runs"  # local directory or s3:// prefix for checkpoints
    pictures: int = 2  # token-selection pictures per evaluation


@dataclass
class EngineConfig:
    zero_stage: int = 2
    zero3_persist_below: int = 100_000  # ZeRO-3: tensors of fewer elements stay whole on every rank
    precision: str = "bf16"  # bf16 or fp32
    grad_accum: int = 1


@dataclass
class LaunchConfig:
    launcher: str = "ray"  # "ray" (Ray Train TorchTrainer) or "local" (one process)
    workers: int = 4  # training processes (one per GPU)
    use_gpu: bool = True
    cpus_per_worker: int = 1
    address: str = ""  # Ray address; "" = local Ray
    max_failures: int = 3  # restarts from the last checkpoint
    forward_credentials: bool = False  # pass AWS keys / MLflow passwords to the workers (default: instance role)


@dataclass
class TrackingConfig:
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working dir; "none": off
    experiment: str = "dups"
    run_name: str = ""
    log_model: bool = True  # a fine-tuning run ends by logging its weights as an MLflow model
    register_as: str = ""  # and registers them under this name in the Model Registry


@dataclass
class EvalConfig:
    multi_scale: bool = False
    flip: bool = False
    scales: tuple[int, ...] = (256, 384, 512, 640, 768, 896)  # short sides (App. A)
    sliding_window: bool = False  # Cityscapes: overlapping crop-size windows
    window_stride: int = 0  # Cityscapes: 768 (SegFormer); 0 = as few windows as cover, evenly spread


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    upsampling: UpsamplingConfig = field(default_factory=UpsamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def global_batch(self) -> int:
        return self.data.batch_size * self.launch.workers * self.engine.grad_accum


CHOICES = {
    "train.task": ("finetune", "pretrain"),
    "engine.precision": ("bf16", "fp32"),
    "engine.zero_stage": (0, 1, 2, 3),
    "launch.launcher": ("ray", "local"),
    "optim.schedule": ("poly", "cosine"),
    "upsampling.policy": ("full", "fixed", "per_image", "batch", "dynamic", "random"),
}


def _coerce(value, tp, key: str, where: str):
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0]
        if len(args) != 2 or args[1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: {key} must have {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, key, where) for v, a in zip(value, args))
        return tuple(_coerce(v, item, key, where) for v in value)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return value
    if isinstance(tp, type) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: {key} must be {tp.__name__}, got {value!r}")
    return value


def _model_fields() -> dict[str, type]:
    """The dataclass whose fields each per-model section overrides (checked like a section)."""
    from dups.models.config import DecoderConfig, EncoderConfig

    return {"model.encoder": EncoderConfig, "model.decoder": DecoderConfig}


def _build(cls, data: dict, prefix: str, origin: dict[str, str]):
    def where(key: str) -> str:  # the file (or override) that set this key or its section
        while key and key not in origin:
            key = key.rpartition(".")[0]
        return origin.get(key, origin[""])

    if not isinstance(data, dict):
        name = prefix.rstrip(".")
        raise ConfigError(f"{where(name)}: {name or 'the config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where(prefix + key)}: unknown key '{prefix}{key}' "
                              f"(known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp, key = hints[f.name], prefix + f.name
        if is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], key + ".", origin)
        elif key in _model_fields():  # a partial override: the keys and their types checked
            section = _coerce(data[f.name], dict, key, where(key))
            kwargs[f.name] = dataclasses.asdict(_build(_Partial.of(_model_fields()[key]), section, key + ".",
                                                       origin))
            kwargs[f.name] = {k: v for k, v in kwargs[f.name].items() if k in section}
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, key, where(key))
            allowed = CHOICES.get(key)
            if key == "model.name":
                from dups.models.config import ENCODERS

                allowed = tuple(sorted(ENCODERS))
            if allowed and kwargs[f.name] not in allowed:
                raise ConfigError(f"{where(key)}: {key} must be one of {allowed}, got {kwargs[f.name]!r}")
    return cls(**kwargs)


class _Partial:
    """A copy of a frozen model dataclass whose every field defaults to None: ``_build``
    checks a partial override's keys and types with it."""

    _made: dict = {}

    @classmethod
    def of(cls, target: type) -> type:
        if target not in cls._made:
            hints = typing.get_type_hints(target)
            cls._made[target] = dataclasses.make_dataclass(
                f"Partial{target.__name__}", [(f.name, hints[f.name], field(default=None)) for f in fields(target)])
        return cls._made[target]


def _set(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _set_origin(origin: dict[str, str], dotted: str, where: str, replaced: bool) -> None:
    """``dotted`` was set by ``where``; ``replaced``: its old value (a section perhaps) is gone,
    so are the origins of the keys under it."""
    if replaced:
        for stale in [k for k in origin if k.startswith(dotted + ".")]:
            del origin[stale]
    origin[dotted] = where


def _merge(into: dict, data: dict, origin: dict[str, str], where: str, prefix: str = "") -> None:
    """``data`` over ``into`` key by key (mappings recursively); ``origin`` records, for each
    dotted key, the file that set it last."""
    for key, value in data.items():
        dotted = prefix + str(key)
        if isinstance(value, dict):
            if not isinstance(into.get(key), dict):
                into[key] = {}
            _merge(into[key], value, origin, where, dotted + ".")
        else:
            into[key] = value
        _set_origin(origin, dotted, where, replaced=not isinstance(value, dict))


def _read(path: Path, shown: str, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """One YAML file with its ``_base_`` files merged under it: (tree, origin of each key)."""
    if path.resolve() in chain:
        raise ConfigError(f"{shown}: _base_ loops back to itself ({' -> '.join(str(p) for p in chain)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{shown}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: a config must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    tree: dict = {}
    origin: dict[str, str] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = path.parent / base
        if not isinstance(base, str) or not base_path.is_file():
            raise ConfigError(f"{shown}: _base_ file not found: {base}")
        base_tree, base_origin = _read(base_path, str(base_path), chain + (path.resolve(),))
        _merge(tree, base_tree, origin, "")
        origin.update(base_origin)
    _merge(tree, data, origin, shown)
    return tree, origin


def config_file(path: str | Path) -> Path:
    """A YAML path, or a name under ``dups/configs/`` (``demo`` -> ``dups/configs/demo.yaml``)."""
    p = Path(path)
    if not p.is_file() and not p.suffix:
        p = CONFIG_DIR / f"{path}.yaml"
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    return p


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The YAML file (relative paths also tried under ``dups/configs/``) with overrides applied."""
    data: dict = {}
    origin = {"": "defaults"}
    if path:
        data, origin = _read(config_file(path), str(path))
        origin[""] = str(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        _set(data, key.strip(), yaml.safe_load(raw))
        _set_origin(origin, key.strip(), f"override {item}", replaced=True)
    if "name" not in data and path:
        data["name"] = Path(path).stem
    return _build(Config, data, "", origin)


# Model fields added after checkpoints began recording every model field (dc3bb13), with the
# value a model saved before the field existed was built with. A saved config that records
# its fields (its encoder has ``dims``, its decoder ``dim``) but not these gets these values,
# so the checkpoint loads as it was trained even where the default changed later.
ADDED_LATER = {"encoder": ("dims", {"score_pixels": False}),
               "decoder": ("dim", {"pixel_data": False, "pixel_data_hidden": 0})}


def config_from_dict(data: dict, where: str) -> Config:
    """A Config from a resolved config dict (a checkpoint's or exported weights' config.json);
    ``where`` names it in errors."""
    model = data.get("model")
    if isinstance(model, dict):
        model = dict(model)
        for part, (marker, values) in ADDED_LATER.items():
            recorded = model.get(part)
            if isinstance(recorded, dict) and marker in recorded:
                model[part] = {**values, **recorded}
        data = {**data, "model": model}
    return _build(Config, data, "", {"": where})
