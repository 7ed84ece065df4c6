"""Atomic checkpoints and the run-directory layout.

    RUN_DIR/
      config.yaml                 the resolved config of the run
      metrics.jsonl               one JSON line per logged step (main process)
      checkpoints/
        step-00000100/
          model/                  the encoder in Hugging Face layout (safetensors)
          config.yaml             the resolved config
          trainer_state.json      step, sampler position, counters
          optimizer.pt            optimizer + scheduler state (tensors only)
          deepspeed/              under DeepSpeed: the engine's partitioned optimizer state
          rng/rank-00000.pt       each process's RNG states
          COMPLETE                written last; a directory without it is ignored

A checkpoint is written under checkpoints/.tmp-step-... and renamed into place
only after every file, and the COMPLETE marker, are on disk; a kill during a save
leaves the previous checkpoints untouched. Old checkpoints are pruned only after
the new one is complete. Everything is loaded without pickle: weights from
safetensors, the rest with torch.load(weights_only=True) or JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
MODEL_DIR = "model"
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own (partitioned) optimizer state, when training under it
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (-> its newest complete checkpoint), a checkpoint directory, or a
    checkpoint's model/ folder (-> that checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.name == MODEL_DIR and (path.parent / COMPLETE).is_file():
        path = path.parent
    if (path / COMPLETE).is_file():
        return path
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path} holds no complete checkpoint (none has a {COMPLETE} marker)")
        return latest
    if _NAME.match(path.name) and path.is_dir():
        raise FileNotFoundError(f"{path} is an incomplete checkpoint (no {COMPLETE} marker): it was interrupted")
    raise FileNotFoundError(f"{path} is neither a tpembed run directory nor a checkpoint")


def save_checkpoint(
    accelerator,
    run_dir: str | Path,
    step: int,
    *,
    write_model,
    write_optimizer,
    trainer_state: dict,
    config_yaml: str,
) -> Path:
    """Write checkpoint `step` atomically; every process must call this.

    Args:
        write_model: called on every process with the directory to write the encoder
            into (after every process joined; the main process writes).
        write_optimizer: called on every process with the checkpoint directory
            (the engine's optimizer and scheduler state).
        trainer_state: JSON-able state (step, sampler, counters).
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    staging = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)  # left by a save that was killed
        (staging / "rng").mkdir(parents=True)
    accelerator.wait_for_everyone()

    write_model(staging / MODEL_DIR)
    torch.save(rng_state(), staging / "rng" / f"rank-{accelerator.process_index:05d}.pt")
    write_optimizer(staging)
    if accelerator.is_main_process:
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        (staging / "config.yaml").write_text(config_yaml)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        _fsync_tree(staging)
        (staging / COMPLETE).write_text(json.dumps({"step": step, "time": time.time()}) + "\n")
        if final.exists():  # a re-run of the same step: replace only now that the new one is complete
            shutil.rmtree(final)
        os.replace(staging, final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints."""
    found = complete_checkpoints(run_dir)
    removed = [path for _, path in found[:-keep_last]] if keep_last > 0 else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def remove_stale_staging(run_dir: str | Path) -> list[Path]:
    """Delete staging directories left by saves that were killed."""
    root = Path(run_dir) / CHECKPOINTS
    stale = sorted(root.glob(".tmp-step-*")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def load_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def load_optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)


def load_rng(checkpoint: Path, process_index: int) -> bool:
    """Restore this process's RNG states; False if the checkpoint has none for it."""
    path = checkpoint / "rng" / f"rank-{process_index:05d}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True))
    return True


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> dict:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": pos,
        "has_gauss": has_gauss,
        "cached_gaussian": cached,
    }


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
