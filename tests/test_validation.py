"""Every bad input fails at start-up with file, line and field, and no checkpoint is harmed."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env
from tpembed.data import DataError
from tpembed.train.config import STAGE_DEFAULTS, ConfigError, load_config
from tpembed.train.loop import train
from tpembed.train.validate import main as validate_main
from tpembed.train.validate import validate_run

QUICKSTART = REPO / "configs/quickstart/stage1.yaml"


def digest(run_dir):
    """sha256 of every file under checkpoints/."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((run_dir / "checkpoints").rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def guarded(tmp_path, quickstart_stage1):
    """A run directory holding complete checkpoints; asserts afterwards that none changed."""
    run_dir = tmp_path / "run"
    shutil.copytree(quickstart_stage1, run_dir)
    before = digest(run_dir)
    yield run_dir
    assert digest(run_dir) == before, "a checkpoint was modified"


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def start(run_dir, *flags, stage=1):
    """Resume the guarded run with the given flags, through the training loop itself."""
    config = load_config(
        ["--config", str(QUICKSTART), "--output-dir", str(run_dir), "--resume-from", "auto", "--report-to", "none",
         "--progress-bar", "false", "--max-steps", "5", *flags],
        base=STAGE_DEFAULTS[stage],
    )  # fmt: skip
    validate_run(config)  # the `validate` command's checks ...
    train(config)  # ... and the loop's own start-up


GOOD = {"query": "q", "pos": "p", "negs": ["n1", "n2", "n3", "n4"]}


@pytest.mark.parametrize(
    "rows, flags, expected",
    [
        ([GOOD, GOOD, '{"query": "q", "pos": '], [], [":3", "invalid JSON"]),
        ([GOOD, {"pos": "p"}], [], [":2", "field 'query'", "missing"]),
        ([GOOD, {**GOOD, "negs": "n1 n2".split() + [7]}], [], [":2", "field 'negs'", "list of strings"]),
        ([GOOD, {**GOOD, "query": " "}], [], [":2", "field 'query'", "empty text", "allow_empty_text"]),
        ([GOOD, GOOD, {**GOOD, "pos": ""}], [], [":3", "field 'pos'", "empty text"]),
        ([GOOD, {"query": "q", "pos": "p"}], ["--hard-negative-fallback", "error"],
         [":2", "field 'negs'", "0 hard negatives, 4 required"]),
    ],
)  # fmt: skip
def test_bad_retrieval_records(guarded, tmp_path, rows, flags, expected):
    path = write(tmp_path / "bad.jsonl", [*rows, *[GOOD] * 20])
    with pytest.raises(DataError) as error:
        start(guarded, "--train-files", str(path), *flags)
    message = str(error.value)
    assert str(path) in message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize(
    "row, dataset_extra, expected",
    [
        ({"text1": "a", "text2": "b", "score": "high"}, {}, ["field 'score'", "neither a number nor an NLI label"]),
        ({"text1": "a", "text2": "b", "score": 7.5}, {"score_range": [0, 5]},
         ["field 'score'", "outside the declared range"]),
        ({"text1": "a", "text2": "b", "label": "probably"}, {}, ["field 'label'", "NLI label"]),
    ],
)  # fmt: skip
def test_bad_pair_records(guarded, tmp_path, row, dataset_extra, expected):
    good = {"text1": "a", "text2": "b", "score": 1}
    path = write(tmp_path / "pairs.jsonl", [good, row] + [good] * 20)
    config = tmp_path / "data.yaml"
    config.write_text(json.dumps({"data": {"datasets": [{"path": str(path), "task": "sts", **dataset_extra}]}}))
    with pytest.raises(DataError) as error:
        start(guarded, "--config", str(config))
    assert f"{path}:2" in str(error.value)
    for part in expected:
        assert part in str(error.value)


def test_classification_with_a_single_label(guarded, tmp_path):
    path = write(tmp_path / "labels.jsonl", [{"text": f"t{i}", "label": "only"} for i in range(30)])
    with pytest.raises(DataError, match=r"labels\.jsonl: field 'label': a classification dataset needs at least two"):
        start(guarded, "--train-files", f"classification:{path}")


def test_dataset_too_small_for_its_batch(guarded, tmp_path):
    path = write(tmp_path / "small.jsonl", [GOOD] * 3)
    with pytest.raises(ConfigError, match=r"small \(.*small\.jsonl\) has 3 usable examples, fewer than its global"):
        start(guarded, "--train-files", str(path))


def test_placeholder_inside_user_text_is_reported_and_removed(guarded, tmp_path, quickstart_stage1):
    path = write(tmp_path / "ph.jsonl", [GOOD, {**GOOD, "query": "before <|im_start|> after"}] + [GOOD] * 20)
    config = load_config(
        ["--config", str(REPO / "configs/quickstart/stage2.yaml"), "--train-files", str(path),
         "--init-from", str(quickstart_stage1), "--output-dir", str(tmp_path / "s2")],
        base=STAGE_DEFAULTS[2],
    )  # fmt: skip
    lines = validate_run(config)
    assert any(f"{path}:2 (query) contains the placeholder '<|im_start|>'" in line for line in lines), lines
    from tpembed.train import build

    text = build.build_text(config, build.init_source(config)[0])
    specs, _ = build.build_datasets(config, text.text_format)
    batch = build.build_batches(config, specs, build.build_sampler(config, specs), text, 1, 0)._retrieval(
        specs[0], 0, 0, [1]
    )
    ids = batch.anchors["input_ids"][0].tolist()
    assert ids.count(151644) == 1, "exactly one placeholder: the one in the template"


def test_unknown_config_key_and_wrong_type(guarded, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lerning_rate: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lerning_rate'"):
        start(guarded, "--config", str(bad))
    with pytest.raises(ConfigError, match="--warmup-steps: expected an integer"):
        start(guarded, "--warmup-steps", "ten")


@pytest.mark.parametrize(
    "dims, message",
    [(["128", "4096"], "4096 > head output_dim 1792"), (["512", "256"], "sorted"), (["64", "64"], "duplicates")],
)
def test_bad_mrl_dims(guarded, dims, message):
    with pytest.raises(ConfigError, match=f"loss.mrl_dims: .*{message}"):
        start(guarded, "--mrl-dims", *dims)


def test_tp_layers_outside_the_model(guarded, quickstart_stage1, tmp_path):
    with pytest.raises(ConfigError, match=r"--tp-layers\): tp_layers '1-9': layer 8 is outside the model, which has 8"):
        start(tmp_path / "s2", "--config", str(REPO / "configs/quickstart/stage2.yaml"), "--init-from",
              str(quickstart_stage1), "--tp-layers", "1-9", "--resume-from", "none", stage=2)  # fmt: skip


def test_tokenizer_without_the_placeholder(guarded, quickstart_stage1, tmp_path):
    with pytest.raises(ConfigError, match=r"no placeholder token '<\|nope\|>'"):
        start(tmp_path / "s2", "--config", str(REPO / "configs/quickstart/stage2.yaml"), "--init-from",
              str(quickstart_stage1), "--placeholder-token", "<|nope|>", "--add-placeholder", "false",
              "--resume-from", "none", stage=2)  # fmt: skip


def test_init_from_something_that_is_not_a_stage1_checkpoint(guarded, tmp_path, quickstart_stage2):
    (tmp_path / "empty").mkdir()
    for target, message in [(tmp_path / "empty", "is not a tpembed checkpoint"),
                            (quickstart_stage2[0], "is a stage-2 checkpoint")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            start(tmp_path / "s2", "--config", str(REPO / "configs/quickstart/stage2.yaml"), "--init-from",
                  str(target), "--resume-from", "none", stage=2)  # fmt: skip


def test_template_and_instruction_longer_than_the_max_length(guarded):
    with pytest.raises(ConfigError, match=r"data.query_max_len: 16 tokens leave no room for text in dataset"):
        start(guarded, "--query-max-len", "16")


def test_a_fresh_run_refuses_a_directory_with_checkpoints(guarded):
    config = load_config(["--config", str(QUICKSTART), "--output-dir", str(guarded), "--report-to", "none"])
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(config)


def test_validate_command(tmp_path, capsys):
    assert validate_main(["--config", str(QUICKSTART)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("valid:") and "snli_triplets_en: retrieval, 640 examples" in out
    # the console command's exit status and error output, in a process of its own
    path = write(tmp_path / "bad.jsonl", [GOOD, '{"query": 1, "pos": "p"}'])
    command = [sys.executable, "-m", "tpembed.train.validate", "--config", str(QUICKSTART), "--train-files", str(path)]
    bad = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert f"invalid: {path}:2: field 'query': expected a string, got int" in bad.stderr
    assert "Traceback" not in bad.stderr
