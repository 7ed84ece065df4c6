"""Worker for tests/test_store.py: every rank loads the same dataset through the store with the
first process building while the others wait; writes OUT/rank-N.json with what it saw."""

import json
import os
import sys

import torch
from accelerate import PartialState

import tpembed.data.store as store

path, cache, out = sys.argv[1:4]
on_cpu = not torch.cuda.is_available()
state = PartialState(cpu=on_cpu, **({"backend": "gloo"} if on_cpu else {}))
built = []
original = store.build_cache
store.build_cache = lambda *args, **kwargs: built.append(True) or original(*args, **kwargs)
data = store.load_dataset(path, "retrieval", "d", cache_dir=cache, main_process_first=state.local_main_process_first,
                          progress=False)  # fmt: skip
result = {"built": len(built), "records": len(data), "first": data.queries[0], "last": data.queries[len(data) - 1]}
with open(os.path.join(out, f"rank-{state.process_index}.json"), "w") as handle:
    json.dump(result, handle)
