"""skip_absent_attention_mask: a captured forward without a mask keeps SDPA's mask-free path.

CUDA-graph capture cannot run on a CPU, so the capture is simulated where transformers looks for
it (`torch.cuda.is_current_stream_capturing`); the GPU numbers are in graph_check's results.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import masking_utils  # noqa: E402

from nn_blocksparse.bert import patch_bert, skip_absent_attention_mask  # noqa: E402


@pytest.fixture
def capturing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def bidirectional_mask(model, embeds, attention_mask=None):
    return masking_utils.create_bidirectional_mask(config=model.config, inputs_embeds=embeds,
                                                   attention_mask=attention_mask)


def test_the_context_skips_an_absent_mask_while_capturing_and_keeps_a_real_one(pruned_minilm, capturing):
    model, _ = pruned_minilm
    embeds = torch.zeros(2, 7, model.config.hidden_size)
    original = masking_utils._ignore_bidirectional_mask_sdpa
    # (transformers 5.17, the GPU machine's, builds a mask here without the context; 5.24 does not)
    with skip_absent_attention_mask():
        assert bidirectional_mask(model, embeds) is None
        padded = torch.ones(2, 7, dtype=torch.long)
        padded[1, 5:] = 0
        mask = bidirectional_mask(model, embeds, padded)
        assert mask is not None and not mask[1, 0, 0, 5:].any() and mask[1, 0, 0, :5].all()
    assert masking_utils._ignore_bidirectional_mask_sdpa is original  # restored on exit


@pytest.mark.parametrize("mode", [None, "hybrid"])
def test_forward_inside_the_context_equals_the_reference(pruned_minilm, capturing, mode):
    """Unpatched and patched: skipping the all-attending mask changes no output."""
    import copy

    pruned, _ = pruned_minilm
    model = pruned if mode is None else patch_bert(copy.deepcopy(pruned), mode, dense_threshold=0.8)
    ids = torch.randint(1000, 2000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = pruned(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        with skip_absent_attention_mask():
            skipped = model(input_ids=ids).last_hidden_state
    assert (skipped - reference).abs().max().item() < 1e-4


def test_context_restores_transformers_after_an_error():
    original = masking_utils._ignore_bidirectional_mask_sdpa
    with pytest.raises(KeyError):
        with skip_absent_attention_mask():
            raise KeyError("inside")
    assert masking_utils._ignore_bidirectional_mask_sdpa is original


# ---------------------------------------------------------------------------------- CudaGraphForward
def test_graph_forward_refuses_a_cpu_model_and_checks_its_inputs(pruned_minilm):
    from nn_blocksparse.bert import CudaGraphForward
    from nn_blocksparse.bert.graph_capture import check_token_ids

    model, _ = pruned_minilm
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphForward(model, 1, 16)
    for batch, seq in ((True, 16), (0, 16), (1, 2.0)):
        with pytest.raises(ValueError, match="positive ints"):
            CudaGraphForward(model, batch, seq)
    check_token_ids(torch.zeros(2, 16, dtype=torch.long), 2, 16)  # the captured shape: accepted
    with pytest.raises(ValueError, match=r"shape \(2, 16\)"):
        check_token_ids(torch.zeros(2, 17, dtype=torch.long), 2, 16)
    with pytest.raises(TypeError, match="token_type_ids must be int64 or int32"):
        check_token_ids(torch.zeros(2, 16), 2, 16, "token_type_ids")
    with pytest.raises(TypeError, match="must be a tensor"):
        check_token_ids([[1, 2]], 1, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU (CPU twin: the "
                    "simulated-capture tests above, and the input checks)")
@pytest.mark.parametrize("mode", [None, "hybrid"])
def test_graph_forward_replays_new_inputs_like_the_eager_model(mode):
    """A random BERT-base pruned like nn_pruning (the GPU machine has no MiniLM weights), fp16; hybrid
    with every matrix on the block grid block-sparse, so the Triton kernels are captured too."""
    from nn_blocksparse.bert import CudaGraphForward, prune_like_nn_pruning, random_bert_base

    model = random_bert_base(seed=0)
    prune_like_nn_pruning(model, seed=0)
    model = model.to("cuda", torch.float16).eval()
    if mode is not None:
        patch_bert(model, mode, dense_threshold=1.0)
    served = CudaGraphForward(model, 2, 64)
    generator = torch.Generator().manual_seed(0)
    for with_types in (False, True):  # each call sees its own input
        ids = torch.randint(1000, 20000, (2, 64), generator=generator)
        types = (torch.arange(64) >= 20).long().expand(2, 64) if with_types else None
        with torch.inference_mode():
            expected = model(input_ids=ids.cuda(), attention_mask=torch.ones_like(ids).cuda(),
                             token_type_ids=None if types is None else types.cuda()).last_hidden_state
        got = served(ids, types).last_hidden_state
        assert (got.float() - expected.float()).abs().max().item() < 3e-2
    with pytest.raises(ValueError, match="shape"):
        served(torch.zeros(1, 64, dtype=torch.long))
