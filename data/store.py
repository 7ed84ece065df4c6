"""Training datasets converted once to Arrow files that every process memory-maps.

Reading 11 million records into Python lists would take tens of GB per process and minutes
of parsing on every rank. Instead each dataset is validated once per version, record by
record with the same checks and file:line:field errors as data/formats.py, in parallel
chunks, into Arrow IPC files in a cache directory:

    CACHE/<name>-<fingerprint>/
        part-00000.arrow ...   the canonical columns (formats.COLUMNS) of consecutive chunks
        meta.json              records, the read report, distinct instructions, label names,
                               the sources' sizes and modification times
        COMPLETE               written last: a directory without it is ignored and rebuilt

The fingerprint hashes every source file's path, size and modification time, the reading
options and the cache format, so an edited file (or another tpembed cache format) is
converted again and an unchanged one opens at once. Opening maps each part only long enough
to learn where its record batches' buffers lie; a record is then read (os.pread) when the
sampler asks for it, through the operating system's page cache, which keeps one copy of the
pages for every process of a machine and counts none of them in a process's resident memory
(see StoredColumn). The main process of each machine builds the cache while the others wait
(`main_process_first`), then every process opens it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tpembed.data.formats import (
    COLUMNS,
    ClassificationData,
    DataError,
    PairData,
    ReadReport,
    RecordParser,
    RetrievalData,
    Task,
    check_labels,
)

FORMAT = 1  # bump when the files' layout or meaning changes: older caches are rebuilt
CHUNK_BYTES = 64 << 20  # a worker's share of a JSONL file
BATCH_ROWS = 8192  # rows per Arrow record batch
MAX_LOCATIONS = 100  # placeholder locations kept in the report
MAX_OPEN_PARTS = 64  # part files a process keeps open for reading


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $TPEMBED_CACHE/datasets, else ~/.cache/tpembed/datasets."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("TPEMBED_CACHE", Path.home() / ".cache" / "tpembed")) / "datasets"


# ---- sources and chunks ----------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """A worker's share: bytes [start, stop) of a JSONL file, or rows [start, stop) of a parquet
    file or saved dataset."""

    path: str
    kind: str  # jsonl | parquet | saved
    start: int
    stop: int


def source_files(path: str | Path) -> list[Path]:
    """The files a dataset path stands for (a saved dataset: its directory)."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), None, "no such file or directory")
    if not path.is_dir() or _is_saved_dataset(path):
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
    if not files:
        raise DataError(str(path), None, "directory holds no .jsonl or .parquet files and is not a saved dataset")
    return files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists())


def plan_chunks(path: str | Path, chunk_bytes: int | None = None) -> list[Chunk]:
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    chunks = []
    for source in source_files(path):
        if _is_saved_dataset(source):
            rows = len(_load_saved(source))
            chunks += [Chunk(str(source), "saved", s, min(s + 100_000, rows)) for s in range(0, rows, 100_000)]
        elif source.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(source).metadata.num_rows
            chunks += [Chunk(str(source), "parquet", s, min(s + 100_000, rows)) for s in range(0, rows, 100_000)]
        else:
            chunks += [Chunk(str(source), "jsonl", s, e) for s, e in _line_aligned_ranges(source, chunk_bytes)]
    return chunks


def _line_aligned_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    size = path.stat().st_size
    ranges, start = [], 0
    with path.open("rb") as handle:
        while start < size:
            handle.seek(min(start + chunk_bytes, size))
            handle.readline()  # to the end of the line the boundary falls in
            stop = min(handle.tell(), size) if start + chunk_bytes < size else size
            ranges.append((start, stop))
            start = stop
    return ranges or [(0, 0)]


def _load_saved(path: Path):
    from datasets import load_from_disk

    dataset = load_from_disk(str(path))
    if hasattr(dataset, "keys"):  # a DatasetDict: the train split
        if "train" not in dataset:
            raise DataError(str(path), None, f"saved DatasetDict has no 'train' split (splits: {list(dataset)})")
        dataset = dataset["train"]
    return dataset


def fingerprint(path: str | Path, options: dict) -> str:
    """Changes with any source file's size or modification time, the options, or FORMAT."""
    stamps = []
    for source in source_files(path):
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        stamps += [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    payload = json.dumps({"format": FORMAT, "sources": stamps, "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


# ---- converting one chunk (in a worker process) ---------------------------------------------------


@dataclass
class ChunkResult:
    part: str | None
    rows: int = 0
    lines: int = 0  # newlines in a JSONL chunk: later chunks' line numbers start after them
    report: dict = field(default_factory=dict)
    placeholders: list[tuple[int, str]] = field(default_factory=list)  # (chunk-local line, " (field)")
    instructions: list[str] = field(default_factory=list)
    error: tuple[int, str | None, str] | None = None  # (local line or row, field, problem)


def _chunk_rows(chunk: Chunk) -> Iterator[tuple[int, dict | None, str | None]]:
    """(chunk-local line or row number, record, parse problem) of a chunk."""
    if chunk.kind == "jsonl":
        with open(chunk.path, "rb") as handle:
            handle.seek(chunk.start)
            number = 0
            while handle.tell() < chunk.stop:
                raw = handle.readline()
                number += 1
                yield number, *_parse_line(raw)
    elif chunk.kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(chunk.path).slice(chunk.start, chunk.stop - chunk.start)
        for number, record in enumerate(table.to_pylist(), start=1):
            yield number, record, None
    else:
        dataset = _load_saved(Path(chunk.path))
        for number, index in enumerate(range(chunk.start, chunk.stop), start=1):
            yield number, dataset[index], None


def _parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})"
    if not line.strip():
        return None, None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"invalid JSON ({error.msg} at column {error.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    return record, None


def convert_chunk(job: tuple) -> ChunkResult:
    """Validate a chunk's records and write their canonical columns to an Arrow file."""
    import pyarrow as pa

    chunk, task, options, part = job
    report = ReadReport()
    parse = RecordParser(task, report=report, **options)
    rows, result = [], ChunkResult(part=part)
    instructions: set[str] = set()
    for number, record, problem in _chunk_rows(chunk):
        result.lines = number
        if problem:
            result.error = (number, None, problem)
            return result
        if record is None:
            continue
        seen = len(report.placeholder_in_text)
        try:
            row = parse(record, f"#{number}")
        except DataError as error:
            result.error = (number, error.field_name, error.problem)
            return result
        for found in report.placeholder_in_text[seen:][: MAX_LOCATIONS - len(result.placeholders)]:
            result.placeholders.append((number, found[len(f"#{number}") :]))  # the " (field)" part
        if row[-1] is not None:
            instructions.add(row[-1])
        rows.append(row)
    schema = _schema(Task(task))
    with pa.OSFile(part, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(rows), BATCH_ROWS):
            columns = list(zip(*rows[start : start + BATCH_ROWS]))
            writer.write_batch(pa.record_batch([pa.array(c, type=f.type) for c, f in zip(columns, schema)], schema))
    result.rows = len(rows)
    result.report = {k: v for k, v in asdict(report).items() if k != "placeholder_in_text"}
    result.instructions = sorted(instructions)
    return result


def _schema(task: Task):
    import pyarrow as pa

    text, texts = pa.string(), pa.list_(pa.string())
    types = {
        Task.retrieval: [text, texts, texts, text],
        Task.sts: [text, text, pa.float64(), text],
        Task.classification: [text, text, text],
    }[task]
    return pa.schema([pa.field(name, kind) for name, kind in zip(COLUMNS[task], types)])


# ---- building and opening a cache ---------------------------------------------------------------


def build_cache(path, task: Task, options: dict, target: Path, num_proc: int, progress: bool) -> dict:
    """Convert `path` into `target` (staged next to it, renamed when complete); returns meta."""
    from tqdm.auto import tqdm

    chunks = plan_chunks(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        jobs = [(chunk, task.value, options, str(staging / f"part-{i:05d}.arrow")) for i, chunk in enumerate(chunks)]
        workers = max(1, min(num_proc, len(jobs)))
        meta = {"format": FORMAT, "task": task.value, "records": 0, "report": {}, "instructions": set(),
                "placeholder_locations": [], "path": str(path), "options": options}  # fmt: skip
        lines_before: dict[str, int] = {}
        bar = tqdm(total=len(jobs), desc=f"validating {Path(path).name}", unit="chunk", disable=not progress)
        for chunk, result in zip(chunks, _map(convert_chunk, jobs, workers)):
            first = lines_before.get(chunk.path, 0)
            if result.error:
                number, field_name, problem = result.error
                raise DataError(_location(chunk, first + number), field_name, problem)
            lines_before[chunk.path] = first + result.lines
            meta["records"] += result.rows
            for key, value in result.report.items():
                meta["report"][key] = meta["report"].get(key, 0) + value
            meta["instructions"].update(result.instructions)
            locations = [_location(chunk, first + n) + where for n, where in result.placeholders]
            meta["placeholder_locations"] = (meta["placeholder_locations"] + locations)[:MAX_LOCATIONS]
            bar.update()
        bar.close()
        meta["instructions"] = sorted(meta["instructions"])
        if task is Task.classification:
            _finish_classification(staging, path, meta)
        if meta["records"] == 0:
            raise DataError(str(path), None, "the dataset holds no records")
        (staging / "meta.json").write_text(json.dumps(meta, ensure_ascii=False) + "\n")
        (staging / "COMPLETE").write_text("")
        if target.exists():  # an incomplete leftover
            shutil.rmtree(target)
        os.replace(staging, target)
        return meta
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _location(chunk: Chunk, number: int) -> str:
    """file:line for JSONL (lines counted from the file's start), 'file row N' otherwise."""
    if chunk.kind == "jsonl":
        return f"{chunk.path}:{number}"
    return f"{chunk.path} row {chunk.start + number}"


def _map(function: Callable, jobs: list, workers: int):
    if workers == 1:
        yield from map(function, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # An executor, not multiprocessing.Pool: a worker that dies (it cannot start, or is killed)
    # breaks the executor with an error, where a Pool would start another and wait forever.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            yield from pool.map(function, jobs)
        except BrokenProcessPool as error:
            raise RuntimeError(
                f"the {workers} worker processes that validate the data (data.num_proc) stopped before "
                'finishing. If the script that starts training has no `if __name__ == "__main__":` guard, '
                "each worker re-runs it and fails while starting (Python's spawn start method): add the "
                "guard, or set data.num_proc to 1. Otherwise a worker was killed (memory?)."
            ) from error


def _finish_classification(staging: Path, path, meta: dict) -> None:
    """Label ids, and texts whose label no other text has dropped: rewrites the parts as one."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = sorted(staging.glob("part-*.arrow"))
    table = pa.concat_tables([_read_part(p) for p in parts])
    counts = pc.value_counts(table["label"])
    singletons = [str(v["values"]) for v in counts.to_pylist() if v["counts"] == 1]
    keep = pc.invert(pc.is_in(table["label"], value_set=pa.array(singletons, pa.string())))
    table = table.filter(keep)
    meta["report"]["dropped_singleton_labels"] = meta["report"].get("dropped_singleton_labels", 0) + len(singletons)
    encoded = pc.dictionary_encode(table["label"]).combine_chunks()
    meta["label_names"] = encoded.dictionary.to_pylist()
    table = table.set_column(1, "label", encoded.indices.cast(pa.int32()))
    check_labels(path, np.asarray(encoded.indices), len(counts))
    meta["records"] = table.num_rows
    for part in parts:
        part.unlink()
    with pa.OSFile(str(staging / "part-00000.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=BATCH_ROWS)


def _read_part(path: Path):
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


class PartFiles:
    """The part files of one cache, read at any position (os.pread: no shared file offset, so
    forked DataLoader workers can read through the same descriptors). At most MAX_OPEN_PARTS
    stay open, the least recently read closed first: a dataset of millions of records has
    hundreds of parts, and a process only so many descriptors."""

    def __init__(self, paths: list[Path]):
        self.paths = [str(p) for p in paths]
        self.open: OrderedDict[int, int] = OrderedDict()

    def _fd(self, part: int) -> int:
        fd = self.open.get(part)
        if fd is not None:
            self.open.move_to_end(part)
            return fd
        fd = os.open(self.paths[part], os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # records are fetched at random: reading ahead would only fill the cache
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.open[part] = fd
        while len(self.open) > MAX_OPEN_PARTS:
            os.close(self.open.popitem(last=False)[1])
        return fd

    def read(self, part: int, position: int, size: int) -> bytes:
        pieces, fd = [], self._fd(part)
        while size > 0:
            piece = os.pread(fd, size, position)
            if not piece:
                raise OSError(f"{self.paths[part]}: ends before byte {position + size} (a damaged cache?)")
            pieces.append(piece)
            position, size = position + len(piece), size - len(piece)
        return b"".join(pieces)

    def __getstate__(self):
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.__init__(state["paths"])

    def __del__(self):
        for fd in getattr(self, "open", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass(frozen=True)
class _Slice:
    """Where one record batch's values of one column lie in its part file (byte positions;
    None: the buffer is absent). Lists of strings have a second level of offsets."""

    part: int
    validity: int | None  # null bitmap, only when the batch has nulls
    offset: int  # the array's own offset, in values
    offsets: int | None  # int32 offsets (strings and lists), or the values of a numeric column
    data: int | None  # string bytes
    child_offset: int = 0
    child_offsets: int | None = None


class StoredColumn:
    """`column[i]` of a column of the cache's Arrow files, as a Python value.

    The files are memory-mapped only while opening, to learn where each record batch's buffers
    lie; a value is then copied out of the page cache with os.pread. Every process of a machine
    still reads the one copy in the page cache, but none maps the files: a page fault on a
    mapping maps the whole page-cache folio around it (up to 2 MiB on current kernels), so a
    batch of 256 random records fetched through a memory map left about 500 MiB of file pages
    in each rank's resident memory."""

    def __init__(self, files: PartFiles, kind: str, slices: list[_Slice], lengths: list[int]):
        self.files, self.kind, self.slices = files, kind, slices
        self.starts = np.cumsum([0] + lengths).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a column of {len(self)} values")
        batch = bisect.bisect_right(self.starts, index) - 1
        where, row = self.slices[batch], index - self.starts[batch]
        read = self.files.read
        if where.validity is not None:
            bits = read(where.part, where.validity + (where.offset + row) // 8, 1)[0]
            if not bits >> ((where.offset + row) % 8) & 1:
                return None
        if self.kind in ("float64", "int32"):
            dtype = np.dtype(self.kind)
            raw = read(where.part, where.offsets + (where.offset + row) * dtype.itemsize, dtype.itemsize)
            return np.frombuffer(raw, dtype)[0].item()
        first, last = np.frombuffer(read(where.part, where.offsets + (where.offset + row) * 4, 8), np.int32)
        if self.kind == "string":
            return read(where.part, where.data + int(first), int(last - first)).decode() if last > first else ""
        count = int(last - first)  # a list of strings: its strings' offsets, then their bytes
        if count == 0:
            return []
        position = where.child_offsets + (where.child_offset + int(first)) * 4
        bounds = np.frombuffer(read(where.part, position, 4 * (count + 1)), np.int32).tolist()
        raw = read(where.part, where.data + bounds[0], bounds[-1] - bounds[0]) if bounds[-1] > bounds[0] else b""
        return [raw[a - bounds[0] : b - bounds[0]].decode() for a, b in zip(bounds, bounds[1:])]

    def numpy(self) -> np.ndarray:
        """A numeric column whole (labels, scores: a few bytes per record)."""
        dtype = np.dtype(self.kind)
        pieces = []
        for where, start, stop in zip(self.slices, self.starts, self.starts[1:]):
            raw = self.files.read(
                where.part, where.offsets + where.offset * dtype.itemsize, (stop - start) * dtype.itemsize
            )
            pieces.append(np.frombuffer(raw, dtype))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype)


def _layout(path: Path, part: int, names: list[str]) -> tuple[dict[str, tuple[str, list[_Slice]]], list[int]]:
    """Each column's kind and per-batch byte positions in one part file, and the batches' lengths."""
    import mmap

    import pyarrow as pa

    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        # closing the mapping raises if an Arrow buffer still pointed into it
        return _positions(pa.py_buffer(mapped), part, names)


def _positions(whole, part: int, names: list[str]):
    import pyarrow as pa

    base = whole.address

    def at(buffer) -> int | None:
        return None if buffer is None else buffer.address - base

    reader = pa.ipc.open_file(pa.BufferReader(whole))
    layout: dict[str, tuple[str, list[_Slice]]] = {}
    lengths = []
    for b in range(reader.num_record_batches):
        batch = reader.get_batch(b)
        lengths.append(batch.num_rows)
        for name in names:
            array = batch.column(name)
            buffers = array.buffers()
            validity = at(buffers[0]) if array.null_count else None
            if pa.types.is_list(array.type):
                child = array.values
                kind, where = "list", _Slice(part, validity, array.offset, at(buffers[1]), at(child.buffers()[2]),
                                             child.offset, at(child.buffers()[1]))  # fmt: skip
            elif pa.types.is_string(array.type):
                kind, where = "string", _Slice(part, validity, array.offset, at(buffers[1]), at(buffers[2]))
            else:
                kind = str(np.dtype(array.type.to_pandas_dtype()))
                where = _Slice(part, validity, array.offset, at(buffers[1]), None)
            layout.setdefault(name, (kind, []))[1].append(where)
    return layout, lengths


def open_cache(directory: Path, name: str):
    """The dataset of a complete cache directory; its columns read records on demand."""
    meta = json.loads((directory / "meta.json").read_text())
    task = Task(meta["task"])
    names = list(COLUMNS[task])
    paths = sorted(directory.glob("part-*.arrow"))
    files = PartFiles(paths)
    kinds: dict[str, str] = {}
    slices: dict[str, list[_Slice]] = {n: [] for n in names}
    lengths: list[int] = []
    for part, path in enumerate(paths):
        layout, batch_lengths = _layout(path, part, names)
        lengths += batch_lengths
        for column, (kind, where) in layout.items():
            kinds[column] = kind
            slices[column] += where
    columns = {n: StoredColumn(files, kinds.get(n, "string"), slices[n], lengths) for n in names}
    if task is Task.retrieval:
        data = RetrievalData(name, columns["query"], columns["pos"], columns["negs"], columns["instruction"])
    elif task is Task.sts:
        data = PairData(name, columns["text1"], columns["text2"], columns["score"], columns["instruction"])
    else:
        labels = columns["label"].numpy()
        data = ClassificationData(name, columns["text"], labels, meta["label_names"], columns["instruction"])
    data.distinct = set(meta["instructions"])
    data.cache_path = directory
    return data, meta


def load_dataset(
    path: str | Path,
    task: Task | str,
    name: str,
    *,
    allow_empty_text: bool = False,
    score_range: tuple[float, float] | None = None,
    placeholder: str | None = None,
    report: ReadReport | None = None,
    required_negatives: int = 0,
    cache_dir: str | Path | None = None,
    num_proc: int = 1,
    main_process_first: Callable[[], AbstractContextManager] = nullcontext,
    pinned: str | Path | None = None,
    progress: bool = True,
    warn: Callable[[str], None] = print,
):
    """A dataset as read_dataset returns it, but backed by a memory-mapped Arrow cache that is
    built on the first call (by the first process of each machine) and opened on later ones.

    `pinned`: the cache a resumed run started with; when its source changed since, the run
    keeps that version (and says so) rather than training on other data."""
    task = Task(task)
    options = {"allow_empty_text": allow_empty_text, "score_range": score_range, "placeholder": placeholder,
               "required_negatives": required_negatives}  # fmt: skip
    target = cache_root(cache_dir) / f"{Path(name).name}-{fingerprint(path, options)}"
    if pinned is not None and Path(pinned) != target and (Path(pinned) / "COMPLETE").is_file():
        warn(f"{path} changed since this run started; it keeps the version it started with ({pinned})")
        target = Path(pinned)
    with main_process_first():
        if not (target / "COMPLETE").is_file() or _stale(target):
            build_cache(path, task, options, target, num_proc, progress)
    data, meta = open_cache(target, name)
    if report is not None:
        report.dropped_empty_negatives += meta["report"].get("dropped_empty_negatives", 0)
        report.dropped_singleton_labels += meta["report"].get("dropped_singleton_labels", 0)
        report.placeholder_in_text += meta["placeholder_locations"]
    return data


def _stale(target: Path) -> bool:
    try:
        return json.loads((target / "meta.json").read_text()).get("format") != FORMAT
    except (OSError, ValueError):
        return True


def source_changed(data) -> bool:
    """Whether a cached dataset's source files changed since its cache was built."""
    cache = getattr(data, "cache_path", None)
    if cache is None:
        return False
    meta = json.loads((Path(cache) / "meta.json").read_text())
    try:
        return not Path(cache).name.endswith(fingerprint(meta["path"], meta["options"]))
    except DataError:  # the source is gone
        return True
