"""Padding-free packing: real tokens per second, packed vs padded, on length-skewed data.

    OMP_NUM_THREADS=2 python bench/packing.py [--steps 12] [--model tpembed:tiny-qwen3]

The data: 9 in 10 queries and passages are short (4-12 words), 1 in 10 long (150-250
words), so padded batches are mostly padding. Both loops run the same training step
(embed, InfoNCE over 8 Matryoshka dims, backward, AdamW) on the same records; only the
batch layout differs. Real tokens exclude padding.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", default="tpembed:tiny-qwen3")
    args = parser.parse_args()
    data_path = scratch_dir("packing") / "skewed.jsonl"
    skewed_data(data_path)
    results = {}
    for packing in (False, True):
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
        results[packing] = statistics.median(rates)
    print(f"{args.model}, batch 32 x 3 texts, 10% long texts, CPU")
    print(f"padded: {results[False]:8.0f} real tokens/s")
    print(f"packed: {results[True]:8.0f} real tokens/s")
    print(f"packed / padded: {results[True] / results[False]:.2f}x (goal >= 1.5x)")


if __name__ == "__main__":
    main()
