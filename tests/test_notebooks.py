"""The committed notebooks: clean, parametrised, and in agreement with the default study."""

import ast

import nbformat
import pytest

from semmix_lib import params as P

STAGES = P.STAGES


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_committed_without_outputs(stage):
    nb = nbformat.read(stage.path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{stage.notebook} has outputs: clear them before committing "
                "(executed copies belong in outputs/<run>/)")


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_one_parameters_cell_that_papermill_parses_whole(stage):
    nb = nbformat.read(stage.path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assigned = [node.targets[0].id for node in ast.parse(tagged[0].source).body if isinstance(node, ast.Assign)]
    # papermill skips a line it cannot parse (with only a warning): every assignment must come through
    assert sorted(P.notebook_parameters(stage)) == sorted(assigned)
    assert "run_dir" in assigned


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_notebook_defaults_are_the_default_study(stage):
    """Opening a notebook in JupyterLab runs the same study as `make study`."""
    study = P.load_study(P.NOTEBOOK_DIR.parent / "params" / "default.yaml")
    defaults = P.notebook_parameters(stage)
    for key, value in P.stage_parameters(study, stage).items():
        assert ast.literal_eval(defaults[key]) == value, f"{stage.notebook}: {key}"


def test_every_shipped_study_file_is_valid():
    for path in sorted((P.NOTEBOOK_DIR.parent / "params").glob("*.yaml")):
        study = P.load_study(path)
        assert study["run"]
