"""Where a patched BERT forward spends its time on CPU beyond the linears (issue 19.5), by torch.profiler.

    python -m benchmarks.profile_cpu_hybrid [--out DIR] [--quick] [--threads 2] [--models minilm,bert-base]
        [--sizes 1x128] [--methods hybrid,hybrid_plain_layers,resize] [--dtype fp32|bf16] [--repeats N]

Each model is pruned like nn_pruning's hybrid SQuAD model and patched (`--methods`: resize,
blocksparse, hybrid (with `prepack=True`, as `bench_cpu_engines` runs it), and
`hybrid_plain_layers`, that hybrid with transformers' own `BertLayer.forward` instead of
`ThinBertLayer`'s, to see what the thin layers save; default hybrid and that).
The forward is profiled `--repeats` times (after warm-up) under `torch.profiler` on the CPU, with
labelled ranges (`torch.autograd.profiler.record_function`) around every linear layer, the
embeddings, the attention-mask preparation and the pooler. Every top-level event of the forward's
thread (a labelled range, or an ATen op called from Python outside one) is put in one category:

- `linear_blocksparse` (`BlockSparseLinear`, fused GELU included where fused) and `linear_dense`
  (`nn.Linear`): the ATen ops they called; `<name>_python`: the rest of their ranges (the module's
  own Python, checks and plan look-ups);
- `embeddings`, `attention_mask`, `pooler`: their labelled ranges;
- by ATen op: `attention` (our native CPU attention, SDPA, or softmax/matmul of an unfused attention); `layer_norm`
  (the residual add included where the native add + layer norm runs it); `gelu`
  (where not fused into a linear); `residual_add`; `dropout` (the identity in eval mode, still
  dispatched); `copies` (contiguous, clone, copy_, cat, dtype conversions); `views` (view, reshape
  without copy, permute, transpose, unbind, ...); `other_ops`;
- `python_and_dispatch`: the profiled forward's wall time less all of the above: Python
  (transformers' module calls and ours) and the profiler's own per-op cost.

One CSV row per (model, size, method, category): milliseconds per forward, share of the profiled
forward, top-level calls per forward, and `forward_ms_unprofiled` (the same forward timed without the
profiler by `common.time_ms`, to see the profiler's overhead). The environment record holds the load
average before and after: a breakdown is only worth keeping from a quiet machine.
Writes `cpu_hybrid_profile[_<dtype>]_<cpu>[_quick].csv` (the dtype named unless fp32). `--quick`: MiniLM, 1x128, 2 repeats.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile, record_function

from nn_blocksparse.dtypes import DTYPE_NAMES, dtype_from_name

from . import bench_e2e, common

CPU = torch.device("cpu")
COLUMNS = ["model", "batch", "seq", "dtype", "method", "category", "ms_per_forward", "share_of_forward",
           "calls_per_forward", "forward_ms_profiled", "forward_ms_unprofiled"]
LABEL_PREFIX = "nnbs_profile::"
LINEAR_CATEGORIES = ("linear_blocksparse", "linear_dense")
CATEGORIES = ("linear_blocksparse", "linear_blocksparse_python", "linear_dense", "linear_dense_python", "attention",
              "layer_norm", "gelu", "residual_add", "dropout", "copies", "views", "embeddings", "attention_mask",
              "pooler", "other_ops", "python_and_dispatch")
# Top-level ATen ops by category; anything else is "other_ops".
OP_CATEGORIES = {
    "attention": ("nn_blocksparse::attention_cpu", "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::softmax", "aten::_softmax", "aten::matmul", "aten::bmm", "aten::baddbmm"),
    "layer_norm": ("aten::layer_norm", "aten::native_layer_norm", "nn_blocksparse::add_layer_norm_cpu"),
    "gelu": ("aten::gelu",),
    "residual_add": ("aten::add", "aten::add_"),
    "dropout": ("aten::dropout",),  # the identity in eval mode, but still a dispatched op
    "copies": ("aten::contiguous", "aten::clone", "aten::copy_", "aten::cat", "aten::to", "aten::_to_copy",
               "aten::new_zeros", "aten::zeros"),
    "views": ("aten::view", "aten::reshape", "aten::permute", "aten::transpose", "aten::unbind", "aten::select",
              "aten::slice", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::as_strided",
              "aten::_unsafe_view", "aten::flatten", "aten::split", "aten::chunk"),
}
QUICK_MODELS, FULL_MODELS = ("minilm",), ("minilm", "bert-base")
# hybrid with transformers' own BertLayer.forward instead of ThinBertLayer's: what the thin layers save.
PLAIN_LAYERS = "hybrid_plain_layers"
METHODS = (*bench_e2e.PATCH_MODES, PLAIN_LAYERS)
DEFAULT_SIZES = ((1, 128),)


def op_category(name: str) -> str:
    if name.startswith(LABEL_PREFIX):
        return name[len(LABEL_PREFIX):]
    for category, names in OP_CATEGORIES.items():
        if name in names:
            return category
    return "other_ops"


def labelled(module: nn.Module, label: str):
    """Inside the block, `module`'s forward runs in a profiler range named `LABEL_PREFIX + label`."""
    return _labelled_method(module, "forward", label)


@contextlib.contextmanager
def labelled_model(model: nn.Module):
    """Label the linears, embeddings, mask preparation and pooler of a (patched) BERT for the profiler."""
    from nn_blocksparse import BlockSparseLinear

    base = getattr(model, "bert", model)
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, BlockSparseLinear):
                stack.enter_context(labelled(module, "linear_blocksparse"))
            elif isinstance(module, nn.Linear) and module is not getattr(base.pooler, "dense", None):
                stack.enter_context(labelled(module, "linear_dense"))
        stack.enter_context(labelled(base.embeddings, "embeddings"))
        if base.pooler is not None:
            stack.enter_context(labelled(base.pooler, "pooler"))
        if hasattr(base, "_create_attention_masks"):
            stack.enter_context(_labelled_method(base, "_create_attention_masks", "attention_mask"))
        yield


@contextlib.contextmanager
def _labelled_method(owner, name: str, label: str):
    original = getattr(owner, name)

    def method(*args, **kwargs):
        with record_function(LABEL_PREFIX + label):
            return original(*args, **kwargs)

    setattr(owner, name, method)
    try:
        yield
    finally:
        delattr(owner, name)


def breakdown(model: nn.Module, inputs: dict, repeats: int, warmup: int) -> tuple[dict, dict, float]:
    """(`{category: ms per forward}`, `{category: top-level calls per forward}`, profiled forward ms)."""
    import time

    with torch.inference_mode(), labelled_model(model):
        for _ in range(warmup):
            model(**inputs)
        walls = []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                start = time.perf_counter()
                model(**inputs)
                walls.append((time.perf_counter() - start) * 1e3)
    thread = next((e.thread for e in prof.events() if e.name.startswith(LABEL_PREFIX)), None)
    totals, calls = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.cpu_parent is None and event.thread == thread:
            category = op_category(event.name)
            elapsed = event.time_range.elapsed_us() / 1e3 / repeats
            if category in LINEAR_CATEGORIES:  # the ops it ran, and the Python around them
                inner = sum(child.time_range.elapsed_us() for child in event.cpu_children) / 1e3 / repeats
                totals[category + "_python"] += elapsed - inner
                elapsed = inner
            totals[category] += elapsed
            calls[category] += 1
    forward_ms = sum(walls) / repeats
    totals["python_and_dispatch"] = forward_ms - sum(totals.values())
    return dict(totals), {c: n / repeats for c, n in calls.items()}, forward_ms


def plain_layers(model: nn.Module) -> nn.Module:
    """A copy of a patched model whose layers run transformers' BertLayer.forward (not ThinBertLayer's)."""
    import copy

    from nn_blocksparse.bert.patching import bert_layers
    from nn_blocksparse.bert.thin_layer import use_transformers_layers

    plain = copy.deepcopy(model)
    use_transformers_layers(bert_layers(plain))
    return plain


def run(args) -> list[dict]:
    rows = []
    for model_name in args.models:
        model, _ = bench_e2e.load_pruned(model_name)
        model = model.to(args.dtype)
        modes = [mode for mode in bench_e2e.PATCH_MODES if mode in args.methods or
                 (mode == "hybrid" and PLAIN_LAYERS in args.methods)]
        # hybrid as bench_cpu_engines runs it: dense weights prepacked, as a server would
        specs = {mode: {"mode": mode, **({"prepack": True} if mode == "hybrid" else {})} for mode in modes}
        variants, failures = bench_e2e.build_variants(model, specs=specs)
        if failures:
            raise RuntimeError(f"could not patch {model_name}: {failures}")
        if PLAIN_LAYERS in args.methods:
            variants[PLAIN_LAYERS] = plain_layers(variants["hybrid"])
        for batch, seq in args.sizes:
            inputs = bench_e2e.random_inputs(batch, seq, model.config.vocab_size, CPU)
            for method in args.methods:
                variant = variants[method]
                with torch.inference_mode():
                    unprofiled = common.time_ms(lambda: variant(**inputs), CPU, args.warmup, args.repeats)
                totals, calls, forward_ms = breakdown(variant, inputs, args.repeats, args.warmup)
                print(f"{model_name} {batch}x{seq} {method}: {forward_ms:.2f} ms profiled, {unprofiled:.2f} ms not",
                      flush=True)
                for category in CATEGORIES:
                    if category not in totals:
                        continue
                    rows.append({"model": model_name, "batch": batch, "seq": seq,
                                 "dtype": DTYPE_NAMES[args.dtype], "method": method, "category": category,
                                 "ms_per_forward": totals[category], "share_of_forward": totals[category] / forward_ms,
                                 "calls_per_forward": calls.get(category, 0), "forward_ms_profiled": forward_ms,
                                 "forward_ms_unprofiled": unprofiled})
                    print(f"  {category:<20} {totals[category]:8.3f} ms  {totals[category] / forward_ms:6.1%}  "
                          f"{calls.get(category, 0):6.1f} calls", flush=True)
    return rows


def parse_args(argv=None):
    parser = common.base_parser("torch.profiler breakdown of a patched BERT forward on CPU", default_threads=2)
    parser.add_argument("--models", help=f"subset of {','.join(FULL_MODELS)} (default both; --quick minilm)")
    parser.add_argument("--sizes", help="batch x seq list (default 1x128)")
    parser.add_argument("--methods", default=f"hybrid,{PLAIN_LAYERS}", help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, help="profiled forwards (default 20, --quick 2)")
    args = parser.parse_args(argv)
    args.models = common.parse_list(args.models) if args.models else list(QUICK_MODELS if args.quick else FULL_MODELS)
    args.sizes = [common.parse_shape(s) for s in common.parse_list(args.sizes)] if args.sizes else list(DEFAULT_SIZES)
    args.methods = common.parse_list(args.methods)
    for method in args.methods:
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {METHODS}")
    for model in args.models:
        if model not in FULL_MODELS:
            parser.error(f"unknown model {model!r}; choose from {FULL_MODELS}")
    args.dtype = dtype_from_name(args.dtype)
    args.repeats = args.repeats or (2 if args.quick else 20)
    args.warmup = 1 if args.quick else 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = common.load_average()
    with common.torch_threads(args.threads):
        environment = common.environment_record(CPU)
        rows = run(args)
    environment.update(loadavg_before=load_before, loadavg_after=common.load_average())
    stem = "cpu_hybrid_profile" + ("" if args.dtype == torch.float32 else "_" + DTYPE_NAMES[args.dtype])
    path = common.write_csv(common.results_path(args.out, stem, CPU, args.quick), rows, COLUMNS, environment)
    print(f"\nload average before {load_before}, after {environment['loadavg_after']}\nwrote\n  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
