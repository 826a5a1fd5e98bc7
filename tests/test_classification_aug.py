"""Pre-training regularisation: RandAugment, random erasing, Mixup / CutMix, label smoothing."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dups.data.classification_aug import (OPS, mix_batch, parse_rand_augment, rand_augment,
                                         random_erasing, smooth_one_hot, soft_cross_entropy)


def picture(h=48, w=64):
    """Smooth (so a larger shift or rotation moves it further) and coloured."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([40 + 3 * xx, 30 + 4 * yy, 128 + 60 * np.sin(xx / 9 + yy / 7)], -1).astype(np.uint8)


def test_rand_augment_notation():
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == {"ops": 2, "magnitude": 9.0, "magnitude_std": 0.5}
    assert parse_rand_augment("rand-n3-m5") == {"ops": 3, "magnitude": 5.0, "magnitude_std": 0.0}
    for bad in ("auto-m9", "rand-m9-inc0", "rand-x3"):
        with pytest.raises(ValueError, match="rand_augment"):
            parse_rand_augment(bad)


def test_rand_augment_ops_grow_with_magnitude_and_replay():
    img = picture()
    from PIL import Image
    for name, op in OPS.items():
        out = np.asarray(op(Image.fromarray(img), 1.0, np.random.default_rng(0)).convert("RGB"))
        assert out.shape == img.shape and out.dtype == np.uint8, name
        weak = np.asarray(op(Image.fromarray(img), 0.1, np.random.default_rng(0)).convert("RGB"))
        # "increasing" ops: a stronger magnitude moves the image at least as far
        if name not in ("AutoContrast", "Equalize", "Invert"):
            strong = np.abs(out.astype(int) - img).mean()
            assert np.abs(weak.astype(int) - img).mean() <= strong + 1e-9, name
    a = rand_augment(img, np.random.default_rng(5), ops=3, magnitude=9, magnitude_std=0.5)
    b = rand_augment(img, np.random.default_rng(5), ops=3, magnitude=9, magnitude_std=0.5)
    assert np.array_equal(a, b)  # the sample's generator decides everything: resume replays it
    changed = [not np.array_equal(rand_augment(img, np.random.default_rng(s)), img) for s in range(20)]
    assert 5 < sum(changed) < 20  # each of 2 ops is skipped with probability 1/2


def test_random_erasing_replaces_one_rectangle_with_noise():
    image = torch.zeros(3, 40, 50)
    assert torch.equal(random_erasing(image, np.random.default_rng(0), probability=0.0), image)
    for seed in range(10):
        out = random_erasing(image, np.random.default_rng(seed), probability=1.0)
        rows, cols = (out != 0).any(0).nonzero(as_tuple=True)
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int((out != 0).any(0).sum()) == int(area)  # one filled rectangle
        assert 0.02 * 2000 * 0.9 <= int(area) <= 2000 / 3 * 1.1
    assert torch.equal(image, torch.zeros(3, 40, 50))  # the input is not modified


def test_label_smoothing_matches_torch():
    logits = torch.randn(6, 10)
    labels = torch.randint(0, 10, (6,))
    images = torch.randn(6, 3, 8, 8)
    same, targets = mix_batch(images, labels, 10, torch.Generator().manual_seed(0), smoothing=0.1)
    assert torch.equal(same, images)
    assert torch.allclose(soft_cross_entropy(logits, targets),
                          F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert torch.allclose(soft_cross_entropy(logits, smooth_one_hot(labels, 10, 0.0)),
                          F.cross_entropy(logits, labels))


def test_mixup_and_cutmix_weights_match_the_pixels():
    images = torch.randn(4, 3, 32, 40)
    labels = torch.tensor([0, 1, 2, 3])
    flipped = images.flip(0)
    mixed, targets = mix_batch(images, labels, 5, torch.Generator().manual_seed(1), mixup=0.8)
    lam = targets[0, 0]
    assert targets[0, 3] == pytest.approx(1 - lam) and torch.allclose(targets.sum(1), torch.ones(4))
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * flipped)
    seen = set()
    for seed in range(6):
        mixed, targets = mix_batch(images, labels, 5, torch.Generator().manual_seed(seed), cutmix=1.0)
        kept = (mixed[0] == images[0]).all(0).float().mean()  # the share of image 0 left
        assert targets[0, 0] == pytest.approx(float(kept), abs=1e-6)
        assert targets[0, 3] == pytest.approx(1 - float(kept), abs=1e-6)
        seen.add(round(float(kept), 3))
    assert len(seen) > 2
    # both on: the switch probability picks CutMix or Mixup per batch
    kinds = set()
    for seed in range(20):
        mixed, _ = mix_batch(images, labels, 5, torch.Generator().manual_seed(seed), mixup=0.8, cutmix=1.0)
        kinds.add("cutmix" if ((mixed == images) | (mixed == flipped)).all() else "mixup")
    assert kinds == {"cutmix", "mixup"}
