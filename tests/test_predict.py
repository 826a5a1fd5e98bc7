"""`dups predict` and `init_model` / `inference_model`: a briefly trained model's predictions on
the validation images equal `dups eval`'s, from exported weights and from the checkpoint."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_helpers as th
from dups.cli import main as cli_main
from dups.cluster.launch import train_local
from dups.data.labels import remap_table
from dups.models.ratios import RatioPolicy
from dups.apis.inference import inference_model, init_model
from dups.evaluation.evaluate import confusion, scores_from_confusion
from dups.evaluation.run import run_eval
from dups.engine.export import export_weights

pytestmark = pytest.mark.integration  # Ray, DeepSpeed engines, processes or servers: `pytest --integration`


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    shards = th.make_dataset(root / "data", train=8, val=3)
    overrides = ["train.iters=80", "train.checkpoint_every=80", "train.eval_every=1000", "optim.lr=0.0005",
                 "data.crop=96", "launch.launcher=local", "train.pictures=0", "data.eval_short_side=0"]
    result = train_local(th.test_config(shards, root / "run", *overrides))
    weights = str(root / "weights" / "demo.safetensors")
    export_weights(result.last_checkpoint, weights)
    cfg = th.test_config(shards, root / "run", *overrides)
    return {"root": root, "weights": weights, "checkpoint": result.last_checkpoint, "cfg": cfg,
            "images": root / "data" / "src" / "images" / "validation",
            "labels": root / "data" / "src" / "annotations" / "validation"}


def test_predict_writes_what_eval_measures_and_reports_bad_images(trained, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "pred"
    rc = cli_main(["predict", str(trained["images"]), str(bad), "--checkpoint", trained["weights"],
                   "--out", str(out), "--stats", "--tokens", "--workers", "1"])
    assert rc == 1  # one image unreadable: named, and the others still segmented
    assert f"cannot read {bad}" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 3 and [f["file"] for f in report["failed"]] == [str(bad)]

    # the label PNGs hold ADE20K's own ids (1..150); remapped, they score what `dups eval` does
    table, _ = remap_table("ade20k")
    conf = 0
    pngs = sorted((out / "labels").glob("*.png"))
    assert len(pngs) == 3
    for png in pngs:
        raw = np.asarray(Image.open(png))
        assert raw.min() >= 1 and raw.dtype == np.uint8
        gt = table[np.asarray(Image.open(trained["labels"] / png.name))]
        conf = conf + confusion(torch.from_numpy(table[raw].astype(np.int64)), torch.from_numpy(gt.astype(np.int64)), 150)
        assert (out / "overlay" / f"{png.stem}.jpg").is_file()
        assert Image.open(out / "tokens" / png.name).size[1] == raw.shape[0]
    mine = scores_from_confusion(conf)
    _, res = run_eval(trained["cfg"], trained["checkpoint"])
    assert len({len(np.unique(np.asarray(Image.open(p)))) for p in pngs} | {1}) > 1  # not one class everywhere
    assert mine["mIoU"] == pytest.approx(res.mIoU, abs=1e-9) and mine["aAcc"] == pytest.approx(res.aAcc, abs=1e-9)
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert np.mean([s["gflops"] for s in stats]) == pytest.approx(res.gflops_mean, rel=1e-9)
    assert np.mean([s["tokens_per_stage"] for s in stats], axis=0).tolist() == pytest.approx(res.tokens_per_stage)


def test_from_pretrained_and_predict_on_images_of_any_size(trained):
    model = init_model(trained["weights"])
    assert not model.training and model.encoder.ratio_policy.kind == "dynamic"
    files = sorted(trained["images"].glob("*.jpg"))
    images = [Image.open(f) for f in files]
    labels = inference_model(model, images)  # PIL images of different sizes
    assert [lab.shape for lab in labels] == [im.size[::-1] for im in images]
    # the same weights through the checkpoint: the same predictions
    again = inference_model(init_model(trained["checkpoint"]), [np.asarray(im) for im in images])
    assert all(torch.equal(a, b) for a, b in zip(labels, again))
    # one size, a policy that does not depend on the image: one batched forward, as one by one
    same = [np.asarray(images[0])] * 2 + [np.asarray(images[0])[:, ::-1]]
    fixed = RatioPolicy.from_preset("fixed", "ade20k")
    batched = inference_model(model, same, fixed)
    single = [inference_model(model, [im], fixed)[0] for im in same]
    assert all((a == b).float().mean() > 0.999 for a, b in zip(batched, single))


def test_weights_without_their_config_are_a_clear_error(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    lone = tmp_path / "lone.safetensors"
    save_file(load_file(trained["weights"]), str(lone))
    with pytest.raises(ValueError, match=f"{lone}: no config saved with these weights"):
        init_model(str(lone))
    assert cli_main(["predict", str(trained["images"]), "--checkpoint", str(lone), "--out", str(tmp_path / "o"),
                     "--config", str(Path(__file__).parents[1] / "dups" / "configs" / "demo.yaml")]) == 0


def test_a_checkpoint_keeps_its_model_when_a_default_changes(trained, monkeypatch):
    """The saved config names every encoder and decoder field, so the model a checkpoint
    rebuilds is the one it was trained as, whatever the code's defaults are later: from its
    own config, and under a user's config (``dups eval CONFIG``, a resumed run) unless that
    names the field."""
    import dataclasses

    import dups.models.config as model_config
    from dups.apis.pretrained import load_pretrained

    _, before = run_eval(trained["cfg"], trained["checkpoint"])
    saved = json.loads((Path(trained["checkpoint"]) / "config.json").read_text())["model"]
    fields = {f.name for f in dataclasses.fields(model_config.DecoderConfig)}
    assert set(saved["decoder"]) == fields and saved["decoder"]["fuse_coarse"] is True
    assert set(saved["encoder"]) == {f.name for f in dataclasses.fields(model_config.EncoderConfig)}
    flipped = {k: dataclasses.replace(v, fuse_coarse=False) for k, v in model_config.DECODERS.items()}
    monkeypatch.setattr(model_config, "DECODERS", flipped)
    assert model_config.decoder_config("dups_demo").fuse_coarse is False
    assert load_pretrained(trained["checkpoint"]).model.pixel_decoder.fuse_coarse is True
    cfg = trained["cfg"]
    assert load_pretrained(trained["checkpoint"], config=cfg).model.pixel_decoder.fuse_coarse is True
    _, after = run_eval(cfg, trained["checkpoint"])
    assert after.mIoU == before.mIoU and after.gflops_mean == before.gflops_mean
    named = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, decoder={"fuse_coarse": False}))
    assert load_pretrained(trained["checkpoint"], config=named).model.pixel_decoder.fuse_coarse is False
    # a run resumed by newer code continues the model it trained
    from dups.cluster.launch import resume_point
    from dups.tasks import build_model

    url, resumed = resume_point(cfg, trained["checkpoint"])
    assert url == trained["checkpoint"] and build_model(resumed).pixel_decoder.fuse_coarse is True
    assert build_model(resume_point(named, trained["checkpoint"])[1]).pixel_decoder.fuse_coarse is False


def _exif_rotated(image: Image.Image, path: Path) -> None:
    """Saves ``image`` as a camera would when held upright: stored turned, EXIF orientation 6
    (viewers turn it 90 degrees clockwise back)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    image.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)


def test_photos_as_cameras_write_them(trained, tmp_path, capsys):
    """EXIF orientation applied, 16-bit scaled to 8 bits, a single image in, one label out;
    outputs named as the README says; one clear line for a bad file and a CUDA-less --device."""
    model = init_model(trained["weights"])
    photo = Image.open(sorted(trained["images"].glob("*.jpg"))[0]).convert("RGB")
    shown = np.asarray(photo)
    src = tmp_path / "camera"
    src.mkdir()
    _exif_rotated(photo, src / "upright.jpg")
    stored = Image.open(src / "upright.jpg")
    assert stored.size == photo.size[::-1]  # stored turned, shown upright
    grey = np.asarray(photo.convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(src / "grey16.png")  # 16-bit, as scanners write
    assert Image.open(src / "grey16.png").mode == "I;16"
    (src / "notes.png").write_bytes(b"not an image at all")

    single = inference_model(model, Image.open(src / "upright.jpg"))  # one image in: one label map out
    assert isinstance(single, torch.Tensor) and single.shape == shown.shape[:2]
    turned_back = np.asarray(stored.convert("RGB").transpose(Image.Transpose.ROTATE_270))  # by hand
    assert torch.equal(single, inference_model(model, turned_back))
    out = tmp_path / "out"
    assert cli_main(["predict", str(src), "--checkpoint", trained["weights"], "--out", str(out),
                     "--workers", "0"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "notes.png" in line]
    assert len(lines) == 1 and "not an image file Pillow can read" in lines[0] and "BytesIO" not in err
    table, _ = remap_table("ade20k")
    upright = table[np.asarray(Image.open(out / "labels" / "upright.png"))]
    assert upright.shape == shown.shape[:2]  # labels/NAME.png, lined up with the photo as shown
    assert np.array_equal(upright, single.numpy())
    assert Image.open(out / "overlay" / "upright.jpg").size == photo.size
    sixteen = table[np.asarray(Image.open(out / "labels" / "grey16.png"))]
    expected = inference_model(model, np.repeat(grey[..., None], 3, axis=2)).numpy()
    assert np.array_equal(sixteen, expected) and len(np.unique(sixteen)) > 1  # not clipped to white

    assert cli_main(["predict", str(src / "upright.jpg"), "--checkpoint", trained["weights"],
                     "--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dups predict: error: --device cuda: this torch ({torch.__version__}) sees no CUDA "
                   "device; use --device cpu (or auto)"]
    (tmp_path / "other").mkdir()
    Image.fromarray(shown).save(tmp_path / "other" / "upright.jpg")
    assert cli_main(["predict", str(src), str(tmp_path / "other"), "--checkpoint", trained["weights"],
                     "--out", str(tmp_path / "clash")]) == 2
    assert "would both write labels/upright.png" in capsys.readouterr().err


def test_predict_at_the_evaluation_size_scores_what_eval_does(trained, tmp_path):
    """--short-side runs each image as evaluation does at data.eval_short_side (a 20-megapixel
    photo costs what a 512-pixel one does) and writes labels at the image's own size."""
    import dataclasses

    out = tmp_path / "pred"
    assert cli_main(["predict", str(trained["images"]), "--checkpoint", trained["weights"], "--out", str(out),
                     "--short-side", "64", "--workers", "0"]) == 0
    table, _ = remap_table("ade20k")
    conf = 0
    for png in sorted((out / "labels").glob("*.png")):
        gt = table[np.asarray(Image.open(trained["labels"] / png.name))]
        raw = np.asarray(Image.open(png))
        assert raw.shape == gt.shape
        conf = conf + confusion(torch.from_numpy(table[raw].astype(np.int64)), torch.from_numpy(gt.astype(np.int64)), 150)
    cfg = trained["cfg"]
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_short_side=64))
    _, res = run_eval(cfg, trained["checkpoint"])
    assert scores_from_confusion(conf)["mIoU"] == pytest.approx(res.mIoU, abs=1e-9)


def test_prep_reads_images_as_shown(tmp_path):
    """A photo stored turned with EXIF orientation: its label is drawn on it as shown (as
    detectron2 and OpenCV read it); a label drawn on the stored pixels is refused, saying why."""
    import prep_fixtures as fx
    from dups.data.prep import prepare
    from dups.data.augment import eval_segmentation
    from dups.data.streams import load_manifest, read_shard, shards_of

    src = tmp_path / "src"
    fx.ade20k_with_bad_inputs(src, train=2, val=1)
    img, ann = src / "images" / "training", src / "annotations" / "training"
    photo = Image.open(img / "SYN_train_00000001.jpg").convert("RGB")
    label = np.asarray(Image.open(ann / "SYN_train_00000001.png"))
    _exif_rotated(photo, img / "TURNED_good.jpg")
    Image.fromarray(label).save(ann / "TURNED_good.png")
    _exif_rotated(photo, img / "TURNED_bad.jpg")
    Image.fromarray(np.rot90(label)).save(ann / "TURNED_bad.png")  # drawn on the stored pixels
    manifest = prepare("ade20k", str(src), str(tmp_path / "out"), progress=False, use_ray=False)
    bad = [r for r in manifest["rejected"] if "TURNED" in r["file"]]
    assert [r["file"].rsplit("/", 1)[1] for r in bad] == ["TURNED_bad.png"]
    assert "it matches the image as stored" in bad[0]["reason"] and "EXIF orientation" in bad[0]["reason"]
    shards = shards_of(str(tmp_path / "out"), load_manifest(str(tmp_path / "out")), "train")
    sample = next(s for sh in shards for s in read_shard(sh.url) if s["__key__"] == "TURNED_good")
    seen = eval_segmentation(sample, 0)
    assert seen["size"] == label.shape and seen["label"].shape == label.shape


def test_predict_on_ray_with_two_actors_writes_what_one_process_writes(trained, tmp_path, monkeypatch):
    """Ray Data batch inference (2 model actors on the local Ray): every image once, the same
    label PNGs as the one-process run, a bad file named in report.json and skipped."""
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    src = tmp_path / "photos"
    src.mkdir()
    for image in sorted(trained["images"].glob("*.jpg")):
        (src / image.name).write_bytes(image.read_bytes())
    (src / "sub").mkdir()
    (src / "sub" / "again.jpg").write_bytes(next(trained["images"].glob("*.jpg")).read_bytes())
    (src / "broken.jpg").write_bytes(b"not an image")
    alone, spread = tmp_path / "alone", tmp_path / "ray"
    common = ["--checkpoint", trained["weights"], "--batch-size", "1"]
    assert cli_main(["predict", str(src), "--out", str(alone), "--workers", "0", *common]) == 1
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert cli_main(["predict", str(src), "--out", str(spread), "--ray", "--actors", "2", *common]) == 1
    finally:
        ray.shutdown()
    names = sorted(str(p.relative_to(alone / "labels")) for p in (alone / "labels").rglob("*.png"))
    assert len(names) == 4 and "sub/again.png" in names
    assert sorted(str(p.relative_to(spread / "labels")) for p in (spread / "labels").rglob("*.png")) == names
    for name in names:
        assert np.array_equal(np.asarray(Image.open(spread / "labels" / name)), np.asarray(Image.open(alone / "labels" / name)))
        assert (spread / "overlay" / name.replace(".png", ".jpg")).is_file()
    report = json.loads((spread / "report.json").read_text())
    assert report["images"] == 4 and report["actors"] == 2
    assert [f["file"] for f in report["failed"]] == [str(src / "broken.jpg")]
    assert "not an image file Pillow can read" in report["failed"][0]["reason"]


def test_predict_on_ray_reads_and_writes_s3(trained, tmp_path, s3_server, monkeypatch):
    import boto3
    import ray

    from dups.apis.batch_inference import predict_on_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="photos")
    images = sorted(trained["images"].glob("*.jpg"))
    for image in images:
        s3.upload_file(str(image), "photos", f"in/{image.name}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = predict_on_ray(trained["weights"], ["s3://photos/in"], "s3://photos/out", actors=1)
    finally:
        ray.shutdown()
    assert report.images == len(images) and not report.failed
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="photos", Prefix="out/")["Contents"]}
    assert keys == {"out/report.json", *(f"out/labels/{p.stem}.png" for p in images),
                    *(f"out/overlay/{p.stem}.jpg" for p in images)}
    alone = tmp_path / "alone"
    assert cli_main(["predict", str(images[0]), "--checkpoint", trained["weights"], "--out", str(alone),
                     "--workers", "0"]) == 0
    body = s3.get_object(Bucket="photos", Key=f"out/labels/{images[0].stem}.png")["Body"].read()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(body))),
                          np.asarray(Image.open(alone / "labels" / f"{images[0].stem}.png")))
