"""Serving from several Python threads: one `BlockSparseLinear`, one patched real MiniLM, on CPU.

Threads share the module from its very first call (lazily built plans and caches, scratch
buffers, per-shape state), each walking the same inputs in its own order so that different
shapes run at the same time; every output must be bit-identical to a single-threaded run of a
fresh copy. Written against the public API, so it checks whatever CPU path is in the tree.
"""

import copy
import threading

import pytest
import torch
from nn_blocksparse.layouts import random_block_sparse_weight
from nn_blocksparse import BlockSparseLinear

THREADS = 4


def serve_concurrently(forward, inputs: list) -> list[list[torch.Tensor]]:
    """Per thread, the outputs of `forward` on every input (in input order), all threads started at once."""
    barrier = threading.Barrier(THREADS)
    outputs: list = [None] * THREADS
    errors: list = []

    def worker(index: int) -> None:
        try:
            order = list(range(index, len(inputs))) + list(range(index))  # a different shape mix per thread
            barrier.wait()
            results = {}
            with torch.inference_mode():
                for _ in range(2):
                    for i in order:
                        results[i] = forward(inputs[i])
            outputs[index] = [results[i] for i in range(len(inputs))]
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a serving thread hung"
    if errors:
        raise errors[0]
    return outputs


def serially(forward, inputs: list) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [forward(x) for x in inputs]


def assert_bit_identical(threaded: list[list[torch.Tensor]], reference: list[torch.Tensor]) -> None:
    for thread, outputs in enumerate(threaded):
        for i, (output, expected) in enumerate(zip(outputs, reference)):
            assert torch.equal(output, expected), f"thread {thread}, input {i}: max diff " \
                                                  f"{(output.double() - expected.double()).abs().max().item()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_sharing_one_layer_match_a_single_threaded_run(dtype):
    weight = random_block_sparse_weight(384, 256, 32, 0.4, seed=11, dtype=dtype)
    bias = torch.randn(384).to(dtype)
    layer = BlockSparseLinear.from_dense(weight, bias, activation="gelu")
    fresh_copy = copy.deepcopy(layer)  # taken before any call: both start cold
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*shape, 256, generator=generator).to(dtype)
              for shape in ((1,), (3,), (17,), (64,), (2, 65), (130,), (4, 33))]
    reference = serially(fresh_copy, inputs)
    assert_bit_identical(serve_concurrently(layer, inputs), reference)


def test_threads_sharing_one_patched_minilm_match_a_single_threaded_run(pruned_minilm):
    from nn_blocksparse import patch_bert

    model = patch_bert(copy.deepcopy(pruned_minilm[0]), mode="hybrid")
    fresh_copy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for batch, seq in ((1, 9), (2, 16), (3, 7), (1, 40)):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq // 2:] = 0  # padding in every batch
        batches.append({"input_ids": ids, "attention_mask": mask})

    def forward(model):
        return lambda batch: model(**batch).last_hidden_state

    reference = serially(forward(fresh_copy), batches)
    assert_bit_identical(serve_concurrently(forward(model), batches), reference)
