"""Stage 2: full-task fine-tuning with Token Prepending, from a stage-1 checkpoint.

    # continues the quickstart stage-1 run on CPU with a bundled multi-task sample
    accelerate launch train/stage2.py --config configs/quickstart/stage2.yaml

    # the published recipe (8k steps, LR 2e-5, TP at layers 1-7)
    accelerate launch --config_file launch/deepspeed_zero3.yaml train/stage2.py \\
        --config configs/stage2/qwen3_8b.yaml --init-from runs/qwen3_8b_stage1 --tp-layers 1-7

Stage 2 is stage 1's loop with the PromptEOL template (data side), Token
Prepending (model side), retrieval + sts + classification datasets, and the
backbone, head and tokenizer taken from `--init-from`.
"""

from tpembed.train.loop import run_stage


def main(argv: list[str] | None = None) -> None:
    run_stage(2, argv, __doc__)


if __name__ == "__main__":
    main()
