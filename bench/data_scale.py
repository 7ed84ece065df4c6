"""Training data at the published recipe's scale: start-up time and memory of the Arrow store.

    OMP_NUM_THREADS=2 python bench/data_scale.py [--sizes 100000 1000000 3000000] [--num-proc 2]

Synthetic retrieval records shaped like the recipe's (a 12-word query, one positive and four
negatives of about 110 words each), written by the benchmark to local disk. At each size:
- first start-up: conversion and validation into the Arrow cache (records/s with --num-proc),
  then the rest of a training start-up (tokenizer, sampler, batch builder, one batch);
- second start-up: the same with the cache in place;
- resident memory of one rank after start-up (RSS and PSS, which counts shared pages once),
  and of two ranks started together by `accelerate launch --num_processes 2` (their PSS summed);
  and of that, the anonymous memory (the process's own heap: what cannot be shared or dropped)
  and the mapped-file pages (the Arrow files and libraries; clean page cache the kernel can
  drop and shares among processes);
- beside them, the same start-up with the in-memory reader (data/formats.py read_dataset, the
  path before the store) at the sizes given by --memory-sizes.
Most of a process's memory is the training stack itself (torch, tokenizer: a few hundred MiB,
private to each process); the columns "data MiB" subtract the smallest size's PSS.
Each start-up runs in its own process. Never part of CI.
"""

import argparse
import json
import random
import shutil
import subprocess
import sys

from common import REPO, python, scratch_dir

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river market energy health science model data city "
         "history music sport language engine bridge forest summer paper school network system").split()  # fmt: skip


def write_records(path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(n):
        return " ".join(rng.choices(WORDS, k=n))

    with open(path, "w") as handle:
        for i in range(count):
            record = {"query": text(12), "pos": [text(110)], "negs": [text(rng.randint(95, 125)) for _ in range(4)]}
            handle.write(json.dumps(record) + "\n")


def startup(data, cache, num_proc: int, processes: int = 1, reader: str = "store") -> list[dict]:
    """bench/startup_probe.py's measurement, one per process."""
    probe = ["bench/startup_probe.py", str(data), str(cache), str(num_proc), reader]
    launcher = [python()]
    if processes > 1:
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    result = subprocess.run([*launcher, *probe], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stderr[-4000:])
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 3_000_000])
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    work = scratch_dir("data-scale")
    rows = []
    for size in args.sizes:
        data, cache = work / f"records-{size}.jsonl", work / f"cache-{size}"
        write_records(data, size)
        gigabytes = data.stat().st_size / 1e9
        first = startup(data, cache, args.num_proc)[0]
        second = startup(data, cache, args.num_proc)[0]
        two = startup(data, cache, args.num_proc, processes=2)
        memory = startup(data, cache, args.num_proc, reader="memory")[0] if size in args.memory_sizes else None
        rows.append((size, gigabytes, first, second, two, memory))
        if not args.keep:
            data.unlink()
            shutil.rmtree(cache)
    print(f"retrieval records (12-word query, 1 + 4 passages of ~110 words), num_proc {args.num_proc}, CPU")
    print(f"{'records':>9} {'JSONL':>7} {'first s':>8} {'rec/s':>8} {'second s':>9} {'RSS MiB':>8} {'PSS MiB':>8} "
          f"{'anon MiB':>9} {'file MiB':>9} {'2 ranks PSS':>12} {'in-memory s':>12} {'in-memory RSS':>14}")  # fmt: skip
    for size, gigabytes, first, second, two, memory in rows:
        pss_two = sum(r["pss"] for r in two)
        in_memory = f"{memory['seconds']:>12.1f} {memory['rss']:>14.0f}" if memory else f"{'-':>12} {'-':>14}"
        print(
            f"{size:>9} {gigabytes:>6.2f}G {first['seconds']:>8.1f} {size / first['seconds']:>8.0f} "
            f"{second['seconds']:>9.1f} {second['rss']:>8.0f} {second['pss']:>8.0f} {second['anonymous']:>9.0f} "
            f"{second['pss_file']:>9.0f} {pss_two:>12.0f} {in_memory}"
        )
    small, large = rows[0], rows[-1]
    print(f"second start-up at {large[0]} records: {large[3]['seconds']:.1f} s (goal <= 30 s)")
    print(f"one rank's RSS, {large[0]} / {small[0]} records: {large[3]['rss'] / small[3]['rss']:.2f}x (goal <= 1.2x)")
    anon = large[3]["anonymous"] / small[3]["anonymous"]
    print(f"one rank's anonymous memory, {large[0]} / {small[0]} records: {anon:.2f}x")
    two_ranks = sum(r["pss"] for r in large[4])
    print(f"two ranks together / one rank (PSS) at {large[0]}: {two_ranks / large[3]['pss']:.2f}x (goal <= 1.3x)")
    two_small = sum(r["pss"] for r in small[4])
    print(f"two ranks together, {large[0]} / {small[0]} records: {two_ranks / two_small:.2f}x")
    print(
        f"memory beyond the smallest size's, one rank at {large[0]}: {large[3]['pss'] - small[3]['pss']:.0f} MiB; "
        f"two ranks: {two_ranks - sum(r['pss'] for r in small[4]):.0f} MiB"
    )


if __name__ == "__main__":
    main()
