"""What every benchmark shares: environment record, timing, CSV files, plots.

Random block layouts and weights come from `nn_blocksparse.layouts` (one meaning of density everywhere).

CSV format: the environment record comes first, one `# key: value` comment line per entry
(device, GPU and CPU model, library versions, threads, date, command line), then an ordinary
header row and data rows. `read_csv` splits the two back apart; tools that do not know the
format can skip the comment lines (`pandas.read_csv(path, comment="#")`).

Timing (`time_ms`, milliseconds): `nn_blocksparse.timing.median_ms` with the benchmarks' CUDA
method, `triton.testing.do_bench` (L2 flushed between calls; each call timed as the GPU sees it,
so the host's launch work counts wherever it is longer: "eager", what a Python caller gets), or
with `cuda_graph=True` `do_bench_cudagraph` (the kernels' GPU time alone). On CPU the median of
`repeats` calls after `warmup` untimed calls. Methods compared side by side (`time_side_by_side`)
are timed in turns on a CPU (`interleaved_median_ms`: a shared machine's drift then weighs on all
of them alike), one after another on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import os
import platform
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from nn_blocksparse.timing import interleaved_median_ms, median_ms

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    from nn_blocksparse.cpu import cpu_model as model

    return model()


def _cpu_identity() -> str:
    from nn_blocksparse.cpu.isa import cpu_identity

    return cpu_identity()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_tag(device: torch.device) -> str:
    """File-name-safe device name: 'nvidia-h200', 'amd-epyc-avx2', ...

    A CPU's tag carries the ISA our native kernel runs there ('reference' without one): CPUs of one
    model name (every "AMD EPYC") run different kernels, and their results must not mix.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or device.type
    if device.type == "cpu":
        from nn_blocksparse.cpu import native_isa

        slug += "-" + (native_isa() or "reference").replace("_", "-")
    return slug


def package_version(name: str) -> str:
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001 - a missing optional package is just "not installed"
        return "not installed"
    return getattr(module, "__version__", "unknown")


def environment_record(device: torch.device) -> dict[str, str]:
    """Where and with what the numbers were measured; written at the top of every CSV."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    capability = ("sm{}{}".format(*torch.cuda.get_device_capability(device)) if device.type == "cuda" else "none")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "gpu": gpu,
        "gpu_arch": capability,
        "cpu": cpu_model(),
        "cpu_identity": _cpu_identity(),
        "cpu_cores_available": str(available_cores()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "nn_blocksparse": package_version("nn_blocksparse"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **_native_kernel_record(),
    }


def error_note(error: BaseException, prefix: str | None = None, limit: int = 160) -> str:
    """`[prefix: ]Type: message`, the message on one line and cut to `limit` characters: the reason a
    CSV row (or a probe's answer) gives for a method that could not run."""
    note = f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"
    return f"{prefix}: {note}" if prefix else note


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ("0.05 0.10 0.08"; "unknown" off Linux): CPU timings from a
    machine that was not quiet before and after the run are noise."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _native_kernel_record() -> dict[str, str]:
    """Which native CPU kernel ran here (its ISA), else why none did: the CPU numbers depend on it."""
    from nn_blocksparse.cpu import native_isa, native_status

    return {"cpu_native_kernel": native_status(), "cpu_native_isa": native_isa() or "none"}


# ---------------------------------------------------------------------------------- timing
def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 20,
            cuda_warmup_ms: float = 25, cuda_rep_ms: float = 100, cuda_graph: bool = False) -> float:
    """Median milliseconds of one call of `fn`, timed the benchmarks' way (see the module docstring)."""
    return median_ms(fn, device, warmup, repeats, cuda="cudagraph" if cuda_graph else "do_bench",
                     cuda_warmup_ms=cuda_warmup_ms, cuda_rep_ms=cuda_rep_ms)


def cpu_run_record() -> dict[str, str]:
    """A CPU table's environment record (`environment_record`, at torch's current thread count) with the
    load average before the run."""
    return {**environment_record(torch.device("cpu")), "loadavg_before": load_average()}


def write_cpu_table(args: argparse.Namespace, stem: str, rows: list[dict], columns: Sequence[str],
                    environment: dict[str, str], plot: Callable, title: str) -> None:
    """Close a CPU table's run: the load average after into `environment`, `rows` to
    `<stem>_<cpu>[_quick].csv` under `args.out`, `plot(rows, png path, title)` beside it, and where they went."""
    environment["loadavg_after"] = load_average()
    cpu = torch.device("cpu")
    path = write_csv(results_path(args.out, stem, cpu, args.quick), rows, columns, environment)
    png = plot(rows, results_path(args.out, stem, cpu, args.quick, ".png"), title)
    print("\nwrote", path, png, sep="\n  ")


def native_method_runs(make_run: Callable, isas: Sequence[str],
                       refused: str | None = None) -> tuple[dict, dict[str, str]]:
    """(`{method: fn}`, `{method: note}`) of a native kernel's methods in a CPU table: `native`, the kernel
    this process picked (`make_run(None)`), and `native_<isa>` for each of `isas` (`make_run(library)`, the
    library built for it; a build that fails gets its error as the note). `refused`: why `native` does not
    run though a kernel is here (None: it runs)."""
    from nn_blocksparse.cpu.build import NativeBuildError, library_for, native_isa

    runs, notes = {}, {}
    isa = native_isa()
    if isa is None:
        notes["native"] = "no native kernel here (nn_blocksparse.cpu.native_status() says why)"
    elif refused is not None:
        notes["native"] = f"isa={isa}: {refused}"
    else:
        runs["native"] = make_run(None)
        notes["native"] = f"isa={isa}"
    for name in isas:
        try:
            library = library_for(name)
        except NativeBuildError as error:
            notes[f"native_{name}"] = error_note(error, "unsupported")
            continue
        runs[f"native_{name}"] = make_run(library)
        notes[f"native_{name}"] = f"isa={name}"
    return runs, notes


def checked_then_timed(runs: Mapping[str, Callable[[], object]], reference: torch.Tensor, limit: float, case: str,
                       device: torch.device, warmup: int, repeats: int):
    """(`{name: max |diff|}`, `{name: time_ms}`, `{name: why it has no time}`): each of `runs` checked
    against `reference` (a float64 result of the same problem) first, a RuntimeError naming `case` and
    the method where one differs by more than `limit` (a wrong answer is not timed), then all timed
    side by side (`time_side_by_side`), in inference mode."""
    diffs = {}
    with torch.inference_mode():
        for name, run in runs.items():
            diffs[name] = max_abs_diff(run(), reference)
            if not diffs[name] <= limit:
                raise RuntimeError(f"{case}: {name} differs from float64 by {diffs[name]:.3g} > {limit:.3g}: "
                                   "not timing a wrong answer")
        times, errors = time_side_by_side(runs, device, warmup=warmup, repeats=repeats)
    return diffs, times, errors


def time_side_by_side(runs: Mapping[str, Callable[[], object]], device: torch.device, warmup: int = 3,
                      repeats: int = 20, **cuda_options) -> tuple[dict[str, float], dict[str, str]]:
    """(`{name: time_ms}`, `{name: why it has no time}`) of methods compared in one table: timed in turns
    on CPU (`interleaved_median_ms` with one round per repeat: each method's timed call comes right
    after the others', so a drift of the machine's speed, which on shared VMs moves within seconds,
    reaches every method alike), one after another on CUDA (`cuda_options`: `time_ms`'s CUDA
    arguments). A run that raises gets NaN and its error, and is not called again; the others go on."""
    errors: dict[str, str] = {}

    def guarded(name: str, run: Callable[[], object]) -> Callable[[], object]:
        def call():
            if name not in errors:
                try:
                    run()
                except Exception as error:  # noqa: BLE001 - recorded, the other methods still run
                    errors[name] = error_note(error, "failed")
        return call

    calls = {name: guarded(name, run) for name, run in runs.items()}
    if torch.device(device).type == "cuda":
        times = {name: time_ms(call, device, warmup, repeats, **cuda_options) for name, call in calls.items()}
    else:
        times = interleaved_median_ms(calls, warmup=warmup, repeats=repeats, rounds=repeats)
    return {name: math.nan if name in errors else value for name, value in times.items()}, errors


def max_abs_diff(actual: torch.Tensor, reference: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.float() - reference.float()).abs().max().item()


# fp16 operands and outputs with fp32 accumulation: the output's rounding alone is ~3e-4 relative.
FP16_RELATIVE_TOLERANCE = 2e-3
# A kernel's output against a float64 reference, as max |error| over max(1, max |reference|): fp32
# accumulation, so only the rounding of inputs and outputs differs (the tuner's and the kernel
# probe's correctness check).
KERNEL_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-3}


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """||actual - reference|| / ||reference|| (Frobenius, float64): NaN, never small, if any output is NaN."""
    reference = reference.double()
    return ((actual.double() - reference).norm() / reference.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------- CSV
def _format(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else str(value)


def write_csv(path: Path, rows: Iterable[Mapping], columns: Sequence[str], environment: Mapping[str, str]) -> Path:
    """Environment as `# key: value` lines, then header and rows (exactly `columns`, in order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        for key, value in environment.items():
            f.write(f"# {key}: {' '.join(str(value).split())}\n")
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            unknown = set(row) - set(columns)
            if unknown:
                raise KeyError(f"row has columns not in the header: {sorted(unknown)}")
            writer.writerow([_format(row.get(column)) for column in columns])
    return path


def read_csv(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(environment record, rows as dicts of strings) of a CSV written by `write_csv`."""
    lines = Path(path).read_text().splitlines()
    environment = {}
    body_start = 0
    for body_start, line in enumerate(lines):
        if not line.startswith("#"):
            break
        key, _, value = line[1:].strip().partition(":")
        environment[key.strip()] = value.strip()
    return environment, list(csv.DictReader(lines[body_start:]))


def results_path(out_dir: Path, stem: str, device: torch.device, quick: bool, suffix: str = ".csv") -> Path:
    """`<out>/<stem>_<device tag>[_quick]<suffix>`: results of different machines never collide.

    Into the committed results (`DEFAULT_RESULTS_DIR`, the default `--out`) they go one folder per
    device, `benchmarks/results/<device tag>/`, which is how tools/gen_docs.py reads them.
    """
    tag = device_tag(device)
    out = Path(out_dir)
    if out.resolve() == DEFAULT_RESULTS_DIR.resolve():
        out = out / tag
    return out / f"{stem}_{tag}{'_quick' if quick else ''}{suffix}"


# ---------------------------------------------------------------------------------- CLI
def base_parser(description: str, default_threads: int | None = None) -> argparse.ArgumentParser:
    """`--out`, `--quick` and `--threads` (default `default_threads`; None: leave torch's setting)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR,
                        help=f"output folder for CSV and PNG files (default: {DEFAULT_RESULTS_DIR})")
    parser.add_argument("--quick", action="store_true", help="a small CPU run that checks the script works")
    parser.add_argument("--threads", type=int, default=default_threads,
                        help=f"torch.set_num_threads for CPU work (default: {default_threads or 'torch default'})")
    return parser


def resolve_models_and_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace, known_models,
                             full_sizes, quick_sizes, repeats: int, warmup: int) -> None:
    """In place: `args.models` parsed and checked against `known_models` (`--quick`: BERT-base only),
    `args.sizes` as (batch, seq) pairs (default `full_sizes`, `quick_sizes` with `--quick`), and
    `args.repeats` / `args.warmup` defaulted to `repeats` / `warmup` (3 and 1 with `--quick`)."""
    args.models = parse_list(args.models)
    unknown = sorted(set(args.models) - set(known_models))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(known_models)}")
    if args.quick:
        args.models = ["bert-base"]
    args.sizes = ([parse_shape(size) for size in parse_list(args.sizes)] if args.sizes
                  else list(quick_sizes if args.quick else full_sizes))
    args.repeats = args.repeats or (3 if args.quick else repeats)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else warmup)


def add_cuda_graph_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cuda-graph", action="store_true",
                        help="CUDA: time CUDA-graph replays (the kernels' GPU time, no launch overhead); files "
                        "get a '_cudagraph' suffix")


def cuda_missing(device: torch.device, script: str) -> bool:
    """True (after saying so on stderr) when `device` is CUDA and this machine has none."""
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{script}: no CUDA GPU here; run with --quick (CPU smoke run) or --device cpu", file=sys.stderr)
        return True
    return False


def timing_name(cuda_graph: bool) -> str:
    """The `timing` entry of a CSV's environment record."""
    return "cudagraph" if cuda_graph else "eager"


def stem_for(stem: str, cuda_graph: bool) -> str:
    """File stem of a graph-timed run: `<stem>_cudagraph`."""
    return f"{stem}_cudagraph" if cuda_graph else stem


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """`torch.set_num_threads(threads)` inside the block (nothing if None), restored afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def parse_list(text: str, convert=str) -> list:
    return [convert(item) for item in text.split(",") if item.strip()]


def parse_shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


# ---------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_panels(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], path: Path,
                title: str, xlabel: str, ylabel: str, dashed: Iterable[str] = (), log_y: bool = False) -> Path:
    """One panel per key of `panels`, one line per `{label: (xs, ys)}`; labels in `dashed` drawn dashed
    gray (reference lines such as an ideal speedup). A thin black line marks y = 1."""
    plt = _pyplot()
    dashed = set(dashed)
    count = max(len(panels), 1)
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False)
    for ax, (panel_title, lines) in zip(axes.flat, panels.items()):
        for label, (xs, ys) in lines.items():
            style = dict(linestyle="--", color="gray") if label in dashed else dict(marker="o", markersize=3)
            ax.plot(xs, ys, label=label, **style)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, plt)


def grouped_bars(categories: Sequence[str], series: Mapping[str, Sequence[float]], path: Path, title: str,
                 ylabel: str, horizontal_lines: Mapping[str, float] | None = None, max_width: float = 40.0) -> Path:
    """Bars grouped by category (x axis), one color per series; optional labelled horizontal lines.
    The figure widens with the bars, up to `max_width` inches."""
    plt = _pyplot()
    width_inches = min(max_width, max(5.0, 1.6 * len(categories) * max(len(series), 1) / 2))
    fig, ax = plt.subplots(figsize=(width_inches, 4))
    width = 0.8 / max(len(series), 1)
    for index, (label, values) in enumerate(series.items()):
        positions = [c + (index - (len(series) - 1) / 2) * width for c in range(len(categories))]
        bars = ax.bar(positions, [0.0 if math.isnan(v) else v for v in values], width, label=label)
        ax.bar_label(bars, labels=["n/a" if math.isnan(v) else f"{v:.2f}" for v in values], fontsize=6)
    for label, value in (horizontal_lines or {}).items():
        ax.axhline(value, linestyle="--", color="gray", linewidth=0.8)
        ax.annotate(label, (len(categories) - 0.5, value), fontsize=7, ha="right", va="bottom")
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
