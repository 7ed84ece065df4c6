"""The training-free path: a base LM with PromptEOL, with and without Token Prepending."""

import pytest
import torch

from tpembed.data import TEMPLATES, TextFormat, tokenize
from tpembed.modeling import TINY_QWEN3, load_backbone
from tpembed.modeling.backbone import tiny_qwen3_config
from tpembed.train.embedder import Embedder


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory, qwen_tokenizer_session):
    """A tiny Qwen3 saved like a hub checkpoint, with a vocabulary exactly as large as its tokenizer."""
    from transformers import AutoModel

    directory = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_qwen3_config(vocab_size=len(qwen_tokenizer_session)))
    model.save_pretrained(directory)
    qwen_tokenizer_session.save_pretrained(directory)
    return directory


def test_base_model_prompteol_embedding_is_the_last_hidden_state(base_model_dir):
    embedder = Embedder.from_base_model(str(base_model_dir), template="prompteol", tp_layers="none")
    assert embedder.encoder.head is None and embedder.embedding_dim == 64
    assert embedder.text.text_format.placeholder == "<|im_start|>"
    texts = ["A man is playing a guitar.", "A dog runs."]
    got = embedder.encode(texts)
    fmt = TextFormat(template=TEMPLATES["prompteol"], placeholder="<|im_start|>", append_eos=False)
    backbone = load_backbone(str(base_model_dir)).eval()
    for row, text in enumerate(texts):
        assert fmt.render(text, None).endswith("\u201d means in one word: \u201c")
        batch = tokenize(embedder.tokenizer, [fmt.pieces(text, None)], 512, fmt)
        with torch.no_grad():
            hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        torch.testing.assert_close(got[row], hidden[0, -1], atol=1e-5, rtol=1e-5)


def test_training_free_tp_changes_the_embedding(base_model_dir):
    plain = Embedder.from_base_model(str(base_model_dir), template="prompteol", tp_layers="none")
    with_tp = Embedder.from_base_model(str(base_model_dir), template="prompteol", tp_layers="1-7")
    texts = ["A man is playing a guitar.", "Someone plays an instrument."]
    a, b = plain.encode(texts), with_tp.encode(texts)
    assert not torch.allclose(a, b, atol=1e-4)
    assert with_tp.encoder.token_prepending.applied_layers == [1, 2, 3, 4, 5, 6, 7]


def test_missing_placeholder_is_added_and_embeddings_grow(base_model_dir):
    embedder = Embedder.from_base_model(
        str(base_model_dir), template="prompteol", placeholder="<|my_tp|>", tp_layers="1-3"
    )
    new_id = embedder.tokenizer.convert_tokens_to_ids("<|my_tp|>")
    assert new_id == 151646
    assert embedder.encoder.backbone.get_input_embeddings().num_embeddings == 151647
    assert torch.isfinite(embedder.encode(["hello"])).all()


def test_mean_pooling_without_template(base_model_dir):
    embedder = Embedder.from_base_model(str(base_model_dir), template="instruction", pooling="mean")
    assert embedder.text.text_format.placeholder is None
    assert embedder.encode(["hello world"]).shape == (1, 64)
    with pytest.raises(ValueError, match="placeholder"):
        Embedder.from_base_model(str(base_model_dir), template="instruction", tp_layers="1-3")


def test_builtin_tiny_model_works_as_a_base(qwen_tokenizer):
    embedder = Embedder.from_base_model(TINY_QWEN3, template="prompteol", tp_layers="1-7")
    assert embedder.encode(["x"]).shape == (1, 64)
