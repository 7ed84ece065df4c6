"""Throughput telemetry: the FLOP count against the model's own layers, MFU by hand."""

import pytest
import torch

from tpembed.modeling.backbone import tiny_qwen3_config
from tpembed.train.events import ThroughputWindow as _Window
from tpembed.train.telemetry import FlopCounter, device_peak_tflops


def test_parameters_per_token_equal_the_decoder_matmul_weights(tiny_backbone):
    counter = FlopCounter(tiny_qwen3_config(), None, "cpu")
    linear = sum(
        m.weight.numel() for layer in tiny_backbone.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)
    )
    assert counter.parameters_per_token == linear == 8 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)


def test_step_flops_and_mfu_by_hand():
    counter = FlopCounter(tiny_qwen3_config(), 2.0, "cpu")
    tokens, squares = 1000.0, 50000.0
    expected = 6 * counter.parameters_per_token * tokens + 6 * 8 * 4 * 16 * squares
    assert counter.step(tokens, squares) == expected
    window = _Window()
    window.add(2.0, 64, tokens, expected)
    window.add(2.0, 64, tokens, expected)
    rates = window.rates(counter.peak, num_devices=2)
    assert rates["samples_per_s"] == pytest.approx(32.0) and rates["tokens_per_s"] == pytest.approx(500.0)
    assert rates["tflops_per_device"] == pytest.approx(expected / 2.0 / 2 / 1e12)
    assert rates["mfu"] == pytest.approx(rates["tflops_per_device"] / 2.0)
    assert "mfu" not in _Window().rates(None, 1)


def test_no_peak_is_assumed_for_a_cpu():
    assert device_peak_tflops("cpu") is None


def test_mean_cosine_by_hand():
    """The collapse signal logged as mean_cosine: the mean of cos(x_i, x_j) over i != j."""
    from tpembed.train.step import mean_cosine

    rows = torch.randn(7, 12, generator=torch.Generator().manual_seed(0)) + 0.5
    pairs = [
        torch.dot(rows[i], rows[j]).item() / (rows[i].norm().item() * rows[j].norm().item())
        for i in range(7)
        for j in range(7)
        if i != j
    ]
    assert mean_cosine(rows).item() == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    assert mean_cosine(torch.eye(5)).item() == pytest.approx(0.0, abs=1e-7)  # orthogonal texts
    same = torch.tensor([1.0, 2.0, 3.0]).repeat(4, 1) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    assert mean_cosine(same).item() == pytest.approx(1.0)  # every text on one direction: collapsed
    assert torch.isnan(mean_cosine(rows[:1]))
