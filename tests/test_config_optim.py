"""Configs (the paper's values, clear errors) and the optimiser recipe."""
from pathlib import Path

import pytest
import torch

from cluster.cli import main as cli_main
from model.segmentor import build_segmentor
from pipeline.config import ConfigError, load_config
from pipeline.optim import build_optimizer, lr_factor, param_groups

CONFIGS = sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert cfg.name == name


def test_defaults_are_the_papers_recipe():
    cfg = load_config(None)
    assert cfg.optim.lr == 4e-5 and cfg.optim.head_lr_mult == 10 and cfg.optim.weight_decay == 0.05
    assert cfg.optim.warmup_iters == 2500 and cfg.optim.warmup_factor == 0.001
    assert cfg.data.crop == 512 and cfg.train.iters == 80000
    assert cfg.upsampling.policy == "dynamic"


def test_overrides_and_clear_errors(tmp_path):
    cfg = load_config("demo", ["train.iters=7", "data.scale_range=[0.8, 1.2]", "engine.zero_stage=3"])
    assert cfg.train.iters == 7 and cfg.data.scale_range == (0.8, 1.2) and cfg.engine.zero_stage == 3
    with pytest.raises(ConfigError, match="unknown key 'data.crop_szie'"):
        load_config("demo", ["data.crop_szie=3"])
    with pytest.raises(ConfigError, match="data.batch_size must be int, got 'many'"):
        load_config("demo", ["data.batch_size=many"])
    with pytest.raises(ConfigError, match="engine.zero_stage must be one of"):
        load_config("demo", ["engine.zero_stage=4"])
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=f"{bad}: optim.lr must be float"):
        load_config(str(bad))


def test_cli_names_the_problem_before_starting(capsys, tmp_path):
    assert cli_main(["train", "demo", "data.train=" + str(tmp_path / "nothing")]) == 2
    assert "no manifest.json under" in capsys.readouterr().err
    assert cli_main(["train", "demo", "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err


def test_param_groups_and_schedule():
    cfg = load_config(None).optim
    model = build_segmentor("dups_demo", num_classes=5)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    of = lambda g: {names[id(p)] for p in groups[g]["params"]}  # noqa: E731
    assert groups["backbone/decay"]["lr"] == 4e-5 and groups["head/decay"]["lr"] == 4e-4
    assert "encoder.upsample.0.score.0.weight" in of("head/decay")  # upsampling blocks: x10
    assert "decoder.class_head.weight" in of("head/decay")
    assert "encoder.left.0.0.attn.qkv.weight" in of("backbone/decay")
    for g in ("backbone/no_decay", "head/no_decay"):
        assert groups[g]["weight_decay"] == 0.0
    assert "encoder.left.0.0.norm1.weight" in of("backbone/no_decay")
    assert "encoder.upsample.0.subpatch_embed.weight" in of("head/no_decay")
    assert "decoder.query_feat.weight" in of("head/no_decay")
    assert "encoder.left.0.0.attn.position_bias" in of("backbone/no_decay")  # ndim 4, by name
    assert "encoder.left.0.0.attn.qkv.bias" in of("backbone/no_decay")
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    # WarmupPolyLR: 0.001 at step 0, linear to 1 at 2500, then (1 - t/T)^0.9
    assert lr_factor(0, 80000, cfg) == pytest.approx(0.001)
    assert lr_factor(1250, 80000, cfg) == pytest.approx((0.001 * 0.5 + 0.5) * (1 - 1250 / 80000) ** 0.9)
    assert lr_factor(40000, 80000, cfg) == pytest.approx(0.5 ** 0.9)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
