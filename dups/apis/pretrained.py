"""Trained weights with the config they were trained under: what ``dups predict`` and
``init_model`` start from.

Exported weights are ``X.safetensors`` with ``X.json`` beside it (``dups export``); a training
checkpoint holds ``config.json``. Either may be local or on S3; nothing is unpickled beyond
tensors and plain data.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch


from dups.engine.checkpoints import find_checkpoint, local_file, model_state, weights_and_config
from dups.config import Config, ConfigError, config_from_dict


@dataclass
class Pretrained:
    model: torch.nn.Module  # in eval mode, its run's ratio policy as default
    config: Config
    source: str  # the file or checkpoint the weights came from


def _exported_config(path: str) -> tuple[dict, str]:
    """(the run's config dict, where it was looked for) beside exported weights ``X.safetensors``."""
    from dups.engine.export import config_path

    where = config_path(path)
    try:
        with local_file(where) as local:
            return json.loads(local.read_text()).get("config") or {}, where
    except FileNotFoundError:
        return {}, where


def trained_as(config: Config, saved: dict, where: str) -> Config:
    """``config`` with the model its weights were trained as: the saved config's encoder and
    decoder fields (a checkpoint records every one), under the model overrides ``config``
    itself names. So a default changed since training (``pixel_data_hidden`` on 2026-12-01)
    does not change the model that ``dups eval CONFIG`` or a resumed run builds; data,
    evaluation and the ratio policy stay ``config``'s."""
    if not isinstance(saved.get("model"), dict):
        return config
    model = config_from_dict(saved, where).model
    if model.name != config.model.name:  # another model: its weights will not fit, and say so
        return config
    return replace(config, model=replace(config.model, encoder={**model.encoder, **config.model.encoder},
                                         decoder={**model.decoder, **config.model.decoder}))


def load_pretrained(path: str, device: str | torch.device = "cpu", config: Config | None = None) -> Pretrained:
    """The model of ``path`` built from the config saved with it, under ``config`` if given
    (``trained_as``: its model overrides and everything else win). A checkpoint is copied
    once for both its weights and its ``config.json``."""
    from dups.tasks import build_model

    if path.endswith((".safetensors", ".pt")):
        state, source = model_state(path)
        data, where = _exported_config(path) if path.endswith(".safetensors") else ({}, path)
    else:
        ref = find_checkpoint(path, config.name if config else None)
        (state, data), source = weights_and_config(ref), ref.url
        where = f"{ref.url.rstrip('/')}/config.json"
    if config is None:
        if not data:
            raise ConfigError(f"{path}: no config saved with these weights ({where}); export them with "
                              "`dups export`, or name the config they were trained with")
        config = config_from_dict(data, where)
    else:
        config = trained_as(config, data, where)
    model = build_model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: these weights do not fit {config.model.name} "
                         f"({config.train.task}): missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.train.task == "finetune":
        model.encoder.ratio_policy = config.upsampling.ratio_policy()
    return Pretrained(model.eval().to(device), config, source)
