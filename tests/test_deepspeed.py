"""DeepSpeed ZeRO-2 / ZeRO-3 on two CPU processes (gloo): same losses as one process holding the
whole batch, GradCache included, and a ZeRO-3 checkpoint that exports, reloads and resumes."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, free_port, subprocess_env
from tpembed.train.embedder import Embedder
from tpembed.train.export import export

pytest.importorskip("deepspeed")

QUICKSTART = REPO / "configs/quickstart/stage1.yaml"
FLAGS = ["--max-steps", "2", "--save-every", "1", "--batch-size", "8", "--query-max-len", "32",
         "--passage-max-len", "48", "--report-to", "none", "--progress-bar", "false"]  # fmt: skip


def launch(run_dir, *extra, zero=None):
    """Launched as the README shows, with the shipped launch file; only the process count (the
    files say 8 GPUs) and the port change for two CPU processes. Without `zero`: one process
    holding the whole batch (the global batch is split over the processes, so the data are the
    same; DDP's own equivalence to it is tests/test_distributed.py's)."""
    launcher = [sys.executable]
    if zero:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    f"launch/deepspeed_zero{zero}.yaml", "--num_processes", "2",
                    "--main_process_port", free_port()]  # fmt: skip
    command = [*launcher, str(REPO / "train/stage1.py"), "--config", str(QUICKSTART), "--output-dir", str(run_dir),
               *FLAGS, *extra]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


SCALED = """data:
  datasets:
    - path: data/samples/snli_triplets_en.jsonl
      instruction: Given a premise, retrieve a hypothesis that is entailed by the premise
      lr_scale: 0.5
    - path: data/samples/text2vec_triplets_zh.jsonl
      instruction: 给定一个句子，检索与其语义相同的句子
      lr_scale: 0.25
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process without GradCache, and ZeRO-2 / ZeRO-3 on two with GradCache (mini-batches of
    5 texts). No warm-up, so the first update moves the weights and the second step's loss shows
    it; every dataset has an lr_scale, which DeepSpeed's optimizer must apply as one process does."""
    root = tmp_path_factory.mktemp("deepspeed")
    (root / "scaled.yaml").write_text(SCALED, encoding="utf-8")
    scaled = ["--config", str(root / "scaled.yaml"), "--warmup-steps", "0"]
    results = {"flags": scaled, "single": (root / "single", launch(root / "single", *scaled))}
    for zero in (2, 3):
        run_dir = root / f"zero{zero}"
        results[zero] = (
            run_dir,
            launch(run_dir, *scaled, "--grad-cache", "true", "--grad-cache-rows", "5", zero=zero),
        )
    return results


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_with_gradcache_matches_one_process(runs, zero):
    reference, losses = runs["single"][1], runs[zero][1]
    assert losses[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-6), "first-step loss"
    assert reference[0]["lr"] == pytest.approx(
        5e-4 * {"snli_triplets_en": 0.5, "text2vec_triplets_zh": 0.25}[reference[0]["dataset"]]
    )
    for a, b in zip(reference, losses):
        assert (a["dataset"], a["lr"]) == (b["dataset"], b["lr"])
        # later steps follow the updates: equal gradients, and DeepSpeed's partitioned AdamW
        # rounding a little differently from torch's
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert (runs[zero][0] / "checkpoints/step-00000002/deepspeed").is_dir()


def test_zero3_checkpoint_exports_reloads_and_resumes(runs, tmp_path):
    run_dir, first = runs[3]
    report = export(run_dir, tmp_path / "export")
    assert max(report.max_abs_diff.values()) <= 1e-5
    assert Embedder.from_checkpoint(run_dir).encode(["a consolidated checkpoint"]).shape == (1, 1792)
    # resume from the step-1 checkpoint: step 2 runs again and must give the same loss
    again = tmp_path / "again"
    shutil.copytree(run_dir, again)
    shutil.rmtree(again / "checkpoints/step-00000002")
    saved = (again / "checkpoints/step-00000001/COMPLETE").read_text()
    resumed = launch(
        again, *runs["flags"], "--resume-from", "auto", "--grad-cache", "true", "--grad-cache-rows", "5", zero=3
    )
    assert (again / "checkpoints/step-00000001/COMPLETE").read_text() == saved, "step 1 was not run again"
    assert [r["step"] for r in resumed] == [1, 2]
    assert (resumed[1]["dataset"], resumed[1]["lr"]) == (first[1]["dataset"], first[1]["lr"])
    assert resumed[1]["loss"] == pytest.approx(first[1]["loss"], rel=1e-6)


def test_zero3_with_cpu_offload_matches_one_process(runs, tmp_path):
    """launch/deepspeed_zero3_offload.yaml: optimizer and parameters offloaded, same first loss."""
    losses = launch(tmp_path / "offload", "--max-steps", "1", "--save-every", "1", zero="3_offload")
    assert losses[0]["loss"] == pytest.approx(runs["single"][1][0]["loss"], rel=1e-6)
    assert (tmp_path / "offload" / "checkpoints" / "step-00000001").is_dir()
