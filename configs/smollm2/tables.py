"""Print the docs/RESULTS.md tables from the results.json files that results.sh writes.

python configs/smollm2/tables.py            # reads runs/smollm2/results/* and runs/smollm2/eval
python configs/smollm2/tables.py --compare DIR...   # one row per evaluation directory
python configs/smollm2/tables.py --dims DIR         # one evaluation at every Matryoshka dim
python configs/smollm2/tables.py --seeds DIR        # the TP ablation of tp_ablation.sh: mean and spread
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROWS = [
    ("base, mean pooling (zero-shot)", "results/base_mean"),
    ("base + PromptEOL", "results/base_prompteol"),
    ("base + PromptEOL + added placeholder, no TP", "results/base_prompteol_placeholder"),
    ("base + PromptEOL + TP 1-7 (training-free)", "results/base_prompteol_tp"),
    ("after stage 1", "results/stage1"),
    ("after stage 2, no TP", "results/stage2_no_tp"),
    ("after stage 2, TP 1-7 (exported, sentence-transformers)", "eval"),
]
LANGUAGES = {
    "English": ["stsb_en_dev", "sick_validation", "xquad_en", "cranfield"],
    "Chinese": ["stsb_zh_validation", "lcqmc_validation"],
}


def load(path: Path) -> dict | None:
    """A results.json file, or the one in an evaluation directory (else the finished tasks of
    an evaluation still running or cut off, from its results.partial.json); None when there is none."""
    file = path if path.suffix == ".json" else path / "results.json"
    if file.is_file():
        return json.loads(file.read_text())
    partial = path / "results.partial.json"
    if path.suffix == ".json" or not partial.is_file():
        return None
    kept = json.loads(partial.read_text())
    print(f"{path}: an unfinished evaluation, {len(kept['tasks'])} tasks so far", file=sys.stderr)
    return {"dims": kept["key"]["dims"], "tasks": {name: task["result"] for name, task in kept["tasks"].items()}}


def cell(results: dict | None, task: str, dim: int | None = None) -> str:
    if results is None or task not in results["tasks"]:
        return "n/a"
    entry = results["tasks"][task]
    dim = str(dim or max(results["dims"]))
    return f"{entry['by_dim'][dim][entry['main_metric']]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/smollm2", type=Path)
    parser.add_argument("--compare", nargs="+", type=Path, help="evaluation directories, one row each")
    parser.add_argument("--dims", type=Path, help="one evaluation directory: every task at every dim")
    parser.add_argument(
        "--seeds", type=Path, help="tp_ablation.sh results: eval_tp_<setting>_seed<n>.json files or eval directories"
    )
    args = parser.parse_args()
    if args.compare:
        compare(args.compare)
        return
    if args.dims:
        every_dim(load(args.dims) or parser.error(f"{args.dims}: no results.json"))
        return
    if args.seeds:
        seeds(args.seeds)
        return
    loaded = [(label, load(args.root / sub)) for label, sub in ROWS]
    for language, tasks in LANGUAGES.items():
        metrics = []
        for task in tasks:
            found = next((r for _, r in loaded if r and task in r["tasks"]), None)
            metrics.append(found["tasks"][task]["main_metric"] if found else "?")
        print(f"\n### {language}\n")
        print("| model | dim | " + " | ".join(f"{t} ({m})" for t, m in zip(tasks, metrics)) + " |")
        print("|---|---:|" + "---:|" * len(tasks))
        for label, results in loaded:
            dim = max(results["dims"]) if results else "n/a"
            print(f"| {label} | {dim} | " + " | ".join(cell(results, t) for t in tasks) + " |")
    if loaded[-1][1]:
        print("\n### Final model at every Matryoshka dim\n")
        every_dim(loaded[-1][1])


def every_dim(results: dict) -> None:
    """One row per task: the main metric at every dim, and 256 dims minus the largest."""
    dims = results["dims"]
    print("| task | " + " | ".join(str(d) for d in dims) + " | 256 vs full |")
    print("|---|" + "---:|" * (len(dims) + 1))
    for task, entry in results["tasks"].items():
        metric = entry["main_metric"]
        values = [entry["by_dim"][str(d)][metric] for d in dims]
        gap = f"{entry['by_dim']['256'][metric] - values[-1]:+.2f}" if "256" in entry["by_dim"] else "n/a"
        print(f"| {task} ({metric}) | " + " | ".join(f"{v:.2f}" for v in values) + f" | {gap} |")
        if "v_measure_mean" in entry["by_dim"][str(dims[-1])]:  # clustering: the mean and sd of 10 single runs
            for key, label in (("v_measure_mean", "mean of 10 k-means runs"), ("v_measure_std", "sd of those runs")):
                values = [entry["by_dim"][str(d)][key] for d in dims]
                gap = f"{entry['by_dim']['256'][key] - values[-1]:+.2f}" if key.endswith("mean") else ""
                print(f"| {task} ({label}) | " + " | ".join(f"{v:.2f}" for v in values) + f" | {gap} |")


def compare(directories: list[Path]) -> None:
    """The main metric of every task at the full dim (and at 256), a row per directory."""
    loaded = [(path.name, load(path)) for path in directories]
    tasks = list(next(r for _, r in loaded if r)["tasks"])
    print("| run | " + " | ".join(tasks) + " | mean |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    for name, results in loaded:
        values = [score(results, t) for t in tasks]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {sum(values) / len(values):.2f} |")


def score(results: dict | None, task: str, dim: int | None = None) -> float:
    """The main metric as a number (NaN where the task was not evaluated)."""
    value = cell(results, task, dim)
    return float("nan") if value == "n/a" else float(value)


def spread(values: list[float]) -> str:
    """Mean ± sample standard deviation; a single value has no spread, so it stands alone."""
    if len(values) < 2:
        return f"{statistics.mean(values):.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def seeds(root: Path) -> None:
    """Per task: mean ± sd over seeds of each setting, and of the paired difference (same seed)."""
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(root.glob("eval_tp_*_seed*")):
        match = re.fullmatch(r"eval_tp_(.+)_seed(\d+)(\.json)?", path.name)
        results = load(path)
        if match and results:
            runs.setdefault(match[1], {})[int(match[2])] = results
    if set(runs) != {"1_7", "none"}:
        raise SystemExit(f"{root}: expected eval_tp_1_7_seed* and eval_tp_none_seed* results, found {sorted(runs)}")
    paired = sorted(set(runs["1_7"]) & set(runs["none"]))
    tasks = list(runs["1_7"][paired[0]]["tasks"])
    for dim in (None, 256):
        label = "full dim" if dim is None else f"dim {dim}"
        print(f"\n### Token Prepending 1-7 vs none, seeds {paired}, {label} (mean ± sd)\n")
        print("| task (metric) | TP 1-7 | none | TP - none (paired) | seeds TP better |")
        print("|---|---:|---:|---:|---:|")
        for task in tasks:
            metric = runs["1_7"][paired[0]]["tasks"][task]["main_metric"]
            with_tp = [score(runs["1_7"][s], task, dim) for s in paired]
            without = [score(runs["none"][s], task, dim) for s in paired]
            better = sum(a > b for a, b in zip(with_tp, without))
            differences = [a - b for a, b in zip(with_tp, without)]
            print(
                f"| {task} ({metric}) | {spread(with_tp)} | {spread(without)} | {spread(differences)} "
                f"| {better}/{len(paired)} |"
            )


if __name__ == "__main__":
    main()
