"""Typed run configuration: defaults <- YAML files (--config) <- command-line flags.

Every field is declared once, with its help text, in one of the groups below.
Each becomes a kebab-case flag (`learning_rate` -> `--learning-rate`); field
names are unique across groups so a flag never needs its group's name.

Type checking is pydantic's (strict: `1.5` is not an integer, `"yes"` not a
boolean, unknown keys are errors), run once over the merged values; its error
locations become the dotted key in the message (`data.datasets[0].task`).
Values that have a richer type than their spelling are parsed here, once:
`tp.tp_layers: 1-7` becomes the tuple (1, ..., 7) every consumer receives.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml

from tpembed.data import TEMPLATES, Task
from tpembed.modeling import DEFAULT_MRL_DIMS, TINY_QWEN3, Pooling, validate_mrl_dims
from tpembed.modeling.token_prepending import format_tp_layers, parse_tp_layers


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


def _tp_layers(value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (
        not isinstance(value, (str, list, tuple))
        or isinstance(value, (list, tuple))
        and not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"expected a layer set like '1-7', '1,3,5' or 'none', got {value!r}")
    return parse_tp_layers(value)


# '1-7' in YAML and on the command line, (1, ..., 7) in the program, '1-7' again when saved
TpLayers = Annotated[
    tuple[int, ...], pydantic.PlainValidator(_tp_layers), pydantic.PlainSerializer(format_tp_layers, return_type=str)
]

_STRICT = pydantic.ConfigDict(extra="forbid", strict=True)
Positive = Annotated[int, pydantic.Field(gt=0)]
PositiveFloat = Annotated[float, pydantic.Field(gt=0)]
NonNegative = Annotated[int, pydantic.Field(ge=0)]
NonNegativeFloat = Annotated[float, pydantic.Field(ge=0)]
Share = Annotated[float, pydantic.Field(ge=0, le=1)]


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    name_or_path: str = _help(
        "Hugging Face id or local directory of the decoder LM; 'tpembed:tiny-qwen3' is a small random-init "
        "Qwen3 with the real Qwen vocabulary (runs offline).",
        TINY_QWEN3,
    )
    tokenizer: str | None = _help("tokenizer id or directory; default: the model's own", None)
    dtype: Literal["float32", "bfloat16", "float16"] = _help("parameter dtype of backbone and head", "float32")
    attn_implementation: str = _help("attention kernel: sdpa, eager, flash_attention_2", "sdpa")
    gradient_checkpointing: bool = _help("recompute activations in the backward pass to save memory", False)
    trust_remote_code: bool = _help("allow model/tokenizer code from the checkpoint directory (off: safer)", False)
    pooling: Pooling = _help("last_token (the method) or mean", Pooling.last_token)
    output_dim: int = _help("MRL head output size: Linear(hidden, output_dim)", 1792)
    head_bias: bool = _help("bias in the MRL head", True)
    padding_side: Literal["left", "right"] = _help("padding side; pooling finds the last real token either way", "left")
    init_from: str | None = _help(
        "stage 2: a stage-1 run directory, checkpoint or its model/ folder to start from (backbone, head, tokenizer)",
        None,
    )


@dataclass
class TokenPrependingConfig:
    tp_layers: TpLayers = _help(
        "decoder layers (0-based) with Token Prepending: '1-7' (inclusive), '1,3,5', or 'none'", ()
    )
    placeholder_token: str | None = _help(
        "the placeholder token; default '<|im_start|>' when the tokenizer has it, else '<|tp_placeholder|>', "
        "added to the tokenizer (embedding matrix resized)",
        None,
    )
    add_placeholder: bool = _help(
        "add the placeholder to a tokenizer that lacks it (resizing the embeddings); false: fail instead", True
    )


@dataclass
class LoraConfig:
    lora_rank: NonNegative = _help("LoRA rank through peft; 0 trains every parameter", 0)
    lora_alpha: float = _help("LoRA scaling alpha (the update is scaled by alpha / rank)", 32.0)
    lora_dropout: float = _help("dropout on the LoRA input", 0.0)
    lora_target_modules: list[str] = _help(
        "modules that get adapters",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )


@dataclass
class DatasetConfig:
    path: str = _help("JSONL or parquet file, a directory of them, or a `datasets` dataset saved to disk", "")
    task: Task = _help("retrieval, sts or classification", Task.retrieval)
    name: str | None = _help("name in logs; default: the file name", None)
    instruction: str | None = _help("task instruction for records without their own", None)
    weight: NonNegativeFloat = _help("multiplies this dataset's sampling mass n ** alpha", 1.0)
    batch_size: Positive | None = _help("global batch size of this dataset; default: data.batch_size", None)
    num_hard_negatives: NonNegative | None = _help("negatives per anchor; default: data.num_hard_negatives", None)
    score_range: list[float] | None = _help("sts: [min, max]; scores outside fail validation", None)
    lr_scale: PositiveFloat = _help(
        "multiplies the scheduled learning rate of the steps that draw this dataset (0.3: its steps move the "
        "model less, e.g. CoSENT sets beside retrieval); 1: the schedule's rate",
        1.0,
    )


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = _help("training datasets", factory=list)
    train_files: list[str] = _help(
        "files that replace `datasets`, one dataset each; prefix 'sts:' or 'classification:' for other tasks",
        factory=list,
    )
    default_instruction: str = _help(
        "instruction for datasets that give none",
        "Given a web search query, retrieve relevant passages that answer the query",
    )
    template: str = _help(f"input template: {', '.join(TEMPLATES)}", "instruction")
    batch_size: Positive = _help("global batch size: anchors per optimizer step over all processes", 256)
    num_hard_negatives: NonNegative = _help("hard negatives per query (sampled from its list each epoch)", 4)
    hard_negative_fallback: Literal["repeat", "random", "error"] = _help(
        "when a record has fewer negatives: repeat (sample with replacement; random passages if none), "
        "random (fill with other records' passages), error",
        "repeat",
    )
    query_max_len: Positive = _help("max tokens of queries and of both sides of symmetric tasks", 256)
    passage_max_len: Positive = _help("max tokens of retrieval passages", 1536)
    sampling_alpha: float = _help("dataset i is picked with probability proportional to n_i ** alpha", 0.5)
    eta_ret: Share | None = _help("stage 2: share of steps given to retrieval datasets together (0.72)", None)
    schedule: Literal["random", "interleaved"] = _help(
        "how steps pick their dataset: random (independent draws with the sampling probabilities, the method's) "
        "or interleaved (the same shares spread evenly: retrieval and other datasets alternate, no long runs of "
        "one task type)",
        "random",
    )
    append_eos: bool = _help("append the end-of-text token as the pooled last token (stage 1)", True)
    prepend_bos: bool = _help("start every sequence with the tokenizer's BOS token", False)
    allow_empty_text: bool = _help("render empty queries/positives as 'Null' instead of failing", False)
    num_workers: NonNegative = _help("DataLoader worker processes that build and tokenise batches ahead", 0)
    cache_dir: str | None = _help(
        "where datasets are converted to Arrow files, once per version (default $TPEMBED_CACHE/datasets, "
        "else ~/.cache/tpembed/datasets; a local disk of each machine)",
        None,
    )
    num_proc: Positive | None = _help("processes that validate a new dataset version (default: cores, at most 8)", None)
    pad_to_multiple_of: int | None = _help("pad sequence lengths to a multiple of this (8 helps tensor cores)", None)
    packing: bool = _help(
        "padding-free batches: texts packed into rows with per-text position ids (needs an attention "
        "implementation that reads packed position ids: sdpa, eager, flash_attention_2/3)",
        False,
    )
    pack_row_tokens: Positive | None = _help(
        "packing: tokens per row (default: the batch side's longest text); a row's attention costs its square",
        None,
    )


@dataclass
class LossConfig:
    temperature: PositiveFloat = _help("InfoNCE temperature tau", 0.02)
    cosent_temperature: PositiveFloat = _help("CoSENT temperature (0.05 is the common CoSENT value)", 0.02)
    mrl_dims: list[int] = _help(
        "Matryoshka dims, ascending, the last <= output_dim", factory=lambda: list(DEFAULT_MRL_DIMS)
    )
    mrl_weights: list[float] | None = _help("one weight per Matryoshka dim; default 1 each", None)
    query_query_negatives: bool = _help("other queries in the InfoNCE denominator", True)
    false_negative_margin: float | None = _help(
        "mask candidates scoring above positive + margin, and passages equal to the positive (0.1: Qwen3-Embedding)",
        None,
    )


@dataclass
class OptimConfig:
    learning_rate: float = _help("peak learning rate", 3e-5)
    weight_decay: float = _help("AdamW weight decay (not on biases and norms)", 0.01)
    adam_beta1: float = _help("AdamW beta1", 0.9)
    adam_beta2: float = _help("AdamW beta2", 0.999)
    adam_epsilon: float = _help("AdamW epsilon", 1e-8)
    fused: bool = _help("torch's fused AdamW kernel (CPU and CUDA); false: the per-tensor loop", True)
    warmup_steps: int = _help("linear warm-up steps", 300)
    lr_scheduler: Literal["linear", "cosine", "constant"] = _help("decay after warm-up", "linear")
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", 1.0)


@dataclass
class TrainConfig:
    stage: int = _help("1: retrieval pre-training, 2: full-task fine-tuning", 1)
    output_dir: str = _help("run directory: config, logs, checkpoints", "runs/stage1")
    max_steps: Positive = _help("optimizer steps", 32000)
    seed: int = _help("seed of initialisation and of the data order", 42)
    gradient_accumulation_steps: Positive = _help(
        "micro-steps per optimizer step (saves memory; does not add negatives)", 1
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _help("auto: bf16 on GPUs that support it", "auto")
    save_every: Positive = _help("checkpoint every N steps (and at the end)", 1000)
    keep_last: Positive = _help("checkpoints kept; older ones are pruned after a new one is complete", 3)
    resume_from: str | None = _help("a checkpoint directory, or 'auto' for the newest complete one", None)
    max_nonfinite_steps: NonNegative = _help(
        "consecutive steps with a non-finite loss or gradient norm that are skipped before the run stops", 5
    )
    cpu: bool = _help("run on CPU even when a GPU is present", False)
    grad_cache: bool = _help(
        "GradCache: embed without graph in mini-batches, then backpropagate the full-batch loss's gradient "
        "mini-batch by mini-batch (big batches in little memory, same gradients)",
        False,
    )
    grad_cache_rows: int | None = _help("GradCache mini-batch: texts per forward (default 32 without a budget)", None)
    grad_cache_tokens: int | None = _help("GradCache mini-batch: token budget (rows x padded length) per forward", None)


@dataclass
class LoggingConfig:
    log_every: Positive = _help("log metrics every N steps", 10)
    report_to: list[Literal["auto", "tensorboard", "wandb", "none"]] = _help(
        "trackers: tensorboard, wandb, none, or auto (TensorBoard when installed: pip install 'tpembed[tensorboard]'); "
        "metrics.jsonl is written in every case",
        factory=lambda: ["auto"],
    )
    project: str = _help("tracker project name", "tpembed")
    run_name: str | None = _help("tracker run name; default: the output directory's name", None)
    wandb_mode: Literal["offline", "online", "disabled"] = _help("wandb mode; offline never prompts", "offline")
    progress_bar: bool = _help("show a progress bar on the main process", True)
    peak_tflops: float | None = _help(
        "peak dense TFLOP/s of one device for the MFU estimate; default: a table of known GPUs (none on CPU)", None
    )


@dataclass
class EvalTaskConfig:
    name: str = _help("name in results and logs", "")
    type: Literal["sts", "retrieval", "classification", "clustering"] = _help(
        "sts: pairs with scores (Spearman); retrieval: BEIR layout (nDCG@10); classification: a directory of "
        "train.jsonl and <split>.jsonl {sentence|text, label} (logistic-regression accuracy); clustering: "
        "<split>.jsonl or a JSONL file of the same rows (k-means V-measure)",
        "sts",
    )
    path: str = _help(
        "sts: JSONL of {sentence1, sentence2, score}; retrieval: BEIR directory; classification: a directory of "
        "train.jsonl and <split>.jsonl; clustering: such a directory or a JSONL file",
        "",
    )
    instruction: str | None = _help("query-side instruction (symmetric tasks: every text)", None)
    limit: int | None = _help("evaluate only the first N pairs / queries / evaluated texts", None)
    split: str = _help("retrieval: qrels/<split>.tsv; classification, clustering: <split>.jsonl is evaluated", "test")


@dataclass
class EvalConfig:
    eval_tasks: list[EvalTaskConfig] = _help("dev sets evaluated during training", factory=list)
    eval_every: NonNegative = _help("evaluate every N steps on the main process (0: never)", 0)
    eval_limit: int | None = _help("cap on pairs / queries per dev set during training", 500)
    eval_batch_size: int = _help("texts per encoding batch during evaluation", 64)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tp: TokenPrependingConfig = field(default_factory=TokenPrependingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


for _group in (ModelConfig, TokenPrependingConfig, LoraConfig, DatasetConfig, DataConfig, LossConfig, OptimConfig,
               TrainConfig, LoggingConfig, EvalTaskConfig, EvalConfig, Config):  # fmt: skip
    _group.__pydantic_config__ = _STRICT  # unknown keys are errors, at every level


# What each stage changes by default (docs/method.md section 2); the entry scripts pass these.
STAGE_DEFAULTS = {
    1: {"train": {"stage": 1}},
    2: {
        "train": {"stage": 2, "output_dir": "runs/stage2", "max_steps": 8000},
        "optim": {"learning_rate": 2e-5},
        "data": {"template": "prompteol", "append_eos": False, "eta_ret": 0.72},
        "tp": {"tp_layers": "1-7"},
    },
}


# ---- validation and conversion (pydantic) ------------------------------------------------


@cache
def _adapter(annotation) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(annotation)


def _key(location: tuple) -> str:
    """('data', 'datasets', 0, 'task') -> 'data.datasets[0].task'."""
    key = ""
    for part in location:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _validate(cls, values: dict, prefix: str = ""):
    """Strict validation of plain (YAML/JSON) values into `cls`; ConfigError names the key."""
    try:
        return _adapter(cls).validate_json(json.dumps(values), strict=True)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        key = prefix + _key(first["loc"])
        if first["type"] == "unexpected_keyword_argument":
            parent = key.rpartition(".")[0] or "the top level"
            raise ConfigError(f"unknown config key '{key}' (not a field of {parent})") from None
        raise ConfigError(f"{key}: {_describe(first)}") from None


def to_dict(config) -> dict:
    """Plain YAML-able values (enums as their values, TP layers as '1-7')."""
    return _adapter(type(config)).dump_python(config, mode="json")


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(values: dict, source: str = "config") -> Config:
    try:
        return validate(_validate(Config, values))
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config groups")
    return values


# ---- command line ---------------------------------------------------------------------


def leaf_fields() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """{field name: (group, field, annotation)} for every flag-able field."""
    leaves = {}
    for group in dataclasses.fields(Config):
        cls = group.default_factory
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            if f.name in ("datasets", "eval_tasks"):
                continue
            if f.name in leaves:
                raise RuntimeError(f"config field name {f.name!r} is used by two groups")
            leaves[f.name] = (group.name, f, hints[f.name])
    return leaves


def _is_list(annotation) -> bool:
    return any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation)))


def build_parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable; later wins)")
    groups = {}
    for name, (group, f, annotation) in leaf_fields().items():
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        groups[group].add_argument(
            "--" + name.replace("_", "-"),
            dest=f"{group}.{name}",
            nargs="+" if _is_list(annotation) else None,
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=f.metadata.get("help", ""),
        )
    return parser


def _flag_value(raw: str | list[str], annotation, flag: str):
    """A flag's text, converted to the field's type (lax: '3e-5' is a number, 'true' a boolean)."""
    if raw in (["none"], ["null"], "none", "null") and type(None) in typing.get_args(annotation):
        return None
    if raw == ["[]"]:
        return []
    try:
        return _adapter(annotation).validate_python(raw)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        raise ConfigError(f"{flag}: {_describe(first)}") from None


def _describe(error: dict) -> str:
    """A pydantic error in the words of the config errors ('expected an integer, got 'ten'')."""
    if error["type"] == "value_error":  # a parser's own message (TP layers)
        return str(error["ctx"]["error"])
    kinds = {"int": "expected an integer", "float": "expected a number", "bool": "expected true or false"}
    words = next((words for kind, words in kinds.items() if error["type"].startswith(kind)), error["msg"].lower())
    return f"{words}, got {error['input']!r}"


def load_config(argv: list[str] | None = None, base: dict | None = None, description: str = "") -> Config:
    """defaults <- `base` (a stage's defaults) <- each --config YAML <- flags."""
    args = build_parser(description).parse_args(argv)
    values: dict = dict(base or {})
    sources = ["defaults"]
    for path in args.config:
        values = _merge(values, read_yaml(path))
        sources.append(str(path))
    leaves = leaf_fields()
    flags: dict = {}
    for dest, raw in vars(args).items():
        if dest != "config":
            group, name = dest.split(".")
            value = _flag_value(raw, leaves[name][2], f"--{name.replace('_', '-')}")
            flags.setdefault(group, {})[name] = value
    values = _merge(values, flags)
    return from_dict(values, source=" <- ".join(sources + (["flags"] if flags else [])))


def validate(config: Config) -> Config:
    """Checks that need more than one field; each error names its key."""
    try:
        validate_mrl_dims(config.loss.mrl_dims, config.model.output_dim)
    except ValueError as error:
        raise ConfigError(f"loss.mrl_dims: {error}") from None
    if config.loss.mrl_weights is not None and len(config.loss.mrl_weights) != len(config.loss.mrl_dims):
        raise ConfigError(
            f"loss.mrl_weights: {len(config.loss.mrl_weights)} weights for {len(config.loss.mrl_dims)} mrl_dims"
        )
    if config.data.template not in TEMPLATES:
        raise ConfigError(f"data.template: {config.data.template!r} is not one of {', '.join(TEMPLATES)}")
    for i, dataset in enumerate(config.data.datasets):
        if not dataset.path:
            raise ConfigError(f"data.datasets[{i}].path: required")
        if dataset.score_range is not None and (
            len(dataset.score_range) != 2 or dataset.score_range[0] > dataset.score_range[1]
        ):
            raise ConfigError(f"data.datasets[{i}].score_range: expected [min, max], got {dataset.score_range}")
    _check_eval_tasks(config.eval.eval_tasks, "eval.eval_tasks")
    return config


def _check_eval_tasks(tasks: list[EvalTaskConfig], where: str) -> None:
    for i, task in enumerate(tasks):
        if not task.name or not task.path:
            raise ConfigError(f"{where}[{i}]: needs a name and a path")


def config_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def load_eval_tasks(path: str | Path) -> list[EvalTaskConfig]:
    """A YAML file with a top-level `tasks:` list of evaluation tasks (configs/eval/)."""
    values = read_yaml(path)
    unknown = [k for k in values if k != "tasks"]
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (an eval file holds only 'tasks')")
    tasks = _validate(list[EvalTaskConfig], values.get("tasks", []), prefix=f"{path}: tasks")
    _check_eval_tasks(tasks, f"{path}: tasks")
    return tasks


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(config), encoding="utf-8")


def load_saved_config(path: str | Path) -> Config:
    """Read a config.yaml written by save_config (run directory or checkpoint)."""
    return from_dict(read_yaml(path), source=str(path))


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"learning_rate": 1}} -> {"optim.learning_rate": 1}."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def reference_markdown() -> str:
    """The config reference table of docs/configuration.md (`python -m tpembed.train.config`)."""
    lines = ["| key | flag | default | meaning |", "|---|---|---|---|"]
    defaults = to_dict(Config())
    for name, (group, f, _) in leaf_fields().items():
        default = defaults[group][name]
        shown = "" if default is None else json.dumps(default, ensure_ascii=False)
        lines.append(f"| `{group}.{name}` | `--{name.replace('_', '-')}` | `{shown}` | {f.metadata.get('help', '')} |")
    for name, default in to_dict(DatasetConfig()).items():
        shown = "" if default in (None, "") else json.dumps(default)
        help_text = DatasetConfig.__dataclass_fields__[name].metadata.get("help", "")
        lines.append(f"| `data.datasets[].{name}` | | `{shown}` | {help_text} |")
    return "\n".join(line.replace("<|", "<\\|").replace("|>", "\\|>") for line in lines)


if __name__ == "__main__":
    print(reference_markdown())
