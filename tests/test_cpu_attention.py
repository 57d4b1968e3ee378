"""The native CPU attention (`cpu.attention.self_attention_cpu`) on every ISA this CPU runs, against softmax
in float64, and where `FusedSelfAttention` takes it (otherwise SDPA)."""

import pytest
import torch

import nn_blocksparse.attention as attention_module
from nn_blocksparse.attention import FusedSelfAttention
from nn_blocksparse.dense_linear import DenseLinear
from nn_blocksparse.cpu.attention import runs_native_attention, self_attention_cpu
from nn_blocksparse.cpu.build import library_for, native_isa
from nn_blocksparse.cpu.isa import runnable_isas

ISAS = runnable_isas()
needs_native = pytest.mark.skipif(not ISAS, reason="no native variant runs here (the ARM harness checks NEON)")
TILES = "amx_bf16" in ISAS
needs_tiles = pytest.mark.skipif(not TILES, reason="bf16 attention runs on AMX tiles only (its build compiles "
                                                   "everywhere: test_cpu_build)")


def reference(qkv, heads, head_dim, mask):
    batch, seq, _ = qkv.shape
    query, key, value = qkv.double().view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    scores = query @ key.transpose(-1, -2) / head_dim ** 0.5
    if mask is not None:
        scores = scores + mask.double()
    return (torch.softmax(scores, -1) @ value).transpose(1, 2).reshape(batch, seq, heads * head_dim)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch, seq, heads, head_dim", [(1, 128, 7, 64), (8, 37, 4, 32), (2, 13, 3, 36),
                                                          (1, 1, 1, 4), (3, 100, 2, 64), (2, 11, 3, 24)])
def test_native_attention_matches_float64(isa, batch, seq, heads, head_dim):
    generator = torch.Generator().manual_seed(seq)
    qkv = 2 * torch.randn(batch, seq, 3 * heads * head_dim, generator=generator)
    padding = torch.zeros(batch, 1, 1, seq)
    padding[0, ..., (seq + 1) // 2:] = torch.finfo(torch.float32).min  # batch 0 padded, as transformers masks
    for mask in (None, padding):
        out = self_attention_cpu(qkv, heads, head_dim, mask, library=library_for(isa))
        assert out.shape == (batch, seq, heads * head_dim)
        assert (out.double() - reference(qkv, heads, head_dim, mask)).abs().max().item() < 5e-5


@needs_native
def test_native_attention_is_bit_identical_for_any_thread_count():
    qkv = torch.randn(2, 50, 3 * 3 * 32, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outputs.append(self_attention_cpu(qkv, 3, 32))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_what_takes_the_native_attention_and_what_stays_on_sdpa():
    qkv = torch.randn(2, 9, 3 * 2 * 8)
    native = bool(ISAS)
    with torch.inference_mode():
        assert runs_native_attention(qkv, 8, None, 0.0) == native
        assert runs_native_attention(qkv, 8, torch.zeros(2, 1, 1, 9), 0.0) == native  # padding over the keys
        assert runs_native_attention(qkv, 8, torch.zeros(1, 1, 1, 9), 0.0) == native  # broadcast over the batch
        for mask in (torch.zeros(2, 1, 9, 9), torch.ones(2, 1, 1, 9, dtype=torch.bool), torch.zeros(2, 2, 1, 9)):
            assert not runs_native_attention(qkv, 8, mask, 0.0)  # per query, boolean, per head: SDPA
        assert not runs_native_attention(qkv, 8, None, 0.1)  # dropout
        assert not runs_native_attention(qkv.bfloat16(), 8, None, 0.0)
        assert not runs_native_attention(qkv.transpose(0, 1).contiguous().transpose(0, 1), 8, None, 0.0)
        assert not runs_native_attention(torch.randn(2, 9, 3 * 2 * 6), 6, None, 0.0)  # head size not a multiple of 4
    assert not runs_native_attention(qkv.requires_grad_(), 8, None, 0.0)  # gradients wanted
    with pytest.raises(ValueError, match="3 x 2 heads x 4 expected"):
        self_attention_cpu(torch.randn(2, 9, 48), 2, 4)
    # What would take the kernel out of bounds is refused before the call, naming it.
    bf16_refusal = "multiple of 32 in torch.bfloat16" if native_isa() == "amx_bf16" else "contiguous fp32"
    for bad, message in ((torch.randn(2, 9, 48).bfloat16(), bf16_refusal),
                         (torch.randn(9, 2, 48).transpose(0, 1), "contiguous fp32"), (torch.randn(9, 48), "contiguous fp32")):
        with pytest.raises(ValueError, match=message):
            self_attention_cpu(bad, 2, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        self_attention_cpu(torch.randn(2, 9, 36), 2, 6)
    with pytest.raises(ValueError, match="additive mask over the keys"):
        self_attention_cpu(torch.randn(2, 9, 48), 2, 8, torch.zeros(2, 1, 9, 9))


def test_fused_attention_gives_the_same_context_either_way():
    torch.manual_seed(0)
    attention = FusedSelfAttention(torch.nn.Linear(64, 3 * 4 * 16), num_heads=4, head_dim=16).eval()
    hidden = torch.randn(3, 11, 64)
    mask = torch.zeros(3, 1, 1, 11)
    mask[1, ..., 6:] = torch.finfo(torch.float32).min
    with torch.inference_mode():
        for m in (None, mask):
            ours = attention(hidden, m)  # native where it runs
            context, _ = attention(hidden, m, return_probabilities=True)  # always the explicit softmax
            expected = reference(attention.qkv(hidden), 4, 16, m)
            assert (ours.double() - expected).abs().max() < 1e-5 and (context.double() - expected).abs().max() < 1e-5


def sdpa_bf16(qkv, heads, head_dim, mask):
    batch, seq, _ = qkv.shape
    query, key, value = qkv.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    context = torch.nn.functional.scaled_dot_product_attention(query, key, value,
                                                               attn_mask=None if mask is None else mask.bfloat16())
    return context.transpose(1, 2).reshape(batch, seq, heads * head_dim)


@needs_tiles
@pytest.mark.parametrize("batch, seq, heads, head_dim", [(1, 128, 7, 64), (8, 37, 4, 32), (2, 13, 3, 64),
                                                          (1, 1, 1, 32), (3, 100, 2, 96), (1, 200, 2, 64)])
def test_bf16_attention_on_tiles_matches_float64_as_closely_as_sdpa(batch, seq, heads, head_dim):
    # Against float64 on the same bf16 inputs: bf16 outputs are off by their own rounding (and the
    # probabilities' rounding to bf16), as SDPA's bf16 path is: no worse than it, by a stated margin.
    generator = torch.Generator().manual_seed(seq + head_dim)
    qkv = (2 * torch.randn(batch, seq, 3 * heads * head_dim, generator=generator)).bfloat16()
    padding = torch.zeros(batch, 1, 1, seq)
    padding[0, ..., (seq + 1) // 2:] = torch.finfo(torch.float32).min
    library = library_for("amx_bf16")
    for mask in (None, padding, padding.bfloat16()):
        out = self_attention_cpu(qkv, heads, head_dim, mask, library=library)
        assert out.dtype == torch.bfloat16 and out.shape == (batch, seq, heads * head_dim)
        expected = reference(qkv.float(), heads, head_dim, mask)
        error = (out.double() - expected).abs().max().item()
        sdpa_error = (sdpa_bf16(qkv, heads, head_dim, mask).double() - expected).abs().max().item()
        assert error <= 1.25 * sdpa_error + 2e-3 and error < 0.05, (error, sdpa_error)


@needs_tiles
def test_bf16_attention_is_bit_identical_for_any_thread_count():
    qkv = torch.randn(2, 70, 3 * 3 * 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outputs.append(self_attention_cpu(qkv, 3, 32, library=library_for("amx_bf16")))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_where_bf16_attention_runs():
    qkv = torch.randn(2, 9, 3 * 2 * 32).bfloat16()
    with torch.inference_mode():
        # On AMX, D a multiple of 32 with a key mask in fp32 or bf16; elsewhere, SDPA.
        assert runs_native_attention(qkv, 32, None, 0.0) == (TILES and native_isa() == "amx_bf16")
        assert runs_native_attention(qkv, 32, torch.zeros(2, 1, 1, 9).bfloat16(), 0.0) == (
            TILES and native_isa() == "amx_bf16")
        assert not runs_native_attention(torch.randn(2, 9, 3 * 2 * 16).bfloat16(), 16, None, 0.0)
        assert not runs_native_attention(qkv, 32, torch.zeros(2, 1, 1, 9, dtype=torch.float16), 0.0)
    for isa in ISAS:
        if isa != "amx_bf16":  # the kernels without tiles refuse bf16, naming the dtypes they take
            with pytest.raises(ValueError, match="contiguous fp32 CPU tensor"):
                self_attention_cpu(qkv, 2, 32, library=library_for(isa))


def test_fused_attention_in_bf16_takes_the_tiles_where_they_run():
    # A bf16 module with transformers' bf16 padding mask: the AMX kernel where it runs (SDPA
    # elsewhere), as close to float64 as the explicit softmax in bf16.
    torch.manual_seed(0)
    attention = FusedSelfAttention(torch.nn.Linear(64, 3 * 2 * 32), num_heads=2, head_dim=32).eval().bfloat16()
    hidden = torch.randn(3, 40, 64).bfloat16()
    mask = torch.zeros(3, 1, 1, 40, dtype=torch.bfloat16)
    mask[1, ..., 25:] = torch.finfo(torch.bfloat16).min
    calls = []
    original = attention_module.ops.call_attention_cpu
    try:
        attention_module.ops.call_attention_cpu = lambda *args: calls.append(1) or original(*args)
        with torch.inference_mode():
            ours = attention(hidden, mask)
            context, _ = attention(hidden, mask, return_probabilities=True)
            expected = reference(attention.qkv(hidden).float(), 2, 32, mask.float())
    finally:
        attention_module.ops.call_attention_cpu = original
    assert bool(calls) == (native_isa() == "amx_bf16")
    assert ours.dtype == torch.bfloat16
    error, explicit_error = ((out.double() - expected).abs().max().item() for out in (ours, context))
    assert error <= 1.25 * explicit_error + 2e-3 and error < 0.05, (error, explicit_error)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_bf16_products_round_only_the_products_inputs_where_tiles_run(isa):
    # fp32 qkv with bf16_products: on AMX, q, k, v (and the probabilities) rounded to bf16 for the
    # products, fp32 out: against float64 of the rounded q, k, v it is off by the probabilities'
    # rounding alone, well inside bf16 SDPA's error. Elsewhere it is the fp32 kernel, bit for bit.
    generator = torch.Generator().manual_seed(5)
    qkv = 2 * torch.randn(2, 70, 3 * 3 * 64, generator=generator)
    padding = torch.zeros(2, 1, 1, 70)
    padding[0, ..., 40:] = torch.finfo(torch.float32).min
    library = library_for(isa)
    for mask in (None, padding):
        out = self_attention_cpu(qkv, 3, 64, mask, library=library, bf16_products=True)
        assert out.dtype == torch.float32
        if isa != "amx_bf16":
            assert torch.equal(out, self_attention_cpu(qkv, 3, 64, mask, library=library))
            continue
        rounded = qkv.bfloat16()
        expected = reference(rounded.float(), 3, 64, mask)
        error = (out.double() - expected).abs().max().item()
        sdpa_error = (sdpa_bf16(rounded, 3, 64, mask).double() - expected).abs().max().item()
        assert 0 < error < sdpa_error, (error, sdpa_error)


def test_fused_attention_with_bf16_weights_asks_for_bf16_products():
    torch.manual_seed(0)
    attention = FusedSelfAttention(torch.nn.Linear(64, 3 * 2 * 32), num_heads=2, head_dim=32).eval()
    hidden = torch.randn(2, 20, 64)
    seen = []
    original = attention_module.ops.call_attention_cpu
    try:
        attention_module.ops.call_attention_cpu = lambda *args: seen.append(args[-1]) or original(*args)
        with torch.inference_mode():
            attention(hidden)
            # bf16 weights on fp32 activations, as patch_bert(..., weight_dtype=torch.bfloat16) keeps them.
            attention.qkv = DenseLinear.from_tensors(attention.qkv.weight.bfloat16(), attention.qkv.bias.bfloat16())
            attention(hidden)
    finally:
        attention_module.ops.call_attention_cpu = original
    assert seen == ([False, True] if ISAS else [])


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_nan_and_fully_masked_rows_come_out_as_sdpa_gives_them(isa):
    # A NaN in a key reaches every output of its head (SDPA's answer); a row whose every key is
    # masked out with -inf gives zeros (SDPA's answer on the torch these tests run), on every path.
    library = library_for(isa)
    qkv = torch.randn(2, 20, 3 * 2 * 32, generator=torch.Generator().manual_seed(3))
    qkv[0, 3, 2 * 32] = float("nan")  # batch 0, key 3, head 0
    mask = torch.zeros(2, 1, 1, 20)
    mask[1] = float("-inf")
    runs = [(qkv, False)] + ([(qkv.bfloat16(), False), (qkv, True)] if isa == "amx_bf16" else [])
    for inputs, bf16_products in runs:
        out = self_attention_cpu(inputs, 2, 32, mask, library=library, bf16_products=bf16_products).float()
        sdpa = sdpa_bf16(inputs, 2, 32, mask).float() if inputs.dtype == torch.bfloat16 else None
        assert out[0, :, :32].isnan().all() and not out[0, :, 32:].isnan().any()
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        if sdpa is not None:
            assert sdpa[0, :, :32].isnan().all() and torch.equal(sdpa[1], torch.zeros_like(sdpa[1]))


@needs_native
def test_a_negated_view_of_qkv_is_read_as_its_values():
    qkv = torch.randn(2, 9, 3 * 2 * 32, generator=torch.Generator().manual_seed(3))
    negated = torch._neg_view(qkv)
    assert negated.is_neg() and negated.is_contiguous()
    out = self_attention_cpu(negated, 2, 32)
    assert (out.double() - reference(-qkv, 2, 32, None)).abs().max().item() < 5e-5


def test_attend_with_every_head_pruned_gives_an_empty_context():
    fused = FusedSelfAttention(torch.nn.Linear(16, 0), 0, 8).eval()
    with torch.inference_mode():
        for call in (lambda: fused(torch.randn(2, 3, 16)), lambda: fused.attend(torch.randn(2, 3, 0))):
            assert call().shape == (2, 3, 0)
        context, probabilities = fused.attend(torch.randn(2, 3, 0), return_probabilities=True)
        assert context.shape == (2, 3, 0) and probabilities.shape == (2, 0, 3, 3)
