"""torch.compile readiness: with a static ratio policy the whole segmentor is one graph (no
host syncs, no Python on tensor values), which is what lets CUDA graphs ("reduce-overhead")
remove the launch cost that dominates batch-1 latency on a GPU (BENCHMARKS.md)."""
import pytest
import torch

from dups.models import RatioPolicy
from dups.models.segmentor import build_segmentor


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_segmentor("dups_demo", num_classes=5).eval()


@pytest.mark.parametrize("kind", ["fixed", "full"])
def test_static_policies_trace_as_one_graph(model, kind):
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.randn(1, 3, 96, 128),
                                                 RatioPolicy.from_preset(kind, "ade20k"))
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons
    # The Hilbert table enters as one opaque op, not as its 16-step loop (which inductor
    # fuses into an expression of exponential size: compiles that never finish).
    targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
    assert "dups.hilbert_table.default" in targets
    assert not any("xor" in t for t in targets)
    # Every tensor made inside the graph is made on the input's device: a CPU constructor
    # feeding GPU work is fine eagerly but breaks inductor on a GPU ("two different devices").
    factories = {"arange", "tensor", "zeros", "ones", "full", "empty", "linspace", "logspace"}
    deviceless = [_source_line(n) for g in explained.graphs for n in g.graph.nodes
                  if n.op == "call_function" and getattr(n.target, "__name__", "") in factories
                  and n.kwargs.get("device") is None]
    assert not deviceless, deviceless


def test_kernel_probes_are_constants_to_the_compiler(model, monkeypatch):
    """The xformers / libnatten probes import and run kernels; traced, they broke the graph
    at every attention call on a GPU. Here each probe breaks the graph if it is traced."""
    import dups.models.attention as attention

    def untraceable() -> bool:
        torch._dynamo.graph_break()
        return False
    monkeypatch.setattr(attention, "_xformers_runs", untraceable)
    monkeypatch.setattr(attention, "_libnatten_present", untraceable)
    def backend_choice(x):  # what resolve_backend asks, twice, as an attention layer per block
        for _ in range(2):
            x = x + attention.natten_fast_available() + attention.xformers_available()
        return x
    torch._dynamo.reset()
    explained = torch._dynamo.explain(backend_choice)(torch.zeros(3))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def _source_line(node) -> str:
    """The model's source line that made an FX node (its stack trace without caret lines)."""
    return [line.strip() for line in (node.stack_trace or "").splitlines()
            if set(line.strip()) - set("^~ ")][-1]


def test_compiled_forward_equals_eager(model):
    torch._dynamo.reset()
    images = torch.randn(2, 3, 96, 128)
    policy = RatioPolicy.from_preset("fixed", "ade20k")
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        want, got = model(images, policy).final, compiled(images, policy).final
    torch.testing.assert_close(got.masks, want.masks, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "nested_graph_breaks"), reason="torch without nested graph breaks")
def test_eq1_compiles_into_a_graph_per_budget_read(model):
    """Eq. 1 reads each upsampling block's padded budget on the host once (the shapes depend
    on it): with nested graph breaks the forward is four graphs, cut only at those three reads
    (a loop around them, or a host read for the token counts, would run whole frames eagerly:
    21 graphs), and the compiled packed batch gives the eager answer."""
    images = torch.randn(2, 3, 256, 256)
    policy = RatioPolicy.from_preset("per_image", "ade20k", bucket=0.1)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(nested_graph_breaks=True):
        explained = torch._dynamo.explain(model)(images, policy)
        sites = {(r.user_stack[-1].filename.rsplit("/", 1)[-1], r.user_stack[-1].name) for r in explained.break_reasons}
        assert (explained.graph_count, explained.graph_break_count) == (4, 3), sites
        assert sites == {("ratios.py", "padded_budget")}
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", dynamic=False)
        got, want = compiled(images, policy), model(images, policy)
    assert got.tokens_per_stage == want.tokens_per_stage
    torch.testing.assert_close(got.final.masks, want.final.masks, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.final.logits, want.final.logits, rtol=1e-4, atol=1e-4)
