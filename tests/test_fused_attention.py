"""The fused Triton kernel of clustered attention against the reference, forward and
gradients; on a CPU through Triton's interpreter (small shapes), on a GPU natively."""
import pytest
import torch

pytest.importorskip("triton")  # on a CPU in its interpreter: TRITON_INTERPRET=1 (conftest.py)

from dups.models.attention import NeighbourhoodAttention, cluster_neighbourhood  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n, keys", [(45, 12), (203, 48)])  # short last clusters; the model's 48 keys
def test_fused_kernel_equals_the_reference_forward_and_backward(n, keys):
    torch.manual_seed(0)
    attn = NeighbourhoodAttention(dim=64, heads=2).to(DEVICE)
    with torch.no_grad():
        attn.position_bias.normal_(0, 1.0)  # a bias large enough to matter
    centres = torch.rand(2, n, 2, device=DEVICE) * 300
    nbhd = cluster_neighbourhood(centres, unit=8.0, cluster_size=8, nbhd_size=keys)
    x = torch.randn(2, n, 64, device=DEVICE, requires_grad=True)
    weights = torch.randn(2, n, 64, device=DEVICE)
    results = {}
    for backend in ("torch", "fused"):
        attn.backend = backend
        attn.zero_grad()
        x.grad = None
        out = attn(x, nbhd)
        (out * weights).sum().backward()
        results[backend] = (out.detach(), x.grad.clone(), attn.qkv.weight.grad.clone(),
                            attn.position_bias.grad.clone())
    for got, want in zip(results["fused"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)


def test_a_fused_preference_runs_where_the_kernel_applies(monkeypatch):
    """A named backend is a model-wide preference: grids and a global stage's one group of every
    token (over the kernel's tile) take what ``auto`` would, clusters take the kernel."""
    from dups.models.attention import FUSED_MAX_QUERIES, global_neighbourhood, grid_neighbourhood, resolve_backend

    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    centres = (torch.stack([xs, ys], -1).reshape(1, 64, 2).float() * 32 + 16).to(DEVICE)
    assert 64 > FUSED_MAX_QUERIES
    assert resolve_backend("fused", grid_neighbourhood(centres, 8, 8, 32.0, kernel=3)) == "torch"
    assert resolve_backend("fused", global_neighbourhood(centres, 32.0)) == "torch"
    assert resolve_backend("fused", global_neighbourhood(centres[:, :16], 32.0)) == "fused"
    assert resolve_backend("fused", cluster_neighbourhood(centres, 32.0, 8, 48)) == "fused"
    with pytest.raises(ValueError, match="unknown attention backend 'flash9000'"):
        resolve_backend("flash9000", global_neighbourhood(centres, 32.0))
    if DEVICE == "cpu":  # outside Triton's interpreter a CPU cannot run the kernel
        monkeypatch.delenv("TRITON_INTERPRET")
        assert resolve_backend("fused", cluster_neighbourhood(centres, 32.0, 8, 48)) == "torch"


@torch.no_grad()
def test_the_whole_segmentor_runs_with_the_fused_preference(monkeypatch):
    """``model.encoder.attention_backend=fused`` reaches the pixel decoder too; stage 1's global
    attention (36 tokens at 192 x 192, over the kernel's tile) stays on SDPA; the answer equals
    the reference backend's."""
    import dups.models.attention as attention
    from dups.models import RatioPolicy
    from dups.models.segmentor import build_segmentor

    ran = []
    for name, fn in list(attention._ATTEND.items()):
        monkeypatch.setitem(attention._ATTEND, name, lambda *a, _fn=fn, _name=name: ran.append(_name) or _fn(*a))
    torch.manual_seed(0)
    fused = build_segmentor("dups_demo", 5, encoder={"attention_backend": "fused"}).eval().to(DEVICE)
    reference = build_segmentor("dups_demo", 5, encoder={"attention_backend": "torch"}).eval().to(DEVICE)
    reference.load_state_dict(fused.state_dict())
    images = torch.randn(1, 3, 192, 192, device=DEVICE)
    policy = RatioPolicy.from_preset("fixed", "ade20k")
    got = fused(images, policy).final
    calls, ran[:] = list(ran), []
    want = reference(images, policy).final
    encoder_calls = sum(len(s) for s in fused.encoder.left) + sum(len(s) for s in fused.encoder.right)
    assert calls.count("torch") == 2  # stage 1's block on both sides of the U
    assert calls.count("fused") == len(calls) - 2 > encoder_calls - 2  # the pixel decoder's layers too
    assert set(ran) == {"torch"}
    torch.testing.assert_close(got.masks, want.masks, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)


def test_the_fused_kernel_is_one_opaque_op_to_the_compiler():
    """torch.compile (and so CUDA graphs) sees each kernel as one custom op with a known output
    shape: a fixed-beta forward with the fused preference is still one graph, backward included."""
    from dups.models import RatioPolicy
    from dups.models.segmentor import build_segmentor

    torch.manual_seed(0)
    model = build_segmentor("dups_demo", 5, encoder={"attention_backend": "fused"}).to(DEVICE)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randn(1, 3, 128, 128, device=DEVICE),
                                              RatioPolicy.from_preset("fixed", "ade20k"))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
    assert targets.count("dups.cluster_attention.default") >= 6
