"""The pipeline's recipes: every training file exists or is written by a prepare step."""

from pathlib import Path

import pytest
import yaml

from conftest import REPO, SHARED_DATA
from tpembed.train.config import STAGE_DEFAULTS, load_config
from tpembed.train.pipeline import RECIPES


def decontaminations(steps):
    """(training files, evaluation files, output dir) of each tpembed-decontaminate data step."""
    for _, (module, *arguments) in steps:
        if module == "tpembed.data.decontaminate":
            evaluation, output = arguments.index("--eval"), arguments.index("--output-dir")
            yield arguments[:evaluation], arguments[evaluation + 1 : output], arguments[output + 1]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_dataset_of_a_recipe_exists_or_is_prepared(name):
    recipe = RECIPES[name]
    steps = recipe["prepare"]
    prepared = {creates for creates, _ in steps}
    for sources, _, output_dir in decontaminations(steps):  # it writes OUTPUT_DIR/<each file's name>
        assert len({Path(source).name for source in sources}) == len(sources), "one output name per file"
        prepared |= {f"{output_dir}/{Path(source).name}" for source in sources}
        assert sources and set(sources) <= {creates for creates, _ in steps}, "it cleans prepared files"
    for stage in (1, 2):
        config = load_config(["--config", str(REPO / recipe[f"stage{stage}"])], base=STAGE_DEFAULTS[stage])
        for dataset in config.data.datasets:
            if dataset.path in prepared:
                continue
            if dataset.path.startswith("../shared/data/"):
                if SHARED_DATA.is_dir():
                    assert (REPO / dataset.path).exists(), f"{name} stage {stage}: {dataset.path}"
                continue
            bundled = dataset.path.startswith("data/") and (REPO / dataset.path).exists()
            assert bundled, f"{name} stage {stage}: {dataset.path} is neither bundled (data/) nor prepared"
    for creates, (module, *arguments) in steps:
        assert module.startswith("tpembed.") and any(creates.startswith(a) for a in arguments), creates
        if module in ("tpembed.data.convert", "tpembed.data.decontaminate"):  # they refuse an existing output
            assert "--overwrite" in arguments, f"{creates}: a stale step could not run again"
        inputs = [a for a in arguments if a.startswith(("../shared/data/", "data/", "configs/"))]
        for source in inputs:
            if not source.startswith("../shared/data/") or SHARED_DATA.is_dir():
                assert (REPO / source).exists(), f"{name}: {source}"


def test_prepare_only_runs_the_data_steps_and_trains_nothing(monkeypatch):
    from tpembed.train import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "data_steps", lambda steps: calls.append(("data", len(steps))))
    monkeypatch.setattr(pipeline, "train_stage", lambda *args: calls.append(("train",)) or ("run", 0.0))
    monkeypatch.setattr(pipeline, "run", lambda *args: calls.append(("run",)) or 0.0)
    assert pipeline.main(["--recipe", "smollm2", "--prepare-only"]) == 0
    assert calls == [("data", len(RECIPES["smollm2"]["prepare"]))]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_that_decontaminates_cleans_against_every_file_it_evaluates_on(name):
    recipe = RECIPES[name]
    cleaned_against = {path for _, evaluation, _ in decontaminations(recipe["prepare"]) for path in evaluation}
    if not cleaned_against:
        pytest.skip(f"{name} has no decontamination step")
    for tasks_file in recipe["tasks"]:
        for task in yaml.safe_load((REPO / tasks_file).read_text())["tasks"]:
            # classification / clustering read DIR/<split>.jsonl (DIR/train.jsonl fits the classifier)
            evaluated = f"{task['path']}/{task['split']}.jsonl" if "split" in task else task["path"]
            assert evaluated in cleaned_against, f"{name}: {task['name']} ({evaluated}) is not cleaned against"


def test_a_data_step_runs_when_its_file_is_missing_or_older_than_what_it_reads(tmp_path, monkeypatch):
    import os

    from tpembed.train import pipeline

    source, folder = tmp_path / "source.jsonl", tmp_path / "eval"
    (folder / "sub").mkdir(parents=True)
    source.write_text("a\n")
    (folder / "sub" / "queries.jsonl").write_text("q\n")
    output_dir = tmp_path / "clean"
    creates = output_dir / "summary.json"
    ran = []

    def fake_run(command, description):
        ran.append(description)
        output_dir.mkdir(exist_ok=True)
        creates.write_text("{}")
        os.utime(creates, (1000, 1000))
        return 0.0

    monkeypatch.setattr(pipeline, "run", fake_run)
    for path in (source, folder / "sub" / "queries.jsonl"):
        os.utime(path, (500, 500))
    step = [(str(creates), ["tpembed.data.decontaminate", str(source), "--eval", str(folder),
                             "--output-dir", str(output_dir)])]  # fmt: skip
    pipeline.data_steps(step)  # missing
    pipeline.data_steps(step)  # newer than both inputs (its own folder does not count)
    assert len(ran) == 1 and "missing" in ran[0]
    os.utime(folder / "sub" / "queries.jsonl", (2000, 2000))  # a file inside an input folder changed
    pipeline.data_steps(step)
    assert len(ran) == 2 and "older than its inputs" in ran[1]
    os.utime(source, (3000, 3000))
    pipeline.data_steps(step)
    assert len(ran) == 3
