"""Writing data files safely: an output appears only when it is complete.

A JSONL output is written to a hidden temporary file next to its target, flushed to disk,
and renamed into place at the end; a run that is killed or fails leaves the target as it
was (absent, or the previous complete version) and no file that looks finished. Every
writer counts what it wrote and what it skipped, with the reason.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output path exists and overwriting was not asked for."""


@dataclass
class WriteReport:
    """What a conversion wrote and what it left out, by reason."""

    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first location

    def skip(self, reason: str, location: str | None = None) -> None:
        self.skipped[reason] += 1
        if location is not None:
            self.examples.setdefault(reason, location)

    def summary(self, target: str | Path) -> str:
        lines = [f"wrote {self.written} records to {target}"]
        for reason, count in self.skipped.most_common():
            where = f" (first: {self.examples[reason]})" if reason in self.examples else ""
            lines.append(f"  skipped {count}: {reason}{where}")
        return "\n".join(lines)


class JsonlWriter:
    def __init__(self, handle, report: WriteReport):
        self._handle = handle
        self.report = report

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.report.written += 1


@contextmanager
def atomic_path(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary path next to `target` that is renamed onto it when the block succeeds."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        yield staging
        if staging.is_file():
            with staging.open("rb") as handle:
                os.fsync(handle.fileno())
        os.replace(staging, target)
    finally:
        if staging.is_file():
            staging.unlink()


@contextmanager
def jsonl_output(target: str | Path, overwrite: bool = False) -> Iterator[JsonlWriter]:
    """Write JSONL records to `target` atomically; the writer's report counts them."""
    with atomic_path(target, overwrite) as staging, staging.open("w", encoding="utf-8") as handle:
        yield JsonlWriter(handle, WriteReport())
