"""The `nn-blocksparse` command on a tiny saved BERT: patch, qa, inspect, --help, and the errors.

`patch` then `qa` run in subprocesses (`python -m nn_blocksparse`, as a user would); the rest runs
`cli.main` in-process (the same code, without paying an interpreter start for each case).
The answers printed are checked against `QuestionAnswerer` on the model the folder was saved from.
"""

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nn_blocksparse import cli  # noqa: E402
from nn_blocksparse.bert import save_pruned_bert  # noqa: E402
from nn_blocksparse.qa import QuestionAnswerer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["who", "is", "chopin", "was", "a", "polish", "composer", "and", "pianist", "born", "in", "the", "of",
         "romantic", "era", "he", "wrote", "for", "solo", "piano", "?", ",", ".", "(", ")", "-"]
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *CHARACTERS, *(f"##{c}" for c in CHARACTERS)]
QUESTION = "Who is Chopin?"
CONTEXT = ("Chopin, born in 1810, was a Polish composer and pianist of the Romantic era "
           "who wrote for solo piano.")
HIDDEN, HEAD_DIM = 64, 32


def _tiny_model(seed: int, head: bool = True):
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=2,
                                     num_attention_heads=HIDDEN // HEAD_DIM, intermediate_size=128,
                                     max_position_embeddings=128)
    torch.manual_seed(seed)
    model = (transformers.BertForQuestionAnswering if head else transformers.BertModel)(config).eval()
    if not head:
        return model
    with torch.no_grad():
        # Pruned the nn_pruning way: head 1 of layer 0 removed, a 32x32 block of layer 1's query zero.
        attention = model.bert.encoder.layer[0].attention
        for projection in (attention.self.query, attention.self.key, attention.self.value):
            projection.weight[HEAD_DIM:] = 0
        attention.output.dense.weight[:, HEAD_DIM:] = 0
        model.bert.encoder.layer[1].attention.self.query.weight[:32, 32:] = 0
        # Logits of a few units (a trained head's spread), so the best span stands clear of the next.
        model.qa_outputs.weight.normal_(0, 8 / HIDDEN**0.5)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"pruned": nn_pruning-format QA checkpoint, "encoder": a BertModel folder, ...}, and the QA model."""
    root = tmp_path_factory.mktemp("cli")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    # From the folder: transformers 5 ignores a vocab_file= argument (every token would be [UNK]).
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(root))
    assert tokenizer.unk_token not in tokenizer.tokenize(f"{QUESTION} {CONTEXT}")
    model = _tiny_model(seed=0)
    save_pruned_bert(model, root / "pruned")  # head 1 of layer 0 physically removed, pruned_heads in config.json
    tokenizer.save_pretrained(root / "pruned")
    encoder = _tiny_model(seed=1, head=False)
    encoder.save_pretrained(root / "encoder")
    tokenizer.save_pretrained(root / "encoder")
    (root / "gpt2").mkdir()
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(root / "gpt2")
    return {"root": root, "pruned": root / "pruned", "encoder": root / "encoder", "gpt2": root / "gpt2",
            "model": model, "tokenizer": tokenizer}


def run_cli(*args, timeout=300):
    """`python -m nn_blocksparse ARGS` with this worktree's package: (exit status, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "nn_blocksparse", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    return done.returncode, done.stdout, done.stderr


def expected_answers(folders, top_k=1):
    qa = QuestionAnswerer(folders["model"], folders["tokenizer"], top_k=top_k)
    answers = qa(question=QUESTION, context=CONTEXT)
    ranked = answers if isinstance(answers, list) else [answers]
    assert len(ranked) < 2 or ranked[0]["score"] - ranked[1]["score"] > 1e-3  # a clear best answer
    return answers


def assert_same(printed, expected):
    for ours, theirs in zip(printed if isinstance(printed, list) else [printed],
                            expected if isinstance(expected, list) else [expected]):
        assert (ours["start"], ours["end"], ours["answer"]) == (theirs["start"], theirs["end"], theirs["answer"])
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)


def assert_one_line_error(status, stderr, match):
    assert status == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("nn-blocksparse: error: ") and re.search(match, lines[0]), lines[0]


def is_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------ as a user runs it, in subprocesses
def test_patch_then_ask_the_patched_folder(folders):
    patched = folders["root"] / "patched"
    status, out, err = run_cli("patch", folders["pruned"], patched, "--mode", "hybrid", "--device", "cpu")
    assert status == 0, err
    assert "heads per layer [1, 2]" in out and "with its tokenizer" in out
    assert {"config.json", "patch.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in patched.iterdir()}
    assert not list(patched.glob("*.bin")) and not list(patched.glob("*.pt"))  # no pickle

    status, out, err = run_cli("qa", patched, "--question", QUESTION, "--context", CONTEXT, "--top-k", "2", "--json")
    assert status == 0, err
    assert_same(json.loads(out), expected_answers(folders, top_k=2))


# ------------------------------------------------------------------ in-process: answers, errors, help
def call(capsys, *args):
    status = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_qa_on_the_unpatched_checkpoint(folders, capsys):
    status, out, err = call(capsys, "qa", folders["pruned"], "--question", QUESTION, "--context", CONTEXT, "--json")
    assert status == 0, err
    assert_same(json.loads(out), expected_answers(folders))
    context_file = folders["root"] / "context.txt"
    context_file.write_text(CONTEXT, encoding="utf-8")
    status, out, err = call(capsys, "qa", folders["pruned"], "--question", QUESTION, "--context-file", context_file)
    expected = expected_answers(folders)
    assert status == 0 and out.splitlines()[0] == expected["answer"]
    assert f"characters {expected['start']}-{expected['end']}" in out


def test_demo_on_a_head_pruned_checkpoint(folders, capsys):
    """`demo --model-path` reads a checkpoint whose heads were removed (smaller tensors, pruned_heads in
    config.json) and patches it as it is; the demo itself checks every patched model's outputs and
    answers against the unpatched one and exits 1 if they differ."""
    status, out, err = call(capsys, "demo", "--model-path", folders["pruned"], "--device", "cpu", "--dtype", "fp32",
                            "--repeats", "1", "--batch", "2", "--seq", "16")
    assert status == 0, out + err
    assert "already pruned: 1 of 2 layers resized, 3 heads left; patched as it is" in out
    assert "its own span head" in out and "the same answer from every model" in out


def test_question_answering_loader_reads_head_pruned_checkpoints(folders, tmp_path):
    """`load_bert_for_question_answering` on head-pruned folders: with a span head, the logits of the
    model the folder was saved from; without one (an encoder), its encoder outputs under a seeded head."""
    from nn_blocksparse.bert import load_bert_for_question_answering

    inputs = folders["tokenizer"](QUESTION, CONTEXT, return_tensors="pt")
    original = folders["model"]
    loaded, drawn = load_bert_for_question_answering(folders["pruned"])
    assert not drawn and loaded.bert.encoder.layer[0].attention.self.query.out_features == HEAD_DIM
    with torch.no_grad():
        expected, got = original(**inputs), loaded(**inputs)
    torch.testing.assert_close(got.start_logits, expected.start_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.end_logits, expected.end_logits, rtol=0, atol=1e-5)

    save_pruned_bert(original.bert, tmp_path / "encoder")  # the encoder alone: no qa_outputs
    first, drawn = load_bert_for_question_answering(tmp_path / "encoder", head_seed=3)
    second, _ = load_bert_for_question_answering(tmp_path / "encoder", head_seed=3)
    assert drawn and first.bert.encoder.layer[0].attention.self.query.out_features == HEAD_DIM
    with torch.no_grad():
        torch.testing.assert_close(first.bert(**inputs).last_hidden_state,
                                   original.bert(**inputs).last_hidden_state, rtol=0, atol=1e-5)
        assert torch.equal(first(**inputs).start_logits, second(**inputs).start_logits)
    assert first.qa_outputs.weight.abs().sum() > 0 and torch.equal(first.qa_outputs.bias, torch.zeros(2))


def test_inspect_an_unpatched_checkpoint_and_patch_in_other_modes(folders, capsys):
    status, out, err = call(capsys, "inspect", folders["pruned"])
    assert status == 0, err
    assert "not patched" in out and "heads kept per layer: 1 2" in out and "block-sparse" not in out
    target = folders["root"] / "blocksparse"
    status, out, err = call(capsys, "patch", folders["pruned"], target, "--mode", "blocksparse", "--device", "cpu")
    assert status == 0, err
    status, out, err = call(capsys, "inspect", target)
    assert status == 0 and out.count("block-sparse") == 12  # every matrix of both layers
    status, out, err = call(capsys, "qa", target, "--question", QUESTION, "--context", CONTEXT, "--json")
    assert status == 0, err
    assert_same(json.loads(out), expected_answers(folders))


def test_errors_name_the_problem(folders, capsys, tmp_path):
    missing = tmp_path / "missing"
    question = ["--question", QUESTION, "--context", CONTEXT]
    cases = [
        (["qa", missing, *question], "no such folder"),
        (["patch", missing, tmp_path / "out"], "no such folder"),
        (["inspect", missing], "no such folder"),
        (["inspect", folders["pruned"] / "config.json"], "is not a folder"),
        (["inspect", tmp_path], "has no config.json"),
        (["qa", folders["gpt2"], *question], "model_type 'gpt2', not a BERT"),
        (["patch", folders["gpt2"], tmp_path / "out"], "model_type 'gpt2', not a BERT"),
        (["inspect", folders["gpt2"]], "model_type 'gpt2', not a BERT"),
        (["qa", folders["encoder"], *question], "BertModel without a question-answering head"),
        (["qa", folders["pruned"], "--question", "", "--context", CONTEXT], "question cannot be empty"),
        (["qa", folders["pruned"], "--question", QUESTION, "--context", "   "], "context has no tokens"),
        (["qa", folders["pruned"], *question, "--top-k", "0"], "top_k must be an int >= 1"),
        (["qa", folders["pruned"], *question, "--device", "gpu"], "'gpu' is not a device"),
        (["patch", folders["pruned"], folders["encoder"]], "exists and is not an empty folder"),
        (["patch", folders["pruned"], tmp_path / "out", "--mode", "blocksparse", "--block-size", "48"],
         "block_size must be one of"),
    ]
    if not torch.cuda.is_available():
        cases.append((["patch", folders["pruned"], tmp_path / "out", "--device", "cuda"], "no CUDA GPU"))
    for args, match in cases:
        status, _, err = call(capsys, *args)
        assert_one_line_error(status, err, match)
    assert not (tmp_path / "out").exists()

    corrupted = tmp_path / "corrupted"
    corrupted.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (corrupted / name).write_bytes((folders["pruned"] / name).read_bytes())
    (corrupted / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    status, _, err = call(capsys, "qa", corrupted, *question)
    assert_one_line_error(status, err, "(?i)header|deserializ")

    patched = tmp_path / "patched"
    assert call(capsys, "patch", folders["pruned"], patched, "--device", "cpu")[0] == 0
    status, _, err = call(capsys, "patch", patched, tmp_path / "twice")
    assert_one_line_error(status, err, "already patched")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "patch.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((patched / name).read_bytes())
    status, _, err = call(capsys, "qa", no_tokenizer, *question)
    assert_one_line_error(status, err, "has no tokenizer")
    status, out, err = call(capsys, "qa", no_tokenizer, *question, "--tokenizer", folders["pruned"])
    assert status == 0 and out.splitlines()[0] == expected_answers(folders)["answer"]


def test_inspect_draws_every_matrix_and_the_heads(folders, capsys):
    patched = folders["root"] / "hybrid"
    assert call(capsys, "patch", folders["pruned"], patched, "--mode", "hybrid", "--device", "cpu")[0] == 0
    picture = folders["root"] / "sparsity.png"
    status, out, err = call(capsys, "inspect", patched, "--out", picture)
    assert status == 0, err
    assert "heads kept per layer: 1 2  (3 of 4)" in out and "patched (hybrid)" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+(query|key|value|attention_output|ffn)", line)]
    assert len(rows) == 2 * 6
    layer1_query = next(row for row in rows if row[:2] == ["1", "query"])
    assert layer1_query[2:5] == ["64x64", "32", "0.750"]  # one of its four 32x32 blocks is zero
    layer0_query = next(row for row in rows if row[:2] == ["0", "query"])
    assert layer0_query[2] == "32x64"  # the removed head is gone
    width, height = is_png(picture)
    assert 400 <= width <= 3000 and 400 <= height <= 3000 and picture.stat().st_size > 10_000
    from matplotlib.image import imread

    pixels = imread(str(picture))
    assert pixels.shape[:2] == (height, width)
    dark = (pixels[..., :3].mean(axis=2) < 0.3).mean()
    assert 0.01 < dark < 0.5  # kept blocks are drawn, the page is not blank


@pytest.mark.parametrize("command", [[], ["patch"], ["qa"], ["inspect"], ["demo"], ["bench"]])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_status:
        cli.main([*command, "--help"])
    assert exit_status.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    if command in (["demo"], ["bench"]):  # the wrapped script's own options
        assert "--device" in out if command == ["demo"] else "--dry-run" in out
    else:
        assert f"usage: nn-blocksparse {' '.join(command)}".rstrip() in out
    if not command:
        assert all(name in out for name in ("patch", "qa", "inspect", "demo", "bench"))


def test_console_script_entry_point():
    """setup.py declares `nn-blocksparse`, and it names cli.main."""
    match = re.search(r'"nn-blocksparse = ([\w.]+):(\w+)"', (ROOT / "setup.py").read_text())
    assert match
    module = __import__(match.group(1), fromlist=[match.group(2)])
    assert getattr(module, match.group(2)) is cli.main


def test_the_command_names_the_patch_file_as_the_library_writes_it():
    from nn_blocksparse import cli
    from nn_blocksparse.bert import patched_checkpoint

    assert cli.PATCH_FILE == patched_checkpoint.PATCH_FILE
