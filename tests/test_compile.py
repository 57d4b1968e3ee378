"""torch.compile and torch.export of BlockSparseLinear, the fused attention and a patched real MiniLM.

`fullgraph=True` turns any graph break into an error, and `error_on_recompile` any recompilation, so
each test that compiles once with `dynamic=True` and then runs a second batch x sequence size proves
zero graph breaks and one compile for several sizes. The cheap backends prove it ("eager": Dynamo's
graph only; "aot_eager": AOTAutograd and the ops' fake implementations too); Inductor runs where its
code matters: once per op, and once on a patched model. Outputs are held to an independent reference
(a float64 dense product, the unpatched model) or, for the compiled model, to the same model eagerly.
"""

import copy
import io

import pytest
import torch

from helpers import assert_close_to_reference, dense_reference, requires_cuda
from nn_blocksparse.layouts import random_block_sparse_weight
from nn_blocksparse import BlockSparseLinear
from nn_blocksparse.attention import FusedSelfAttention

transformers = pytest.importorskip("transformers")

from nn_blocksparse.bert import patch_bert  # noqa: E402

# fp32 hidden states of O(1): compiled graphs reorder and fuse sums (Inductor), nothing more.
MAX_COMPILED_DIFF = 1e-4
SIZES = ((2, 9), (3, 17))  # (batch, seq): one compile with dynamic shapes serves both


@pytest.fixture
def compile_once():
    """Dynamo starts clean, and any recompilation fails the test; yields the stats counters."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield counters
    torch._dynamo.reset()


def assert_one_graph(counters):
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def make_layer(dtype=torch.float32, backend="auto", device="cpu", seed=0):
    weight = random_block_sparse_weight(96, 128, 32, 0.5, seed, dtype).to(device)
    bias = torch.randn(96, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)
    return BlockSparseLinear.from_dense(weight, bias, activation="gelu", backend=backend), weight, bias


# ---------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_layer_compiles_once_for_every_size(compile_once, compiler):
    layer, weight, bias = make_layer()
    compiled = torch.compile(layer, fullgraph=True, backend=compiler, dynamic=True)
    with torch.inference_mode():
        for batch, seq in SIZES:
            x = torch.randn(batch, seq, 128)
            assert_close_to_reference(compiled(x), dense_reference(x, weight, bias, "gelu"), torch.float32)
    assert_one_graph(compile_once)


def test_layer_on_the_triton_backend_compiles_once_for_every_size(compile_once, kernel_device):
    """Interpreter on CPU (the op is opaque), Inductor and the triton_op on a GPU. M 18 and 51 fall in
    different buckets of the layer's launch table: one graph still serves both."""
    layer, weight, bias = make_layer(torch.float16, "triton", kernel_device)
    compiler = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    compiled = torch.compile(layer, fullgraph=True, backend=compiler, dynamic=True)
    with torch.inference_mode():
        for batch, seq in SIZES:
            x = torch.randn(batch, seq, 128).half().to(kernel_device)
            assert_close_to_reference(compiled(x), dense_reference(x, weight, bias, "gelu"), torch.float16)
    assert_one_graph(compile_once)


def test_fused_attention_compiles_once_for_every_size(compile_once):
    heads, head_dim, hidden = 4, 32, 128
    qkv = BlockSparseLinear.from_dense(random_block_sparse_weight(3 * heads * head_dim, hidden, 32, 0.6, seed=3),
                                       torch.randn(3 * heads * head_dim))
    attention = FusedSelfAttention(qkv, heads, head_dim).eval()
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch.inference_mode():
        for batch, seq in SIZES:
            x = torch.randn(batch, seq, hidden)
            mask = torch.ones(batch, 1, 1, seq, dtype=torch.bool)
            mask[0, ..., seq - 2:] = False  # padding
            # Reference: attention over the float64 dense projection.
            q, k, v = dense_reference(x, qkv.weight, qkv.bias).view(batch, seq, 3, heads, head_dim).permute(
                2, 0, 3, 1, 4)
            expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            expected = expected.transpose(1, 2).reshape(batch, seq, heads * head_dim)
            assert_close_to_reference(compiled(x, mask), expected, torch.float32)
    assert_one_graph(compile_once)


@pytest.mark.parametrize("compiled", [False, True])
def test_gradients_flow_through_the_dense_fallback(compile_once, compiled):
    layer, weight, bias = make_layer()
    forward = torch.compile(layer, fullgraph=True, backend="aot_eager") if compiled else layer
    x = torch.randn(5, 128, requires_grad=True)
    if compiled:
        y = forward(x)  # (Dynamo cannot trace the eager warning: the compiled fallback is silent)
    else:
        with pytest.warns(UserWarning, match="falls back to a dense"):
            y = forward(x)
    y.square().sum().backward()
    x_ref = x.detach().double().requires_grad_(True)
    torch.nn.functional.gelu(x_ref @ weight.double().T + bias.double()).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-5)
    assert layer.values.grad is None  # the blocks stay frozen


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_exported_layer_round_trips_and_serves_other_sizes(kernel_device, backend):
    """The CPU op, and the Triton op (interpreter on CPU; on a GPU the triton_op, which export keeps whole)."""
    from torch.export import Dim, export

    device = kernel_device if backend == "triton" else torch.device("cpu")
    dtype = torch.float16 if backend == "triton" else torch.float32
    layer, weight, bias = make_layer(dtype, backend, device)
    batch, seq = Dim("batch", max=64), Dim("seq", max=512)
    with torch.no_grad():
        program = export(layer, (torch.randn(2, 9, 128).to(device, dtype),), dynamic_shapes=({0: batch, 1: seq},))
    op = "nn_blocksparse.linear_triton.default" if backend == "triton" else "nn_blocksparse.linear_cpu.default"
    assert [str(n.target) for n in program.graph.nodes if "nn_blocksparse" in str(n.target)] == [op]
    saved = io.BytesIO()
    torch.export.save(program, saved)
    saved.seek(0)
    loaded = torch.export.load(saved)
    x = torch.randn(3, 17, 128).to(device, dtype)
    with torch.inference_mode():
        assert_close_to_reference(loaded.module()(x), dense_reference(x, weight, bias, "gelu"), dtype)


# ---------------------------------------------------------------------------------- a patched MiniLM
def padded_inputs(batch, seq, seed=0):
    ids = torch.randint(1000, 2000, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, seq - 3:] = 0  # padding: the mask is real, not all ones
    return {"input_ids": ids, "attention_mask": mask}


def hidden_states(model, inputs):
    with torch.inference_mode():
        return model(**inputs).last_hidden_state


@pytest.fixture(scope="module")
def patched_models(pruned_minilm):
    model, _ = pruned_minilm
    return {mode: patch_bert(copy.deepcopy(model), mode=mode).eval() for mode in ("resize", "blocksparse", "hybrid")}


@pytest.mark.parametrize("mode", ["resize", "blocksparse", "hybrid"])
def test_patched_minilm_compiles_once_for_every_size(compile_once, patched_models, mode):
    patched = patched_models[mode]
    compiled = torch.compile(patched, fullgraph=True, backend="eager", dynamic=True)
    for batch, seq in SIZES:
        inputs = padded_inputs(batch, seq, seed=seq)
        difference = (hidden_states(compiled, inputs) - hidden_states(patched, inputs)).abs().max().item()
        assert difference <= MAX_COMPILED_DIFF
    assert_one_graph(compile_once)


def test_patched_minilm_under_inductor_matches_the_unpatched_model(compile_once, pruned_minilm, patched_models):
    """Inductor's code for the whole hybrid model, at one size: static shapes compile fastest, and one
    compile for two sizes is what the tests above prove."""
    reference_model, _ = pruned_minilm
    compiled = torch.compile(patched_models["hybrid"], fullgraph=True, dynamic=False)
    inputs = padded_inputs(*SIZES[-1])
    valid = inputs["attention_mask"].bool()
    difference = (hidden_states(compiled, inputs) - hidden_states(reference_model, inputs))[valid].abs().max()
    assert difference.item() <= MAX_COMPILED_DIFF
    assert_one_graph(compile_once)


def test_exported_patched_minilm_serves_other_sizes(patched_models):
    from torch.export import Dim, export

    patched = patched_models["hybrid"]
    batch, seq = Dim("batch", max=64), Dim("seq", min=2, max=512)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    # Under no_grad, as it serves: with gradients on, the export would record the dense fallback.
    with torch.no_grad():
        program = export(patched, (), padded_inputs(2, 9), dynamic_shapes=shapes)
    ops = [n for n in program.graph.nodes if str(n.target) == "nn_blocksparse.linear_cpu.default"]
    assert len(ops) == sum(isinstance(m, BlockSparseLinear) for m in patched.modules()) > 0
    inputs = padded_inputs(3, 17, seed=1)
    difference = (hidden_states(program.module(), inputs) - hidden_states(patched, inputs)).abs().max().item()
    assert difference <= MAX_COMPILED_DIFF


# ---------------------------------------------------------------------------------- GPU twins
@requires_cuda
@pytest.mark.parametrize("mode", ["resize", "blocksparse", "hybrid"])
def test_patched_bert_serves_with_cuda_graphs_and_a_padding_mask(compile_once, mode):
    """mode="reduce-overhead": Inductor's CUDA graphs, the triton_op inside them, a real padding mask.
    A random-weight two-layer BERT-base (the GPU machine has no MiniLM package); hybrid makes every
    matrix it can block-sparse."""
    from nn_blocksparse.bert.pruning import prune_like_nn_pruning

    torch.manual_seed(0)
    reference_model = transformers.BertModel(transformers.BertConfig(num_hidden_layers=2)).eval()
    prune_like_nn_pruning(reference_model, seed=0)
    options = {"dense_threshold": 1.0} if mode == "hybrid" else {}
    patched = patch_bert(copy.deepcopy(reference_model), mode=mode, **options).half().cuda().eval()
    assert any(isinstance(m, BlockSparseLinear) for m in patched.modules()) == (mode != "resize")
    compiled = torch.compile(patched, mode="reduce-overhead", fullgraph=True)
    inputs = {k: v.cuda() for k, v in padded_inputs(2, 64).items()}
    valid = inputs["attention_mask"].bool()
    with torch.inference_mode():
        for _ in range(3):  # warm-up, recording, replay
            output = compiled(**inputs).last_hidden_state.float().clone()
        expected = reference_model.cuda()(**inputs).last_hidden_state
    assert (output - expected)[valid].abs().max().item() <= 0.02  # fp16 against fp32
