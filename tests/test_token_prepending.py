"""Token Prepending through hooks == a hand-written layer loop that does the copy itself."""

import inspect

import pytest
import torch
from torch import nn
from transformers import AutoModel, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from transformers.masking_utils import create_causal_mask

from tpembed.modeling.backbone import enable_activation_checkpointing
from tpembed.modeling.token_prepending import TokenPrepending, format_tp_layers, parse_tp_layers

SMALL = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)
CONFIGS = {
    "qwen3": Qwen3Config,
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
    "gemma": GemmaConfig,
}
TP_LAYERS = (1, 2, 4)


def build(kind, attn="sdpa"):
    torch.manual_seed(0)
    return AutoModel.from_config(CONFIGS[kind](**SMALL), attn_implementation=attn).train()


def padded_batch(padding_side):
    """Three rows with the placeholder (id 7) at different places, padded on one side."""
    rows = [[11, 12, 7, 13, 14, 15, 16], [21, 7, 22, 23], [7, 31, 32, 33, 34]]
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    placeholder, last = [], []
    for i, row in enumerate(rows):
        start = length - len(row) if padding_side == "left" else 0
        ids[i, start : start + len(row)] = torch.tensor(row)
        mask[i, start : start + len(row)] = 1
        placeholder.append(start + row.index(7))
        last.append(start + len(row) - 1)
    return ids, mask, torch.tensor(placeholder), torch.tensor(last)


def reference_forward(model, inputs_embeds, mask, placeholder, last, layers):
    """The decoder run layer by layer, with the Token Prepending copy written out."""
    position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
    # transformers renamed the cache argument (past_key_values before 5.2x, cache after)
    cache_name = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    causal = create_causal_mask(
        config=model.config,
        inputs_embeds=inputs_embeds,
        attention_mask=mask,
        position_ids=position_ids,
        **{cache_name: None},
    )
    hidden = inputs_embeds
    position_embeddings = model.rotary_emb(hidden, position_ids)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    for index, layer in enumerate(model.layers):
        if index in layers:
            copied = hidden.clone()
            copied[rows, placeholder] = hidden[rows, last]
            hidden = copied
        hidden = layer(
            hidden, attention_mask=causal, position_embeddings=position_embeddings, position_ids=position_ids
        )
    return model.norm(hidden)


def hooked_forward(model, inputs_embeds, mask, placeholder, last, tp):
    return model(
        inputs_embeds=inputs_embeds, attention_mask=mask, **tp.call_kwargs(placeholder, last)
    ).last_hidden_state


def grads_of(model, embeds, output):
    weights = torch.randn_like(output)  # a generic scalar of every output element
    (output * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["inputs_embeds"] = embeds.grad.clone()
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hooks_equal_hand_written_layer_loop(kind, padding_side, attn):
    model = build(kind, attn)
    ids, mask, placeholder, last = padded_batch(padding_side)
    embeds = model.embed_tokens(ids).detach()

    # the reference's plumbing reproduces the plain model when no layer copies
    with torch.no_grad():
        plain = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(reference_forward(model, embeds, mask, placeholder, last, ()), plain)

    ref_embeds = embeds.clone().requires_grad_(True)
    expected = reference_forward(model, ref_embeds, mask, placeholder, last, TP_LAYERS)
    torch.manual_seed(1)
    expected_grads = grads_of(model, ref_embeds, expected)

    tp = TokenPrepending(TP_LAYERS).attach(model)
    hook_embeds = embeds.clone().requires_grad_(True)
    got = hooked_forward(model, hook_embeds, mask, placeholder, last, tp)
    torch.manual_seed(1)
    got_grads = grads_of(model, hook_embeds, got)
    tp.remove()

    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[real], plain[real], atol=1e-3), "TP must change the output"
    assert tp.applied_layers == list(TP_LAYERS)
    assert got_grads.keys() == expected_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


class CopyingLayer(nn.Module):
    """A second, independent mechanism: replace the layer module by a wrapper."""

    def __init__(self, layer, state):
        super().__init__()
        self.layer, self.state = layer, state

    def forward(self, hidden, *args, **kwargs):
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        copied = hidden.clone()
        copied[rows, self.state["placeholder"]] = hidden[rows, self.state["last"]]
        return self.layer(copied, *args, **kwargs)


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "gemma"])
def test_hooks_equal_a_layer_wrapper_on_other_architectures(kind):
    model = build(kind)
    ids, mask, placeholder, last = padded_batch("left")
    tp = TokenPrepending(TP_LAYERS).attach(model)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, **tp.call_kwargs(placeholder, last)).last_hidden_state
        tp.remove()
        plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
        state = {"placeholder": placeholder, "last": last}
        for index in TP_LAYERS:
            model.layers[index] = CopyingLayer(model.layers[index], state)
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[real], plain[real], atol=1e-3)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_gradient_checkpointing_gives_identical_results(padding_side):
    ids, mask, placeholder, last = padded_batch(padding_side)
    results = []
    for checkpointing in (False, True):
        model = build("qwen3")
        if checkpointing:
            enable_activation_checkpointing(model)
            assert all(layer.gradient_checkpointing for layer in model.layers)
        tp = TokenPrepending(TP_LAYERS).attach(model)
        embeds = model.embed_tokens(ids).detach().requires_grad_(True)
        # two forwards with different positions before one backward: the recomputation
        # of the first must use its own positions
        out_a = hooked_forward(model, embeds, mask, placeholder, last, tp)
        out_b = hooked_forward(model, embeds, mask, torch.zeros_like(placeholder) + last.min(), last, tp)
        torch.manual_seed(2)
        grads = grads_of(model, embeds, torch.cat([out_a, out_b]))
        results.append((out_a.detach(), out_b.detach(), grads))
    (a0, b0, g0), (a1, b1, g1) = results
    torch.testing.assert_close(a1, a0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b1, b0, atol=1e-6, rtol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)


def test_no_layers_is_the_plain_model_and_removal_leaves_no_trace():
    model = build("qwen3").eval()
    ids, mask, placeholder, last = padded_batch("left")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
        none = TokenPrepending(parse_tp_layers("none")).attach(model)
        assert torch.equal(
            model(input_ids=ids, attention_mask=mask, **none.call_kwargs(placeholder, last)).last_hidden_state, plain
        )
        none.remove()
        tp = TokenPrepending(TP_LAYERS).attach(model)
        assert all(len(layer._forward_pre_hooks) == 1 for layer in model.layers)
        changed = model(input_ids=ids, attention_mask=mask, **tp.call_kwargs(placeholder, last)).last_hidden_state
        assert not torch.equal(changed, plain)
        tp.remove()
        assert all(len(layer._forward_pre_hooks) == 0 for layer in model.layers)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, plain)


def test_layer_spec_parsing():
    assert parse_tp_layers("1-7") == (1, 2, 3, 4, 5, 6, 7)
    assert parse_tp_layers("1,3,5") == (1, 3, 5)
    assert parse_tp_layers("0-2,6") == (0, 1, 2, 6)
    assert parse_tp_layers("none") == () and parse_tp_layers(None) == ()
    assert format_tp_layers((1, 2, 3, 5)) == "1-3,5" and format_tp_layers(()) == "none"
    with pytest.raises(ValueError, match="layer 8 is outside the model, which has 8 decoder layers"):
        parse_tp_layers("1-8", num_layers=8)
    with pytest.raises(ValueError, match="cannot read"):
        parse_tp_layers("1-x")
    with pytest.raises(ValueError, match="cannot read"):
        parse_tp_layers("7-1")
