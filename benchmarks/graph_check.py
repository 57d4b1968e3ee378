"""Cross-check of end-to-end CUDA-graph timing: one pruned dense BERT-base forward, four ways. GPU only.

    python -m benchmarks.graph_check [--out DIR] [--sizes 8x384,32x384] [--rep-ms 200]

On the H200 `bench_e2e --cuda-graph` timed the pruned BERT-base forward at 8x384 and 32x384
slower than `bench_e2e` eagerly (22.4 ms against 7.6 ms at 32x384), which cannot be right for a
host-bound eager run. Two things differ between those runs: the graph run passes no attention
mask (transformers inspects a given mask on the host), and `triton.testing.do_bench_cudagraph`
captures on a side stream. This script separates them, on the same model and inputs:

- `eager_mask`:      `do_bench`, all-ones attention mask (what `bench_e2e` times);
- `eager_no_mask`:   `do_bench`, no mask (what the graph runs capture);
- `graph_do_bench`:  `do_bench_cudagraph`, no mask (what `bench_e2e --cuda-graph` times);
- `graph_manual`:    one forward captured with `torch.cuda.graph` (warm-up on a side stream, as
                     torch's documentation does it), replayed `--replays` times between two
                     events on the current stream;
- `graph_skip_mask`: `graph_manual` under `skip_absent_attention_mask`;
- `graph_forward`:   `nn_blocksparse.bert.CudaGraphForward` (the serving helper: the same
                     capture, plus copying new input ids in) called `--replays` times.

The answer (H200, transformers 5.17): captured, the forward ran SDPA on its fp32 math path with a
mask transformers built because it was capturing; `graph_skip_mask` is the fix.

Writes `graph_check_<device>.csv`. `--profile` also records, for the last size, the GPU kernels
of one eager forward and of one graph replay (torch.profiler), and writes the heaviest of each to
`graph_check_profile_<device>.csv`: if the two run different kernels, that is the difference.
"""

from __future__ import annotations

import sys

import torch

from . import common
from .bench_e2e import load_pruned, random_inputs

COLUMNS = ["model", "batch", "seq", "method", "time_ms", "note"]
PROFILE_COLUMNS = ["way", "kernel", "calls", "gpu_us_total", "share"]
PROFILE_TOP = 12


def events_ms(fn, calls: int) -> float:
    """Milliseconds per call of `fn`: `calls` calls between two CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def manual_graph_ms(fn, replays: int) -> float:
    """Milliseconds per replay of one captured call."""
    return events_ms(capture(fn).replay, replays)


def capture(fn) -> torch.cuda.CUDAGraph:
    """One call of `fn` captured as a CUDA graph (`nn_blocksparse.cuda_graph.capture_graph`),
    replayed once."""
    from nn_blocksparse.cuda_graph import capture_graph

    graph, _ = capture_graph(fn, torch.device("cuda"))
    graph.replay()
    torch.cuda.synchronize()
    return graph


def kernel_profile(fn, way: str) -> list[dict]:
    """The GPU kernels one call of `fn` runs: the `PROFILE_TOP` heaviest, by total GPU time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us()
    grand = sum(us for _, us in totals.values()) or 1.0
    heaviest = sorted(totals.items(), key=lambda item: -item[1][1])[:PROFILE_TOP]
    return [{"way": way, "kernel": name[:120], "calls": calls, "gpu_us_total": us, "share": us / grand}
            for name, (calls, us) in heaviest]


def graph_forward_ms(model, input_ids, replays: int) -> float:
    """Milliseconds per call of a `CudaGraphForward` (input copy + replay)."""
    from nn_blocksparse.bert import CudaGraphForward

    served = CudaGraphForward(model, *input_ids.shape)
    served(input_ids)
    return events_ms(lambda: served(input_ids), replays)


def skipping_masks(measure, *args):
    from nn_blocksparse.bert import skip_absent_attention_mask

    with skip_absent_attention_mask():
        return measure(*args)


def main(argv=None) -> int:
    parser = common.base_parser("pruned BERT-base forward: eager vs CUDA-graph timing, with and without mask")
    parser.add_argument("--sizes", default="8x384,32x384", help="batch x seq list")
    parser.add_argument("--rep-ms", type=float, default=200.0)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--profile", action="store_true",
                        help="also list the GPU kernels of one eager forward and one graph replay (last size)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("graph_check: needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench, do_bench_cudagraph

    device = torch.device("cuda")
    model, _ = load_pruned("bert-base")
    model = model.to(device=device, dtype=torch.float16)
    rows = []
    with torch.inference_mode():
        for batch, seq in (common.parse_shape(s) for s in common.parse_list(args.sizes)):
            masked = random_inputs(batch, seq, model.config.vocab_size, device)
            unmasked = random_inputs(batch, seq, model.config.vocab_size, device, with_mask=False)
            ways = {
                "eager_mask": lambda: do_bench(lambda: model(**masked), rep=args.rep_ms, return_mode="median"),
                "eager_no_mask": lambda: do_bench(lambda: model(**unmasked), rep=args.rep_ms, return_mode="median"),
                "graph_do_bench": lambda: do_bench_cudagraph(lambda: model(**unmasked), rep=args.rep_ms,
                                                             return_mode="median"),
                "graph_manual": lambda: manual_graph_ms(lambda: model(**unmasked), args.replays),
                "graph_skip_mask": lambda: skipping_masks(manual_graph_ms, lambda: model(**unmasked), args.replays),
                "graph_forward": lambda: graph_forward_ms(model, unmasked["input_ids"], args.replays),
            }
            for name, measure in ways.items():
                note = ""
                try:
                    time_value = float(measure())
                except Exception as error:  # noqa: BLE001 - recorded, the other ways still run
                    time_value, note = float("nan"), f"failed: {type(error).__name__}: {str(error)[:160]}"
                rows.append({"model": "bert-base", "batch": batch, "seq": seq, "method": name,
                             "time_ms": time_value, "note": note})
                print(f"bert-base {batch}x{seq} {name:<15} {time_value:9.3f} ms {note}", flush=True)
    path = common.write_csv(common.results_path(args.out, "graph_check", device, False), rows, COLUMNS,
                            common.environment_record(device))
    print("wrote", path)
    if args.profile:
        with torch.inference_mode():
            graph = capture(lambda: model(**unmasked))
            fixed = skipping_masks(capture, lambda: model(**unmasked))
            profile_rows = (kernel_profile(lambda: model(**unmasked), "eager_no_mask")
                            + kernel_profile(graph.replay, "graph_replay")
                            + kernel_profile(fixed.replay, "graph_skip_mask"))
        for row in profile_rows:
            print(f"{row['way']:<14} {row['gpu_us_total']:10.1f} us {row['share']:6.1%} x{row['calls']:<4} "
                  f"{row['kernel']}", flush=True)
        path = common.write_csv(common.results_path(args.out, "graph_check_profile", device, False), profile_rows,
                                PROFILE_COLUMNS, common.environment_record(device))
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
