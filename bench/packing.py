"""Padding-free packing: real tokens per second, packed vs padded, on two kinds of data.

    OMP_NUM_THREADS=2 python bench/packing.py [--steps 12] [--model tpembed:tiny-qwen3]

- uniform: the bundled SNLI triplets, short sentences of similar length (little padding);
- skewed: 9 in 10 queries and passages short (4-12 words), 1 in 10 long (150-250 words),
  so padded batches are mostly padding.
Both loops run the same training step (embed, InfoNCE over 8 Matryoshka dims, backward,
AdamW) on the same records; only the batch layout differs. Packed rows are as long as the
batch side's longest text (the default of data.pack_row_tokens). Real tokens exclude padding.
"""

import argparse
import json
import random
import statistics
import time

import torch

from common import scratch_dir
from tpembed.train import build
from tpembed.train.config import load_config
from tpembed.train.loop import micro_step_loss


def skewed_data(path, count=256, seed=0):
    rng = random.Random(seed)
    words = "the a of model text token query passage data train embed layer vector dense sparse batch".split()

    def text():
        length = rng.randint(150, 250) if rng.random() < 0.1 else rng.randint(4, 12)
        return " ".join(rng.choice(words) for _ in range(length))

    with open(path, "w") as handle:
        for _ in range(count):
            handle.write(json.dumps({"query": text(), "pos": text(), "negs": [text()]}) + "\n")


def tokens_per_second(data_path, packing: bool, args) -> float:
    config = load_config(
        ["--config", "configs/quickstart/stage1.yaml", "--name-or-path", args.model,
         "--train-files", str(data_path), "--batch-size", "32", "--num-hard-negatives", "1",
         "--query-max-len", "320", "--passage-max-len", "320", "--packing", str(packing).lower(),
         "--report-to", "none"]
    )  # fmt: skip
    text = build.build_text(config)
    torch.manual_seed(0)
    encoder = build.build_encoder(config, text).train()
    specs, _ = build.build_datasets(config, text.text_format)
    batches = build.build_batches(config, specs, build.build_sampler(config, specs), text, 1, 0)
    objective = build.build_objective(config)
    optimizer = build.build_optimizer(config, encoder)
    rates = []
    for step in range(args.steps + 2):
        batch = batches.micro_batch(step, 0)
        start = time.perf_counter()
        loss, _ = micro_step_loss(encoder, objective, batch, "cpu")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:
            rates.append(batch.num_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", default="tpembed:tiny-qwen3")
    args = parser.parse_args()
    skewed = scratch_dir("packing") / "skewed.jsonl"
    skewed_data(skewed)
    datasets = {"uniform (SNLI)": "data/samples/snli_triplets_en.jsonl", "skewed": skewed}
    goals = {"uniform (SNLI)": 1.0, "skewed": 1.5}
    print(f"{args.model}, batch 32 x 3 texts, CPU, real tokens/s (median of {args.steps} steps)")
    for name, path in datasets.items():
        padded, packed = (tokens_per_second(path, packing, args) for packing in (False, True))
        print(f"{name:>15}: padded {padded:8.0f}  packed {packed:8.0f}  packed / padded {packed / padded:.2f}x "
              f"(goal >= {goals[name]}x)")  # fmt: skip


if __name__ == "__main__":
    main()
