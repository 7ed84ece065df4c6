"""The one training loop, shared by stage 1 and stage 2. It owns every accelerator call."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from tqdm.auto import tqdm

from data import StepMicroBatches
from modeling.distributed import all_finite

from . import build
from .checkpoint import (
    DEEPSPEED_DIR,
    MODEL_DIR,
    latest_checkpoint,
    load_optimizer_state,
    load_rng,
    load_trainer_state,
    prune_checkpoints,
    remove_stale_staging,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import Config, ConfigError, config_yaml, flatten, save_config, to_dict
from .embedder import Embedder, TextConfig
from .eval import embedder_encode_fn, evaluate, flat_metrics, format_table, load_beir, load_sts
from .gradcache import cached_micro_step
from .telemetry import FlopCounter

logger = logging.getLogger("tpembed")


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient norm."""


def build_accelerator(config: Config) -> Accelerator:
    use_cuda = torch.cuda.is_available() and not config.train.cpu
    mixed_precision = config.train.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if use_cuda and torch.cuda.is_bf16_supported() else "no"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # CPU processes talk over gloo (DeepSpeed too, which would otherwise ask for a GPU backend)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not use_cuda else []
    trackers = [t for t in config.logging.report_to if t != "none"]
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_MODE", config.logging.wandb_mode)
        os.environ.setdefault("WANDB_SILENT", "true")
    output_dir = Path(config.train.output_dir)
    return Accelerator(
        # DeepSpeed picks its device itself (accelerate ignores it when cpu=True)
        cpu=not use_cuda and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true",
        mixed_precision=mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=handlers,
    )


def train(config: Config) -> Path:
    """Run (or resume) training as configured; returns the newest checkpoint."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = build_accelerator(config)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    run_dir = Path(config.train.output_dir)
    accelerator.wait_for_everyone()  # every process must see the same checkpoints

    resume = _resume_checkpoint(config, run_dir)
    init = build.init_source(config)
    model_dir = resume / MODEL_DIR if resume else (init[0] if init else None)
    if init and not resume:
        _log_stage_diff(init[1], config)

    text = build.build_text(config, model_dir)
    encoder = build.build_encoder(config, text, model_dir, resuming=resume is not None)
    specs, report = build.build_datasets(config, text.text_format)
    build.check_lengths(config, specs, text)
    _log_data(specs, report, text)
    sampler = build.build_sampler(config, specs)
    batches = build.build_batches(config, specs, sampler, text, accelerator.num_processes, accelerator.process_index)
    objective = build.build_objective(config)
    optimizer = build.build_optimizer(config, encoder)
    scheduler = build.build_scheduler(config, optimizer)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        _configure_deepspeed(accelerator, config, specs, encoder)
    encoder, optimizer = accelerator.prepare(encoder, optimizer)

    start_step = 0
    if resume:
        state = load_trainer_state(resume)
        optimizer_state = load_optimizer_state(resume)
        if deepspeed:  # the engine's own (partitioned) optimizer state, read by DeepSpeed
            encoder.load_checkpoint(str(resume / DEEPSPEED_DIR), tag="state", load_lr_scheduler_states=False)
        else:
            optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        if state["num_processes"] != accelerator.num_processes:
            logger.warning(
                "resuming a %d-process run with %d processes: the global batches and their order are unchanged "
                "(the sampler does not depend on the process count); RNG states come from rank 0",
                state["num_processes"],
                accelerator.num_processes,
            )
        if not load_rng(resume, accelerator.process_index):
            load_rng(resume, 0)
        start_step = state["step"]
        logger.info("resumed from %s at step %d", resume, start_step)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        remove_stale_staging(run_dir)
        # the logs describe the run as continued: steps after the checkpoint are redone
        for log in ("metrics.jsonl", "eval.jsonl"):
            truncate_log(run_dir / log, start_step)
    accelerator.init_trackers(
        config.logging.project,
        config={k: str(v) if isinstance(v, (list, type(None))) else v for k, v in flatten(to_dict(config)).items()},
        init_kwargs={"wandb": {"name": config.logging.run_name or run_dir.name, "dir": str(run_dir)}},
    )

    text_config = TextConfig(text.text_format, config.data.query_max_len, config.data.passage_max_len)

    def write_model(directory: Path) -> None:
        state_dict = accelerator.get_state_dict(encoder)
        if accelerator.is_main_process:
            accelerator.unwrap_model(encoder).save_pretrained(directory, text.tokenizer, state_dict=state_dict)
            text_config.save(directory)

    def checkpoint(step: int) -> Path:
        sampler.step = step
        trainer_state = {
            "step": step,
            "stage": config.train.stage,
            "num_processes": accelerator.num_processes,
            "sampler": sampler.state_dict(),
        }
        path = save_checkpoint(
            accelerator,
            run_dir,
            step,
            write_model=write_model,
            optimizer=optimizer,
            scheduler=scheduler,
            trainer_state=trainer_state,
            config_yaml=config_yaml(config),
            deepspeed_engine=encoder if deepspeed else None,
        )
        if accelerator.is_main_process:
            prune_checkpoints(run_dir, config.train.keep_last)
        logger.info("checkpoint %s", path)
        return path

    # under ZeRO-3 the parameters are partitioned: every rank must run the evaluation's forwards
    zero3 = deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3
    evaluating = accelerator.is_main_process or zero3
    dev_sets = _load_dev_sets(config) if evaluating else []
    dev_data = {task.name: data for task, data in dev_sets}

    def dev_evaluation(step: int) -> None:
        """Dev sets on the main process while the others wait (all ranks under ZeRO-3); scores
        go to the trackers."""
        if evaluating:
            model = accelerator.unwrap_model(encoder)
            embedder = Embedder(model, text.tokenizer, text_config, device=accelerator.device)
            encode = embedder_encode_fn(embedder, config.eval.eval_batch_size)
            with accelerator.autocast():
                results = evaluate(encode, [task for task, _ in dev_sets], model.spec.mrl_dims, dev_data)
            model.train()
            if accelerator.is_main_process:
                metrics = flat_metrics(results)
                accelerator.log(metrics, step=step)
                with (run_dir / "eval.jsonl").open("a") as handle:
                    handle.write(json.dumps({"step": step, **metrics}) + "\n")
                logger.info("step %d dev evaluation:\n%s", step, format_table(results))
        accelerator.wait_for_everyone()

    accumulation = config.train.gradient_accumulation_steps
    max_steps = config.train.max_steps
    loader = torch.utils.data.DataLoader(
        StepMicroBatches(batches),
        batch_size=None,
        sampler=range(start_step * accumulation, max_steps * accumulation),
        num_workers=config.data.num_workers,
        persistent_workers=False,
    )
    micro_batches = iter(loader)
    device = accelerator.device
    grad_cache_rows = config.train.grad_cache_rows or (None if config.train.grad_cache_tokens else 32)
    flops = FlopCounter(accelerator.unwrap_model(encoder).backbone.config, config.logging.peak_tflops, device)

    def update(contributed: int) -> float:
        """Clip and apply the accumulated gradients; returns the gradient norm (NaN: skipped)."""
        if deepspeed:
            # DeepSpeed owns clipping; a micro-batch with a non-finite loss was left out of the
            # update, and a step where every micro-batch was is skipped
            if not contributed:
                return float("nan")
            encoder.step()
            norm = encoder.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        norm = float(accelerator.clip_grad_norm_(encoder.parameters(), config.optim.max_grad_norm or float("inf")))
        # fp16's grad scaler skips non-finite steps itself and must see every step
        if contributed == accumulation and (math.isfinite(norm) or accelerator.scaler is not None):
            optimizer.step()
        else:
            norm = float("nan")
        optimizer.zero_grad()
        return norm

    progress = tqdm(
        total=max_steps,
        initial=start_step,
        desc=f"stage {config.train.stage}",
        disable=not (accelerator.is_main_process and config.logging.progress_bar),
        dynamic_ncols=True,
    )
    metrics_file = run_dir / "metrics.jsonl"
    consecutive_nonfinite = 0
    window = _Window()

    encoder.train()
    for step in range(start_step, max_steps):
        step_start = time.perf_counter()
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step's update uses
        sums = None
        tokens = examples = 0
        task = dataset = None
        squared_lengths = 0
        contributed = 0  # micro-batches whose gradients went into this step
        for micro in range(accumulation):
            batch = next(micro_batches)
            task, dataset = batch["task"], batch["dataset"]
            last_micro = micro == accumulation - 1

            def backward(piece: torch.Tensor, last_piece: bool) -> None:
                piece = piece / accumulation
                if deepspeed:  # unmanaged accumulation: the engine reduces at step()
                    encoder.backward(piece, scale_wrt_gas=False)
                    return
                with nullcontext() if last_micro and last_piece else accelerator.no_sync(encoder):
                    accelerator.backward(piece)

            if config.train.grad_cache:
                loss, per_dim, produced = cached_micro_step(
                    encoder, objective, batch, device, backward,
                    max_rows=grad_cache_rows, token_budget=config.train.grad_cache_tokens,
                    padding_side=config.model.padding_side,
                )  # fmt: skip
            else:
                loss, per_dim = micro_step_loss(encoder, objective, batch, device)
                produced = all_finite(loss)
                if produced:
                    backward(loss, True)
            contributed += produced
            values = torch.stack([loss.detach().float()] + [v.float() for v in per_dim.values()])
            sums = values if sums is None else sums + values
            tokens += batch["num_tokens"]
            examples += batch["num_examples"]
            squared_lengths += batch["squared_lengths"]
        grad_norm = update(contributed)
        counts = accelerator.reduce(
            torch.tensor([tokens, examples, squared_lengths], device=device, dtype=torch.float64), "sum"
        )
        means = accelerator.reduce(sums.to(device) / accumulation, "mean")
        loss_value = float(means[0])

        if math.isfinite(grad_norm) and math.isfinite(loss_value):
            consecutive_nonfinite = 0
            scheduler.step()
        else:
            consecutive_nonfinite += 1
            logger.warning(
                "step %d: non-finite loss (%s) or gradient norm (%s); update skipped (%d in a row, limit %d)",
                step + 1,
                loss_value,
                grad_norm,
                consecutive_nonfinite,
                config.train.max_nonfinite_steps,
            )
            if consecutive_nonfinite > config.train.max_nonfinite_steps:
                accelerator.end_training()
                raise NonFiniteError(
                    f"{consecutive_nonfinite} consecutive steps with a non-finite loss or gradient norm; stopped at "
                    f"step {step + 1}. The last good checkpoint is {latest_checkpoint(run_dir)}. Lower the learning "
                    "rate, check the data, or use bf16 instead of fp16."
                )

        done = step + 1
        elapsed = time.perf_counter() - step_start
        window.add(elapsed, float(counts[1]), float(counts[0]), flops.step(float(counts[0]), float(counts[2])))
        record = {
            "step": done,
            "task": task,
            "dataset": dataset,
            "loss": loss_value,
            **{f"loss_dim_{dim}": float(v) for dim, v in zip(per_dim, means[1:])},
            "lr": learning_rate,
            "grad_norm": grad_norm,
            "step_seconds": elapsed,
        }
        log_now = done % config.logging.log_every == 0 or done == max_steps
        if log_now:
            record.update(window.rates(flops.peak, accelerator.num_processes), peak_memory_mb=_peak_memory_mb())
            window = _Window()
        if accelerator.is_main_process:
            with metrics_file.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if log_now:
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=done)
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}", data=dataset)
        if config.eval.eval_every and (done % config.eval.eval_every == 0 or done == max_steps):
            dev_evaluation(done)
        # a skipped step leaves the weights as they were; the next good step saves
        if (done % config.train.save_every == 0 and not consecutive_nonfinite) or done == max_steps:
            checkpoint(done)

    progress.close()
    if start_step >= max_steps:
        logger.info("nothing to do: the run already reached max_steps=%d", max_steps)
    accelerator.end_training()
    return latest_checkpoint(run_dir) or run_dir


def micro_step_loss(encoder, objective, batch: dict, device) -> tuple[torch.Tensor, dict]:
    """Embed both sides of a micro-batch and compute its task loss."""
    anchors = encoder(**_to_device(batch["anchors"], device))
    candidates = encoder(**_to_device(batch["candidates"], device))
    metadata = {
        key: batch[key].to(device)
        for key in ("scores", "anchor_labels", "candidate_labels", "candidate_text_ids")
        if key in batch
    }
    return objective(batch["task"], anchors, candidates, **metadata)


def _to_device(tensors: dict, device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in tensors.items()}


class _Window:
    """Throughput over the steps since the last log."""

    def __init__(self):
        self.seconds = self.examples = self.tokens = self.flops = 0.0

    def add(self, seconds: float, examples: float, tokens: float, flops: float) -> None:
        self.seconds += seconds
        self.examples += examples
        self.tokens += tokens
        self.flops += flops

    def rates(self, peak_tflops: float | None, num_devices: int) -> dict:
        seconds = max(self.seconds, 1e-9)
        rates = {
            "samples_per_s": self.examples / seconds,
            "tokens_per_s": self.tokens / seconds,  # real tokens: padding excluded
            "tflops_per_device": self.flops / seconds / num_devices / 1e12,
        }
        if peak_tflops:
            rates["mfu"] = rates["tflops_per_device"] / peak_tflops
        return rates


def _load_dev_sets(config: Config) -> list:
    """(task, loaded data) of every dev set, capped at eval_limit examples."""
    loaded = []
    for task in config.eval.eval_tasks:
        task = dataclasses.replace(task, limit=min(filter(None, [task.limit, config.eval.eval_limit]), default=None))
        loaded.append((task, load_sts(task) if task.type == "sts" else load_beir(task)))
    return loaded


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines of a JSONL step log after `step` (atomically)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    staging = path.with_suffix(".tmp")
    staging.write_text("".join(line + "\n" for line in kept))
    os.replace(staging, path)


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _configure_deepspeed(accelerator, config: Config, specs, encoder) -> None:
    """Fill the DeepSpeed config for the loop's own accumulation: every backward accumulates
    (GradCache pieces and micro-batches alike) and `engine.step()` is the boundary."""
    values = accelerator.state.deepspeed_plugin.deepspeed_config
    per_device = max(
        1, min(s.batch_size for s in specs) // (accelerator.num_processes * config.train.gradient_accumulation_steps)
    )
    values["train_micro_batch_size_per_gpu"] = per_device
    values["train_batch_size"] = per_device * accelerator.num_processes
    values["gradient_accumulation_steps"] = 1
    values["managed_gradient_accumulation"] = False
    if values.get("gradient_clipping", "auto") == "auto":
        values["gradient_clipping"] = config.optim.max_grad_norm
    # the sizes accelerate derives from a Hugging Face model's config (ours is composed)
    hidden = accelerator.unwrap_model(encoder).backbone.config.hidden_size
    zero = values.get("zero_optimization", {})
    for key, value in (
        ("reduce_bucket_size", hidden * hidden),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
        ("stage3_param_persistence_threshold", 10 * hidden),
    ):
        if zero.get(key) == "auto":
            zero[key] = value


def _resume_checkpoint(config: Config, run_dir: Path) -> Path | None:
    if not config.train.resume_from:
        existing = latest_checkpoint(run_dir)
        if existing is not None:
            raise ConfigError(
                f"train.output_dir: {run_dir} already holds checkpoints (newest {existing.name}); pass "
                "--resume-from auto to continue that run, or choose another --output-dir"
            )
        return None
    if config.train.resume_from == "auto":
        found = latest_checkpoint(run_dir)
        if found is None:
            logger.info("resume_from=auto: no complete checkpoint in %s, starting fresh", run_dir)
        return found
    return resolve_checkpoint(config.train.resume_from)


def _log_stage_diff(source: Config, config: Config) -> None:
    before, after = flatten(to_dict(source)), flatten(to_dict(config))
    changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    logger.info("config values that differ from the stage-1 run (%d):", len(changed))
    for key, (old, new) in sorted(changed.items()):
        logger.info("  %s: %r -> %r", key, old, new)


def _log_data(specs, report, text) -> None:
    for spec in specs:
        logger.info(
            "dataset %s: %s, %d examples, global batch %d",
            spec.data.name,
            spec.task.value,
            len(spec.data),
            spec.batch_size,
        )
    if report.dropped_empty_negatives:
        logger.warning("dropped %d empty hard negatives", report.dropped_empty_negatives)
    if report.dropped_singleton_labels:
        logger.warning("dropped %d classification texts whose label no other text has", report.dropped_singleton_labels)
    if report.placeholder_in_text:
        logger.warning(
            "%d texts contain the placeholder %r; it is removed from user text (first: %s)",
            len(report.placeholder_in_text),
            text.text_format.placeholder,
            report.placeholder_in_text[0],
        )
