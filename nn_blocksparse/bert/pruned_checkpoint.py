"""Head-pruned BERT checkpoints in the nn_pruning / transformers-4 format: what the format is, and its API.

nn_pruning "hybrid" BERT models (huggingface/nn_pruning) were saved by transformers 4 after
``model.prune_heads(...)``.  Such a checkpoint folder has

* ``config.json`` with ``"pruned_heads": {"<layer>": [removed ORIGINAL head indices], ...}``;
* physically smaller attention tensors: query/key/value weight ``[n_kept_heads * head_dim, hidden]``,
  bias ``[n_kept_heads * head_dim]``, attention-output dense weight ``[hidden, n_kept_heads * head_dim]``;
* optionally smaller FFN tensors (removed neurons): intermediate.dense weight ``[n_kept, hidden]``,
  output.dense weight ``[hidden, n_kept]``, while ``intermediate_size`` in the config keeps the
  original value.

transformers 5 has no ``PreTrainedModel.prune_heads`` and does not read ``config.pruned_heads``,
so ``from_pretrained`` builds full-size modules and the smaller tensors do not fit.  The API:

* :func:`load_pruned_bert` -- load such a folder (or a plain BERT folder) as a transformers 5 model,
  rebuilt at the right per-layer sizes and loaded strictly (:mod:`.pruned_load`);
* :func:`save_pruned_bert` -- write a model in exactly that format, physically removing the heads
  and, with ``shrink_ffn=True``, the FFN neurons (nn_pruning's optional resize) whose removal leaves
  the outputs unchanged, by :mod:`nn_blocksparse.resize`'s rule; so tests can make fixtures
  (:mod:`.pruned_save`);
* :class:`NoHeadsSelfAttention` -- the attention of a layer with every head pruned;
* ``TASK_TO_MODEL_CLASS`` -- the ``task`` names :func:`load_pruned_bert` accepts.

Reading and writing the folder's files (safetensors, ``.bin`` without unsafe unpickling, shard
indexes, legacy key names) is :mod:`.checkpoint_files`'s job.
"""

from .pruned_load import TASK_TO_MODEL_CLASS, NoHeadsSelfAttention, load_pruned_bert
from .pruned_save import save_pruned_bert

__all__ = ["TASK_TO_MODEL_CLASS", "NoHeadsSelfAttention", "load_pruned_bert", "save_pruned_bert"]
