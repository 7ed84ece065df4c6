"""Padding-free packing: the same embeddings and loss as padded batches, with and without TP."""

import logging

import numpy as np
import pytest
import torch

from conftest import REPO
from tpembed.data import TEMPLATES, BatchBuilder, DatasetSpec, GroupedStepSampler, Lengths, TextFormat, read_dataset
from tpembed.modeling import EmbeddingObjective
from tpembed.train import build
from tpembed.train.config import load_config
from tpembed.train.gradcache import cached_micro_step
from tpembed.train.loop import micro_step_loss


def builders(tokenizer, tp):
    data = read_dataset(REPO / "data/samples/snli_triplets_en.jsonl", "retrieval", "snli")
    text_format = (
        TextFormat(template=TEMPLATES["prompteol"], placeholder="<|im_start|>", append_eos=False)
        if tp
        else TextFormat()
    )
    made = []
    for packing in (False, True):
        sampler = GroupedStepSampler([len(data)], [6], seed=2, probabilities=np.array([1.0]))
        spec = DatasetSpec(data, "retrieve", 6, num_hard_negatives=2)
        made.append(BatchBuilder([spec], sampler, tokenizer, text_format, Lengths(40, 40), seed=2, packing=packing,
                                 pack_row_tokens=64))  # fmt: skip
    return made


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A random-init Llama (SmolLM2's architecture) saved as safetensors, so that it loads through
    load_backbone like a real checkpoint."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=151_680, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaModel(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("tp", [False, True], ids=["plain", "token-prepending"])
@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_packed_equals_padded(tiny_encoder, qwen_tokenizer, tp, architecture, request):
    if architecture == "llama":
        from tpembed.modeling import Encoder, EncoderSpec, load_backbone

        torch.manual_seed(0)
        backbone = load_backbone(str(request.getfixturevalue("tiny_llama_dir")))
        tiny_encoder = Encoder(backbone, EncoderSpec(output_dim=1792)).eval()
    if tp:
        tiny_encoder.set_tp_layers("1-7")
    padded_builder, packed_builder = builders(qwen_tokenizer, tp)
    padded, packed = padded_builder.micro_batch(0, 0), packed_builder.micro_batch(0, 0)
    for side in (packed.anchors, packed.candidates):  # rows of at most 64 tokens, each shared by several texts
        assert "attention_mask" not in side and side["input_ids"].shape[1] <= 64
        assert side["input_ids"].shape[0] < len(side["sequence_lengths"])
    real = sum(int(side["sequence_lengths"].sum()) for side in (packed.anchors, packed.candidates))
    assert packed.num_tokens == padded.num_tokens == real
    with torch.no_grad():
        for side in ("anchors", "candidates"):
            torch.testing.assert_close(
                tiny_encoder(**getattr(packed, side)), tiny_encoder(**getattr(padded, side)), atol=1e-5, rtol=1e-5
            )
    objective = EmbeddingObjective(mrl_dims=[64, 1792], temperature=0.05)
    padded_loss, _ = micro_step_loss(tiny_encoder, objective, padded, "cpu")
    packed_loss, _ = micro_step_loss(tiny_encoder, objective, packed, "cpu")
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)


def test_gradcache_over_packed_batches(tiny_encoder, qwen_tokenizer):
    tiny_encoder.set_tp_layers("1-7")
    tiny_encoder.train()
    padded_builder, packed_builder = builders(qwen_tokenizer, tp=True)
    objective = EmbeddingObjective(mrl_dims=[64, 1792], temperature=0.05)
    loss, _ = micro_step_loss(tiny_encoder, objective, padded_builder.micro_batch(0, 0), "cpu")
    loss.backward()
    expected = {n: p.grad.clone() for n, p in tiny_encoder.named_parameters() if p.grad is not None}
    tiny_encoder.zero_grad(set_to_none=True)
    batch = packed_builder.micro_batch(0, 0)
    cached, _, _ = cached_micro_step(tiny_encoder, objective, batch, "cpu", lambda piece, last: piece.backward(),
                                     token_budget=150)  # fmt: skip
    torch.testing.assert_close(cached, loss.detach(), atol=1e-5, rtol=1e-5)
    for name, grad in expected.items():
        scale = max(1.0, float(grad.abs().max()))
        assert float((tiny_encoder.get_parameter(name).grad - grad).abs().max()) <= 1e-5 * scale, name


def test_unsupported_attention_falls_back_with_a_message(caplog):
    config = load_config(["--packing", "true", "--attn-implementation", "paged|sdpa"])
    with caplog.at_level(logging.WARNING, logger="tpembed"):
        assert build.packing_enabled(config) is False
    assert "cannot separate packed texts; falling back to padded batches" in caplog.text
    assert build.packing_enabled(load_config(["--packing", "true"])) is True


def test_first_fit_decreasing_rows():
    from tpembed.data.templates import pack_sequences, packed_sequences

    sequences = [[1] * 5, [2] * 3, [3] * 2, [4] * 4]  # placeholders at offsets 0, 1, 1, 3
    batch = pack_sequences(sequences, [0, 1, 1, 3])
    # capacity 5 (the longest): 5 -> row 0; 4 -> row 1; 3 -> row 2; 2 fits only row 2 (3 + 2)
    assert batch["sequence_rows"].tolist() == [0, 2, 2, 1]
    assert batch["sequence_starts"].tolist() == [0, 0, 3, 0]
    assert batch["input_ids"].tolist() == [[1] * 5, [4] * 4 + [0], [2, 2, 2, 3, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["last_token_positions"].tolist() == [4, 2, 4, 3]
    assert batch["placeholder_positions"].tolist() == [0, 1, 4, 3]
    assert packed_sequences(batch) == sequences
    # a row budget of 8: 5 + 3 and 4 + 2
    wide = pack_sequences(sequences, row_tokens=8)
    assert wide["sequence_rows"].tolist() == [0, 0, 1, 1] and wide["input_ids"].shape == (2, 8)
    assert packed_sequences(wide) == sequences
