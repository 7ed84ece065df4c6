"""Mine hard negatives for retrieval records with an embedding model.

    tpembed-mine RECORDS OUTPUT --model runs/s1                        # a tpembed run or checkpoint
    tpembed-mine RECORDS OUTPUT --model exports/m --corpus corpus.jsonl --dim 256
    tpembed-mine RECORDS OUTPUT --base-model PATH --template prompteol  # a base LM, no training
    accelerate launch --num_processes 8 -m tpembed.train.mine RECORDS OUTPUT --model runs/s1

RECORDS are retrieval records {query, pos, negs, instruction} (JSONL, parquet or a saved
dataset). The corpus is --corpus (JSONL {text} or {_id, title, text}, or a BEIR directory) or,
by default, every record's positives. The model is a tpembed run, checkpoint or model
directory, a tpembed export, any sentence-transformers directory, or a base LM; it encodes
queries with the record's instruction (else --instruction) in its own format, documents raw.

OUTPUT holds the same records in the same order with their negatives replaced by the mined
ones and a `mining` field (model, dim, settings, positive and negative scores) that training
ignores; OUTPUT.summary.json and the printed summary count what each rule removed. The
defaults and the reason for each are in docs/building-data.md. Embeddings go to the work
directory (--work-dir, default OUTPUT.mining/) shard by shard, so a killed run started again
encodes only the shards it had not finished; several processes (accelerate launch) share the
encoding and write the same output as one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

from tpembed.data import DataError
from tpembed.data.io import OutputExistsError
from tpembed.data.mining import BackgroundPrepare, MiningSettings, PreparationFailed, mine
from tpembed.modeling.token_prepending import parse_tp_layers
from tpembed.train.config import DataConfig


def _relative_margin(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpembed-mine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("records", help="retrieval records to mine negatives for")
    parser.add_argument("output", help="where to write the records with mined negatives (JSONL)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="tpembed run/checkpoint/model directory, export, or sentence-transformers dir")
    model.add_argument("--base-model", help="a base LM without training (PromptEOL)")
    model.add_argument("--template", default="prompteol", help="base model: the template")
    model.add_argument("--tp-layers", type=parse_tp_layers, help="base model: Token Prepending layers")
    model.add_argument("--placeholder", help="base model: the placeholder token (added when missing)")
    model.add_argument("--no-placeholder", action="store_true", help="base model: the template without placeholder")
    model.add_argument("--instruction", default=DataConfig.default_instruction,
                       help="query instruction of records that have none")  # fmt: skip
    model.add_argument("--batch-size", type=int, default=64, help="texts per encoding batch")
    model.add_argument("--query-max-len", type=int, help="max query tokens (default: the model's)")
    model.add_argument("--passage-max-len", type=int, help="max document tokens (default: the model's)")
    choice = parser.add_argument_group("choosing negatives")
    defaults = MiningSettings()
    choice.add_argument("--range-min", type=int, default=defaults.range_min, help="skip the first ranks")
    choice.add_argument("--range-max", type=int, default=defaults.range_max, help="ranks considered")
    choice.add_argument("--relative-margin", type=_relative_margin, default=defaults.relative_margin,
                        help="keep a candidate only below (1 - m) x the positive's score; 'none' disables")  # fmt: skip
    choice.add_argument("--absolute-margin", type=float, help="keep a candidate only below positive - m")
    choice.add_argument("--max-score", type=float, help="keep a candidate only below this score")
    choice.add_argument("--num-negatives", type=int, default=defaults.num_negatives)
    choice.add_argument("--sampling", choices=["top", "random"], default=defaults.sampling)
    choice.add_argument("--too-few", choices=["keep", "drop", "fill"], default=defaults.too_few,
                        help="records with fewer candidates: keep fewer negatives, drop the record, or fill at "
                             "random from the corpus (never a positive or a near-duplicate of one)")  # fmt: skip
    choice.add_argument("--seed", type=int, default=defaults.seed)
    scale = parser.add_argument_group("scale")
    scale.add_argument("--corpus", help="JSONL {text} / {_id, title, text}, or a BEIR directory")
    scale.add_argument("--dim", type=int, help="mine at this Matryoshka dim (default: the full embedding)")
    scale.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="embeddings on disk")
    scale.add_argument("--shard-size", type=int, default=50_000, help="texts per embedding shard")
    scale.add_argument("--query-block", type=int, default=1024, help="queries searched at a time")
    scale.add_argument("--faiss", action="store_true", help="search with faiss (exact inner product)")
    scale.add_argument("--work-dir", help="embedding shards and the resume state (default OUTPUT.mining/)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def model_identity(args) -> str:
    """What decides the embeddings: the model's files (names, sizes, times) and the encoding options."""
    source = Path(args.model or args.base_model)
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else []
    stamp = [(str(p.relative_to(source)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    options = [args.template, args.tp_layers, args.query_max_len, args.passage_max_len, bool(args.base_model),
               args.placeholder, args.no_placeholder]  # fmt: skip
    digest = hashlib.sha256(json.dumps([str(source.resolve()), stamp, options], default=str).encode()).hexdigest()
    return f"{source.name}@{digest[:16]}"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.base_model):
        parser.error("give either --model or --base-model")
    output = Path(args.output)
    work = Path(args.work_dir or output.with_name(output.name + ".mining"))
    # rank 0 reads the data in a child process while this one loads the model
    background = None
    if int(os.environ.get("RANK", "0")) == 0 and (args.overwrite or not output.exists()):
        background = BackgroundPrepare(args.records, args.corpus, work, args.instruction)
    with background or contextlib.nullcontext():
        return _run(args, output, work, background)


def _run(args, output: Path, work: Path, background: BackgroundPrepare | None) -> int:
    import torch
    from accelerate import PartialState

    from tpembed.train.eval import open_model

    # processes on CPUs talk over gloo (as training does); on GPUs accelerate picks NCCL
    on_cpu = not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu, **({"backend": "gloo"} if on_cpu and os.environ.get("WORLD_SIZE") else {}))
    try:
        encode, _, name = open_model(
            args.model, base_model=args.base_model, template=args.template, tp_layers=args.tp_layers,
            placeholder=args.placeholder, use_placeholder=not args.no_placeholder,
            query_max_len=args.query_max_len, passage_max_len=args.passage_max_len, batch_size=args.batch_size,
            device=state.device,
        )  # fmt: skip
    except (OSError, ValueError) as error:
        print(f"error: --model {args.model or args.base_model} cannot be loaded: {error}", file=sys.stderr)
        return 1
    settings = MiningSettings(
        range_min=args.range_min, range_max=args.range_max, relative_margin=args.relative_margin,
        absolute_margin=args.absolute_margin, max_score=args.max_score, num_negatives=args.num_negatives,
        sampling=args.sampling, too_few=args.too_few, seed=args.seed,
    )  # fmt: skip
    try:
        summary = mine(
            args.records, output, encode=encode, model_id=model_identity(args),
            work=work, corpus_path=args.corpus,
            settings=settings, dim=args.dim, dtype=args.dtype, shard_size=args.shard_size,
            query_block=args.query_block, use_faiss=args.faiss, default_instruction=args.instruction,
            overwrite=args.overwrite, rank=state.process_index, world_size=state.num_processes,
            barrier=state.wait_for_everyone, progress=not args.no_progress and state.is_main_process,
            background=background,
        )  # fmt: skip
    except (DataError, OutputExistsError, ValueError, ImportError, PreparationFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if summary is not None:
        print(f"mined with {name} into {output}")
        print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
