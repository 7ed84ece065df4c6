"""Stage 1 -> stage 2 -> export -> evaluate, in one command.

    tpembed-pipeline --recipe quickstart     # tiny Qwen3, bundled sample, CPU, minutes
    tpembed-pipeline --recipe smollm2        # SmolLM2-135M on public datasets (configs/smollm2), CPU, ~2.5 hours
    tpembed-pipeline --recipe smollm2 --prepare-only   # its data steps only (convert, decontaminate)
    tpembed-pipeline --stage1 A.yaml --stage2 B.yaml --tasks configs/eval/english_dev.yaml \\
        --output-dir runs/mine --launch-config launch/multi_gpu.yaml

Each step runs in its own process (training through `accelerate launch`) and is
skipped when its result already exists, so a re-run continues where it stopped:
an interrupted training resumes from its newest checkpoint. A data step also runs
again when a file it reads is newer than the file it wrote.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tpembed.train.checkpoint import latest_checkpoint, load_trainer_state
from tpembed.train.config import STAGE_DEFAULTS, load_config
from tpembed.train.export import add_results_to_card

# Data steps before stage 1: (the file it writes, the tpembed module and its arguments); a step
# runs when its file is missing or older than one of the files it reads.
RECIPES = {
    "quickstart": {
        "stage1": "configs/quickstart/stage1.yaml",
        "stage2": "configs/quickstart/stage2.yaml",
        "tasks": [],
        "prepare": [],
        "output_dir": "runs/quickstart",
    },
    "smollm2": {
        "stage1": "configs/smollm2/stage1.yaml",
        "stage2": "configs/smollm2/stage2.yaml",
        "tasks": ["configs/eval/smollm2_dev.yaml"],
        # trained on passages cut at 96 tokens for speed; reads up to 256 when deployed
        "export_flags": ["--passage-max-len", "256"],
        "prepare": [],  # below
        "output_dir": "runs/smollm2",
    },
}

# The smollm2 recipe's data: each public file converted to a training record file (its own
# records under a name that says what they are), then all of them decontaminated against every
# evaluation file of configs/eval/smollm2_dev.yaml in one call.
SHARED = "../shared/data"
RAW, CLEAN = "runs/smollm2/data/raw", "runs/smollm2/data/clean"
SMOLLM2_SOURCES = [  # (converter kind, source under SHARED, record file name, converter flags)
    ("nli-triplets", "snli_en/validation.jsonl", "snli_triplets", []),
    ("nli-triplets", "sick/train.jsonl", "sick_triplets", ["--keep-without-negatives"]),
    ("nli-triplets", "ocnli/train_10k.jsonl", "ocnli_triplets", ["--keep-without-negatives"]),
    ("flag", "zh_triplets_text2vec/train.jsonl", "zh_triplets", []),
    ("drop-empty", "cmrc2018_trial/train.jsonl", "cmrc2018", []),
    ("classification", "tnews/train.jsonl", "tnews_train", []),
    ("pairs", "stsb_en/train.jsonl", "stsb_en_train", []),
    ("pairs", "sick/train.jsonl", "sick_pairs", []),
    ("nli-pairs", "snli_en/validation.jsonl", "snli_pairs", []),
    ("nli-pairs", "ocnli/train_10k.jsonl", "ocnli_pairs", []),
    ("pairs", "stsb_zh/train.jsonl", "stsb_zh_train", []),
]
SMOLLM2_EVAL = ["stsb_en/dev.jsonl", "sick/validation.jsonl", "xquad_retrieval/en", "cranfield",
                "stsb_zh/validation.jsonl", "lcqmc/validation.jsonl", "tnews/validation.jsonl"]  # fmt: skip


def _smollm2_prepare() -> list:
    steps = []
    for kind, source, name, flags in SMOLLM2_SOURCES:
        target = f"{RAW}/{name}.jsonl"
        # CMRC 2018 trial has two empty questions, which training refuses: drop-empty copies the rest
        module = "tpembed.data.prepare" if kind == "drop-empty" else "tpembed.data.convert"
        # a step runs again only when its output is stale, so replacing that output is right
        flags = flags if kind == "drop-empty" else ["--no-provenance", "--overwrite", *flags]
        steps.append((target, [module, kind, f"{SHARED}/{source}", target, *flags]))
    raw = [f"{RAW}/{name}.jsonl" for _, _, name, _ in SMOLLM2_SOURCES]
    evaluation = [f"{SHARED}/{path}" for path in SMOLLM2_EVAL]
    decontaminate = ["tpembed.data.decontaminate", *raw, "--eval", *evaluation, "--output-dir", CLEAN]
    decontaminate += ["--no-progress", "--overwrite"]
    steps.append((f"{CLEAN}/decontamination_summary.json", decontaminate))
    return steps


RECIPES["smollm2"]["prepare"] = _smollm2_prepare()


def run(command: list[str], description: str) -> float:
    print(f"\n=== {description}\n$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    print(f"=== {description}: {seconds / 60:.1f} min", flush=True)
    return seconds


def _newest_input(creates: str, arguments: list[str]) -> float:
    """The newest modification time among the files a step reads (its arguments that exist,
    folders read through, its own output and the folders holding it left out)."""
    target, newest = Path(creates), 0.0
    for argument in arguments:
        path = Path(argument)
        if path == target or path in target.parents or not path.exists():
            continue
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        newest = max([newest, *(f.stat().st_mtime for f in files)])
    return newest


def data_steps(steps: list) -> None:
    """Run each step whose file is missing or older than a file it is made from, like make."""
    for creates, (module, *arguments) in steps:
        target = Path(creates)
        if target.exists() and target.stat().st_mtime >= _newest_input(creates, arguments):
            continue
        why = "missing" if not target.exists() else "older than its inputs"
        run([sys.executable, "-m", module, *arguments], f"prepare {creates} ({why})")


def train_stage(script: str, config_path: str, stage: int, launcher: list[str], extra: list[str]) -> tuple[str, float]:
    config = load_config(["--config", config_path, *extra], base=STAGE_DEFAULTS[stage])
    run_dir = Path(config.train.output_dir)
    latest = latest_checkpoint(run_dir)
    if latest is not None and load_trainer_state(latest)["step"] >= config.train.max_steps:
        print(f"=== stage {stage}: {run_dir} is complete, skipped")
        return str(run_dir), 0.0
    resume = ["--resume-from", "auto"] if latest is not None else []
    command = [*launcher, "-m", f"tpembed.train.{script}", "--config", config_path, *extra, *resume]
    return str(run_dir), run(command, f"stage {stage}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tpembed-pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", choices=sorted(RECIPES), help="a named recipe (its configs and dev sets)")
    parser.add_argument("--stage1", help="stage-1 config")
    parser.add_argument("--stage2", help="stage-2 config (its init_from is set to the stage-1 run)")
    parser.add_argument("--tasks", action="append", default=[], help="evaluation task files")
    parser.add_argument("--output-dir", help="where the export and the evaluation go")
    parser.add_argument("--launch-config", help="accelerate config file for the training steps")
    parser.add_argument("--prepare-only", action="store_true", help="run the recipe's data steps, then stop")
    args = parser.parse_args(argv)
    recipe = dict(RECIPES[args.recipe]) if args.recipe else {"prepare": []}
    for key in ("stage1", "stage2", "output_dir"):
        if getattr(args, key):
            recipe[key] = getattr(args, key)
    recipe["tasks"] = args.tasks or recipe.get("tasks", [])
    if not recipe.get("stage1") or not recipe.get("stage2") or not recipe.get("output_dir"):
        parser.error("give --recipe, or --stage1, --stage2 and --output-dir")

    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    launcher += ["--config_file", args.launch_config] if args.launch_config else ["--num_processes", "1"]
    output_dir = Path(recipe["output_dir"])
    timings = {}
    data_steps(recipe["prepare"])
    if args.prepare_only:
        print(f"data ready ({len(recipe['prepare'])} data steps); --prepare-only: nothing trained")
        return 0
    stage1_dir, timings["stage1_s"] = train_stage("stage1", recipe["stage1"], 1, launcher, [])
    stage2_dir, timings["stage2_s"] = train_stage("stage2", recipe["stage2"], 2, launcher, ["--init-from", stage1_dir])
    export_dir = output_dir / "export"
    export = [sys.executable, "-m", "tpembed.train.export", stage2_dir, str(export_dir), "--overwrite"]
    timings["export_s"] = run([*export, *recipe.get("export_flags", [])], "export")
    if recipe["tasks"]:
        task_flags = [flag for path in recipe["tasks"] for flag in ("--tasks", path)]
        evaluate = [sys.executable, "-m", "tpembed.train.eval", str(export_dir), *task_flags]
        timings["eval_s"] = run([*evaluate, "--output-dir", str(output_dir / "eval")], "evaluate the exported model")
        add_results_to_card(export_dir, output_dir / "eval" / "results.json")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "pipeline_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(f"\ndone: {export_dir} " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
