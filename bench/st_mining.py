"""The sentence-transformers side of bench/mining.py (run by it, in its own process).

    python bench/st_mining.py MODEL_DIR RECORDS CORPUS OUTPUT

mine_hard_negatives with the settings tpembed-mine uses by default (exact search, ranks
10-100, relative margin 0.05, 4 negatives, the top ones); writes one JSON line per query with
its chosen negatives.
"""

import json
import sys

from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import mine_hard_negatives


def main(model_dir, records_path, corpus_path, output):
    rows = [json.loads(line) for line in open(records_path, encoding="utf-8")]
    corpus = [json.loads(line)["text"] for line in open(corpus_path, encoding="utf-8")]
    dataset = Dataset.from_dict({"query": [r["query"] for r in rows], "positive": [r["pos"][0] for r in rows]})
    model = SentenceTransformer(model_dir, device="cpu")
    mined = mine_hard_negatives(
        dataset, model, corpus=corpus, range_min=10, range_max=100, relative_margin=0.05, num_negatives=4,
        sampling_strategy="top", output_format="n-tuple", batch_size=64, verbose=False,
    )  # fmt: skip
    with open(output, "w", encoding="utf-8") as handle:
        for row in mined:
            negatives = [row[f"negative_{i}"] for i in range(1, 5) if f"negative_{i}" in row]
            handle.write(json.dumps({"query": row["query"], "negs": negatives}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
