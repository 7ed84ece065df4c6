"""docs/building-data.md's worked example, step by step on the bundled sample: convert,
decontaminate, mine, synthesise the missing negatives, train."""

import json
import subprocess

from conftest import REPO, openai_test_server, run_script, subprocess_env

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

    # synthesis of the missing negatives against an OpenAI-compatible server (tests/openai_server.py
    # stands in for the LLM): each record asks for a fifth negative, and the server answers with
    # its positive's words in reverse order, which passes every constraint; the record whose
    # positive the server does not know gets an answer that is not JSON, and keeps its four
    replies = {f"Relevant passage: {r['pos'][0]}\n": json.dumps({"negative": " ".join(r["pos"][0].split()[::-1])})
               for r in mined[1:]}  # fmt: skip
    with openai_test_server(tmp_path, {"match": list(replies.items()), "default": "no"}) as url:
        command("tpembed-synthesize", "hard-negatives", str(work / "snli_mined.jsonl"), str(work / "snli_filled.jsonl"),
                "--backend", "openai", "--model", "ok", "--base-url", url,
                "--min-negatives", str(max(len(r["negs"]) for r in mined) + 1), "--max-tries", "2",
                "--eval", str(evaluation), "--no-progress")  # fmt: skip
    filled = [json.loads(line) for line in (work / "snli_filled.jsonl").read_text().splitlines()]
    assert [r["query"] for r in filled] == [r["query"] for r in mined]
    assert filled[0]["negs"] == mined[0]["negs"] and "synthesis" not in filled[0]
    for before, after in zip(mined[1:], filled[1:]):
        assert after["negs"] == [*before["negs"], " ".join(before["pos"][0].split()[::-1])]
        assert after["synthesis"]["operation"] == "hard-negatives" and after["synthesis"]["model"] == "ok"

    run_dir = tmp_path / "runs" / "mined"
    run_script("stage1.py", REPO / "configs/quickstart/stage1.yaml", run_dir, "--train-files",
               str(work / "snli_filled.jsonl"), "--max-steps", "2", "--batch-size", "8")  # fmt: skip
    assert (run_dir / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
