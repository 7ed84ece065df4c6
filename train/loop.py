"""The one training loop, shared by stage 1 and stage 2.

    train(config)
      setup      accelerator, the checkpoint to resume, the run's parts (build.setup_run,
                 which `validate` runs too), the engine
      steps      train_step: the step's micro-batches, their losses and backward passes,
                 one optimizer update
      events     after every step: metrics, throughput, dev evaluation, checkpoints
                 (events.py)

Every accelerator call is made here, in the engine (engine.py) or in the events.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from tpembed.data import DataError, StepMicroBatches
from tpembed.modeling.distributed import all_finite
from tpembed.train import build
from tpembed.train.checkpoint import latest_checkpoint, load_rng, load_trainer_state, resolve_checkpoint
from tpembed.train.config import STAGE_DEFAULTS, Config, ConfigError, load_config
from tpembed.train.engine import Engine, create_engine
from tpembed.train.events import NonFiniteError, StepEvents, StepResult, open_run_dir, trackers
from tpembed.train.gradcache import cached_micro_step
from tpembed.train.step import micro_step_loss
from tpembed.train.telemetry import cpu_has_fast_bf16

__all__ = ["NonFiniteError", "build_accelerator", "micro_step_loss", "run_stage", "train"]

logger = logging.getLogger("tpembed")


def train(config: Config) -> Path:
    """Run (or resume) training as configured; returns the newest checkpoint."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = build_accelerator(config)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    run_dir = Path(config.train.output_dir)
    accelerator.wait_for_everyone()  # every process must see the same checkpoints
    resume = resume_checkpoint(config, run_dir)

    run = build.setup_run(
        config, resume, accelerator.num_processes, accelerator.process_index, accelerator.local_main_process_first
    )
    for line in build.describe(run, config):
        logger.info(line)
    encoder = build.build_encoder(config, run.text, run.model_dir, resume is not None, run.tp_layers)
    optimizer = build.build_optimizer(config, encoder)
    scheduler = build.build_scheduler(config, optimizer)
    engine = create_engine(accelerator, config, encoder, optimizer, scheduler, min(s.batch_size for s in run.specs))
    start_step = restore(engine, run.sampler, resume) if resume else 0

    open_run_dir(accelerator, config, run_dir, start_step)
    events = StepEvents(accelerator, config, engine, run, run_dir, start_step)
    micro_batches = micro_batch_stream(config, run.batches, start_step)
    objective = build.build_objective(config)
    engine.model.train()
    for step in range(start_step, config.train.max_steps):
        events.after_step(step + 1, train_step(engine, objective, micro_batches))
    events.close()
    if start_step >= config.train.max_steps:
        logger.info("nothing to do: the run already reached max_steps=%d", config.train.max_steps)
    accelerator.end_training()
    close_processes(accelerator)
    return latest_checkpoint(run_dir) or run_dir


def close_processes(accelerator) -> None:
    """Tear the process group down on every rank together, before the interpreter exits: left to
    interpreter shutdown, a rank can still destroy its communicator while another uses it
    (seen once as an abort of one DeepSpeed rank at exit, under load)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


def run_stage(stage: int, argv: list[str] | None = None, description: str = "") -> None:
    """The entry scripts' main: stage `stage`'s defaults <- YAML <- flags, then train; bad input
    exits with the message (file, line and field), not a traceback."""
    try:
        train(load_config(argv, base=STAGE_DEFAULTS[stage], description=description))
    except (ConfigError, DataError) as error:
        sys.exit(f"error: {error}")
    except NonFiniteError as error:
        sys.exit(f"stopped: {error}")


def build_accelerator(config: Config) -> Accelerator:
    use_cuda = torch.cuda.is_available() and not config.train.cpu
    mixed_precision = config.train.mixed_precision
    if mixed_precision == "auto":  # bf16 where the hardware has it: supporting GPUs, CPUs with AVX512-BF16/AMX
        mixed_precision = "bf16" if (torch.cuda.is_bf16_supported() if use_cuda else cpu_has_fast_bf16()) else "no"
    elif mixed_precision == "bf16" and not use_cuda and not cpu_has_fast_bf16():
        logger.warning(
            "train.mixed_precision: bf16 on a CPU without AVX512-BF16 or AMX is emulated and many times slower "
            "than fp32; use --mixed-precision auto (fp32 here) or no"
        )
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # CPU processes talk over gloo (DeepSpeed too, which would otherwise ask for a GPU backend)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not use_cuda else []
    output_dir = Path(config.train.output_dir)
    return Accelerator(
        # DeepSpeed picks its device itself (accelerate ignores it when cpu=True)
        cpu=not use_cuda and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true",
        mixed_precision=mixed_precision,
        log_with=trackers(config) or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=handlers,
    )


def resume_checkpoint(config: Config, run_dir: Path) -> Path | None:
    """The checkpoint this run continues, if any; a fresh run refuses a directory with checkpoints."""
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


def restore(engine: Engine, sampler, checkpoint: Path) -> int:
    """Optimizer, scheduler, sampler position and RNG states of `checkpoint`; returns its step."""
    state = load_trainer_state(checkpoint)
    engine.load_optimizer(checkpoint)
    sampler.load_state_dict(state["sampler"])
    accelerator = engine.accelerator
    if state["num_processes"] != accelerator.num_processes:
        logger.warning(
            "resuming a %d-process run with %d processes: the global batches and their order are unchanged "
            "(the sampler does not depend on the process count); RNG states come from rank 0",
            state["num_processes"],
            accelerator.num_processes,
        )
    if not load_rng(checkpoint, accelerator.process_index):
        load_rng(checkpoint, 0)
    logger.info("resumed from %s at step %d", checkpoint, state["step"])
    return state["step"]


@contextmanager
def scaled_learning_rate(optimizer: torch.optim.Optimizer, scale: float):
    """Every parameter group's learning rate times `scale` inside the block, the scheduled rates after.

    The scheduler owns the rates and sets them from its base rates at every step; the optimizer
    (DeepSpeed's too: it steps the same parameter groups) reads them when it steps."""
    if scale == 1:
        yield
        return
    scheduled = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * scale
    try:
        yield
    finally:
        for group, rate in zip(optimizer.param_groups, scheduled):
            group["lr"] = rate


def micro_batch_stream(config: Config, batches, start_step: int):
    """This rank's micro-batches from `start_step` on, built ahead by DataLoader workers."""
    accumulation = config.train.gradient_accumulation_steps
    loader = torch.utils.data.DataLoader(
        StepMicroBatches(batches),
        batch_size=None,
        sampler=range(start_step * accumulation, config.train.max_steps * accumulation),
        num_workers=config.data.num_workers,
        persistent_workers=False,
    )
    return iter(loader)


def train_step(engine: Engine, objective, micro_batches) -> StepResult:
    """One optimizer step: every micro-batch's loss and backward, then the update."""
    config = engine.config
    start = time.perf_counter()
    scheduled = engine.scheduler.get_last_lr()[0]
    accumulation = config.train.gradient_accumulation_steps
    sums, contributed, batch = None, 0, None
    counts = torch.zeros(3, dtype=torch.float64)  # tokens, examples, squared lengths
    for micro in range(accumulation):
        batch = next(micro_batches)
        last_micro = micro == accumulation - 1

        def backward(piece: torch.Tensor, last_piece: bool) -> None:
            engine.backward(piece, last=last_micro and last_piece)

        stats = {}
        if config.train.grad_cache:
            loss, per_dim, produced = cached_micro_step(
                engine.model, objective, batch, engine.accelerator.device, backward,
                max_rows=config.train.grad_cache_rows or (None if config.train.grad_cache_tokens else 32),
                token_budget=config.train.grad_cache_tokens, padding_side=config.model.padding_side, stats=stats,
            )  # fmt: skip
        else:
            loss, per_dim = micro_step_loss(engine.model, objective, batch, engine.accelerator.device, stats=stats)
            produced = all_finite(loss)
            if produced:
                backward(loss, True)
        contributed += produced
        # the losses, then the anchors' mean cosine (reduced with them, logged as mean_cosine)
        values = torch.stack(
            [loss.detach().float()] + [v.float() for v in per_dim.values()] + [stats["mean_cosine"].float()]
        )
        sums = values if sums is None else sums + values
        counts += torch.tensor([batch.num_tokens, batch.num_examples, batch.squared_lengths], dtype=torch.float64)
    # every micro-batch of a step comes from one dataset: its lr_scale applies to the whole update
    with scaled_learning_rate(engine.scheduler.optimizer, batch.lr_scale):
        grad_norm = engine.step(contributed)
    learning_rate = scheduled * batch.lr_scale  # the rate this step's update used
    return StepResult.reduced(
        engine, sums / accumulation, list(per_dim), counts, grad_norm, learning_rate, batch, start
    )
