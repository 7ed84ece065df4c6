"""Export to sentence-transformers: a fresh process reproduces the training-time embeddings."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, subprocess_env
from tpembed.train.embedder import Embedder
from tpembed.train.export import ExportError, add_results_to_card, export, main, parity_check
from tpembed.train.mteb_adapter import CMTEB_TASKS, TYPE_INSTRUCTIONS

INSTRUCTION = "Given a premise, retrieve a hypothesis that is entailed by the premise"
TEXTS = ["A man is playing a guitar.", "一架飞机要起飞了。", "", "x " * 300, "placeholder <|im_start|> in text"]

FRESH_PROCESS = """
import sys
sys.modules["tpembed"] = None  # the export loads and encodes with no tpembed installed
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer
import json
path, out, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = SentenceTransformer(path, trust_remote_code=True, device="cpu")
result = {
    "query": model.encode(texts, prompt_name="query", convert_to_tensor=True),
    "document": model.encode(texts, prompt_name="document", convert_to_tensor=True),
}
truncated = SentenceTransformer(path, trust_remote_code=True, device="cpu", truncate_dim=256)
result["query_256"] = truncated.encode(texts, prompt_name="query", convert_to_tensor=True, normalize_embeddings=True)
save_file({k: v.contiguous() for k, v in result.items()}, out)
"""


@pytest.fixture(scope="module")
def exports(quickstart_stage1, quickstart_stage2, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    stage1 = export(quickstart_stage1, root / "stage1", query_instruction=INSTRUCTION)
    # stage 2 through the command line, as a user runs it, with a Chinese instruction table
    table = root / "instructions.yaml"
    table.write_text("task_types:\n  Clustering: 识别新闻标题的主题\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.export",
            str(quickstart_stage2[0]),
            str(root / "stage2"),
            "--query-instruction",
            INSTRUCTION,
            "--prompt",
            "sts=Retrieve semantically similar text",
            "--language",
            "zh",
            "--instructions",
            str(table),
            "--instruction",
            "STS=判断两句话的意思是否相同",
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(r"parity query: max abs diff \d\.\d+e-\d+", result.stdout)
    assert stage1.max_abs_diff["query"] <= 1e-4
    return {"stage1": (quickstart_stage1, root / "stage1"), "stage2": (quickstart_stage2[0], root / "stage2")}


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_fresh_process_encodes_like_training(exports, stage, tmp_path):
    run_dir, export_dir = exports[stage]
    out = tmp_path / "encoded.safetensors"
    env = subprocess_env() | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(export_dir), str(out), json.dumps(TEXTS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    exported = load_file(str(out))
    embedder = Embedder.from_checkpoint(run_dir)
    queries = embedder.encode(TEXTS, instruction=INSTRUCTION)
    documents = embedder.encode(TEXTS)
    torch.testing.assert_close(exported["query"], queries, atol=1e-5, rtol=0)
    torch.testing.assert_close(exported["document"], documents, atol=1e-5, rtol=0)
    sliced = torch.nn.functional.normalize(queries[:, :256], dim=-1)
    torch.testing.assert_close(exported["query_256"], sliced, atol=1e-5, rtol=0)
    assert not torch.allclose(queries, documents, atol=1e-3), "the query prompt must change the embedding"


def test_directory_layout_no_absolute_paths_no_pickles(exports, tmp_path):
    for run_dir, export_dir in exports.values():
        files = [p for p in export_dir.rglob("*") if p.is_file()]
        names = {str(p.relative_to(export_dir)) for p in files}
        assert {
            "modules.json",
            "config_sentence_transformers.json",
            "model.safetensors",
            "tpembed_st.py",
            "1_Pooling/config.json",
            "2_Dense/config.json",
            "2_Dense/model.safetensors",
            "README.md",
        } <= names
        assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
        for path in files:
            if path.suffix in (".json", ".py", ".md", ".txt", ".yaml"):
                text = path.read_text()
                for absolute in (str(export_dir), str(run_dir), str(REPO), str(tmp_path.parent.parent)):
                    assert absolute not in text, f"{path.name} holds the absolute path {absolute}"
        modules = json.loads((export_dir / "modules.json").read_text())
        assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["TPEmbedTransformer", "Pooling", "Dense"]
        assert not any("Normalize" in m["type"] for m in modules)
        assert json.loads((export_dir / "1_Pooling/config.json").read_text())["pooling_mode"] == "lasttoken"
        dense = json.loads((export_dir / "2_Dense/config.json").read_text())
        assert (dense["in_features"], dense["out_features"], dense["bias"]) == (64, 1792, True)
        assert dense["activation_function"] == "torch.nn.modules.linear.Identity"
        assert json.loads((export_dir / "tokenizer_config.json").read_text())["padding_side"] == "left"
        st_config = json.loads((export_dir / "config_sentence_transformers.json").read_text())
        assert st_config["similarity_fn_name"] == "cosine" and st_config["prompts"]["document"] == ""


def test_template_and_instruction_are_applied_exactly_once(exports):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(exports["stage2"][1]), trust_remote_code=True, device="cpu")
    assert model.prompts["query"] == f"Instruct: {INSTRUCTION}\nQuery: "
    assert model.prompts["sts"] == "Instruct: Retrieve semantically similar text\nQuery: "
    features = model.preprocess(["a man sings"], prompt=model.prompts["query"])
    text = model.tokenizer.decode(features["input_ids"][0][features["attention_mask"][0].bool()])
    expected = f"This sentence: <|im_start|>\u201cInstruct: {INSTRUCTION}\nQuery: a man sings\u201d means in one word: "
    assert text == expected + "\u201c"
    stage1 = SentenceTransformer(str(exports["stage1"][1]), trust_remote_code=True, device="cpu")
    features = stage1.preprocess(["a man sings"], prompt=stage1.prompts["query"])
    text = stage1.tokenizer.decode(features["input_ids"][0])
    assert text == f"Instruct: {INSTRUCTION}\nQuery: a man sings<|endoftext|>"


def test_parity_check_fails_loudly_on_a_wrong_export(exports, tmp_path):
    run_dir, export_dir = exports["stage2"]
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    weights = load_file(str(broken / "2_Dense/model.safetensors"))
    weights["linear.bias"] = weights["linear.bias"] + 1e-2
    save_file(weights, str(broken / "2_Dense/model.safetensors"))
    with pytest.raises(ExportError, match="parity check failed"):
        parity_check(broken, Embedder.from_checkpoint(run_dir), INSTRUCTION)


def test_export_refuses_to_overwrite(exports):
    run_dir, export_dir = exports["stage1"]
    with pytest.raises(ExportError, match="exists"):
        export(run_dir, export_dir)


def test_model_card_describes_the_model_and_its_snippet_runs(exports, tmp_path):
    run_dir, export_dir = exports["stage2"]
    card = (export_dir / "README.md").read_text()
    assert "`tpembed:tiny-qwen3`" in card and "stage 1: 3 steps; stage 2: 10 steps" in card
    assert "| Token Prepending layers | 1, 2, 3, 4, 5, 6, 7 |" in card
    assert "128, 256, 512, 768, 1024, 1280, 1536, 1792" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("PATH/TO/THIS/DIRECTORY", str(export_dir))
    result = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=tmp_path,
        env=subprocess_env() | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensor" in result.stdout


def test_evaluation_table_is_added_to_the_card_once(exports, tmp_path):
    _, export_dir = exports["stage2"]
    copy = tmp_path / "export"
    copy.mkdir()
    shutil.copy(export_dir / "README.md", copy / "README.md")
    before = (copy / "README.md").read_text()
    results = {"dims": [128, 1792], "tasks": {"stsb": {"type": "sts", "main_metric": "spearman", "num_examples": 3,
               "by_dim": {"128": {"spearman": 70.123}, "1792": {"spearman": 75.5}}}}}  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(results))
    for _ in range(2):  # a second evaluation replaces the table
        add_results_to_card(copy, tmp_path / "results.json")
    card = (copy / "README.md").read_text()
    assert card.startswith(before.rstrip("\n"))
    assert card.count("## Evaluation") == 1
    assert "| stsb | spearman | 70.12 | 75.50 |" in card


def test_prompts_hold_every_task_type_of_the_instruction_table(exports):
    """mteb looks prompts up by task type: each symmetric type has its instruction, retrieval-like
    types a query prompt and an empty document prompt; the flags and the YAML file override."""
    for stage, language in (("stage1", "en"), ("stage2", "zh")):
        prompts = json.loads((exports[stage][1] / "config_sentence_transformers.json").read_text())["prompts"]
        table = dict(TYPE_INSTRUCTIONS[language])
        if stage == "stage2":
            table |= {"STS": "判断两句话的意思是否相同", "Clustering": "识别新闻标题的主题"}
        for task_type in ("STS", "PairClassification", "Classification", "Clustering"):
            assert prompts[task_type] == f"Instruct: {table[task_type]}\nQuery: ", (stage, task_type)
        for task_type in ("Retrieval", "Reranking"):
            assert prompts[f"{task_type}-query"] == f"Instruct: {table[task_type]}\nQuery: "
            assert prompts[f"{task_type}-document"] == "" and task_type not in prompts
        assert prompts["query"] == f"Instruct: {INSTRUCTION}\nQuery: " and prompts["document"] == ""
        assert prompts["T2Retrieval-query"] == f"Instruct: {CMTEB_TASKS['T2Retrieval'][1]}\nQuery: "
        assert "T2Retrieval" not in prompts
    card = (exports["stage2"][1] / "README.md").read_text()
    assert "## mteb" in card and 'model.model_card_data.model_name = "tpembed/stage2"' in card


def test_a_bad_instruction_table_fails_before_the_checkpoint_is_read(tmp_path, capsys):
    missing = str(tmp_path / "no-such-run")
    with pytest.raises(SystemExit):
        main([missing, str(tmp_path / "out"), "--instruction", "Retreival=find passages"])
    assert "unknown task type or task 'Retreival'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([missing, str(tmp_path / "out"), "--language", "fr"])
    assert "no default instructions for language 'fr'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_exporting_the_same_run_again_writes_the_same_model_files(exports, tmp_path):
    """tpembed-pipeline re-exports before it evaluates; tpembed-eval keeps the tasks of an
    interrupted evaluation only while the model's files hash the same, so export is deterministic."""
    from tpembed.train.eval import MODEL_FILE_SUFFIXES, files_digest

    run_dir, first = exports["stage1"]
    again = tmp_path / "again"
    export(run_dir, again, query_instruction=INSTRUCTION)
    names = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.suffix in MODEL_FILE_SUFFIXES)
    assert names and names == sorted(
        p.relative_to(again).as_posix() for p in again.rglob("*") if p.suffix in MODEL_FILE_SUFFIXES
    )
    assert any(name.endswith(".safetensors") for name in names)
    assert files_digest(first, MODEL_FILE_SUFFIXES) == files_digest(again, MODEL_FILE_SUFFIXES)
