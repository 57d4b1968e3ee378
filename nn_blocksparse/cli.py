"""`nn-blocksparse`, the command line (also `python -m nn_blocksparse`).

    nn-blocksparse patch SRC DST [--mode hybrid]       a pruned checkpoint folder -> a patched folder
    nn-blocksparse qa MODEL --question Q --context C    answer with a patched or unpatched folder
    nn-blocksparse inspect MODEL [--out sparsity.png]   heads per layer, block density per matrix, a picture
    nn-blocksparse demo [...]                           python -m nn_blocksparse.demo
    nn-blocksparse bench [...]                          python -m benchmarks.run_all (from a source checkout)

A mistake in what it is given (a missing folder, a config that is not BERT, a model without a
question-answering head, bad options) ends with one line on stderr and exit status 1; `--debug`
before the command shows the traceback instead. transformers, the model and matplotlib are loaded
only by the command that needs them, so `--help` is quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .dtypes import DTYPE_NAMES, dtype_from_name

PROG = "nn-blocksparse"
PASS_THROUGH = ("demo", "bench")  # their arguments, --help included, go to the wrapped script
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
PATCH_FILE = "patch.json"  # bert.patched_checkpoint.PATCH_FILE; tests/test_cli.py checks they agree


class CommandError(Exception):
    """A mistake in the command's input, reported as one line."""


# ---------------------------------------------------------------------------------- model folders
def model_folder(path: str) -> tuple[Path, dict]:
    """The folder and its parsed config.json, once it is known to be a BERT model folder."""
    folder = Path(path)
    if not folder.exists():
        raise CommandError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CommandError(f"{folder} is not a folder (a model is a folder with config.json and its weights)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CommandError(f"{folder} has no config.json: not a transformers model folder")
    config = _read_json(config_file)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "bert":
        raise CommandError(f"{config_file} is for model_type {model_type!r}, not a BERT (model_type 'bert'): "
                           f"{PROG} works on BERT models only")
    return folder, config


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CommandError(f"{path} is not valid JSON ({error})") from error


def is_patched(folder: Path) -> bool:
    return (folder / PATCH_FILE).is_file()


def model_class_name(folder: Path, config: dict) -> str:
    """The class a folder holds: patch.json's for a patched model, else config.json's architecture."""
    if is_patched(folder):
        patch = _read_json(folder / PATCH_FILE)
        return str(patch.get("model_class")) if isinstance(patch, dict) else "?"
    architectures = config.get("architectures") or ["BertModel"]
    return str(architectures[0])


def task_of(class_name: str) -> str:
    """load_pruned_bert's task for a class name, or a clear error for a class it cannot build."""
    from .bert.pruned_checkpoint import TASK_TO_MODEL_CLASS

    for task, model_class in TASK_TO_MODEL_CLASS.items():
        if model_class.__name__ == class_name:
            return task
    raise CommandError(f"config.json names {class_name}, which {PROG} cannot build; "
                       f"give --task (one of {', '.join(TASK_TO_MODEL_CLASS)})")


def check_question_answering_head(folder: Path, config: dict) -> None:
    """Refuse, before loading anything, a folder whose model has no span (qa_outputs) head."""
    class_name = model_class_name(folder, config)
    if is_patched(folder):
        has_head = class_name.endswith("ForQuestionAnswering")
    else:
        from .bert.checkpoint_files import weight_names

        names = weight_names(folder)
        # A pytorch_model.bin is not read twice: the loader's strict check names a missing head.
        has_head = True if names is None else any(name.endswith("qa_outputs.weight") for name in names)
    if not has_head:
        raise CommandError(f"{folder} holds a {class_name} without a question-answering head (qa_outputs): "
                           "`qa` needs a *ForQuestionAnswering model")


def load_model(folder: Path, task: str, device: str | None = None, dtype=None):
    """A patched folder through load_patched_bert, any other BERT folder through load_pruned_bert."""
    from .bert import load_patched_bert, load_pruned_bert

    if is_patched(folder):
        try:
            model = load_patched_bert(folder)
        except KeyError as error:
            raise CommandError(f"{folder / PATCH_FILE} has no {error}: damaged, or not written by "
                               "save_patched_bert") from error
    else:
        model = load_pruned_bert(folder, task=task)
    return model.to(device=device, dtype=dtype)


def load_tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CommandError(f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): give one with --tokenizer DIR")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def device_of(text: str | None) -> str:
    """--device checked (default: cuda if there is one, else cpu)."""
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise CommandError(f"--device {text!r} is not a device ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {text}: this machine has no CUDA GPU")
    return str(device)


# ---------------------------------------------------------------------------------- commands
def run_patch(args) -> int:
    from .bert import heads_per_layer, patch_bert, save_patched_bert
    from .linear import BlockSparseLinear

    source, config = model_folder(args.src)
    if is_patched(source):
        raise CommandError(f"{source} is already patched ({PATCH_FILE}); patch the original checkpoint")
    target = Path(args.dst)
    if target.exists() and target.resolve() == source.resolve():
        raise CommandError("DST must be another folder than SRC")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not args.overwrite:
        raise CommandError(f"{target} exists and is not an empty folder; give --overwrite to write the model into it")
    task = task_of(model_class_name(source, config)) if args.task == "auto" else args.task
    device = device_of(args.device)
    model = load_model(source, task, device, dtype_from_name(args.dtype))
    patch_bert(model, mode=args.mode, block_size=args.block_size, dense_threshold=args.dense_threshold)
    save_patched_bert(model, target)
    if any((source / name).is_file() for name in TOKENIZER_FILES):
        load_tokenizer(source).save_pretrained(str(target))
        tokenizer_note = "with its tokenizer"
    else:
        tokenizer_note = "without a tokenizer (SRC has none; give qa --tokenizer DIR)"
    sparse = sum(isinstance(module, BlockSparseLinear) for module in model.modules())
    print(f"patched {source} ({type(model).__name__}, {args.mode}, {args.dtype} on {device}): "
          f"heads per layer {heads_per_layer(model)}, {sparse} block-sparse matrices")
    print(f"saved to {target} {tokenizer_note}")
    return 0


def run_qa(args) -> int:
    from .qa import QuestionAnswerer

    folder, config = model_folder(args.model)
    check_question_answering_head(folder, config)
    tokenizer = load_tokenizer(Path(args.tokenizer) if args.tokenizer else folder)
    context = args.context
    if args.context_file is not None:
        try:
            context = Path(args.context_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CommandError(f"cannot read --context-file {args.context_file}: {error}") from error
    options = {"top_k": args.top_k, "max_answer_len": args.max_answer_len, "max_seq_len": args.max_seq_len,
               "doc_stride": args.doc_stride, "max_question_len": args.max_question_len or None,
               "handle_impossible_answer": args.handle_impossible_answer, "align_to_words": args.align_to_words}
    model = load_model(folder, "question-answering", device_of(args.device)).eval()
    answers = QuestionAnswerer(model, tokenizer, **options)(question=args.question, context=context)
    if args.json:
        print(json.dumps(answers, ensure_ascii=False))
        return 0
    for rank, answer in enumerate(answers if isinstance(answers, list) else [answers], start=1):
        text = answer["answer"] if answer["answer"] else "(no answer)"
        prefix = f"{rank}. " if isinstance(answers, list) else ""
        print(f"{prefix}{text}\n{' ' * len(prefix)}(score {answer['score']:.4f}, "
              f"characters {answer['start']}-{answer['end']} of the context)")
    return 0


def run_inspect(args) -> int:
    from .bert import heads_per_layer
    from .bert.sparsity import matrix_layouts, plot_sparsity

    folder, config = model_folder(args.model)
    model = load_model(folder, "base")
    heads = heads_per_layer(model)
    heads_before = int(config.get("num_attention_heads", max(heads)))
    layouts = matrix_layouts(model, args.block_size)
    state = f"patched ({model.nn_blocksparse_mode})" if is_patched(folder) else "not patched"
    print(f"{folder}: {model_class_name(folder, config)}, {len(heads)} layers, {state}")
    print(f"heads kept per layer: {' '.join(map(str, heads))}  ({sum(heads)} of {heads_before * len(heads)})")
    print("block density per matrix (fraction of blocks holding a nonzero):")
    print(f"{'layer':>5}  {'matrix':<17} {'shape':>11}  {'block':>5}  {'density':>7}  stored as")
    for layout in layouts:
        density = "-" if layout.density is None else f"{layout.density:.3f}"
        shape = f"{layout.shape[0]}x{layout.shape[1]}"
        print(f"{layout.layer:>5}  {layout.name:<17} {shape:>11}  {layout.block_size:>5}  {density:>7}  "
              f"{'block-sparse' if layout.block_sparse else 'dense'}")
    if args.out:
        path = plot_sparsity(layouts, heads, heads_before, args.out, title=folder.name)
        print(f"picture: {path}")
    return 0


def run_demo(argv: list[str]) -> int:
    from .demo import main as demo_main

    return demo_main(argv, prog=f"{PROG} demo")


def run_bench(argv: list[str]) -> int:
    # The benchmarks are scripts of the source checkout, not part of the installed package.
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "benchmarks" / "run_all.py").is_file():
        raise CommandError("the benchmarks live in the source checkout (benchmarks/), not in the installed "
                           "package: install it editable (pip install -e .) or run ./run.sh bench there")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from benchmarks import run_all

    return run_all.main(argv)


# ---------------------------------------------------------------------------------- arguments
def _dense_threshold(text: str):
    if text in ("auto", "measure"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, measure or a block density, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from .bert.patching import MODES

    parser = argparse.ArgumentParser(prog=PROG, description="block-sparse kernels for pruned BERT: patch a model, "
                                     "ask it questions, look at its sparsity")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    patch = commands.add_parser("patch", help="patch a pruned BERT checkpoint folder and save it (no pickle)",
                                description="Load a pruned BERT folder (nn_pruning / transformers 4 format, or a "
                                "plain transformers folder), patch it onto the block-sparse kernels and save it "
                                "with save_patched_bert (config.json, patch.json, model.safetensors) plus its "
                                "tokenizer. Patch on the device and in the dtype it will serve in: hybrid decides "
                                "there which matrices pay as block-sparse.")
    patch.add_argument("src", metavar="SRC", help="pruned checkpoint folder")
    patch.add_argument("dst", metavar="DST", help="folder to write the patched model to")
    patch.add_argument("--mode", choices=MODES, default="hybrid", help="default: %(default)s")
    patch.add_argument("--block-size", type=int, default=32, help="default: %(default)s")
    patch.add_argument("--dense-threshold", type=_dense_threshold, default="auto",
                       help="hybrid: auto, measure, or the block density above which a matrix stays dense "
                       "(default: %(default)s)")
    patch.add_argument("--task", default="auto", help="load_pruned_bert task (default: from config.json's "
                       "architectures): base, question-answering, sequence-classification, token-classification, "
                       "masked-lm")
    patch.add_argument("--device", help="default: cuda if available, else cpu")
    patch.add_argument("--dtype", choices=DTYPE_NAMES.values(), default="fp32", help="default: %(default)s")
    patch.add_argument("--overwrite", action="store_true", help="write into a DST that is not empty")
    patch.set_defaults(run=run_patch)

    qa = commands.add_parser("qa", help="answer a question about a context with a QA model folder",
                             description="Answer a question with a BERT *ForQuestionAnswering folder, patched or "
                             "not, the way transformers 4's question-answering pipeline did (docs/qa.md).")
    qa.add_argument("model", metavar="MODEL", help="model folder (patched or not), with its tokenizer")
    qa.add_argument("--question", required=True)
    context = qa.add_mutually_exclusive_group(required=True)
    context.add_argument("--context", help="the text to find the answer in")
    context.add_argument("--context-file", help="read the context from this UTF-8 file")
    qa.add_argument("--tokenizer", help="tokenizer folder (default: MODEL)")
    qa.add_argument("--top-k", type=int, default=1, help="answers to print, best first (default: %(default)s)")
    qa.add_argument("--max-answer-len", type=int, default=15, help="in tokens (default: %(default)s)")
    qa.add_argument("--max-seq-len", type=int, help="tokens per window (default: 384 or what the model allows)")
    qa.add_argument("--doc-stride", type=int, help="overlap of windows in tokens (default: min(128, max-seq-len/2))")
    qa.add_argument("--max-question-len", type=int, default=64,
                    help="longer questions are refused; 0: no limit (default: %(default)s)")
    qa.add_argument("--handle-impossible-answer", action="store_true", help="allow the empty answer")
    qa.add_argument("--no-align-to-words", dest="align_to_words", action="store_false",
                    help="cut answers at token offsets instead of widening them to whole words")
    qa.add_argument("--device", help="default: cuda if available, else cpu")
    qa.add_argument("--json", action="store_true", help="print the result as JSON")
    qa.set_defaults(run=run_qa)

    inspect = commands.add_parser("inspect", help="heads per layer and block density per matrix, as text and a PNG",
                                  description="Print the heads each layer keeps and the block density of every "
                                  "matrix of a BERT folder (patched or not); with --out, draw every matrix's block "
                                  "layout and the heads per layer in one PNG.")
    inspect.add_argument("model", metavar="MODEL", help="model folder (patched or not)")
    inspect.add_argument("--out", help="write the picture to this PNG file")
    inspect.add_argument("--block-size", type=int, default=32,
                         help="block grid for dense matrices (block-sparse ones use their own; default: %(default)s)")
    inspect.set_defaults(run=run_inspect)

    commands.add_parser("demo", add_help=False, help="prune, patch, check, time and question the bundled MiniLM "
                        "(its arguments: nn-blocksparse demo --help)")
    commands.add_parser("bench", add_help=False, help="run the benchmarks this machine can run, from a source "
                        "checkout (its arguments: nn-blocksparse bench --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"
    try:
        if len(argv) > debug and argv[debug] in PASS_THROUGH:
            command, rest = argv[debug], argv[debug + 1:]
            return run_demo(rest) if command == "demo" else run_bench(rest)
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (CommandError, ValueError, TypeError, OSError) as error:
        if debug:
            raise
        return _report(error)
    except Exception as error:  # safetensors' error for a corrupted weights file has no common base
        if debug or type(error).__name__ != "SafetensorError":
            raise
        return _report(error)


def _report(error: Exception) -> int:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    print(f"{PROG}: error: {'; '.join(lines)}", file=sys.stderr)
    return 1
