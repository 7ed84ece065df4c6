"""Turn public dataset layouts into tpembed training records.

    tpembed-prepare nli-triplets snli/validation.jsonl out/snli_triplets.jsonl

nli-triplets: NLI records {premise, hypothesis, label} grouped by premise into
retrieval records {"query": premise, "pos": [entailed hypotheses],
"negs": [contradicting hypotheses]}; premises without both are skipped (the
`nli-triplets` converter of tpembed-convert, which has more options).
drop-empty: copy records, leaving out those whose query, positive or text fields
are empty (training refuses them, see data/formats.py).
(NLI pairs need no preparation: the `sts` reader maps their labels to 2/1/0.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tpembed.data.formats import iter_rows


def nli_triplets(source: str | Path, target: str | Path) -> int:
    """NLI pairs grouped by premise into retrieval records (tpembed-convert nli-triplets)."""
    from tpembed.data.convert import convert

    return convert("nli-triplets", source, target, overwrite=True, provenance=False).written


TEXT_FIELDS = ("query", "question", "pos", "positive", "text", "text1", "text2", "sentence1", "sentence2")


def drop_empty(source: str | Path, target: str | Path) -> int:
    kept = []
    for _, row in iter_rows(source):
        values = [row[name] for name in TEXT_FIELDS if name in row]
        values = [v for value in values for v in (value if isinstance(value, list) else [value])]
        if all(isinstance(v, str) and v.strip() for v in values):
            kept.append(row)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", encoding="utf-8") as handle:
        for row in kept:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tpembed-prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    triplets = commands.add_parser("nli-triplets", help="NLI pairs -> retrieval triplets grouped by premise")
    triplets.add_argument("source")
    triplets.add_argument("target")
    clean = commands.add_parser("drop-empty", help="copy records without empty text fields")
    clean.add_argument("source")
    clean.add_argument("target")
    args = parser.parse_args(argv)
    count = {"nli-triplets": nli_triplets, "drop-empty": drop_empty}[args.command](args.source, args.target)
    print(f"wrote {count} retrieval records to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
