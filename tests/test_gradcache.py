"""GradCache == the plain path: same loss and the same gradient on every parameter."""

import copy

import numpy as np
import pytest
import torch

from conftest import REPO
from tpembed.data import TEMPLATES, BatchBuilder, DatasetSpec, GroupedStepSampler, Lengths, TextFormat, read_dataset
from tpembed.modeling import EmbeddingObjective
from tpembed.train.gradcache import cached_micro_step, split_rows, take_rows
from tpembed.train.loop import micro_step_loss

SAMPLES = REPO / "data" / "samples"
DATA = {
    "retrieval": ("snli_triplets_en.jsonl", "retrieve"),
    "sts": ("snli_pairs_en.jsonl", "similar"),
    "classification": ("cmrc2018_questions_zh.jsonl", "topic"),
}


def make_batch(task, tokenizer, tp, batch_size=6):
    path, instruction = DATA[task]
    data = read_dataset(SAMPLES / path, task, task)
    text_format = (
        TextFormat(template=TEMPLATES["prompteol"], placeholder="<|im_start|>", append_eos=False)
        if tp
        else TextFormat()
    )
    sampler = GroupedStepSampler([len(data)], [batch_size], seed=1, probabilities=np.array([1.0]))
    spec = DatasetSpec(data, instruction, batch_size, num_hard_negatives=2)
    builder = BatchBuilder([spec], sampler, tokenizer, text_format, Lengths(48, 48), seed=1)
    return builder.micro_batch(0, 0)


def gradients(encoder):
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad(set_to_none=True)
    return grads


def assert_same(loss_a, grads_a, loss_b, grads_b):
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        scale = max(1.0, float(grads_a[name].abs().max()))
        assert float((grads_b[name] - grads_a[name]).abs().max()) <= 1e-5 * scale, name


@pytest.mark.parametrize("task", ["retrieval", "sts", "classification"])
@pytest.mark.parametrize("tp", [False, True], ids=["plain", "token-prepending"])
@pytest.mark.parametrize("split", [{"max_rows": 4}, {"token_budget": 120}], ids=["rows", "tokens"])
def test_gradcache_equals_plain_backward(task, tp, split, tiny_encoder, qwen_tokenizer):
    encoder = tiny_encoder.train()
    if tp:
        encoder.set_tp_layers("1-7")
    objective = EmbeddingObjective(mrl_dims=[64, 512, 1792], temperature=0.05, cosent_temperature=0.05)
    batch = make_batch(task, qwen_tokenizer, tp)

    plain_stats, cached_stats = {}, {}
    loss, _ = micro_step_loss(encoder, objective, batch, "cpu", stats=plain_stats)
    loss.backward()
    plain = gradients(encoder)

    pieces = []

    def backward(piece, last):
        pieces.append(last)
        piece.backward()

    cached_loss, _, produced = cached_micro_step(
        encoder, objective, batch, "cpu", backward, **split, stats=cached_stats
    )
    assert produced and len(pieces) > 2 and pieces[-1] and not any(pieces[:-1])
    assert_same(loss.detach(), plain, cached_loss, gradients(encoder))
    # the collapse signal logged by the loop is the same on both paths
    assert -1 < plain_stats["mean_cosine"].item() < 1
    torch.testing.assert_close(cached_stats["mean_cosine"], plain_stats["mean_cosine"], rtol=1e-5, atol=1e-6)


def test_dropout_masks_are_replayed(tiny_backbone, qwen_tokenizer):
    """With dropout on, each re-embedded mini-batch equals its first (no-graph) embedding."""
    from tpembed.modeling import Encoder, EncoderSpec

    backbone = copy.deepcopy(tiny_backbone)
    for module in backbone.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.3
    backbone.config.attention_dropout = 0.3
    encoder = Encoder(backbone, EncoderSpec()).train()
    objective = EmbeddingObjective(mrl_dims=[1792], temperature=0.05)
    batch = make_batch("retrieval", qwen_tokenizer, tp=False)
    outputs = []
    original = encoder.forward

    def recording_forward(*args, **kwargs):
        outputs.append(original(*args, **kwargs).detach())
        return outputs[-1]

    encoder.forward = recording_forward
    cached_micro_step(encoder, objective, batch, "cpu", lambda piece, last: None, max_rows=4)
    half = len(outputs) // 2
    assert half >= 2
    for first, again in zip(outputs[:half], outputs[half:]):
        torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.allclose(outputs[0], original(**take_rows(batch.anchors, range(0, 4), "left")), atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_gradcache_with_activation_checkpointing(dropout, tiny_backbone, qwen_tokenizer):
    """The two memory savers together: recomputing each layer in the backward pass changes no gradient.

    Without dropout the checkpointed GradCache step equals the plain (uncheckpointed, unsplit) backward.
    With dropout the masks of the recomputed layers must be the ones of the re-embedding pass:
    the checkpointed cached step then equals the uncheckpointed one from the same random state."""
    from tpembed.modeling import Encoder, EncoderSpec
    from tpembed.modeling.backbone import enable_activation_checkpointing

    backbone = copy.deepcopy(tiny_backbone)
    if dropout:
        for module in backbone.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = dropout
        backbone.config.attention_dropout = dropout
    checkpointed_backbone = copy.deepcopy(backbone)
    enable_activation_checkpointing(checkpointed_backbone)  # as load_backbone does, before TP is attached
    assert all(layer.gradient_checkpointing for layer in checkpointed_backbone.layers)

    def build(model):
        torch.manual_seed(0)  # the same head on both
        encoder = Encoder(model, EncoderSpec(output_dim=1792)).train()
        encoder.set_tp_layers("1-7")
        return encoder

    encoder, checkpointed = build(backbone), build(checkpointed_backbone)
    for a, b in zip(checkpointed.head.parameters(), encoder.head.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    objective = EmbeddingObjective(mrl_dims=[64, 512, 1792], temperature=0.05)
    batch = make_batch("retrieval", qwen_tokenizer, tp=True)

    def cached(model):
        torch.manual_seed(7)
        loss, _, _ = cached_micro_step(model, objective, batch, "cpu", lambda piece, last: piece.backward(), max_rows=4)
        return loss, gradients(model)

    if dropout:
        reference = cached(encoder)
    else:
        loss, _ = micro_step_loss(encoder, objective, batch, "cpu")
        loss.backward()
        reference = (loss.detach(), gradients(encoder))
    assert_same(*reference, *cached(checkpointed))


def test_token_budget_split_keeps_rows_and_positions(qwen_tokenizer):
    batch = make_batch("retrieval", qwen_tokenizer, tp=True).candidates
    chunks = split_rows(batch["attention_mask"].sum(1), None, 100)
    assert [i for rows in chunks for i in rows] == list(range(batch["input_ids"].shape[0]))
    for rows in chunks:
        part = take_rows(batch, rows, "left")
        lengths = part["attention_mask"].sum(1)
        assert len(rows) == 1 or len(rows) * int(lengths.max()) <= 100
        assert (part["input_ids"][torch.arange(len(rows)), part["placeholder_positions"]] == 151644).all()
        assert (part["last_token_positions"] == part["input_ids"].shape[1] - 1).all()
