"""Shared test setup: one CPU thread, no denormals, a private cache, session fixtures."""

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# the converted tokenizer and the dequantised GGUF are built once per test session, in a private
# cache that the xdist workers inherit from the controller
if "TPEMBED_CACHE" not in os.environ:
    os.environ["TPEMBED_CACHE"] = tempfile.mkdtemp(prefix="tpembed-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
torch.set_flush_denormal(True)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The files that take longest (minutes: several processes, several runs each), longest first.
# pytest-xdist hands out whole files (--dist loadfile) in collection order (--no-loadscope-reorder
# in pyproject.toml), so starting with these keeps both workers busy to the end instead of
# leaving one of them a long file after the other has finished.
LONGEST_FIRST = [
    "test_deepspeed.py", "test_resume.py", "test_export.py", "test_distributed.py", "test_quickstart.py",
    "test_lora.py", "test_launch.py", "test_building_data.py", "test_modeling.py", "test_synthesize.py",
    "test_mteb.py", "test_mining.py", "test_validation.py",
]  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def free_port() -> str:
    """A TCP port nobody listens on now, for a multi-process run's rendezvous."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def subprocess_env() -> dict:
    """Environment for child processes: the same cache and thread settings."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


@contextlib.contextmanager
def openai_test_server(folder: Path, replies: dict, log: Path | None = None):
    """tests/openai_server.py on a free port, answering from `replies` ({"match": [[substring,
    reply], ...], "default": reply}); yields its base URL and stops it on exit."""
    (folder / "replies.json").write_text(json.dumps(replies, ensure_ascii=False), encoding="utf-8")
    command = [sys.executable, str(REPO / "tests" / "openai_server.py"), "--replies", str(folder / "replies.json")]
    command += ["--log", str(log)] if log else []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        line = process.stdout.readline()
        assert line.startswith("listening on "), line
        yield f"http://127.0.0.1:{int(line.split()[-1])}/v1"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session", autouse=True)
def tokenizers_loaded_once():
    """In-process runs, embedders and evaluations load the same tokenizers again and again (the
    151k-token Qwen vocabulary takes 3-4 s each time): within a test worker each (source,
    padding side) is loaded once and shared. A tokenizer that was given a new token (a
    placeholder) is loaded afresh for the next caller, and the padding side is set on every hand-out.
    Loading itself is tested directly and in every subprocess."""
    from tpembed.modeling import backbone
    from tpembed.train import build, embedder

    loaded = {}

    def shared(source, padding_side="left", trust_remote_code=False):
        key = (source, padding_side, trust_remote_code)
        if key not in loaded or len(loaded[key][0]) != loaded[key][1]:
            tokenizer = backbone.load_tokenizer(source, padding_side, trust_remote_code)
            loaded[key] = (tokenizer, len(tokenizer))
        tokenizer = loaded[key][0]
        tokenizer.padding_side = padding_side
        return tokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "load_tokenizer", shared)
        patch.setattr(embedder, "load_tokenizer", shared)
        yield


@pytest.fixture(scope="session")
def qwen_tokenizer_session():
    from tpembed.modeling import QWEN_TOKENIZER, load_tokenizer

    return load_tokenizer(QWEN_TOKENIZER)


@pytest.fixture
def qwen_tokenizer(qwen_tokenizer_session):
    return copy.deepcopy(qwen_tokenizer_session)


@pytest.fixture(scope="session")
def tiny_backbone_session():
    from tpembed.modeling import TINY_QWEN3, load_backbone

    return load_backbone(TINY_QWEN3, seed=0).eval()


@pytest.fixture
def tiny_backbone(tiny_backbone_session):
    return copy.deepcopy(tiny_backbone_session)


@pytest.fixture
def tiny_encoder(tiny_backbone):
    from tpembed.modeling import Encoder, EncoderSpec

    torch.manual_seed(0)
    return Encoder(tiny_backbone, EncoderSpec(output_dim=1792)).eval()


def run_script(script: str, config: Path, output_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    """Run train/<script> in a fresh process; fails the test with its stderr on error."""
    command = [
        sys.executable,
        str(REPO / "train" / script),
        "--config",
        str(config),
        "--output-dir",
        str(output_dir),
        "--report-to",
        "none",
        "--progress-bar",
        "false",
        *flags,
    ]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A directory that `build(directory)` fills once per test session, shared by all xdist
    workers: the first worker to get here builds it under a lock, the others wait and reuse it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    target = root / "built-once" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "BUILT").is_file():
            shutil.rmtree(target, ignore_errors=True)  # a build that failed part-way
            target.mkdir()
            build(target)
            (target / "BUILT").touch()
    return target


@pytest.fixture(scope="session")
def quickstart_stage1(tmp_path_factory):
    """A 3-step quickstart stage-1 run (session-wide; treat as read-only)."""

    def build(directory):
        run_script("stage1.py", REPO / "configs/quickstart/stage1.yaml", directory / "stage1", "--max-steps", "3",
                   "--save-every", "3")  # fmt: skip

    return built_once(tmp_path_factory, "quickstart-stage1", build) / "stage1"


@pytest.fixture(scope="session")
def quickstart_stage2(tmp_path_factory, quickstart_stage1):
    """A 10-step quickstart stage-2 run from quickstart_stage1; (run dir, its stderr)."""

    def build(directory):
        result = run_script("stage2.py", REPO / "configs/quickstart/stage2.yaml", directory / "stage2", "--init-from",
                            str(quickstart_stage1), "--max-steps", "10", "--save-every", "10")  # fmt: skip
        (directory / "stderr.txt").write_text(result.stderr)

    directory = built_once(tmp_path_factory, "quickstart-stage2", build)
    return directory / "stage2", (directory / "stderr.txt").read_text()
