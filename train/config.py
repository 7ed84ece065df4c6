"""Typed run configuration: defaults <- YAML files (--config) <- command-line flags.

Every field is declared once, with its help text, in one of the groups below.
Each becomes a kebab-case flag (`learning_rate` -> `--learning-rate`); field
names are unique across groups so a flag never needs its group's name. Unknown
keys and wrong types fail at load time with the key's dotted name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml

from data import TEMPLATES, Task
from modeling import DEFAULT_MRL_DIMS, TINY_QWEN3, Pooling


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


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
        "stage 2: a stage-1 run directory or checkpoint to start from (backbone, head and tokenizer)", None
    )


@dataclass
class TokenPrependingConfig:
    tp_layers: str = _help(
        "decoder layers (0-based) with Token Prepending: '1-7' (inclusive), '1,3,5', or 'none'", "none"
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
    lora_rank: int = _help("LoRA rank through peft; 0 trains every parameter", 0)
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
    weight: float = _help("multiplies this dataset's sampling mass n ** alpha", 1.0)
    batch_size: int | None = _help("global batch size of this dataset; default: data.batch_size", None)
    num_hard_negatives: int | None = _help("negatives per anchor; default: data.num_hard_negatives", None)
    score_range: list[float] | None = _help("sts: [min, max]; scores outside fail validation", None)


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
    batch_size: int = _help("global batch size: anchors per optimizer step over all processes", 256)
    num_hard_negatives: int = _help("hard negatives per query (sampled from its list each epoch)", 4)
    hard_negative_fallback: Literal["repeat", "random", "error"] = _help(
        "when a record has fewer negatives: repeat (sample with replacement; random passages if none), "
        "random (fill with other records' passages), error",
        "repeat",
    )
    query_max_len: int = _help("max tokens of queries and of both sides of symmetric tasks", 256)
    passage_max_len: int = _help("max tokens of retrieval passages", 1536)
    sampling_alpha: float = _help("dataset i is picked with probability proportional to n_i ** alpha", 0.5)
    eta_ret: float | None = _help("stage 2: share of steps given to retrieval datasets together (0.72)", None)
    append_eos: bool = _help("append the end-of-text token as the pooled last token (stage 1)", True)
    prepend_bos: bool = _help("start every sequence with the tokenizer's BOS token", False)
    allow_empty_text: bool = _help("render empty queries/positives as 'Null' instead of failing", False)
    num_workers: int = _help("DataLoader worker processes that build and tokenise batches ahead", 0)
    pad_to_multiple_of: int | None = _help("pad sequence lengths to a multiple of this (8 helps tensor cores)", None)
    packing: bool = _help(
        "padding-free batches: texts packed into one row with per-text position ids (needs an attention "
        "implementation that reads packed position ids: sdpa, eager, flash_attention_2/3)",
        False,
    )


@dataclass
class LossConfig:
    temperature: float = _help("InfoNCE temperature tau", 0.02)
    cosent_temperature: float = _help("CoSENT temperature (0.05 is the common CoSENT value)", 0.02)
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
    max_steps: int = _help("optimizer steps", 32000)
    seed: int = _help("seed of initialisation and of the data order", 42)
    gradient_accumulation_steps: int = _help("micro-steps per optimizer step (saves memory; does not add negatives)", 1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _help("auto: bf16 on GPUs that support it", "auto")
    save_every: int = _help("checkpoint every N steps (and at the end)", 1000)
    keep_last: int = _help("checkpoints kept; older ones are pruned after a new one is complete", 3)
    resume_from: str | None = _help("a checkpoint directory, or 'auto' for the newest complete one", None)
    max_nonfinite_steps: int = _help(
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
    log_every: int = _help("log metrics every N steps", 10)
    report_to: list[str] = _help("trackers: tensorboard, wandb (or none)", factory=lambda: ["tensorboard"])
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
    type: Literal["sts", "retrieval"] = _help(
        "sts: pairs with scores (Spearman); retrieval: BEIR layout (nDCG@10)", "sts"
    )
    path: str = _help("sts: JSONL of {sentence1, sentence2, score}; retrieval: BEIR directory", "")
    instruction: str | None = _help("query-side instruction (sts: both sides)", None)
    limit: int | None = _help("evaluate only the first N pairs / queries", None)
    split: str = _help("retrieval: qrels/<split>.tsv", "test")


@dataclass
class EvalConfig:
    eval_tasks: list[EvalTaskConfig] = _help("dev sets evaluated during training", factory=list)
    eval_every: int = _help("evaluate every N steps on the main process (0: never)", 0)
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


# What each stage changes by default (METHOD.md section 2); the entry scripts pass these.
STAGE_DEFAULTS = {
    1: {"train": {"stage": 1}},
    2: {
        "train": {"stage": 2, "output_dir": "runs/stage2", "max_steps": 8000},
        "optim": {"learning_rate": 2e-5},
        "data": {"template": "prompteol", "append_eos": False, "eta_ret": 0.72},
        "tp": {"tp_layers": "1-7"},
    },
}


# ---- type checking ------------------------------------------------------------------


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert a YAML value against a field annotation; ConfigError names `key`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(annotation, value, key)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        try:
            return annotation(value)
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(m.value for m in annotation)}") from None
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def _build(cls, values: dict, prefix: str):
    hints = _hints(cls)
    unknown = [k for k in values if k not in hints]
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key '{where}' (known in {prefix or 'the top level'}: {', '.join(hints)})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def _from_string(text: str, annotation: Any, key: str) -> Any:
    """Parse a command-line string into the field's type (then checked by _convert)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        return _from_string(text, [a for a in args if a is not type(None)][0], key)
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    return text


# ---- merging and loading --------------------------------------------------------------


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def to_dict(config: Config) -> dict:
    """Plain YAML-able dict (enums as their values)."""

    def plain(value):
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def from_dict(values: dict, source: str = "config") -> Config:
    try:
        return validate(_build(Config, values, ""))
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config groups")
    return values


def leaf_fields() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """{field name: (group, field, annotation)} for every flag-able field."""
    leaves = {}
    for group, cls in _hints(Config).items():
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("datasets", "eval_tasks"):
                continue
            if f.name in leaves:
                raise RuntimeError(f"config field name {f.name!r} is used by two groups")
            leaves[f.name] = (group, f, hints[f.name])
    return leaves


def build_parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable; later wins)")
    groups = {}
    for name, (group, f, annotation) in leaf_fields().items():
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        is_list = typing.get_origin(annotation) is list or any(
            typing.get_origin(a) is list for a in typing.get_args(annotation)
        )
        groups[group].add_argument(
            "--" + name.replace("_", "-"),
            dest=f"{group}.{name}",
            nargs="+" if is_list else None,
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=f.metadata.get("help", ""),
        )
    return parser


def load_config(argv: list[str] | None = None, base: dict | None = None, description: str = "") -> Config:
    """defaults <- `base` (a stage's defaults) <- each --config YAML <- flags."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    values: dict = dict(base or {})
    sources = ["defaults"]
    for path in args.config:
        values = _merge(values, read_yaml(path))
        sources.append(str(path))
    leaves = leaf_fields()
    flags: dict = {}
    for dest, raw in vars(args).items():
        if dest == "config":
            continue
        group, name = dest.split(".")
        annotation = leaves[name][2]
        key = f"--{name.replace('_', '-')}"
        if isinstance(raw, list):
            inner = [a for a in typing.get_args(annotation) if a is not type(None)]
            list_type = inner[0] if typing.get_origin(annotation) is not list else annotation
            item_type = typing.get_args(list_type)[0]
            if len(raw) == 1 and raw[0].lower() in ("none", "null") and type(None) in typing.get_args(annotation):
                value = None
            elif len(raw) == 1 and raw[0] == "[]":
                value = []
            else:
                value = [_from_string(item, item_type, key) for item in raw]
        else:
            value = _from_string(raw, annotation, key)
        flags.setdefault(group, {})[name] = value
    values = _merge(values, flags)
    return from_dict(values, source=" <- ".join(sources + (["flags"] if flags else [])))


def validate(config: Config) -> Config:
    """Checks that need more than one field; each error names its key."""
    from modeling.head import validate_mrl_dims

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
    positive = {
        "data.batch_size": config.data.batch_size,
        "data.query_max_len": config.data.query_max_len,
        "data.passage_max_len": config.data.passage_max_len,
        "train.max_steps": config.train.max_steps,
        "train.gradient_accumulation_steps": config.train.gradient_accumulation_steps,
        "train.save_every": config.train.save_every,
        "train.keep_last": config.train.keep_last,
        "logging.log_every": config.logging.log_every,
        "loss.temperature": config.loss.temperature,
        "loss.cosent_temperature": config.loss.cosent_temperature,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if config.lora.lora_rank < 0:
        raise ConfigError(f"lora.lora_rank: must be >= 0, got {config.lora.lora_rank}")
    if config.data.num_hard_negatives < 0:
        raise ConfigError(f"data.num_hard_negatives: must be >= 0, got {config.data.num_hard_negatives}")
    if config.data.eta_ret is not None and not 0 <= config.data.eta_ret <= 1:
        raise ConfigError(f"data.eta_ret: must lie in [0, 1], got {config.data.eta_ret}")
    for i, dataset in enumerate(config.data.datasets):
        if not dataset.path:
            raise ConfigError(f"data.datasets[{i}].path: required")
        if dataset.weight < 0:
            raise ConfigError(f"data.datasets[{i}].weight: must be >= 0, got {dataset.weight}")
        if dataset.score_range is not None and (
            len(dataset.score_range) != 2 or dataset.score_range[0] > dataset.score_range[1]
        ):
            raise ConfigError(f"data.datasets[{i}].score_range: expected [min, max], got {dataset.score_range}")
    for i, task in enumerate(config.eval.eval_tasks):
        if not task.name or not task.path:
            raise ConfigError(f"eval.eval_tasks[{i}]: needs a name and a path")
    if config.eval.eval_every < 0:
        raise ConfigError(f"eval.eval_every: must be >= 0, got {config.eval.eval_every}")
    for tracker in config.logging.report_to:
        if tracker not in ("tensorboard", "wandb", "none"):
            raise ConfigError(f"logging.report_to: unknown tracker {tracker!r} (tensorboard, wandb, none)")
    return config


def config_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def load_eval_tasks(path: str | Path) -> list[EvalTaskConfig]:
    """A YAML file with a top-level `tasks:` list of evaluation tasks (configs/eval/)."""
    values = read_yaml(path)
    unknown = [k for k in values if k != "tasks"]
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (an eval file holds only 'tasks')")
    tasks = _convert(values.get("tasks", []), list[EvalTaskConfig], f"{path}: tasks")
    for i, task in enumerate(tasks):
        if not task.name or not task.path:
            raise ConfigError(f"{path}: tasks[{i}] needs a name and a path")
    return tasks


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(config))


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
    """The config reference table for the README (`python -m train.config`)."""
    lines = ["| key | flag | default | meaning |", "|---|---|---|---|"]
    defaults = to_dict(Config())
    for name, (group, f, _) in leaf_fields().items():
        default = defaults[group][name]
        shown = "" if default is None else json.dumps(default, ensure_ascii=False)
        lines.append(f"| `{group}.{name}` | `--{name.replace('_', '-')}` | `{shown}` | {f.metadata.get('help', '')} |")
    for f in dataclasses.fields(DatasetConfig):
        default = f.default.value if isinstance(f.default, Enum) else f.default
        shown = "" if default is None else json.dumps(default)
        lines.append(f"| `data.datasets[].{f.name}` | | `{shown}` | {f.metadata.get('help', '')} |")
    return "\n".join(line.replace("<|", "<\\|").replace("|>", "\\|>") for line in lines)


if __name__ == "__main__":
    print(reference_markdown())
