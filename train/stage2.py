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

import sys
from pathlib import Path

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # train/ would shadow packages named like its modules

from data import DataError  # noqa: E402
from train.config import STAGE_DEFAULTS, ConfigError, load_config  # noqa: E402
from train.loop import NonFiniteError, train  # noqa: E402


def main(argv=None):
    try:
        config = load_config(argv, base=STAGE_DEFAULTS[2], description=__doc__)
        train(config)
    except (ConfigError, DataError) as error:  # bad input: the message names file, line and field
        sys.exit(f"error: {error}")
    except NonFiniteError as error:
        sys.exit(f"stopped: {error}")


if __name__ == "__main__":
    main()
