"""`QuestionAnswerer`: extractive question answering on any BERT `*ForQuestionAnswering` model.

transformers 5.24 removed `pipeline("question-answering")`; this is its contract (transformers
4.46), for a model patched by `patch_bert` or not, on CPU or GPU:

    qa = QuestionAnswerer(model, tokenizer)
    qa(question="Who is Frederic Chopin?", context="...")  # {"score", "start", "end", "answer"}

Question and context are tokenised as a pair with character offsets; a context too long for
`max_seq_len` is cut into windows that overlap by `doc_stride` tokens (the question is repeated in
every window). Per window, start and end logits are softmaxed over the context tokens and the
first ([CLS]) token; a span's score is p_start * p_end, for spans of context tokens with
end >= start and at most `max_answer_len` tokens. The best spans of all windows are ranked
together (scores are not renormalised across windows) and cut from the context by character
offsets, widened to whole words (`align_to_words`). docs/qa.md states the contract and where it
deliberately differs from transformers 4.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from dataclasses import dataclass

import torch

MAX_SEQ_LEN = 384   # a window's tokens when neither the tokenizer nor the model allows fewer
DOC_STRIDE = 128    # the overlap of consecutive windows, at most half a window
CONTEXT_SEQUENCE = 1  # tokenizers' sequence id of the context (the second text of the pair)


@dataclass(frozen=True)
class QAOptions:
    """The answering options, as transformers 4's question-answering pipeline named them.

    `max_seq_len=None`: 384, or less where the tokenizer's `model_max_length` or the model's
    `max_position_embeddings` is smaller. `doc_stride=None`: min(128, max_seq_len // 2).
    `max_question_len=None`: no limit (beyond leaving room for the context in a window).
    """

    top_k: int = 1
    max_answer_len: int = 15
    max_seq_len: int | None = None
    doc_stride: int | None = None
    max_question_len: int | None = 64
    handle_impossible_answer: bool = False
    align_to_words: bool = True


OPTION_NAMES = tuple(field.name for field in dataclasses.fields(QAOptions))


def _check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


class QuestionAnswerer:
    """Answer questions about a context with a `*ForQuestionAnswering` model and its fast tokenizer.

    `model`: a transformers BERT `*ForQuestionAnswering` (patched or not), or any module whose
    output has `start_logits` and `end_logits` (or is a `(start_logits, end_logits, ...)` tuple).
    It runs as given (put it in eval mode), on its own device, under `torch.inference_mode()`;
    windows go through it `batch_size` at a time, padded to the longest in the batch.
    `options`: the `QAOptions` fields, defaults for every call; a call may override them.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 32, **options) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        config = getattr(model, "config", None)
        architecture = type(model).__name__
        if config is not None and hasattr(model, "base_model_prefix") and not architecture.endswith("ForQuestionAnswering"):
            raise TypeError(f"QuestionAnswerer needs a *ForQuestionAnswering model (one with a span head), got {architecture}")
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("QuestionAnswerer needs a fast (tokenizers-backed) tokenizer: it maps answers back "
                            f"to the context by character offsets; got {type(tokenizer).__name__}")
        _check_int("batch_size", batch_size, 1)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_positions = getattr(config, "max_position_embeddings", None)
        # Defaults that depend on other options (doc_stride on max_seq_len) are filled per call,
        # from the options as given, so a call's max_seq_len also moves the default doc_stride.
        self.given_options = QAOptions(**options)
        self.options = self._resolve(self.given_options)  # unknown or bad options fail here, up front

    # ------------------------------------------------------------------ options
    def _resolve(self, options: QAOptions) -> QAOptions:
        """`options` with the defaults filled in, every value checked."""
        _check_int("top_k", options.top_k, 1)
        _check_int("max_answer_len", options.max_answer_len, 1)
        _check_int("max_question_len", options.max_question_len, 1, allow_none=True)
        limits = [limit for limit in (self.tokenizer.model_max_length, self.max_positions) if limit]
        max_seq_len = options.max_seq_len
        if max_seq_len is None:
            max_seq_len = min([MAX_SEQ_LEN, *limits])
        _check_int("max_seq_len", max_seq_len, 1)
        if self.max_positions and max_seq_len > self.max_positions:
            raise ValueError(f"max_seq_len={max_seq_len} is more than the model's {self.max_positions} "
                             "position embeddings")
        doc_stride = options.doc_stride if options.doc_stride is not None else min(DOC_STRIDE, max_seq_len // 2)
        _check_int("doc_stride", doc_stride, 0)
        if doc_stride >= max_seq_len:
            raise ValueError(f"doc_stride={doc_stride} must be less than max_seq_len={max_seq_len}")
        for name in ("handle_impossible_answer", "align_to_words"):
            if not isinstance(getattr(options, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(options, name)!r}")
        return dataclasses.replace(options, max_seq_len=max_seq_len, doc_stride=doc_stride)

    def _check_room(self, question_tokens: int, options: QAOptions, where: str) -> None:
        """A window holds the question, the special tokens and more context tokens than the overlap."""
        room = options.max_seq_len - question_tokens - self.tokenizer.num_special_tokens_to_add(pair=True)
        if room <= options.doc_stride:
            raise ValueError(
                f"{where}the question ({question_tokens} tokens) leaves {max(room, 0)} context tokens per window "
                f"of max_seq_len={options.max_seq_len}, not more than doc_stride={options.doc_stride}: raise "
                "max_seq_len or lower doc_stride")

    # ------------------------------------------------------------------ calling
    def __call__(self, *args, question=None, context=None, **options):
        """Answer one example or a list of them.

        `qa(question=q, context=c)`, `qa(q, c)` or `qa({"question": q, "context": c})`: one result;
        `qa(question=[q1, q2], context=c)` (one context for all), `qa(question=[...], context=[...])`
        or `qa([{...}, {...}])`: a list of results, one per example. A result is a dict
        `{"score", "start", "end", "answer"}` with `top_k=1`, else a list of up to `top_k` of them,
        best first. `options` override the `QAOptions` given to the constructor for this call.
        """
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; options are {list(OPTION_NAMES)}")
        resolved = self._resolve(dataclasses.replace(self.given_options, **options)) if options else self.options
        examples, single = _examples(args, question, context)
        results = self._answer(examples, resolved)
        return results[0] if single else results

    def _answer(self, examples: list[tuple[str, str]], options: QAOptions) -> list:
        questions = [question for question, _ in examples]
        contexts = [context for _, context in examples]
        question_lengths = [len(ids) for ids in self.tokenizer(questions, add_special_tokens=False)["input_ids"]]
        for index, length in enumerate(question_lengths):
            where = f"example {index}: " if len(examples) > 1 else ""
            if length == 0:
                raise ValueError(f"{where}the question has no tokens (only characters the tokenizer drops)")
            if options.max_question_len is not None and length > options.max_question_len:
                raise ValueError(f"{where}the question is {length} tokens, more than max_question_len="
                                 f"{options.max_question_len}: shorten it or raise max_question_len (None: no limit)")
            self._check_room(length, options, where)
        encoded = self.tokenizer(
            questions, contexts, truncation="only_second", max_length=options.max_seq_len,
            stride=options.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
            return_token_type_ids=True, padding=False)
        windows_of = [[] for _ in examples]
        for window, example in enumerate(encoded["overflow_to_sample_mapping"]):
            windows_of[example].append(window)
        for index, windows in enumerate(windows_of):
            if CONTEXT_SEQUENCE not in encoded.sequence_ids(windows[0]):
                where = f"example {index}: " if len(examples) > 1 else ""
                raise ValueError(f"{where}the context has no tokens (empty, or only characters the tokenizer drops)")
        start_logits, end_logits = self._logits(encoded)
        return [self._best_answers(encoded, windows, start_logits, end_logits, contexts[index], options)
                for index, windows in enumerate(windows_of)]

    # ------------------------------------------------------------------ model
    def _device(self) -> torch.device:
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def _logits(self, encoded) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Start and end logits of every window (float64 on the CPU), shortest windows batched together."""
        input_ids = encoded["input_ids"]
        names = [name for name in ("input_ids", "token_type_ids", "attention_mask") if name in encoded]
        pad_values = {"input_ids": self.tokenizer.pad_token_id or 0, "token_type_ids": 0, "attention_mask": 0}
        device = self._device()
        if self.model.training:
            warnings.warn("QuestionAnswerer: the model is in training mode, so dropout makes answers random; "
                          "call model.eval()", stacklevel=4)
        order = sorted(range(len(input_ids)), key=lambda window: len(input_ids[window]))
        starts: list = [None] * len(input_ids)
        ends: list = [None] * len(input_ids)
        with torch.inference_mode():
            for first in range(0, len(order), self.batch_size):
                batch = order[first:first + self.batch_size]
                length = max(len(input_ids[window]) for window in batch)
                inputs = {}
                for name in names:
                    tensor = torch.full((len(batch), length), pad_values[name], dtype=torch.long)
                    for row, window in enumerate(batch):
                        values = encoded[name][window]
                        tensor[row, :len(values)] = torch.tensor(values, dtype=torch.long)
                    inputs[name] = tensor.to(device)
                start, end = _start_end_logits(self.model(**inputs))
                start, end = start.double().cpu(), end.double().cpu()
                for row, window in enumerate(batch):
                    starts[window] = start[row, :len(input_ids[window])]
                    ends[window] = end[row, :len(input_ids[window])]
        return starts, ends

    # ------------------------------------------------------------------ decoding
    def _best_answers(self, encoded, windows, start_logits, end_logits, context: str, options: QAOptions):
        scores, spans = [], []  # every allowed span of every window, in window order
        null_score = None
        for window in windows:
            is_context = torch.tensor([sequence == CONTEXT_SEQUENCE for sequence in encoded.sequence_ids(window)])
            window_scores, starts, ends, null = span_scores(start_logits[window], end_logits[window], is_context,
                                                            options.max_answer_len)
            null_score = null if null_score is None else min(null_score, null)
            scores.append(window_scores)
            spans.append(torch.stack([torch.full_like(starts, window), starts, ends], dim=1))
        scores, spans = torch.cat(scores), torch.cat(spans)
        # Stable: among equal scores the earlier window, then the earlier start, wins (as in transformers 4).
        order = torch.sort(scores, descending=True, stable=True).indices
        answers, seen = [], set()
        for index in order.tolist():
            window, start, end = spans[index].tolist()
            start_char, end_char = _char_span(encoded.encodings[window], start, end, options.align_to_words)
            if (start_char, end_char) in seen:  # the same text from an overlapping window or another subword
                continue
            seen.add((start_char, end_char))
            answers.append({"score": scores[index].item(), "start": start_char, "end": end_char,
                            "answer": context[start_char:end_char]})
            if len(answers) == options.top_k:
                break
        if options.handle_impossible_answer:
            answers.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
            answers = sorted(answers, key=lambda answer: answer["score"], reverse=True)[:options.top_k]
        return answers[0] if options.top_k == 1 else answers


def span_scores(start_logits: torch.Tensor, end_logits: torch.Tensor, is_context: torch.Tensor, max_answer_len: int):
    """Every answer span of one window: `(scores, start tokens, end tokens, null score)`.

    The softmax runs over the context tokens and the first token ([CLS], which a SQuAD 2 model uses
    to say "no answer"); spans are of context tokens only, end >= start, at most `max_answer_len`
    tokens, listed start-major. The null score is p_start * p_end of the first token.
    """
    allowed = is_context.clone()
    allowed[0] = True
    start_probs = torch.softmax(start_logits.masked_fill(~allowed, float("-inf")), dim=0)
    end_probs = torch.softmax(end_logits.masked_fill(~allowed, float("-inf")), dim=0)
    null = (start_probs[0] * end_probs[0]).item()
    positions = is_context.nonzero().flatten()
    pair = start_probs[positions, None] * end_probs[None, positions]
    length = positions[None, :] - positions[:, None]  # end - start, in tokens
    valid = (length >= 0) & (length < max_answer_len)
    start_index, end_index = valid.nonzero(as_tuple=True)  # row-major: start-major order
    return pair[start_index, end_index], positions[start_index], positions[end_index], null


def _char_span(encoding, start: int, end: int, align_to_words: bool) -> tuple[int, int]:
    """Characters of the context that tokens `start..end` cover, widened to whole words if asked."""
    if align_to_words:
        start_word, end_word = encoding.token_to_word(start), encoding.token_to_word(end)
        if start_word is not None and end_word is not None:
            start_chars = encoding.word_to_chars(start_word, CONTEXT_SEQUENCE)
            end_chars = encoding.word_to_chars(end_word, CONTEXT_SEQUENCE)
            if start_chars is not None and end_chars is not None:
                return start_chars[0], end_chars[1]
        # A tokenizer without words (no pre-tokenizer): the tokens' own offsets.
    return encoding.offsets[start][0], encoding.offsets[end][1]


def _start_end_logits(output) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(output, "start_logits") and hasattr(output, "end_logits"):
        return output.start_logits, output.end_logits
    if isinstance(output, (tuple, list)) and len(output) >= 2:
        return output[0], output[1]
    raise TypeError(f"the model's output has no start_logits and end_logits: got {type(output).__name__}")


def _example(item, index: int | None = None) -> tuple[str, str]:
    where = f"example {index}: " if index is not None else ""
    if not isinstance(item, dict):
        raise TypeError(f"{where}an example is a dict with 'question' and 'context', got {type(item).__name__}")
    if set(item) != {"question", "context"}:
        raise ValueError(f"{where}an example is a dict with exactly the keys 'question' and 'context', "
                         f"got keys {sorted(item)}")
    for name in ("question", "context"):
        if not isinstance(item[name], str):
            raise TypeError(f"{where}{name} must be a str, got {type(item[name]).__name__}")
        if not item[name]:
            raise ValueError(f"{where}{name} cannot be empty")
    return item["question"], item["context"]


def _examples(args: tuple, question, context) -> tuple[list[tuple[str, str]], bool]:
    """The call's examples as (question, context) pairs, and whether one result (not a list) is asked."""
    if args and (question is not None or context is not None):
        raise TypeError("give the examples either positionally or as question=/context=, not both")
    if args:
        if len(args) == 2 and all(isinstance(arg, str) for arg in args):
            return [_example({"question": args[0], "context": args[1]})], True
        if len(args) != 1:
            raise TypeError("positional examples: qa(question, context), qa({...}) or qa([{...}, ...])")
        if isinstance(args[0], dict):
            return [_example(args[0])], True
        if isinstance(args[0], (list, tuple)) and args[0]:
            return [_example(item, index) for index, item in enumerate(args[0])], False
        raise TypeError(f"expected a dict or a non-empty list of dicts, got {args[0]!r:.80}")
    if question is None or context is None:
        raise TypeError("give both question= and context=")
    if isinstance(question, str):
        return [_example({"question": question, "context": context})], True
    if isinstance(question, (list, tuple)) and question:
        contexts = [context] * len(question) if isinstance(context, str) else context
        if not isinstance(contexts, (list, tuple)) or len(contexts) != len(question):
            raise ValueError(f"{len(question)} questions need one context or {len(question)} contexts")
        return [_example({"question": q, "context": c}, index)
                for index, (q, c) in enumerate(zip(question, contexts))], False
    raise TypeError(f"question must be a str or a non-empty list of str, got {question!r:.80}")
