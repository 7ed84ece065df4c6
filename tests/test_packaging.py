"""Packaging: one `tpembed` namespace in site-packages, console scripts, optional extras."""

import subprocess
import sys
import zipfile

import pytest

from conftest import REPO, subprocess_env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("tpembed-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_only_the_tpembed_namespace(wheel):
    top_level = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"tpembed"}
    names = set(wheel.namelist())
    for module in ("train/loop.py", "train/engine.py", "data/formats.py", "modeling/losses/infonce.py"):
        assert f"tpembed/{module}" in names, module
    # what export copies and what the quickstart reads travel with the package
    assert "tpembed/train/st_module/tpembed_st.py" in names
    assert any(n.startswith("tpembed/data/samples/") and n.endswith(".jsonl") for n in names)


def test_the_wheel_declares_the_console_scripts_and_extras(wheel):
    dist_info = next(n.split("/")[0] for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    for command in ("tpembed-stage1", "tpembed-stage2", "tpembed-export", "tpembed-eval", "tpembed-validate"):
        assert f"{command} = tpembed." in entry_points, command
    metadata = wheel.read(f"{dist_info}/METADATA").decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [line for line in requires if "extra ==" not in line]
    for heavy in ("wandb", "tensorboard", "matplotlib", "deepspeed", "gguf", "mteb"):
        assert not any(f": {heavy}" in line for line in core), f"{heavy} is a core dependency"
        assert any(f": {heavy}" in line for line in requires), f"{heavy} is in no extra"


def test_console_script_runs():
    result = subprocess.run(["tpembed-export", "--help"], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0 and "sentence-transformers" in result.stdout


def test_core_imports_leave_the_optional_packages_alone():
    code = (
        "import sys\n"
        "import tpembed.train.loop, tpembed.train.export, tpembed.train.eval, tpembed.train.stage1\n"
        "print(sorted(m for m in ('wandb', 'tensorboard', 'matplotlib', 'deepspeed', 'gguf', 'mteb') "
        "if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_a_missing_tracker_names_its_extra(monkeypatch):
    import importlib.util

    from tpembed.train.config import ConfigError, load_config
    from tpembed.train.events import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"wandb is not installed; pip install 'tpembed\[wandb\]'"):
        trackers(load_config(["--report-to", "wandb"]))
    # 'auto' is TensorBoard when it is installed, nothing when it is not
    assert trackers(load_config([])) == ["tensorboard"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert trackers(load_config([])) == []


def test_evaluation_without_matplotlib_writes_results_and_says_why(monkeypatch, tmp_path, capsys):
    from tpembed.train.eval import write_results

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    results = {"dims": [4], "tasks": {"t": {"main_metric": "spearman", "by_dim": {"4": {"spearman": 1.0}}}}}
    json_path, plot_path = write_results(results, tmp_path)
    assert json_path.is_file() and plot_path is None
    assert "pip install 'tpembed[plots]'" in capsys.readouterr().err
