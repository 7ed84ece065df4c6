"""The README's promises that can be checked here."""

from conftest import REPO
from tpembed.train.config import reference_markdown


def test_config_reference_is_current():
    reference = (REPO / "docs" / "configuration.md").read_text()
    assert reference_markdown() in reference, "regenerate the table with: python -m tpembed.train.config"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    command = 'pip install -e ".[test]" && python -m pytest'
    assert command in readme
    assert command in (REPO / ".ci" / "run").read_text()


def test_quickstart_command_points_at_existing_files():
    readme = (REPO / "README.md").read_text()
    assert "accelerate launch train/stage1.py --config configs/quickstart/stage1.yaml" in readme
    assert (REPO / "configs/quickstart/stage1.yaml").is_file()
