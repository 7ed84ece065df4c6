"""Hard-negative mining at scale: embeddings on disk shard by shard, a streaming exact top-k,
and a positive-aware choice of negatives. The model is passed in as an `encode` function, so
this module needs no model code (tpembed.train.mine loads models and runs the command).

The work directory holds everything a resumed run needs:

    WORK/
      manifest.json          model identity, data hash, dim, dtype, shard size: a run whose
                             manifest differs starts the shards afresh
      queries.json  queries.offsets.npy    the query texts with their instructions (JSON)
      corpus.txt    corpus.offsets.npy     the deduplicated corpus texts (UTF-8, no separators)
      corpus.keys.npy        a hash of each corpus text, normalised (near-duplicate check)
      positives.npy  positives.offsets.npy each record's positives as corpus indices
      shards/queries-00000.npy ...  shards/corpus-00000.npy ...
                             (n, dim) L2-normalised embeddings, written whole then renamed

Choosing negatives for a query (defaults in MiningSettings, the reasons in
docs/building-data.md): take the `range_max + P` nearest corpus texts (P: the most positives
any record has); remove the record's positives and every text whose normalised form equals a
positive's; remove candidates scoring above the positive (the lowest positive score when there
are several) minus `relative_margin * |positive|` (NV-Retriever's 95% rule at 0.05), above
`positive - absolute_margin`, or above `max_score`; rank what is left and keep ranks
[range_min, range_max); take the best `num_negatives` ("top") or a seeded random draw. With
exact search and the same window and margins this is what sentence-transformers'
`mine_hard_negatives` chooses (bench/mining.py compares them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import unicodedata
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from tpembed.data.formats import NEGATIVE_FIELDS, POSITIVE_FIELDS, QUERY_FIELDS, DataError, iter_rows

# encode(texts, instruction) -> (len(texts), D) float tensor; instruction None: documents
EncodeFn = Callable[[list[str], "str | None"], torch.Tensor]
MANIFEST_VERSION = 1


@dataclass
class MiningSettings:
    range_min: int = 10
    range_max: int = 100
    relative_margin: float | None = 0.05
    absolute_margin: float | None = None
    max_score: float | None = None
    num_negatives: int = 4
    sampling: Literal["top", "random"] = "top"
    too_few: Literal["keep", "drop", "fill"] = "keep"
    seed: int = 0

    def check(self) -> None:
        if not 0 <= self.range_min < self.range_max:
            raise ValueError(f"--range-min {self.range_min} must be >= 0 and below --range-max {self.range_max}")
        if self.num_negatives < 1:
            raise ValueError(f"--num-negatives must be at least 1, got {self.num_negatives}")
        if self.num_negatives > self.range_max - self.range_min:
            raise ValueError(
                f"--num-negatives {self.num_negatives} is more than the window [--range-min, --range-max) holds "
                f"({self.range_max - self.range_min})"
            )


# ---- texts ------------------------------------------------------------------------------


_NOT_WORD = re.compile(r"[\W_]+")


# ASCII bytes that normalize_text removes: everything but letters and digits
_ASCII_NOT_ALNUM = bytes(b for b in range(128) if not chr(b).isalnum())


def normalize_text(text: str) -> str:
    """Case, width, whitespace, punctuation and symbols folded away (NFKC, casefold, then only
    letters and digits kept, in any script): near-duplicates compare equal."""
    if text.isascii():  # the same result without the Unicode passes: NFKC keeps ASCII, casefold is lower
        return text.lower().encode("ascii").translate(None, _ASCII_NOT_ALNUM).decode("ascii")
    return _NOT_WORD.sub("", unicodedata.normalize("NFKC", text).casefold())


def text_key(text: str | bytes) -> int:
    """A 63-bit hash of a text (exact), or of its normalised form for near-duplicates; bytes are
    taken as the text's UTF-8."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 1


class TextStore:
    """Values in one file, read back by position: texts as UTF-8 bytes (queries: JSON), an offset
    index beside them (memory: 8 bytes a value). A slice is one read, not one per value."""

    def __init__(self, path: Path):
        self.path, self.decode = path, _CODECS[path.suffix][1]
        self.offsets = np.load(path.with_suffix(".offsets.npy"), mmap_mode="r")
        self._handle = path.open("rb")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int):
        return self.slice(index, index + 1)[0]

    def slice(self, start: int, stop: int) -> list:
        stop = min(stop, len(self))
        if start >= stop:
            return []
        bounds = np.asarray(self.offsets[start : stop + 1]) - int(self.offsets[start])
        self._handle.seek(int(self.offsets[start]))
        raw = self._handle.read(int(bounds[-1]))
        edges = bounds.tolist()
        return [self.decode(raw[a:b]) for a, b in zip(edges, edges[1:])]


# how a store's values become bytes and back, by the store file's suffix (see store_path)
_CODECS = {
    ".txt": (lambda text: text.encode("utf-8"), lambda raw: raw.decode("utf-8")),
    ".json": (lambda value: json.dumps(value).encode("utf-8"), json.loads),
}


def store_path(work: Path, kind: str) -> Path:
    """The corpus holds texts; the queries [text, instruction] pairs."""
    return work / ("corpus.txt" if kind == "corpus" else "queries.json")


class _StoreWriter:
    def __init__(self, path: Path):
        self.path, self.offsets, self.encode = path, array("q", [0]), _CODECS[path.suffix][0]
        self._handle = path.open("wb")

    def add(self, value) -> None:
        self.add_raw(self.encode(value))

    def add_raw(self, raw: bytes) -> None:
        """A value already encoded by this store's codec."""
        self._handle.write(raw)
        self.offsets.append(self.offsets[-1] + len(raw))

    def close(self) -> None:
        self._handle.close()
        np.save(self.path.with_suffix(".offsets.npy"), np.frombuffer(self.offsets, dtype=np.int64))


# ---- reading the inputs -------------------------------------------------------------------


def _texts(record: dict, names: tuple[str, ...], location: str, required: bool) -> list[str]:
    name = next((n for n in names if n in record), None)
    value = record.get(name) if name else None
    if value is None:
        if required:
            raise DataError(location, names[0], f"missing (accepted names: {', '.join(names)})")
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise DataError(location, name, "expected a string or a list of strings")
    if required and not any(v.strip() for v in values):
        raise DataError(location, name, "empty")
    return [v for v in values if v.strip()]


def iter_corpus(path: str | Path) -> Iterator[tuple[str, str | None, str]]:
    """(location, id or None, text) of a corpus: JSONL {text} or {_id, title, text}, or a BEIR
    directory (its corpus.jsonl). A BEIR document is "title text", as evaluation reads it."""
    path = Path(path)
    if path.is_dir() and (path / "corpus.jsonl").is_file():
        path = path / "corpus.jsonl"
    for location, row in iter_rows(path):
        text = row.get("text")
        if not isinstance(text, str):
            raise DataError(location, "text", "missing or not a string")
        title = row.get("title") or ""
        doc_id = row.get("_id", row.get("id"))
        yield location, None if doc_id is None else str(doc_id), f"{title} {text}".strip() if title else text


@dataclass
class Prepared:
    """What prepare() built in the work directory, and its content hash."""

    num_records: int
    num_queries: int
    corpus_size: int
    max_positives: int
    data_hash: str


def prepare(records_path: str | Path, corpus_path: str | Path | None, work: Path, default_instruction) -> Prepared:
    """Read the records (and the corpus) once: query and corpus stores, each record's positives
    as corpus indices, normalised keys. Errors name file, line and field."""
    work.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    corpus = _StoreWriter(store_path(work, "corpus"))
    index: dict[int, int] = {}
    keys = array("q")

    def add_to_corpus(text: str) -> int:
        raw = text.encode("utf-8")
        key = text_key(raw)
        if key not in index:
            index[key] = len(index)
            corpus.add_raw(raw)
            keys.append(text_key(normalize_text(text)))
            digest.update(b"c")
            digest.update(raw)
        return index[key]

    if corpus_path is not None:
        seen_ids: dict[str, str] = {}
        for location, doc_id, text in iter_corpus(corpus_path):
            if doc_id is not None:
                if doc_id in seen_ids:
                    raise DataError(location, "_id", f"duplicate id {doc_id!r} (first at {seen_ids[doc_id]})")
                seen_ids[doc_id] = location
            if text.strip():
                add_to_corpus(text)
        if not index:
            raise DataError(str(corpus_path), None, "the corpus holds no text (--corpus)")
    queries = _StoreWriter(store_path(work, "queries"))
    positives, positive_offsets = array("q"), array("q", [0])
    records = max_positives = 0
    for location, record in iter_rows(records_path):
        query = _texts(record, QUERY_FIELDS, location, required=True)[0]
        found = _texts(record, POSITIVE_FIELDS, location, required=True)
        instruction = record.get("instruction") or default_instruction
        ids = []
        for text in found:
            if corpus_path is not None and text_key(text) not in index:
                raise DataError(location, "pos", f"positive {text[:60]!r} is not in the corpus {corpus_path}")
            ids.append(add_to_corpus(text))
        positives.extend(dict.fromkeys(ids))
        positive_offsets.append(len(positives))
        max_positives = max(max_positives, len(dict.fromkeys(ids)))
        queries.add([query, instruction])
        digest.update(b"q" + json.dumps([query, instruction], ensure_ascii=False).encode("utf-8"))
        records += 1
    if records == 0:
        raise DataError(str(records_path), None, "no records")
    corpus.close()
    queries.close()
    np.save(work / "corpus.keys.npy", np.frombuffer(keys, dtype=np.int64))
    np.save(work / "positives.npy", np.frombuffer(positives, dtype=np.int64))
    np.save(work / "positives.offsets.npy", np.frombuffer(positive_offsets, dtype=np.int64))
    return Prepared(records, records, len(index), max_positives, digest.hexdigest())


class PreparationFailed(RuntimeError):
    """The background preparation process died or failed with an unexpected error."""


class BackgroundPrepare:
    """prepare() in a forked process, started before the model is loaded, so that reading the
    data overlaps loading the model (both take seconds, each on one core). `result()` waits for
    it; leaving the `with` block stops a child that is still running (an error elsewhere).
    Where fork is not the platform's safe default (only Linux is assumed), prepare() runs in
    `result()` instead."""

    def __init__(self, records_path, corpus_path, work: Path, default_instruction):
        import multiprocessing

        self._arguments = (records_path, corpus_path, work, default_instruction)
        self._process = self._connection = None
        if sys.platform.startswith("linux"):
            context = multiprocessing.get_context("fork")
            self._connection, child_end = context.Pipe(duplex=False)
            self._process = context.Process(target=_prepare_child, args=(child_end, *self._arguments), daemon=True)
            self._process.start()
            child_end.close()

    def __enter__(self) -> BackgroundPrepare:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
        if self._process is not None:
            self._process.join()
            self._connection.close()

    def result(self) -> Prepared:
        """The Prepared of the data, or the child's error raised here (a DataError keeps its
        file, line and field)."""
        if self._process is None:
            return prepare(*self._arguments)
        try:
            kind, value = self._connection.recv()
        except EOFError:
            self._process.join()
            raise PreparationFailed(
                f"the data preparation process ended without a result (exit code {self._process.exitcode})"
            ) from None
        self._process.join()
        if kind == "ok":
            return value
        if kind == "data":
            raise DataError(*value)
        raise ValueError(value) if kind == "value" else PreparationFailed(value)


def _prepare_child(connection, *arguments) -> None:
    try:
        connection.send(("ok", prepare(*arguments)))
    except DataError as error:
        connection.send(("data", (error.location, error.field_name, error.problem)))
    except ValueError as error:
        connection.send(("value", str(error)))
    except BaseException as error:  # noqa: BLE001 - any failure goes back to the parent, which raises it
        connection.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        connection.close()


# ---- embeddings on disk ----------------------------------------------------------------------


def shard_path(work: Path, kind: str, shard: int) -> Path:
    return work / "shards" / f"{kind}-{shard:05d}.npy"


def num_shards(size: int, shard_size: int) -> int:
    return -(-size // shard_size)


def check_manifest(work: Path, manifest: dict) -> bool:
    """True when the work directory's shards were made with these settings; otherwise it is
    reset for them (stale shards removed)."""
    path = work / "manifest.json"
    if path.is_file() and json.loads(path.read_text()) == manifest:
        return True
    for stale in (work / "shards").glob("*.npy") if (work / "shards").is_dir() else []:
        stale.unlink()
    (work / "shards").mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staging, path)
    return False


def encode_shards(
    work: Path,
    kind: str,
    encode: EncodeFn,
    shard_size: int,
    dim: int,
    dtype: str,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> int:
    """Embed this rank's missing shards (shard i belongs to rank i % world_size); returns how
    many it encoded. Each shard is written whole under a temporary name, then renamed."""
    store = TextStore(store_path(work, kind))
    mine = [s for s in range(num_shards(len(store), shard_size)) if s % world_size == rank]
    todo = [s for s in mine if not shard_path(work, kind, s).is_file()]
    for shard in tqdm(todo, desc=f"encoding {kind} shards", disable=not progress, unit="shard"):
        items = store.slice(shard * shard_size, (shard + 1) * shard_size)
        if kind == "queries":
            embeddings = _encode_by_instruction(encode, items)
        else:
            embeddings = encode(items, None)
        if embeddings.shape[1] < dim:
            raise ValueError(f"--dim {dim} is larger than the model's embeddings ({embeddings.shape[1]})")
        sliced = torch.nn.functional.normalize(embeddings[:, :dim].float(), dim=-1)  # slice, then normalise
        target = shard_path(work, kind, shard)
        staging = target.with_name(f".{target.name}.partial")
        with staging.open("wb") as handle:
            np.save(handle, sliced.numpy().astype(dtype))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, target)
    return len(todo)


def _encode_by_instruction(encode: EncodeFn, items: list) -> torch.Tensor:
    """Queries grouped by instruction (one encode call each), back in input order."""
    groups: dict[str | None, list[int]] = {}
    for position, (_, instruction) in enumerate(items):
        groups.setdefault(instruction, []).append(position)
    result = None
    for instruction, positions in groups.items():
        embedded = encode([items[p][0] for p in positions], instruction)
        if result is None:
            result = torch.empty(len(items), embedded.shape[1], dtype=torch.float32)
        result[positions] = embedded.float()
    return result


class ShardedEmbeddings:
    """The shards of one kind as one (n, dim) array. Each shard is memory-mapped only while it
    is read, so the pages of shards already searched do not stay in the process's memory."""

    def __init__(self, work: Path, kind: str, size: int, shard_size: int):
        self.shard_size = shard_size
        self.paths = [shard_path(work, kind, s) for s in range(num_shards(size, shard_size))]
        first = np.load(self.paths[0], mmap_mode="r")
        self.dim = first.shape[1]

    def shard(self, number: int) -> torch.Tensor:
        """Shard `number` as a float32 tensor (a copy; the mapping is closed again)."""
        mapped = np.load(self.paths[number], mmap_mode="r")
        copy = torch.from_numpy(np.array(mapped, dtype=np.float32))
        del mapped
        return copy

    def rows(self, indices: np.ndarray) -> torch.Tensor:
        """(len(indices), dim) float32 rows, gathered from their shards."""
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        shard_of, row_of = np.divmod(np.asarray(indices, dtype=np.int64), self.shard_size)
        for shard in np.unique(shard_of):
            chosen = shard_of == shard
            mapped = np.load(self.paths[shard], mmap_mode="r")
            out[chosen] = mapped[row_of[chosen]]
            del mapped
        return torch.from_numpy(out)

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self.rows(np.arange(start, stop))


# ---- search -----------------------------------------------------------------------------------


def exact_top_k(queries: torch.Tensor, corpus: ShardedEmbeddings, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best corpus rows for each query by inner product, shard by shard: memory holds one
    (queries x shard) score block, reused, and the running (queries x k) best, never the whole
    matrix. Ties keep the lower corpus index first."""
    best_scores = torch.full((queries.shape[0], 0), float("-inf"))
    best_indices = torch.zeros((queries.shape[0], 0), dtype=torch.long)
    buffer = torch.empty(queries.shape[0], corpus.shard_size)
    for shard_number in range(len(corpus.paths)):
        shard = corpus.shard(shard_number)
        scores = torch.matmul(queries, shard.T, out=buffer[:, : shard.shape[0]])  # (Q, shard)
        top_scores, top_local = torch.topk(scores, min(k, scores.shape[1]), dim=1, sorted=True)
        merged_scores = torch.cat([best_scores, top_scores], dim=1)
        merged_indices = torch.cat([best_indices, top_local + shard_number * corpus.shard_size], dim=1)
        order = _order(merged_scores, merged_indices)[:, :k]
        best_scores, best_indices = merged_scores.gather(1, order), merged_indices.gather(1, order)
    return best_scores, best_indices


def _order(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Column order by score descending, then corpus index ascending (a deterministic tie-break)."""
    by_index = torch.argsort(indices, dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, by_index), dim=1, descending=True, stable=True)
    return by_index.gather(1, by_score)


class FaissIndex:
    """faiss IndexFlatIP over every corpus embedding (exact inner product; the corpus is held in
    memory as float32). On GPUs when the faiss GPU build is installed."""

    def __init__(self, corpus: ShardedEmbeddings):
        try:
            import faiss
        except ImportError:
            raise ImportError("--faiss needs the faiss package: pip install 'tpembed[faiss]'") from None
        self.index = faiss.IndexFlatIP(corpus.dim)
        if hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available():
            self.index = faiss.index_cpu_to_all_gpus(self.index)
        for number in range(len(corpus.paths)):
            self.index.add(np.ascontiguousarray(corpus.shard(number).numpy()))

    def top_k(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores, indices = self.index.search(np.ascontiguousarray(queries.numpy()), k)
        scores, indices = torch.from_numpy(scores), torch.from_numpy(indices).long()
        order = _order(scores, indices)  # the exact path's tie-break
        return scores.gather(1, order), indices.gather(1, order)


# ---- choosing negatives ------------------------------------------------------------------------


@dataclass
class Choice:
    """What mining chose for one record."""

    negatives: list[int]  # corpus indices, best first
    negative_scores: list[float]
    positive_scores: list[float]
    filled: int = 0  # negatives drawn at random under the "fill" policy


RULES = ("positive", "near_duplicate_of_positive", "relative_margin", "absolute_margin", "max_score")


def choose(
    candidate_scores: torch.Tensor,
    candidate_indices: torch.Tensor,
    positive_scores: list[torch.Tensor],
    positive_ids: list[np.ndarray],
    keys: np.ndarray,
    settings: MiningSettings,
    record_ids: list[int],
    removed: Counter,
) -> list[Choice]:
    """Negatives for a block of queries from their (B, K) nearest candidates, by the rules of the
    module docstring; `removed` counts what each rule took out."""
    scores = candidate_scores.clone()
    valid = candidate_indices >= 0
    for row, (ids, positive) in enumerate(zip(positive_ids, positive_scores)):
        candidates = candidate_indices[row].numpy()
        is_positive = np.isin(candidates, ids) & valid[row].numpy()
        near = np.isin(keys[np.clip(candidates, 0, None)], keys[ids]) & ~is_positive & valid[row].numpy()
        floor = float(positive.min())
        rules = {
            "positive": torch.from_numpy(is_positive),
            "near_duplicate_of_positive": torch.from_numpy(near),
        }
        if settings.relative_margin is not None:
            rules["relative_margin"] = scores[row] > floor - abs(floor) * settings.relative_margin
        if settings.absolute_margin is not None:
            rules["absolute_margin"] = scores[row] > floor - settings.absolute_margin
        if settings.max_score is not None:
            rules["max_score"] = scores[row] > settings.max_score
        alive = valid[row].clone()
        for rule, hit in rules.items():
            hit = hit & alive
            removed[rule] += int(hit.sum())
            alive &= ~hit
        scores[row, ~alive] = float("-inf")
    ranked = _order(scores, candidate_indices)[:, : settings.range_max]
    ranked_scores, ranked_indices = scores.gather(1, ranked), candidate_indices.gather(1, ranked)
    window_scores = ranked_scores[:, settings.range_min :]
    window_indices = ranked_indices[:, settings.range_min :]
    choices = []
    for row, record in enumerate(record_ids):
        usable = torch.isfinite(window_scores[row]).nonzero().flatten().tolist()
        if settings.sampling == "random" and len(usable) > settings.num_negatives:
            rng = np.random.default_rng([settings.seed, record])
            usable = sorted(rng.choice(usable, size=settings.num_negatives, replace=False).tolist())
        picked = usable[: settings.num_negatives]
        choices.append(
            Choice(
                negatives=[int(window_indices[row, p]) for p in picked],
                negative_scores=[float(window_scores[row, p]) for p in picked],
                positive_scores=[float(s) for s in positive_scores[row]],
            )
        )
    return choices


def fill_randomly(choice: Choice, positive_ids: np.ndarray, keys: np.ndarray, corpus_size: int, wanted: int,
                  seed: int, record: int) -> None:  # fmt: skip
    """Top `choice` up to `wanted` negatives with random corpus texts that are neither a positive
    nor a near-duplicate of one, nor already chosen (the "fill" policy; seeded per record)."""
    rng = np.random.default_rng([seed, 1, record])
    banned_keys = set(keys[positive_ids].tolist())
    taken = set(choice.negatives) | set(positive_ids.tolist())
    tries = 0
    while len(choice.negatives) < wanted and tries < 20 * wanted + 100:
        tries += 1
        candidate = int(rng.integers(corpus_size))
        if candidate in taken or int(keys[candidate]) in banned_keys:
            continue
        taken.add(candidate)
        choice.negatives.append(candidate)
        choice.negative_scores.append(float("nan"))
        choice.filled += 1


# ---- the summary ---------------------------------------------------------------------------------


@dataclass
class Summary:
    records: int = 0
    with_enough: int = 0
    kept_with_fewer: int = 0
    dropped: int = 0
    filled_records: int = 0
    filled_negatives: int = 0
    removed: Counter = field(default_factory=Counter)
    positive_histogram: np.ndarray = field(default_factory=lambda: np.zeros(400, dtype=np.int64))
    negative_histogram: np.ndarray = field(default_factory=lambda: np.zeros(400, dtype=np.int64))

    def add_scores(self, positives: list[float], negatives: list[float]) -> None:
        bins = len(self.positive_histogram)
        for values, histogram in ((positives, self.positive_histogram), (negatives, self.negative_histogram)):
            for value in values:  # bins of width 2/bins over [-1, 1], the last one closed
                if -1.0 <= value <= 1.0:  # (NaN compares false)
                    histogram[min(int((value + 1.0) * bins / 2), bins - 1)] += 1

    def to_dict(self) -> dict:
        values = asdict(self)
        values["removed"] = {rule: self.removed.get(rule, 0) for rule in RULES}
        for name in ("positive", "negative"):
            values[f"{name}_scores"] = _quantiles(values.pop(f"{name}_histogram"))
        return values

    def lines(self) -> list[str]:
        values = self.to_dict()
        lines = [
            f"records: {self.records}; with enough negatives: {self.with_enough}; kept with fewer: "
            f"{self.kept_with_fewer}; dropped: {self.dropped}; filled at random: {self.filled_records} records "
            f"({self.filled_negatives} negatives)",
            "candidates removed: " + ", ".join(f"{rule} {count}" for rule, count in values["removed"].items()),
        ]
        for name in ("positive", "negative"):
            quantiles = values[f"{name}_scores"]
            shown = ", ".join(f"{q} {v:.3f}" for q, v in quantiles.items()) if quantiles else "none"
            lines.append(f"{name} scores: {shown}")
        return lines + self.warnings()

    def warnings(self) -> list[str]:
        """A warning when a margin rule left most records short of negatives: typical of a model
        whose cosines are bunched together (an untrained LM: every score near 0.9), where
        "0.95 x the positive's score" is above almost every candidate."""
        short = self.records - self.with_enough
        margins = {rule: self.removed.get(rule, 0) for rule in ("relative_margin", "absolute_margin", "max_score")}
        rule, removed = max(margins.items(), key=lambda item: item[1])
        if not self.records or short * 2 <= self.records or not removed or removed < max(self.removed.values()):
            return []
        median = _quantiles(self.positive_histogram).get("p50")
        median_text = f" (median positive score {median:.3f})" if median is not None else ""
        return [
            f"warning: {short} of {self.records} records got fewer negatives than asked; {rule} removed most "
            f"candidates{median_text}. If this model's scores are bunched together (an untrained LM's are), mine "
            "with a trained model, or loosen --relative-margin / --absolute-margin / --max-score and rely on the "
            "rank window"
        ]


def _quantiles(histogram: np.ndarray) -> dict[str, float]:
    total = int(histogram.sum())
    if not total:
        return {}
    centres = np.linspace(-1.0, 1.0, len(histogram) + 1)[:-1] + 1.0 / len(histogram)
    cumulative = np.cumsum(histogram) / total
    quantiles = {f"p{int(q * 100)}": float(centres[np.searchsorted(cumulative, q)]) for q in (0.05, 0.5, 0.95)}
    quantiles["mean"] = float((histogram * centres).sum() / total)
    return quantiles


def negatives_of(record: dict) -> tuple[str | None, list[str]]:
    """The field that holds a record's negatives (if any), and them."""
    name = next((n for n in NEGATIVE_FIELDS if n in record), None)
    value = record.get(name) if name else None
    return name, [value] if isinstance(value, str) else list(value or [])


# ---- the whole run ---------------------------------------------------------------------------------


def mine(
    records_path: str | Path,
    output: str | Path,
    *,
    encode: EncodeFn,
    model_id: str,
    work: str | Path,
    corpus_path: str | Path | None = None,
    settings: MiningSettings | None = None,
    dim: int | None = None,
    dtype: str = "float16",
    shard_size: int = 50_000,
    query_block: int = 1024,
    use_faiss: bool = False,
    default_instruction: str | None = None,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
    background: BackgroundPrepare | None = None,
) -> Summary | None:
    """Mine negatives for every record of `records_path` into `output` (written by rank 0,
    atomically, the records in input order). Every rank encodes its share of the shards; the
    work directory lets a killed run resume without encoding finished shards again. Returns the
    summary on rank 0 (None elsewhere). `background`: rank 0's preparation of these same
    records, corpus and work directory, already started (tpembed-mine starts it before loading
    the model)."""
    from tpembed.data.io import OutputExistsError, jsonl_output

    settings = settings or MiningSettings()
    settings.check()
    output, work = Path(output), Path(work)
    if Path(output).exists() and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it")
    full_dim = int(encode(["dimension probe"], None).shape[1])
    dim = dim or full_dim
    if dim > full_dim:
        raise ValueError(f"--dim {dim} is larger than the model's embedding size {full_dim}")
    if rank == 0:
        if background is not None:
            prepared = background.result()
        else:
            prepared = prepare(records_path, corpus_path, work, default_instruction)
        (work / "prepared.json").write_text(json.dumps(asdict(prepared)) + "\n")
    barrier()
    prepared = Prepared(**json.loads((work / "prepared.json").read_text()))
    manifest = {"version": MANIFEST_VERSION, "model": model_id, "data": prepared.data_hash, "dim": dim,
                "dtype": dtype, "shard_size": shard_size}  # fmt: skip
    if rank == 0:
        check_manifest(work, manifest)
    barrier()
    for kind in ("corpus", "queries"):
        encode_shards(work, kind, encode, shard_size, dim, dtype, rank, world_size, progress)
    barrier()
    if rank != 0:
        return None
    summary = Summary()
    corpus_texts = TextStore(store_path(work, "corpus"))
    with jsonl_output(output, overwrite=overwrite) as writer:
        for record, choice in _choices(records_path, work, prepared, settings, shard_size, query_block, use_faiss,
                                       summary, progress):  # fmt: skip
            if choice is None:
                continue
            name, _ = negatives_of(record)
            record[name or "negs"] = [corpus_texts[i] for i in choice.negatives]
            record["mining"] = {"model": model_id, "dim": dim, "positive_scores": choice.positive_scores,
                                "negative_scores": choice.negative_scores, "random_fill": choice.filled,
                                "settings": asdict(settings)}  # fmt: skip
            writer.write(record)
    summary_path = output.with_name(output.stem + ".summary.json")
    summary_path.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def _choices(records_path, work: Path, prepared: Prepared, settings: MiningSettings, shard_size: int,
             query_block: int, use_faiss: bool, summary: Summary, progress: bool):  # fmt: skip
    """(record, Choice or None when dropped) in input order, a block of queries at a time."""
    queries = ShardedEmbeddings(work, "queries", prepared.num_queries, shard_size)
    corpus = ShardedEmbeddings(work, "corpus", prepared.corpus_size, shard_size)
    keys = np.load(work / "corpus.keys.npy")
    positives = np.load(work / "positives.npy")
    offsets = np.load(work / "positives.offsets.npy")
    k = min(settings.range_max + prepared.max_positives, prepared.corpus_size)
    index = FaissIndex(corpus) if use_faiss else None
    rows = iter_rows(records_path)
    bar = tqdm(total=prepared.num_records, desc="searching", disable=not progress, unit="query")
    for start in range(0, prepared.num_records, query_block):
        stop = min(start + query_block, prepared.num_records)
        block = queries.block(start, stop)  # (B, dim)
        scores, indices = index.top_k(block, k) if index else exact_top_k(block, corpus, k)
        positive_ids = [positives[offsets[r] : offsets[r + 1]] for r in range(start, stop)]
        embedded = corpus.rows(positives[offsets[start] : offsets[stop]])  # the block's positives, one read
        first = offsets[start]
        positive_scores = [embedded[offsets[r] - first : offsets[r + 1] - first] @ block[r - start]
                           for r in range(start, stop)]  # fmt: skip
        record_ids = list(range(start, stop))
        choices = choose(scores, indices, positive_scores, positive_ids, keys, settings, record_ids, summary.removed)
        for record_id, choice, ids in zip(record_ids, choices, positive_ids):
            _, record = next(rows)
            yield record, _apply_policy(choice, ids, keys, prepared.corpus_size, settings, record_id, summary)
        bar.update(stop - start)
    bar.close()


def _apply_policy(choice: Choice, positive_ids, keys, corpus_size: int, settings: MiningSettings, record: int,
                  summary: Summary) -> Choice | None:  # fmt: skip
    summary.records += 1
    if len(choice.negatives) >= settings.num_negatives:
        summary.with_enough += 1
    elif settings.too_few == "drop":
        summary.dropped += 1
        return None
    elif settings.too_few == "fill":
        fill_randomly(choice, positive_ids, keys, corpus_size, settings.num_negatives, settings.seed, record)
        summary.filled_records += 1
        summary.filled_negatives += choice.filled
    else:
        summary.kept_with_fewer += 1
    summary.add_scores(choice.positive_scores, choice.negative_scores)
    return choice
