"""Building the run's parts from its config: tokenizer, text format, encoder, data, optimizer."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from tpembed.data import (
    TEMPLATES,
    BatchBuilder,
    DatasetSpec,
    GroupedStepSampler,
    Lengths,
    ReadReport,
    Task,
    TextFormat,
    ensure_placeholder,
    sampling_probabilities,
)
from tpembed.data.store import load_dataset
from tpembed.modeling import EmbeddingObjective, Encoder, EncoderSpec, load_backbone, load_tokenizer
from tpembed.modeling.backbone import backbone_config
from tpembed.modeling.encoder import read_encoder_spec
from tpembed.modeling.token_prepending import check_layer_range, format_tp_layers
from tpembed.train.checkpoint import MODEL_DIR, load_trainer_state, resolve_checkpoint
from tpembed.train.config import Config, ConfigError, DatasetConfig, flatten, load_saved_config, to_dict

logger = logging.getLogger("tpembed")


@dataclass
class TextSetup:
    tokenizer: object
    text_format: TextFormat
    placeholder_added: bool


def init_source(config: Config) -> tuple[Path, Config] | None:
    """Stage 2: the stage-1 checkpoint in `model.init_from` and its config, validated."""
    if not config.model.init_from:
        return None
    if not Path(config.model.init_from).exists():
        raise ConfigError(f"model.init_from: {config.model.init_from} does not exist")
    try:
        checkpoint = resolve_checkpoint(config.model.init_from)
        model_dir = checkpoint / MODEL_DIR
        read_encoder_spec(model_dir)
        source_config = load_saved_config(checkpoint / "config.yaml")
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"model.init_from: {config.model.init_from} is not a tpembed checkpoint: {error}") from None
    if source_config.train.stage != 1:
        raise ConfigError(
            f"model.init_from: {checkpoint} is a stage-{source_config.train.stage} checkpoint; "
            "stage 2 starts from a stage-1 checkpoint"
        )
    return model_dir, source_config


@dataclass
class RunSetup:
    """Everything a run builds before its model: the start-up that training and `validate` share."""

    model_dir: Path | None  # weights to start from: the resumed checkpoint's, the stage-1 model's, or none
    init_config: Config | None  # the stage-1 run's config, when starting stage 2 from it
    text: TextSetup
    tp_layers: tuple[int, ...]  # checked against the backbone's layer count
    specs: list[DatasetSpec]
    report: ReadReport
    sampler: GroupedStepSampler
    batches: BatchBuilder


def setup_run(
    config: Config,
    resume: Path | None = None,
    num_processes: int = 1,
    rank: int = 0,
    main_process_first: Callable[[], AbstractContextManager] = nullcontext,
) -> RunSetup:
    """Tokenizer, template, Token Prepending layers, every dataset (validated record by record
    into its Arrow cache by the first process of each machine while the others wait), length
    checks, the sampler and this rank's batch builder. A resumed run reads the dataset versions
    its checkpoint started with."""
    init = init_source(config) if resume is None else None
    model_dir = resume / MODEL_DIR if resume else (init[0] if init else None)
    text = build_text(config, model_dir)
    tp_layers = check_tp_layers(config, model_dir)
    pinned = load_trainer_state(resume).get("datasets", {}) if resume else {}
    specs, report = build_datasets(config, text.text_format, main_process_first, pinned)
    check_lengths(config, specs, text)
    sampler = build_sampler(config, specs)
    batches = build_batches(config, specs, sampler, text, num_processes, rank)
    return RunSetup(model_dir, init[1] if init else None, text, tp_layers, specs, report, sampler, batches)


def describe(run: RunSetup, config: Config) -> list[str]:
    """What the run will do, and what reading the data changed (start-up log, `validate`)."""
    fmt = run.text.text_format
    lines = [
        f"stage {config.train.stage}: template {config.data.template}, placeholder {fmt.placeholder}, "
        f"Token Prepending layers {format_tp_layers(run.tp_layers)}"
    ]
    if run.init_config is not None:
        lines.append(f"starts from the stage-1 checkpoint {run.model_dir.parent}")
        before, after = flatten(to_dict(run.init_config)), flatten(to_dict(config))
        # the weights (and the model they are) come from init_from, whatever name_or_path says
        changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v and k != "model.name_or_path"}
        lines.append(f"config values that differ from the stage-1 run ({len(changed)}):")
        lines += [f"  {key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items())]
    for spec, probability in zip(run.specs, run.sampler.probabilities):
        lines.append(
            f"  {spec.data.name}: {spec.task.value}, {len(spec.data)} examples, global batch {spec.batch_size}, "
            f"picked at {probability:.1%} of steps"
            + (f", learning rate x {spec.lr_scale:g}" if spec.lr_scale != 1 else "")
        )
    report = run.report
    if report.dropped_empty_negatives:
        lines.append(f"warning: {report.dropped_empty_negatives} empty hard negatives will be dropped")
    if report.dropped_singleton_labels:
        lines.append(f"warning: {report.dropped_singleton_labels} classification texts have a label of their own")
    for location in report.placeholder_in_text:
        lines.append(
            f"warning: {location} contains the placeholder {fmt.placeholder!r}; it is removed from the text when "
            "rendered"
        )
    return lines


def build_text(config: Config, model_dir: Path | None = None) -> TextSetup:
    """Tokenizer (from `model_dir` when continuing a checkpoint) and the text format.

    With a template that has a placeholder slot, the placeholder is the
    configured token, else <|im_start|> when the tokenizer has it, else
    <|tp_placeholder|>, added to the tokenizer when `tp.add_placeholder` allows.
    """
    source = str(model_dir) if model_dir else (config.model.tokenizer or config.model.name_or_path)
    tokenizer = load_tokenizer(source, config.model.padding_side, config.model.trust_remote_code)
    template = TEMPLATES[config.data.template]
    placeholder, added = None, False
    if template.has_placeholder_slot:
        try:
            placeholder, added = ensure_placeholder(tokenizer, config.tp.placeholder_token, config.tp.add_placeholder)
        except ValueError as error:
            raise ConfigError(
                f"tp.placeholder_token: {error} ({source}); set tp.add_placeholder: true to add it, "
                "or choose a token it has"
            ) from None
    elif config.tp.tp_layers:
        raise ConfigError(
            f"tp.tp_layers: Token Prepending at layers {format_tp_layers(config.tp.tp_layers)} needs a template "
            "with a placeholder "
            f"(data.template: prompteol), but data.template is {config.data.template!r}"
        )
    text_format = TextFormat(
        template=template,
        placeholder=placeholder,
        append_eos=config.data.append_eos,
        prepend_bos=config.data.prepend_bos,
    )
    return TextSetup(tokenizer, text_format, added)


def build_encoder(
    config: Config,
    text: TextSetup,
    model_dir: Path | None = None,
    resuming: bool = False,
    tp_layers: tuple[int, ...] | None = None,
) -> Encoder:
    """A fresh encoder (stage 1) or one continued from `model_dir` (stage 2, resume).

    `tp_layers` are the checked layers of `setup_run` (checked here when None). With LoRA,
    a resumed run keeps its adapter trainable; a stage-2 run merges a stage-1 adapter into
    the weights and trains a fresh one on top."""
    model = config.model
    if tp_layers is None:
        tp_layers = check_tp_layers(config, model_dir)
    if model_dir is not None:
        encoder = Encoder.from_pretrained(
            model_dir,
            dtype=model.dtype,
            attn_implementation=model.attn_implementation,
            gradient_checkpointing=model.gradient_checkpointing,
            tp_layers=tp_layers,
            merge_adapter=not resuming,
        )
        if encoder.head is not None and encoder.head.output_dim != model.output_dim:
            raise ConfigError(
                f"model.output_dim: the checkpoint's head has {encoder.head.output_dim} outputs, config says "
                f"{model.output_dim}"
            )
        encoder.spec.mrl_dims = list(config.loss.mrl_dims)
    else:
        backbone = load_backbone(
            model.name_or_path,
            dtype=model.dtype,
            attn_implementation=model.attn_implementation,
            gradient_checkpointing=model.gradient_checkpointing,
            trust_remote_code=model.trust_remote_code,
            seed=config.train.seed,
        )
        spec = EncoderSpec(
            pooling=model.pooling.value,
            output_dim=model.output_dim,
            head_bias=model.head_bias,
            mrl_dims=list(config.loss.mrl_dims),
            base_model=model.name_or_path,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.train.seed)
            encoder = Encoder(backbone, spec)
        encoder.set_tp_layers(tp_layers)
    encoder.spec.placeholder_token = text.text_format.placeholder
    _fit_embeddings(encoder, len(text.tokenizer))
    lora = config.lora
    if lora.lora_rank and not encoder.has_adapter:
        added = [text.tokenizer.convert_tokens_to_ids(text.text_format.placeholder)] if text.placeholder_added else []
        encoder.add_lora(lora.lora_rank, lora.lora_alpha, lora.lora_dropout, lora.lora_target_modules, added)
    return encoder


def check_tp_layers(config: Config, model_dir: Path | None = None) -> tuple[int, ...]:
    """The TP layer set, checked against the backbone's layer count (read from its config only)."""
    source = str(model_dir) if model_dir else config.model.name_or_path
    num_layers = backbone_config(source, config.model.trust_remote_code).num_hidden_layers
    try:
        return check_layer_range(config.tp.tp_layers, num_layers)
    except ValueError as error:
        raise ConfigError(f"tp.tp_layers (--tp-layers): {error}") from None


def _fit_embeddings(encoder: Encoder, vocab_size: int) -> None:
    """Grow the embedding matrix when the tokenizer gained tokens beyond it."""
    if encoder.has_adapter:  # a resumed LoRA run: its checkpoint was saved with every row
        return
    embeddings = encoder.backbone.get_input_embeddings()
    if vocab_size > embeddings.num_embeddings:
        logger.info("resizing token embeddings %d -> %d", embeddings.num_embeddings, vocab_size)
        encoder.backbone.resize_token_embeddings(vocab_size)


def dataset_configs(config: Config) -> list[DatasetConfig]:
    """`data.train_files` (from the command line) replaces `data.datasets`."""
    if not config.data.train_files:
        return list(config.data.datasets)
    datasets = []
    for entry in config.data.train_files:
        task, _, path = entry.partition(":")
        if not path or task not in {t.value for t in Task}:
            task, path = Task.retrieval.value, entry
        datasets.append(DatasetConfig(path=path, task=Task(task)))
    return datasets


def build_datasets(
    config: Config,
    text_format: TextFormat,
    main_process_first: Callable[[], AbstractContextManager] = nullcontext,
    pinned: dict[str, str] | None = None,
) -> tuple[list[DatasetSpec], ReadReport]:
    """Every training dataset, validated (errors name file, line and field) and memory-mapped
    from its Arrow cache (data/store.py); `pinned` maps names to the caches a resumed run keeps."""
    configs = dataset_configs(config)
    if not configs:
        raise ConfigError("data.datasets: no training data; list datasets in the config or pass --train-files")
    report = ReadReport()
    specs = []
    for dataset in configs:
        name = dataset.name or Path(dataset.path).stem
        k = config.data.num_hard_negatives if dataset.num_hard_negatives is None else dataset.num_hard_negatives
        data = load_dataset(
            dataset.path,
            dataset.task,
            name,
            allow_empty_text=config.data.allow_empty_text,
            score_range=tuple(dataset.score_range) if dataset.score_range else None,
            placeholder=text_format.placeholder,
            report=report,
            required_negatives=k if config.data.hard_negative_fallback == "error" else 0,
            cache_dir=config.data.cache_dir,
            num_proc=config.data.num_proc or min(8, os.cpu_count() or 1),
            main_process_first=main_process_first,
            pinned=(pinned or {}).get(name),
            progress=config.logging.progress_bar,
            warn=logger.warning,
        )
        batch_size = dataset.batch_size or config.data.batch_size
        if len(data) < batch_size:
            raise ConfigError(
                f"dataset {name} ({dataset.path}) has {len(data)} usable examples, fewer than its global batch "
                f"size {batch_size}; lower the batch size or add data"
            )
        instruction = dataset.instruction
        if instruction is None and dataset.task is Task.retrieval:
            instruction = config.data.default_instruction
        spec = DatasetSpec(data, instruction, batch_size, num_hard_negatives=k, lr_scale=dataset.lr_scale)
        specs.append(spec)
    return specs, report


def check_lengths(config: Config, specs: list[DatasetSpec], text: TextSetup) -> None:
    """Every instruction, with the template around it, must leave room for text within the max
    lengths; found here at start-up rather than at the step that first draws the record."""
    fmt = text.text_format
    extra = int(fmt.append_eos) + int(fmt.prepend_bos)
    for spec in specs:
        instructions = {spec.instruction, *spec.data.distinct_instructions} - {None}
        sides = [(instruction, config.data.query_max_len, "data.query_max_len") for instruction in instructions]
        if spec.task is Task.retrieval:
            sides.append((None, config.data.passage_max_len, "data.passage_max_len"))
        for instruction, max_length, key in sides:
            head, _, tail = fmt.pieces("x", instruction)
            fixed = len(text.tokenizer(head + tail, add_special_tokens=False)["input_ids"]) + extra
            if fixed >= max_length:
                raise ConfigError(
                    f"{key}: {max_length} tokens leave no room for text in dataset {spec.data.name}: the template "
                    f"and instruction {instruction!r} alone take {fixed} tokens; raise {key} or shorten it"
                )


def build_sampler(config: Config, specs: list[DatasetSpec]) -> GroupedStepSampler:
    weights = [d.weight for d in dataset_configs(config)]
    retrieval = [s.task is Task.retrieval for s in specs]
    probabilities = sampling_probabilities(
        [len(s.data) for s in specs],
        alpha=config.data.sampling_alpha,
        weights=weights,
        retrieval=retrieval,
        eta_ret=config.data.eta_ret,
    )
    return GroupedStepSampler(
        [len(s.data) for s in specs],
        [s.batch_size for s in specs],
        config.train.seed,
        probabilities,
        schedule=config.data.schedule,
        groups=retrieval,
    )


def build_batches(
    config: Config, specs: list[DatasetSpec], sampler: GroupedStepSampler, text: TextSetup, world_size: int, rank: int
) -> BatchBuilder:
    return BatchBuilder(
        specs,
        sampler,
        text.tokenizer,
        text.text_format,
        Lengths(query=config.data.query_max_len, passage=config.data.passage_max_len),
        seed=config.train.seed,
        world_size=world_size,
        rank=rank,
        accumulation_steps=config.train.gradient_accumulation_steps,
        negative_fallback=config.data.hard_negative_fallback,
        pad_to_multiple_of=config.data.pad_to_multiple_of,
        packing=packing_enabled(config),
        pack_row_tokens=config.data.pack_row_tokens,
    )


# attention implementations whose masks Hugging Face builds from packed position ids
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def packing_enabled(config: Config) -> bool:
    """data.packing, unless the attention implementation cannot read packed sequences."""
    if not config.data.packing:
        return False
    if config.model.pooling.value != "last_token":
        raise ConfigError("data.packing: packed batches support model.pooling: last_token only")
    if config.model.attn_implementation not in PACKING_ATTENTION:
        logger.warning(
            "data.packing: attention implementation %r cannot separate packed texts; falling back to padded "
            "batches (use one of %s)",
            config.model.attn_implementation,
            ", ".join(PACKING_ATTENTION),
        )
        return False
    return True


def build_objective(config: Config) -> EmbeddingObjective:
    loss = config.loss
    return EmbeddingObjective(
        mrl_dims=loss.mrl_dims,
        mrl_weights=loss.mrl_weights,
        temperature=loss.temperature,
        cosent_temperature=loss.cosent_temperature,
        query_query_negatives=loss.query_query_negatives,
        false_negative_margin=loss.false_negative_margin,
    )


def build_optimizer(config: Config, encoder: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights (1-D tensors)."""
    decay, no_decay = [], []
    for parameter in encoder.parameters():
        if parameter.requires_grad:
            # a parameter built under DeepSpeed ZeRO-3's zero.Init is a flat partition: use its real shape
            ndim = len(getattr(parameter, "ds_shape", parameter.shape))
            (no_decay if ndim < 2 else decay).append(parameter)
    optim = config.optim
    # the fused kernel needs floating-point tensors on a device it supports; else per-tensor
    fused = optim.fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.learning_rate,
        betas=(optim.adam_beta1, optim.adam_beta2),
        eps=optim.adam_epsilon,
        fused=fused or None,
    )


def build_scheduler(config: Config, optimizer: torch.optim.Optimizer):
    names = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
    return transformers.get_scheduler(
        names[config.optim.lr_scheduler],
        optimizer,
        num_warmup_steps=config.optim.warmup_steps,
        num_training_steps=config.train.max_steps,
    )
