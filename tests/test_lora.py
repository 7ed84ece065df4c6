"""LoRA through peft: only adapters, head and the added placeholder row train; export merges."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_script
from tpembed.modeling import Encoder
from tpembed.train.embedder import Embedder
from tpembed.train.export import export

PLACEHOLDER_ID = 151646  # "<|tp_added|>", the first token added after Qwen's three specials


@pytest.fixture(scope="module")
def lora_run(quickstart_stage1, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    flags = ["--max-steps", "3", "--save-every", "3", "--lora-rank", "8", "--placeholder-token", "<|tp_added|>"]
    run_script(
        "stage2.py", REPO / "configs/quickstart/stage2.yaml", run_dir, "--init-from", str(quickstart_stage1), *flags
    )
    return run_dir


def test_only_adapters_head_and_placeholder_row_change(lora_run, quickstart_stage1):
    before = Encoder.from_pretrained(quickstart_stage1 / "checkpoints/step-00000003/model").state_dict()
    model_dir = lora_run / "checkpoints/step-00000003/model"
    base = load_file(str(model_dir / "model.safetensors"))
    adapter = load_file(str(model_dir / "adapter/adapter_model.safetensors"))
    # the base weights on disk are stage 1's, untouched (one row added for the placeholder)
    for name, value in base.items():
        previous = before[f"backbone.{name}"]
        if name == "embed_tokens.weight":
            assert torch.equal(value[: previous.shape[0]], previous) or torch.equal(
                value[:PLACEHOLDER_ID], previous[:PLACEHOLDER_ID]
            )
        else:
            assert torch.equal(value, previous), name
    assert json.loads((model_dir / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] is None
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b), "lora_B starts at zero and must have moved"
    delta = adapter["base_model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert delta.shape[0] == 1 and delta.abs().max() > 0, "the placeholder row trains"
    head_before = before["head.linear.weight"]
    head_after = load_file(str(model_dir / "mrl_head.safetensors"))["linear.weight"]
    assert not torch.equal(head_before, head_after)


def test_resume_keeps_the_adapter_trainable(lora_run, quickstart_stage1):
    trained = Encoder.from_pretrained(lora_run / "checkpoints/step-00000003/model", merge_adapter=False)
    assert trained.has_adapter
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("head.")} == {"head.linear.weight", "head.linear.bias"}
    assert all("lora_" in n or "trainable_tokens" in n for n in trainable if not n.startswith("head."))
    run_script("stage2.py", REPO / "configs/quickstart/stage2.yaml", lora_run, "--init-from", str(quickstart_stage1),
               "--max-steps", "4", "--save-every", "4", "--lora-rank", "8", "--placeholder-token", "<|tp_added|>",
               "--resume-from", "auto")  # fmt: skip
    records = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_merged_export_equals_the_unmerged_model(lora_run, tmp_path):
    model_dir = lora_run / "checkpoints/step-00000003/model"
    unmerged = Encoder.from_pretrained(model_dir, merge_adapter=False).eval()
    merged = Embedder.from_checkpoint(model_dir)
    assert not merged.encoder.has_adapter
    texts = ["a man plays the guitar", "一架飞机要起飞了。"]
    reference = Embedder(unmerged, merged.tokenizer, merged.text)
    torch.testing.assert_close(merged.encode(texts, "similar"), reference.encode(texts, "similar"), atol=1e-5, rtol=0)
    report = export(model_dir, tmp_path / "export", query_instruction="similar")
    assert max(report.max_abs_diff.values()) <= 1e-5
    assert not (tmp_path / "export" / "adapter").exists()
    assert "peft" not in (tmp_path / "export" / "tpembed_st.py").read_text()
