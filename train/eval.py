"""Evaluate a model at every Matryoshka dim on local datasets (encode once, slice per dim).

    # a tpembed run, checkpoint or model directory
    tpembed-eval runs/quickstart/stage2 --sts data/stsb_en/dev.jsonl \\
        --retrieval data/xquad_retrieval/en --output-dir evals/quickstart

    # an exported sentence-transformers directory, with a task file
    tpembed-eval exports/quickstart --tasks configs/eval/english_dev.yaml --output-dir evals/x

    # a base LM without training (PromptEOL, optional Token Prepending)
    tpembed-eval --base-model PATH --template prompteol --tp-layers 1-7 --tasks configs/eval/english_dev.yaml

    # mteb's own tasks, a benchmark or task names (needs `pip install 'tpembed[mteb]'` and the hub)
    tpembed-eval runs/qwen3_8b_stage2 --mteb "MTEB(cmn, v1)" --dims 256 1792 --output-dir evals/cmteb

Tasks:
  sts             JSONL {sentence1, sentence2, score}: Spearman of cosine x100;
                  the instruction goes on both sides.
  retrieval       BEIR layout (corpus.jsonl, queries.jsonl, qrels/<split>.tsv):
                  nDCG@10, Recall@10, MRR@10 x100; the instruction goes on
                  queries, documents are "title text".
  classification  a directory of JSONL {sentence|text, label}: logistic regression
                  fitted on train.jsonl, accuracy (and macro F1) x100 on <split>.jsonl.
  clustering      the same files (<split>.jsonl, or `path` a JSONL file): k-means
                  with k = the number of labels, V-measure x100.
  Classification and clustering put the instruction on every text, and read the
  embeddings sliced to each dim and normalised, like the other tasks.

Writes results.json and a plot of the main score against the dim (dims.png) to
--output-dir, and prints a table. With --output-dir, every finished task is also
kept in OUTPUT_DIR/results.partial.json: a re-run of the same command reuses those
tasks and evaluates only the rest, as long as the model's files, the encoding flags,
the dims and each task's settings and data files are unchanged (--fresh ignores them).

With --mteb, mteb runs its own tasks through tpembed.train.mteb_adapter (prompts by
task type and name, --instruction / --instructions / --language for runs), files its
results under the run's name in mteb's cache (OUTPUT_DIR/mteb with --output-dir) and
adds a summary line for the model card.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tpembed.data.formats import iter_rows
from tpembed.data.io import atomic_path
from tpembed.modeling import DEFAULT_MRL_DIMS
from tpembed.modeling.token_prepending import parse_tp_layers
from tpembed.train.config import ConfigError, EvalTaskConfig, load_eval_tasks
from tpembed.train.metrics import retrieval_scores, spearman

EncodeFn = Callable[[list[str], "str | None"], torch.Tensor]

DEFAULT_STS_INSTRUCTION = "Retrieve semantically similar text"
DEFAULT_RETRIEVAL_INSTRUCTION = "Given a question, retrieve passages that answer the question"
MAIN_METRIC = {"sts": "spearman", "retrieval": "ndcg@10", "classification": "accuracy", "clustering": "v_measure"}
SKLEARN_SEED = 42  # logistic regression and k-means are fixed by it: results repeat exactly


def load_sts(task: EvalTaskConfig) -> tuple[list[str], list[str], list[float]]:
    first, second, scores = [], [], []
    for location, row in iter_rows(task.path):
        try:
            first.append(row["sentence1"])
            second.append(row["sentence2"])
            scores.append(float(row["score"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{location}: expected sentence1, sentence2 and a numeric score ({error})") from None
        if task.limit and len(scores) >= task.limit:
            break
    return first, second, scores


def load_beir(task: EvalTaskConfig):
    """(doc ids, doc texts, query ids, query texts, qrels) of a BEIR directory."""
    root = Path(task.path)
    qrels: dict[str, dict[str, float]] = {}
    qrels_path = root / "qrels" / f"{task.split}.tsv"
    if not qrels_path.is_file():
        raise FileNotFoundError(f"{qrels_path} does not exist (BEIR layout: qrels/{task.split}.tsv)")
    with qrels_path.open(encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader)
        if header[:2] != ["query-id", "corpus-id"]:
            raise ValueError(f"{qrels_path}: expected the header 'query-id corpus-id score', got {header}")
        for line, row in enumerate(reader, start=2):
            try:
                qrels.setdefault(row[0], {})[row[1]] = float(row[2])
            except (IndexError, ValueError):
                raise ValueError(f"{qrels_path}:{line}: expected query-id, corpus-id, numeric score") from None
    doc_ids, doc_texts = [], []
    for _, row in iter_rows(root / "corpus.jsonl"):
        doc_ids.append(str(row["_id"]))
        doc_texts.append(f"{row.get('title') or ''} {row['text']}".strip())
    query_ids, query_texts = [], []
    for _, row in iter_rows(root / "queries.jsonl"):
        if str(row["_id"]) in qrels:
            query_ids.append(str(row["_id"]))
            query_texts.append(row["text"])
        if task.limit and len(query_ids) >= task.limit:
            break
    return doc_ids, doc_texts, query_ids, query_texts, qrels


def load_labelled(path: str | Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(texts, labels) of a JSONL of {sentence or text, label}; labels are compared as strings."""
    texts, labels = [], []
    for location, row in iter_rows(path):
        text = row.get("sentence", row.get("text"))
        if not isinstance(text, str) or row.get("label") is None:
            raise ValueError(f"{location}: expected a text ('sentence' or 'text') and a 'label'")
        texts.append(text)
        labels.append(str(row["label"]))
        if limit and len(texts) >= limit:
            break
    return texts, labels


def _labelled_file(task: EvalTaskConfig) -> Path:
    path = Path(task.path)
    return path / f"{task.split}.jsonl" if path.is_dir() else path


def load_classification(task: EvalTaskConfig) -> tuple[list[str], list[str], list[str], list[str]]:
    """(train texts, train labels, texts, labels): `path` is a directory with train.jsonl (the classifier's
    examples, read whole) and <split>.jsonl (scored; `limit` keeps its first N)."""
    root = Path(task.path)
    if not (root / "train.jsonl").is_file() or not (root / f"{task.split}.jsonl").is_file():
        raise FileNotFoundError(f"task {task.name}: {root} must hold train.jsonl and {task.split}.jsonl")
    train_texts, train_labels = load_labelled(root / "train.jsonl")
    return (train_texts, train_labels, *load_labelled(root / f"{task.split}.jsonl", task.limit))


def load_task_data(task: EvalTaskConfig):
    """The task's examples, loaded once (training evaluates the same dev sets many times)."""
    if task.type == "classification":
        return load_classification(task)
    if task.type == "clustering":
        return load_labelled(_labelled_file(task), task.limit)
    return load_sts(task) if task.type == "sts" else load_beir(task)


def _slice(embeddings: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return F.normalize(embeddings[:, :dim].to(dtype), dim=-1)


def classification_scores(train_x: torch.Tensor, train_y: list[str], x: torch.Tensor, y: list[str]) -> dict:
    """Accuracy and macro F1 x100 of a logistic regression fitted on (train_x, train_y), as mteb scores
    classification (without its resampling of the training examples)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    classifier = LogisticRegression(max_iter=1000, random_state=SKLEARN_SEED).fit(train_x.numpy(), train_y)
    predicted = classifier.predict(x.numpy())
    return {"accuracy": 100 * accuracy_score(y, predicted), "f1": 100 * f1_score(y, predicted, average="macro")}


KMEANS_RUNS = 10  # single-initialisation clusterings averaged into v_measure_mean, as mteb averages its runs


def clustering_scores(x: torch.Tensor, labels: list[str], runs: int = KMEANS_RUNS) -> dict:
    """V-measure x100 of k-means with k = the number of distinct labels.

    `v_measure` (the main metric, as tpembed has always reported it): the best of 10 initialisations
    by inertia, one clustering. One clustering moves with its initialisation, so `v_measure_mean` and
    `v_measure_std` (population sd) add the V-measure over `runs` clusterings of one initialisation each
    (seeds SKLEARN_SEED, SKLEARN_SEED + 1, ...), the way mteb averages its clustering experiments: a
    difference between two models or two dims smaller than that sd is within one clustering's luck."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import v_measure_score

    points, k = x.numpy(), len(set(labels))
    best = KMeans(n_clusters=k, n_init=10, random_state=SKLEARN_SEED).fit_predict(points)
    single = [
        v_measure_score(labels, KMeans(n_clusters=k, n_init=1, random_state=SKLEARN_SEED + i).fit_predict(points))
        for i in range(runs)
    ]
    return {
        "v_measure": 100 * v_measure_score(labels, best),
        "v_measure_mean": 100 * statistics.fmean(single),
        "v_measure_std": 100 * statistics.pstdev(single),
    }


def _score_sts(encode: EncodeFn, task: EvalTaskConfig, dims: list[int], data) -> tuple[dict, int]:
    first, second, gold = data
    left, right = encode(first, task.instruction), encode(second, task.instruction)
    by_dim = {}
    for dim in dims:
        # in float64: the cosines of a model's pairs can agree to 7 digits, where float32 rounding reorders them
        cosines = (_slice(left, dim, torch.float64) * _slice(right, dim, torch.float64)).sum(-1)
        by_dim[str(dim)] = {"spearman": spearman(cosines, gold)}
    return by_dim, len(gold)


def _score_retrieval(encode: EncodeFn, task: EvalTaskConfig, dims: list[int], data) -> tuple[dict, int]:
    doc_ids, doc_texts, query_ids, query_texts, qrels = data
    queries, documents = encode(query_texts, task.instruction), encode(doc_texts, None)
    by_dim = {}
    for dim in dims:
        scores = _slice(queries, dim) @ _slice(documents, dim).T  # (queries, docs)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :100]
        rankings = {q: [doc_ids[i] for i in row] for q, row in zip(query_ids, order.tolist())}
        by_dim[str(dim)] = retrieval_scores(rankings, qrels, k=10)
    return by_dim, len(query_ids)


def _score_classification(encode: EncodeFn, task: EvalTaskConfig, dims: list[int], data) -> tuple[dict, int]:
    train_texts, train_labels, texts, labels = data
    train, evaluated = encode(train_texts, task.instruction), encode(texts, task.instruction)
    by_dim = {str(d): classification_scores(_slice(train, d), train_labels, _slice(evaluated, d), labels) for d in dims}
    return by_dim, len(labels)


def _score_clustering(encode: EncodeFn, task: EvalTaskConfig, dims: list[int], data) -> tuple[dict, int]:
    texts, labels = data
    embeddings = encode(texts, task.instruction)
    return {str(dim): clustering_scores(_slice(embeddings, dim), labels) for dim in dims}, len(labels)


SCORERS = {
    "sts": _score_sts,
    "retrieval": _score_retrieval,
    "classification": _score_classification,
    "clustering": _score_clustering,
}


def evaluate_task(encode: EncodeFn, task: EvalTaskConfig, dims: list[int], data=None) -> dict:
    """Scores of one task at every dim; `data` is the loaded task (loaded here when None)."""
    if task.type not in SCORERS:
        raise ValueError(f"task {task.name}: unknown type {task.type!r}")
    by_dim, count = SCORERS[task.type](encode, task, dims, data or load_task_data(task))
    return {"type": task.type, "main_metric": MAIN_METRIC[task.type], "num_examples": count, "by_dim": by_dim}


def evaluate(
    encode: EncodeFn,
    tasks: list[EvalTaskConfig],
    dims: list[int],
    loaded: dict | None = None,
    log: Callable[[str], None] | None = None,
    done: dict[str, dict] | None = None,
    on_task: Callable[[str, dict], None] | None = None,
) -> dict:
    """Scores of every task; `log` gets one line per finished task (its main metric at the
    largest dim and the seconds it took), so a long evaluation shows where it is. Tasks named
    in `done` take that result instead of being evaluated; `on_task(name, result)` is called
    after each evaluated task (to keep partial results)."""
    loaded, done = loaded or {}, done or {}
    scores = {}
    for index, task in enumerate(tasks, 1):
        start = time.perf_counter()
        reused = task.name in done
        result = done[task.name] if reused else evaluate_task(encode, task, dims, loaded.get(task.name))
        scores[task.name] = result
        if on_task is not None and not reused:
            on_task(task.name, result)
        if log is not None:
            top = str(max(dims))
            took = "kept from an earlier run" if reused else f"{time.perf_counter() - start:.0f} s"
            log(
                f"task {index}/{len(tasks)} {task.name}: {result['main_metric']} at {top} dims "
                f"{result['by_dim'][top][result['main_metric']]:.2f} on {result['num_examples']} "
                f"examples ({took})"
            )
    return {"dims": list(dims), "tasks": scores}


# ---- partial results: an interrupted evaluation continues -------------------------------

PARTIAL_NAME = "results.partial.json"
# the files that decide a model's embeddings (weights, configs, tokenizer); not its cards or logs
MODEL_FILE_SUFFIXES = {".safetensors", ".bin", ".gguf", ".json", ".yaml", ".txt", ".model", ".py"}


def files_digest(path: str | Path, suffixes: set[str] | None = None, exclude: Path | None = None) -> str:
    """sha256 over the relative names and contents of a file, or of a folder's files (those with
    one of `suffixes`, and none under `exclude`); a path that does not exist hashes its name
    (a hub id)."""
    path, digest = Path(path), hashlib.sha256()
    if not path.exists():
        digest.update(str(path).encode())
        return digest.hexdigest()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for file in files:
        if path.is_dir() and suffixes is not None and file.suffix not in suffixes:
            continue
        if exclude is not None and exclude.resolve() in file.resolve().parents:
            continue
        digest.update(file.relative_to(path).as_posix().encode() if path.is_dir() else file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def task_fingerprint(task: EvalTaskConfig) -> dict:
    """A task's settings and the digest of its data files."""
    return _as_json({"config": dataclasses.asdict(task), "data": files_digest(task.path)})


def _as_json(value: dict) -> dict:
    """`value` as it reads back from JSON (tuples become lists), so that it compares equal."""
    return json.loads(json.dumps(value, default=str))


def load_partial(output_dir: str | Path, key: dict, fingerprints: dict[str, dict]) -> dict[str, dict]:
    """The results of an earlier run kept in OUTPUT_DIR/results.partial.json that still hold:
    same model files, encoding and dims (`key`), and per task the same settings and data
    (`fingerprints`: task name -> task_fingerprint)."""
    path = Path(output_dir) / PARTIAL_NAME
    if not path.is_file():
        return {}
    try:
        partial = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    if partial.get("key") != key:
        return {}
    kept = partial.get("tasks", {})
    return {
        name: kept[name]["result"]
        for name, fingerprint in fingerprints.items()
        if name in kept and kept[name].get("fingerprint") == fingerprint
    }


class PartialResults:
    """Writes each finished task to OUTPUT_DIR/results.partial.json (atomically), with what it
    was computed from."""

    def __init__(self, output_dir: str | Path, key: dict, fingerprints: dict[str, dict], kept: dict[str, dict]):
        self.path = Path(output_dir) / PARTIAL_NAME
        self.key = key
        self.fingerprints = fingerprints
        self.tasks = {name: {"fingerprint": self.fingerprints[name], "result": r} for name, r in kept.items()}

    def __call__(self, name: str, result: dict) -> None:
        self.tasks[name] = {"fingerprint": self.fingerprints[name], "result": result}
        with atomic_path(self.path, overwrite=True) as staging:
            staging.write_text(json.dumps({"key": self.key, "tasks": self.tasks}, ensure_ascii=False) + "\n")

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def flat_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """{"eval/stsb/spearman@1792": 71.2, ...} for trackers."""
    return {
        f"{prefix}/{name}/{metric}@{dim}": value
        for name, task in results["tasks"].items()
        for dim, metrics in task["by_dim"].items()
        for metric, value in metrics.items()
    }


def format_table(results: dict, markdown: bool = False) -> str:
    """The main metric of every task at every dim, as text or as a markdown table."""
    tasks = results["tasks"]
    dims = sorted({int(d) for task in tasks.values() for d in task["by_dim"]})
    rows = [
        [name, task["main_metric"]]
        + [f"{task['by_dim'][str(d)][task['main_metric']]:.2f}" if str(d) in task["by_dim"] else "" for d in dims]
        for name, task in tasks.items()
    ]
    if markdown:
        header = ["task", "metric", *map(str, dims)]
        lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(dims)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    lines = [f"{name:<24} {metric:<10}" + "".join(f"{cell:>8}" for cell in cells) for name, metric, *cells in rows]
    head = f"{'task':<24} {'metric':<10}" + "".join(f"{d:>8}" for d in dims)
    return "\n".join([head, "-" * len(head), *lines])


def write_results(results: dict, output_dir: str | Path) -> tuple[Path, Path | None]:
    """results.json, and the plot of every task's score against the dim (dims.png) when
    matplotlib is installed (the `plots` extra)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    try:
        import matplotlib
    except ImportError:
        print("dims.png not written: the plot needs matplotlib (pip install 'tpembed[plots]')", file=sys.stderr)
        return json_path, None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    dims = results["dims"]
    for name, task in results["tasks"].items():
        metric = task["main_metric"]
        axis.plot(dims, [task["by_dim"][str(d)][metric] for d in dims], marker="o", label=f"{name} ({metric})")
    axis.set_xlabel("embedding dim (Matryoshka prefix)")
    axis.set_ylabel("score x100")
    axis.set_xticks(dims)
    axis.tick_params(axis="x", labelrotation=45)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(results.get("model", "") or "score per dim", fontsize=9)
    figure.tight_layout()
    plot_path = output_dir / "dims.png"
    figure.savefig(plot_path, dpi=120)
    plt.close(figure)
    return json_path, plot_path


# ---- models ---------------------------------------------------------------------------


def embedder_encode_fn(embedder, batch_size: int = 32, show_progress: bool = False) -> EncodeFn:
    def encode(texts: list[str], instruction: str | None) -> torch.Tensor:
        return embedder.encode(texts, instruction, batch_size=batch_size, show_progress=show_progress)

    return encode


def sentence_transformer_encode_fn(path: str, batch_size: int = 32, show_progress: bool = False, device=None):
    """An exported directory: instructions become the prompt tpembed's module expects. Any other
    sentence-transformers model encodes with its own prompts (`query` on the query side, `document`
    or `passage` on the document side, when it has them), whatever the instruction.

    Returns (encode, the Matryoshka dims the export records)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, trust_remote_code=True, device=device)
    config_path = Path(path) / "tpembed_st_config.json"
    stored = json.loads(config_path.read_text()) if config_path.is_file() else None
    dim = model.get_embedding_dimension()
    if stored is None:
        dims = [dim]
        own = {side: next((n for n in names if n in model.prompts), None)
               for side, names in (("query", ("query",)), ("document", ("document", "passage")))}  # fmt: skip
    else:
        # exports of tpembed < 0.2 do not record their dims: the method's defaults that fit
        dims = stored.get("mrl_dims") or [d for d in DEFAULT_MRL_DIMS if d <= dim] or [dim]
        instruction_format = stored["text_format"]["instruction_format"]

    def encode(texts: list[str], instruction: str | None) -> torch.Tensor:
        side = "query" if instruction else "document"
        if stored is None:
            prompt = {"prompt_name": own[side]}
        else:
            prompt = {"prompt": instruction_format.format(instruction=instruction) if instruction else None}
        return model.encode(
            texts, **prompt, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=show_progress
        ).cpu()

    return encode, dims


def _short_name(path: str) -> str:
    """The last two components without suffix: data/xquad_retrieval/en -> xquad_retrieval/en."""
    parts = Path(path).with_suffix("").parts
    return "/".join(parts[-2:])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpembed-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", help="run/checkpoint/model directory, or an exported directory")
    parser.add_argument("--base-model", help="evaluate a base LM without head (training-free)")
    parser.add_argument(
        "--template", default="prompteol", help="base model: instruction | prompteol | prompteol_original"
    )
    parser.add_argument(
        "--tp-layers", type=parse_tp_layers, help="Token Prepending layers (base model; override for a checkpoint)"
    )
    parser.add_argument("--pooling", default="last_token", help="base model: last_token | mean")
    parser.add_argument(
        "--no-placeholder", action="store_true", help="base model: render the template without placeholder"
    )
    parser.add_argument("--max-length", type=int, default=512, help="base model: max tokens")
    parser.add_argument("--placeholder", help="base model: the placeholder token (added when missing)")
    parser.add_argument("--query-max-len", type=int, help="checkpoint: max query tokens (default: training's)")
    parser.add_argument("--passage-max-len", type=int, help="checkpoint: max document tokens (default: training's)")
    parser.add_argument("--tasks", action="append", default=[], help="YAML task file (configs/eval/*.yaml)")
    parser.add_argument("--sts", action="append", default=[], help="an STS JSONL file")
    parser.add_argument("--retrieval", action="append", default=[], help="a BEIR directory")
    parser.add_argument("--sts-instruction", default=DEFAULT_STS_INSTRUCTION)
    parser.add_argument("--retrieval-instruction", default=DEFAULT_RETRIEVAL_INSTRUCTION)
    parser.add_argument("--skip", nargs="+", default=[], metavar="TASK", help="leave out these tasks (by name)")
    parser.add_argument("--limit", type=int, help="only the first N pairs / queries of every task")
    parser.add_argument("--no-instructions", action="store_true", help="encode every text without instruction")
    parser.add_argument("--dims", type=int, nargs="+", help="dims to evaluate (default: the model's Matryoshka dims)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output-dir", help="where to write results.json and dims.png")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--fresh", action="store_true", help=f"evaluate every task again, ignoring OUTPUT_DIR/{PARTIAL_NAME}"
    )
    mteb = parser.add_argument_group("mteb (pip install 'tpembed[mteb]'; mteb downloads its datasets)")
    mteb.add_argument(
        "--mteb", nargs="+", metavar="NAME", help="run mteb: a benchmark ('MTEB(cmn, v1)') and/or task names"
    )
    mteb.add_argument(
        "--instruction",
        action="append",
        default=[],
        metavar="KEY=INSTRUCTION",
        help="the instruction of a task type (STS=...) or task (T2Retrieval=...); for an export it replaces that "
        "stored prompt (repeatable)",
    )
    mteb.add_argument("--instructions", metavar="FILE", help="a YAML instruction table (docs/export-and-evaluation.md)")
    mteb.add_argument(
        "--language", default="en", help="the default instructions of a run: en | zh (an export keeps its own)"
    )
    mteb.add_argument("--mteb-name", help="the model name of mteb's results (default: tpembed/<run or export name>)")
    return parser


def _tasks(args) -> list[EvalTaskConfig]:
    """The tasks of --tasks files, --sts files and --retrieval directories, less --skip; raises
    ConfigError with what to change."""
    tasks = [task for path in args.tasks for task in load_eval_tasks(path)]
    for path in args.sts:
        name = Path(path).parent.name + "/" + Path(path).stem
        tasks.append(EvalTaskConfig(name=name, type="sts", path=path, instruction=args.sts_instruction))
    for path in args.retrieval:
        name = _short_name(path)
        tasks.append(EvalTaskConfig(name=name, type="retrieval", path=path, instruction=args.retrieval_instruction))
    unknown = sorted(set(args.skip) - {task.name for task in tasks})
    if unknown:
        raise ConfigError(f"--skip: no task named {', '.join(unknown)} (tasks: {', '.join(t.name for t in tasks)})")
    tasks = [task for task in tasks if task.name not in args.skip]
    if not tasks:
        raise ConfigError("no tasks: pass --tasks, --sts or --retrieval")
    for task in tasks:
        task.limit = args.limit or task.limit
        task.instruction = None if args.no_instructions else task.instruction
    return tasks


def open_model(
    model: str | None = None,
    *,
    base_model: str | None = None,
    template: str = "prompteol",
    tp_layers=None,
    pooling: str = "last_token",
    use_placeholder: bool = True,
    placeholder: str | None = None,
    max_length: int = 512,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
    device=None,
) -> tuple[EncodeFn, list[int], str]:
    """(encode, the model's Matryoshka dims, its name) of a tpembed run, checkpoint or model
    directory, a sentence-transformers directory (a tpembed export or any other), or a base LM
    without training (`base_model`: PromptEOL, optionally Token Prepending)."""
    from tpembed.train.embedder import Embedder

    if base_model:
        embedder = Embedder.from_base_model(
            base_model,
            template=template,
            tp_layers=tp_layers or (),
            pooling=pooling,
            use_placeholder=use_placeholder,
            placeholder=placeholder,
            max_length=max_length,
            device=device,
        )
        return embedder_encode_fn(embedder, batch_size, progress), [embedder.embedding_dim], base_model
    if (Path(model) / "modules.json").is_file():
        encode, dims = sentence_transformer_encode_fn(model, batch_size, progress, device)
        return encode, dims, model
    embedder = Embedder.from_checkpoint(
        model, tp_layers=tp_layers, query_max_len=query_max_len, passage_max_len=passage_max_len, device=device
    )
    dims = embedder.encoder.spec.mrl_dims if embedder.encoder.head is not None else [embedder.embedding_dim]
    return embedder_encode_fn(embedder, batch_size, progress), dims, model


def check_dims(dims: list[int], model_dims: list[int]) -> list[int]:
    """`dims` when each is at most the model's embedding size; raises ConfigError naming the sizes."""
    full = max(model_dims)
    bad = [d for d in dims if not 0 < d <= full]
    if bad:
        raise ConfigError(
            f"--dims {' '.join(map(str, bad))}: the model's embeddings have {full} numbers "
            f"(Matryoshka dims {', '.join(map(str, model_dims))})"
        )
    return list(dims)


def _report(results: dict, output_dir: str | None) -> None:
    print(format_table(results))
    if results.get("summary"):
        print(results["summary"])
    if output_dir:
        written = [path for path in write_results(results, output_dir) if path is not None]
        print("wrote " + " and ".join(map(str, written)))


def _main_mteb(parser: argparse.ArgumentParser, args) -> int:
    """--mteb: mteb's tasks on a run, checkpoint or export (tpembed.train.mteb_adapter)."""
    if args.base_model or not args.model:
        parser.error("--mteb evaluates MODEL (a tpembed run, checkpoint or export), not --base-model")
    if args.tasks or args.sts or args.retrieval or args.limit:
        parser.error("--mteb runs mteb's tasks; evaluate --tasks, --sts, --retrieval or --limit in a separate call")
    from tpembed.train.mteb_adapter import MTEBRunError, evaluate_with_mteb

    try:
        results = evaluate_with_mteb(args)
    except ConfigError as error:
        parser.error(str(error))
    except MTEBRunError as error:
        print(f"tpembed-eval: {error}", file=sys.stderr)
        return 1
    _report(results, args.output_dir)
    return 0


def _log(line: str) -> None:
    print(f"tpembed-eval: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.mteb:
        return _main_mteb(parser, args)
    if bool(args.model) == bool(args.base_model):
        parser.error("give either MODEL or --base-model")
    try:
        tasks = _tasks(args)
    except ConfigError as error:
        parser.error(str(error))
    encode, dims, name = open_model(
        args.model,
        base_model=args.base_model,
        template=args.template,
        tp_layers=args.tp_layers,
        pooling=args.pooling,
        use_placeholder=not args.no_placeholder,
        placeholder=args.placeholder,
        max_length=args.max_length,
        query_max_len=args.query_max_len,
        passage_max_len=args.passage_max_len,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    try:
        dims = check_dims(args.dims or dims, dims)
    except ConfigError as error:
        parser.error(str(error))
    if not args.output_dir:
        _report({"model": name, **evaluate(encode, tasks, dims, log=_log)}, args.output_dir)
        return 0
    key = _partial_key(args, dims)
    fingerprints = {task.name: task_fingerprint(task) for task in tasks}  # hashes each data file once
    kept = {} if args.fresh else load_partial(args.output_dir, key, fingerprints)
    if kept:
        _log(f"{len(kept)} of {len(tasks)} tasks kept from {Path(args.output_dir) / PARTIAL_NAME} (--fresh: redo)")
    partial = PartialResults(args.output_dir, key, fingerprints, kept)
    _report({"model": name, **evaluate(encode, tasks, dims, log=_log, done=kept, on_task=partial)}, args.output_dir)
    partial.finish()
    return 0


def _partial_key(args, dims: list[int]) -> dict:
    """What decides every task's result besides the task: the model's files and the flags that
    change how texts are encoded."""
    model = args.model or args.base_model
    encoding = ["template", "tp_layers", "pooling", "no_placeholder", "placeholder", "max_length"]
    encoding += ["query_max_len", "passage_max_len"]
    return _as_json(
        {
            "model": model,
            "model_files": files_digest(model, MODEL_FILE_SUFFIXES, exclude=Path(args.output_dir)),
            "encoding": {name: getattr(args, name) for name in encoding},
            "dims": list(dims),
        }
    )


if __name__ == "__main__":
    sys.exit(main())
