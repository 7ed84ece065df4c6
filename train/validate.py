"""Check a run's config and datasets without training (no model weights are loaded).

    python -m train.validate --config configs/quickstart/stage1.yaml
    python -m train.validate --stage 2 --config configs/stage2/qwen3_8b.yaml --num-processes 8

Takes every flag a training script takes. It runs the start-up checks of a
training run: config keys and types, Matryoshka dims, the tokenizer and its
placeholder, Token Prepending layers against the backbone's layer count,
`--init-from`, every record of every dataset (file, line and field on error),
dataset sizes against batch sizes, and the split of each global batch over
processes and accumulation steps. Exits 1 with the error, 0 with a summary.
"""

from __future__ import annotations

import sys

from data import DataError

from . import build
from .config import STAGE_DEFAULTS, ConfigError, load_config


def validate_run(config, num_processes: int = 1) -> list[str]:
    """The training start-up checks; returns the summary lines (warnings included)."""
    init = build.init_source(config)
    model_dir = init[0] if init else None
    text = build.build_text(config, model_dir)
    tp_layers = build.check_tp_layers(config, model_dir)
    specs, report = build.build_datasets(config, text.text_format)
    build.check_lengths(config, specs, text)
    sampler = build.build_sampler(config, specs)
    build.build_batches(config, specs, sampler, text, num_processes, 0)
    lines = [
        f"stage {config.train.stage}: template {config.data.template}, placeholder {text.text_format.placeholder}, "
        f"Token Prepending layers {tp_layers or 'none'}",
    ]
    if init:
        lines.append(f"starts from the stage-1 checkpoint {model_dir.parent}")
    for spec, probability in zip(specs, sampler.probabilities):
        lines.append(
            f"  {spec.data.name}: {spec.task.value}, {len(spec.data)} examples, global batch {spec.batch_size}, "
            f"picked at {probability:.1%} of steps"
        )
    if report.dropped_empty_negatives:
        lines.append(f"warning: {report.dropped_empty_negatives} empty hard negatives will be dropped")
    if report.dropped_singleton_labels:
        lines.append(f"warning: {report.dropped_singleton_labels} classification texts have a label of their own")
    for location in report.placeholder_in_text:
        lines.append(
            f"warning: {location} contains the placeholder {text.text_format.placeholder!r}; it is removed from "
            "the text when rendered"
        )
    return lines


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
