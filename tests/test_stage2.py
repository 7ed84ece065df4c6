"""Stage 2 on the quickstart: from a stage-1 checkpoint, multi-task, Token Prepending on."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import REPO
from tpembed.data import Task
from tpembed.modeling import Encoder, read_encoder_spec
from tpembed.train import build
from tpembed.train.config import STAGE_DEFAULTS, ConfigError, load_config
from tpembed.train.embedder import Embedder
from tpembed.train.loop import scaled_learning_rate, train

STAGE2 = REPO / "configs" / "quickstart" / "stage2.yaml"


def stage2_config(quickstart_stage1, output_dir, *flags):
    return load_config(
        ["--config", str(STAGE2), "--init-from", str(quickstart_stage1), "--output-dir", str(output_dir), *flags],
        base=STAGE_DEFAULTS[2],
    )


def test_stage2_starts_from_stage1_weights_with_tp_active(quickstart_stage1, tmp_path):
    config = stage2_config(quickstart_stage1, tmp_path / "s2")
    model_dir, source = build.init_source(config)
    assert source.train.stage == 1
    text = build.build_text(config, model_dir)
    assert text.text_format.placeholder == "<|im_start|>" and not text.placeholder_added
    encoder = build.build_encoder(config, text, model_dir)
    stage1 = Encoder.from_pretrained(model_dir)
    for (name, a), (_, b) in zip(encoder.state_dict().items(), stage1.state_dict().items()):
        assert torch.equal(a, b), name
    assert encoder.token_prepending.layers == (1, 2, 3, 4, 5, 6, 7)

    specs, _ = build.build_datasets(config, text.text_format)
    batches = build.build_batches(config, specs, build.build_sampler(config, specs), text, 1, 0)
    batch = batches.micro_batch(0, 0)
    anchors = batch.anchors
    assert (
        anchors["input_ids"][torch.arange(len(anchors["input_ids"])), anchors["placeholder_positions"]] == 151644
    ).all()
    with torch.no_grad():
        with_tp = encoder(**anchors)
        assert encoder.token_prepending.applied_layers == [1, 2, 3, 4, 5, 6, 7]
        encoder.set_tp_layers("none")
        without_tp = encoder(**anchors)
    assert not torch.allclose(with_tp, without_tp, atol=1e-4)


def test_quickstart_stage2_trains(quickstart_stage2, tmp_path):
    run_dir, stderr = quickstart_stage2
    assert "config values that differ from the stage-1 run" in stderr
    assert "data.template: 'instruction' -> 'prompteol'" in stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 10 and all(math.isfinite(r["loss"]) for r in records)
    assert {r["task"] for r in records} <= {"retrieval", "sts", "classification"}
    spec = read_encoder_spec(run_dir / "checkpoints" / "step-00000010" / "model")
    assert spec.tp_layers == [1, 2, 3, 4, 5, 6, 7] and spec.placeholder_token == "<|im_start|>"

    # the stage-2 model encodes with the template and TP it was trained with
    embedder = Embedder.from_checkpoint(run_dir)
    assert embedder.text.text_format.template.name == "prompteol"
    embeddings = embedder.encode(["a man is playing a guitar", "一架飞机要起飞了。"], instruction="similar")
    assert embeddings.shape == (2, 1792) and torch.isfinite(embeddings).all()

    with pytest.raises(ConfigError, match="stage-2 checkpoint"):
        build.init_source(stage2_config(run_dir, tmp_path / "again"))


def test_init_from_something_else_fails(tmp_path):
    with pytest.raises(ConfigError, match="not a tpembed checkpoint"):
        build.init_source(stage2_config(tmp_path, tmp_path / "x"))
    with pytest.raises(ConfigError, match=r"model.init_from: .*missing-run does not exist"):
        build.init_source(stage2_config(tmp_path / "missing-run", tmp_path / "x"))


def test_init_from_a_checkpoints_model_folder(quickstart_stage1, tmp_path):
    checkpoint = build.init_source(stage2_config(quickstart_stage1, tmp_path / "a"))[0].parent
    model_dir, source = build.init_source(stage2_config(checkpoint / "model", tmp_path / "b"))
    assert model_dir == checkpoint / "model" and source.train.stage == 1


def test_stage2_sampler_never_mixes_datasets_and_respects_eta(quickstart_stage1, tmp_path, qwen_tokenizer):
    config = stage2_config(quickstart_stage1, tmp_path / "s2")
    text = build.build_text(config, build.init_source(config)[0])
    specs, _ = build.build_datasets(config, text.text_format)
    sampler = build.build_sampler(config, specs)
    retrieval = np.array([s.task is Task.retrieval for s in specs])
    assert sampler.probabilities[retrieval].sum() == pytest.approx(0.72)
    builders = [build.build_batches(config, specs, sampler, text, 2, rank) for rank in range(2)]
    for step in range(24):
        names = {b.micro_batch(step, 0).dataset for b in builders}
        assert names == {specs[sampler.dataset_at(step)].data.name}


def test_interleaved_schedule_from_the_config_alternates_task_types(quickstart_stage1, tmp_path):
    config = stage2_config(quickstart_stage1, tmp_path / "s2", "--schedule", "interleaved", "--eta-ret", "0.5")
    text = build.build_text(config, build.init_source(config)[0])
    specs, _ = build.build_datasets(config, text.text_format)
    sampler = build.build_sampler(config, specs)
    is_retrieval = [specs[sampler.dataset_at(step)].task is Task.retrieval for step in range(40)]
    # eta_ret 0.5 between two groups: never more than two steps of one task type in a row
    assert not any(is_retrieval[i] == is_retrieval[i + 1] == is_retrieval[i + 2] for i in range(38))
    assert sum(is_retrieval) in (19, 20, 21) and sampler.state_dict()["schedule"] == "interleaved"


def test_sts_pairs_are_used_in_both_directions(qwen_tokenizer, tmp_path):
    from tpembed.data import BatchBuilder, DatasetSpec, GroupedStepSampler, Lengths, TextFormat, read_dataset

    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"text1": "alpha", "text2": "beta", "score": 1}\n{"text1": "gamma", "text2": "delta", "score": 0}\n'
    )
    data = read_dataset(path, "sts", "pairs")
    sampler = GroupedStepSampler([len(data)], [4], seed=0, probabilities=np.array([1.0]))
    builder = BatchBuilder(
        [DatasetSpec(data, None, 4)], sampler, qwen_tokenizer, TextFormat(append_eos=False), Lengths(16, 16), seed=0
    )
    batch = builder.micro_batch(0, 0)

    def decode(side):
        return [
            qwen_tokenizer.decode(ids[m.bool()])
            for ids, m in zip(getattr(batch, side)["input_ids"], getattr(batch, side)["attention_mask"])
        ]

    pairs = set(zip(decode("anchors"), decode("candidates")))
    assert pairs == {("alpha", "beta"), ("beta", "alpha"), ("gamma", "delta"), ("delta", "gamma")}
    assert sorted(batch.scores.tolist()) == [0.0, 0.0, 1.0, 1.0]


def test_classification_examples_follow_labels(qwen_tokenizer, tmp_path):
    from tpembed.data import BatchBuilder, DatasetSpec, GroupedStepSampler, Lengths, TextFormat, read_dataset

    rows = [{"text": f"{label}{i}", "label": label} for label in "abc" for i in range(4)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = read_dataset(path, "classification", "c")
    sampler = GroupedStepSampler([len(data)], [6], seed=0, probabilities=np.array([1.0]))
    builder = BatchBuilder(
        [DatasetSpec(data, None, 6, num_hard_negatives=2)],
        sampler,
        qwen_tokenizer,
        TextFormat(append_eos=False),
        Lengths(16, 16),
        seed=0,
    )
    batch = builder.micro_batch(0, 0)
    anchors = [
        qwen_tokenizer.decode(i[m.bool()]) for i, m in zip(batch.anchors["input_ids"], batch.anchors["attention_mask"])
    ]
    candidates = [
        qwen_tokenizer.decode(i[m.bool()])
        for i, m in zip(batch.candidates["input_ids"], batch.candidates["attention_mask"])
    ]
    labels = batch.candidate_labels.view(6, 3)
    for row, anchor in enumerate(anchors):
        positive, *negatives = candidates[3 * row : 3 * row + 3]
        assert positive[0] == anchor[0] and positive != anchor
        assert all(n[0] != anchor[0] for n in negatives)
        assert labels[row, 0] == batch.anchor_labels[row] and (labels[row, 1:] != batch.anchor_labels[row]).all()


def test_the_start_up_log_leaves_out_the_model_name_a_checkpoint_overrides():
    from types import SimpleNamespace

    from tpembed.data import ReadReport

    stage1 = load_config(["--name-or-path", "gguf:some/model.gguf", "--learning-rate", "5e-5"])
    config = load_config(["--stage", "2", "--learning-rate", "3e-5"])
    run = SimpleNamespace(text=SimpleNamespace(text_format=SimpleNamespace(placeholder="<p>")), tp_layers=(1, 2),
                          init_config=stage1, model_dir=Path("/runs/s1/checkpoints/step-1/model"), specs=[],
                          sampler=SimpleNamespace(probabilities=[]), report=ReadReport())  # fmt: skip
    lines = build.describe(run, config)
    assert "  optim.learning_rate: 5e-05 -> 3e-05" in lines
    assert not any("name_or_path" in line for line in lines), lines


def test_scaled_learning_rate_scales_one_adamw_update_and_restores_the_schedule():
    """AdamW's first update is lr * g / (|g| + eps) per coordinate (bias-corrected moments are g and g^2):
    inside the block it moves each weight by scale * lr, and the scheduled rates come back after."""
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    optimizer = torch.optim.AdamW(
        [{"params": [weight], "weight_decay": 0.0}, {"params": [], "weight_decay": 0.0}], lr=0.1, eps=1e-12
    )
    (weight * torch.tensor([2.0, -3.0, 0.5])).sum().backward()  # gradient signs +, -, +
    with scaled_learning_rate(optimizer, 0.25):
        assert [g["lr"] for g in optimizer.param_groups] == [0.025, 0.025]
        optimizer.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.1]
    assert torch.allclose(weight.detach(), torch.tensor([1.0 - 0.025, -2.0 + 0.025, 3.0 - 0.025]))


def test_a_datasets_lr_scale_applies_to_the_updates_of_its_steps(quickstart_stage1, tmp_path):
    """Through the loop: the rate the optimizer steps with (seen by a step hook) is the linear schedule's
    rate, times the sts dataset's lr_scale on the steps that draw it; metrics.jsonl logs the same."""
    run_dir = tmp_path / "s2"
    config = stage2_config(
        quickstart_stage1, run_dir, "--max-steps", "6", "--warmup-steps", "0", "--save-every", "6",
        "--eta-ret", "0.5", "--schedule", "interleaved", "--report-to", "none", "--progress-bar", "false",
    )  # fmt: skip
    sts = next(d for d in config.data.datasets if d.task == Task.sts)
    sts.lr_scale = 0.25
    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append({g["lr"] for g in optimizer.param_groups})
    )
    try:
        train(config)
    finally:
        hook.remove()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tasks = [r["task"] for r in records]
    assert "sts" in tasks and "retrieval" in tasks
    for step, (record, rates) in enumerate(zip(records, seen, strict=True), start=1):
        expected = 2e-4 * (6 - step + 1) / 6 * (0.25 if record["task"] == "sts" else 1.0)
        assert len(rates) == 1 and rates.pop() == pytest.approx(expected) and record["lr"] == pytest.approx(expected)


def test_lr_scale_must_be_positive(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  datasets:\n    - {path: x.jsonl, lr_scale: 0}\n")
    with pytest.raises(ConfigError, match="lr_scale"):
        load_config(["--config", str(bad)], base=STAGE_DEFAULTS[2])
