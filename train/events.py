"""What happens around the steps: the run directory, metrics and trackers, throughput,
dev evaluation, checkpoints, and the guard against non-finite steps."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tpembed.data import MicroBatch
from tpembed.data.store import source_changed
from tpembed.train.checkpoint import (
    latest_checkpoint,
    prune_checkpoints,
    remove_stale_staging,
    save_checkpoint,
)
from tpembed.train.config import Config, ConfigError, config_yaml, flatten, save_config, to_dict
from tpembed.train.embedder import Embedder, TextConfig
from tpembed.train.eval import embedder_encode_fn, evaluate, flat_metrics, format_table, load_task_data
from tpembed.train.telemetry import FlopCounter

logger = logging.getLogger("tpembed")

# tracker -> the module it needs and the extra that installs it
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient norm."""


def trackers(config: Config) -> list[str]:
    """The trackers to log to. 'auto' is TensorBoard when it is installed; a tracker asked
    for by name must be installed."""
    chosen = []
    for name in config.logging.report_to:
        if name == "auto":
            if importlib.util.find_spec("tensorboard") is not None:
                chosen.append("tensorboard")
            continue
        if name != "none":
            module, extra = TRACKER_PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"logging.report_to: {name} is not installed; pip install 'tpembed[{extra}]', or pass "
                    "--report-to none (metrics.jsonl is written either way)"
                )
            chosen.append(name)
    if "wandb" in chosen:
        os.environ.setdefault("WANDB_MODE", config.logging.wandb_mode)
        os.environ.setdefault("WANDB_SILENT", "true")
    return list(dict.fromkeys(chosen))


def open_run_dir(accelerator, config: Config, run_dir: Path, start_step: int) -> None:
    """Config, clean staging and the step logs of a run starting (or continuing) at `start_step`."""
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


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines of a JSONL step log after `step` (atomically)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    staging = path.with_suffix(".tmp")
    staging.write_text("".join(line + "\n" for line in kept))
    os.replace(staging, path)


@dataclass
class StepResult:
    """One optimizer step, reduced over ranks."""

    loss: float
    per_dim: dict[int, float]
    mean_cosine: float  # between the anchors of a micro-batch: near 1 means the embeddings collapsed
    grad_norm: float
    learning_rate: float
    task: str
    dataset: str
    tokens: float  # real tokens of the global batch, padding excluded
    examples: float
    squared_lengths: float
    seconds: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.grad_norm) and math.isfinite(self.loss)

    @classmethod
    def reduced(cls, engine, means, dims, counts, grad_norm, learning_rate, batch: MicroBatch, start: float):
        """Means of the losses (and of the mean cosine, last in `means`) and sums of the counts over ranks."""
        accelerator = engine.accelerator
        counts = accelerator.reduce(counts.to(accelerator.device), "sum")
        means = accelerator.reduce(means.to(accelerator.device), "mean")
        return cls(
            loss=float(means[0]),
            per_dim={dim: float(value) for dim, value in zip(dims, means[1:-1])},
            mean_cosine=float(means[-1]),
            grad_norm=grad_norm,
            learning_rate=learning_rate,
            task=batch.task.value,
            dataset=batch.dataset,
            tokens=float(counts[0]),
            examples=float(counts[1]),
            squared_lengths=float(counts[2]),
            seconds=time.perf_counter() - start,
        )


class ThroughputWindow:
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


class DevEvaluation:
    """The dev sets, on the main process while the others wait (every rank when the parameters
    are partitioned over ranks); scores go to the trackers and eval.jsonl."""

    def __init__(self, accelerator, config: Config, engine, text_config: TextConfig, tokenizer, run_dir: Path):
        self.accelerator, self.engine, self.run_dir = accelerator, engine, run_dir
        self.text_config, self.tokenizer = text_config, tokenizer
        self.batch_size = config.eval.eval_batch_size
        self.evaluating = accelerator.is_main_process or engine.every_rank_evaluates
        self.tasks = []
        for task in config.eval.eval_tasks if self.evaluating else []:
            limit = min(filter(None, [task.limit, config.eval.eval_limit]), default=None)
            self.tasks.append(dataclasses.replace(task, limit=limit))
        self.data = {task.name: load_task_data(task) for task in self.tasks}

    def __call__(self, step: int) -> None:
        if self.evaluating:
            model = self.engine.unwrapped
            embedder = Embedder(model, self.tokenizer, self.text_config, device=self.accelerator.device)
            with self.accelerator.autocast():
                results = evaluate(embedder_encode_fn(embedder, self.batch_size), self.tasks, model.spec.mrl_dims,
                                   self.data)  # fmt: skip
            model.train()
            if self.accelerator.is_main_process:
                metrics = flat_metrics(results)
                self.accelerator.log(metrics, step=step)
                with (self.run_dir / "eval.jsonl").open("a") as handle:
                    handle.write(json.dumps({"step": step, **metrics}) + "\n")
                logger.info("step %d dev evaluation:\n%s", step, format_table(results))
        self.accelerator.wait_for_everyone()


class StepEvents:
    """After every step: the metrics line, trackers and progress bar; the non-finite guard;
    dev evaluation and checkpoints on their schedules."""

    def __init__(self, accelerator, config: Config, engine, run, run_dir: Path, start_step: int):
        self.accelerator, self.config, self.engine, self.run, self.run_dir = accelerator, config, engine, run, run_dir
        self.text_config = TextConfig(run.text.text_format, config.data.query_max_len, config.data.passage_max_len)
        self.dev_evaluation = DevEvaluation(accelerator, config, engine, self.text_config, run.text.tokenizer, run_dir)
        self.flops = FlopCounter(engine.unwrapped.backbone.config, config.logging.peak_tflops, accelerator.device)
        self.window = ThroughputWindow()
        self.consecutive_nonfinite = 0
        self.changed: set[str] = set()  # datasets whose source changed during the run (warned once)
        self.progress = tqdm(
            total=config.train.max_steps,
            initial=start_step,
            desc=f"stage {config.train.stage}",
            disable=not (accelerator.is_main_process and config.logging.progress_bar),
            dynamic_ncols=True,
        )

    def after_step(self, step: int, result: StepResult) -> None:
        self._guard(step, result)
        self._log(step, result)
        config = self.config
        last = step == config.train.max_steps
        if config.eval.eval_every and (step % config.eval.eval_every == 0 or last):
            self.dev_evaluation(step)
        # a skipped step leaves the weights as they were; the next good step saves
        if (step % config.train.save_every == 0 and not self.consecutive_nonfinite) or last:
            self.checkpoint(step)

    def close(self) -> None:
        self.progress.close()

    def _guard(self, step: int, result: StepResult) -> None:
        """The scheduler advances with good steps; too many bad ones in a row stop the run."""
        if result.finite:
            self.consecutive_nonfinite = 0
            self.engine.scheduler.step()
            return
        self.consecutive_nonfinite += 1
        limit = self.config.train.max_nonfinite_steps
        logger.warning(
            "step %d: non-finite loss (%s) or gradient norm (%s); update skipped (%d in a row, limit %d)",
            step, result.loss, result.grad_norm, self.consecutive_nonfinite, limit,
        )  # fmt: skip
        if self.consecutive_nonfinite > limit:
            self.accelerator.end_training()
            raise NonFiniteError(
                f"{self.consecutive_nonfinite} consecutive steps with a non-finite loss or gradient norm; stopped "
                f"at step {step}. The last good checkpoint is {latest_checkpoint(self.run_dir)}. Lower the "
                "learning rate, check the data, or use bf16 instead of fp16."
            )

    def _log(self, step: int, result: StepResult) -> None:
        self.window.add(result.seconds, result.examples, result.tokens,
                        self.flops.step(result.tokens, result.squared_lengths))  # fmt: skip
        record = {
            "step": step,
            "task": result.task,
            "dataset": result.dataset,
            "loss": result.loss,
            **{f"loss_dim_{dim}": value for dim, value in result.per_dim.items()},
            "mean_cosine": result.mean_cosine if math.isfinite(result.mean_cosine) else None,
            "lr": result.learning_rate,
            "grad_norm": result.grad_norm,
            "step_seconds": result.seconds,
        }
        log_now = step % self.config.logging.log_every == 0 or step == self.config.train.max_steps
        if log_now:
            record.update(self.window.rates(self.flops.peak, self.accelerator.num_processes))
            record["peak_memory_mb"] = _peak_memory_mb()
            self.window = ThroughputWindow()
        if self.accelerator.is_main_process:
            with (self.run_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if log_now:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.learning_rate:.2e}", data=result.dataset)

    def checkpoint(self, step: int) -> Path:
        accelerator, run = self.accelerator, self.run
        run.sampler.step = step
        trainer_state = {
            "step": step,
            "stage": self.config.train.stage,
            "num_processes": accelerator.num_processes,
            "sampler": run.sampler.state_dict(),
            # the dataset versions this run reads: a resumed run keeps them
            "datasets": {s.data.name: str(s.data.cache_path) for s in run.specs if s.data.cache_path},
        }
        self._warn_about_changed_sources()
        path = save_checkpoint(
            accelerator,
            self.run_dir,
            step,
            write_model=self._write_model,
            write_optimizer=self.engine.save_optimizer,
            trainer_state=trainer_state,
            config_yaml=config_yaml(self.config),
        )
        if accelerator.is_main_process:
            prune_checkpoints(self.run_dir, self.config.train.keep_last)
        logger.info("checkpoint %s", path)
        return path

    def _warn_about_changed_sources(self) -> None:
        for spec in self.run.specs:
            if spec.data.name not in self.changed and source_changed(spec.data):
                self.changed.add(spec.data.name)
                logger.warning(
                    "the source of dataset %s changed while the run was going; it keeps reading its cached version "
                    "(%s), and a resumed run will too",
                    spec.data.name,
                    spec.data.cache_path,
                )

    def _write_model(self, directory: Path) -> None:
        state_dict = self.accelerator.get_state_dict(self.engine.model)  # gathered under ZeRO-3
        if self.accelerator.is_main_process:
            self.engine.unwrapped.save_pretrained(directory, self.run.text.tokenizer, state_dict=state_dict)
            self.text_config.save(directory)


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
