"""Stage-1 steps per second and peak RSS: tpembed vs sentence-transformers v6, in one run.

    OMP_NUM_THREADS=2 python bench/vs_sentence_transformers.py [--steps 30] [--batch-size 32]

Both train the same random-init tiny Qwen3 (tpembed:tiny-qwen3, saved once as a normal
checkpoint for sentence-transformers) with last-token pooling and a Dense 1792 head, on the
same 640 SNLI triplets (1 positive + 1 hard negative per query), batch size, max length 96,
learning rate 1e-4, temperature 0.05 (scale 20) and the Matryoshka loss over the 8 dims, in
fp32 on the CPU, one process each. tpembed also computes its query-query negatives.
Step times are medians after 2 warm-up steps; RSS is each process's peak.
"""

import argparse
import json

from common import REPO, median_step_seconds, python, run_measured, scratch_dir

INSTRUCTION = "Given a premise, retrieve a hypothesis that is entailed by the premise"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    work = scratch_dir("vs-st")
    data = REPO / "data/samples/snli_triplets_en.jsonl"

    # the same initial weights for both: tpembed's built-in model saved as a checkpoint
    model_dir = work / "tiny-qwen3"
    run_measured([python(), "-c", (
        "import sys; from modeling import TINY_QWEN3, load_backbone, load_tokenizer; "
        "load_backbone(TINY_QWEN3, seed=0).save_pretrained(sys.argv[1]); "
        "load_tokenizer(TINY_QWEN3).save_pretrained(sys.argv[1])"
    ), str(model_dir)])  # fmt: skip

    tpembed_rss, _ = run_measured([
        python(), "train/stage1.py", "--config", "configs/quickstart/stage1.yaml",
        "--name-or-path", str(model_dir), "--train-files", str(data), "--default-instruction", INSTRUCTION,
        "--batch-size", str(args.batch_size), "--num-hard-negatives", "1", "--query-max-len", "96",
        "--passage-max-len", "96", "--max-steps", str(args.steps), "--save-every", "100000", "--warmup-steps", "0",
        "--learning-rate", "1e-4", "--temperature", "0.05", "--output-dir", str(work / "tpembed"),
        "--report-to", "none", "--progress-bar", "false", "--log-every", "1000",
    ])  # fmt: skip
    tpembed_step = median_step_seconds(work / "tpembed" / "metrics.jsonl")

    st_rss, output = run_measured([
        python(), "bench/st_baseline.py", str(model_dir), str(data), str(work / "st"), str(args.batch_size),
        str(args.steps), "96", INSTRUCTION,
    ])  # fmt: skip
    st_step = json.loads(output.strip().splitlines()[-1])["median_step_seconds"]

    print(f"batch {args.batch_size}, {args.steps} steps, tiny Qwen3, CPU fp32")
    print(f"tpembed:               {1 / tpembed_step:6.3f} steps/s  peak RSS {tpembed_rss:7.0f} MiB")
    print(f"sentence-transformers: {1 / st_step:6.3f} steps/s  peak RSS {st_rss:7.0f} MiB")
    print(f"speed ratio tpembed / sentence-transformers: {st_step / tpembed_step:.2f}x (goal >= 1.5x)")
    print(f"memory ratio tpembed / sentence-transformers: {tpembed_rss / st_rss:.2f}x (goal <= 1.0x)")


if __name__ == "__main__":
    main()
