"""Stage 1: contrastive retrieval pre-training with a Matryoshka head.

    # the embedded default: tiny Qwen3 + bundled sample, CPU, a few minutes, offline
    accelerate launch train/stage1.py --config configs/quickstart/stage1.yaml

    # the published recipe (Qwen3-8B, 32k steps, LR 3e-5) on 8 GPUs with DeepSpeed ZeRO-3 and GradCache
    accelerate launch --config_file launch/deepspeed_zero3.yaml train/stage1.py \\
        --config configs/stage1/qwen3_8b.yaml --output-dir runs/qwen3_8b_stage1

Any config field is also a flag (`--learning-rate 3e-5`, `--max-steps 100`,
`--train-files a.jsonl b.jsonl`); `--help` lists them all.
"""

from tpembed.train.loop import run_stage


def main(argv: list[str] | None = None) -> None:
    run_stage(1, argv, __doc__)


if __name__ == "__main__":
    main()
