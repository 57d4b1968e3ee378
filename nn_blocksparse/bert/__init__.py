"""BERT on the block-sparse kernels: patching, nn_pruning checkpoints, and a pruned-model generator.

- `patching`: `patch_bert(model, mode)` (check, plan, measure, apply, record) and `heads_per_layer`;
- `thin_layer`: `ThinBertLayer`, the patched layer whose forward calls its parts directly;
- `patched_checkpoint`: `save_patched_bert` / `load_patched_bert`, a patched model as a folder
  (config.json, patch.json, model.safetensors; no pickle), checked before anything is built;
- `pruned_checkpoint`: the nn_pruning / transformers-4 checkpoint format (fewer heads in some
  layers, which transformers 5 cannot load) and its API: `load_pruned_bert` (`pruned_load`: rebuild
  at the per-layer sizes, load strictly) and `save_pruned_bert` (`pruned_save`: write that format,
  cutting what `nn_blocksparse.resize` says can go);
- `checkpoint_files`: a checkpoint folder's files, read without pickle and written back;
- `pruning`: `prune_like_nn_pruning`, a seeded generator of nn_pruning-style pruned models, and
  the bundled MiniLM (as an encoder, or under a span head for question answering);
- `sparsity`: every matrix's block layout (`matrix_layouts`) and one picture of them with the
  heads per layer (`plot_sparsity`);
- `graph_capture`: `skip_absent_attention_mask`, so a forward captured in a CUDA graph keeps
  flash attention (transformers otherwise builds a full mask while capturing), and
  `CudaGraphForward`, a captured forward to serve with.
"""

from .graph_capture import CudaGraphForward, skip_absent_attention_mask
from .patched_checkpoint import load_patched_bert, save_patched_bert
from .patching import MODES, heads_per_layer, patch_bert
from .pruned_checkpoint import load_pruned_bert, save_pruned_bert
from .pruning import (PruningReport, load_bert_for_question_answering, load_minilm,
                      load_minilm_for_question_answering, minilm_path, prune_like_nn_pruning, random_bert_base)

__all__ = [
    "CudaGraphForward", "MODES", "PruningReport", "heads_per_layer", "load_bert_for_question_answering", "load_minilm",
    "load_minilm_for_question_answering", "load_patched_bert", "load_pruned_bert", "minilm_path", "patch_bert",
    "prune_like_nn_pruning", "random_bert_base", "save_patched_bert", "save_pruned_bert", "skip_absent_attention_mask",
]
