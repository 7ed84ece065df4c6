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
