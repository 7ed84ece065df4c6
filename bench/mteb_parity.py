"""An export scored by tpembed-eval and by mteb.evaluate on the same local dev sets: both columns.

    python bench/mteb_parity.py EXPORT_DIR [--limit N] [--dims 256 1792] [--data ../shared/data]

The mteb column is what a user gets with stock mteb and sentence-transformers and no tpembed:
`mteb.evaluate(SentenceTransformer(EXPORT_DIR, trust_remote_code=True, truncate_dim=d), tasks,
cache=None)`, on mteb tasks built here from the dev files (AbsTaskSTS, AbsTaskRetrieval with
`load_data` overridden; nothing is downloaded). mteb picks the export's `STS` and `Retrieval-query`
prompts for them (their names are not mteb's, so no task-name prompt applies). The tpembed column
is `tpembed-eval EXPORT_DIR` with the instructions those prompts carry (read back from the export's
instruction format). Scores x100: Spearman of cosine (mteb: cosine_spearman), nDCG@10.

Data (under --data, default ../shared/data): stsb_en/dev.jsonl, sick/validation.jsonl,
stsb_zh/validation.jsonl, lcqmc/validation.jsonl ({sentence1, sentence2, score}) and
xquad_retrieval/en (BEIR layout). --limit N keeps the first N pairs / queries of each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (name, mteb task type, path under --data, mteb language, (min score, max score))
TASKS = [
    ("stsb_en_dev", "STS", "stsb_en/dev.jsonl", "eng-Latn", (0, 5)),
    ("sick_validation", "STS", "sick/validation.jsonl", "eng-Latn", (1, 5)),
    ("stsb_zh_validation", "STS", "stsb_zh/validation.jsonl", "cmn-Hans", (0, 5)),
    ("lcqmc_validation", "STS", "lcqmc/validation.jsonl", "cmn-Hans", (0, 1)),
    ("xquad_en", "Retrieval", "xquad_retrieval/en", "eng-Latn", None),
]


def instruction_of(export_dir: Path, prompt_name: str) -> str:
    """The instruction inside one of the export's prompts (the inverse of its instruction format)."""
    prompts = json.loads((export_dir / "config_sentence_transformers.json").read_text())["prompts"]
    stored = json.loads((export_dir / "tpembed_st_config.json").read_text())
    head, tail = stored["text_format"]["instruction_format"].split("{instruction}")
    if prompt_name not in prompts:
        sys.exit(f"{export_dir} has no {prompt_name!r} prompt (an older export): export it again")
    prompt = prompts[prompt_name]
    if not (prompt.startswith(head) and prompt.endswith(tail)):
        sys.exit(f"{export_dir}: prompt {prompt_name!r} is not in the export's instruction format: {prompt!r}")
    return prompt[len(head) : len(prompt) - len(tail)]


def metadata(name: str, task_type: str, language: str, main_score: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=name,
        type=task_type,
        main_score=main_score,
        description=f"local {name} (bench/mteb_parity.py)",
        reference=None,
        dataset={"path": f"local/{name}", "revision": "local"},
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=[language],
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation=None,
        bibtex_citation=None,
    )


def sts_task(name: str, language: str, data, score_range):
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS

    first, second, scores = data

    class LocalSTS(AbsTaskSTS):
        metadata = globals()["metadata"](name, "STS", language, "cosine_spearman")
        min_score, max_score = score_range

        def load_data(self, **kwargs) -> None:
            columns = {"sentence1": first, "sentence2": second, "score": scores}
            self.dataset = DatasetDict({"test": Dataset.from_dict(columns)})
            self.data_loaded = True

    return LocalSTS()


def retrieval_task(name: str, language: str, data):
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    doc_ids, doc_texts, query_ids, query_texts, qrels = data

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = globals()["metadata"](name, "Retrieval", language, "ndcg_at_10")

        def load_data(self, **kwargs) -> None:
            # tpembed-eval reads documents as "title text": the same string, without a title column
            split = RetrievalSplitData(
                queries=Dataset.from_dict({"id": query_ids, "text": query_texts}),
                corpus=Dataset.from_dict({"id": doc_ids, "text": doc_texts}),
                relevant_docs={q: {d: int(g) for d, g in qrels[q].items()} for q in query_ids},
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalRetrieval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--limit", type=int, help="the first N pairs / queries of each task")
    parser.add_argument("--dims", type=int, nargs="+", help="default: the export's largest dim")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("MTEB_CACHE", tempfile.mkdtemp(prefix="tpembed-bench-mteb-"))  # never the user's cache

    import mteb
    from sentence_transformers import SentenceTransformer

    from tpembed.train.config import EvalTaskConfig
    from tpembed.train.eval import evaluate, load_task_data, open_model

    instructions = {
        "STS": instruction_of(args.export_dir, "STS"),
        "Retrieval": instruction_of(args.export_dir, "Retrieval-query"),
    }
    configs, mteb_tasks = [], []
    for name, task_type, relative, language, score_range in TASKS:
        kind = "sts" if task_type == "STS" else "retrieval"
        config = EvalTaskConfig(name, kind, str(args.data / relative), instructions[task_type], args.limit)
        data = load_task_data(config)
        configs.append(config)
        mteb_tasks.append(
            sts_task(name, language, data, score_range) if kind == "sts" else retrieval_task(name, language, data)
        )

    encode, model_dims, _ = open_model(str(args.export_dir), batch_size=args.batch_size)
    dims = args.dims or [max(model_dims)]
    ours = evaluate(encode, configs, dims)["tasks"]

    print(f"instructions: STS {instructions['STS']!r}; Retrieval {instructions['Retrieval']!r}")
    print(f"{'task':<20} {'metric':<9} {'dim':>5} {'tpembed-eval':>13} {'mteb':>10} {'|diff|':>9}")
    worst = 0.0
    for dim in dims:
        model = SentenceTransformer(str(args.export_dir), trust_remote_code=True, truncate_dim=dim)
        theirs = mteb.evaluate(model, mteb_tasks, cache=None, show_progress_bar=False,
                               encode_kwargs={"batch_size": args.batch_size})  # fmt: skip
        for config, result in zip(configs, theirs.task_results):
            metric = ours[config.name]["main_metric"]
            own, other = ours[config.name]["by_dim"][str(dim)][metric], 100 * result.get_score()
            worst = max(worst, abs(own - other))
            print(f"{config.name:<20} {metric:<9} {dim:>5} {own:>13.4f} {other:>10.4f} {abs(own - other):>9.2e}")
    print(f"largest difference: {worst:.2e} (x100 scale)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
