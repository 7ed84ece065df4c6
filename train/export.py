"""Export a tpembed checkpoint as a sentence-transformers model, and prove it encodes the same.

    tpembed-export runs/quickstart/stage2 exports/quickstart-stage2
    tpembed-export CHECKPOINT OUT_DIR --query-instruction "Given a question, retrieve passages" \\
        --prompt nli="Retrieve semantically similar text" --eval-results evals/results.json
    tpembed-export runs/s2 exports/s2 --language zh --instruction STS=检索语义相似的文本

The directory holds: the backbone (safetensors) and tokenizer (left padding) at
the root, read by a small input module (`tpembed_st.py`, which applies the stored
template and Token Prepending); `1_Pooling` (last token); `2_Dense` (the MRL head,
hidden -> 1792, bias, identity activation); no Normalize module (slice to a
Matryoshka dim first, then normalise: `truncate_dim=d, normalize_embeddings=True`);
prompts `query` (with the instruction) and `document` (empty), and one per mteb task
type and C-MTEB task from tpembed's instruction table (--language, --instructions
FILE, --instruction KEY=INSTRUCTION; tpembed.train.mteb_adapter), so mteb applies
the instructions tpembed evaluates with; cosine similarity; a model card. Load it with

    SentenceTransformer(OUT_DIR, trust_remote_code=True)

Before the directory is moved into place, the export encodes sample queries and
documents with it and with the training-time encoder and fails when they differ
by more than 1e-4 (fp32).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from tpembed.data import templates
from tpembed.modeling import token_prepending
from tpembed.train.checkpoint import CHECKPOINTS
from tpembed.train.config import load_saved_config
from tpembed.train.embedder import Embedder, model_directory
from tpembed.train.eval import format_table
from tpembed.train.mteb_adapter import (
    InstructionTable,
    MTEBUsageError,
    build_instruction_table,
    default_query_instruction,
    parse_assignments,
    table_prompts,
    training_datasets,
    training_datasets_line,
)

ST_MODULE_DIR = Path(__file__).resolve().parent / "st_module"
PARITY_TOLERANCE = 1e-4
PARITY_TEXTS = (
    "A man is playing a guitar on stage.",
    "一架飞机要起飞了。",
    "",
    "a text that contains the placeholder <|im_start|> string",
    " ".join(f"token{i}" for i in range(700)),  # longer than the max lengths: truncation
)


CARD_USAGE = """## Usage

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("PATH/TO/THIS/DIRECTORY", trust_remote_code=True, truncate_dim=512)
queries = model.encode(["how do planes take off?"], prompt_name="query", normalize_embeddings=True)
documents = model.encode(["Lift grows with airspeed ..."], prompt_name="document", normalize_embeddings=True)
print(model.similarity(queries, documents))
```

Slice to a Matryoshka dim first, then normalise: pass `truncate_dim` and `normalize_embeddings=True`."""

CARD_MTEB = """## mteb

The prompts hold an instruction per mteb task type (`STS`, `Classification`, `Retrieval-query`, ...)
and per C-MTEB task, under the keys mteb looks up, so mteb encodes every task the way tpembed evaluates:
the instruction on queries and on both sides of symmetric tasks, none on documents.

```python
import mteb
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("PATH/TO/THIS/DIRECTORY", trust_remote_code=True, truncate_dim=DIM)
model.model_card_data.model_name = "tpembed/NAME"  # mteb files all unnamed local models under one name
results = mteb.evaluate(model, mteb.get_tasks(tasks=["LCQMC", "T2Retrieval"]))
```"""


class ExportError(RuntimeError):
    pass


@dataclass
class ExportReport:
    out_dir: Path
    max_abs_diff: dict[str, float]


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    query_instruction: str | None = None,
    prompts: dict[str, str] | None = None,
    instructions: InstructionTable | None = None,
    eval_results: str | Path | None = None,
    overwrite: bool = False,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
) -> ExportReport:
    """Write the sentence-transformers directory, check parity, then move it into place. `instructions`
    is the table of task-type and task prompts (default: English, InstructionTable.default())."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} exists; pass --overwrite to replace it")
    instructions = instructions or InstructionTable.default()
    model_dir = model_directory(checkpoint)
    run_config = _run_config(model_dir)
    if query_instruction is None:
        query_instruction = default_query_instruction(run_config, instructions)
    embedder = Embedder.from_checkpoint(
        model_dir, device="cpu", query_max_len=query_max_len, passage_max_len=passage_max_len
    )
    text_format = embedder.text.text_format

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        all_prompts = table_prompts(instructions, query_instruction, text_format.prompt)
        all_prompts.update({name: text_format.prompt(text) for name, text in (prompts or {}).items()})
        _write(staging, embedder, model_dir, all_prompts)
        diffs = parity_check(staging, embedder, query_instruction)
        _write_card(
            staging, out_dir.name, embedder, run_config, model_dir, query_instruction, all_prompts, diffs, eval_results
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return ExportReport(out_dir, diffs)


def parity_check(st_dir: Path, embedder: Embedder, query_instruction: str | None) -> dict[str, float]:
    """Max |exported - training-time| over sample queries and documents; raises above 1e-4."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(st_dir), trust_remote_code=True, device="cpu")
    texts = list(PARITY_TEXTS)
    diffs = {}
    for role, instruction in (("query", query_instruction), ("document", None)):
        exported = model.encode(texts, prompt_name=role, convert_to_tensor=True, batch_size=2).float().cpu()
        training = embedder.encode(texts, instruction=instruction, batch_size=3)
        diffs[role] = float((exported - training).abs().max())
    worst = max(diffs.values())
    if not worst <= PARITY_TOLERANCE:
        raise ExportError(
            f"parity check failed: the exported model's embeddings differ from the training-time encoder's by "
            f"{worst:.3e} (> {PARITY_TOLERANCE}); query {diffs['query']:.3e}, document {diffs['document']:.3e}"
        )
    return diffs


def _write(directory: Path, embedder: Embedder, model_dir: Path, prompts: dict[str, str]) -> None:
    encoder = embedder.encoder
    encoder.backbone.save_pretrained(directory, safe_serialization=True)
    _save_tokenizer(model_dir, directory)
    spec = encoder.spec
    st_config = {
        "text_format": embedder.text.text_format.to_dict(),
        "query_max_len": embedder.text.query_max_len,
        "passage_max_len": embedder.text.passage_max_len,
        "tp_layers": list(spec.tp_layers),
        "mrl_dims": list(spec.mrl_dims) if encoder.head is not None else [encoder.backbone.config.hidden_size],
    }
    (directory / "tpembed_st_config.json").write_text(json.dumps(st_config, indent=2, ensure_ascii=False) + "\n")
    shutil.copyfile(ST_MODULE_DIR / "tpembed_st.py", directory / "tpembed_st.py")
    # the module imports these two of tpembed's own files, which import only torch and the standard library
    shutil.copyfile(templates.__file__, directory / "tpembed_templates.py")
    shutil.copyfile(token_prepending.__file__, directory / "tpembed_token_prepending.py")

    _write_json(directory / "modules.json", _write_modules(directory, encoder))
    _write_json(
        directory / "config_sentence_transformers.json",
        {
            "__version__": _versions(),
            "model_type": "SentenceTransformer",
            "prompts": prompts,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )


def _write_modules(directory: Path, encoder) -> list[dict]:
    """Pooling and Dense (the Matryoshka head) after tpembed's input module; returns modules.json."""
    hidden = encoder.backbone.config.hidden_size
    pooling_mode = {"last_token": "lasttoken", "mean": "mean"}[encoder.spec.pooling]
    modules = [{"idx": 0, "name": "0", "path": "", "type": "tpembed_st.TPEmbedTransformer"}]
    (directory / "1_Pooling").mkdir()
    _write_json(
        directory / "1_Pooling" / "config.json",
        {"embedding_dimension": hidden, "pooling_mode": pooling_mode, "include_prompt": True},
    )
    modules.append(
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.sentence_transformer.modules.Pooling",
        }
    )
    if encoder.head is not None:
        linear = encoder.head.linear
        (directory / "2_Dense").mkdir()
        _write_json(
            directory / "2_Dense" / "config.json",
            {
                "in_features": linear.in_features,
                "out_features": linear.out_features,
                "bias": linear.bias is not None,
                "activation_function": "torch.nn.modules.linear.Identity",
                "module_input_name": "sentence_embedding",
                "module_output_name": "sentence_embedding",
            },
        )
        weights = {"linear.weight": linear.weight.detach().float().contiguous()}
        if linear.bias is not None:
            weights["linear.bias"] = linear.bias.detach().float().contiguous()
        save_file(weights, str(directory / "2_Dense" / "model.safetensors"))
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.base.modules.Dense"})
    return modules


def _save_tokenizer(model_dir: Path, directory: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    tokenizer.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["padding_side"] = "left"  # stored explicitly: last-token pooling is written for it
    _write_json(config_path, config)


def _write_card(
    directory: Path,
    title: str,
    embedder: Embedder,
    run_config,
    model_dir: Path,
    query_instruction: str | None,
    prompts: dict[str, str],
    diffs: dict[str, float],
    eval_results: str | Path | None,
) -> None:
    spec = embedder.encoder.spec
    stages = _stage_history(model_dir, run_config)
    template = embedder.text.text_format.template.name
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, feature-extraction, tpembed, matryoshka]",
        "---",
        "",
        f"# {title}",
        "",
        "A text embedding model trained with tpembed (the QZhou-Embedding recipe: last-token pooling, a Matryoshka "
        "head, contrastive pre-training, then multi-task fine-tuning with PromptEOL and Token Prepending).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{spec.base_model}` |",
        f"| training | {stages} |",
        f"| pooling | {spec.pooling} |",
        f"| template | `{template}` |",
        f"| Token Prepending layers | {', '.join(map(str, spec.tp_layers)) or 'none'} |",
        f"| placeholder | `{spec.placeholder_token}` |" if spec.placeholder_token else "| placeholder | none |",
        f"| output dim | {embedder.embedding_dim} |",
        f"| Matryoshka dims | {', '.join(map(str, spec.mrl_dims))} |",
        f"| max tokens (query / document) | {embedder.text.query_max_len} / {embedder.text.passage_max_len} |",
        f"| export parity (max abs diff, fp32) | query {diffs['query']:.2e}, document {diffs['document']:.2e} |",
        "",
        CARD_USAGE,
        f"The `query` prompt carries the instruction {json.dumps(query_instruction, ensure_ascii=False)}; "
        "the template and Token Prepending are applied inside the model, exactly once.",
        "",
        "Prompts:",
        "",
    ]
    lines += [f"- `{name}`: {json.dumps(prompt, ensure_ascii=False)}" for name, prompt in prompts.items()]
    lines += ["", CARD_MTEB.replace("DIM", str(embedder.embedding_dim)).replace("NAME", title)]
    lines += _card_training_data(run_config)
    if eval_results:
        lines += ["", "## Evaluation", "", _results_table(Path(eval_results))]
    (directory / "README.md").write_text("\n".join(lines) + "\n")


def _card_training_data(run_config) -> list[str]:
    """The datasets of the run (and of the stage-1 run it started from) in mteb's ModelMeta form, so
    users can disclose them; TPEmbedMTEBModel reads the line back into its ModelMeta."""
    if run_config is None:
        return []
    return [
        "",
        "## Training data",
        "",
        "The datasets of the training configs, as the runs name them, in the form of mteb's "
        "`ModelMeta.training_datasets` (where one is an mteb task's data, write the mteb task name):",
        "",
        "```python",
        training_datasets_line(training_datasets(run_config)),
        "```",
    ]


def add_results_to_card(export_dir: str | Path, eval_results: str | Path) -> None:
    """Put the evaluation table of `tpembed-eval EXPORT` into the export's model card
    (replacing an earlier one): the export exists before it can be evaluated."""
    card = Path(export_dir) / "README.md"
    text = card.read_text()
    text = text.split("\n## Evaluation\n", 1)[0].rstrip("\n")
    card.write_text(text + "\n\n## Evaluation\n\n" + _results_table(Path(eval_results)) + "\n")


def _results_table(path: Path) -> str:
    """The evaluation section's body: the summary line of an mteb run (when there is one) and the table."""
    results = json.loads(path.read_text())
    table = format_table(results, markdown=True)
    return f"{results['summary']}\n\n{table}" if results.get("summary") else table


def _run_config(model_dir: Path):
    """The training config stored next to a checkpoint's model directory, if any."""
    path = model_dir.parent / "config.yaml"
    return load_saved_config(path) if path.is_file() else None


def _stage_history(model_dir: Path, run_config) -> str:
    if run_config is None:
        return "unknown"
    state_path = model_dir.parent / "trainer_state.json"
    steps = json.loads(state_path.read_text())["step"] if state_path.is_file() else "?"
    parts = [f"stage {run_config.train.stage}: {steps} steps"]
    if run_config.model.init_from:
        try:
            from tpembed.train.checkpoint import resolve_checkpoint

            source = resolve_checkpoint(run_config.model.init_from)
            source_steps = json.loads((source / "trainer_state.json").read_text())["step"]
            parts.insert(0, f"stage 1: {source_steps} steps")
        except (FileNotFoundError, KeyError, ValueError):
            parts.insert(0, "stage 1")
    return "; ".join(parts)


def _versions() -> dict[str, str]:
    import sentence_transformers
    import transformers

    return {
        "pytorch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
    }


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tpembed-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", help=f"run directory (newest of its {CHECKPOINTS}/), checkpoint, or model directory"
    )
    parser.add_argument("out_dir", help="where to write the sentence-transformers model")
    parser.add_argument(
        "--query-instruction", help="instruction of the 'query' prompt (default: the run's first retrieval dataset's)"
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="NAME=INSTRUCTION",
        help="an extra named prompt, e.g. --prompt sts='Retrieve semantically similar text' (repeatable)",
    )
    parser.add_argument("--language", default="en", help="the instruction table's defaults: en | zh")
    parser.add_argument(
        "--instructions", metavar="FILE", help="a YAML instruction table (docs/export-and-evaluation.md)"
    )
    parser.add_argument(
        "--instruction",
        action="append",
        default=[],
        metavar="KEY=INSTRUCTION",
        help="the instruction of an mteb task type (STS=...) or C-MTEB task (T2Retrieval=...) (repeatable)",
    )
    parser.add_argument("--eval-results", help="results.json from `tpembed-eval` for the model card")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--query-max-len", type=int, help="max query tokens (default: training's)")
    parser.add_argument("--passage-max-len", type=int, help="max document tokens (default: training's)")
    args = parser.parse_args(argv)
    try:  # every flag is checked before the checkpoint is read
        prompts = parse_assignments(args.prompt, "--prompt")
        entries = parse_assignments(args.instruction, "--instruction")
        table = build_instruction_table(args.language, args.instructions, entries)
    except MTEBUsageError as error:
        parser.error(str(error))
    try:
        report = export(
            args.checkpoint,
            args.out_dir,
            query_instruction=args.query_instruction,
            prompts=prompts,
            instructions=table,
            eval_results=args.eval_results,
            overwrite=args.overwrite,
            query_max_len=args.query_max_len,
            passage_max_len=args.passage_max_len,
        )
    except (ExportError, FileNotFoundError, ValueError) as error:
        print(f"export failed: {error}", file=sys.stderr)
        return 1
    print(f"exported to {report.out_dir}")
    for role, diff in report.max_abs_diff.items():
        print(f"parity {role}: max abs diff {diff:.3e} (tolerance {PARITY_TOLERANCE:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
