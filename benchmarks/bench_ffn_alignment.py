"""FFN alignment benchmark: what the size a resized FFN is padded to does to a pruned BERT's speed.

    python -m benchmarks.bench_ffn_alignment [--out DIR] [--quick] [--sizes 1x128,8x384,32x384]
        [--multiples 1,8,16,32,64,128] [--hybrid-multiples 8,32,64] [--block-size 32] [--cuda-graph]
        [--rep-ms 100] [--device cuda|cpu] [--threads N] [--seed 0]

Resizing leaves FFN hidden sizes such as 1225 (nn_pruning keeps whatever neurons survived).
`patch_bert(..., ffn_multiple_of=k)` rounds them up to a multiple of k with all-zero neurons,
which changes no output. This times, in one run on the pruned BERT-base of `bench_e2e`:

- `dense`:          the pruned model unpatched, the baseline;
- `resize/pad{k}`:  `patch_bert(mode="resize", ffn_multiple_of=k)` for each k of `--multiples`
                    (k = 1: no padding, as nn_pruning resizes);
- `hybrid/pad{k}`:  `patch_bert(mode="hybrid", ffn_multiple_of=k)` for each k of
                    `--hybrid-multiples`: hybrid also fuses Q/K/V into one matmul, so
                    resize/pad8 against hybrid/pad8 shows the fusion, hybrid/pad8 against
                    hybrid/pad32 the padding (a k the block size does not divide keeps FFNs dense).

Rows and columns are `bench_e2e`'s (`method` names the variant; one that cannot be patched gets
NaN rows with the error in `note`), the plot its speedup bars.
Writes `ffn_alignment[_cudagraph]_<device>.csv` and `.png`. `--quick`: CPU, fp32, the real
MiniLM, 1x32, multiples 1,8,32 and hybrid 32 (a smoke run).
"""

from __future__ import annotations

import torch

from . import bench_e2e, common

FULL_SIZES = bench_e2e.FULL_SIZES[:3]  # 1x128, 8x384, 32x384
QUICK_SIZES = ((1, 32),)
FULL_MULTIPLES = (1, 8, 16, 32, 64, 128)
FULL_HYBRID_MULTIPLES = (8, 32, 64)
QUICK_MULTIPLES = (1, 8, 32)
QUICK_HYBRID_MULTIPLES = (32,)


def variant_specs(multiples, hybrid_multiples) -> dict[str, dict]:
    """`bench_e2e.build_variants` specs: `resize/pad{k}` and `hybrid/pad{k}`."""
    return {f"{mode}/pad{k}": {"mode": mode, "ffn_multiple_of": k}
            for mode, ks in (("resize", multiples), ("hybrid", hybrid_multiples)) for k in ks}


def ffn_widths(model: torch.nn.Module) -> list[int]:
    from nn_blocksparse.bert.patching import bert_layers

    return [layer.intermediate.dense.out_features for layer in bert_layers(model)]


def parse_args(argv=None):
    parser = common.base_parser("pruned BERT end to end with resized FFNs padded to several multiples")
    bench_e2e.add_run_arguments(parser, default_rep_ms=100.0)
    parser.add_argument("--block-size", type=int, default=32, help="hybrid's block size")
    parser.add_argument("--multiples", help=f"resize paddings (default: {','.join(map(str, FULL_MULTIPLES))})")
    parser.add_argument("--hybrid-multiples",
                        help=f"hybrid paddings (default: {','.join(map(str, FULL_HYBRID_MULTIPLES))})")
    args = parser.parse_args(argv)
    bench_e2e.resolve_run_arguments(args, QUICK_SIZES, FULL_SIZES)
    try:
        args.multiples = ([int(k) for k in common.parse_list(args.multiples)] if args.multiples
                          else list(QUICK_MULTIPLES if args.quick else FULL_MULTIPLES))
        args.hybrid_multiples = ([int(k) for k in common.parse_list(args.hybrid_multiples)] if args.hybrid_multiples
                                 else list(QUICK_HYBRID_MULTIPLES if args.quick else FULL_HYBRID_MULTIPLES))
    except ValueError as error:
        parser.error(f"multiples must be integers: {error}")
    if any(k < 1 for k in [*args.multiples, *args.hybrid_multiples]):
        parser.error("multiples must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if common.cuda_missing(device, "bench_ffn_alignment"):
        return 2
    with common.torch_threads(args.threads):
        model, _ = bench_e2e.load_pruned(args.model, seed=args.seed)
        model = model.to(device=device, dtype=args.dtype)
        variants, failures = bench_e2e.build_variants(
            model, block_size=args.block_size, specs=variant_specs(args.multiples, args.hybrid_multiples))
        for name, variant in variants.items():
            print(f"{name:<14} FFN widths {ffn_widths(variant)}", flush=True)
        rows = bench_e2e.run_sizes(args.model, variants, args.sizes, device, args.dtype,
                                   warmup=1 if args.quick else 2, repeats=args.repeats, failures=failures,
                                   cuda_graph=args.cuda_graph, rep_ms=args.rep_ms)
        bench_e2e.write_results(rows, args, "ffn_alignment", f"pruned {args.model}, resized FFNs padded to k,")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
