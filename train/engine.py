"""The engine: backward, optimizer step, and the optimizer's part of checkpoints.

One object owns what differs between plain accelerate (DDP or one process) and
DeepSpeed, so the loop and the checkpoint code never ask which one runs:

- backward: accelerate skips the gradient all-reduce on every backward but the
  step's last (`no_sync`); DeepSpeed accumulates every backward and reduces in
  `step()` (the loop owns the accumulation boundary: `managed_gradient_accumulation`
  is off in launch/deepspeed/*.json).
- step: clipping, the update, and skipping a step whose gradients are not finite.
- state: the optimizer in optimizer.pt, or DeepSpeed's partitioned optimizer state
  that every rank writes and reads itself.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from tpembed.train.checkpoint import DEEPSPEED_DIR, load_optimizer_state


class Engine:
    """Plain accelerate: one process, DDP, or anything accelerate prepares the same way."""

    def __init__(self, accelerator, config, encoder, optimizer, scheduler):
        self.accelerator = accelerator
        self.config = config
        self.accumulation = config.train.gradient_accumulation_steps
        self.max_grad_norm = config.optim.max_grad_norm or float("inf")
        self.model, self.optimizer = accelerator.prepare(encoder, optimizer)
        self.scheduler = scheduler

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def every_rank_evaluates(self) -> bool:
        """Whether evaluation's forwards need every rank (parameters partitioned over ranks)."""
        return False

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate this micro-batch's (or GradCache piece's) gradient; `last` is the step's final backward."""
        with nullcontext() if last else self.accelerator.no_sync(self.model):
            self.accelerator.backward(loss / self.accumulation)

    def step(self, contributed: int) -> float:
        """Clip and apply the accumulated gradients; returns the gradient norm (NaN: skipped).

        `contributed` counts the micro-batches whose gradients went in."""
        norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
        # fp16's grad scaler skips non-finite steps itself and must see every step
        if contributed == self.accumulation and (math.isfinite(norm) or self.accelerator.scaler is not None):
            self.optimizer.step()
        else:
            norm = float("nan")
        self.optimizer.zero_grad()
        return norm

    def save_optimizer(self, directory: Path) -> None:
        """Called on every rank while a checkpoint is written into `directory`."""
        if self.accelerator.is_main_process:
            self._write_optimizer_file(directory, self.optimizer.state_dict())

    def load_optimizer(self, checkpoint: Path) -> None:
        state = load_optimizer_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def _write_optimizer_file(self, directory: Path, optimizer_state) -> None:
        torch.save({"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict()}, directory / "optimizer.pt")


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-2/3 through accelerate: the prepared model is DeepSpeed's engine."""

    def __init__(self, accelerator, config, encoder, optimizer, scheduler, per_device_batch: int):
        self._fill_deepspeed_config(accelerator, config, encoder, per_device_batch)
        super().__init__(accelerator, config, encoder, optimizer, scheduler)

    @property
    def every_rank_evaluates(self) -> bool:
        return self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.model.backward(loss / self.accumulation, scale_wrt_gas=False)  # reduced at step()

    def step(self, contributed: int) -> float:
        # DeepSpeed owns clipping; a micro-batch with a non-finite loss was left out of the
        # update, and a step where every micro-batch was is skipped
        if not contributed:
            return float("nan")
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save_optimizer(self, directory: Path) -> None:
        # every rank writes its partition of the optimizer state
        self.model.save_checkpoint(str(directory / DEEPSPEED_DIR), tag="state", save_latest=False)
        if self.accelerator.is_main_process:
            self._write_optimizer_file(directory, None)

    def load_optimizer(self, checkpoint: Path) -> None:
        self.model.load_checkpoint(str(checkpoint / DEEPSPEED_DIR), tag="state", load_lr_scheduler_states=False)
        self.scheduler.load_state_dict(load_optimizer_state(checkpoint)["scheduler"])

    @staticmethod
    def _fill_deepspeed_config(accelerator, config, encoder, per_device_batch: int) -> None:
        """Fill the `auto` values for the loop's own accumulation: every backward accumulates
        (GradCache pieces and micro-batches alike) and `engine.step()` is the boundary."""
        values = accelerator.state.deepspeed_plugin.deepspeed_config
        values["train_micro_batch_size_per_gpu"] = per_device_batch
        values["train_batch_size"] = per_device_batch * accelerator.num_processes
        values["gradient_accumulation_steps"] = 1
        values["managed_gradient_accumulation"] = False
        if values.get("gradient_clipping", "auto") == "auto":
            values["gradient_clipping"] = config.optim.max_grad_norm
        # the sizes accelerate derives from a Hugging Face model's config (ours is composed)
        hidden = encoder.backbone.config.hidden_size
        zero = values.get("zero_optimization", {})
        for key, value in (
            ("reduce_bucket_size", hidden * hidden),
            ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
            ("stage3_param_persistence_threshold", 10 * hidden),
        ):
            if zero.get(key) == "auto":
                zero[key] = value


def create_engine(accelerator, config, encoder, optimizer, scheduler, smallest_batch: int) -> Engine:
    """The engine for how the run was launched (the one place that asks)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        per_device = max(1, smallest_batch // (accelerator.num_processes * config.train.gradient_accumulation_steps))
        return DeepSpeedEngine(accelerator, config, encoder, optimizer, scheduler, per_device)
    return Engine(accelerator, config, encoder, optimizer, scheduler)
