"""docs/building-data.md's worked example, step by step on the bundled sample: convert,
decontaminate, mine, train."""

import json
import subprocess

from conftest import REPO, run_script, subprocess_env

INSTRUCTION = "Given a premise, retrieve a hypothesis that is entailed by the premise"


def command(*args):
    result = subprocess.run(list(args), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_worked_example_from_raw_pairs_to_a_stage1_run(quickstart_stage1, tmp_path):
    work = tmp_path / "work"
    raw = REPO / "data" / "samples" / "snli_pairs_en.jsonl"
    command("tpembed-convert", "nli-triplets", str(raw), str(work / "snli.jsonl"), "--premise-field", "text1",
            "--hypothesis-field", "text2", "--instruction", INSTRUCTION)  # fmt: skip
    records = [json.loads(line) for line in (work / "snli.jsonl").read_text().splitlines()]
    assert records and all(r["instruction"] == INSTRUCTION and r["pos"] for r in records)

    # an "evaluation set" that holds two of the premises: decontamination removes exactly those
    planted = [records[3]["query"], records[10]["query"].upper()]
    evaluation = tmp_path / "dev.jsonl"
    evaluation.write_text("".join(json.dumps({"sentence1": s, "sentence2": "x y", "score": 1}) + "\n" for s in planted))
    command("tpembed-decontaminate", str(work / "snli.jsonl"), "--eval", str(evaluation), "--output-dir",
            str(work / "clean"), "--no-progress")  # fmt: skip
    clean = [json.loads(line) for line in (work / "clean" / "snli.jsonl").read_text().splitlines()]
    assert [r["query"] for r in clean] == [r["query"] for i, r in enumerate(records) if i not in (3, 10)]

    out = command("tpembed-mine", str(work / "clean" / "snli.jsonl"), str(work / "snli_mined.jsonl"), "--model",
                  str(quickstart_stage1), "--range-min", "2", "--range-max", "50", "--no-progress")  # fmt: skip
    assert "candidates removed" in out
    mined = [json.loads(line) for line in (work / "snli_mined.jsonl").read_text().splitlines()]
    assert [r["query"] for r in mined] == [r["query"] for r in clean]
    assert all(not set(r["negs"]) & set(r["pos"]) and "mining" in r for r in mined)

    run_dir = tmp_path / "runs" / "mined"
    run_script("stage1.py", REPO / "configs/quickstart/stage1.yaml", run_dir, "--train-files",
               str(work / "snli_mined.jsonl"), "--max-steps", "2", "--batch-size", "8")  # fmt: skip
    assert (run_dir / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
