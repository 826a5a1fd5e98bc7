"""The benchmark scripts run end to end on small inputs (their figures are in BENCHMARKS.md;
this only keeps them from rotting while no GPU is lent): each prints its table."""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # Ray, DeepSpeed engines, processes or servers: `pytest --integration`

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.timeout(320)
def test_launches_counts_operators_per_site():
    out = run_script("benchmarks/launches.py", "--image-size", "128", "--models", "fixed", "--top", "3")
    line = next(line for line in out.splitlines() if line.startswith("DUPS-Tiny fixed beta:"))
    assert int(line.split(":")[1].split()[0]) > 100  # operators per forward
    assert "models/attention.py:forward" in out


def test_operator_counter_counts_kernels_not_views():
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks are scripts, not a package
    from launches import OpCounter
    x = torch.ones(4, 3)
    counter = OpCounter()
    with counter:
        (x.t() * 2 + 1).sum()  # the transpose is a view: no kernel
    assert sum(counter.by_site.values()) == 3  # mul, add, sum


@pytest.mark.timeout(320)
def test_attention_benchmark_compares_paths():
    out = run_script("benchmarks/attention.py", "--tokens", "512", "--grid", "8", "--repeats", "1")
    mixed = next(line for line in out.splitlines() if line.startswith("2."))
    # reading values as wide as the queries changes no value (fused vs unfused kernel: rounding)
    diff = float(mixed.split("padded/narrow")[1].split("max |diff|")[1].split(")")[0])
    assert diff < 1e-5
    assert out.count("\n") >= 4


@pytest.mark.timeout(320)
def test_peer_benchmark_reports_gflops_and_ratio():
    out = run_script("benchmarks/peer.py", "--image-size", "128", "--repeats", "1")
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines() if line.startswith(("Mask2", "DUPS"))}
    assert set(rows) == {"Mask2Former Swin-T", "DUPS-Tiny fixed beta", "DUPS-Tiny full"}
    assert rows["Mask2Former Swin-T"][-1] == "1.000"  # the peer is its own reference
    for name, cols in rows.items():  # params, GFLOPs, x peer, ms, x peer after the name
        gflops, x_gflops, ms, x_ms = (float(c) for c in cols[-4:])
        assert x_gflops == pytest.approx(gflops / float(rows["Mask2Former Swin-T"][-4]), abs=2e-3), name
        assert x_ms == pytest.approx(ms / float(rows["Mask2Former Swin-T"][-2]), rel=2e-3, abs=2e-3), name
    # the semantic inference adds queries x classes x H x W multiply-adds to each model
    line = next(line for line in out.splitlines() if line.startswith("with the semantic inference"))
    totals = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].removesuffix(" GFLOPs").split(", "))
    for name, cols in rows.items():
        assert float(totals[name]) == pytest.approx(float(cols[-4]) + 100 * 150 * 128 * 128 / 1e9, abs=0.011)


@pytest.mark.timeout(320)
def test_dynamic_compares_the_trained_head_with_its_oracle(tmp_path):
    import torch

    import train_helpers as th
    from dups.models.segmentor import build_segmentor

    shards = th.make_dataset(tmp_path, train=1, val=2)
    torch.manual_seed(0)
    torch.save(build_segmentor("dups_demo", num_classes=150).state_dict(), tmp_path / "model.pt")
    out = run_script("benchmarks/dynamic.py", "--checkpoint", str(tmp_path / "model.pt"), f"data.train={shards}")
    rows = {line[:26].strip(): line[26:].split() for line in out.splitlines()[2:]}
    assert list(rows) == ["full", "fixed beta (ade20k)", "dynamic, trained head", "dynamic, oracle"]
    assert rows["full"][1] == "1.000" and rows["full"][3:8] == ["1.00", "/", "1.00", "/", "1.00"]
    # fixed beta splits floor(N beta_s) of N: fewer multiply-adds than full
    assert float(rows["fixed beta (ade20k)"][1]) < 1 and "2 validation images" in out.splitlines()[0]


@pytest.mark.timeout(320)
def test_backbone_compares_the_policies_with_full():
    out = run_script("benchmarks/backbone.py", "--task", "segmentation", "--image-size", "64", "--repeats", "1")
    rows = {line[:24].strip(): line[24:].split() for line in out.splitlines()
            if line.startswith(("full", "fixed", "dynamic", "random"))}
    assert list(rows) == ["full", "fixed beta (ade20k)", "dynamic (oracle)", "random 50%"]
    assert rows["full"][1] == "1.000" and rows["full"][3] == "1.000"
    for cols in rows.values():  # GFLOPs, x full, ms, x full, tokens per stage
        # GFLOPs are printed to 2 decimals: the ratio of two printed figures is that exact only so far
        err = 5e-3 * (1 + float(cols[1])) / float(rows["full"][0])
        assert float(cols[1]) == pytest.approx(float(cols[0]) / float(rows["full"][0]), abs=err + 5e-4)
    assert "adds 0.06 GFLOPs per image" in out  # 100 queries x 150 classes x 64 x 64


@pytest.mark.timeout(320)
def test_stage1_compares_global_with_window_attention():
    out = run_script("benchmarks/stage1.py", "--model", "dups_demo", "--image-size", "320", "--repeats", "1")
    rows = {line.split()[2]: line.split() for line in out.splitlines() if line.startswith("stage 1")}
    assert list(rows) == ["global", "window"]
    assert rows["global"][4] == rows["window"][4]  # the same parameters
    # a 10 x 10 grid: 100 keys per query globally against a 7 x 7 window's 49
    assert float(rows["global"][7]) > float(rows["window"][7])


@pytest.mark.timeout(320)
def test_score_heads_trains_and_compares_variants(tmp_path):
    out = run_script("benchmarks/score_heads.py", "--iters", "2", "--train", "4", "--heldout", "2",
                     "--out", str(tmp_path), "--probe", "2", "--tau-scales", "0.5", "--oracle-radii", "2",
                     "--oracle-at", "1+2", "--losses", "a=",
                     "b=upsampling.score_weight=1")
    rows = [line.split() for line in out.splitlines() if line.startswith(("a ", "b "))]
    # name, "tau x0.5", "oracle r2" or "oracle r2 @1+2", mIoU, x full, split, edge recall
    sweep = [r for r in rows if r[1] in ("tau", "oracle")]
    keys = [(r[0], " ".join(r[2:4] if r[3].startswith("@") else r[2:3])) for r in sweep]
    assert keys == [("a", "x0.5"), ("a", "r2"), ("a", "r2 @1+2"), ("b", "x0.5"), ("b", "r2"), ("b", "r2 @1+2")]
    sweep = [r[:3] + r[4:] if r[3].startswith("@") else r for r in sweep]
    assert all(0 <= float(r[3]) <= 100 and 0 < float(r[4]) <= 1.05 for r in sweep), sweep
    rows = [r for r in rows if r[1] not in ("tau", "oracle")]
    assert [r[0] for r in rows] == ["a", "a", "b", "b"] and [r[1] for r in rows[1::2]] == ["probed"] * 2
    rows = [r for r in rows if r[1] != "probed"]
    # name, AUC and flat kept per block, 3 mIoU, 2 ratios, split and edge recall per block
    assert all(len(r) == 26 and 0 <= float(r[1]) <= 1 and float(r[14]) <= 1.05 for r in rows), rows
    assert "2 held-out scenes" in out
    # --losses: per variant, rows of run, classes, token side, boundary band, pixels, lost, gained, net
    losses = [line.split() for line in out.splitlines() if line.startswith(("dynamic ", "oracle "))]
    assert {r[0] for r in losses} == {"dynamic", "oracle"} and {r[1] for r in losses} <= {"small", "large"}
    assert all(r[2] in ("4", "8", "16", "32") and int(r[-3]) <= int(r[-4]) >= int(r[-2]) for r in losses)
    pixels = [int(r[-4]) for r in losses if r[0] == "dynamic"]
    assert sum(pixels) == sum(int(r[-4]) for r in losses if r[0] == "oracle") > 0  # every pixel, once per run


@pytest.mark.timeout(320)
def test_packed_matches_one_by_one_and_counts_shapes():
    out = run_script("benchmarks/packed.py", "--model", "dups_demo", "--size", "192", "--batch", "3",
                     "--repeats", "1")
    line = next(line for line in out.splitlines() if line.startswith("packed / one by one"))
    assert float(line.split("max |probability difference| ")[1]) < 1e-5
    out = run_script("benchmarks/packed.py", "--model", "dups_demo", "--size", "192", "--shapes", "3")
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["0", "0.05", "0.1", "0.25"]
    assert int(rows[0][1]) >= int(rows[-1][1]) >= 1 and rows[0][2] == "0.0%"


@pytest.mark.timeout(320)
def test_peer_benchmark_runs_the_fused_kernel_beside_the_reference():
    # on a CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1)
    out = run_script("benchmarks/peer.py", "--image-size", "64", "--repeats", "1", "--models", "fixed", "fused")
    gap = next(line for line in out.splitlines() if line.startswith("fused kernel against the reference"))
    assert float(gap.rsplit(" ", 1)[1]) < 1e-4
    rows = {line[:24].strip(): line[24:].split() for line in out.splitlines() if line.startswith("DUPS")}
    assert list(rows) == ["DUPS-Tiny fixed beta", "DUPS-Tiny fixed, fused"]
    assert rows["DUPS-Tiny fixed beta"][:2] == rows["DUPS-Tiny fixed, fused"][:2]  # parameters, GFLOPs


@pytest.mark.timeout(320)
def test_memory_counts_what_each_backend_saves_for_backward():
    out = run_script("benchmarks/memory.py", "--device", "cpu", "--size", "128", "--batches", "1",
                     "--saved-by", "torch", "fused")
    rows = {line.split(":")[0].strip(): line.split(":")[1] for line in out.splitlines() if ": torch " in line}
    assert list(rows) == ["full", "fixed beta"]
    for name, text in rows.items():
        torch_gib, fused_gib = (float(part.split()[1]) for part in text.split(", "))
        assert 0 < fused_gib < torch_gib, name  # no gathered key/value copies kept for the backward
