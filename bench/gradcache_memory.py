"""GradCache memory: peak RSS at global batch 32, 128 and 512 with a fixed mini-batch of 32.

    OMP_NUM_THREADS=2 python bench/gradcache_memory.py [--model tpembed:tiny-qwen3]

Each configuration trains 2 stage-1 steps in its own process (1 positive + 1 hard
negative per query, so 3 texts per query); plain backward is shown beside it for
reference. Peak RSS includes the process's fixed cost (Python, torch, the model).
"""

import argparse

from common import REPO, python, run_measured, scratch_dir


def peak(batch: int, grad_cache: bool, model: str, work) -> float:
    flags = ["--grad-cache", "true", "--grad-cache-rows", "32"] if grad_cache else []
    rss, _ = run_measured([
        python(), "train/stage1.py", "--config", "configs/quickstart/stage1.yaml", "--name-or-path", model,
        "--train-files", str(REPO / "data/samples/snli_triplets_en.jsonl"), "--batch-size", str(batch),
        "--num-hard-negatives", "1", "--query-max-len", "64", "--passage-max-len", "96", "--max-steps", "2",
        "--save-every", "100000", "--output-dir", str(work / f"{batch}-{grad_cache}"), "--report-to", "none",
        "--progress-bar", "false", *flags,
    ])  # fmt: skip
    return rss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tpembed:tiny-qwen3")
    args = parser.parse_args()
    work = scratch_dir("gradcache")
    cached = {batch: peak(batch, True, args.model, work) for batch in (32, 128, 512)}
    plain = {batch: peak(batch, False, args.model, work) for batch in (32, 128, 512)}
    print(f"{args.model}, peak RSS in MiB (mini-batch 32 texts)")
    print("global batch   GradCache   plain backward")
    for batch in (32, 128, 512):
        print(f"{batch:>12}   {cached[batch]:9.0f}   {plain[batch]:14.0f}")
    print(f"GradCache batch 512 / batch 32: {cached[512] / cached[32]:.2f}x (goal <= 1.3x)")
    print(f"plain backward batch 512 / batch 32: {plain[512] / plain[32]:.2f}x")


if __name__ == "__main__":
    main()
