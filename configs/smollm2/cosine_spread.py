"""How spread out a model's embeddings are: the mean and standard deviation of the cosine
between different texts (a collapsed embedder maps every text to nearly the same vector: mean
near 1, spread near 0). Reads the first N distinct sentences of an STS file.

    python configs/smollm2/cosine_spread.py runs/tp_ablation/stage1 runs/tp_ablation/tp_1_7_seed3 \
        --texts ../shared/data/stsb_en/dev.jsonl -n 200
"""

from __future__ import annotations

import argparse

import torch

from tpembed.train.config import EvalTaskConfig
from tpembed.train.eval import DEFAULT_STS_INSTRUCTION, load_sts, open_model


def first_sentences(path: str, n: int) -> list[str]:
    """The first `n` distinct sentences of an STS file, read as the evaluator reads it."""
    first, second, _ = load_sts(EvalTaskConfig(type="sts", path=path))
    distinct = dict.fromkeys(text for pair in zip(first, second) for text in pair)
    return list(distinct)[:n]


def spread(embeddings: torch.Tensor) -> tuple[float, float]:
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    cosines = unit @ unit.T
    off_diagonal = cosines[~torch.eye(len(unit), dtype=torch.bool)]
    return off_diagonal.mean().item(), off_diagonal.std().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="tpembed runs, checkpoints or exports")
    parser.add_argument("--texts", default="../shared/data/stsb_en/dev.jsonl", help="an STS JSONL file")
    parser.add_argument("-n", type=int, default=200, help="how many distinct sentences")
    parser.add_argument("--instruction", default=DEFAULT_STS_INSTRUCTION)
    args = parser.parse_args()
    texts = first_sentences(args.texts, args.n)
    print("| model | dims | texts | mean cosine | sd of cosine |")
    print("|---|---:|---:|---:|---:|")
    for model in args.models:
        encode, dims, name = open_model(model)
        with torch.no_grad():
            embeddings = encode(texts, args.instruction)
        for dim in sorted({dims[0], dims[-1]}):
            mean, sd = spread(embeddings[:, :dim])
            print(f"| {name} | {dim} | {len(texts)} | {mean:.3f} | {sd:.3f} |", flush=True)


if __name__ == "__main__":
    main()
