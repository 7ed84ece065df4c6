"""Framework overhead: a tpembed training step vs a bare loop on the same batches.

    OMP_NUM_THREADS=2 python bench/overhead.py [--steps 20] [--model tpembed:tiny-qwen3]

Both loops see the same token batches (32 queries + 32 positives + 32 hard negatives)
and the same AdamW step. The bare loop runs only the backbone's forward and backward
(the mean of its last hidden states as the loss); tpembed adds what makes it tpembed:
last-token pooling, the MRL head, InfoNCE with query-query negatives on all eight
Matryoshka dims, and its own step bookkeeping. Timed alternately, medians reported.
"""

import argparse
import statistics
import time

import torch

from tpembed.train import build
from tpembed.train.config import load_config
from tpembed.train.loop import micro_step_loss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="tpembed:tiny-qwen3")
    args = parser.parse_args()
    config = load_config(
        ["--config", "configs/quickstart/stage1.yaml", "--name-or-path", args.model, "--batch-size", "32",
         "--num-hard-negatives", "1", "--query-max-len", "64", "--passage-max-len", "96", "--report-to", "none"]
    )  # fmt: skip
    text = build.build_text(config)
    encoder = build.build_encoder(config, text).train()
    specs, _ = build.build_datasets(config, text.text_format)
    batches = build.build_batches(config, specs, build.build_sampler(config, specs), text, 1, 0)
    objective = build.build_objective(config)
    optimizer = build.build_optimizer(config, encoder)
    data = [batches.micro_batch(step, 0) for step in range(args.steps + 2)]

    def tpembed_step(batch):
        loss, _ = micro_step_loss(encoder, objective, batch, "cpu")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    def bare_step(batch):
        loss = sum(
            encoder.backbone(
                input_ids=batch[side]["input_ids"], attention_mask=batch[side]["attention_mask"]
            ).last_hidden_state.mean()
            for side in ("anchors", "candidates")
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    times = {"tpembed": [], "bare": []}
    for index, batch in enumerate(data):
        for name, step in (("tpembed", tpembed_step), ("bare", bare_step)):
            start = time.perf_counter()
            step(batch)
            if index >= 2:  # warm-up
                times[name].append(time.perf_counter() - start)
    tpembed, bare = statistics.median(times["tpembed"]), statistics.median(times["bare"])
    print(f"{args.model}, {args.steps} steps, batch 32 x (1 + 1 + 1) texts, CPU")
    print(f"tpembed step {tpembed * 1000:.1f} ms, bare backbone step {bare * 1000:.1f} ms")
    print(f"overhead: {100 * (tpembed / bare - 1):+.1f}% (goal <= 10%)")


if __name__ == "__main__":
    main()
