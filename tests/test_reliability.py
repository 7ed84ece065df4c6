"""Atomic checkpoints, the non-finite guard, and safe loading."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env
from tpembed.modeling import Encoder
from tpembed.train.checkpoint import (
    COMPLETE,
    complete_checkpoints,
    latest_checkpoint,
    load_optimizer_state,
    prune_checkpoints,
    remove_stale_staging,
    resolve_checkpoint,
)

WORKER = REPO / "tests" / "workers" / "inject_nonfinite.py"


def fake_checkpoint(run_dir, step, complete=True):
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    (path / "model").mkdir(parents=True)
    if complete:
        (path / COMPLETE).write_text("{}")
    return path


def test_incomplete_checkpoints_are_ignored(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4, complete=False)  # a save that was killed before its marker
    (tmp_path / "checkpoints" / ".tmp-step-00000006").mkdir()  # a save killed while writing
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2]
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert resolve_checkpoint(tmp_path).name == "step-00000002"
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        resolve_checkpoint(tmp_path / "checkpoints" / "step-00000004")
    assert [p.name for p in remove_stale_staging(tmp_path)] == [".tmp-step-00000006"]


def test_pruning_keeps_the_newest_complete_ones(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 5, complete=False)
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["step-00000001", "step-00000002"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000003",
        "step-00000004",
        "step-00000005",
    ]


def run_with_nan(run_dir, steps, *flags):
    command = [sys.executable, str(WORKER), steps, "--config", str(REPO / "configs/quickstart/stage1.yaml"),
               "--output-dir", str(run_dir), "--max-steps", "6", "--save-every", "1", "--batch-size", "8",
               "--report-to", "none", "--progress-bar", "false", "--keep-last", "10", *flags]  # fmt: skip
    env = subprocess_env() | {"HF_TOKEN": "hf_secret_value_123", "WANDB_API_KEY": "wandb_secret_value_456"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_non_finite_step_is_skipped(tmp_path):
    run_dir = tmp_path / "run"
    result = run_with_nan(run_dir, "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3: non-finite loss" in result.stderr and "update skipped" in result.stderr
    logged = records(run_dir)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert logged[2]["loss"] != logged[2]["loss"]  # NaN
    assert all(r["loss"] == r["loss"] for r in logged[:2] + logged[3:])
    # the schedule did not advance on the skipped step: step 4 uses step 3's rate
    assert logged[3]["lr"] == logged[2]["lr"] and logged[4]["lr"] > logged[3]["lr"]
    # no checkpoint at the skipped step; the optimizer took 5 steps in 6
    assert [s for s, _ in complete_checkpoints(run_dir)] == [1, 2, 4, 5, 6]
    state = load_optimizer_state(run_dir / "checkpoints" / "step-00000006")["optimizer"]["state"]
    assert {int(v["step"]) for v in state.values()} == {5}
    # weights stayed finite
    assert all(
        torch.isfinite(t).all()
        for t in Encoder.from_pretrained(latest_checkpoint(run_dir) / "model").state_dict().values()
    )
    # no secret from the environment reaches the run directory
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".jsonl"):
            text = path.read_text()
            assert "hf_secret_value_123" not in text and "wandb_secret_value_456" not in text


def test_a_persistent_non_finite_loss_stops_the_run(tmp_path):
    run_dir = tmp_path / "run"
    result = run_with_nan(run_dir, "3,4,5,6", "--max-nonfinite-steps", "2")
    assert result.returncode != 0
    assert "3 consecutive steps with a non-finite loss or gradient norm; stopped at step 5" in result.stderr
    assert "The last good checkpoint is" in result.stderr and "step-00000002" in result.stderr
    assert [s for s, _ in complete_checkpoints(run_dir)] == [1, 2]
    encoder = Encoder.from_pretrained(latest_checkpoint(run_dir) / "model")
    assert all(torch.isfinite(t).all() for t in encoder.state_dict().values())


def test_weights_load_only_from_safetensors(tmp_path, tiny_encoder, qwen_tokenizer, monkeypatch):
    tiny_encoder.save_pretrained(tmp_path, qwen_tokenizer)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be called on weights"))
    with pytest.raises((OSError, EnvironmentError, ValueError)):
        Encoder.from_pretrained(tmp_path)


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_optimizer_state_is_loaded_without_pickle(tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 1)
    torch.save({"optimizer": Payload(), "scheduler": {}}, checkpoint / "optimizer.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_optimizer_state(checkpoint)


def test_remote_code_is_off_by_default():
    from tpembed.train.config import Config

    assert Config().model.trust_remote_code is False
