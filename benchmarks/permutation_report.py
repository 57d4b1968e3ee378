"""Row groups' useful-FLOP fraction before and after patch-time permutations (issue 16). CPU; counts, not times.

    python -m benchmarks.permutation_report [--out DIR] [--quick]

A row-group kernel (R block-rows per program, `row_groups.py`) multiplies a block for every member
at every step of the group's union of block-columns; the **useful-FLOP fraction** is the share of
those products that meet a stored block, `1 / RowGroups.inflation`. `nn_blocksparse.permutation`
reorders output features exactly (FFN neurons; attention heads and head dimensions) so that
consecutive block-rows share columns; this script counts what that buys, for R = 2, 4, 8:

- `layout` rows: the generators of `nn_blocksparse.layouts` (random, head_structured,
  nn_pruning_like) at densities 0.36 / 0.5 / 0.75, in two roles: `qkv`, a 768x768 Q-like weight
  whose heads of 64 features (2 block-rows) must stay whole, and `ffn_in`, a 3072x768 FFN-in weight
  whose block-rows move freely;
- `pruned_bert_base` rows: BERT-base pruned like nn_pruning's hybrid SQuAD model (random weights,
  `prune_like_nn_pruning`, seed 0), patched by `patch_bert` (hybrid: heads and neurons resized
  away first; blocksparse: all kept) with every matrix block-sparse, without and with
  `permute_for_row_groups=R`: the fused QKV (Q, K and V share one permutation) and FFN-in matrices,
  summed over the 12 layers.

`*_before` / `*_after`: the library's grouping (`BlockSparseMatrix.row_groups`, the better of feature
order and rows sorted by pattern) of the weight as it is and after permutation; `consecutive_*`:
groups of R consecutive block-rows, what a kernel that stores a group's output tile in one piece
needs. Counts depend on seeds only, not on the machine. Writes `permutation_<cpu>[_quick].csv`.
"""

from __future__ import annotations

import copy
import sys

import torch

from nn_blocksparse.block_sparse_matrix import BlockSparseMatrix
from nn_blocksparse.layouts import LAYOUTS, block_layout, block_sparse_weight, make_layout
from nn_blocksparse.permutation import consecutive_group_steps, grouped_block_row_order

from . import common

COLUMNS = ["source", "role", "shape", "density", "rows_per_group", "unit_rows", "nnz_blocks", "steps_before",
           "steps_after", "inflation_before", "inflation_after", "useful_flop_fraction_before",
           "useful_flop_fraction_after", "consecutive_inflation_before", "consecutive_inflation_after"]
BLOCK_SIZE = 32
ROWS_PER_GROUP = (2, 4, 8)
DENSITIES = (0.36, 0.5, 0.75)
ROLES = {"qkv": ((768, 768), 64 // BLOCK_SIZE), "ffn_in": ((3072, 768), 1)}  # shape, block-rows per unit
QUICK_ROLES = {"qkv": ((256, 128), 2), "ffn_in": ((512, 128), 1)}
QUICK_DENSITIES = (0.5,)
PATCH_MODES = ("hybrid", "blocksparse")
QUICK_PATCH_MODES = ("hybrid",)


def counts(matrices_before, matrices_after, rows_per_group: int) -> dict:
    """Steps and inflations of lists of BlockSparseMatrix grouped `rows_per_group` rows at a time (sums)."""
    nnz = sum(m.nnz_blocks for m in matrices_before)
    before = sum(m.row_groups(rows_per_group).step_count for m in matrices_before)
    after = sum(m.row_groups(rows_per_group).step_count for m in matrices_after)
    consecutive = [sum(consecutive_group_steps(block_layout(m.to_dense(), m.block_size), rows_per_group)
                       for m in ms) for ms in (matrices_before, matrices_after)]

    def inflation(steps: int) -> float:
        return steps * rows_per_group / nnz if nnz else 1.0

    return {"rows_per_group": rows_per_group, "nnz_blocks": nnz, "steps_before": before, "steps_after": after,
            "inflation_before": inflation(before), "inflation_after": inflation(after),
            "useful_flop_fraction_before": 1 / inflation(before), "useful_flop_fraction_after": 1 / inflation(after),
            "consecutive_inflation_before": inflation(consecutive[0]),
            "consecutive_inflation_after": inflation(consecutive[1])}


def layout_rows(roles, densities) -> list[dict]:
    rows = []
    for name in LAYOUTS:
        for role, ((n, k), unit_rows) in roles.items():
            for density in densities:
                layout = make_layout(name, n // BLOCK_SIZE, k // BLOCK_SIZE, density, seed=0, rows_per_head=2)
                matrix = BlockSparseMatrix.from_dense(block_sparse_weight(layout, BLOCK_SIZE), BLOCK_SIZE)
                for rows_per_group in ROWS_PER_GROUP:
                    order = grouped_block_row_order([layout], rows_per_group, unit_rows)
                    permuted = BlockSparseMatrix.from_dense(block_sparse_weight(layout[order], BLOCK_SIZE), BLOCK_SIZE)
                    rows.append({"source": f"layout {name}", "role": role, "shape": f"{n}x{k}",
                                 "density": matrix.density, "unit_rows": unit_rows,
                                 **counts([matrix], [permuted], rows_per_group)})
    return rows


def pruned_model_rows(model, source: str, modes=PATCH_MODES) -> list[dict]:
    """Every layer's fused QKV and FFN-in after patch_bert, without and with the permutation for each R."""
    from nn_blocksparse import BlockSparseLinear, patch_bert

    def matrices(patched, role):
        modules = [layer.attention.self.attention.qkv if role == "qkv" else layer.intermediate.dense
                   for layer in patched.encoder.layer]
        return [m.matrix for m in modules if isinstance(m, BlockSparseLinear)]

    rows = []
    for mode in modes:
        plain = patch_bert(copy.deepcopy(model), mode=mode, dense_threshold=1.0, backend="cpu")
        for rows_per_group in ROWS_PER_GROUP:
            permuted = patch_bert(copy.deepcopy(model), mode=mode, dense_threshold=1.0, backend="cpu",
                                  permute_for_row_groups=rows_per_group)
            for role in ("qkv", "ffn_in"):
                before, after = matrices(plain, role), matrices(permuted, role)
                density = sum(m.nnz_blocks for m in before) / max(sum(m.block_rows * m.block_cols for m in before), 1)
                rows.append({"source": f"{source} {mode}", "role": role, "shape": "all layers", "density": density,
                             "unit_rows": "heads" if role == "qkv" else 1, **counts(before, after, rows_per_group)})
    return rows


def main(argv=None) -> int:
    parser = common.base_parser("useful-FLOP fraction of row groups before and after permutations (counts)", 1)
    args = parser.parse_args(argv)
    from nn_blocksparse.bert.pruning import load_minilm, prune_like_nn_pruning, random_bert_base

    device = torch.device("cpu")
    with common.torch_threads(args.threads), torch.no_grad():
        rows = layout_rows(QUICK_ROLES if args.quick else ROLES, QUICK_DENSITIES if args.quick else DENSITIES)
        model, source = (load_minilm(), "pruned_minilm") if args.quick else (random_bert_base(seed=0), "pruned_bert_base")
        prune_like_nn_pruning(model, seed=0, block_size=BLOCK_SIZE)
        rows += pruned_model_rows(model, source, QUICK_PATCH_MODES if args.quick else PATCH_MODES)
    environment = {**common.environment_record(device), "timing": "none (counts)"}
    path = common.write_csv(common.results_path(args.out, "permutation", device, args.quick), rows, COLUMNS,
                            environment)
    print(f"{'source':>26} {'role':>6} {'shape':>10} {'dens':>5} {'R':>2}  useful before -> after  "
          "(consecutive groups: before -> after)")
    for row in rows:
        print(f"{row['source']:>26} {row['role']:>6} {row['shape']:>10} {row['density']:>5.2f} "
              f"{row['rows_per_group']:>2}  {row['useful_flop_fraction_before']:.3f} -> "
              f"{row['useful_flop_fraction_after']:.3f}  ({1 / row['consecutive_inflation_before']:.3f} -> "
              f"{1 / row['consecutive_inflation_after']:.3f})")
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
