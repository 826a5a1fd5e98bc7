"""Configs (the paper's values, clear errors) and the optimiser recipe."""
from pathlib import Path

import pytest
import torch

from dups.cli import main as cli_main
from dups.models.segmentor import build_segmentor
from dups.config import ConfigError, load_config
from dups.engine.optim import build_optimizer, lr_factor, param_groups

CONFIGS = sorted(p.stem for p in (Path(__file__).parents[1] / "dups" / "configs").glob("*.yaml"))


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
    policy = cfg.upsampling.ratio_policy()  # Table 8's thresholds and ratios, exactly
    assert (policy.kind, policy.tau, policy.beta, policy.bucket) == ("dynamic", (0.01, 0.02, 0.04),
                                                                     (0.85, 0.7, 0.6), 0.0)


def test_ratio_policy_switches():
    up = load_config(None, ["upsampling.preset=cityscapes", "upsampling.tau_scale=0.5",
                            "upsampling.bucket=0.1"]).upsampling
    policy = up.ratio_policy()
    assert policy.tau == pytest.approx((0.0025, 0.005, 0.01)) and policy.beta == (0.5, 0.7, 0.65)
    assert policy.bucket == 0.1 and up.ratio_policy("full").kind == "full"


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


def test_base_files_merge_key_by_key_and_errors_name_the_file(tmp_path):
    (tmp_path / "_base_").mkdir()
    (tmp_path / "_base_" / "recipe.yaml").write_text("optim:\n  lr: 0.5\n  warmup_iters: 7\ntrain:\n  iters: 9\n")
    (tmp_path / "_base_" / "data.yaml").write_text("_base_: recipe.yaml\ndata:\n  crop: 64\noptim:\n  lr: 0.25\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: [_base_/data.yaml]\noptim:\n  warmup_iters: 3\n")
    cfg = load_config(str(child), ["train.iters=11"])
    # each key from the nearest file that sets it, an override over all; untouched keys keep defaults
    assert (cfg.optim.lr, cfg.optim.warmup_iters, cfg.data.crop, cfg.train.iters) == (0.25, 3, 64, 11)
    assert cfg.optim.head_lr_mult == 10.0 and cfg.name == "child"

    (tmp_path / "_base_" / "recipe.yaml").write_text("optim:\n  lrr: 0.5\n")
    with pytest.raises(ConfigError, match=r"_base_/recipe.yaml: unknown key 'optim.lrr'"):
        load_config(str(child))
    (tmp_path / "_base_" / "recipe.yaml").write_text("train:\n  iters: many\n")
    with pytest.raises(ConfigError, match=r"_base_/recipe.yaml: train.iters must be int"):
        load_config(str(child))
    with pytest.raises(ConfigError, match=r"override optim.lr=slow: optim.lr must be float"):
        load_config(str(child), ["optim.lr=slow"])
    (tmp_path / "_base_" / "recipe.yaml").write_text("_base_: data.yaml\n")
    with pytest.raises(ConfigError, match="_base_ loops back"):
        load_config(str(child))
    child.write_text("_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=f"{child}: _base_ file not found: nowhere.yaml"):
        load_config(str(child))


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "demo"])
def test_shipped_configs_are_a_few_lines_over_their_base(name):
    text = (Path(__file__).parents[1] / "dups" / "configs" / f"{name}.yaml").read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0].startswith("_base_: _base_/") and len(lines) <= 6


def test_cli_takes_options_anywhere(capsys, tmp_path):
    from dups.cli import parse

    for argv in (["eval", "demo", "--checkpoint", "C", "a.b=1", "c.d=2"],
                 ["eval", "--checkpoint", "C", "demo", "a.b=1", "c.d=2"],
                 ["eval", "demo", "a.b=1", "--checkpoint", "C", "c.d=2"]):
        args = parse(argv)
        assert (args.config, args.checkpoint, args.overrides) == ("demo", "C", ["a.b=1", "c.d=2"])
    args = parse(["train", "demo", "--resume", "train.iters=5"])  # a bare --resume, then an override
    assert (args.resume, args.overrides) == ("", ["train.iters=5"])
    args = parse(["demo", "--iters", "3", "train.seed=1", "--workers", "1"])
    assert (args.iters, args.workers, args.overrides) == (3, 1, ["train.seed=1"])
    assert parse(["submit", "--follow", "--", "eval", "--checkpoint", "C"]).command_line[1:] == [
        "eval", "--checkpoint", "C"]
    # the override after the option reaches the config: its bad key is the error, not argparse's
    assert cli_main(["eval", "demo", "--checkpoint", str(tmp_path), "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err


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
    of = lambda g: {names[id(p)] for p in groups[g]["params"]}
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


def test_full_upsampling_warmup_covers_the_first_fraction_of_training():
    from dups.tasks.segmentation import in_full_warmup

    cfg = load_config("demo", ["train.iters=10", "upsampling.full_warmup=0.3"])
    assert [in_full_warmup(step, cfg) for step in range(10)] == [True] * 3 + [False] * 7
    assert not any(in_full_warmup(step, load_config("demo", ["train.iters=10"])) for step in range(10))


def test_eq1_mask_steps_follow_the_rate_and_repeat_on_resume():
    from dups.tasks.segmentation import eq1_masks_at

    def steps(rate: float, policy: str = "dynamic", seed: int = 0) -> list[bool]:
        cfg = load_config("demo", [f"upsampling.eq1_mask_rate={rate}", f"train.seed={seed}"])
        return [eq1_masks_at(step, cfg, cfg.upsampling.ratio_policy(policy)) for step in range(400)]

    half = steps(0.5)
    assert 160 < sum(half) < 240 and half == steps(0.5)  # a draw per step, the same every time
    assert half != steps(0.5, seed=1)
    assert all(steps(1.0)) and not any(steps(0.0))
    assert not any(steps(1.0, "full")) and not any(steps(1.0, "random"))


def test_a_saved_config_from_before_a_field_existed_keeps_the_model_it_trained():
    """A checkpoint's config records every model field; one saved before score_pixels and
    pixel_data existed (both now on by default) gets them off, as its model was built; one
    saved before pixel_data_hidden gets the linear pixel embedding."""
    from dups.models.config import resolved_fields
    from dups.config import config_from_dict
    from dups.tasks import build_model

    cfg = load_config("demo")
    saved = cfg.to_dict()
    encoder, decoder = resolved_fields(cfg.model.name, {}, {})
    assert encoder["score_pixels"] and decoder["pixel_data"] and decoder["pixel_data_hidden"] == 128  # today's defaults
    old_enc = {k: v for k, v in encoder.items() if k != "score_pixels"}
    old_dec = {k: v for k, v in decoder.items() if k not in ("pixel_data", "pixel_data_hidden")}
    old = config_from_dict({**saved, "model": {**saved["model"], "encoder": old_enc, "decoder": old_dec}}, "old.json")
    assert old.model.encoder["score_pixels"] is False and old.model.decoder["pixel_data"] is False
    model = build_model(old)
    assert model.encoder.pixel_spread is None and model.pixel_decoder.pixel_data is None
    # saved after pixel_data, before pixel_data_hidden: the linear pixel embedding it trained
    between_dec = {k: v for k, v in decoder.items() if k != "pixel_data_hidden"}
    between = build_model(config_from_dict({**saved, "model": {**saved["model"], "encoder": encoder,
                                                              "decoder": between_dec}}, "between.json"))
    assert [type(m).__name__ for m in between.pixel_decoder.pixel_data] == ["Linear", "LayerNorm"]
    new = config_from_dict({**saved, "model": {**saved["model"], "encoder": encoder, "decoder": decoder}}, "new.json")
    assert new.model.encoder["score_pixels"] is True and new.model.decoder["pixel_data"] is True
    # a config that records no fields (a user's overrides) keeps today's defaults
    assert build_model(config_from_dict(saved, "user.json")).encoder.pixel_spread is not None


def test_a_misspelt_model_key_is_one_line_before_ray_or_mlflow_start(tmp_path, monkeypatch, capsys):
    import ray

    from dups.cli import main

    monkeypatch.chdir(tmp_path)
    for override, said in (("model.encoder.score_pixel=false", "unknown key 'model.encoder.score_pixel' (known: "),
                           ("model.decoder.dim=wide", "model.decoder.dim must be int, got 'wide'"),
                           ("model.name=dups_tnyi", "model.name must be one of ('dups_base', 'dups_demo'")):
        assert main(["train", "demo", override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"override {override}: " in err[0] and said in err[0], err
    (tmp_path / "mine.yaml").write_text("_base_: " + str(Path(__file__).parents[1] / "dups" / "configs" / "demo.yaml")
                                        + "\nmodel:\n  encoder:\n    score_pixel: false\n")
    assert main(["train", str(tmp_path / "mine.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'mine.yaml'}: unknown key 'model.encoder.score_pixel'" in err
    assert not ray.is_initialized() and not list(tmp_path.glob("mlruns*"))


@pytest.mark.parametrize("base", ["finetune", "pretrain_imagenet"])
def test_the_task_bases_set_only_what_differs_from_the_defaults(base):
    """The recipe's defaults live in dups/config.py only: a base file that repeated one
    would keep an old value when the default is corrected."""
    import yaml

    from dups.config import CONFIG_DIR, Config

    defaults = Config().to_dict()
    tree = yaml.safe_load((CONFIG_DIR / "_base_" / f"{base}.yaml").read_text())
    repeated = [f"{section}.{key}" for section, values in tree.items() if isinstance(values, dict)
                for key, value in values.items()
                if (list(d) if isinstance(d := defaults[section].get(key), tuple) else d) == value]
    assert not repeated, repeated
