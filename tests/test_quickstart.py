"""The embedded default end to end: a few steps, every parameter moves, save, resume."""

import json
import math
import shutil
import subprocess
import sys

import torch

from conftest import REPO, subprocess_env
from tpembed.modeling import Encoder
from tpembed.train import build
from tpembed.train.checkpoint import complete_checkpoints
from tpembed.train.config import load_config

QUICKSTART = REPO / "configs" / "quickstart" / "stage1.yaml"


def stage1(output_dir, *flags, launcher=(sys.executable,)):
    command = [
        *launcher,
        str(REPO / "train" / "stage1.py"),
        "--config",
        str(QUICKSTART),
        "--output-dir",
        str(output_dir),
        "--report-to",
        "tensorboard",
        "--progress-bar",
        "false",
        *flags,
    ]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_quickstart_trains_saves_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    accelerate = (sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1")
    stage1(run_dir, "--max-steps", "4", "--save-every", "2", launcher=accelerate)

    records = losses(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert all(math.isfinite(r[f"loss_dim_{d}"]) for r in records for d in (128, 1792))
    assert all(-1 <= r["mean_cosine"] <= 1 for r in records)  # the collapse signal, every step
    telemetry = records[-1]  # logged at the last step: throughput and memory
    assert telemetry["samples_per_s"] > 0 and telemetry["tokens_per_s"] > telemetry["samples_per_s"]
    assert telemetry["tflops_per_device"] > 0 and telemetry["peak_memory_mb"] > 100 and "grad_norm" in telemetry
    assert [step for step, _ in complete_checkpoints(run_dir)] == [2, 4]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints/step-00000004/config.yaml").is_file()
    assert list((run_dir / "logs").rglob("events.out.tfevents*")), "TensorBoard events are written"

    # every trainable parameter moved away from its initial value
    config = load_config(["--config", str(QUICKSTART)])
    text = build.build_text(config)
    initial = build.build_encoder(config, text).state_dict()
    trained = Encoder.from_pretrained(run_dir / "checkpoints/step-00000004/model").state_dict()
    assert initial.keys() == trained.keys()
    unchanged = [name for name in initial if torch.equal(initial[name], trained[name])]
    assert not unchanged, f"parameters that did not change: {unchanged}"

    # one process resumed from step 2 logs exactly the uninterrupted steps 3 and 4 (kills at
    # any point and two processes: tests/test_resume.py)
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints/step-00000004")
    stage1(resumed, "--max-steps", "4", "--save-every", "2", "--resume-from", "auto")
    continued = losses(resumed)
    assert [r["step"] for r in continued] == [1, 2, 3, 4]
    for a, b in zip(continued, records):
        assert (a["dataset"], a["lr"], a["loss"]) == (b["dataset"], b["lr"], b["loss"]), a["step"]  # fp32: identical
    assert [step for step, _ in complete_checkpoints(resumed)] == [2, 4]
