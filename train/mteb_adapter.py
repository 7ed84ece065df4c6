"""mteb for tpembed models: the instruction table behind the export's prompts, an mteb encoder, runs.

    tpembed-eval runs/qwen3_8b_stage2 --mteb "MTEB(cmn, v1)" --dims 256 1792 --output-dir evals/cmteb

    import mteb
    from tpembed.train.mteb_adapter import TPEmbedMTEBModel

    model = TPEmbedMTEBModel("exports/qwen3_8b", dim=1792, instructions={"STS": "检索语义相似的文本"})
    results = mteb.evaluate(model, tasks=mteb.get_tasks(tasks=["T2Retrieval", "LCQMC"]), cache=None)

mteb (2.x) picks a model's prompt by key, first match wins: `{TaskName}-{query|document}`,
`{TaskName}`, `{TaskType}-{query|document}`, `{TaskType}`, then `query` / `document`, and encodes
STS, PairClassification, Classification and Clustering texts with no prompt type, so with no
key for them, without instruction. tpembed's protocol (docs/method.md 4.1) is an instruction on
queries and on both sides of symmetric tasks, none on documents. The instruction table below
(one instruction per task type and language, per task name for the C-MTEB tasks) is rendered into
exactly those keys: symmetric task types under `{TaskType}`, retrieval-like types under
`{TaskType}-query` with an empty `{TaskType}-document`, task names of retrieval-like tasks only
as `{TaskName}-query` (a bare task name would reach the documents too). `tpembed-export` writes
these prompts, so `mteb.evaluate(SentenceTransformer(export, trust_remote_code=True), tasks)`
encodes as tpembed does; `TPEmbedMTEBModel` resolves the same keys for runs and checkpoints.

This module imports mteb only when a function needs it: mteb is an optional extra.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tpembed.train.config import ConfigError
from tpembed.train.eval import check_dims

MTEB_EXTRA_HINT = "pip install 'tpembed[mteb]'"

# mteb's task types for text (mteb.abstasks.task_metadata.TaskType); a table may name only these
MTEB_TEXT_TASK_TYPES = (
    "Retrieval", "Reranking", "STS", "PairClassification", "Classification", "MultilabelClassification",
    "Clustering", "BitextMining", "Summarization", "Regression", "InstructionRetrieval", "InstructionReranking",
)  # fmt: skip
# queries carry the instruction, documents are raw; every other type has it on all its texts
ASYMMETRIC_TYPES = frozenset({"Retrieval", "Reranking", "InstructionRetrieval", "InstructionReranking"})

TYPE_INSTRUCTIONS = {
    "en": {
        "Retrieval": "Given a web search query, retrieve relevant passages that answer the query",
        "Reranking": "Given a query, retrieve documents that answer the query",
        "STS": "Retrieve semantically similar text",
        "PairClassification": "Retrieve text that is semantically similar to the given text",
        "Classification": "Classify the given text",
        "MultilabelClassification": "Classify the given text",
        "Clustering": "Identify the topic or theme of the given text",
        "BitextMining": "Retrieve parallel sentences",
        "Summarization": "Retrieve semantically similar summaries",
    },
    "zh": {
        "Retrieval": "给定一个查询，检索能回答该查询的相关段落",
        "Reranking": "给定一个查询，检索能回答该查询的文档",
        "STS": "检索语义相似的文本",
        "PairClassification": "检索与给定文本语义相似的文本",
        "Classification": "对给定文本进行分类",
        "MultilabelClassification": "对给定文本进行分类",
        "Clustering": "识别给定文本的主题",
        "BitextMining": "检索互为翻译的句子",
        "Summarization": "检索语义相似的摘要",
    },
}
DEFAULT_INSTRUCTIONS = TYPE_INSTRUCTIONS["en"]

# C-MTEB tasks with an instruction of their own: each task's prompt in mteb's metadata, which is what
# mteb's QZhou-Embedding loader applies. The others (LCQMC, PAWSX, AFQMC, QBQTC, ATEC, BQ, STSB) use their type's.
_CHINESE_SEARCH = "Given a Chinese search query, retrieve web passages that answer the question"
_CHINESE_MEDICAL = "Given a Chinese community medical question, retrieve replies that best answer the question"
CMTEB_INSTRUCTIONS = {
    "Retrieval": {
        "T2Retrieval": _CHINESE_SEARCH,
        "MMarcoRetrieval": "Given a web search query, retrieve relevant passages that answer the query",
        "DuRetrieval": _CHINESE_SEARCH,
        "CovidRetrieval": "Given a question on COVID-19, retrieve news articles that answer the question",
        "CmedqaRetrieval": _CHINESE_MEDICAL,
        "EcomRetrieval": (
            "Given a user query from an e-commerce website, retrieve description sentences of relevant products"
        ),
        "MedicalRetrieval": "Given a medical question, retrieve user replies that best answer the question",
        "VideoRetrieval": "Given a video search query, retrieve the titles of relevant videos",
    },
    "Reranking": {
        "T2Reranking": _CHINESE_SEARCH,
        "MMarcoReranking": _CHINESE_SEARCH,
        "CMedQAv1-reranking": _CHINESE_MEDICAL,
        "CMedQAv2-reranking": _CHINESE_MEDICAL,
    },
    "PairClassification": {
        "Ocnli": "Retrieve semantically similar text.",
        "Cmnli": "Retrieve semantically similar text.",
    },
    "Clustering": {
        "CLSClusteringS2S": "Identify the main category of scholar papers based on the titles",
        "CLSClusteringP2P": "Identify the main category of scholar papers based on the titles and abstracts",
        "ThuNewsClusteringS2S": "Identify the topic or theme of the given news articles based on the titles",
        "ThuNewsClusteringP2P": (
            "Identify the topic or theme of the given news articles based on the titles and contents"
        ),
    },
    "Classification": {
        "TNews": "Classify the fine-grained category of the given news title",
        "IFlyTek": "Given an App description text, find the appropriate fine-grained category",
        "Waimai": "Classify the customer review from a food takeaway platform into positive or negative",
        "OnlineShopping": "Classify the customer review for online shopping into positive or negative",
        "JDReview": "Classify the customer review for iPhone on e-commerce platform into positive or negative",
        "MultilingualSentiment": "Classify sentiment of the customer review into positive, neutral, or negative",
    },
}
CMTEB_TASKS = {
    name: (task_type, text) for task_type, names in CMTEB_INSTRUCTIONS.items() for name, text in names.items()
}


class MTEBUsageError(ConfigError):
    """A request that cannot run (mteb missing, an unknown name, a bad table); raised before encoding."""


@dataclass
class InstructionTable:
    """Instructions by mteb task type and by task name (name -> (type, instruction)); an empty
    instruction means none. `prompt_instructions` renders them into mteb's prompt keys."""

    language: str = "en"
    task_types: dict[str, str] = field(default_factory=dict)
    tasks: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def default(cls, language: str = "en") -> InstructionTable:
        if language not in TYPE_INSTRUCTIONS:
            raise MTEBUsageError(
                f"no default instructions for language {language!r} (known: {', '.join(TYPE_INSTRUCTIONS)})"
            )
        return cls(language, dict(TYPE_INSTRUCTIONS[language]), dict(CMTEB_TASKS))

    def with_entries(self, entries: dict) -> InstructionTable:
        """A copy with `entries` set: a task type, a C-MTEB task name, or any task name with its type."""
        task_types, tasks = dict(self.task_types), dict(self.tasks)
        for key, value in entries.items():
            instruction = value.get("instruction") if isinstance(value, dict) else value
            if instruction is not None and not isinstance(instruction, str):
                raise MTEBUsageError(f"{key}: an instruction is text, got {instruction!r}")
            if isinstance(value, dict):
                task_type, instruction = value.get("type"), value.get("instruction")
                _check_type(task_type, f"task {key!r}")
                tasks[key] = (task_type, instruction or "")
            elif key in MTEB_TEXT_TASK_TYPES:
                task_types[key] = value or ""
            elif key in CMTEB_TASKS:
                tasks[key] = (CMTEB_TASKS[key][0], value or "")
            else:
                raise MTEBUsageError(
                    f"unknown task type or task {key!r}: task types are {', '.join(MTEB_TEXT_TASK_TYPES)}; "
                    f"another task needs its type, as `{key}: {{type: TYPE, instruction: ...}}` in an instructions file"
                )
        return InstructionTable(self.language, task_types, tasks)

    def prompt_instructions(self) -> dict[str, str]:
        """mteb prompt key -> instruction ("" for documents)."""
        keys = {}
        for task_type, instruction in self.task_types.items():
            if task_type in ASYMMETRIC_TYPES:
                keys[f"{task_type}-query"], keys[f"{task_type}-document"] = instruction, ""
            else:
                keys[task_type] = instruction
        for name, (task_type, instruction) in self.tasks.items():
            keys[f"{name}-query" if task_type in ASYMMETRIC_TYPES else name] = instruction
        return keys


def _check_type(task_type, where: str) -> None:
    if task_type not in MTEB_TEXT_TASK_TYPES:
        raise MTEBUsageError(f"{where}: unknown task type {task_type!r} (mteb's: {', '.join(MTEB_TEXT_TASK_TYPES)})")


def parse_assignments(items: Iterable[str], flag: str) -> dict[str, str]:
    """["STS=Retrieve similar text", ...] -> {"STS": "Retrieve similar text"}."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MTEBUsageError(f"{flag} expects KEY=INSTRUCTION, got {item!r}")
        values[key] = value
    return values


def read_instruction_file(path: str | Path) -> tuple[str | None, dict]:
    """(language, entries) of a YAML instruction table: optional `language` (the defaults it starts
    from), `task_types: {TYPE: INSTRUCTION}`, and `tasks: {NAME: INSTRUCTION}` for the C-MTEB tasks
    or `{NAME: {type: TYPE, instruction: ...}}` for any task. Entries are checked by `with_entries`."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise MTEBUsageError(f"cannot read the instruction table {path}: {error}") from None
    unknown = sorted(set(values) - {"language", "task_types", "tasks"}) if isinstance(values, dict) else ["?"]
    if unknown:
        raise MTEBUsageError(f"{path}: expected the keys language, task_types and tasks, got {', '.join(unknown)}")
    entries = {**(values.get("task_types") or {}), **(values.get("tasks") or {})}
    try:
        InstructionTable().with_entries(entries)
    except MTEBUsageError as error:
        raise MTEBUsageError(f"{path}: {error}") from None
    return values.get("language"), entries


def build_instruction_table(
    language: str = "en", path: str | Path | None = None, entries: dict | None = None
) -> InstructionTable:
    """The defaults of a language (a file's `language`, else `language`), then the file's entries,
    then single entries (command-line flags)."""
    file_language, file_entries = read_instruction_file(path) if path else (None, {})
    table = InstructionTable.default(file_language or language)
    return table.with_entries(file_entries).with_entries(entries or {})


def rendered_prompts(table: InstructionTable, render: Callable[[str], str]) -> dict[str, str]:
    """The table's prompt keys with what the model reads; `render` formats an instruction ("" stays "")."""
    return {key: render(text) if text else "" for key, text in table.prompt_instructions().items()}


def table_prompts(table: InstructionTable, query_instruction: str | None, render: Callable[[str], str]) -> dict:
    """Every prompt of a model: `query` (the run's retrieval instruction), an empty `document`, and
    the table's keys; `render` turns an instruction into what the model reads ("" stays "")."""
    query = query_instruction or table.task_types.get("Retrieval", "")
    return {"query": render(query) if query else "", "document": "", **rendered_prompts(table, render)}


def prompt_key(keys, task_name: str | None, task_type: str | None, prompt_type: str | None) -> str | None:
    """The key mteb's `get_prompt_name` picks (mteb 2.x): the first of `{TaskName}-{prompt type}`,
    `{TaskName}`, `{TaskType}-{prompt type}`, `{TaskType}`, `{prompt type}` that is in `keys`."""
    candidates = [
        f"{task_name}-{prompt_type}" if task_name and prompt_type else None,
        task_name,
        f"{task_type}-{prompt_type}" if task_type and prompt_type else None,
        task_type,
        prompt_type,
    ]
    return next((key for key in candidates if key and key in keys), None)


def default_query_instruction(run_config, table: InstructionTable) -> str:
    """The `query` prompt's instruction: the run's first retrieval dataset's, else the table's Retrieval one."""
    if run_config is not None:
        for dataset in run_config.data.datasets:
            if dataset.task.value == "retrieval" and dataset.instruction:
                return dataset.instruction
    return table.task_types.get("Retrieval", "")


def training_datasets(run_config) -> list[str]:
    """Names of the datasets a run trained on (and the run it started from, `model.init_from`), as the
    runs name them: the dataset's `name`, else its file name."""
    from tpembed.train.build import dataset_configs
    from tpembed.train.checkpoint import resolve_checkpoint
    from tpembed.train.config import load_saved_config

    names, config, visited = [], run_config, set()
    while config is not None:
        names += [dataset.name or Path(dataset.path).stem for dataset in dataset_configs(config)]
        try:
            source = resolve_checkpoint(config.model.init_from).resolve() if config.model.init_from else None
        except FileNotFoundError:  # moved or deleted since: the names found so far
            source = None
        if source is None or source in visited or not (source / "config.yaml").is_file():
            break
        visited.add(source)
        config = load_saved_config(source / "config.yaml")
    return sorted(set(names))


def training_datasets_line(names: Iterable[str]) -> str:
    """`training_datasets = {...}`, the form of mteb's ModelMeta.training_datasets."""
    return "training_datasets = {" + ", ".join(json.dumps(n, ensure_ascii=False) for n in sorted(names)) + "}"


def _card_training_datasets(export_dir: Path) -> set[str] | None:
    card = export_dir / "README.md"
    found = re.search(r"^training_datasets = (\{.*\})$", card.read_text(), re.M) if card.is_file() else None
    return set(ast.literal_eval(found.group(1))) if found else None


def model_identity(path: str | Path) -> tuple[str, str]:
    """(name, revision) to file mteb results under: the run's (or export's) directory name, and the
    checkpoint with a fingerprint of the weight files (names, sizes, modification times), so two models
    never share mteb's cache entries while re-evaluating the same files reuses them."""
    from tpembed.train.checkpoint import MODEL_DIR
    from tpembed.train.embedder import model_directory

    path = Path(path).resolve()
    if (path / "modules.json").is_file():
        name, checkpoint, weights_dir = path.name, "export", path
    else:
        model_dir = model_directory(path)
        checkpoint_dir = model_dir.parent if model_dir.name == MODEL_DIR else None
        run_dir = checkpoint_dir.parent.parent if checkpoint_dir else model_dir
        name, checkpoint, weights_dir = run_dir.name, checkpoint_dir.name if checkpoint_dir else "model", model_dir
    digest = hashlib.sha1()
    for weights in sorted(weights_dir.rglob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{weights.relative_to(weights_dir)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return f"tpembed/{name}", f"{checkpoint}-{digest.hexdigest()[:10]}"


def stored_dims(path: str | Path) -> list[int] | None:
    """The Matryoshka dims a run, checkpoint or export records, read without loading weights (None:
    not recorded), so a wrong --dims fails before a large model is loaded."""
    from tpembed.modeling.encoder import read_encoder_spec
    from tpembed.train.embedder import model_directory

    path = Path(path)
    try:
        if (path / "modules.json").is_file():
            stored = json.loads((path / "tpembed_st_config.json").read_text())
            return stored.get("mrl_dims") or [
                json.loads((path / "2_Dense" / "config.json").read_text())["out_features"]
            ]
        directory = model_directory(path)
        spec = read_encoder_spec(directory)
        if spec.output_dim:
            return list(spec.mrl_dims) or [spec.output_dim]
        return [json.loads((directory / "config.json").read_text())["hidden_size"]]
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class _Backend:
    encode: Callable[[list[str], str], torch.Tensor]  # full-size embeddings of texts read with one prompt value
    prompts: dict[str, str]  # mteb prompt key -> the value `encode` takes
    render: Callable[[str], str]  # an instruction -> a prompt value
    dims: list[int]
    n_parameters: int | None = None
    max_tokens: int | None = None
    training_datasets: set[str] | None = None


def _export_backend(path: Path, device, batch_size: int) -> _Backend:
    """A tpembed export read through sentence-transformers with its stored prompts: what
    `mteb.evaluate(SentenceTransformer(path, trust_remote_code=True))` encodes."""
    from sentence_transformers import SentenceTransformer

    from tpembed.data import TextFormat

    model = SentenceTransformer(str(path), trust_remote_code=True, device=device)
    stored = json.loads((path / "tpembed_st_config.json").read_text())
    dims = stored.get("mrl_dims") or [model.get_embedding_dimension()]

    def encode(texts: list[str], prompt: str) -> torch.Tensor:
        kwargs = dict(batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
        return model.encode(texts, prompt=prompt or None, **kwargs).float().cpu()

    return _Backend(
        encode,
        {key: value or "" for key, value in model.prompts.items()},
        TextFormat.from_dict(stored["text_format"]).prompt,
        dims,
        sum(p.numel() for p in model.parameters()),
        stored.get("passage_max_len"),
        _card_training_datasets(path),
    )


def _run_backend(path: str, embedder, table: InstructionTable, batch_size: int) -> _Backend:
    """A run, checkpoint or model directory: the table's instructions, raw. `embedder` is its model when
    loaded already, else the device to load it on; the run's config (when `path` has one) gives the
    query instruction and the training datasets."""
    from tpembed.train.config import load_saved_config
    from tpembed.train.embedder import Embedder, model_directory

    try:
        config_path = model_directory(path).parent / "config.yaml"
    except FileNotFoundError:  # a name only, with its model given as `embedder`
        config_path = None
    run_config = load_saved_config(config_path) if config_path and config_path.is_file() else None
    if not isinstance(embedder, Embedder):
        embedder = Embedder.from_checkpoint(path, device=embedder)

    def encode(texts: list[str], instruction: str) -> torch.Tensor:
        return embedder.encode(texts, instruction or None, batch_size=batch_size)

    encoder = embedder.encoder
    return _Backend(
        encode,
        table_prompts(table, default_query_instruction(run_config, table), lambda text: text),
        lambda text: text,
        list(encoder.spec.mrl_dims) if encoder.head is not None else [embedder.embedding_dim],
        sum(p.numel() for p in encoder.parameters()),
        embedder.text.passage_max_len,
        set(training_datasets(run_config)) if run_config is not None else None,
    )


class TPEmbedMTEBModel:
    """mteb encoder (mteb 2.x protocol) for a tpembed run, checkpoint, model directory or export.

    Prompts are resolved by mteb's key order (`prompt_key`): for an export, its stored prompts (what
    mteb itself would use), updated with `instructions`; for a run, the instruction table of `language`
    updated with `instructions` (task type or task name -> instruction, or a whole InstructionTable).
    Embeddings are the first `dim` numbers, not normalised, exactly as `truncate_dim=dim` returns them;
    similarity is cosine. `name` and `revision` (default: `model_identity`) name mteb's results, and the
    dim is the experiment (`experiment_kwargs={"dim": dim}`), so no two models or dims share cache entries.
    """

    def __init__(
        self,
        model_name: str,
        revision: str | None = None,
        *,
        device: str | None = None,
        dim: int | None = None,
        instructions: dict | InstructionTable | None = None,
        language: str = "en",
        batch_size: int = 32,
        embedder=None,
        name: str | None = None,
        **kwargs,
    ):
        path = Path(model_name)
        identity = model_identity(path) if path.exists() else (f"tpembed/{path.name}", "local")
        self.name, self.revision = name or identity[0], revision or identity[1]
        if embedder is None and (path / "modules.json").is_file():
            self.backend = _export_backend(path, device, batch_size)
            if instructions:  # only what is asked for replaces the stored prompts
                if not isinstance(instructions, InstructionTable):
                    instructions = InstructionTable(language).with_entries(instructions)
                self.backend.prompts.update(rendered_prompts(instructions, self.backend.render))
        else:
            if not isinstance(instructions, InstructionTable):
                instructions = InstructionTable.default(language).with_entries(instructions or {})
            self.backend = _run_backend(model_name, embedder or device, instructions, batch_size)
        self.dims = self.backend.dims
        self.full_dim = max(self.dims)
        self.dim = check_dims([dim or self.full_dim], self.dims)[0]
        self.prompts = self.backend.prompts
        self.reuse_embeddings = False  # run_mteb turns it on per task, so every dim reuses one encoding
        self._memo: dict = {}

    @property
    def has_task_type_prompts(self) -> bool:
        """False for exports written before tpembed wrote task-type prompts: mteb then encodes
        STS, PairClassification, Classification and Clustering without instruction."""
        return "STS" in self.prompts

    def prompt_for(self, task_name: str, task_type: str, prompt_type=None) -> str:
        """The prompt value used for a task's texts (mteb's key order; "" when no key matches)."""
        key = prompt_key(self.prompts, task_name, task_type, getattr(prompt_type, "value", prompt_type))
        return self.prompts[key] if key else ""

    def encode(self, inputs, *, task_metadata, hf_split: str = "", hf_subset: str = "", prompt_type=None, **kwargs):
        texts = [text for batch in inputs for text in batch["text"]]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        prompt = self.prompt_for(task_metadata.name, task_metadata.type, prompt_type)
        key = (prompt, tuple(texts))
        full = self._memo.get(key) if self.reuse_embeddings else None
        if full is None:
            full = self.backend.encode(texts, prompt)
            if self.reuse_embeddings:
                self._memo[key] = full
        return full[:, : self.dim].numpy()

    def forget(self) -> None:
        """Drop the embeddings kept for reuse across dims."""
        self._memo.clear()

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        a, b = (
            F.normalize(torch.as_tensor(np.asarray(e), dtype=torch.float32), dim=-1) for e in (embeddings1, embeddings2)
        )
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        a, b = (
            F.normalize(torch.as_tensor(np.asarray(e), dtype=torch.float32), dim=-1) for e in (embeddings1, embeddings2)
        )
        return (a * b).sum(-1)

    @property
    def mteb_model_meta(self):
        """mteb's ModelMeta (built when asked: mteb is an optional dependency)."""
        from mteb.models import ModelMeta

        return ModelMeta(
            loader=None,
            name=self.name,
            revision=self.revision,
            release_date=None,
            languages=None,
            n_parameters=self.backend.n_parameters,
            memory_usage_mb=None,
            max_tokens=self.backend.max_tokens,
            embed_dim=self.dim,
            license=None,
            open_weights=True,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch", "Sentence Transformers"],
            similarity_fn_name="cosine",
            use_instructions=True,
            training_datasets=self.backend.training_datasets,
            experiment_kwargs={"dim": self.dim},
        )


def _unit(embeddings) -> torch.Tensor:
    return F.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32), dim=-1)


def require_mteb():
    """The mteb module, or MTEBUsageError naming the extra."""
    try:
        import mteb
    except ImportError:
        raise MTEBUsageError(f"evaluating with mteb needs the mteb package: {MTEB_EXTRA_HINT}") from None
    if not hasattr(mteb, "evaluate"):
        raise MTEBUsageError(f"mteb {getattr(mteb, '__version__', '?')} is too old (needs 2.x): {MTEB_EXTRA_HINT}")
    return mteb


def resolve_mteb_tasks(names: list[str], skip: Iterable[str] = ()) -> tuple[list, list[str]]:
    """(tasks, benchmark names) for benchmark and task names, without loading any data; raises
    MTEBUsageError for a name that is neither (with mteb's suggestions) or an unknown --skip."""
    mteb = require_mteb()
    tasks, benchmarks = {}, []
    for name in names:
        try:
            benchmark = mteb.get_benchmark(name)
        except (KeyError, ValueError) as error:
            benchmark, benchmark_error = None, error
        if benchmark is not None:
            benchmarks.append(benchmark.name)
            tasks.update({task.metadata.name: task for task in benchmark.tasks})
            continue
        try:
            task = mteb.get_task(name)
        except (KeyError, ValueError) as error:
            hints = "; ".join(str(e.args[0] if e.args else e).strip("\"'") for e in (benchmark_error, error))
            raise MTEBUsageError(f"--mteb: {name!r} is neither an mteb benchmark nor an mteb task ({hints})") from None
        tasks[task.metadata.name] = task
    unknown = sorted(set(skip) - set(tasks))
    if unknown:
        raise MTEBUsageError(f"--skip: no mteb task named {', '.join(unknown)}")
    return [task for name, task in tasks.items() if name not in set(skip)], benchmarks


class MTEBRunError(RuntimeError):
    """mteb could not load or run a task (most often: its data is not reachable on the Hub)."""


def _run_task(mteb, model: TPEmbedMTEBModel, task, dims: list[int], cache, encode_kwargs: dict, progress: bool) -> dict:
    """One task at every dim: its data is loaded once (mteb unloads only what it loaded itself) and its
    texts encoded once (the model keeps them until `forget`)."""
    name, loaded_here = task.metadata.name, False
    try:
        if len(dims) > 1 and not task.data_loaded:
            task.load_data()
            loaded_here = True
        by_dim = {}
        for dim in dims:
            model.dim = dim
            outcome = mteb.evaluate(model, task, cache=cache, show_progress_bar=progress, encode_kwargs=encode_kwargs)
            by_dim[str(dim)] = {task.metadata.main_score: 100 * float(outcome.task_results[0].get_score())}
    except (ConnectionError, OSError) as error:
        raise MTEBRunError(
            f"mteb could not load or run {name}: {error} (mteb downloads task data from the Hugging Face Hub: "
            "run it online, or with the data in the Hugging Face cache)"
        ) from error
    finally:
        model.forget()
        if loaded_here:
            task.unload_data()
    return {"type": task.metadata.type, "main_metric": task.metadata.main_score, "by_dim": by_dim}


def run_mteb(model: TPEmbedMTEBModel, tasks: list, dims: list[int], *, cache=None, batch_size: int = 32,
             progress: bool = False) -> dict:  # fmt: skip
    """mteb's score of every task at every dim, x100, in tpembed's results layout; each task's texts are
    encoded once and sliced per dim. `cache` is mteb's ResultCache (None: no cache)."""
    mteb = require_mteb()
    check_dims(dims, model.dims)
    results = {"model": model.name, "revision": model.revision, "dims": list(dims), "tasks": {}}
    results["mteb_version"] = mteb.__version__
    model.reuse_embeddings = True
    try:
        for task in tasks:
            encode_kwargs = {"batch_size": batch_size}
            results["tasks"][task.metadata.name] = _run_task(mteb, model, task, dims, cache, encode_kwargs, progress)
    finally:
        model.reuse_embeddings = False
    return results


def summary_line(results: dict, label: str | None = None) -> str:
    """One line for a model card: the mean over tasks and over task types at the largest dim."""
    dim = str(max(results["dims"]))
    tasks = results["tasks"].values()
    scores = [task["by_dim"][dim][task["main_metric"]] for task in tasks]
    by_type: dict[str, list[float]] = {}
    for task, score in zip(tasks, scores):
        by_type.setdefault(task["type"], []).append(score)
    type_mean = float(np.mean([np.mean(v) for v in by_type.values()]))
    return (
        f"{label or 'mteb'}: mean {np.mean(scores):.2f} over {len(scores)} tasks, {type_mean:.2f} over "
        f"{len(by_type)} task types, at dim {dim} (mteb {results.get('mteb_version', '?')}, scores x100)"
    )


def evaluate_with_mteb(args) -> dict:
    """`tpembed-eval MODEL --mteb NAME ...`: every check that needs no model (mteb installed, the names,
    the instruction table) runs before the model is loaded, the dims before anything is encoded.
    Results go to mteb's cache (`OUTPUT_DIR/mteb` with --output-dir, else mteb's own, MTEB_CACHE)."""
    mteb = require_mteb()
    file_language, entries = read_instruction_file(args.instructions) if args.instructions else (None, {})
    entries.update(parse_assignments(args.instruction, "--instruction"))
    language = file_language or args.language
    InstructionTable.default(language).with_entries(entries)  # fails here, not after loading the model
    tasks, benchmarks = resolve_mteb_tasks(args.mteb, args.skip)
    if args.dims and stored_dims(args.model):
        check_dims(args.dims, stored_dims(args.model))
    model = TPEmbedMTEBModel(
        args.model, instructions=entries, language=language, batch_size=args.batch_size, name=args.mteb_name
    )
    dims = check_dims(args.dims or model.dims, model.dims)
    if not model.has_task_type_prompts:
        print(
            f"note: {args.model} has no task-type prompts (an older export): mteb encodes STS, "
            "PairClassification, Classification and Clustering without instruction; re-export it to add them",
            file=sys.stderr,
        )
    cache = mteb.ResultCache(Path(args.output_dir) / "mteb") if args.output_dir else mteb.ResultCache()
    results = run_mteb(model, tasks, dims, cache=cache, batch_size=args.batch_size, progress=not args.no_progress)
    results["summary"] = summary_line(results, ", ".join(benchmarks) or None)
    return results
