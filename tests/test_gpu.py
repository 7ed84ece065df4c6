"""Checks that need a CUDA GPU (bench/gpu_suite.sh runs them; skipped elsewhere): Token
Prepending and export parity in bf16 on CUDA, with the measured differences printed."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_token_prepending_equals_the_layer_loop_in_bf16_on_cuda():
    from test_token_prepending import TP_LAYERS, build, hooked_forward, padded_batch, reference_forward

    from tpembed.modeling.token_prepending import TokenPrepending

    model = build("qwen3").cuda().to(torch.bfloat16).eval()
    ids, mask, placeholder, last = (t.cuda() for t in padded_batch("left"))
    embeds = model.get_input_embeddings()(ids)
    tp = TokenPrepending(TP_LAYERS).attach(model)
    with torch.no_grad():
        hooked = hooked_forward(model, embeds, mask, placeholder, last, tp).float()
        tp.remove()
        reference = reference_forward(model, embeds, mask, placeholder, last, TP_LAYERS).float()
    real = mask.bool()
    difference = float((hooked - reference)[real].abs().max())
    scale = float(reference[real].abs().max())
    print(f"\nTP hooks vs layer loop, bf16 CUDA: max abs diff {difference:.3e} (max |value| {scale:.2f})")
    assert difference <= 1e-2 * scale


def test_export_parity_in_bf16_on_cuda(quickstart_stage2, tmp_path):
    from sentence_transformers import SentenceTransformer

    from tpembed.train.embedder import Embedder
    from tpembed.train.export import PARITY_TEXTS, export

    run_dir, _ = quickstart_stage2
    export(run_dir, tmp_path / "export")  # the fp32 CPU parity check runs inside
    model = SentenceTransformer(str(tmp_path / "export"), trust_remote_code=True, device="cuda",
                                model_kwargs={"dtype": torch.bfloat16})  # fmt: skip
    embedder = Embedder.from_checkpoint(run_dir, device="cuda", dtype="bfloat16")
    texts = list(PARITY_TEXTS)
    exported = model.encode(texts, prompt_name="document", convert_to_tensor=True).float().cpu()
    training = embedder.encode(texts).float()
    difference = float((exported - training).abs().max())
    cosine = torch.nn.functional.cosine_similarity(exported, training).min()
    print(f"\nexport vs training-time encoder, bf16 CUDA: max abs diff {difference:.3e}, min cosine {cosine:.6f}")
    assert cosine >= 0.999
