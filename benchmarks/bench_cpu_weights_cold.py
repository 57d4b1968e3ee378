"""What a hybrid layer's operations cost with their weights fresh from memory, against the same ones cached.

    python -m benchmarks.bench_cpu_weights_cold [--out DIR] [--quick] [--threads 2] [--models bert-base,minilm]
        [--sizes 1x128,8x128] [--dtypes fp32,bf16] [--repeats N]

A forward reads every layer's weights once: where they outgrow the last-level cache share a machine
gives the process, each layer's come from memory, and a kernel that does not hide that fetch behind
its arithmetic runs slower than it does in a loop over one layer. This runs each patched model's
encoder layers as `ThinBertLayer` does (fused QKV, native attention, output projection, add + norm,
FFN-in, FFN-out, add + norm, each consuming what came before), timing each operation with
`time.perf_counter`, two ways:

- `model_order`: the model's own layers in order, as a forward runs them (each layer's weights last
  touched one forward ago);
- `one_layer`: each layer on its own, its modules four times in a row, timing the last three (its
  weights then in the caches they fit);
- `model_order_warmed`: the model's order again, each operation first run, untimed, on a one-token
  copy of its input (a chain of its own beside the timed one): its code, Python objects and weights
  then as a call leaves them, its input and output data not. Against `model_order`, what an
  operation pays for running after other kernels beyond its weights' trip from memory.

Each layer is compared with itself (pruned layers differ in size), and an operation's figure is the
mean over the layers of each layer's median.
One CSV row per (model, size, dtype, operation, chain): microseconds per call (the mean over the
layers of each layer's median over `--repeats` passes), and `model_order_over_one_layer` and
`model_order_over_warmed` on the `model_order` rows. Operations: `qkv`, `attention`, `attention_output`, `add_norm_1`, `ffn_in`,
`ffn_out`, `add_norm_2`; the linears' stored weights in MB beside them (`weight_mb`, the mean over
the layers). Writes `cpu_weights_cold_<cpu>[_quick].csv`
and `.png`. `--quick`: MiniLM, 1x128, fp32, 2 repeats (its times mean nothing).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from nn_blocksparse.dtypes import DTYPE_NAMES, dtype_from_name

from . import bench_e2e, common

COLUMNS = ["model", "batch", "seq", "dtype", "operation", "chain", "time_us", "model_order_over_one_layer",
           "model_order_over_warmed", "weight_mb", "layers"]
OPERATIONS = ("qkv", "attention", "attention_output", "add_norm_1", "ffn_in", "ffn_out", "add_norm_2")
FULL_SIZES, QUICK_SIZES = ((1, 128), (8, 128)), ((1, 128),)
CHAINS = ("model_order", "one_layer", "model_order_warmed")


def layer_steps(layer) -> list[tuple[str, object]]:
    """`(operation, step(state) -> state)` of one thin layer's forward, in order; `state` is a dict."""
    from nn_blocksparse.bert.thin_layer import _add_norm, prepared_calls

    fused, output = layer.attention.self.attention, layer.attention.output
    _, first_norm, second_norm = prepared_calls(layer)
    ffn_in, ffn_out, activation = layer.intermediate.dense, layer.output.dense, layer.intermediate.intermediate_act_fn
    if fused.num_heads == 0:  # every head pruned: no projection, and the attention adds nothing
        qkv_step = lambda s: s  # noqa: E731
        attention_step = lambda s: {**s, "context": fused(s["h"])}  # noqa: E731
    else:
        qkv_step = lambda s: {**s, "qkv": fused.qkv(s["h"])}  # noqa: E731
        attention_step = lambda s: {**s, "context": fused.attend(s["qkv"])}  # noqa: E731
    return [
        ("qkv", qkv_step),
        ("attention", attention_step),
        ("attention_output", lambda s: {**s, "o": output.dense(s["context"])}),
        ("add_norm_1", lambda s: {**s, "h": _add_norm(s["o"], s["h"], output.LayerNorm, output.dense,
                                                             first_norm)}),
        ("ffn_in", lambda s: {**s, "i": activation(ffn_in(s["h"]))}),  # the identity where GELU is fused
        ("ffn_out", lambda s: {**s, "y": ffn_out(s["i"])}),
        ("add_norm_2", lambda s: {**s, "h": _add_norm(s["y"], s["h"], layer.output.LayerNorm, ffn_out,
                                                             second_norm)}),
    ]


def weight_megabytes(layer) -> dict[str, float]:
    """Stored weight bytes (MB) of a layer's linears, by operation."""
    def megabytes(module) -> float:
        tensor = getattr(module, "values", None)
        tensor = module.weight if tensor is None else tensor
        return tensor.numel() * tensor.element_size() / 1e6

    return {"qkv": megabytes(layer.attention.self.attention.qkv),
            "attention_output": megabytes(layer.attention.output.dense),
            "ffn_in": megabytes(layer.intermediate.dense), "ffn_out": megabytes(layer.output.dense)}


def time_chain(layers, hidden: torch.Tensor, repeats: int, skip: int = 0,
               warmed: bool = False) -> list[dict[str, float]]:
    """Per position in `layers`, each operation's median seconds over `repeats` passes through them (one
    untimed first); positions before `skip` are run but not kept. `warmed`: each operation first runs,
    untimed, on the one-token chain beside."""
    steps = [layer_steps(layer) for layer in layers]
    times = [{operation: [] for operation in OPERATIONS} for _ in layers]
    with torch.inference_mode():
        for repeat in range(repeats + 1):
            state, token = {"h": hidden}, {"h": hidden[:1, :1].clone()}
            for position, layer in enumerate(steps):
                for operation, step in layer:
                    if warmed:
                        token = step(token)
                    start = time.perf_counter()
                    state = step(state)
                    if repeat:
                        times[position][operation].append(time.perf_counter() - start)
    return [{operation: statistics.median(values) for operation, values in position.items()}
            for position in times[skip:]]


def layer_times(layers, hidden: torch.Tensor, repeats: int) -> dict[str, list[dict[str, float]]]:
    """`{chain: [per layer, {operation: median seconds}]}` for every chain."""
    model_order = time_chain(layers, hidden, repeats)
    one_layer = []
    for layer in layers:
        runs = time_chain([layer] * 4, hidden, repeats, skip=1)  # the first call brings its weights in
        one_layer.append({operation: statistics.median(run[operation] for run in runs) for operation in OPERATIONS})
    return {"model_order": model_order, "one_layer": one_layer,
            "model_order_warmed": time_chain(layers, hidden, repeats, warmed=True)}


def run_case(model_name: str, model, batch: int, seq: int, dtype: torch.dtype, repeats: int) -> list[dict]:
    from nn_blocksparse.bert.patching import bert_layers

    typed = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    variants, failures = bench_e2e.build_variants(typed, specs={"hybrid": {"mode": "hybrid", "prepack": True}},
                                                  block_size=32)
    if "hybrid" not in variants:
        raise RuntimeError(f"could not patch {model_name} in {DTYPE_NAMES[dtype]}: {failures}")
    layers = bert_layers(variants["hybrid"])
    hidden = torch.randn(batch, seq, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    # Twice, alternating, so that a drift of the machine's speed reaches every chain; each layer's
    # figure is its median over both.
    runs = [layer_times(layers, hidden, repeats) for _ in range(2)]
    per_layer = {chain: [{operation: statistics.median(run[chain][index][operation] for run in runs)
                          for operation in OPERATIONS} for index in range(len(layers))] for chain in CHAINS}
    mean_us = {chain: {operation: sum(layer[operation] for layer in per_layer[chain]) / len(layers) * 1e6
                       for operation in OPERATIONS} for chain in CHAINS}
    sizes = [weight_megabytes(layer) for layer in layers]
    megabytes = {operation: sum(size[operation] for size in sizes) / len(sizes) for operation in sizes[0]}
    rows = []
    for operation in OPERATIONS:
        for chain in CHAINS:
            over = {other: mean_us["model_order"][operation] / mean_us[other][operation] if chain == "model_order"
                    else float("nan") for other in ("one_layer", "model_order_warmed")}
            rows.append({"model": model_name, "batch": batch, "seq": seq, "dtype": DTYPE_NAMES[dtype],
                         "operation": operation, "chain": chain, "time_us": mean_us[chain][operation],
                         "model_order_over_one_layer": over["one_layer"],
                         "model_order_over_warmed": over["model_order_warmed"],
                         "weight_mb": megabytes.get(operation, float("nan")), "layers": len(layers)})
    return rows


def parse_args(argv=None):
    parser = common.base_parser("hybrid's layer operations with weights from memory against cached",
                                default_threads=2)
    parser.add_argument("--models", default="bert-base,minilm", help="subset of bert-base,minilm")
    parser.add_argument("--sizes", help="batch x seq list (default 1x128,8x128)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="subset of fp32,bf16")
    parser.add_argument("--repeats", type=int, help="passes per chain (default 10, --quick 2)")
    args = parser.parse_args(argv)
    args.warmup = None  # one untimed pass per chain, always
    common.resolve_models_and_sizes(parser, args, bench_e2e.MODELS, FULL_SIZES, QUICK_SIZES, repeats=10, warmup=1)
    if args.quick:
        args.models, args.dtypes, args.repeats = ["minilm"], "fp32", 2
    names = common.parse_list(args.dtypes)
    if not names or any(name not in ("fp32", "bf16") for name in names):
        parser.error(f"--dtypes must be a subset of fp32,bf16, got {args.dtypes!r}")
    args.dtypes = [dtype_from_name(name) for name in names]
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be at least 1")
    return args


def plot(rows: list[dict], path, title: str):
    cases = sorted({(row["model"], row["batch"], row["seq"], row["dtype"]) for row in rows},
                   key=lambda case: [str(part) for part in case])
    series = {f"{model} {batch}x{seq} {dtype}": [
        next(row["model_order_over_one_layer"] for row in rows if (row["model"], row["batch"], row["seq"], row["dtype"])
             == (model, batch, seq, dtype) and row["operation"] == operation and row["chain"] == "model_order")
        for operation in OPERATIONS] for model, batch, seq, dtype in cases}
    return common.grouped_bars(list(OPERATIONS), series, path, title, "model order / one layer (time per call)",
                               {"no cost": 1.0}, max_width=16.0)


def main(argv=None) -> int:
    args = parse_args(argv)
    with common.torch_threads(args.threads):
        environment = common.cpu_run_record()
        rows = []
        for model_name in args.models:
            model, _ = bench_e2e.load_pruned(model_name)
            for dtype in args.dtypes:
                for batch, seq in args.sizes:
                    case_rows = run_case(model_name, model, batch, seq, dtype, args.repeats)
                    rows.extend(case_rows)
                    print(f"{model_name} {batch}x{seq} {DTYPE_NAMES[dtype]}: " + "  ".join(
                        f"{row['operation']} {row['model_order_over_one_layer']:.2f}x "
                        f"({row['model_order_over_warmed']:.2f}x warmed)" for row in case_rows
                        if row["chain"] == "model_order"), flush=True)
        common.write_cpu_table(args, "cpu_weights_cold", rows, COLUMNS, environment, plot,
                               f"hybrid layers, weights from memory vs cached, {common.cpu_model()}, "
                               f"{torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
