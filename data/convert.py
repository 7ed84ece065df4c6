"""Convert raw dataset layouts into tpembed training records (docs/method.md section 3).

    python -m tpembed.data.convert KIND SOURCE TARGET [options]
    tpembed-convert nli-pairs snli/validation.jsonl out/snli_pairs.jsonl --instruction "..."

SOURCE is a JSONL file, a parquet file, a directory of those or a saved `datasets`
dataset (anything tpembed.data.formats.iter_rows reads; `beir` takes a BEIR directory).
TARGET is a JSONL file of one record type, read by the trainer unchanged:

    kind             source fields (defaults and aliases)               writes
    nli-pairs        premise, hypothesis, label                         sts
    nli-triplets     premise, hypothesis, label, grouped by premise     retrieval
    pairs (sts)      sentence1|text1, sentence2|text2, score|label      sts
    qa (dialogue)    question, answer; or messages [{role, content}]    retrieval
    title-body       title, body|abstract|text                          retrieval
    claims           claim, evidence, label|verdict, grouped by claim   retrieval
    rc               context, question, answer(s)                       retrieval
    classification   text|sentence, label|category (alias clustering)   classification
    beir             corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv       retrieval
    st               sentence-transformers columns                      retrieval or sts
    flag             FlagEmbedding {query, pos, neg, prompt}            retrieval
    tevatron         {query, positive_passages, negative_passages}      retrieval

Record types: retrieval {query, pos: [..], negs: [..]}, sts {text1, text2, score},
classification {text, label}; `--instruction TEXT` adds "instruction" to every record
that has none of its own (a FlagEmbedding `prompt` is a record's own instruction and
wins, as a record's instruction wins over the dataset's in tpembed). Records also carry
small provenance fields that training ignores ("source": "file:line", and where they
apply "turn", "reversed", "query_id", "pos_ids"); `--no-provenance` leaves them out.

Documents of `beir` and `tevatron` are title + " " + text when the title is non-empty (the
text alone otherwise, the title alone when the text is empty); `--no-title` uses the text
only. `beir` writes the documents with a qrels score above 0 as positives and no hard
negatives (mining fills them later); a qrel naming a document missing from corpus.jsonl
is an error at its qrels line. `rc` builds the method's query, context + separator +
question, with the answer(s) as positives (`--rc-query context-question`, the default;
separator "\\n请阅读上述文章，回答下列问题：", or with `--language en` "\\nRead the passage
above and answer the question: ", or `--rc-separator TEXT`), or question -> context
paragraph (`--rc-query question`, the SQuAD / CMRC retrieval view). `classification`
drops exact duplicate texts and texts whose label no other text has (both counted);
tpembed builds its examples at sampling time, while `--fixed-examples --num-negatives K
--seed S` writes retrieval-shaped examples {query, pos: [same-label text], negs: [K texts
of other labels], label, neg_labels} for other trainers, the same for the same seed.

NLI labels: entailment / neutral / contradiction (any case) score 2 / 1 / 0. Integer
labels (and digit strings) follow the Hugging Face snli / multi_nli / xnli convention
0 = entailment, 1 = neutral, 2 = contradiction; `--int-labels` gives another order.
Unlabelled pairs (SNLI's "-", the -1 of Hugging Face sets) are skipped and counted.

Directions of sts pairs (nli-pairs, pairs, st): by default each pair is written ONCE,
as in the source. The method uses every pair in both directions, and tpembed's sampler
already does that at sampling time (data/batches.py); a file holding both directions
would make tpembed count each pair twice, which doubles the dataset's size and so raises
its sampling weight n ** alpha by 2 ** alpha. `--both-directions` writes each pair
also swapped (a second record with "reversed": true), for trainers that do not swap
pairs themselves; do not use it for tpembed.

Grouping and memory: nli-triplets and claims group records by premise / claim in memory
(memory grows with the number of groups and their texts, not with the raw file: the
source is still read line by line, in any order); classification holds the kept texts
and their labels (it needs every label's count before writing); beir holds the qrels and
the texts of the judged-positive documents only. Every other kind streams.

Errors: a record missing a required field, or with a field of the wrong type, stops the
conversion with `file:line: field 'NAME': problem` (exit code 1) and leaves no target,
unless `--skip-invalid` is given: then it is skipped and counted with the reason and its
first location. Invalid JSON or non-UTF-8 text always stops the conversion. Records with
an empty text are always skipped and counted (training refuses empty texts); empty hard
negatives are dropped and counted. The summary of what was written and skipped, by
reason, is printed. An existing TARGET is replaced only with `--overwrite`; usage errors
exit with code 2. Output is written atomically: a failed or killed run leaves no target.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpembed.data.formats import NLI_SCORES, DataError, iter_rows
from tpembed.data.io import OutputExistsError, WriteReport, jsonl_output

NLI_LABELS = ("entailment", "neutral", "contradiction")
RC_SEPARATORS = {
    "zh": "\n请阅读上述文章，回答下列问题：",  # the method's reading-comprehension query
    "en": "\nRead the passage above and answer the question: ",
}
PROVENANCE_FIELDS = ("source", "turn", "reversed", "query_id", "pos_ids")
DEFAULT_NUM_NEGATIVES = 7

PREMISE_FIELDS = ("premise", "sentence1", "text1")
HYPOTHESIS_FIELDS = ("hypothesis", "sentence2", "text2")
NLI_LABEL_FIELDS = ("label", "gold_label")
TEXT1_FIELDS = ("sentence1", "text1")
TEXT2_FIELDS = ("sentence2", "text2")
SCORE_FIELDS = ("score", "label")
QUESTION_FIELDS = ("question", "query", "prompt")
ANSWER_FIELDS = ("answer", "answers", "response", "output")
MESSAGES_FIELDS = ("messages", "conversations", "conversation")
USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt", "model")
TITLE_FIELDS = ("title", "headline")
BODY_FIELDS = ("body", "abstract", "text", "content")
CLAIM_FIELDS = ("claim",)
EVIDENCE_FIELDS = ("evidence", "evidence_text", "sentence", "text")
VERDICT_FIELDS = ("label", "verdict")
CONTEXT_FIELDS = ("context", "passage", "paragraph")
CLASS_TEXT_FIELDS = ("text", "sentence", "content")
CLASS_LABEL_FIELDS = ("label", "category", "cluster")
ANCHOR_FIELDS = ("anchor", "query", "question")
POSITIVE_FIELDS = ("positive", "pos")

VERDICTS = {"supports": True, "supported": True, "refutes": False, "refuted": False}
NO_VERDICT = ("not enough info", "not_enough_info", "nei")


class UsageError(ValueError):
    """Options that do not fit together (exit code 2)."""


class Skip(Exception):
    """A source record left out for a counted reason; not an error."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---- reading fields ---------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _find(row: dict, names: tuple[str, ...]) -> tuple[str | None, Any]:
    for name in names:
        if name in row:
            return name, row[name]
    return None, None


def _missing(location: str, names: tuple[str, ...]) -> DataError:
    return DataError(location, names[0], f"missing (accepted names: {', '.join(names)})")


def _text(row: dict, names: tuple[str, ...], location: str) -> str:
    """The first present field of `names` as a non-empty string; Skip when empty."""
    name, value = _find(row, names)
    if name is None:
        raise _missing(location, names)
    if not isinstance(value, str):
        raise DataError(location, name, f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise Skip(f"empty text in '{name}'")
    return value


def _passage(title: Any, text: str, use_title: bool) -> str:
    """BEIR / Tevatron document text: title + " " + text when the title is non-empty."""
    if use_title and isinstance(title, str) and title.strip():
        return f"{title} {text}" if text.strip() else title
    return text


@dataclass
class Context:
    """What every converter shares: the report it counts into and the error policy."""

    report: WriteReport
    skip_invalid: bool

    def attempt(self, location: str, action: Callable[[], Any]) -> Any:
        """`action()`, or None when it skips the record (counted) or, with --skip-invalid,
        when the record is malformed (counted with the problem)."""
        try:
            return action()
        except Skip as skip:
            self.report.skip(skip.reason, location)
        except DataError as error:
            self.invalid(error)
        return None

    def invalid(self, error: DataError) -> None:
        """Raise `error`, or with --skip-invalid count it as a skipped record."""
        if not self.skip_invalid:
            raise error
        problem = str(error).removeprefix(f"{error.location}: ")
        self.report.skip(f"invalid record: {problem}", error.location)

    def texts(self, row: dict, names: tuple[str, ...], location: str, required: bool) -> list[str]:
        """A string or list of strings as a list without empty texts (dropped, counted);
        Skip when `required` and nothing is left."""
        name, value = _find(row, names)
        if name is None or value is None:
            if required:
                raise _missing(location, names)
            return []
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise DataError(location, name, f"expected a string or a list of strings, got {_type_name(value)}")
        return self.non_empty(values, name, location, required)

    def non_empty(self, values: list[str], name: str, location: str, required: bool) -> list[str]:
        kept = [v for v in values if v.strip()]
        if required and not kept:
            raise Skip(f"no non-empty text in '{name}'")
        if len(kept) < len(values):
            self.report.skip(f"empty texts dropped from '{name}' (record kept)", location)
        return kept


def _names(option: str | None, aliases: tuple[str, ...]) -> tuple[str, ...]:
    """The source field names to look for: the one given on the command line, else the aliases."""
    return (option,) if option else aliases


def _retrieval(query: str, positives: list[str], negatives: list[str], location: str, **extra: Any) -> dict:
    return {"query": query, "pos": positives, "negs": negatives, "source": location, **extra}


# ---- NLI ----------------------------------------------------------------------------------


def _nli_label(value: Any, name: str, location: str, int_labels: tuple[str, ...]) -> str:
    """entailment / neutral / contradiction from a label string or integer; Skip if unlabelled."""
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value == -1:
            raise Skip("no gold label (-1)")
        if 0 <= value < len(int_labels):
            return int_labels[value]
        raise DataError(location, name, f"integer label {value} is not one of 0..{len(int_labels) - 1} or -1")
    if isinstance(value, str):
        key = value.strip().lower()
        if key in NLI_SCORES:
            return key
        if key in ("-", ""):
            raise Skip("no gold label ('-')")
        raise DataError(location, name, f"unknown NLI label {value!r} (expected {', '.join(NLI_LABELS)} or 0/1/2)")
    raise DataError(location, name, f"expected an NLI label string or integer, got {_type_name(value)}")


def _nli_row(row: dict, location: str, args: argparse.Namespace) -> tuple[str, str, str]:
    label_names = _names(args.label_field, NLI_LABEL_FIELDS)
    name, value = _find(row, label_names)
    if name is None:
        raise _missing(location, label_names)
    label = _nli_label(value, name, location, args.int_labels)
    premise = _text(row, _names(args.premise_field, PREMISE_FIELDS), location)
    hypothesis = _text(row, _names(args.hypothesis_field, HYPOTHESIS_FIELDS), location)
    return premise, hypothesis, label


def _sts_records(text1: str, text2: str, score: float, location: str, both_directions: bool) -> Iterator[dict]:
    yield {"text1": text1, "text2": text2, "score": score, "source": location}
    if both_directions:
        yield {"text1": text2, "text2": text1, "score": score, "source": location, "reversed": True}


def convert_nli_pairs(ctx: Context, args: argparse.Namespace) -> Iterator[dict]:
    """NLI pairs -> sts records scored entailment 2 / neutral 1 / contradiction 0."""
    for location, row in iter_rows(args.source):
        parsed = ctx.attempt(location, lambda: _nli_row(row, location, args))
        if parsed is not None:
            premise, hypothesis, label = parsed
            yield from _sts_records(premise, hypothesis, NLI_SCORES[label], location, args.both_directions)


@dataclass
class _Group:
    """The positives and hard negatives gathered for one query (premise or claim)."""

    location: str  # of the group's first record
    positives: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def add(self, text: str, positive: bool, ctx: Context, location: str) -> None:
        """Add a text once; a repeat (also with the other verdict) is dropped and counted."""
        if text in self.seen:
            ctx.report.skip("duplicate text within a group", location)
            return
        self.seen.add(text)
        (self.positives if positive else self.negatives).append(text)


def _group_records(
    groups: dict[str, _Group], ctx: Context, no_positive: str, no_negative: str | None
) -> Iterator[dict]:
    """A retrieval record per group; groups without positives, or (when `no_negative` names
    the reason) without negatives, are skipped and counted."""
    for query, group in groups.items():
        if not group.positives:
            ctx.report.skip(no_positive, group.location)
        elif not group.negatives and no_negative is not None:
            ctx.report.skip(no_negative, group.location)
        else:
            yield _retrieval(query, group.positives, group.negatives, group.location)


def convert_nli_triplets(ctx: Context, args: argparse.Namespace) -> Iterator[dict]:
    """NLI pairs grouped by premise -> retrieval {premise, entailed hypotheses, contradicting ones}."""
    groups: dict[str, _Group] = {}
    for location, row in iter_rows(args.source):
        parsed = ctx.attempt(location, lambda: _nli_row(row, location, args))
        if parsed is None:
            continue
        premise, hypothesis, label = parsed
        group = groups.setdefault(premise, _Group(location))
        if label == "neutral":
            ctx.report.skip("neutral pair (triplets use entailment and contradiction)", location)
        else:
            group.add(hypothesis, label == "entailment", ctx, location)
    no_negative = "premise without a contradiction (see --keep-without-negatives)"
    no_negative = None if args.keep_without_negatives else no_negative
    yield from _group_records(groups, ctx, "premise without an entailment", no_negative)


# ---- scored pairs ---------------------------------------------------------------------------


def _score(row: dict, names: tuple[str, ...], location: str, score_range: tuple[float, float] | None) -> float:
    """A finite number (bool as 0/1, numeric strings parsed), checked against `score_range`."""
    name, value = _find(row, names)
    if name is None:
        raise _missing(location, names)
    if isinstance(value, bool):
        value = int(value)
    elif isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            hint = " (NLI labels: use the nli-pairs kind)" if value.strip().lower() in NLI_SCORES else ""
            raise DataError(location, name, f"{value!r} is not a number{hint}") from None
    if not isinstance(value, (int, float)):
        raise DataError(location, name, f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value):
        raise DataError(location, name, f"score {value!r} is not finite")
    if score_range is not None and not score_range[0] <= value <= score_range[1]:
        raise DataError(location, name, f"score {value} is outside --score-range [{score_range[0]}, {score_range[1]}]")
    return value


def _pair_row(row: dict, location: str, args: argparse.Namespace) -> tuple[str, str, float]:
    text1 = _text(row, _names(args.text1_field, TEXT1_FIELDS), location)
    text2 = _text(row, _names(args.text2_field, TEXT2_FIELDS), location)
    return text1, text2, _score(row, _names(args.score_field, SCORE_FIELDS), location, args.score_range)


def convert_pairs(ctx: Context, args: argparse.Namespace) -> Iterator[dict]:
    """Graded STS or binary paraphrase pairs -> sts records, scores kept as they are."""
    for location, row in iter_rows(args.source):
        parsed = ctx.attempt(location, lambda: _pair_row(row, location, args))
        if parsed is not None:
            yield from _sts_records(*parsed, location, args.both_directions)


# ---- question answering and dialogue -------------------------------------------------------


def _message(message: Any, index: int, name: str, location: str) -> tuple[str, str | None]:
    """(role, content) of one chat message; content None when it has no text."""
    where = f"{name}[{index}]"
    if not isinstance(message, dict):
        raise DataError(location, where, f"expected a message object, got {_type_name(message)}")
    role_key, role = _find(message, ("role", "from"))
    content_key, content = _find(message, ("content", "value"))
    if not isinstance(role, str):
        raise DataError(location, f"{where}.role", f"expected a string role, got {_type_name(role)}")
    if content is not None and not isinstance(content, str):
        raise DataError(location, f"{where}.{content_key}", f"expected a string, got {_type_name(content)}")
    return role.strip().lower(), content if content and content.strip() else None


def _chat_records(ctx: Context, name: str, messages: Any, location: str) -> list[dict]:
    """Each user turn followed directly by an assistant turn -> {query: user, pos: [assistant]}."""
    if not isinstance(messages, list):
        raise DataError(location, name, f"expected a list of messages, got {_type_name(messages)}")
    turns = [_message(message, i, name, location) for i, message in enumerate(messages)]
    records = []
    for i, (role, content) in enumerate(turns):
        if role not in USER_ROLES:
            continue
        reply = turns[i + 1] if i + 1 < len(turns) else None
        if reply is None or reply[0] not in ASSISTANT_ROLES:
            ctx.report.skip("user turn not followed by an assistant turn", f"{location} turn {i}")
        elif content is None or reply[1] is None:
            ctx.report.skip("user or assistant turn without text", f"{location} turn {i}")
        else:
            records.append(_retrieval(content, [reply[1]], [], location, turn=i))
    return records


def convert_qa(ctx: Context, args: argparse.Namespace) -> Iterator[dict]:
    """(question, answer) records, or chat records (user turn -> next assistant turn) -> retrieval."""
    messages_names = _names(args.messages_field, MESSAGES_FIELDS)
    for location, row in iter_rows(args.source):
        name, messages = _find(row, messages_names)
        if name is not None:
            records = ctx.attempt(location, lambda: _chat_records(ctx, name, messages, location))
        else:
            records = ctx.attempt(location, lambda: [_qa_record(ctx, row, location, args)])
        yield from records or ()


def _qa_record(ctx: Context, row: dict, location: str, args: argparse.Namespace) -> dict:
    question = _text(row, _names(args.question_field, QUESTION_FIELDS), location)
    answers = ctx.texts(row, _names(args.answer_field, ANSWER_FIELDS), location, required=True)
    return _retrieval(question, answers, [], location)


# ---- title -> body, claims -> evidence ------------------------------------------------------


def convert_title_body(ctx: Context, args: argparse.Namespace) -> Iterator[dict]:
    """title -> body (or abstract) -> retrieval {query: title, pos: [body]}."""
    titles, bodies = _names(args.title_field, TITLE_FIELDS), _names(args.body_field, BODY_FIELDS)
    for location, row in iter_rows(args.source):
        record = ctx.attempt(
            location, lambda: _retrieval(_text(row, titles, location), [_text(row, bodies, location)], [], location)
        )
        if record is not None:
            yield record


def _verdict(row: dict, names: tuple[str, ...], location: str) -> bool:
    """True for SUPPORTS, False for REFUTES; Skip for NOT ENOUGH INFO."""
    name, value = _find(row, names)
    if name is None:
        raise _missing(location, names)
    if not isinstance(value, str):
        raise DataError(location, name, f"expected a verdict string, got {_type_name(value)}")
    key = value.strip().lower()
    if key in NO_VERDICT:
        raise Skip("NOT ENOUGH INFO evidence (not used)")
    if key not in VERDICTS:
        raise DataError(location, name, f"unknown verdict {value!r} (expected SUPPORTS, REFUTES or NOT ENOUGH INFO)")
    return VERDICTS[key]


def _claim_row(ctx: Context, row: dict, location: str, args: argparse.Namespace) -> tuple[str, list[str], bool]:
    supports = _verdict(row, _names(args.verdict_field, VERDICT_FIELDS), location)
    claim = _text(row, _names(args.claim_field, CLAIM_FIELDS), location)
    evidence = ctx.texts(row, _names(args.evidence_field, EVIDENCE_FIELDS), location, required=True)
    return claim, evidence, supports


def convert_claims(ctx: Context, args: argparse.Namespace) -> Iterator[dict]:
    """Claim/evidence/verdict records grouped by claim -> retrieval {claim, supporting, refuting}.

    Claims without supporting evidence are skipped; claims without refuting evidence are
    kept with empty negatives (FEVER gives each claim one verdict, so most have none)."""
    groups: dict[str, _Group] = {}
    for location, row in iter_rows(args.source):
        parsed = ctx.attempt(location, lambda: _claim_row(ctx, row, location, args))
        if parsed is None:
            continue
        claim, evidence, supports = parsed
        group = groups.setdefault(claim, _Group(location))
        for text in evidence:
            group.add(text, supports, ctx, location)
    yield from _group_records(groups, ctx, "claim without supporting evidence", None)


# ---- reading comprehension -------------------------------------------------------------------


def _answers(ctx: Context, row: dict, names: tuple[str, ...], location: str) -> list[str]:
    """Answer texts from a string, a list of strings, SQuAD's {"text": [...]} or [{"text": ...}]."""
    name, value = _find(row, names)
    if name is None:
        raise _missing(location, names)
    if isinstance(value, dict):
        value = value.get("text")
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        value = [v.get("text") for v in value]
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DataError(location, name, "expected a string, a list of strings or SQuAD answers with 'text'")
    return ctx.non_empty(list(dict.fromkeys(texts)), name, location, required=True)


def _rc_record(ctx: Context, row: dict, location: str, args: argparse.Namespace) -> dict:
    context = _text(row, _names(args.context_field, CONTEXT_FIELDS), location)
    question = _text(row, _names(args.question_field, QUESTION_FIELDS), location)
    if args.rc_query == "question":
        return _retrieval(question, [context], [], location)
    answers = _answers(ctx, row, _names(args.answer_field, ANSWER_FIELDS), location)
    return _retrieval(context + args.separator + question, answers, [], location)


def convert_rc(ctx: Context, args: argparse.Namespace) -> Iterator[dict]:
    """(context, question, answer) -> retrieval; `--rc-query` picks the query construction."""
    for location, row in iter_rows(args.source):
        record = ctx.attempt(location, lambda: _rc_record(ctx, row, location, args))
        if record is not None:
            yield record


# ---- classification and clustering ------------------------------------------------------------


def _label(row: dict, names: tuple[str, ...], location: str) -> str:
    name, value = _find(row, names)
    if name is None:
        raise _missing(location, names)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(location, name, f"expected a string or integer label, got {_type_name(value)}")
    if isinstance(value, str) and not value.strip():
        raise DataError(location, name, "empty label")
    return str(value)


def _labelled_texts(ctx: Context, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(location, text, label) of every usable record; exact duplicate texts after the first dropped."""
    texts, labels = _names(args.text_field, CLASS_TEXT_FIELDS), _names(args.label_field, CLASS_LABEL_FIELDS)
    first_label: dict[str, str] = {}
    items = []
    for location, row in iter_rows(args.source):
        parsed = ctx.attempt(location, lambda: (_text(row, texts, location), _label(row, labels, location)))
        if parsed is None:
            continue
        text, label = parsed
        if text in first_label:
            same = first_label[text] == label
            ctx.report.skip("duplicate text" if same else "duplicate text with another label (first kept)", location)
            continue
        first_label[text] = label
        items.append((location, text, label))
    return items


def _without_singleton_labels(ctx: Context, items: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """A text whose label no other text has would have no positive: drop it (counted)."""
    counts = Counter(label for _, _, label in items)
    for location, _, label in items:
        if counts[label] == 1:
            ctx.report.skip("only text of its label", location)
    return [item for item in items if counts[item[2]] > 1]


def convert_classification(ctx: Context, args: argparse.Namespace) -> Iterator[dict]:
    """(text, label) or (text, category) -> classification records, or with --fixed-examples
    materialised retrieval-shaped examples for trainers that do not build them."""
    items = _without_singleton_labels(ctx, _labelled_texts(ctx, args))
    label_count = len({label for _, _, label in items})
    if label_count < 2:
        raise DataError(
            str(args.source), "label", f"{label_count} label(s) with two or more texts; classification needs two"
        )
    if args.fixed_examples:
        yield from _fixed_examples(items, args.num_negatives, args.seed)
        return
    for location, text, label in items:
        yield {"text": text, "label": label, "source": location}


def _fixed_examples(items: list[tuple[str, str, str]], num_negatives: int, seed: int) -> Iterator[dict]:
    """One example per text: a same-label positive (never the text itself: texts are unique)
    and `num_negatives` distinct texts of other labels (fewer when fewer exist).

    Each example has its own generator seeded with (seed, index), so an example depends
    only on the seed, its index and the kept texts, not on the other examples."""
    order = sorted(range(len(items)), key=lambda i: items[i][2])  # indices with each label contiguous
    blocks: dict[str, tuple[int, int]] = {}
    for position, index in enumerate(order):
        start, _ = blocks.get(items[index][2], (position, position))
        blocks[items[index][2]] = (start, position + 1)
    for index, (location, text, label) in enumerate(items):
        rng = random.Random(f"{seed}:{index}")
        start, end = blocks[label]
        # a uniform draw among the block's other members: positions start..end-2, where the
        # query's own position stands for the last one
        member = order[start + rng.randrange(end - start - 1)]
        positive = items[order[end - 1] if member == index else member][1]
        others = len(items) - (end - start)
        drawn = rng.sample(range(others), min(num_negatives, others))
        negatives = [items[order[r if r < start else r + end - start]] for r in drawn]
        yield {
            "query": text,
            "pos": [positive],
            "negs": [n[1] for n in negatives],
            "label": label,
            "neg_labels": [n[2] for n in negatives],
            "source": location,
        }


# ---- BEIR -----------------------------------------------------------------------------------


def _qrels(ctx: Context, path: Path) -> dict[str, list[tuple[str, str]]]:
    """query id -> [(corpus id, qrels location)] for qrels with a score above 0."""
    if not path.is_file():
        raise DataError(str(path), None, "no such qrels file (see --split)")
    positives: dict[str, list[tuple[str, str]]] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            location = f"{path}:{number}"
            parsed = ctx.attempt(location, lambda: _qrel_line(line, location, number))
            if parsed is None:
                continue
            query_id, corpus_id, score = parsed
            if score > 0:
                positives.setdefault(query_id, []).append((corpus_id, location))
            else:
                ctx.report.skip("qrel with score <= 0 (not a positive)", location)
    return positives


def _qrel_line(line: str, location: str, number: int) -> tuple[str, str, float] | None:
    if not line.strip():
        return None
    columns = line.rstrip("\r\n").split("\t")
    if len(columns) != 3:
        columns = line.split()
    if number == 1 and columns[0] == "query-id":  # the header
        return None
    if len(columns) != 3:
        raise DataError(location, None, f"expected 3 tab-separated columns (query-id corpus-id score), got {line!r}")
    try:
        score = float(columns[2])
    except ValueError:
        raise DataError(location, "score", f"{columns[2]!r} is not a number") from None
    return columns[0], columns[1], score


def _record_id(row: dict, location: str) -> str:
    value = row.get("_id")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(location, "_id", f"expected a string id, got {_type_name(value)}")
    return str(value)


def _corpus_texts(ctx: Context, path: Path, wanted: set[str], use_title: bool) -> dict[str, str]:
    """Texts (title + " " + text) of the corpus documents in `wanted`; others are not kept."""
    texts: dict[str, str] = {}
    for location, row in iter_rows(path):
        doc_id = ctx.attempt(location, lambda: _record_id(row, location))
        if doc_id is None or doc_id not in wanted or doc_id in texts:
            continue
        text = ctx.attempt(location, lambda: _corpus_text(row, location))
        if text is not None:
            texts[doc_id] = _passage(row.get("title"), text, use_title)
    return texts


def _corpus_text(row: dict, location: str) -> str:
    text = row.get("text")
    if not isinstance(text, str):
        raise DataError(location, "text", f"expected a string, got {_type_name(text)}")
    title = row.get("title")
    if title is not None and not isinstance(title, str):
        raise DataError(location, "title", f"expected a string, got {_type_name(title)}")
    return text


def _beir_positives(ctx: Context, query_id: str, judged: list[tuple[str, str]], texts: dict[str, str], corpus: Path):
    """(corpus ids, texts) of a query's positives; a qrel naming a missing document is an error."""
    ids, passages = [], []
    for corpus_id, location in judged:
        if corpus_id not in texts:
            ctx.invalid(DataError(location, "corpus-id", f"{corpus_id!r} (query {query_id!r}) is not in {corpus}"))
        elif not texts[corpus_id].strip():
            ctx.report.skip("empty corpus text (positive dropped)", location)
        elif corpus_id not in ids:
            ids.append(corpus_id)
            passages.append(texts[corpus_id])
    return ids, passages


def convert_beir(ctx: Context, args: argparse.Namespace) -> Iterator[dict]:
    """A BEIR directory -> retrieval {query, pos: judged-positive documents, negs: []}."""
    source = Path(args.source)
    qrels_path, corpus_path = source / "qrels" / f"{args.split}.tsv", source / "corpus.jsonl"
    judged = _qrels(ctx, qrels_path)
    wanted = {corpus_id for pairs in judged.values() for corpus_id, _ in pairs}
    texts = _corpus_texts(ctx, corpus_path, wanted, not args.no_title)
    seen: set[str] = set()
    for location, row in iter_rows(source / "queries.jsonl"):
        parsed = ctx.attempt(location, lambda: (_record_id(row, location), _text(row, ("text",), location)))
        if parsed is None:
            continue
        query_id, query = parsed
        seen.add(query_id)
        ids, passages = _beir_positives(ctx, query_id, judged.get(query_id, []), texts, corpus_path)
        if passages:
            yield _retrieval(query, passages, [], location, query_id=query_id, pos_ids=ids)
        else:
            ctx.report.skip(f"query without a positive in {qrels_path.name}", location)
    for query_id in sorted(judged.keys() - seen):
        ctx.report.skip("qrels query id not in queries.jsonl", judged[query_id][0][1])


# ---- imports: sentence-transformers, FlagEmbedding, Tevatron ------------------------------------


def _st_negatives(ctx: Context, row: dict, location: str) -> list[str]:
    """negative / negatives, then negative_1 .. negative_n in numeric order."""
    numbered = sorted((int(m.group(1)), key) for key in row if (m := re.fullmatch(r"negative_(\d+)", key)))
    negatives = []
    for key in ("negative", "negatives", *(key for _, key in numbered)):
        negatives += ctx.texts(row, (key,), location, required=False)
    return negatives


def _st_triplet(ctx: Context, row: dict, location: str, args: argparse.Namespace) -> dict:
    query = _text(row, _names(args.anchor_field, ANCHOR_FIELDS), location)
    positives = ctx.texts(row, _names(args.positive_field, POSITIVE_FIELDS), location, required=True)
    return _retrieval(query, positives, _st_negatives(ctx, row, location), location)


def convert_st(ctx: Context, args: argparse.Namespace) -> Iterator[dict]:
    """sentence-transformers columns: anchor/positive/negative(_1..n) -> retrieval, or
    sentence1/sentence2/score -> sts. `--task auto` decides by the first record."""
    task = args.task
    for location, row in iter_rows(args.source):
        if task == "auto":
            is_pair = all(
                _find(row, _names(option, aliases))[0] is not None
                for option, aliases in ((args.text1_field, TEXT1_FIELDS), (args.text2_field, TEXT2_FIELDS))
            )
            task = "sts" if is_pair else "retrieval"
        if task == "sts":
            parsed = ctx.attempt(location, lambda: _pair_row(row, location, args))
            if parsed is not None:
                yield from _sts_records(*parsed, location, args.both_directions)
        else:
            record = ctx.attempt(location, lambda: _st_triplet(ctx, row, location, args))
            if record is not None:
                yield record


def _flag_record(ctx: Context, row: dict, location: str) -> dict:
    query = _text(row, ("query",), location)
    record = _retrieval(
        query,
        ctx.texts(row, ("pos",), location, required=True),
        ctx.texts(row, ("neg",), location, required=False),
        location,
    )
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise DataError(location, "prompt", f"expected a string, got {_type_name(prompt)}")
    if prompt and prompt.strip():
        record["instruction"] = prompt
    return record


def convert_flag(ctx: Context, args: argparse.Namespace) -> Iterator[dict]:
    """FlagEmbedding {query, pos: [..], neg: [..], prompt} -> retrieval (prompt -> instruction)."""
    for location, row in iter_rows(args.source):
        record = ctx.attempt(location, lambda: _flag_record(ctx, row, location))
        if record is not None:
            yield record


def _tevatron_passages(ctx: Context, row: dict, name: str, location: str, use_title: bool, required: bool):
    """(docids, texts) of a Tevatron passage list; empty passages dropped (counted)."""
    value = row.get(name)
    if value is None and not required:
        return [], []
    if not isinstance(value, list):
        raise DataError(location, name, f"expected a list of passages, got {_type_name(value)}")
    ids, texts = [], []
    for i, passage in enumerate(value):
        text = passage.get("text") if isinstance(passage, dict) else None
        title = passage.get("title") if isinstance(passage, dict) else None
        if not isinstance(text, str) or (title is not None and not isinstance(title, str)):
            raise DataError(location, f"{name}[{i}]", "expected {docid, title, text} with string title and text")
        ids.append(str(passage.get("docid") or ""))
        texts.append(_passage(title, text, use_title))
    kept = ctx.non_empty(texts, name, location, required)
    return [doc_id for doc_id, text in zip(ids, texts) if text.strip()], kept


def _tevatron_record(ctx: Context, row: dict, location: str, use_title: bool) -> dict:
    query = _text(row, ("query",), location)
    pos_ids, positives = _tevatron_passages(ctx, row, "positive_passages", location, use_title, True)
    _, negatives = _tevatron_passages(ctx, row, "negative_passages", location, use_title, False)
    extra = {"query_id": str(row["query_id"])} if "query_id" in row else {}
    if all(pos_ids):
        extra["pos_ids"] = pos_ids
    return _retrieval(query, positives, negatives, location, **extra)


def convert_tevatron(ctx: Context, args: argparse.Namespace) -> Iterator[dict]:
    """Tevatron {query, positive_passages, negative_passages} -> retrieval (title + " " + text)."""
    for location, row in iter_rows(args.source):
        record = ctx.attempt(location, lambda: _tevatron_record(ctx, row, location, not args.no_title))
        if record is not None:
            yield record


# ---- command line ------------------------------------------------------------------------------


def _int_labels(text: str) -> tuple[str, ...]:
    labels = tuple(part.strip().lower() for part in text.split(","))
    if sorted(labels) != sorted(NLI_LABELS):
        raise argparse.ArgumentTypeError(f"expected the three labels {', '.join(NLI_LABELS)} in some order")
    return labels


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("source", help="input file or directory")
    common.add_argument("target", help="output JSONL file")
    common.add_argument("--overwrite", action="store_true", help="replace an existing target")
    common.add_argument("--skip-invalid", action="store_true", help="skip (and count) malformed records")
    common.add_argument("--instruction", help="instruction for every record that has none of its own")
    common.add_argument(
        "--no-provenance", dest="provenance", action="store_false", help="omit source/turn/reversed/id fields"
    )
    return common


def _field_options(parser: argparse.ArgumentParser, **aliases: tuple[str, ...]) -> None:
    for name, names in aliases.items():
        flag = f"--{name.replace('_', '-')}-field"
        parser.add_argument(flag, metavar="NAME", help=f"source field (default: first of {', '.join(names)})")


def _sts_options(parser: argparse.ArgumentParser) -> None:
    directions = parser.add_mutually_exclusive_group()
    directions.add_argument(
        "--both-directions", action="store_true", help="also write every pair swapped (not for tpembed, see --help)"
    )
    directions.add_argument(
        "--one-direction", dest="both_directions", action="store_false", help="write each pair once (default)"
    )
    parser.set_defaults(both_directions=False)


def _score_options(parser: argparse.ArgumentParser) -> None:
    _field_options(parser, text1=TEXT1_FIELDS, text2=TEXT2_FIELDS, score=SCORE_FIELDS)
    parser.add_argument(
        "--score-range", nargs=2, type=float, metavar=("MIN", "MAX"), help="refuse scores outside [MIN, MAX]"
    )
    _sts_options(parser)


def _add_nli_kinds(kinds, common) -> None:
    for kind, function, help_text in (
        ("nli-pairs", convert_nli_pairs, "NLI -> sts pairs scored 2/1/0"),
        ("nli-triplets", convert_nli_triplets, "NLI grouped by premise -> retrieval triplets"),
    ):
        parser = kinds.add_parser(kind, parents=[common], help=help_text, description=help_text)
        _field_options(parser, premise=PREMISE_FIELDS, hypothesis=HYPOTHESIS_FIELDS, label=NLI_LABEL_FIELDS)
        parser.add_argument(
            "--int-labels",
            type=_int_labels,
            default=NLI_LABELS,
            metavar="L0,L1,L2",
            help="labels of integer classes 0,1,2 (default: entailment,neutral,contradiction)",
        )
        parser.set_defaults(converter=function)
        if kind == "nli-pairs":
            _sts_options(parser)
        else:
            parser.add_argument(
                "--keep-without-negatives", action="store_true", help="keep premises without a contradiction"
            )


def _add_text_kinds(kinds, common) -> None:
    pairs = kinds.add_parser("pairs", aliases=["sts"], parents=[common], help="scored pairs (STS, paraphrase) -> sts")
    _score_options(pairs)
    pairs.set_defaults(converter=convert_pairs)
    qa = kinds.add_parser("qa", aliases=["dialogue"], parents=[common], help="question/answer or chat -> retrieval")
    _field_options(qa, question=QUESTION_FIELDS, answer=ANSWER_FIELDS, messages=MESSAGES_FIELDS)
    qa.set_defaults(converter=convert_qa)
    title = kinds.add_parser("title-body", parents=[common], help="title -> body/abstract -> retrieval")
    _field_options(title, title=TITLE_FIELDS, body=BODY_FIELDS)
    title.set_defaults(converter=convert_title_body)
    claims = kinds.add_parser("claims", parents=[common], help="claim -> evidence with a verdict -> retrieval")
    _field_options(claims, claim=CLAIM_FIELDS, evidence=EVIDENCE_FIELDS, verdict=VERDICT_FIELDS)
    claims.set_defaults(converter=convert_claims)
    rc = kinds.add_parser("rc", parents=[common], help="reading comprehension -> retrieval")
    _field_options(rc, context=CONTEXT_FIELDS, question=QUESTION_FIELDS, answer=ANSWER_FIELDS)
    rc.add_argument(
        "--rc-query",
        choices=("context-question", "question"),
        default="context-question",
        help="context + separator + question -> answer (the method's, default), or question -> context",
    )
    rc.add_argument("--language", choices=tuple(RC_SEPARATORS), default="zh", help="separator language (default zh)")
    rc.add_argument("--rc-separator", metavar="TEXT", help="separator text; \\n and \\t are read as newline and tab")
    rc.set_defaults(converter=convert_rc)


def _add_label_kinds(kinds, common) -> None:
    parser = kinds.add_parser(
        "classification", aliases=["clustering"], parents=[common], help="(text, label/category) -> classification"
    )
    _field_options(parser, text=CLASS_TEXT_FIELDS, label=CLASS_LABEL_FIELDS)
    parser.add_argument(
        "--fixed-examples", action="store_true", help="write retrieval-shaped examples for other trainers"
    )
    parser.add_argument(
        "--num-negatives", type=int, metavar="K", help=f"with --fixed-examples (default {DEFAULT_NUM_NEGATIVES})"
    )
    parser.add_argument("--seed", type=int, metavar="S", help="with --fixed-examples (default 0)")
    parser.set_defaults(converter=convert_classification)


def _add_import_kinds(kinds, common) -> None:
    beir = kinds.add_parser("beir", parents=[common], help="BEIR directory -> retrieval")
    beir.add_argument("--split", default="train", help="qrels/SPLIT.tsv (default train)")
    beir.add_argument("--no-title", action="store_true", help="documents without their title")
    beir.set_defaults(converter=convert_beir)
    st = kinds.add_parser("st", parents=[common], help="sentence-transformers columns -> retrieval or sts")
    st.add_argument("--task", choices=("auto", "retrieval", "sts"), default="auto", help="default: by first record")
    _field_options(st, anchor=ANCHOR_FIELDS, positive=POSITIVE_FIELDS)
    _score_options(st)
    st.set_defaults(converter=convert_st)
    flag = kinds.add_parser("flag", parents=[common], help="FlagEmbedding {query, pos, neg, prompt} -> retrieval")
    flag.set_defaults(converter=convert_flag)
    tevatron = kinds.add_parser("tevatron", parents=[common], help="Tevatron passages -> retrieval")
    tevatron.add_argument("--no-title", action="store_true", help="passages without their title")
    tevatron.set_defaults(converter=convert_tevatron)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpembed-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    common = _common_options()
    _add_nli_kinds(kinds, common)
    _add_text_kinds(kinds, common)
    _add_label_kinds(kinds, common)
    _add_import_kinds(kinds, common)
    return parser


def _check_options(args: argparse.Namespace) -> None:
    """Fill option defaults that depend on other options; UsageError when they conflict."""
    source = Path(args.source)
    if not source.exists():
        raise UsageError(f"{source}: no such file or directory")
    if args.converter is convert_beir and not source.is_dir():
        raise UsageError(f"{source}: a BEIR source is a directory (corpus.jsonl, queries.jsonl, qrels/)")
    if getattr(args, "score_range", None) and args.score_range[0] > args.score_range[1]:
        raise UsageError("--score-range MIN MAX needs MIN <= MAX")
    if args.converter is convert_rc:
        separator = args.rc_separator if args.rc_separator is not None else RC_SEPARATORS[args.language]
        args.separator = separator.replace("\\n", "\n").replace("\\t", "\t")
    if args.converter is convert_classification:
        if not args.fixed_examples and (args.num_negatives is not None or args.seed is not None):
            raise UsageError("--num-negatives and --seed apply only with --fixed-examples")
        args.num_negatives = DEFAULT_NUM_NEGATIVES if args.num_negatives is None else args.num_negatives
        args.seed = 0 if args.seed is None else args.seed
        if args.num_negatives < 0:
            raise UsageError("--num-negatives must be 0 or more")


def _finish(record: dict, instruction: str | None, provenance: bool) -> dict:
    if instruction and not record.get("instruction"):
        record["instruction"] = instruction
    if not provenance:
        for name in PROVENANCE_FIELDS:
            record.pop(name, None)
    return record


def run(args: argparse.Namespace) -> WriteReport:
    """Convert as the parsed command line says; returns what was written and skipped."""
    _check_options(args)
    with jsonl_output(args.target, args.overwrite) as writer:
        ctx = Context(writer.report, args.skip_invalid)
        for record in args.converter(ctx, args):
            writer.write(_finish(record, args.instruction, args.provenance))
        if writer.report.written == 0:
            raise DataError(str(args.source), None, "nothing to write\n" + writer.report.summary(args.target))
    return writer.report


def convert(kind: str, source: str | Path, target: str | Path, **options: Any) -> WriteReport:
    """The command line as a function: convert("nli-triplets", src, dst, overwrite=True).

    `options` are the command-line options by their Python names (skip_invalid=True,
    premise_field="sentence1", int_labels=("entailment", "neutral", "contradiction"), ...)."""
    try:
        args = build_parser().parse_args([kind, str(source), str(target)])
    except SystemExit:
        raise ValueError(f"unknown kind {kind!r} (see tpembed-convert --help)") from None
    for name, value in options.items():
        if not hasattr(args, name):
            raise TypeError(f"{kind} has no option {name!r}")
        setattr(args, name, value)
    return run(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 0
    try:
        report = run(args)
    except (UsageError, OutputExistsError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except (DataError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(report.summary(args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
