"""Rebuild the bundled quickstart sample from the source files (see README.md here).

    python data/samples/build_samples.py PATH/TO/shared/data

Deterministic: the same sources give the same files.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write(name, rows):
    with open(HERE / name, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)} records")


def main(source: Path) -> None:
    snli = read(source / "snli_en" / "validation.jsonl")

    # retrieval triplets: premise -> entailed hypotheses, contradictions as hard negatives
    by_premise = defaultdict(lambda: {"entailment": [], "contradiction": []})
    for row in snli:
        if row["label"] in ("entailment", "contradiction"):
            by_premise[row["premise"]][row["label"]].append(row["hypothesis"])
    triplets = [
        {"query": premise, "pos": groups["entailment"], "negs": groups["contradiction"]}
        for premise, groups in by_premise.items()
        if groups["entailment"] and groups["contradiction"]
    ]
    write("snli_triplets_en.jsonl", triplets[:640])

    # NLI pairs for CoSENT, from premises not used above
    used = {row["query"] for row in triplets[:640]}
    pairs = [
        {"text1": r["premise"], "text2": r["hypothesis"], "label": r["label"]} for r in snli if r["premise"] not in used
    ]
    write("snli_pairs_en.jsonl", pairs[:768])

    zh = read(source / "zh_triplets_text2vec" / "train.jsonl")
    write("text2vec_triplets_zh.jsonl", [{"query": r["query"], "pos": r["pos"], "negs": r["neg"]} for r in zh[:480]])

    # classification: each CMRC 2018 trial question labelled with the passage it asks about
    cmrc = read(source / "cmrc2018_trial" / "train.jsonl")
    write(
        "cmrc2018_questions_zh.jsonl",
        [{"text": r["query"], "label": r["id"].rsplit("_QUERY_", 1)[0]} for r in cmrc if r["query"].strip()],
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
