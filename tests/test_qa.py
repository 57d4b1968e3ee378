"""QuestionAnswerer against two independent references: transformers 4's pipeline and a brute force.

- `tests/data/qa_pipeline_reference.json`: what transformers 4.46's `pipeline("question-answering")`
  answered on the real MiniLM under its seeded span head (recorded by tools/qa_pipeline_reference.py,
  as transformers 5.24 has no such pipeline);
- `brute_force`: windows built by hand from a standalone tokenisation of the context, each run
  through the model on its own, every span scored with explicit loops from the raw logits.
Patched models (resize, blocksparse, hybrid) must give the unpatched pruned model's answers.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nn_blocksparse.bert import load_minilm_for_question_answering, minilm_path, patch_bert, prune_like_nn_pruning  # noqa: E402
from nn_blocksparse.demo import CARD_CONTEXT, CARD_QUESTION  # noqa: E402
from nn_blocksparse.qa import QuestionAnswerer  # noqa: E402

from helpers import requires_cuda  # noqa: E402

REFERENCE = json.loads((Path(__file__).parent / "data" / "qa_pipeline_reference.json").read_text(encoding="utf-8"))
SCORE_TOLERANCE = 1e-5  # fp32 logits, other summation orders (batched and padded windows, patched kernels)
FILLER = " ".join(f"Sentence {i} is about the weather in a quiet village near the river." for i in range(40))
NEEDLE = "Chopin studied at the Warsaw Conservatory in 1826."
LONG_CONTEXT = f"{FILLER} {NEEDLE} {FILLER[:300]}"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_intra_op_thread):
    yield


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def minilm_qa():
    return load_minilm_for_question_answering(head_seed=0)


class BoostedLogits(torch.nn.Module):
    """The real model's logits plus `boost` where the input is a given token (or at position 0, [CLS]).

    Places the best answer where a test wants it while every other logit stays the model's.
    """

    def __init__(self, model, start_token=None, end_token=None, boost=12.0, cls_boost=0.0):
        super().__init__()
        self.model, self.start_token, self.end_token = model, start_token, end_token
        self.boost, self.cls_boost = boost, cls_boost

    def forward(self, input_ids, **inputs):
        output = self.model(input_ids=input_ids, **inputs)
        start, end = output.start_logits.clone(), output.end_logits.clone()
        for logits, token in ((start, self.start_token), (end, self.end_token)):
            if token is not None:
                logits += self.boost * (input_ids == token)
            logits[:, 0] += self.cls_boost
        return transformers.modeling_outputs.QuestionAnsweringModelOutput(start_logits=start, end_logits=end)


def brute_force(model, tokenizer, question, context, max_seq_len=384, doc_stride=128, max_answer_len=15):
    """Every span of every window, best first, as (score, start char, end char, window); and the null score.

    Windows hold `max_seq_len - question - 3` context tokens and start `doc_stride` tokens before
    the previous one ends; each runs alone; p = softmax over [CLS] and the context tokens.
    """
    question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    context_tokens = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = context_tokens["input_ids"], context_tokens["offset_mapping"]
    room = max_seq_len - len(question_ids) - 3
    windows, first = [], 0
    while True:
        windows.append(list(range(first, min(first + room, len(ids)))))
        if first + room >= len(ids):
            break
        first += room - doc_stride
    spans, nulls = [], []
    for number, window in enumerate(windows):
        input_ids = [tokenizer.cls_token_id, *question_ids, tokenizer.sep_token_id, *(ids[i] for i in window),
                     tokenizer.sep_token_id]
        token_types = [0] * (len(question_ids) + 2) + [1] * (len(window) + 1)
        with torch.no_grad():
            output = model(input_ids=torch.tensor([input_ids]), token_type_ids=torch.tensor([token_types]),
                           attention_mask=torch.ones(1, len(input_ids), dtype=torch.long))
        start, end = output.start_logits[0].double().tolist(), output.end_logits[0].double().tolist()
        first_context = len(question_ids) + 2
        allowed = [0, *range(first_context, first_context + len(window))]
        start_norm = math.fsum(math.exp(start[p]) for p in allowed)
        end_norm = math.fsum(math.exp(end[p]) for p in allowed)
        nulls.append(math.exp(start[0]) / start_norm * math.exp(end[0]) / end_norm)
        for i, token_i in enumerate(window):
            for j in range(i, min(i + max_answer_len, len(window))):
                score = math.exp(start[first_context + i]) / start_norm * math.exp(end[first_context + j]) / end_norm
                spans.append((score, offsets[token_i][0], offsets[window[j]][1], number))
    spans.sort(key=lambda span: -span[0])
    return spans, min(nulls), windows, offsets


def distinct(spans, k):
    """The k best spans with distinct character ranges."""
    seen, best = set(), []
    for span in spans:
        if span[1:3] not in seen:
            seen.add(span[1:3])
            best.append(span)
        if len(best) == k:
            break
    return best


def as_list(result):
    return result if isinstance(result, list) else [result]


def assert_same_answers(ours, theirs, tolerance=SCORE_TOLERANCE):
    """Same texts at the same places, scores within `tolerance`."""
    ours, theirs = as_list(ours), as_list(theirs)
    assert [(a["start"], a["end"], a["answer"]) for a in ours] == [(a["start"], a["end"], a["answer"]) for a in theirs]
    assert [a["score"] for a in ours] == pytest.approx([a["score"] for a in theirs], abs=tolerance)


# ------------------------------------------------------------------ transformers 4's pipeline
def _deduplicated(answers):
    seen, kept = set(), []
    for answer in answers:
        if (answer["start"], answer["end"]) not in seen:
            seen.add((answer["start"], answer["end"]))
            kept.append(answer)
    return kept


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda case: json.dumps(case["options"]))
def test_matches_transformers4_pipeline(minilm_qa, tokenizer, case):
    options = dict(case["options"])
    if len(tokenizer(case["question"], add_special_tokens=False)["input_ids"]) > 64:
        options["max_question_len"] = None  # transformers 4's fast path ignored the limit; we refuse by default
    ours = QuestionAnswerer(minilm_qa, tokenizer)(question=case["question"], context=case["context"], **options)
    expected = case["answers"]
    assert isinstance(ours, list) == isinstance(expected, list)
    # transformers 4 lists a text once per token span that gives it (two subwords of one word);
    # we list each text once, so ours go on with the next distinct answers.
    expected = _deduplicated(as_list(expected))
    ours = as_list(ours)
    assert len(ours) == case["options"].get("top_k", 1)
    for mine, theirs in zip(ours, expected):
        assert (mine["start"], mine["end"], mine["answer"]) == (theirs["start"], theirs["end"], theirs["answer"])
        assert mine["score"] == pytest.approx(theirs["score"], abs=SCORE_TOLERANCE)


def test_reference_exercises_windows_subwords_and_duplicates(tokenizer):
    """The recorded cases cover what they are meant to (so the comparison above can fail)."""
    long_cases = [case for case in REFERENCE["cases"] if len(tokenizer(case["context"])["input_ids"]) > 384]
    assert len(long_cases) >= 3
    windowed = [case for case in long_cases if case["options"].get("max_seq_len") == 128]
    starts = {answer["start"] for answer in windowed[0]["answers"]}
    assert max(starts) > 3000 and min(starts) < 1000  # answers from far-apart windows in one ranking
    assert any(len(_deduplicated(case["answers"])) < len(case["answers"])
               for case in REFERENCE["cases"] if isinstance(case["answers"], list))
    aligned, unaligned = [case["answers"] for case in REFERENCE["cases"] if case["options"].get("max_answer_len") == 1]
    assert [a["answer"] for a in aligned] != [a["answer"] for a in unaligned]


# ------------------------------------------------------------------ patched models
@pytest.fixture(scope="module")
def pruned_minilm_qa():
    model = load_minilm_for_question_answering(head_seed=0)
    prune_like_nn_pruning(model, seed=0)
    return model


def test_answers_identical_across_modes(pruned_minilm_qa, tokenizer):
    examples = [{"question": CARD_QUESTION, "context": CARD_CONTEXT},
                {"question": "Where did Chopin study?", "context": LONG_CONTEXT}]
    reference = QuestionAnswerer(pruned_minilm_qa, tokenizer, top_k=3)(examples)
    for answers in reference:  # the best answer stands clear of the next: a change would show
        assert answers[0]["score"] - answers[1]["score"] > 1e-3
    for mode in ("resize", "blocksparse", "hybrid"):
        patched = patch_bert(copy.deepcopy(pruned_minilm_qa), mode=mode)
        answers = QuestionAnswerer(patched, tokenizer, top_k=3)(examples)
        for ours, theirs in zip(answers, reference):
            assert_same_answers(ours, theirs)


@requires_cuda
def test_patched_model_on_the_gpu(pruned_minilm_qa, tokenizer):
    reference = QuestionAnswerer(pruned_minilm_qa, tokenizer, top_k=2)(question=CARD_QUESTION, context=CARD_CONTEXT)
    patched = patch_bert(copy.deepcopy(pruned_minilm_qa).cuda(), mode="hybrid")
    answers = QuestionAnswerer(patched, tokenizer, top_k=2)(question=CARD_QUESTION, context=CARD_CONTEXT)
    assert_same_answers(answers, reference, tolerance=1e-4)


# ------------------------------------------------------------------ windows, top_k, impossible answers
def test_long_context_answered_from_a_later_window(minilm_qa, tokenizer):
    boosted = BoostedLogits(minilm_qa, tokenizer.convert_tokens_to_ids("warsaw"),
                            tokenizer.convert_tokens_to_ids("conservatory")).eval()
    question = "Where did Chopin study?"
    spans, _, windows, offsets = brute_force(boosted, tokenizer, question, LONG_CONTEXT)
    needle = LONG_CONTEXT.index("Warsaw Conservatory")
    assert len(windows) >= 3 and offsets[windows[0][-1]][1] < needle  # the answer is not in the first window
    score, start, end, window = spans[0]
    assert LONG_CONTEXT[start:end] == "Warsaw Conservatory" and window > 0
    answer = QuestionAnswerer(boosted, tokenizer, batch_size=2)(question=question, context=LONG_CONTEXT)
    assert (answer["start"], answer["end"], answer["answer"]) == (needle, needle + 19, "Warsaw Conservatory")
    assert answer["score"] == pytest.approx(score, abs=SCORE_TOLERANCE)


def test_top_k_is_the_best_distinct_spans_of_all_windows(minilm_qa, tokenizer):
    question, options = "When was the weather quiet?", {"max_seq_len": 96, "doc_stride": 32, "max_answer_len": 6}
    context = FILLER[:1500]
    spans, _, windows, _ = brute_force(minilm_qa, tokenizer, question, context, **options)
    assert len(windows) > 4
    expected = distinct(spans, 6)
    answers = QuestionAnswerer(minilm_qa, tokenizer, align_to_words=False, **options)(
        question=question, context=context, top_k=6)
    assert [(a["start"], a["end"]) for a in answers] == [span[1:3] for span in expected]
    assert [a["score"] for a in answers] == pytest.approx([span[0] for span in expected], abs=SCORE_TOLERANCE)
    assert [a["answer"] for a in answers] == [context[span[1]:span[2]] for span in expected]
    assert len({span[3] for span in expected}) > 1  # the ranking mixes windows
    single = QuestionAnswerer(minilm_qa, tokenizer, align_to_words=False, **options)(
        question=question, context=context)
    assert isinstance(single, dict)
    assert_same_answers(single, answers[0])


def test_impossible_answer(minilm_qa, tokenizer):
    boosted = BoostedLogits(minilm_qa, cls_boost=15.0).eval()  # every window puts its weight on [CLS]
    question, options = "Where did Chopin study?", {"max_seq_len": 96, "doc_stride": 32}
    context = FILLER[:700]
    spans, null, windows, _ = brute_force(boosted, tokenizer, question, context, **options)
    assert len(windows) > 1 and null > spans[0][0]
    qa = QuestionAnswerer(boosted, tokenizer, align_to_words=False, **options)
    answer = qa(question=question, context=context, handle_impossible_answer=True)
    assert (answer["answer"], answer["start"], answer["end"]) == ("", 0, 0)
    assert answer["score"] == pytest.approx(null, rel=1e-5)  # the lowest of the windows' null scores
    ranked = qa(question=question, context=context, handle_impossible_answer=True, top_k=3)
    assert [a["answer"] for a in ranked][0] == "" and [(a["start"], a["end"]) for a in ranked[1:]] == \
        [span[1:3] for span in distinct(spans, 2)]
    without = qa(question=question, context=context)  # off by default: the best real span
    assert (without["start"], without["end"]) == spans[0][1:3]
    assert without["score"] == pytest.approx(spans[0][0], rel=1e-4)


def test_answers_are_widened_to_whole_words(minilm_qa, tokenizer):
    context = "The virtuoso pianist played Chopinesque mazurkas in Paris."
    assert tokenizer.tokenize("Chopinesque") == ["chopin", "##es", "##que"]
    middle = tokenizer.convert_tokens_to_ids("##es")
    boosted = BoostedLogits(minilm_qa, middle, middle, boost=20.0).eval()
    aligned = QuestionAnswerer(boosted, tokenizer)(question="What did he play?", context=context)
    start = context.index("Chopinesque")
    assert (aligned["answer"], aligned["start"], aligned["end"]) == ("Chopinesque", start, start + 11)
    cut = QuestionAnswerer(boosted, tokenizer, align_to_words=False)(question="What did he play?", context=context)
    assert (cut["answer"], cut["start"], cut["end"]) == ("es", start + 6, start + 8)
    assert cut["score"] == pytest.approx(aligned["score"])


# ------------------------------------------------------------------ inputs
def test_every_input_form_gives_the_same_answers(minilm_qa, tokenizer):
    qa = QuestionAnswerer(minilm_qa, tokenizer)
    one = qa(question=CARD_QUESTION, context=CARD_CONTEXT)
    assert set(one) == {"score", "start", "end", "answer"} and one["answer"] == CARD_CONTEXT[one["start"]:one["end"]]
    assert qa(CARD_QUESTION, CARD_CONTEXT) == one
    assert qa({"question": CARD_QUESTION, "context": CARD_CONTEXT}) == one
    other = qa(question="When was he born?", context=CARD_CONTEXT)
    for answers in (qa([{"question": CARD_QUESTION, "context": CARD_CONTEXT},
                        {"question": "When was he born?", "context": CARD_CONTEXT}]),
                    qa(question=[CARD_QUESTION, "When was he born?"], context=CARD_CONTEXT),
                    qa(question=[CARD_QUESTION, "When was he born?"], context=[CARD_CONTEXT, CARD_CONTEXT])):
        assert isinstance(answers, list) and len(answers) == 2
        assert_same_answers(answers[0], one)
        assert_same_answers(answers[1], other)
    listed = qa(question=[CARD_QUESTION], context=[CARD_CONTEXT])  # a list gives a list, even of one
    assert isinstance(listed, list) and len(listed) == 1
    # A call's options override the constructor's; the default doc_stride follows the call's max_seq_len.
    context = FILLER[:400]  # a few 64-token windows
    assert_same_answers(qa(question=CARD_QUESTION, context=context, max_seq_len=64, top_k=2),
                        QuestionAnswerer(minilm_qa, tokenizer, max_seq_len=64, doc_stride=32, top_k=2)(
                            question=CARD_QUESTION, context=context))


def test_bad_input_is_refused_with_a_clear_error(minilm_qa, tokenizer):
    qa = QuestionAnswerer(minilm_qa, tokenizer)
    for question, context, match in (("", CARD_CONTEXT, "question cannot be empty"),
                                     (CARD_QUESTION, "", "context cannot be empty"),
                                     ("   ", CARD_CONTEXT, "question has no tokens"),
                                     (CARD_QUESTION, " \n\t ", "context has no tokens")):
        with pytest.raises(ValueError, match=match):
            qa(question=question, context=context)
    with pytest.raises(ValueError, match="example 1: context cannot be empty"):
        qa([{"question": CARD_QUESTION, "context": CARD_CONTEXT}, {"question": CARD_QUESTION, "context": ""}])
    # A question longer than max_question_len (64 tokens by default) is refused, not truncated
    # (transformers 4 truncated it with a slow tokenizer and ignored the limit with a fast one).
    long_question = " ".join(["where did he study the piano"] * 12)
    with pytest.raises(ValueError, match=r"the question is 72 tokens, more than max_question_len=64"):
        qa(question=long_question, context=CARD_CONTEXT)
    assert qa(question=long_question, context=CARD_CONTEXT, max_question_len=None)["answer"]
    # One that leaves a window no more context than the overlap: an error, not the tokenizer's panic.
    with pytest.raises(ValueError, match="context tokens per window"):
        qa(question=" ".join(["piano"] * 300), context=CARD_CONTEXT, max_question_len=None)
    for options, match in (({"top_k": 0}, "top_k"), ({"max_answer_len": 0}, "max_answer_len"),
                           ({"top_k": True}, "top_k"), ({"max_seq_len": 1024}, "position embeddings"),
                           ({"doc_stride": 384}, "doc_stride"), ({"max_question_len": 0}, "max_question_len"),
                           ({"align_to_words": "yes"}, "align_to_words")):
        with pytest.raises(ValueError, match=match):
            qa(question=CARD_QUESTION, context=CARD_CONTEXT, **options)
        with pytest.raises(ValueError, match=match):
            QuestionAnswerer(minilm_qa, tokenizer, **options)
    with pytest.raises(TypeError, match="unknown option"):
        qa(question=CARD_QUESTION, context=CARD_CONTEXT, topk=2)
    with pytest.raises(TypeError, match="question must be a str"):
        qa({"question": 3, "context": CARD_CONTEXT})
    with pytest.raises(ValueError, match="exactly the keys"):
        qa({"question": CARD_QUESTION})
    with pytest.raises(ValueError, match="2 questions need one context or 2 contexts"):
        qa(question=[CARD_QUESTION, CARD_QUESTION], context=[CARD_CONTEXT])
    with pytest.raises(TypeError, match="both"):
        qa(question=CARD_QUESTION)
    with pytest.raises(TypeError, match="not both"):
        qa({"question": CARD_QUESTION, "context": CARD_CONTEXT}, question=CARD_QUESTION)


def test_refuses_a_model_without_a_span_head_and_warns_in_training_mode(minilm_qa, tokenizer):
    from nn_blocksparse.bert import load_minilm

    with pytest.raises(TypeError, match="ForQuestionAnswering"):
        QuestionAnswerer(load_minilm(), tokenizer)
    model = copy.deepcopy(minilm_qa).train()
    with pytest.warns(UserWarning, match="training mode"):
        QuestionAnswerer(model, tokenizer)(question=CARD_QUESTION, context=CARD_CONTEXT)
