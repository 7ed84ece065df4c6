"""Shared test setup: one CPU thread, no denormals, a private cache, session fixtures."""

import copy
import os
import sys
import tempfile
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# the converted tokenizer is built once per test session, in a private cache
os.environ.setdefault("TPEMBED_CACHE", tempfile.mkdtemp(prefix="tpembed-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
torch.set_flush_denormal(True)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def subprocess_env() -> dict:
    """Environment for child processes: the same cache and thread settings."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="session")
def qwen_tokenizer_session():
    from modeling import QWEN_TOKENIZER, load_tokenizer

    return load_tokenizer(QWEN_TOKENIZER)


@pytest.fixture
def qwen_tokenizer(qwen_tokenizer_session):
    return copy.deepcopy(qwen_tokenizer_session)


@pytest.fixture(scope="session")
def tiny_backbone_session():
    from modeling import TINY_QWEN3, load_backbone

    return load_backbone(TINY_QWEN3, seed=0).eval()


@pytest.fixture
def tiny_backbone(tiny_backbone_session):
    return copy.deepcopy(tiny_backbone_session)


@pytest.fixture
def tiny_encoder(tiny_backbone):
    from modeling import Encoder, EncoderSpec

    torch.manual_seed(0)
    return Encoder(tiny_backbone, EncoderSpec(output_dim=1792)).eval()
