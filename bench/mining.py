"""Hard-negative mining: tpembed-mine vs sentence-transformers' mine_hard_negatives, one run.

    OMP_NUM_THREADS=2 python bench/mining.py [--sizes 50000 500000] [--queries 2000]

Same model (a random-init tiny Qwen3 with last-token pooling, saved as a sentence-transformers
directory: both load it the same way), same corpus of short synthetic passages (8-24 words),
same records (a query is its positive with two words left out), same settings (exact search, ranks
10-100, relative margin 0.05, 4 negatives, the top ones; tpembed stores float32 embeddings
here so the scores are the same numbers). Reports, at each corpus size: wall time and peak RSS
of each (separate processes), and how many queries got the same negatives from both.
"""

import argparse
import json
import random
import time

from common import python, run_measured, scratch_dir

WORDS = ("the a of model text token query passage data train embed layer vector dense sparse batch river city "
         "music science history sport market energy health film garden ocean mountain island planet language "
         "engine bridge forest winter summer coffee paper school").split()  # fmt: skip


def write_data(work, corpus_size: int, num_queries: int, seed: int = 0):
    rng = random.Random(seed)
    passages = list(dict.fromkeys(" ".join(rng.choices(WORDS, k=rng.randint(8, 24))) for _ in range(corpus_size)))
    corpus, records = work / "corpus.jsonl", work / "records.jsonl"
    with corpus.open("w") as handle:
        for text in passages:
            handle.write(json.dumps({"text": text}) + "\n")
    with records.open("w") as handle:
        for positive in rng.sample(passages, num_queries):
            words = positive.split()
            dropped = set(rng.sample(range(len(words)), k=2))  # the positive, two words left out
            query = " ".join(w for i, w in enumerate(words) if i not in dropped)
            handle.write(json.dumps({"query": query, "pos": [positive]}) + "\n")
    return corpus, records, len(passages)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 500_000])
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    work = scratch_dir("mining")
    model_dir = work / "model"
    run_measured([python(), "-c", (
        "import sys, torch; from tpembed.modeling import TINY_QWEN3, load_backbone, load_tokenizer; "
        "from sentence_transformers import SentenceTransformer; "
        "from sentence_transformers.base.modules import Transformer; "
        "from sentence_transformers.sentence_transformer.modules import Pooling; "
        "d = sys.argv[1] + '/hf'; load_backbone(TINY_QWEN3, seed=0).save_pretrained(d); "
        "load_tokenizer(TINY_QWEN3).save_pretrained(d); t = Transformer(d, max_seq_length=64); "
        "SentenceTransformer(modules=[t, Pooling(t.get_embedding_dimension(), 'lasttoken')]).save(sys.argv[1])"
    ), str(model_dir)])  # fmt: skip
    rows = []
    for size in args.sizes:
        folder = work / str(size)
        folder.mkdir()
        corpus, records, actual = write_data(folder, size, args.queries)
        start = time.perf_counter()
        tpembed_rss, _ = run_measured([
            python(), "-m", "tpembed.train.mine", str(records), str(folder / "tpembed.jsonl"), "--model",
            str(model_dir), "--corpus", str(corpus), "--dtype", "float32", "--batch-size", "64", "--no-progress",
        ])  # fmt: skip
        tpembed_seconds = time.perf_counter() - start
        start = time.perf_counter()
        st_rss, _ = run_measured([python(), "bench/st_mining.py", str(model_dir), str(records), str(corpus),
                                  str(folder / "st.jsonl")])  # fmt: skip
        st_seconds = time.perf_counter() - start
        ours = {r["query"]: r["negs"] for r in map(json.loads, (folder / "tpembed.jsonl").open())}
        theirs = {r["query"]: r["negs"] for r in map(json.loads, (folder / "st.jsonl").open())}
        same = sum(ours.get(q) == negs for q, negs in theirs.items())
        rows.append((actual, tpembed_seconds, tpembed_rss, st_seconds, st_rss, same, len(theirs)))
    print(f"tiny Qwen3 (64-d, last token), {args.queries} queries, CPU, exact search, ranks 10-100, margin 0.05")
    print(f"{'corpus':>8} {'tpembed s':>10} {'RSS MiB':>8} {'ST s':>8} {'RSS MiB':>8}  same negatives")
    for corpus, ts, tr, ss, sr, same, total in rows:
        print(f"{corpus:>8} {ts:>10.1f} {tr:>8.0f} {ss:>8.1f} {sr:>8.0f}  {same}/{total} queries")
    (small, large) = rows[0], rows[-1]
    print(f"tpembed peak RSS, largest / smallest corpus: {large[2] / small[2]:.2f}x (goal <= 1.3x)")
    print(f"tpembed / sentence-transformers peak RSS at the largest: {large[2] / large[4]:.2f}x (goal <= 0.5x)")
    print(f"tpembed / sentence-transformers wall time at the largest: {large[1] / large[3]:.2f}x (goal <= 1.0x)")


if __name__ == "__main__":
    main()
