"""One process's training start-up on a dataset, for bench/data_scale.py (run by it, also under
`accelerate launch`): the seconds it took and its memory after it, as one JSON line.

    python bench/startup_probe.py RECORDS CACHE_DIR NUM_PROC [store|memory]

`memory` reads the dataset into Python lists instead (data/formats.py read_dataset, the path
training took before the Arrow store), for comparison.
"""

import json
import os
import sys
import time
from contextlib import nullcontext

start = time.perf_counter()
from tpembed.train import build  # noqa: E402  (the imports are part of the start-up)
from tpembed.train.config import load_config  # noqa: E402


def main() -> None:
    # The store validates with spawned worker processes, which import this file again:
    # everything runs under the __main__ guard.
    records, cache, num_proc = sys.argv[1:4]
    if sys.argv[4:] == ["memory"]:
        from tpembed.data.formats import read_dataset

        kept = ("allow_empty_text", "score_range", "placeholder", "report", "required_negatives")
        build.load_dataset = lambda path, task, name, **options: read_dataset(
            path, task, name, **{key: options[key] for key in kept}
        )
    config = load_config(["--config", "configs/quickstart/stage1.yaml", "--train-files", records, "--cache-dir", cache,
                          "--num-proc", num_proc, "--progress-bar", "false", "--batch-size", "256"])  # fmt: skip
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    first = nullcontext
    if world > 1:
        from accelerate import PartialState

        first = PartialState(cpu=True, backend="gloo").local_main_process_first
    run = build.setup_run(config, None, world, rank, first)
    run.batches.micro_batch(0, 0)  # the first step's records, fetched and tokenised
    seconds = time.perf_counter() - start
    memory = {}
    for line in open("/proc/self/smaps_rollup"):
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss", "Anonymous", "Pss_File"):  # Anonymous: private memory; Pss_File: mapped files
            memory[key.lower()] = int(value.split()[0]) / 1024
    line = json.dumps({"seconds": seconds, **memory, "records": len(run.specs[0].data)}) + "\n"
    sys.stdout.write(line)  # one write of a short line: the lines of two ranks do not interleave
    sys.stdout.flush()


if __name__ == "__main__":
    main()
