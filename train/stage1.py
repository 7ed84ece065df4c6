"""Stage 1: contrastive retrieval pre-training with a Matryoshka head.

    # the embedded default: tiny Qwen3 + bundled sample, CPU, a few minutes, offline
    accelerate launch train/stage1.py --config configs/quickstart/stage1.yaml

    # the published recipe (Qwen3-8B, 32k steps, LR 3e-5) on 8 GPUs with DeepSpeed ZeRO-3 and GradCache
    accelerate launch --config_file launch/deepspeed_zero3.yaml train/stage1.py \\
        --config configs/stage1/qwen3_8b.yaml --output-dir runs/qwen3_8b_stage1

Any config field is also a flag (`--learning-rate 3e-5`, `--max-steps 100`,
`--train-files a.jsonl b.jsonl`); `--help` lists them all.
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
        config = load_config(argv, base=STAGE_DEFAULTS[1], description=__doc__)
        train(config)
    except (ConfigError, DataError) as error:  # bad input: the message names file, line and field
        sys.exit(f"error: {error}")
    except NonFiniteError as error:
        sys.exit(f"stopped: {error}")


if __name__ == "__main__":
    main()
