"""GPU throughput: tokens/s, model TFLOP/s and MFU of a Qwen3-0.6B-shaped backbone in bf16.

    python bench/gpu_throughput.py [--steps 10] [--batch 32]
    python bench/gpu_throughput.py --dry-run          # toy size on the CPU: checks the script runs

One H100/H200-class GPU, no internet (random init from a config; token ids are drawn at
random, a fifth of the texts 512 tokens and the rest 64-256, like a retrieval batch). The
same training step (embed queries + passages, InfoNCE over the 8 Matryoshka dims, backward,
AdamW) is timed in four layouts: padded (sdpa), packed (padding-free rows; flash-attention's
varlen kernels when `flash_attn` is installed, else sdpa with a block-diagonal mask, and the
output says which), each with and without GradCache (mini-batches of 8 texts). Then one
step of the best configuration is profiled and its top kernels printed. Never part of CI.
"""

import argparse
import importlib.util
import statistics
import time

import torch

from tpembed.data.templates import pack_sequences, pad_sequences
from tpembed.modeling import EmbeddingObjective, Encoder, EncoderSpec
from tpembed.train.gradcache import cached_micro_step
from tpembed.train.step import micro_step_loss
from tpembed.train.telemetry import FlopCounter

QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip
TOY = dict(QWEN3_0_6B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, vocab_size=1000)  # fmt: skip


def random_batch(rows: int, generator: torch.Generator, packed: bool, longest: int, vocab: int) -> dict:
    short = (longest // 8, longest // 2)
    lengths = [longest if i % 5 == 0 else int(torch.randint(*short, (1,), generator=generator)) for i in range(rows)]
    sequences = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
    return pack_sequences(sequences) if packed else pad_sequences(sequences, 0, "left")


def micro_batch(args, generator, packed):
    from tpembed.data import MicroBatch, Task, text_ids

    anchors = random_batch(args.batch, generator, packed, args.longest, args.vocab)
    candidates = random_batch(args.batch, generator, packed, args.longest, args.vocab)
    ids = text_ids([str(i) for i in range(args.batch)])
    return MicroBatch(Task.retrieval, "random", 0, anchors, candidates, candidate_text_ids=ids)


def build(config_values: dict, attention: str, device: str):
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(**config_values)
    config._attn_implementation = attention
    torch.manual_seed(0)
    encoder = Encoder(Qwen3Model(config), EncoderSpec()).to(device).train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5, fused=device == "cuda")
    return config, encoder, optimizer


def train_step(encoder, objective, optimizer, batch, device, grad_cache: bool) -> None:
    with torch.autocast(device, dtype=torch.bfloat16):
        if grad_cache:
            cached_micro_step(encoder, objective, batch, device, lambda piece, last: piece.backward(), max_rows=8)
        else:
            loss, _ = micro_step_loss(encoder, objective, batch, device)
            loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(args, layout: str, grad_cache: bool) -> dict:
    packed = layout != "padded"
    attention = "flash_attention_2" if layout == "packed (flash-attention varlen)" else "sdpa"
    config, encoder, optimizer = build(args.config, attention, args.device)
    objective = EmbeddingObjective(mrl_dims=[128, 256, 512, 768, 1024, 1280, 1536, 1792], temperature=0.02)
    flops = FlopCounter(config, None, args.device)
    generator = torch.Generator().manual_seed(0)
    times, tokens, squares = [], [], []
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 2):
        batch = micro_batch(args, generator, packed)
        lengths = torch.cat([b["sequence_lengths"] if packed else b["attention_mask"].sum(1)
                             for b in (batch.anchors, batch.candidates)])  # fmt: skip
        sync()
        start = time.perf_counter()
        train_step(encoder, objective, optimizer, batch, args.device, grad_cache)
        sync()
        if step >= 2:
            times.append(time.perf_counter() - start)
            tokens.append(float(lengths.sum()))
            squares.append(float((lengths**2).sum()))
    achieved = statistics.median(flops.step(t, q) / s for t, q, s in zip(tokens, squares, times)) / 1e12
    peak = flops.peak or args.peak_tflops
    return {
        "name": f"{layout}{' + GradCache' if grad_cache else ''}",
        "ms": statistics.median(times) * 1000,
        "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, times)),
        "tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0,
        "layout": layout,
        "grad_cache": grad_cache,
        "attention": attention,
    }


def profile(args, best: dict) -> None:
    """One step of `best` under torch.profiler: where the time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    config, encoder, optimizer = build(args.config, best["attention"], args.device)
    objective = EmbeddingObjective(mrl_dims=[128, 256, 512, 768, 1024, 1280, 1536, 1792], temperature=0.02)
    generator = torch.Generator().manual_seed(1)
    batch = micro_batch(args, generator, best["layout"] != "padded")
    train_step(encoder, objective, optimizer, batch, args.device, best["grad_cache"])  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch_profile(activities=activities) as trace:
        train_step(encoder, objective, optimizer, batch, args.device, best["grad_cache"])
    sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(f"\nprofile of one step, {best['name']} (top 15 by {sort}):")
    print(trace.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="queries per step (+1 positive each)")
    parser.add_argument("--dry-run", action="store_true", help="toy model and batch on the CPU")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="MFU denominator when the GPU is unknown")
    args = parser.parse_args()
    if args.dry_run:
        args.config, args.device, args.longest, args.steps, args.batch = TOY, "cpu", 32, 2, 4
    else:
        assert torch.cuda.is_available(), "this benchmark needs a GPU (or --dry-run)"
        args.config, args.device, args.longest = QWEN3_0_6B, "cuda", 512
    args.vocab = args.config["vocab_size"]
    flash = importlib.util.find_spec("flash_attn") is not None and args.device == "cuda"
    packed = "packed (flash-attention varlen)" if flash else "packed (sdpa, block-diagonal mask: flash_attn missing)"
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (dry run)"
    print(f"{name}; Qwen3-0.6B shape{' (toy)' if args.dry_run else ''}, bf16 autocast, batch {args.batch} x 2 texts")
    results = [measure(args, layout, gc) for layout in ("padded", packed) for gc in (False, True)]
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{r['name']:<62} {r['ms']:8.1f} ms/step {r['tokens_per_s']:10.0f} real tokens/s "
              f"{r['tflops']:7.1f} TFLOP/s  MFU {mfu:>6}  peak {r['memory_gib']:.1f} GiB")  # fmt: skip
    by_name = {r["name"]: r for r in results}
    padded, packed_plain = by_name["padded"], by_name[packed]
    print(f"packed / padded real tokens/s: {packed_plain['tokens_per_s'] / padded['tokens_per_s']:.2f}x (goal >= 1.3x)")
    for layout in ("padded", packed):
        ratio = by_name[f"{layout} + GradCache"]["ms"] / by_name[layout]["ms"]
        print(f"GradCache / plain step time, {layout}: {ratio:.2f}x (goal <= 1.4x)")
    best = max(results, key=lambda r: r["tokens_per_s"])
    print(f"best: {best['name']}, MFU {best['mfu']:.1%} (goal >= 40%)" if best["mfu"] else f"best: {best['name']}")
    profile(args, best)


if __name__ == "__main__":
    main()
