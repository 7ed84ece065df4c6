"""The launch files: valid, pointing at files that exist, with the settings the loop relies on."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, free_port, subprocess_env

LAUNCH = REPO / "launch"


@pytest.mark.parametrize("path", sorted(LAUNCH.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs(path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED")
    if config["distributed_type"] == "DEEPSPEED":
        deepspeed = json.loads((REPO / config["deepspeed_config"]["deepspeed_config_file"]).read_text())
        assert deepspeed["managed_gradient_accumulation"] is False, "the loop owns the accumulation boundary"
        assert deepspeed["zero_optimization"]["stage"] in (2, 3)
        if deepspeed["zero_optimization"]["stage"] == 3:
            assert deepspeed["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_the_readme_shows_a_command_for_each():
    readme = (REPO / "README.md").read_text()
    for path in LAUNCH.glob("*.yaml"):
        if path.name != "multi_node.yaml":
            assert f"--config_file launch/{path.name}" in readme, path.name
    assert "sbatch launch/slurm_multinode.sh" in readme


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(LAUNCH / "slurm_multinode.sh")], check=True)
    assert "--machine_rank" in (LAUNCH / "slurm_multinode.sh").read_text()


# every launch file is started by a test, as the README shows it: the DeepSpeed files in
# test_deepspeed.py and multi_gpu.yaml in test_resume.py (with loss checks), the others here
LAUNCHED_IN_TEST_DEEPSPEED = {"deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml"}
LAUNCHED_IN_TEST_RESUME = {"multi_gpu.yaml"}
# what two CPU processes on one machine need changed in each file, and nothing else
CPU_OVERRIDES = {
    "single_gpu.yaml": [],
    "multi_node.yaml": [
        "--num_machines",
        "1",
        "--num_processes",
        "2",
        "--machine_rank",
        "0",
        "--main_process_ip",
        "127.0.0.1",
    ],  # fmt: skip
}


def test_every_launch_file_is_launched_by_a_test():
    launched = LAUNCHED_IN_TEST_DEEPSPEED | LAUNCHED_IN_TEST_RESUME | set(CPU_OVERRIDES)
    assert {p.name for p in LAUNCH.glob("*.yaml")} == launched
    assert 'f"launch/deepspeed_zero{zero}.yaml"' in (REPO / "tests" / "test_deepspeed.py").read_text()
    assert '"launch/multi_gpu.yaml"' in (REPO / "tests" / "test_resume.py").read_text()


@pytest.mark.parametrize("name", sorted(CPU_OVERRIDES))
def test_launch_file_starts_a_run(name, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/{name}",
               *CPU_OVERRIDES[name], "--main_process_port", free_port(), "train/stage1.py",
               "--config", "configs/quickstart/stage1.yaml", "--output-dir", str(run_dir), "--max-steps", "2",
               "--batch-size", "8", "--query-max-len", "32", "--passage-max-len", "48", "--report-to", "none",
               "--progress-bar", "false"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert (run_dir / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
