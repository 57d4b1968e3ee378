"""Triton kernels of nn_blocksparse: each file holds jit kernels and their launcher.

They take raw tensors and know nothing of `nn.Module`, BERT or the rest of the library.
"""

from .block_sparse_linear import ACTIVATIONS, block_sparse_linear
from .configs import KernelConfig, select_config

__all__ = ["ACTIVATIONS", "KernelConfig", "block_sparse_linear", "select_config"]
