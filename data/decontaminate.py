"""Remove training records that overlap evaluation data.

    tpembed-decontaminate train/msmarco.jsonl train/nli.jsonl \\
        --eval data/stsb_en/dev.jsonl data/xquad_retrieval/en --output-dir clean/
    python -m tpembed.data.decontaminate synth.jsonl --eval dev.jsonl --mteb-task STSBenchmark \\
        --output-dir clean/ --minhash 0.8 --drop-field-only

Training texts: in every record of every training file (anything tpembed reads: JSONL,
parquet, a directory of them, a saved dataset), each string or list of strings under a known
text field name: query|question|anchor, pos|positive|positives, text1|sentence1|premise,
text2|sentence2|hypothesis, text|sentence, negs|neg|negative|negatives|hard_negatives.
Instructions, labels and scores are not texts.

Evaluation texts, held in memory (evaluation sets are small; the training side is streamed):
  - a directory holding corpus.jsonl and/or queries.jsonl is BEIR: every query, and every
    document's title and text (the report names them "DIR/queries:<_id>", "DIR/corpus:<_id>");
  - any other file or directory is JSONL: every string (or list of strings) field is a text,
    except metadata such as ids, labels, scores and genre ("FILE:LINE");
  - --mteb-task NAME: the evaluation splits of an mteb task, loaded through mteb (needs
    `pip install 'tpembed[mteb]'` and the network; "mteb:NAME/<subset/split/part>:<id>").

Rules, tried in this order on every training text; the first that fires is reported:
  exact    equal to an evaluation text after normalisation: NFKC, casefold, every Unicode
           punctuation character (categories P*, so Chinese punctuation too) becomes a space,
           whitespace is collapsed, and spaces next to CJK characters are removed (CJK text
           is written without spaces, so "你好，世界" and "你好 世界" are the same text).
  ngram    shares one n-gram with an evaluation text: 13 consecutive words for space-separated
           text, 20 consecutive characters for CJK (Han, kana) text. 13 words is the window of
           the usual contamination checks (GPT-3's): long enough that ordinary phrasing almost
           never repeats by chance, short enough to find an evaluation sentence inside a long
           passage. A Chinese word is about 1.5 characters, so 20 characters carry about as
           much as 13 words. A text counts as CJK when at least half of its tokens are CJK
           characters; a Latin word or number inside it counts as one character (else a shared
           name such as "惠普公司(Hewlett-Packard Co.)" would be 20 shared characters), and runs
           of 13 non-CJK words inside it are compared as words too. A text shorter than n has
           no n-grams and is covered by the exact rule only.
  minhash  (--minhash T) near duplicates: the Jaccard similarity of the character 5-gram
           shingles of the normalised texts, estimated from 128 min-hashes with a fixed seed,
           is at least T; candidates are found by LSH banding.

Policy: a record is removed when any of its texts matches (query, positives, negatives, either
side of a pair, a classification text). With --drop-field-only, a retrieval record whose only
matches are hard negatives keeps its place and loses just those negatives.

Outputs in --output-dir: one file per training file, with its name (a parquet file or a
directory becomes NAME.jsonl; files of the same name, such as two datasets' train.jsonl, go
under their folders' names: stsb_zh/train.jsonl), holding the kept records;
decontamination_report.jsonl, one line per removed record or dropped negative ({source, field,
rule, eval, eval_field, train_text, eval_text, action}); decontamination_summary.json, the
counts also printed at the end. Every output is written atomically, all of them only when every
file was read without error, and an existing one is refused unless --overwrite.

Exit codes: 0 done, 1 a data error (the message names file:line and field), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from tpembed.data.formats import (
    NEGATIVE_FIELDS,
    POSITIVE_FIELDS,
    QUERY_FIELDS,
    TEXT1_FIELDS,
    TEXT2_FIELDS,
    TEXT_FIELDS,
    DataError,
    iter_rows,
)
from tpembed.data.io import OutputExistsError, atomic_path, jsonl_output

WORD_NGRAM = 13
CJK_NGRAM = 20
SHINGLE = 5
NUM_PERMUTATIONS = 128
MINHASH_SEED = 1234
RULES = ("exact", "ngram", "minhash")
REPORT_NAME = "decontamination_report.jsonl"
SUMMARY_NAME = "decontamination_summary.json"
MTEB_EXTRA_HINT = "pip install 'tpembed[mteb]'"
PREVIEW_CHARS = 200

# negatives last: with drop_field_only every other field has been checked before the first negative
TRAIN_TEXT_FIELDS = (*QUERY_FIELDS, *POSITIVE_FIELDS, *TEXT1_FIELDS, *TEXT2_FIELDS, *TEXT_FIELDS, *NEGATIVE_FIELDS)
# string fields of evaluation records that describe a record rather than hold its text
EVAL_METADATA_FIELDS = frozenset(
    {"_id", "id", "idx", "orig_id", "pair_id", "label", "labels", "score", "genre", "lang", "language", "split"}
    | {"source", "url", "instruction", "relevant_docs", "top_ranked"}
)
# Han (with extensions and compatibility ideographs), hiragana and katakana: scripts written without spaces
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_SPACE_NEXT_TO_CJK = re.compile(f" (?=[{_CJK}])|(?<=[{_CJK}]) ")
_TOKEN = re.compile(f"[{_CJK}]|[^ {_CJK}]+")
_PRIME = 4294967291  # the largest prime below 2**32: a * x + b stays below 2**64 in uint64
_SPLIT_NAMES = frozenset({"train", "dev", "validation", "valid", "test"})


class UsageError(ValueError):
    """A request that cannot run as given (exit code 2): existing outputs, clashing names, a missing extra."""


# ---- normalisation and n-grams ---------------------------------------------------------


@lru_cache(maxsize=1)
def _punctuation_to_space() -> dict[int, str]:
    """str.translate table: every Unicode punctuation code point (categories P*) -> a space."""
    return {c: " " for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c))[0] == "P"}


def normalize(text: str) -> str:
    """The form texts are compared in: NFKC, casefold, punctuation -> space, whitespace collapsed,
    no spaces next to CJK characters. Punctuation becomes a space rather than nothing so that
    "end.Start" and "end. Start" agree."""
    text = unicodedata.normalize("NFKC", text).casefold().translate(_punctuation_to_space())
    return _SPACE_NEXT_TO_CJK.sub("", " ".join(text.split()))


def _is_cjk(token: str) -> bool:
    return len(token) == 1 and _CJK_CHAR.match(token) is not None


@dataclass(frozen=True)
class NormalizedText:
    """A text's normalised form, its tokens (a CJK character is one token, anything else
    between spaces is a word) and whether it counts as CJK text (at least half its tokens)."""

    key: str
    tokens: tuple[str, ...]
    cjk: bool

    @classmethod
    def of(cls, text: str) -> NormalizedText:
        key = normalize(text)
        tokens = tuple(_TOKEN.findall(key))
        cjk_tokens = sum(1 for token in tokens if _is_cjk(token))
        return cls(key, tokens, cjk_tokens > 0 and 2 * cjk_tokens >= len(tokens))


def ngrams(text: NormalizedText, word_n: int = WORD_NGRAM, cjk_n: int = CJK_NGRAM) -> Iterator[tuple[str, ...]]:
    """The text's n-grams as token tuples, lazily (a caller looking for one hit stops early):
    word n-grams over every run of non-CJK words, and for CJK text cjk_n-grams over all its
    tokens (mostly single characters; a Latin word inside counts as one token, so a shared
    transliterated name is not 20 shared letters). The two lengths differ, so the two kinds
    never collide in one index."""
    run: list[str] = []
    for token in (*text.tokens, None):
        if token is not None and not _is_cjk(token):
            run.append(token)
            continue
        for start in range(len(run) - word_n + 1):
            yield tuple(run[start : start + word_n])
        run = []
    if text.cjk:
        for start in range(len(text.tokens) - cjk_n + 1):
            yield text.tokens[start : start + cjk_n]


# ---- MinHash ---------------------------------------------------------------------------


def _band_rows(threshold: float, num_permutations: int) -> int:
    """Rows per LSH band: the most (fewest candidates) that still make a pair at the threshold
    a candidate with probability >= 0.99; candidates are then checked on the whole signature."""
    for rows in (16, 8, 4, 2):
        bands = num_permutations // rows
        if num_permutations % rows == 0 and 1 - (1 - threshold**rows) ** bands >= 0.99:
            return rows
    return 1


class MinHashIndex:
    """Near-duplicate search: MinHash signatures of character shingles, LSH-banded buckets.

    Shingles are hashed with CRC-32 (stable across processes) and permuted by
    (a * x + b) mod p with a and b drawn from a fixed seed, so signatures are reproducible."""

    def __init__(self, threshold: float, num_permutations: int = NUM_PERMUTATIONS, seed: int = MINHASH_SEED):
        if not 0 < threshold <= 1:
            raise UsageError(f"the MinHash threshold must be in (0, 1], got {threshold}")
        rng = np.random.default_rng(seed)
        self.threshold = threshold
        self._a = rng.integers(1, _PRIME, size=num_permutations, dtype=np.uint64)
        self._b = rng.integers(0, _PRIME, size=num_permutations, dtype=np.uint64)
        self.rows = _band_rows(threshold, num_permutations)
        self._buckets: dict[tuple[int, bytes], list[int]] = {}
        self._signatures: list[np.ndarray] = []
        self._ids: list[int] = []

    def signature(self, key: str) -> np.ndarray | None:
        """The min-hash signature of a normalised text; None when it is shorter than a shingle."""
        shingles = {key[i : i + SHINGLE] for i in range(len(key) - SHINGLE + 1)}
        if not shingles:
            return None
        hashes = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles), np.uint64, len(shingles)) % _PRIME
        return ((self._a[:, None] * hashes[None, :] + self._b[:, None]) % _PRIME).min(axis=1)

    def _bands(self, signature: np.ndarray) -> Iterator[tuple[int, bytes]]:
        for band, start in enumerate(range(0, len(signature), self.rows)):
            yield band, signature[start : start + self.rows].tobytes()

    def add(self, key: str, item: int) -> None:
        signature = self.signature(key)
        if signature is None:
            return
        for bucket in self._bands(signature):
            self._buckets.setdefault(bucket, []).append(len(self._ids))
        self._signatures.append(signature)
        self._ids.append(item)

    def query(self, key: str) -> tuple[int, float] | None:
        """(item, estimated Jaccard similarity) of the most similar indexed text at or above
        the threshold, or None."""
        signature = self.signature(key)
        if signature is None:
            return None
        candidates = {slot for bucket in self._bands(signature) for slot in self._buckets.get(bucket, ())}
        best = None
        for slot in sorted(candidates):
            similarity = float(np.mean(self._signatures[slot] == signature))
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (self._ids[slot], similarity)
        return best


# ---- the index -------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalText:
    """One evaluation text: where it is ("dev.jsonl:3", "beir/queries:q1"), its field, the
    text, and the evaluation set it belongs to (for the summary)."""

    ref: str
    field: str
    text: str
    eval_set: str


@dataclass(frozen=True)
class Match:
    """Why a text counts as contaminated: the rule, the evaluation text, and for MinHash the
    estimated Jaccard similarity."""

    rule: str
    eval_text: EvalText
    similarity: float | None = None


class _FieldText(NamedTuple):
    label: str  # "pos[0]", "query"
    name: str  # the record's key
    index: int | None  # position in a list value
    text: str


@dataclass
class Finding:
    """A matched training text: `action` is "record" (the record was removed) or "field"
    (only this hard negative was dropped, with drop_field_only)."""

    field: str
    text: str
    match: Match
    action: str

    def report_line(self, source: str) -> dict:
        line = {
            "source": source,
            "field": self.field,
            "rule": self.match.rule,
            "eval": self.match.eval_text.ref,
            "eval_field": self.match.eval_text.field,
            "train_text": self.text[:PREVIEW_CHARS],
            "eval_text": self.match.eval_text.text[:PREVIEW_CHARS],
            "action": self.action,
        }
        if self.match.similarity is not None:
            line["similarity"] = round(self.match.similarity, 4)
        return line


@dataclass
class RecordCheck:
    """The outcome for one training record: what to keep (None: remove it) and why."""

    record: dict | None
    findings: list[Finding]


class Decontaminator:
    """Evaluation texts indexed for the three rules; `match` checks one text, `check_record`
    one training record. Build it once and reuse it (the LLM-synthesis step checks its
    generated records with it)."""

    def __init__(self, eval_texts: Iterable[EvalText], minhash_threshold: float | None = None):
        self.eval_texts: list[EvalText] = []
        self._exact: dict[str, int] = {}
        self._ngrams: dict[tuple[str, ...], int] = {}
        self._minhash = MinHashIndex(minhash_threshold) if minhash_threshold is not None else None
        for eval_text in eval_texts:
            self.add(eval_text)

    @classmethod
    def from_sources(
        cls, sources: Iterable[str | Path] = (), mteb_tasks: Iterable[str] = (), minhash_threshold: float | None = None
    ) -> Decontaminator:
        """Index local evaluation files or BEIR directories, and mteb tasks by name."""
        decontaminator = cls((), minhash_threshold)
        for source in sources:
            decontaminator.extend(load_eval_texts(source), str(source))
        for task in mteb_tasks:
            decontaminator.extend(load_mteb_texts(task), f"mteb:{task}")
        return decontaminator

    def __len__(self) -> int:
        return len(self.eval_texts)

    def add(self, eval_text: EvalText) -> None:
        normalized = NormalizedText.of(eval_text.text)
        if not normalized.key:
            return
        item = len(self.eval_texts)
        self.eval_texts.append(eval_text)
        self._exact.setdefault(normalized.key, item)
        for gram in ngrams(normalized):
            self._ngrams.setdefault(gram, item)
        if self._minhash is not None:
            self._minhash.add(normalized.key, item)

    def extend(self, eval_texts: Iterable[EvalText], source: str) -> None:
        """Add a source's texts; a source without any is an error (a wrong path or layout)."""
        before = len(self)
        for eval_text in eval_texts:
            self.add(eval_text)
        if len(self) == before:
            raise DataError(source, None, "holds no evaluation texts")

    def match(self, text: str) -> Match | None:
        """The first rule that finds `text` in the evaluation data (exact, ngram, minhash)."""
        normalized = NormalizedText.of(text)
        if not normalized.key:
            return None
        return self.match_exact(normalized) or self.match_ngram(normalized) or self.match_minhash(normalized)

    def match_exact(self, text: NormalizedText) -> Match | None:
        item = self._exact.get(text.key)
        return None if item is None else Match("exact", self.eval_texts[item])

    def match_ngram(self, text: NormalizedText) -> Match | None:
        for gram in ngrams(text):
            item = self._ngrams.get(gram)
            if item is not None:
                return Match("ngram", self.eval_texts[item])
        return None

    def match_minhash(self, text: NormalizedText) -> Match | None:
        found = self._minhash.query(text.key) if self._minhash is not None else None
        return None if found is None else Match("minhash", self.eval_texts[found[0]], found[1])

    def check_record(self, record: dict, location: str = "", drop_field_only: bool = False) -> RecordCheck:
        """Keep, trim or remove one training record (see the module docstring for the policy)."""
        findings = []
        for entry in record_texts(record, location):
            match = self.match(entry.text)
            if match is None:
                continue
            if not drop_field_only or entry.name not in NEGATIVE_FIELDS:
                return RecordCheck(None, [Finding(entry.label, entry.text, match, "record")])
            findings.append((entry, match))
        if not findings:
            return RecordCheck(record, [])
        return RecordCheck(
            _without_negatives(record, [entry for entry, _ in findings]),
            [Finding(entry.label, entry.text, match, "field") for entry, match in findings],
        )


def record_texts(record: dict, location: str = "") -> Iterator[_FieldText]:
    """The texts of a training record, in TRAIN_TEXT_FIELDS order (negatives last)."""
    for name in TRAIN_TEXT_FIELDS:
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            yield _FieldText(name, name, None, value)
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            for index, item in enumerate(value):
                yield _FieldText(f"{name}[{index}]", name, index, item)
        else:
            raise DataError(location, name, f"expected a string or a list of strings, got {type(value).__name__}")


def _without_negatives(record: dict, dropped: list[_FieldText]) -> dict:
    """A copy of the record without the dropped hard negatives (a string value becomes [])."""
    trimmed = dict(record)
    for name in {entry.name for entry in dropped}:
        indices = {entry.index for entry in dropped if entry.name == name}
        value = record[name]
        trimmed[name] = [] if isinstance(value, str) else [v for i, v in enumerate(value) if i not in indices]
    return trimmed


# ---- evaluation sources ----------------------------------------------------------------


def load_eval_texts(source: str | Path) -> Iterator[EvalText]:
    """The texts of a local evaluation source: a BEIR directory (corpus.jsonl / queries.jsonl)
    or JSONL records whose string fields, metadata aside, are texts."""
    path = Path(source)
    if path.is_dir() and ((path / "corpus.jsonl").is_file() or (path / "queries.jsonl").is_file()):
        yield from _beir_texts(path)
        return
    for location, row in iter_rows(path):
        for name, value in row.items():
            if name not in EVAL_METADATA_FIELDS:
                for label, text in _string_values(name, value):
                    yield EvalText(location, label, text, str(source))


def _string_values(name: str, value) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(name, value)]
    if isinstance(value, list):
        return [(f"{name}[{i}]", item) for i, item in enumerate(value) if isinstance(item, str)]
    return []


def _beir_texts(root: Path) -> Iterator[EvalText]:
    for part, names in (("queries", ("text",)), ("corpus", ("title", "text"))):
        path = root / f"{part}.jsonl"
        if not path.is_file():
            continue
        for location, row in iter_rows(path):
            if "_id" not in row:
                raise DataError(location, "_id", "missing (every BEIR row needs an _id)")
            for name in names:
                value = row.get(name)
                if value is not None and not isinstance(value, str):
                    raise DataError(location, name, f"expected a string, got {type(value).__name__}")
                if value:
                    yield EvalText(f"{root}/{part}:{row['_id']}", name, value, str(root))


def load_mteb_texts(task_name: str) -> list[EvalText]:
    """The evaluation-split texts of an mteb task, loaded through mteb (network access)."""
    try:
        import mteb
    except ImportError:
        raise UsageError(f"--mteb-task needs the mteb package: {MTEB_EXTRA_HINT}") from None
    try:
        task = mteb.get_task(task_name)
        task.load_data()
    except Exception as error:  # mteb and the hub raise many kinds; all mean "not loaded"
        problem = f"could not load the task through mteb ({type(error).__name__}: {error})"
        raise DataError(f"mteb:{task_name}", None, problem) from None
    eval_splits = frozenset(getattr(task.metadata, "eval_splits", None) or ())
    parts = {"dataset": getattr(task, "dataset", None)}
    for name in ("corpus", "queries"):  # mteb 1.x keeps retrieval texts outside `dataset`
        if isinstance(getattr(task, name, None), dict):
            parts[name] = getattr(task, name)
    eval_set = f"mteb:{task_name}"
    return [
        EvalText(f"{eval_set}/{path}", name, text, eval_set)
        for part, value in parts.items()
        for path, name, text in _walk_mteb(value, part, eval_splits)
    ]


def _walk_mteb(value, path: str, eval_splits: frozenset, name: str = "text") -> Iterator[tuple[str, str, str]]:
    """(where, field, text) of every string in an mteb data structure; `name` is the nearest
    dict key above. Where a level is keyed by split names, only the evaluation splits are kept."""
    if isinstance(value, str):
        if value.strip():
            yield path, name, value
    elif isinstance(value, dict):
        keys = [key for key in value if str(key) not in EVAL_METADATA_FIELDS]
        if eval_splits & set(map(str, keys)) and _SPLIT_NAMES | eval_splits >= set(map(str, keys)):
            keys = [key for key in keys if str(key) in eval_splits]
        for key in keys:
            yield from _walk_mteb(value[key], f"{path}/{key}", eval_splits, str(key))
    elif hasattr(value, "column_names"):  # a datasets.Dataset: rows are dicts
        for number, row in enumerate(value):
            row_id = row.get("id", row.get("_id", number))
            for key, item in row.items():
                if key not in EVAL_METADATA_FIELDS:
                    for label, text in _string_values(key, item):
                        yield f"{path}:{row_id}", label, text
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _walk_mteb(item, f"{path}:{index}", eval_splits, name)


# ---- files -----------------------------------------------------------------------------


@dataclass
class Summary:
    """Counts of one decontamination run (printed, and saved as decontamination_summary.json)."""

    eval_texts: int = 0
    records_read: int = 0
    records_kept: int = 0
    records_removed: int = 0
    negatives_dropped: int = 0
    removed_by_rule: Counter = field(default_factory=Counter)
    removed_by_eval_set: Counter = field(default_factory=Counter)
    files: dict[str, dict] = field(default_factory=dict)

    def add(self, source: str, check: RecordCheck) -> None:
        counts = self.files[source]
        self.records_read += 1
        counts["read"] += 1
        if check.record is None:
            self.records_removed += 1
            counts["removed"] += 1
            self.removed_by_rule[check.findings[0].match.rule] += 1
            self.removed_by_eval_set[check.findings[0].match.eval_text.eval_set] += 1
            return
        self.records_kept += 1
        counts["kept"] += 1
        self.negatives_dropped += len(check.findings)
        counts["negatives_dropped"] += len(check.findings)

    def to_dict(self) -> dict:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["removed_by_rule"] = {rule: self.removed_by_rule.get(rule, 0) for rule in RULES}
        data["removed_by_eval_set"] = dict(self.removed_by_eval_set.most_common())
        return data

    def format(self) -> str:
        lines = [
            f"evaluation texts indexed: {self.eval_texts}",
            f"records read {self.records_read}, kept {self.records_kept}, removed {self.records_removed}"
            + (f", hard negatives dropped {self.negatives_dropped}" if self.negatives_dropped else ""),
            "removed by rule: " + ", ".join(f"{rule} {self.removed_by_rule.get(rule, 0)}" for rule in RULES),
        ]
        lines += [f"removed by {eval_set}: {count}" for eval_set, count in self.removed_by_eval_set.most_common()]
        lines += [
            f"{source} -> {counts['output']}: kept {counts['kept']} of {counts['read']}"
            for source, counts in self.files.items()
        ]
        return "\n".join(lines)


def output_name(train_path: str | Path) -> str:
    """The output file name of a training source: its own name, as .jsonl for parquet or a directory."""
    path = Path(train_path)
    if path.is_dir():
        return f"{path.name}.jsonl"
    return path.with_suffix(".jsonl").name if path.suffix == ".parquet" else path.name


def _plan_outputs(train_paths: Sequence[str | Path], output_dir: Path, overwrite: bool) -> dict[str, Path]:
    """Training source -> output path, refusing clashes, inputs as outputs and existing files.
    Sources that share a name (the train.jsonl of several datasets) are written under their
    folder's name: stsb_zh/train.jsonl -> OUTPUT_DIR/stsb_zh/train.jsonl."""
    sources = list(map(str, train_paths))
    twice = [source for source, count in Counter(sources).items() if count > 1]
    if twice:
        raise UsageError(f"{twice[0]}: given twice")
    names = {source: output_name(source) for source in sources}
    shared = {name for name, count in Counter(names.values()).items() if count > 1}
    targets: dict[str, Path] = {}
    for source, name in names.items():
        if name in shared:
            name = f"{Path(source).resolve().parent.name}/{name}"
        target = output_dir / name
        if target.name in (REPORT_NAME, SUMMARY_NAME) or target in targets.values():
            raise UsageError(f"{source}: its output {target} clashes with another output; rename the file")
        if target.resolve() == Path(source).resolve():
            raise UsageError(f"{source}: the output would replace the input; choose another --output-dir")
        targets[source] = target
    if not overwrite:
        for target in (*targets.values(), output_dir / REPORT_NAME, output_dir / SUMMARY_NAME):
            if target.exists():
                raise OutputExistsError(f"{target} exists; pass --overwrite to replace it")
    return targets


def decontaminate(
    train_paths: Sequence[str | Path],
    eval_sources: Sequence[str | Path] | Decontaminator,
    output_dir: str | Path,
    *,
    mteb_tasks: Sequence[str] = (),
    minhash_threshold: float | None = None,
    drop_field_only: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Summary:
    """Write the kept records of every training file, the report and the summary to
    `output_dir`; `eval_sources` are evaluation files/BEIR directories or a built Decontaminator.
    Nothing is written unless every file is read without error."""
    output_dir = Path(output_dir)
    targets = _plan_outputs(train_paths, output_dir, overwrite)
    if isinstance(eval_sources, Decontaminator):
        if mteb_tasks or minhash_threshold is not None:
            raise UsageError("mteb_tasks and minhash_threshold belong to the Decontaminator when one is given")
        decontaminator = eval_sources
    else:
        decontaminator = Decontaminator.from_sources(eval_sources, mteb_tasks, minhash_threshold)
    summary = Summary(eval_texts=len(decontaminator))
    with ExitStack() as outputs:
        report = outputs.enter_context(jsonl_output(output_dir / REPORT_NAME, overwrite))
        for source, target in targets.items():
            writer = outputs.enter_context(jsonl_output(target, overwrite))
            summary.files[source] = {"output": str(target), "read": 0, "kept": 0, "removed": 0, "negatives_dropped": 0}
            rows = tqdm(iter_rows(source), desc=Path(source).name, unit=" records", disable=not progress)
            for location, record in rows:
                check = decontaminator.check_record(record, location, drop_field_only)
                summary.add(source, check)
                for finding in check.findings:
                    report.write(finding.report_line(location))
                if check.record is not None:
                    writer.write(check.record)
    with atomic_path(output_dir / SUMMARY_NAME, overwrite) as staging:
        staging.write_text(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


# ---- command line ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpembed-decontaminate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("train", nargs="+", help="training record files (JSONL, parquet, directories)")
    parser.add_argument("--eval", nargs="+", action="extend", default=[], help="evaluation JSONL files, BEIR dirs")
    parser.add_argument("--mteb-task", action="append", default=[], help="an mteb task's evaluation splits")
    parser.add_argument("--output-dir", required=True, help="where the kept records and the report go")
    parser.add_argument("--minhash", type=float, metavar="THRESHOLD", help="also remove near duplicates (e.g. 0.8)")
    parser.add_argument("--drop-field-only", action="store_true", help="drop matching hard negatives, keep the rest")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    if not args.eval and not args.mteb_task:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: give evaluation data with --eval or --mteb-task", file=sys.stderr)
        return 2
    try:
        summary = decontaminate(
            args.train,
            args.eval,
            args.output_dir,
            mteb_tasks=args.mteb_task,
            minhash_threshold=args.minhash,
            drop_field_only=args.drop_field_only,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (UsageError, OutputExistsError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except DataError as error:
        print(f"{parser.prog}: data error: {error}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
