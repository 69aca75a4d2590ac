"""The inference config's dependencies as the Docker target's wheelhouse sees them."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfleet.deployer.errors import DeploymentError
from modelfleet.deployer.wheelhouse import user_requirements


def test_requirements_file_and_conda_pip_section_are_merged(tmp_path: Path) -> None:
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# comment\nrequests==2.32.3  # pinned\n\nscipy>=1.11\n")
    conda = tmp_path / "env.yml"
    conda.write_text(
        "name: project_environment\n"
        "dependencies:\n"
        "  - python=3.11\n"
        "  - pip:\n"
        "    - azureml-defaults\n"
        "    - inference-schema[numpy-support]\n"
    )
    assert user_requirements(reqs, conda) == (
        "requests==2.32.3\nscipy>=1.11\ninference-schema[numpy-support]\n"
    )


def test_no_dependencies_gives_empty_requirements() -> None:
    assert user_requirements(None, None) == ""


def test_unreadable_requirements_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match=r"cannot read requirements file .*missing.txt"):
        user_requirements(tmp_path / "missing.txt", None)


def test_broken_conda_file_is_named(tmp_path: Path) -> None:
    conda = tmp_path / "env.yml"
    conda.write_text("dependencies: [pip: {\n")
    with pytest.raises(DeploymentError, match=r"conda file .*env.yml is not valid YAML"):
        user_requirements(None, conda)
    conda.write_text("- just\n- a list\n")
    with pytest.raises(DeploymentError, match=r"expected a mapping with 'dependencies'"):
        user_requirements(None, conda)
