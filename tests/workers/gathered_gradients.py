"""Worker for tests/test_distributed.py: loss and gradients of one micro-batch per task.

Run with N processes (accelerate launch / torchrun); with N == 1 it gives the
single-process reference. For each mode of the third argument (comma-separated; default
"plain"), writes OUT/<mode>/<task>.safetensors with every parameter's gradient (after the
data-parallel average) and the loss averaged over ranks. Mode "gradcache" computes them with
GradCache (mini-batches of 3 texts); one launch can run both modes, the second one from the
same weights (no optimizer step is taken).
"""

import contextlib
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tpembed.train import build
from tpembed.train.config import load_config
from tpembed.train.gradcache import cached_micro_step
from tpembed.train.loop import build_accelerator, micro_step_loss


def main(config_path: str, out_dir: str, modes: str = "plain") -> None:
    torch.set_flush_denormal(True)
    config = load_config(["--config", config_path])
    accelerator = build_accelerator(config)
    text = build.build_text(config)
    encoder = build.build_encoder(config, text)
    specs, _ = build.build_datasets(config, text.text_format)
    sampler = build.build_sampler(config, specs)
    batches = build.build_batches(config, specs, sampler, text, accelerator.num_processes, accelerator.process_index)
    objective = build.build_objective(config)
    model = accelerator.prepare(encoder)
    model.train()
    for mode in modes.split(","):
        gradients(accelerator, model, objective, batches, mode, Path(out_dir) / mode)
    accelerator.wait_for_everyone()


def gradients(accelerator, model, objective, batches, mode: str, out_dir: Path) -> None:
    """Loss and gradients of the first micro-batch of each task, written to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done = set()
    for step in range(100):
        batch = batches.micro_batch(step, 0)
        if batch.task in done:
            continue
        done.add(batch.task)
        model.zero_grad(set_to_none=True)
        if mode == "gradcache":

            def backward(piece, last):
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    accelerator.backward(piece)

            loss, _, _ = cached_micro_step(model, objective, batch, accelerator.device, backward, max_rows=3)
        else:
            loss, _ = micro_step_loss(model, objective, batch, accelerator.device)
            accelerator.backward(loss)
        mean_loss = accelerator.reduce(loss.detach(), "mean")
        if accelerator.is_main_process:
            grads = {
                name: p.grad.detach().clone()
                for name, p in accelerator.unwrap_model(model).named_parameters()
                if p.grad is not None
            }
            grads["__loss__"] = mean_loss.reshape(1)
            save_file(grads, str(out_dir / f"{batch.task.value}.safetensors"))
        if len(done) == 3:
            break


if __name__ == "__main__":
    main(*sys.argv[1:])
