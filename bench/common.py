"""Shared helpers of the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_measured(command: list[str], env: dict | None = None) -> tuple[float, str]:
    """Run a command under /usr/bin/time; (peak RSS in MiB, stdout)."""
    report = Path(tempfile.mkstemp(prefix="tpembed-bench-rss-")[1])
    full = ["/usr/bin/time", "-f", "%M", "-o", str(report), *command]
    result = subprocess.run(full, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(command)}\n{result.stderr[-4000:]}")
    peak_kib = int(report.read_text().split()[-1])
    report.unlink()
    return peak_kib / 1024, result.stdout


def median_step_seconds(metrics_path: Path, warmup: int = 2) -> float:
    """Median seconds per optimizer step of a tpembed run, after `warmup` steps."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return statistics.median(r["step_seconds"] for r in rows[warmup:])


def scratch_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"tpembed-bench-{prefix}-"))


def python() -> str:
    return sys.executable
