"""Check a run's config and datasets without training (no model weights are loaded).

    tpembed-validate --config configs/quickstart/stage1.yaml
    tpembed-validate --stage 2 --config configs/stage2/qwen3_8b.yaml --num-processes 8

Takes every flag a training script takes. It runs the start-up checks of a
training run: config keys and types, Matryoshka dims, the tokenizer and its
placeholder, Token Prepending layers against the backbone's layer count,
`--init-from`, every record of every dataset (file, line and field on error),
dataset sizes against batch sizes, and the split of each global batch over
processes and accumulation steps. Exits 1 with the error, 0 with a summary.
"""

from __future__ import annotations

import sys

from tpembed.data import DataError
from tpembed.train import build
from tpembed.train.config import STAGE_DEFAULTS, ConfigError, load_config


def validate_run(config, num_processes: int = 1) -> list[str]:
    """The training start-up checks (build.setup_run, as a training run does them); returns the
    summary lines (warnings included)."""
    return build.describe(build.setup_run(config, num_processes=num_processes), config)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    num_processes = 1
    if "--num-processes" in argv:
        index = argv.index("--num-processes")
        num_processes = int(argv[index + 1])
        del argv[index : index + 2]
    stage = int(argv[argv.index("--stage") + 1]) if "--stage" in argv else 1
    base = STAGE_DEFAULTS.get(stage, STAGE_DEFAULTS[1])
    try:
        config = load_config(argv, base=base, description=__doc__)
        lines = validate_run(config, num_processes)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as error:
        print(f"invalid: {error}", file=sys.stderr)
        return 1
    print("\n".join(["valid:"] + lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
