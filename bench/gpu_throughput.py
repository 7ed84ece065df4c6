"""GPU throughput: tokens/s and MFU of a Qwen3-0.6B-shaped backbone, bf16, sequence 512.

    python bench/gpu_throughput.py [--steps 12] [--batch 32]

One H100/H200-class GPU, no internet (random init from a config; the tokenizer is not
needed: token ids are drawn at random, a fifth of the texts full length and the rest
64-256 tokens, like a retrieval batch). Four configurations of the same training step
(embed queries + passages, InfoNCE over the 8 Matryoshka dims, backward, AdamW) are timed:
padded, packed (padding-free), and both with GradCache (mini-batches of 8 texts).
Finishes in a few minutes; never part of CI.
"""

import argparse
import statistics
import time

import torch

from tpembed.data.templates import pack_sequences, pad_sequences
from tpembed.modeling import EmbeddingObjective, Encoder, EncoderSpec
from tpembed.train.gradcache import cached_micro_step
from tpembed.train.loop import micro_step_loss
from tpembed.train.telemetry import FlopCounter

QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip


def random_batch(rows: int, generator: torch.Generator, packed: bool) -> dict:
    lengths = [512 if i % 5 == 0 else int(torch.randint(64, 257, (1,), generator=generator)) for i in range(rows)]
    sequences = [torch.randint(0, 150000, (n,), generator=generator).tolist() for n in lengths]
    return pack_sequences(sequences) if packed else pad_sequences(sequences, 0, "left")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32, help="queries per step (+1 positive each)")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(**QWEN3_0_6B)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    encoder = Encoder(Qwen3Model(config), EncoderSpec()).cuda().train()
    objective = EmbeddingObjective(mrl_dims=[128, 256, 512, 768, 1024, 1280, 1536, 1792], temperature=0.02)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5, fused=True)
    flops = FlopCounter(config, None, "cuda")
    print(torch.cuda.get_device_name(), f"peak {flops.peak} TFLOP/s bf16 dense")
    for packed in (False, True):
        for grad_cache in (False, True):
            generator = torch.Generator().manual_seed(0)
            times, tokens, squares = [], [], []
            torch.cuda.reset_peak_memory_stats()
            for step in range(args.steps + 2):
                batch = {
                    "task": "retrieval",
                    "anchors": random_batch(args.batch, generator, packed),
                    "candidates": random_batch(args.batch, generator, packed),
                }
                lengths = torch.cat(
                    [
                        b["sequence_lengths"] if packed else b["attention_mask"].sum(1)
                        for b in (batch.anchors, batch.candidates)
                    ]
                )
                torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    if grad_cache:
                        cached_micro_step(
                            encoder, objective, batch, "cuda", lambda piece, last: piece.backward(), max_rows=8
                        )
                    else:
                        loss, _ = micro_step_loss(encoder, objective, batch, "cuda")
                        loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                if step >= 2:
                    times.append(time.perf_counter() - start)
                    tokens.append(float(lengths.sum()))
                    squares.append(float((lengths**2).sum()))
            seconds = statistics.median(times)
            rate = statistics.median(t / s for t, s in zip(tokens, times))
            achieved = statistics.median(flops.step(t, q) / s for t, q, s in zip(tokens, squares, times)) / 1e12
            mfu = f"{achieved / flops.peak:.1%}" if flops.peak else "n/a"
            print(
                f"{'packed' if packed else 'padded'} {'+ GradCache' if grad_cache else '           '}: "
                f"{seconds * 1000:7.1f} ms/step, {rate:9.0f} real tokens/s, {achieved:6.1f} TFLOP/s, MFU {mfu}, "
                f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            )


if __name__ == "__main__":
    main()
