"""K per block from each policy, on hand-made score vectors (eq. 1, eq. 2, Table 8)."""
import pytest
import torch

from dups.models.ratios import PRESETS, RatioPolicy, budget, preset, ratio_schedule


def scores(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_table8_presets_are_the_papers():
    assert PRESETS["ade20k"] == {"tau": (0.01, 0.02, 0.04), "beta": (0.85, 0.7, 0.6)}
    assert PRESETS["cocostuff"] == {"tau": (0.01, 0.02, 0.04), "beta": (0.7, 0.7, 0.6)}
    assert PRESETS["cityscapes"] == {"tau": (0.005, 0.01, 0.02), "beta": (0.5, 0.7, 0.65)}


def test_budget_is_an_exact_floor():
    assert budget(90, 0.7) == 63  # 90 * 0.7 is 62.99999999999999 in floating point
    assert budget(20, 0.85) == 17
    assert budget(256, 0.85) == 217
    assert budget(10, 0.7) == 7
    assert budget(7, 0) == 0


def test_per_image_eq1():
    p = RatioPolicy.from_preset("per_image", "ade20k")
    # block 0: tau = 0.01; 3 of 8 scores exceed it (0.01 itself does not)
    s = scores([0.5, 0.02, 0.011, 0.01, 0.0, -0.3, 0.009, 0.0])
    assert p.num_selected(0, s, training=False) == 3
    # block 2: tau = 0.04, so only 0.5 and... none else
    assert p.num_selected(2, s, training=False) == 1


def test_per_image_refuses_a_batch_with_different_counts():
    p = RatioPolicy.from_preset("per_image", "ade20k")
    with pytest.raises(ValueError, match="one at a time"):
        p.num_selected(0, scores([0.5, 0.0], [0.5, 0.5]), training=False)
    assert p.num_selected(0, scores([0.5, 0.0], [0.0, 0.5]), training=False) == 1


def test_batch_eq2_takes_the_max_then_clamps():
    p = RatioPolicy.from_preset("batch", "ade20k")  # beta = 0.85, 0.7, 0.6
    s = scores([1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # gamma 0.1
               [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])  # gamma 0.4
    assert p.num_selected(0, s, training=True) == 4  # max = 0.4
    flat = torch.zeros(2, 30)
    assert p.num_selected(0, flat, training=True) == 3  # lower bound 0.1 -> floor(3.0)
    busy = torch.ones(2, 30)
    assert p.num_selected(0, busy, training=True) == 25  # beta_1 = 0.85 -> floor(25.5)
    assert p.num_selected(1, torch.ones(1, 170), training=True) == 119  # exactly 0.7 * 170
    assert p.num_selected(2, busy, training=True) == 18  # beta_3 = 0.6


def test_dynamic_switches_between_eq2_and_eq1():
    p = RatioPolicy.from_preset("dynamic", "cityscapes")
    s = scores([0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert p.num_selected(0, s, training=False) == 1  # eq. 1: 1 of 20
    assert p.num_selected(0, s, training=True) == 2  # eq. 2: at least 0.1


def test_full_fixed_random():
    s = torch.zeros(3, 20)
    assert RatioPolicy("full").num_selected(1, s, True) == 20
    assert RatioPolicy.from_preset("fixed", "ade20k").num_selected(0, s, False) == 17
    assert RatioPolicy("random", random_ratio=0.5).num_selected(0, s, True) == 10
    assert RatioPolicy("full").num_selected(1, torch.zeros(3, 0), True) == 0


def test_schedule_and_errors():
    assert ratio_schedule(0.0) == 1.0 and ratio_schedule(1.0) == 0.5
    assert ratio_schedule(0.5) == pytest.approx(0.75)
    assert ratio_schedule(0.5, shape="cosine") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown upsampling preset 'kitti'"):
        preset("kitti")
    with pytest.raises(ValueError, match="unknown ratio policy 'greedy'"):
        RatioPolicy("greedy")
    with pytest.raises(ValueError, match="schedule shape"):
        ratio_schedule(0.3, shape="zigzag")
