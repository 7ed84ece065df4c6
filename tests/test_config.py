"""Config: every YAML loads, precedence defaults <- YAML <- flags, errors name the key."""

from pathlib import Path

import pytest
import yaml

from tpembed.train.config import ConfigError, leaf_fields, load_config, load_saved_config, save_config

REPO = Path(__file__).resolve().parents[1]
# run configs; configs/eval/ holds evaluation task files (checked in test_eval.py)
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "eval")


def test_there_are_configs():
    names = {str(p.relative_to(REPO / "configs")) for p in CONFIGS}
    assert {"quickstart/stage1.yaml", "stage1/qwen3_8b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_yaml_loads_against_the_schema(path):
    config = load_config(["--config", str(path)])
    assert config.train.max_steps > 0


def test_published_stage1_recipe_values():
    config = load_config(["--config", str(REPO / "configs/stage1/qwen3_8b.yaml")])
    assert config.optim.learning_rate == 3e-5 and config.train.max_steps == 32000
    assert config.optim.warmup_steps == 300 and config.optim.weight_decay == 0.01
    assert config.loss.temperature == 0.02 and config.loss.mrl_dims == [128, 256, 512, 768, 1024, 1280, 1536, 1792]
    assert (config.data.batch_size, config.data.num_hard_negatives) == (256, 4)
    assert (config.data.query_max_len, config.data.passage_max_len) == (256, 1536)
    assert config.model.output_dim == 1792 and config.train.mixed_precision == "bf16"


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"learning_rate": 1e-4, "warmup_steps": 7}, "train": {"max_steps": 50}}))
    config = load_config(["--config", str(path), "--learning-rate", "3e-5", "--output-dir", "runs/x"])
    assert config.optim.learning_rate == 3e-5  # flag beats YAML
    assert config.optim.warmup_steps == 7  # YAML beats default
    assert config.train.max_steps == 50
    assert config.train.output_dir == "runs/x"
    assert config.optim.weight_decay == 0.01  # default


def test_list_and_optional_flags():
    config = load_config(
        ["--train-files", "a.jsonl", "sts:b.jsonl", "--mrl-dims", "64", "128", "--false-negative-margin", "0.1"]
    )
    assert config.data.train_files == ["a.jsonl", "sts:b.jsonl"]
    assert config.loss.mrl_dims == [64, 128]
    assert config.loss.false_negative_margin == 0.1
    assert load_config(["--false-negative-margin", "none"]).loss.false_negative_margin is None


def test_unknown_key_fails_with_its_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"optim": {"learning_rat": 1e-4}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.learning_rat'"):
        load_config(["--config", str(path)])
    path.write_text(yaml.safe_dump({"optimizer": {}}))
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
        load_config(["--config", str(path)])
    path.write_text(yaml.safe_dump({"data": {"datasets": [{"path": "a.jsonl", "instrucion": "x"}]}}))
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]\.instrucion"):
        load_config(["--config", str(path)])


@pytest.mark.parametrize(
    "values, key",
    [
        ({"optim": {"learning_rate": "fast"}}, "optim.learning_rate"),
        ({"train": {"max_steps": 1.5}}, "train.max_steps"),
        ({"model": {"gradient_checkpointing": "yes"}}, "model.gradient_checkpointing"),
        ({"loss": {"mrl_dims": 128}}, "loss.mrl_dims"),
        ({"data": {"datasets": [{"path": "a", "task": "ranking"}]}}, r"data.datasets\[0\].task"),
        ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision"),
    ],
)
def test_wrong_type_fails_with_the_key(tmp_path, values, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=key):
        load_config(["--config", str(path)])


def test_bad_flag_value_names_the_flag():
    with pytest.raises(ConfigError, match="--max-steps"):
        load_config(["--max-steps", "many"])


@pytest.mark.parametrize(
    "dims, message",
    [(["128", "2048"], "2048 > head"), (["256", "128"], "sorted"), (["128", "128"], "duplicates")],
)
def test_mrl_dims_checked_against_the_head(dims, message):
    with pytest.raises(ConfigError, match=f"loss.mrl_dims.*{message}"):
        load_config(["--mrl-dims", *dims])


def test_flag_names_are_unique_and_kebab_case():
    leaves = leaf_fields()  # raises on a duplicate name
    assert {"learning_rate", "max_steps", "output_dir", "train_files", "tp_layers"} <= set(leaves)


def test_saved_config_round_trips(tmp_path):
    config = load_config(["--config", str(REPO / "configs/quickstart/stage1.yaml"), "--learning-rate", "0.5"])
    save_config(config, tmp_path / "config.yaml")
    assert load_saved_config(tmp_path / "config.yaml") == config
