"""The encoder end to end on CPU: token counts, nesting, geometry, learning, bad input."""
import json

import pytest
import torch

from dups.cli import main as cli_main
from dups.models import ENCODERS, RatioPolicy, build_encoder
from dups.models.edges import edge_scores, token_targets


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    return build_encoder("dups_demo").eval()


def test_table1_sizes():
    t, s, b = ENCODERS["dups_tiny"], ENCODERS["dups_small"], ENCODERS["dups_base"]
    assert (t.dims, t.depths_left, t.depths_right) == ((512, 256, 128, 64), (1, 1, 1, 4), (4, 16, 4))
    assert (s.dims, s.depths_left, s.depths_right) == ((512, 256, 128, 64), (2, 2, 2, 2), (3, 24, 6))
    assert (b.dims, b.depths_left, b.depths_right) == ((768, 384, 192, 96), (2, 2, 2, 8), (4, 18, 6))
    enc = build_encoder("dups_tiny")
    assert [len(st) for st in enc.left] == [1, 1, 1, 4]
    assert [len(st) for st in enc.right] == [4, 16, 4]
    assert enc.stem.kernel_size == (32, 32)


@torch.no_grad()
def test_full_upsampling_token_counts_and_pyramid(demo):
    out = demo(torch.randn(1, 3, 512, 512), RatioPolicy("full"))
    assert out.tokens_per_stage == [256, 1280, 5376, 21760]
    assert [lv.patch for lv in out.levels] == [4, 8, 16, 32]
    assert [lv.features.shape[1] for lv in out.levels] == [16384, 4096, 1024, 256]
    assert [lv.features.shape[2] for lv in out.levels] == [32, 32, 64, 128]
    # full upsampling: every level tiles the whole image exactly once
    for lv in out.levels:
        cells = (lv.centres[0] // lv.patch).long()
        assert len({tuple(c) for c in cells.tolist()}) == (512 // lv.patch) ** 2


@torch.no_grad()
def test_prefixes_nest_and_children_lie_inside_their_parents(demo):
    torch.manual_seed(1)
    image = torch.randn(2, 3, 256, 320)
    out = demo(image, RatioPolicy.from_preset("fixed", "ade20k"))
    tokens = out.tokens
    offs = tokens.offsets
    assert offs == sorted(offs) and offs[0] == (256 // 32) * (320 // 32)
    for i, rec in enumerate(out.records):
        k = rec.selected.shape[1]
        assert offs[i + 1] - offs[i] == 4 * k  # 4 children per selected token
        assert rec.centres.shape[1] == offs[i] - (offs[i - 1] if i else 0)
        parents = rec.centres.gather(1, rec.selected[..., None].expand(-1, -1, 2))
        children = tokens.centres[:, offs[i]:offs[i + 1]].reshape(2, k, 4, 2)
        half = rec.patch / 2
        assert ((children - parents[:, :, None]).abs() < half).all()  # inside the parent
        assert ((children - parents[:, :, None]).abs() == rec.patch / 4).all()
        assert (tokens.scales[:, offs[i]:offs[i + 1]] == i + 1).all()
        # the four children of one parent are four different sub-patches
        assert all(len({tuple(c) for c in kids.tolist()}) == 4 for kids in children[0])
    for lv, stage in zip(out.levels, (3, 2, 1, 0)):
        torch.testing.assert_close(lv.centres, tokens.centres[:, tokens.stage_rows(stage)])


def busy_and_flat_labels(size=128):
    flat = torch.zeros(1, size, size, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    busy = (((yy // 6) + (xx // 10)) % 3).unsqueeze(0)
    return flat, busy


@torch.no_grad()
def test_per_image_policy_gives_each_image_its_own_count(demo):
    policy = RatioPolicy.from_preset("per_image", "ade20k")
    counts = []
    for label in busy_and_flat_labels():
        out = demo(torch.randn(1, 3, 128, 128), policy, oracle_maps=edge_scores(label))
        counts.append(out.tokens_per_stage)
    flat, busy = counts
    assert flat == [16, 16, 16, 16]
    assert busy[1] > flat[1] and busy[3] > busy[2] > busy[1]


def synthetic_batch(n, size=128, seed=0):
    """Rectangles of 4 classes on a background; each class has its own colour (the same for
    every seed), plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(4):
            y0, x0 = torch.randint(0, size - 20, (2,), generator=g).tolist()
            hh, ww = torch.randint(8, 60, (2,), generator=g).tolist()
            labels[i, y0:y0 + hh, x0:x0 + ww] = int(torch.randint(1, 5, (1,), generator=g))
    palette = torch.rand(5, 3, generator=torch.Generator().manual_seed(1000)) * 2 - 1
    images = palette[labels].permute(0, 3, 1, 2) + 0.1 * torch.randn(n, 3, size, size, generator=g)
    return images, labels


def test_score_mlp_learns_edge_fractions():
    torch.manual_seed(0)
    enc = build_encoder("dups_demo").train()
    images, labels = synthetic_batch(8)
    maps = edge_scores(labels)
    policy = RatioPolicy("full")
    opt = torch.optim.AdamW(enc.parameters(), lr=2e-3)

    def score_loss():
        out = enc(images, policy)
        losses = [torch.nn.functional.mse_loss(rec.scores, token_targets(maps[rec.patch], rec.centres, rec.patch))
                  for rec in out.records]
        return sum(losses) / len(losses)

    targets = torch.cat([maps[s].flatten() for s in (32, 16, 8)])
    first = score_loss()
    for _ in range(40):
        opt.zero_grad()
        loss = score_loss()
        loss.backward()
        opt.step()
    final = score_loss().item()
    assert final < 0.5 * first.item()
    # better than the best constant guess: it has learnt where the edges are
    assert final < 0.5 * targets.var().item(), (final, targets.var().item())
    # and it ranks edge tokens above flat ones in every block (held-out scenes)
    from dups.evaluation.evaluate import _head_quality
    images, labels = synthetic_batch(8, seed=1)
    maps = edge_scores(labels)
    with torch.no_grad():
        records = enc.eval()(images, policy).records
    pairs = [[(r.scores[i].numpy(), token_targets(maps[r.patch], r.centres, r.patch)[i].numpy())
              for r in records] for i in range(len(images))]
    auc = _head_quality(pairs, policy.tau)["score_auc"]
    assert min(auc) > 0.75, auc


def test_drop_path_grows_in_the_order_blocks_run():
    """Left stages 1..4, then right stages 3, 2, 1: the last block to run drops the most."""
    enc = build_encoder("dups_tiny", drop_path=0.3)
    run = [enc.left[i] for i in range(4)] + [enc.right[i] for i in (2, 1, 0)]
    rates = [block.drop_path.p for stage in run for block in stage]
    assert len(rates) == sum(ENCODERS["dups_tiny"].depths_left) + sum(ENCODERS["dups_tiny"].depths_right)
    assert rates == sorted(rates) and rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert enc.right[0][-1].drop_path.p == pytest.approx(0.3)  # right stage 1 runs last


def test_stage1_attention_switch():
    """Global (default) and windowed stage 1 share their weights; on a grid wider than the
    window the results differ, and the window's equal the global ones where it covers all."""
    torch.manual_seed(0)
    glob = build_encoder("dups_demo").eval()
    window = build_encoder("dups_demo", stage1_attention="window", grid_kernel=3).eval()
    window.load_state_dict(glob.state_dict())
    images = torch.randn(1, 3, 128, 160)
    policy = RatioPolicy("full")
    with torch.no_grad():
        assert not torch.allclose(glob(images, policy).levels[-1].features,
                                  window(images, policy).levels[-1].features)
        small = torch.randn(1, 3, 96, 96)  # 3 x 3 tokens: the 3 x 3 window is global
        torch.testing.assert_close(glob(small, policy).levels[-1].features,
                                   window(small, policy).levels[-1].features, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="stage1_attention"):
        build_encoder("dups_demo", stage1_attention="local")


def test_image_data_switch():
    enc = build_encoder("dups_demo", image_data=False)
    assert not hasattr(enc.upsample[0], "image_proj")
    with_data = build_encoder("dups_demo")
    out = with_data(torch.randn(1, 3, 64, 64), RatioPolicy("full"))
    out.levels[0].features.sum().backward()
    assert with_data.upsample[2].image_proj.weight.grad.abs().sum() > 0


def test_bad_input_is_a_clear_error(demo):
    with pytest.raises(ValueError, match="multiples of 32.*500x512"):
        demo(torch.randn(1, 3, 500, 512))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(1, 4, 64, 64\)"):
        demo(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="unknown model 'dups_huge'"):
        build_encoder("dups_huge")
    with pytest.raises(ValueError, match="unknown encoder setting"):
        build_encoder("dups_tiny", widths=3)


def test_summary_cli_json(capsys):
    assert cli_main(["summary", "--model", "dups_demo", "--image-size", "512", "--ratio", "full",
                     "--task", "backbone", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens_per_stage"] == [256, 1280, 5376, 21760]
    assert report["gflops"] > 0 and "multiply-adds" in report["flop_convention"]
    assert report["params_decoder_m"] == 0 and report["params_total_m"] == report["params_backbone_m"]
    assert cli_main(["summary", "--model", "dups_demo", "--image-size", "512", "--ratio", "fixed",
                     "--task", "backbone", "--json"]) == 0
    fixed = json.loads(capsys.readouterr().out)
    assert fixed["gflops"] < report["gflops"]
    assert cli_main(["summary", "--model", "dups_demo", "--image-size", "256", "--classes", "19",
                     "--json"]) == 0
    seg = json.loads(capsys.readouterr().out)
    assert seg["task"] == "segmentation" and seg["params_decoder_m"] > 0
    # each figure is rounded to 3 decimals: the sum of two may differ by a unit
    assert seg["params_total_m"] == pytest.approx(seg["params_backbone_m"] + seg["params_decoder_m"], abs=1.5e-3)
    with pytest.raises(SystemExit):
        cli_main(["summary", "--preset", "kitti"])
    assert "invalid choice: 'kitti'" in capsys.readouterr().err
