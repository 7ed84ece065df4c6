"""Two processes gathering negatives == one process holding the whole batch.

Loss and the gradient of every parameter, for retrieval InfoNCE (with query-query
negatives), masked classification and CoSENT, all under Matryoshka, fp32.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, free_port, subprocess_env

WORKER = Path(__file__).parent / "workers" / "gathered_gradients.py"


def write_config(path: Path) -> Path:
    samples = REPO / "data" / "samples"
    config = {
        "data": {
            "datasets": [
                {"path": str(samples / "snli_triplets_en.jsonl"), "instruction": "retrieve"},
                {"path": str(samples / "snli_pairs_en.jsonl"), "task": "sts", "instruction": "similar"},
                {
                    "path": str(samples / "cmrc2018_questions_zh.jsonl"),
                    "task": "classification",
                    "instruction": "topic",
                },
            ],
            "batch_size": 4,
            "num_hard_negatives": 2,
            "query_max_len": 32,
            "passage_max_len": 32,
        },
        # fp32 whatever the CPU: "auto" would pick bf16 autocast on CPUs with AMX/AVX512-BF16
        "train": {"seed": 3, "mixed_precision": "no"},
        "logging": {"report_to": ["none"]},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run(command, cwd):
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process holding the whole batch, without GradCache: the reference of both modes."""
    directory = tmp_path_factory.mktemp("single")
    run([sys.executable, str(WORKER), str(write_config(directory / "config.yaml")), str(directory)], REPO)
    return directory


@pytest.fixture(scope="module")
def double(tmp_path_factory):
    """Two processes, one launch: without GradCache, then with it (both from the same weights)."""
    directory = tmp_path_factory.mktemp("double")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    run([*launch, "--main_process_port", free_port(), str(WORKER), str(write_config(directory / "config.yaml")),
         str(directory), "plain,gradcache"], REPO)  # fmt: skip
    return directory


@pytest.mark.parametrize("mode", ["plain", "gradcache"])
def test_two_processes_match_one(single, double, mode):
    """mode gradcache: two processes with GradCache against one process without it."""
    for task in ("retrieval", "sts", "classification"):
        reference = load_file(str(single / "plain" / f"{task}.safetensors"))
        gathered = load_file(str(double / mode / f"{task}.safetensors"))
        assert set(reference) == set(gathered), task
        torch.testing.assert_close(gathered.pop("__loss__"), reference.pop("__loss__"), rtol=1e-5, atol=1e-6)
        for name, expected in reference.items():
            scale = max(1.0, float(expected.abs().max()))
            difference = float((gathered[name] - expected).abs().max())
            assert difference <= 1e-5 * scale, f"{task}: {name} differs by {difference} (scale {scale})"
        assert any(float(g.abs().max()) > 0 for g in reference.values()), task


@pytest.mark.parametrize("world", [1])
def test_gather_is_a_no_op_without_a_process_group(world):
    from tpembed.modeling import distributed

    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x
    assert distributed.world_size() == world and distributed.local_offset(3) == 0
