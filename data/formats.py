"""Reading training records: retrieval, sts and classification, from JSONL, parquet
or a `datasets` dataset saved to disk.

Every source becomes one of three task types (docs/method.md section 3):

    retrieval       {"query", "pos", "negs", "instruction"}
    sts             {"text1", "text2", "score", "instruction"}
    classification  {"text", "label", "instruction"}

Accepted aliases: pos|positive|positives (a string or a list), negs|neg|negative|
negatives|hard_negatives, text1|sentence1|premise, text2|sentence2|hypothesis,
score|label for sts (NLI labels entailment/neutral/contradiction become 2/1/0,
booleans 1/0). A record's own `instruction` wins over the dataset's.

Empty texts: an empty query, positive, sts text or classification text is an
error (a training example without content is almost always a data bug); set
`allow_empty_text` to render it as "Null" instead (docs/method.md 4.1). Empty hard
negatives are dropped. Any malformed record raises DataError naming the file,
the line (JSONL) or row (parquet, arrow), and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

NLI_SCORES = {"entailment": 2.0, "neutral": 1.0, "contradiction": 0.0}

QUERY_FIELDS = ("query", "question", "anchor")
POSITIVE_FIELDS = ("pos", "positive", "positives")
NEGATIVE_FIELDS = ("negs", "neg", "negative", "negatives", "hard_negatives")
TEXT1_FIELDS = ("text1", "sentence1", "premise")
TEXT2_FIELDS = ("text2", "sentence2", "hypothesis")
SCORE_FIELDS = ("score", "label")
TEXT_FIELDS = ("text", "sentence")
LABEL_FIELDS = ("label",)


class Task(str, Enum):
    retrieval = "retrieval"
    sts = "sts"
    classification = "classification"


class DataError(ValueError):
    """A record that cannot be used; the message names file, line/row and field."""

    def __init__(self, location: str, field_name: str | None, problem: str):
        self.location = location
        self.field_name = field_name
        self.problem = problem
        where = f"{location}: field '{field_name}'" if field_name else location
        super().__init__(f"{where}: {problem}")


class _Columns:
    """Columns are lists, or columns of the Arrow cache (data/store.py StoredColumn) that
    answer `column[i]` the same way; a cached dataset stores its distinct instructions."""

    distinct: set[str] | None = None
    cache_path = None  # the Arrow cache directory (data/store.py), if any

    @property
    def distinct_instructions(self) -> set[str]:
        if self.distinct is None:
            self.distinct = {i for i in self.instructions if i is not None}
        return self.distinct


@dataclass
class RetrievalData(_Columns):
    name: str
    queries: list[str] = field(default_factory=list)
    positives: list[list[str]] = field(default_factory=list)
    negatives: list[list[str]] = field(default_factory=list)
    instructions: list[str | None] = field(default_factory=list)
    task: Task = Task.retrieval

    def __len__(self) -> int:
        return len(self.queries)


@dataclass
class PairData(_Columns):
    name: str
    texts1: list[str] = field(default_factory=list)
    texts2: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    instructions: list[str | None] = field(default_factory=list)
    task: Task = Task.sts

    def __len__(self) -> int:
        """Every pair is used in both directions (docs/method.md section 3)."""
        return 2 * len(self.texts1)


@dataclass
class ClassificationData(_Columns):
    name: str
    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    instructions: list[str | None] = field(default_factory=list)
    task: Task = Task.classification

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class ReadReport:
    """What reading changed without failing (shown by `validate` and at start-up)."""

    dropped_empty_negatives: int = 0
    placeholder_in_text: list[str] = field(default_factory=list)  # locations
    dropped_singleton_labels: int = 0


def iter_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield (location, record) from a JSONL file, a parquet file, a saved `datasets`
    dataset, or a directory of JSONL/parquet files."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), None, "no such file or directory")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            yield from _iter_arrow(path)
            return
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise DataError(str(path), None, "directory holds no .jsonl or .parquet files and is not a saved dataset")
        for file in files:
            yield from iter_rows(file)
        return
    if path.suffix == ".parquet":
        yield from _iter_parquet(path)
        return
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            location = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    location, None, f"not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(location, None, f"invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DataError(location, None, f"expected a JSON object, got {type(record).__name__}")
            yield location, record


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    for number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path} row {number}", record


def _iter_arrow(path: Path) -> Iterator[tuple[str, dict]]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(path))
    if hasattr(dataset, "keys"):  # a DatasetDict: take the train split
        if "train" not in dataset:
            raise DataError(str(path), None, f"saved DatasetDict has no 'train' split (splits: {list(dataset)})")
        dataset = dataset["train"]
    for number, record in enumerate(dataset, start=1):
        yield f"{path} row {number}", record


# the canonical row of each task, in this order (the columns of a converted dataset)
COLUMNS = {
    Task.retrieval: ("query", "pos", "negs", "instruction"),
    Task.sts: ("text1", "text2", "score", "instruction"),
    Task.classification: ("text", "label", "instruction"),
}


class RecordParser:
    """Validates one record into its task's canonical row (COLUMNS order); DataError names the
    location and the field. What it changes without failing goes to `report`."""

    def __init__(
        self,
        task: Task | str,
        *,
        allow_empty_text: bool = False,
        score_range: tuple[float, float] | None = None,
        placeholder: str | None = None,
        report: ReadReport | None = None,
        required_negatives: int = 0,
    ):
        self.task = Task(task)
        self.score_range = score_range
        self.required_negatives = required_negatives
        self.report = report if report is not None else ReadReport()
        self.reader = _RecordReader(allow_empty_text, placeholder, self.report)

    def __call__(self, record: dict, location: str) -> tuple:
        reader = self.reader
        if self.task is Task.retrieval:
            query = reader.text(record, QUERY_FIELDS, location)
            positives = reader.text_list(record, POSITIVE_FIELDS, location, required=True)
            negatives = reader.text_list(record, NEGATIVE_FIELDS, location, required=False)
            if len(negatives) < self.required_negatives:
                raise DataError(
                    location,
                    "negs",
                    f"{len(negatives)} hard negatives, {self.required_negatives} required "
                    "(data.hard_negative_fallback: error; 'repeat' or 'random' fill the gap instead)",
                )
            return query, positives, negatives, reader.instruction(record, location)
        if self.task is Task.sts:
            text1 = reader.text(record, TEXT1_FIELDS, location)
            text2 = reader.text(record, TEXT2_FIELDS, location)
            return text1, text2, reader.score(record, location, self.score_range), reader.instruction(record, location)
        text = reader.text(record, TEXT_FIELDS, location)
        label_field, label = _first_present(record, LABEL_FIELDS)
        if label_field is None or label is None or isinstance(label, (list, dict)) or str(label) == "":
            raise DataError(location, "label", "missing or not a single label (string or integer)")
        return text, str(label), reader.instruction(record, location)


def read_dataset(
    path: str | Path,
    task: Task | str,
    name: str,
    *,
    allow_empty_text: bool = False,
    score_range: tuple[float, float] | None = None,
    placeholder: str | None = None,
    report: ReadReport | None = None,
    required_negatives: int = 0,
):
    """Read and validate one dataset into memory: RetrievalData, PairData or ClassificationData.
    (Training reads through data/store.py, which converts once to Arrow files.)

    `required_negatives` > 0 makes a retrieval record with fewer hard negatives an error
    (the `error` hard-negative fallback)."""
    parse = RecordParser(task, allow_empty_text=allow_empty_text, score_range=score_range, placeholder=placeholder,
                         report=report, required_negatives=required_negatives)  # fmt: skip
    rows = [parse(record, location) for location, record in iter_rows(path)]
    columns = [list(column) for column in zip(*rows)] if rows else [[] for _ in COLUMNS[parse.task]]
    if parse.task is Task.retrieval:
        data = RetrievalData(name, *columns)
    elif parse.task is Task.sts:
        data = PairData(name, *columns)
    else:
        texts, labels, instructions = columns
        label_ids: dict[str, int] = {}
        ids = [label_ids.setdefault(label, len(label_ids)) for label in labels]
        data = ClassificationData(name, texts, ids, list(label_ids), instructions)
        _drop_singleton_labels(data, parse.report)
        check_labels(path, data.labels, len(label_ids))
    if len(data) == 0:
        raise DataError(str(path), None, "the dataset holds no records")
    return data


def check_labels(path, labels, num_labels: int) -> None:
    """A classification dataset needs two labels that each have two texts (after singletons went)."""
    kept = len(set(labels))
    if kept < 2:
        raise DataError(
            str(path),
            "label",
            f"a classification dataset needs at least two labels with two texts each, found {kept} (of "
            f"{num_labels} labels)",
        )


class _RecordReader:
    def __init__(self, allow_empty_text: bool, placeholder: str | None, report: ReadReport):
        self.allow_empty_text = allow_empty_text
        self.placeholder = placeholder
        self.report = report

    def _check_placeholder(self, value: str, location: str, field_name: str) -> None:
        if self.placeholder and self.placeholder in value:
            self.report.placeholder_in_text.append(f"{location} ({field_name})")

    def text(self, record: dict, names: tuple[str, ...], location: str) -> str:
        field_name, value = _first_present(record, names)
        if field_name is None:
            raise DataError(location, names[0], f"missing (accepted names: {', '.join(names)})")
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise DataError(location, field_name, f"expected a string, got {type(value).__name__}")
        self._check_placeholder(value, location, field_name)
        if not value.strip() and not self.allow_empty_text:
            raise DataError(location, field_name, "empty text (set allow_empty_text to render it as 'Null')")
        return value

    def text_list(self, record: dict, names: tuple[str, ...], location: str, required: bool) -> list[str]:
        field_name, value = _first_present(record, names)
        if field_name is None or value is None:
            if required:
                raise DataError(location, names[0], f"missing (accepted names: {', '.join(names)})")
            return []
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise DataError(location, field_name, "expected a string or a list of strings")
        for v in values:
            self._check_placeholder(v, location, field_name)
        if required:
            if not values:
                raise DataError(location, field_name, "empty list")
            if not all(v.strip() for v in values) and not self.allow_empty_text:
                raise DataError(location, field_name, "empty text (set allow_empty_text to render it as 'Null')")
            return values
        kept = [v for v in values if v.strip()]
        self.report.dropped_empty_negatives += len(values) - len(kept)
        return kept

    def score(self, record: dict, location: str, score_range: tuple[float, float] | None) -> float:
        field_name, value = _first_present(record, SCORE_FIELDS)
        if field_name is None:
            raise DataError(location, "score", "missing (a number, or an NLI label in 'label')")
        if isinstance(value, bool):
            score = float(value)
        elif isinstance(value, (int, float)):
            score = float(value)
        elif isinstance(value, str) and value.strip().lower() in NLI_SCORES:
            score = NLI_SCORES[value.strip().lower()]
        else:
            raise DataError(
                location,
                field_name,
                f"{value!r} is neither a number nor an NLI label ({', '.join(NLI_SCORES)})",
            )
        if score != score or score in (float("inf"), float("-inf")):
            raise DataError(location, field_name, f"score {value!r} is not finite")
        if score_range is not None and not score_range[0] <= score <= score_range[1]:
            raise DataError(
                location,
                field_name,
                f"score {score} is outside the declared range [{score_range[0]}, {score_range[1]}]",
            )
        return score

    def instruction(self, record: dict, location: str) -> str | None:
        value = record.get("instruction")
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise DataError(location, "instruction", f"expected a string, got {type(value).__name__}")
        self._check_placeholder(value, location, "instruction")
        return value


def _drop_singleton_labels(data: ClassificationData, report: ReadReport) -> None:
    """A text whose label no other text shares has no positive: drop it."""
    counts: dict[int, int] = {}
    for label in data.labels:
        counts[label] = counts.get(label, 0) + 1
    keep = [i for i, label in enumerate(data.labels) if counts[label] > 1]
    report.dropped_singleton_labels += len(data.labels) - len(keep)
    data.texts = [data.texts[i] for i in keep]
    data.labels = [data.labels[i] for i in keep]
    data.instructions = [data.instructions[i] for i in keep]


def _first_present(record: dict, names: tuple[str, ...]):
    for name in names:
        if name in record:
            return name, record[name]
    return None, None
