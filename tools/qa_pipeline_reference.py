"""Record transformers 4's question-answering pipeline on the seeded MiniLM: the reference of tests/test_qa.py.

    python tools/qa_pipeline_reference.py --python4 /tmp/venv-tf4/bin/python [--out tests/data/qa_pipeline_reference.json]

transformers 5.24 has no question-answering pipeline, so its answers are recorded once with
transformers 4.46 (a venv: `python -m venv --system-site-packages DIR && DIR/bin/pip install
transformers==4.46.3`). This script, run with transformers 5, saves the bundled MiniLM under its
seeded span head (`load_minilm_for_question_answering(0)`) to a temporary folder, then runs
`--python4` on it: that interpreter asks transformers 4's `pipeline("question-answering")` the
cases below and the JSON records cases and answers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from nn_blocksparse.demo import CARD_CONTEXT as CHOPIN_CONTEXT, CARD_QUESTION as CHOPIN_QUESTION  # noqa: E402

DEFAULT_OUT = ROOT / "tests" / "data" / "qa_pipeline_reference.json"

# Longer than one 384-token window (about 1000 tokens), with subwords, digits and punctuation.
LONG_CONTEXT = " ".join(
    f"In {1810 + i}, the composer finished étude no. {i} (opus {10 + i % 7}) in Warsaw-{chr(97 + i % 26)}, "
    f"which critics called {['remarkable', 'unconventional', 'bewildering', 'exquisite'][i % 4]}."
    for i in range(60))
LONG_QUESTION = " ".join(["Which of the many études, written over the years in the various cities he lived in,"] * 4)

CASES = [
    {"question": CHOPIN_QUESTION, "context": CHOPIN_CONTEXT, "options": {}},
    {"question": CHOPIN_QUESTION, "context": CHOPIN_CONTEXT, "options": {"top_k": 5}},
    {"question": CHOPIN_QUESTION, "context": CHOPIN_CONTEXT, "options": {"align_to_words": False, "top_k": 3}},
    {"question": CHOPIN_QUESTION, "context": CHOPIN_CONTEXT, "options": {"max_answer_len": 3, "top_k": 2}},
    # One-token answers: subwords, which align_to_words widens to their words (transformers 4 then
    # lists a word once per subword; QuestionAnswerer once).
    {"question": CHOPIN_QUESTION, "context": CHOPIN_CONTEXT, "options": {"max_answer_len": 1, "top_k": 12}},
    {"question": CHOPIN_QUESTION, "context": CHOPIN_CONTEXT,
     "options": {"max_answer_len": 1, "top_k": 12, "align_to_words": False}},
    {"question": CHOPIN_QUESTION, "context": CHOPIN_CONTEXT, "options": {"handle_impossible_answer": True, "top_k": 3}},
    {"question": "When did he finish the étude?", "context": LONG_CONTEXT, "options": {}},
    {"question": "When did he finish the étude?", "context": LONG_CONTEXT,
     "options": {"max_seq_len": 128, "doc_stride": 48, "top_k": 3}},
    {"question": "Where was it?", "context": LONG_CONTEXT, "options": {"handle_impossible_answer": True}},
    # transformers 4's fast-tokenizer path ignores max_question_len: QuestionAnswerer needs None to match.
    {"question": LONG_QUESTION, "context": LONG_CONTEXT, "options": {"top_k": 2}},
]

DRIVER = """
import json, sys, torch, transformers
from transformers import AutoTokenizer, BertForQuestionAnswering, pipeline
torch.set_num_threads(1)
model_dir, cases = sys.argv[1], json.load(sys.stdin)
qa = pipeline("question-answering", model=BertForQuestionAnswering.from_pretrained(model_dir).eval(),
              tokenizer=AutoTokenizer.from_pretrained(model_dir))
answers = [qa(question=case["question"], context=case["context"], **case["options"]) for case in cases]
json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "answers": answers}, sys.stdout)
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python4", required=True, help="a python with transformers 4 (4.46.3 recorded the reference)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from nn_blocksparse.bert.pruning import load_minilm_for_question_answering, minilm_path

    with tempfile.TemporaryDirectory() as folder:
        load_minilm_for_question_answering(head_seed=0).save_pretrained(folder)
        AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
        run = subprocess.run([args.python4, "-c", DRIVER, folder], input=json.dumps(CASES), capture_output=True,
                             text=True, check=False)
    if run.returncode:
        sys.stderr.write(run.stderr)
        return run.returncode
    recorded = json.loads(run.stdout)
    reference = {"model": "load_minilm_for_question_answering(head_seed=0)",
                 "transformers": recorded["transformers"], "torch": recorded["torch"],
                 "cases": [{**case, "answers": answers} for case, answers in zip(CASES, recorded["answers"])]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(CASES)} cases answered by transformers {recorded['transformers']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
