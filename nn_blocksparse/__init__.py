"""nn_blocksparse: Triton block-sparse kernels for pruned transformers.

Core (no transformers needed): `BlockSparseMatrix`, `block_sparse_linear`, `BlockSparseLinear`, and
`DenseLinear` (the dense layers hybrid keeps, oneDNN on CPU), `set_prepack` (keep the CPU kernels'
weight layouts, for serving).
BERT layer (imports transformers on first use): `patch_bert`, `load_pruned_bert`,
`save_patched_bert`, `load_patched_bert`, `prune_like_nn_pruning`.
Question answering on any BERT QA model, patched or not: `nn_blocksparse.qa.QuestionAnswerer`.
The `nn-blocksparse` command (patch, qa, inspect, demo, bench): `nn_blocksparse.cli`.
"""

from .block_sparse_matrix import BlockSparseMatrix
from .functional import block_sparse_linear
from .dense_linear import DenseLinear
from .linear import BlockSparseLinear
from .prepack import set_prepack

__version__ = "0.1.0"

_BERT_EXPORTS = ("patch_bert", "save_patched_bert", "load_patched_bert", "heads_per_layer", "load_pruned_bert",
                 "save_pruned_bert", "prune_like_nn_pruning")

__all__ = ["BlockSparseMatrix", "BlockSparseLinear", "DenseLinear", "block_sparse_linear", "set_prepack",
           *_BERT_EXPORTS]


def __getattr__(name):
    # transformers takes seconds to import: only the BERT helpers pay for it.
    if name in _BERT_EXPORTS:
        from . import bert

        return getattr(bert, name)
    raise AttributeError(f"module 'nn_blocksparse' has no attribute {name!r}")
