"""The fused Triton kernel of clustered attention against the reference, forward and
gradients; on a CPU through Triton's interpreter (small shapes), on a GPU natively."""
import pytest
import torch

pytest.importorskip("triton")  # on a CPU in its interpreter: TRITON_INTERPRET=1 (conftest.py)

from model.attention import NeighbourhoodAttention, cluster_neighbourhood  # noqa: E402

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


def test_fused_backend_refuses_grid_neighbourhoods():
    from model.attention import grid_neighbourhood

    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    centres = (torch.stack([xs, ys], -1).reshape(1, 16, 2).float() * 32 + 16)
    attn = NeighbourhoodAttention(dim=32, heads=1)
    attn.backend = "fused"
    with pytest.raises(ValueError, match="fused backend takes clustered tokens"):
        attn(torch.randn(1, 16, 32), grid_neighbourhood(centres, 4, 4, 32.0, kernel=3))
