"""Stage 2: full-task fine-tuning with Token Prepending, from a stage-1 checkpoint.

    # continues the quickstart stage-1 run on CPU with a bundled multi-task sample
    accelerate launch train/stage2.py --config configs/quickstart/stage2.yaml

    # the published recipe (8k steps, LR 2e-5, TP at layers 1-7)
    accelerate launch --config_file launch/multi_gpu.yaml train/stage2.py \\
        --config configs/stage2/qwen3_8b.yaml --init-from runs/qwen3_8b_stage1 --tp-layers 1-7

Stage 2 is stage 1's loop with the PromptEOL template (data side), Token
Prepending (model side), retrieval + sts + classification datasets, and the
backbone, head and tokenizer taken from `--init-from`.
"""

import sys
from pathlib import Path

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # train/ would shadow packages named like its modules

from train.config import load_config  # noqa: E402
from train.loop import train  # noqa: E402

# METHOD.md section 2: what stage 2 changes by default
STAGE2_DEFAULTS = {
    "train": {"stage": 2, "output_dir": "runs/stage2", "max_steps": 8000},
    "optim": {"learning_rate": 2e-5},
    "data": {"template": "prompteol", "append_eos": False, "eta_ret": 0.72},
    "tp": {"tp_layers": "1-7"},
}


def main(argv=None):
    config = load_config(argv, base=STAGE2_DEFAULTS, description=__doc__)
    train(config)


if __name__ == "__main__":
    main()
