"""The launch files: valid, pointing at files that exist, with the settings the loop relies on."""

import json
import subprocess

import pytest
import yaml

from conftest import REPO

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
